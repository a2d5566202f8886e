//! How a launch of each plan kernel binds its arguments and how many rows it
//! covers: one description per kernel kind, which the CPU executor and the
//! CUDA lowering both follow, so a new kernel is bound once.
//!
//! The kernel's code comes from its library description
//! ([`moec_kernels::library::describe`]); its parameters are, in order, the
//! [`Arg`]s below, where a buffer argument expands to the backend's buffer
//! parameters (one, or two for fp8: the data, then the block scales).

use super::{DType, KernelKind, Phase, Plan, WeightOn};
use moec_kernels::library::Kind;

/// One argument of a launch, in the order of the kernel's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// The op's `i`-th input buffer.
    Input(usize),
    /// The op's `i`-th output buffer.
    Output(usize),
    /// The router's selection bias (a weight vector, `[experts]` f32).
    RouterBias,
    /// The router's scaling factor (`layer.router.scale`, f32).
    RouterScale,
    /// The shared experts' sigmoid gate (a weight vector, `[hidden]` f32).
    SharedGate,
    /// The clamp of the activation's SwiGLU (f32): the shared experts' in the
    /// shared phase, the routed experts' otherwise.
    ClampLimit,
}

/// The rows a launch covers (one kernel thread or block per row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaunchRows {
    /// The tokens of the op's chunk (all of the rank's outside a pipeline).
    ChunkTokens,
    /// Every token of the rank, whatever the chunk.
    LayerTokens,
    /// The rows this rank sends in the op's chunk (routing-dependent).
    Sent,
    /// The rows this rank receives in the op's chunk (routing-dependent).
    Received,
    /// The by-rank rows (one per token and destination rank) this rank
    /// receives in the op's chunk.
    ReceivedByRank,
    /// The rows of the dispatch's send buffer: [`LaunchRows::Sent`], or the
    /// by-rank rows this rank sends when the plan dispatches by rank.
    WireSent,
    /// The rows of the dispatch's receive buffer: [`LaunchRows::Received`],
    /// or [`LaunchRows::ReceivedByRank`] when the plan dispatches by rank.
    WireReceived,
}

/// How one launch of a kernel kind is bound.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub args: &'static [Arg],
    pub rows: LaunchRows,
}

/// The binding of a launch of `kind` in an op of `phase`, or `None` for the
/// kinds that are not launched from a description (the native assignment
/// kernels, and `ScaleRows`, which only GEMM epilogues use).
pub fn binding(kind: KernelKind, phase: Phase) -> Option<Binding> {
    use Arg::{ClampLimit, Input, Output, RouterBias, RouterScale, SharedGate};
    const IN_OUT: &[Arg] = &[Input(0), Output(0)];
    const TWO_IN_OUT: &[Arg] = &[Input(0), Input(1), Output(0)];
    const THREE_IN_OUT: &[Arg] = &[Input(0), Input(1), Input(2), Output(0)];
    let (args, rows): (&'static [Arg], LaunchRows) = match kind {
        KernelKind::RouterFused => (
            &[Input(0), Output(0), Output(1), RouterBias, RouterScale],
            LaunchRows::ChunkTokens,
        ),
        KernelKind::RouterTopk => (
            &[Input(0), Output(0), Output(1), RouterBias],
            LaunchRows::ChunkTokens,
        ),
        KernelKind::RouterScores | KernelKind::RouterGroupSelect => {
            (IN_OUT, LaunchRows::ChunkTokens)
        }
        KernelKind::RouterBias => (&[Input(0), Output(0), RouterBias], LaunchRows::ChunkTokens),
        KernelKind::RouterNormalize => (&[Output(0)], LaunchRows::ChunkTokens),
        KernelKind::RouterScale => (&[Output(0), RouterScale], LaunchRows::ChunkTokens),
        KernelKind::Permute
        | KernelKind::PermutePack
        | KernelKind::UnpermuteWeightedSum
        | KernelKind::PackRank
        | KernelKind::SumRank => (THREE_IN_OUT, LaunchRows::ChunkTokens),
        KernelKind::Expand | KernelKind::Reduce => (THREE_IN_OUT, LaunchRows::ReceivedByRank),
        KernelKind::Pack => (IN_OUT, LaunchRows::Sent),
        KernelKind::QuantizeFp8 => (IN_OUT, LaunchRows::WireSent),
        KernelKind::DequantizeFp8 => (IN_OUT, LaunchRows::WireReceived),
        KernelKind::Activation => (
            &[Input(0), Output(0), ClampLimit],
            if phase == Phase::Shared {
                LaunchRows::LayerTokens
            } else {
                LaunchRows::Received
            },
        ),
        KernelKind::Unpermute | KernelKind::WeightedSum | KernelKind::Add => {
            (TWO_IN_OUT, LaunchRows::ChunkTokens)
        }
        KernelKind::SharedGate => (&[Input(0), Output(0), SharedGate], LaunchRows::ChunkTokens),
        KernelKind::Assign | KernelKind::ScaleRows => return None,
    };
    Some(Binding { args, rows })
}

/// The constants of the down projection's reducing epilogue (a GEMM with a
/// [`super::RankIndex`]): `unpermute_weighted_sum` from the `f32` product
/// into the layer's dtype, as both backends run it.
pub fn reduce_epilogue_constants(plan: &Plan) -> Vec<(String, i64)> {
    let l = &plan.layer;
    let mut c = row_constants(plan);
    c.push(("in_dtype".to_string(), DType::F32.code()));
    c.push((
        "weight_on_input".to_string(),
        i64::from(l.router.weight_on == WeightOn::Input),
    ));
    c.sort();
    c
}

/// The constants of the copy of the received by-rank rows to the expert
/// rows before an up projection through the expansion index, where a
/// backend's GEMM reads a dense operand (`permute`, unweighted: the plans
/// fuse the expansion only when the layer weighs the outputs).
pub fn gather_constants(plan: &Plan) -> Vec<(String, i64)> {
    row_constants(plan)
}

/// `dtype`, `hidden` and `top_k` of the layer.
fn row_constants(plan: &Plan) -> Vec<(String, i64)> {
    let l = &plan.layer;
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    vec![
        ("dtype".to_string(), l.dtype.code()),
        ("hidden".to_string(), int(l.hidden)),
        ("top_k".to_string(), int(l.router.top_k)),
    ]
}

/// The library kind of a plan kernel, or `None` for a native one.
pub fn library_kind(kind: KernelKind) -> Option<Kind> {
    Some(match kind {
        KernelKind::RouterFused => Kind::RouterFused,
        KernelKind::RouterScores => Kind::RouterScores,
        KernelKind::RouterBias => Kind::RouterBias,
        KernelKind::RouterGroupSelect => Kind::RouterGroupSelect,
        KernelKind::RouterTopk => Kind::RouterTopk,
        KernelKind::RouterNormalize => Kind::RouterNormalize,
        KernelKind::RouterScale => Kind::RouterScale,
        KernelKind::Permute => Kind::Permute,
        KernelKind::Pack => Kind::Pack,
        KernelKind::PermutePack | KernelKind::PackRank => Kind::PermutePack,
        KernelKind::QuantizeFp8 => Kind::QuantizeFp8,
        KernelKind::DequantizeFp8 => Kind::DequantizeFp8,
        KernelKind::Activation => Kind::Activation,
        KernelKind::Unpermute => Kind::Unpermute,
        KernelKind::WeightedSum => Kind::WeightedSum,
        KernelKind::UnpermuteWeightedSum | KernelKind::Reduce | KernelKind::SumRank => {
            Kind::UnpermuteWeightedSum
        }
        KernelKind::Expand => Kind::Permute,
        KernelKind::SharedGate => Kind::SharedGate,
        KernelKind::Add => Kind::Add,
        KernelKind::Assign | KernelKind::ScaleRows => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel that has a library description has a binding, and the
    /// other way round: neither backend can meet a kind it cannot bind.
    #[test]
    fn described_kernels_are_exactly_the_bound_ones() {
        for kind in KernelKind::ALL {
            assert_eq!(
                library_kind(kind).is_some(),
                binding(kind, Phase::Experts).is_some(),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_shared_activation_covers_every_token() {
        let routed = binding(KernelKind::Activation, Phase::Experts).map(|b| b.rows);
        let shared = binding(KernelKind::Activation, Phase::Shared).map(|b| b.rows);
        assert_eq!(routed, Some(LaunchRows::Received));
        assert_eq!(shared, Some(LaunchRows::LayerTokens));
    }
}
