//! The execution plan: what `moec build` produces and every backend executes.
//!
//! A plan is SPMD: one program of streams that every rank of the mesh runs,
//! plus the tables that differ per rank (which experts a rank holds). That keeps
//! a plan for a 1024-rank mesh as small as one for 8 ranks.
//!
//! The plan is self-contained: it repeats the numerics of the layer
//! ([`LayerConfig`]) so the runtime can execute it without the compiler or the
//! `.moe` file. It is versioned ([`PLAN_FORMAT_VERSION`]) and serialised as JSON;
//! [`Plan::from_json`] checks the version and every reference before a backend
//! sees it. Its [`std::fmt::Display`] is the stable text form `moec build` prints.

pub mod arena;
pub mod binding;
mod consistency;
mod forms;
pub mod order;
mod races;
pub mod rows;
mod text;
mod validate;

pub use consistency::{MAX_DIMS, MAX_ITEMS, MAX_OPS, MAX_STREAMS};
pub use forms::router_chain;
pub use text::{human_bytes, human_rate};
pub use validate::{buffer_bytes, BufferRef, LostWrite, OpRef, PlanError, Race, Stuck};

use serde::{Deserialize, Serialize};

/// Bumped whenever the meaning or shape of a plan changes.
pub const PLAN_FORMAT_VERSION: u32 = 4;

/// A compiled MoE layer: configuration, kernels, buffers and streams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Must equal [`PLAN_FORMAT_VERSION`].
    pub version: u32,
    pub layer: LayerConfig,
    pub mesh: MeshConfig,
    /// What the compiler chose and why the streams look the way they do.
    pub choices: Choices,
    /// Kernels with their specialisation constants; launches refer to them by index.
    pub kernels: Vec<Kernel>,
    /// Activation buffers of one rank (weights are not here: they are loaded by name).
    pub buffers: Vec<Buffer>,
    /// Number of events; events are numbered `0..events`.
    pub events: u32,
    /// The streams of one rank, each an in-order queue of operations.
    pub streams: Vec<Stream>,
    pub memory: MemoryPlan,
}

/// Element types of buffers and of the layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// fp8 e4m3; tensors of this type come with per-128-element f32 block scales.
    Fp8E4m3,
    I32,
    /// Flags (the dropless overflow flag).
    U8,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::Fp8E4m3 | DType::U8 => 1,
        }
    }

    /// The code kernels' `dtype` constants use (`moec_kernels::ir::Elem::from_code`).
    pub fn code(self) -> i64 {
        match self {
            DType::F32 => 0,
            DType::Bf16 => 1,
            DType::F16 => 2,
            DType::Fp8E4m3 => 3,
            DType::I32 => 4,
            DType::U8 => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::Fp8E4m3 => "fp8_e4m3",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }
}

/// The expert feed-forward function.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `down(silu(gate(x)) * up(x))`; with `limit`, gpt-oss's clamped form.
    Swiglu {
        limit: Option<f64>,
    },
    /// `down(gelu(up(x)))` with the exact (erf) GELU.
    Gelu,
    /// `down(gelu(up(x)))` with the tanh approximation.
    GeluTanh,
    Relu,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::Swiglu { .. } => "swiglu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Relu => "relu",
        }
    }

    /// True when the FFN has a gate projection beside the up projection.
    pub fn gated(self) -> bool {
        matches!(self, Activation::Swiglu { .. })
    }

    /// The code of the activation kernel's `act` constant.
    pub fn code(self) -> i64 {
        match self {
            Activation::Swiglu { .. } => 0,
            Activation::Gelu => 1,
            Activation::GeluTanh => 2,
            Activation::Relu => 3,
        }
    }

    /// The clamp limit of gpt-oss's SwiGLU, when there is one.
    pub fn limit(self) -> Option<f64> {
        match self {
            Activation::Swiglu { limit } => limit,
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SoftmaxOver {
    /// Softmax over all experts, then top-k.
    All,
    /// Top-k of the logits, then softmax over the k picked.
    Topk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupScore {
    /// Sum of the two best scores in the group (DeepSeek-V3).
    Top2Sum,
    /// The best score in the group (DeepSeek-V2).
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub count: u64,
    pub kept: u64,
    pub score: GroupScore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightOn {
    /// The weighted sum of expert outputs (most models).
    Output,
    /// Llama-4: the token is scaled by its weight before the expert.
    Input,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub scoring: Scoring,
    pub top_k: u64,
    /// gpt-oss's router bias, part of the logits (`l = W x + b`): it changes
    /// both the choice and the weights. Absent from a plan's JSON when false,
    /// so plans of layers without it are unchanged; a runtime that does not
    /// know the field refuses the plan (`deny_unknown_fields`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub logit_bias: bool,
    pub softmax_over: SoftmaxOver,
    /// DeepSeek-V3's correction bias: changes which experts are picked, not their weights.
    pub selection_bias: bool,
    pub groups: Option<GroupConfig>,
    pub normalize: bool,
    pub scale: f64,
    pub weight_on: WeightOn,
}

/// For `skip_serializing_if`: a `false` switch is left out of the JSON.
fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep assignments in global token order (rank-major, slot order within a token).
    Position,
    /// Keep the highest routing weights; ties by global token order.
    Probs,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityConfig {
    /// Every assignment is kept; buffers are sized for the worst case.
    Dropless,
    /// Each expert accepts at most `slots` token-slots per EP group.
    Limited {
        slots: u64,
        /// The factor the slots came from, when the file gave one.
        factor: Option<f64>,
        drop: DropPolicy,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    pub count: u64,
    /// Intermediate size of one shared expert (they run fused, `count * intermediate` wide).
    pub intermediate: u64,
    pub ffn: Activation,
    pub bias: bool,
    /// Qwen2-MoE: the shared output is multiplied by `sigmoid(x · w_gate)`.
    pub sigmoid_gate: bool,
}

/// The numerics of the layer, everything a backend needs to compute it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    pub name: String,
    pub hidden: u64,
    pub dtype: DType,
    pub dispatch_dtype: DType,
    pub tokens_per_rank: u64,
    pub experts: u64,
    pub intermediate: u64,
    pub ffn: Activation,
    pub expert_bias: bool,
    pub shared: Option<SharedConfig>,
    pub router: RouterConfig,
    pub capacity: CapacityConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub name: String,
    /// Dense peak of the compute dtype, FLOP/s.
    pub peak_flops: f64,
    /// Memory bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// Memory capacity, bytes.
    pub memory: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Bytes per second per GPU, each way.
    pub bandwidth: f64,
    /// Seconds per message.
    pub latency: f64,
}

/// The mesh. Ranks are numbered `((dp_index * ep) + ep_index) * etp + etp_index`,
/// so an EP group is `ep * etp` consecutive ranks and ranks fill nodes in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub ep: u64,
    pub etp: u64,
    pub dp: u64,
    pub device: DeviceConfig,
    pub intra_node: LinkConfig,
    pub inter_node: Option<LinkConfig>,
    /// `experts_of_ep_rank[r]`: the experts EP rank `r` holds, primary copies
    /// first, then replicas.
    pub experts_of_ep_rank: Vec<Vec<u64>>,
}

impl MeshConfig {
    pub fn world_size(&self) -> u64 {
        self.nodes.saturating_mul(self.gpus_per_node)
    }
}

/// The metadata the inter-node leg of the hierarchical dispatch sends beside
/// its rows (the forwarder cannot derive a token's routing inside its node
/// from the exchanged counts, so it travels with the token, as DeepEP sends
/// `topk_idx`): per destination node, the row and routing counts
/// ([`HIER_SIZE_BYTES_PER_PEER`]); per staged token, its assignment count;
/// per assignment, the destination's local index and receive row (u32 each).
pub const HIER_SIZE_BYTES_PER_PEER: u64 = 16;
/// See [`HIER_SIZE_BYTES_PER_PEER`].
pub const HIER_ROUTING_BYTES_PER_TOKEN: u64 = 4;
/// See [`HIER_SIZE_BYTES_PER_PEER`].
pub const HIER_ROUTING_BYTES_PER_ASSIGNMENT: u64 = 8;

/// Columns (i32) of one by-rank metadata row: for each of the `top_k`
/// picks, the destination's local expert index (or -1), then the `top_k`
/// weights as f32 bits. The runtime's layout, the compiler's buffers and
/// cost, and the plan checks all size the picks by this.
pub fn by_rank_pick_cols(top_k: u64) -> u64 {
    top_k.saturating_mul(2)
}

/// How the tokens travel in an all-to-all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum A2aAlgorithm {
    /// Every rank sends straight to every peer of the EP group.
    Flat,
    /// One copy of a token per destination node over the inter-node link, then
    /// forwarded inside the node (DeepEP's scheme).
    Hierarchical,
}

/// What the compiler chose. Everything here is also visible in the streams;
/// it is repeated so a reader (and `moec explain`) sees the decisions at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Choices {
    /// Token chunks pipelined across the streams (the overlap degree).
    pub chunks: u64,
    /// Tokens of one chunk (the last chunk may be smaller: `tokens_per_rank - (chunks-1)*chunk_tokens`).
    pub chunk_tokens: u64,
    pub fused_router: bool,
    pub fused_permute: bool,
    pub fused_combine: bool,
    pub fused_activation: bool,
    pub shared_concurrent: bool,
    pub dispatch: A2aAlgorithm,
    /// dtype on the wire for the dispatch (fp8 means per-128 block scales travel too).
    pub dispatch_dtype: DType,
    /// Rows of the expert input buffer of one rank for one chunk: every
    /// capacity slot, or for a dropless layer the expected load times
    /// `headroom` (at most the worst case). Every buffer marked
    /// [`RowBound::ExpertRows`] has this many rows.
    pub expert_rows: u64,
    /// Dispatch by rank: rows of one rank's by-rank receive buffers for one
    /// chunk, sized like `expert_rows` (every buffer marked
    /// [`RowBound::RankRows`]); 0 without dispatch by rank.
    pub rank_rows: u64,
    /// Dropless layers: the factor of the expected load the bounded buffers
    /// hold (`None`: the worst case, which never overflows). A pass whose
    /// routing needs more rows is detected when the counts are exchanged,
    /// before any row moves, and re-run with buffers grown to the real
    /// counts ([`Plan::grown`]).
    pub headroom: Option<f64>,
    /// Dropless plans raise a device-side overflow flag when a chunk's
    /// routing needs more rows than the bounded buffers hold.
    pub overflow_flag: bool,
    /// A token travels once per destination EP rank, with its picks there
    /// (`dedup_dispatch`), and is expanded to the experts on arrival.
    pub dedup_dispatch: bool,
    /// The expert rank sums its experts' weighted outputs of a token before
    /// the return trip: one row per (token, rank) back (`reduce_combine`).
    pub reduce_combine: bool,
}

/// A kernel of the memory-bound family (everything but GEMMs and collectives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelKind {
    /// scores, bias, group selection, top-k, normalise and scale in one pass.
    RouterFused,
    RouterScores,
    RouterBias,
    RouterGroupSelect,
    RouterTopk,
    RouterNormalize,
    RouterScale,
    /// Destination rank, expert and slot of every assignment (and the drop
    /// decision in capacity mode) from the routing and the exchanged counts.
    Assign,
    /// Gather rows into (destination, expert) order.
    Permute,
    /// Copy permuted rows into the per-peer send buffer.
    Pack,
    /// Permute straight into the send buffer.
    PermutePack,
    /// Llama-4: scale each routed row by its weight before the experts.
    ScaleRows,
    /// fp8 e4m3 quantisation with per-128-element block scales.
    QuantizeFp8,
    DequantizeFp8,
    Activation,
    /// Copy received rows back into token order.
    Unpermute,
    /// Weighted sum over the top-k slots.
    WeightedSum,
    /// Un-permute and weighted sum in one pass.
    UnpermuteWeightedSum,
    /// Dispatch by rank, on the source: each token's row into its by-rank
    /// send rows, unscaled (`permute_pack` over the destination ranks).
    PackRank,
    /// Dispatch by rank, on arrival: each received row copied to the expert
    /// rows of its picks (`permute` over the received rows).
    Expand,
    /// Reducing combine, before the return trip: the weighted sum of a
    /// received row's expert outputs (`unpermute_weighted_sum` over the
    /// received rows).
    Reduce,
    /// Reducing combine, on the source: a token's returned rows summed over
    /// the destination ranks (`unpermute_weighted_sum` over the ranks,
    /// unweighted).
    SumRank,
    /// Qwen2-MoE shared-expert gate: `sigmoid(x · w)` times the shared output.
    SharedGate,
    /// Output = routed + shared.
    Add,
}

impl KernelKind {
    /// Every kind, in declaration order.
    pub const ALL: [KernelKind; 24] = [
        KernelKind::RouterFused,
        KernelKind::RouterScores,
        KernelKind::RouterBias,
        KernelKind::RouterGroupSelect,
        KernelKind::RouterTopk,
        KernelKind::RouterNormalize,
        KernelKind::RouterScale,
        KernelKind::Assign,
        KernelKind::Permute,
        KernelKind::Pack,
        KernelKind::PermutePack,
        KernelKind::ScaleRows,
        KernelKind::QuantizeFp8,
        KernelKind::DequantizeFp8,
        KernelKind::Activation,
        KernelKind::Unpermute,
        KernelKind::WeightedSum,
        KernelKind::UnpermuteWeightedSum,
        KernelKind::PackRank,
        KernelKind::Expand,
        KernelKind::Reduce,
        KernelKind::SumRank,
        KernelKind::SharedGate,
        KernelKind::Add,
    ];
}

/// A specialised kernel: its kind plus the constants it is compiled with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub name: String,
    pub kind: KernelKind,
    /// Specialisation constants, sorted by name (hidden, experts, top_k, dtype codes, ...).
    pub constants: Vec<(String, i64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferRole {
    /// The layer input `x`, written by the caller.
    Input,
    /// The layer output, read by the caller.
    Output,
    /// Scratch owned by the plan.
    Scratch,
    /// Memory the collective library sends from or receives into.
    Comm,
}

/// An activation buffer of one rank. `offset` is its place in the rank's
/// scratch arena; buffers whose lifetimes overlap never overlap in the arena.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Buffer {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// `product(shape) * dtype.bytes()`, plus block scales for fp8.
    pub bytes: u64,
    pub role: BufferRole,
    pub offset: u64,
    /// First and last op (by [`Op::id`]) that touch the buffer.
    pub live: (u32, u32),
    /// The token chunk this buffer belongs to. `None` for whole-layer buffers
    /// (the input, the routing, the output, ...): an op of chunk `i` reads or
    /// writes only chunk `i`'s rows of those.
    pub chunk: Option<u64>,
    /// The rows of a buffer sized by the expected load (dropless plans): its
    /// first dimension is the plan's `choices.expert_rows` or
    /// `choices.rank_rows`, and grows with them when a pass overflows.
    pub bound: Option<RowBound>,
}

/// Which of the plan's bounded row counts sizes a buffer (see
/// [`Buffer::bound`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowBound {
    /// The expert-side rows of one chunk (`choices.expert_rows`).
    ExpertRows,
    /// The by-rank rows one rank receives in one chunk (`choices.rank_rows`).
    RankRows,
}

impl Buffer {
    /// The token chunk whose rows alone an op of `chunk` touches in this
    /// buffer, or `None` when it touches the whole buffer: an op of a chunk
    /// sees only that chunk's rows of a whole-layer buffer whose rows are the
    /// rank's `tokens` (fp8 buffers, whose scales follow the rows, are
    /// always whole). Both backends and the load checks follow this.
    pub fn chunk_rows(&self, chunk: Option<u64>, tokens: u64) -> Option<u64> {
        match (chunk, self.chunk) {
            (Some(c), None)
                if self.shape.first() == Some(&tokens) && self.dtype != DType::Fp8E4m3 =>
            {
                Some(c)
            }
            _ => None,
        }
    }
}

/// The phases of a layer, for reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Router,
    Permute,
    Dispatch,
    Experts,
    Combine,
    Unpermute,
    Shared,
    Output,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Router,
        Phase::Permute,
        Phase::Dispatch,
        Phase::Experts,
        Phase::Combine,
        Phase::Unpermute,
        Phase::Shared,
        Phase::Output,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Router => "router",
            Phase::Permute => "permute",
            Phase::Dispatch => "dispatch",
            Phase::Experts => "experts",
            Phase::Combine => "combine",
            Phase::Unpermute => "unpermute",
            Phase::Shared => "shared",
            Phase::Output => "output",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamRole {
    Compute,
    Comm,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stream {
    pub name: String,
    pub role: StreamRole,
    pub ops: Vec<Op>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Op {
    /// Unique in the plan; ids follow one valid sequential order of all ops.
    pub id: u32,
    pub name: String,
    pub phase: Phase,
    /// The token chunk this op works on, when the layer is chunked.
    pub chunk: Option<u64>,
    pub kind: OpKind,
    /// The cost model's estimate, microseconds.
    pub estimate_us: f64,
}

/// Which weights a GEMM multiplies by; the runtime maps these to tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmWeight {
    RouterGate,
    /// Gate and up projections of the local experts, side by side (`[2F, H]` per expert when gated).
    ExpertUp,
    ExpertDown,
    SharedUp,
    SharedDown,
}

/// What a GEMM does to its output on the way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Epilogue {
    None,
    /// The FFN activation (SwiGLU halves the width).
    Activation,
}

/// The expansion index of a chunk's received by-rank rows (`assign_expand`'s
/// outputs: `index` i32 and `weights` f32, each `[by-rank rows, top_k]`),
/// fused into an expert GEMM.
///
/// - On the up projection, `a` is the received by-rank rows: row `index[r,
///   j]` of the GEMM's input is by-rank row `r` (the expansion to the expert
///   rows fused into the operand load; the layer weighs the outputs).
/// - On the down projection, `c` is one row per received by-rank row: row
///   `r` is the sum over `j` of `weights[r, j]` times the GEMM's `f32` output
///   row `index[r, j]` (unweighted when the layer weighs the inputs), in `j`
///   order, rounded once (the reducing combine fused into the epilogue; the
///   kernel library's `unpermute_weighted_sum` over the `f32` product).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankIndex {
    pub index: u32,
    pub weights: u32,
}

impl OpKind {
    /// The buffer indices the op refers to, each with the field that holds
    /// it (the arena's lifetimes, the reference checks and the compiler's
    /// scheduler all read this one list).
    pub fn buffers(&self) -> Vec<(&'static str, u32)> {
        match self {
            OpKind::Launch {
                inputs, outputs, ..
            } => inputs
                .iter()
                .map(|&b| ("inputs", b))
                .chain(outputs.iter().map(|&b| ("outputs", b)))
                .collect(),
            OpKind::Gemm { a, c, by_rank, .. } => {
                let mut v = vec![("a", *a), ("c", *c)];
                if let Some(r) = by_rank {
                    v.extend([("by_rank.index", r.index), ("by_rank.weights", r.weights)]);
                }
                v
            }
            OpKind::Collective { send, recv, .. } => vec![("send", *send), ("recv", *recv)],
            OpKind::Record { .. } | OpKind::Wait { .. } => Vec::new(),
        }
    }

    /// The buffers the op writes: a launch's outputs, a GEMM's `c`, a
    /// collective's `recv`.
    pub fn writes(&self) -> Vec<u32> {
        match self {
            OpKind::Launch { outputs, .. } => outputs.clone(),
            OpKind::Gemm { c, .. } => vec![*c],
            OpKind::Collective { recv, .. } => vec![*recv],
            OpKind::Record { .. } | OpKind::Wait { .. } => Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    /// Fixed-size all-to-all (capacity mode: slots per expert are known).
    AllToAll,
    /// Variable-size all-to-all; the counts were exchanged on the device before.
    AllToAllV,
    /// Variable-size all-to-all of one row per (token, destination rank):
    /// dispatch by rank, and the reducing combine's return trip.
    AllToAllRank,
    /// Per-expert token counts, exchanged on the device (dropless).
    CountExchange,
    /// Every rank receives the same block from every peer (capacity mode: the
    /// counts or routing weights the global drop decision needs).
    AllGather,
}

/// Which peers a collective talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveScope {
    /// All ranks of the EP group.
    EpGroup,
    /// The ranks of the EP group on this node.
    IntraNode,
    /// The same-local-index rank of each other node of the EP group.
    InterNode,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Launch {
        kernel: u32,
        inputs: Vec<u32>,
        outputs: Vec<u32>,
        /// Rows the launch covers (tokens or token-slots).
        rows: u64,
    },
    /// `c[m, n] = a[m, k] · w[n, k]ᵀ`, `groups` times (one per local expert).
    Gemm {
        weight: GemmWeight,
        a: u32,
        c: u32,
        m: u64,
        n: u64,
        k: u64,
        groups: u64,
        epilogue: Epilogue,
        /// Dispatch by rank: the GEMM reads (the up projection) or sums (the
        /// down projection) its rows through the chunk's expansion index.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by_rank: Option<RankIndex>,
    },
    Collective {
        kind: CollectiveKind,
        scope: CollectiveScope,
        send: u32,
        recv: u32,
        peers: u64,
        /// Expected bytes one rank sends to one peer (uniform routing).
        bytes_per_peer: u64,
        /// Expected bytes one rank sends in total over this collective.
        bytes_sent: u64,
    },
    /// Mark a point in this stream other streams can wait for.
    Record { event: u32 },
    /// Wait until the event is recorded (on another stream).
    Wait { event: u32 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPlan {
    /// Size of the scratch arena: the peak of live activation bytes of one rank.
    pub peak_activation_bytes: u64,
    /// Sum of all buffers' sizes, what a plan without reuse would need.
    pub total_buffer_bytes: u64,
    /// Expert, shared-expert and router weights one rank holds.
    pub weight_bytes: u64,
}

impl Plan {
    /// Parses a JSON plan and validates it (version, every reference, events, cycles).
    ///
    /// The format version is read first: a plan of another version is a
    /// [`PlanError::Version`] even when its other fields no longer parse, since
    /// "rebuild the plan" is the useful answer then.
    pub fn from_json(text: &str) -> Result<Plan, PlanError> {
        /// Only the version; every other field is ignored.
        #[derive(Deserialize)]
        struct Versioned {
            version: u64,
        }
        if let Ok(Versioned { version }) = serde_json::from_str::<Versioned>(text) {
            if version != u64::from(PLAN_FORMAT_VERSION) {
                return Err(PlanError::Version {
                    found: u32::try_from(version).unwrap_or(u32::MAX),
                    expected: PLAN_FORMAT_VERSION,
                });
            }
        }
        let plan: Plan = serde_json::from_str(text).map_err(|e| PlanError::Json(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    /// The JSON form; stable (fields in declaration order, no maps with hash order).
    pub fn to_json(&self) -> String {
        // Serialising these types cannot fail: no maps with non-string keys, no
        // non-finite floats that serde_json rejects (it writes them as null).
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Every op of the plan with the index of its stream.
    pub fn ops(&self) -> impl Iterator<Item = (usize, &Op)> {
        self.streams
            .iter()
            .enumerate()
            .flat_map(|(s, stream)| stream.ops.iter().map(move |op| (s, op)))
    }
}
