//! The plan held against its own layer: what the runtime relies on is
//! recomputed from `layer`, `mesh` and `choices` and compared with the
//! kernels, buffers and ops, so a plan whose parts disagree is refused at
//! load instead of running to a wrong answer.
//!
//! In order (the first difference is reported):
//! 1. limits: how many streams, ops, buffers, kernels and events a plan may
//!    have, so the later checks (and the executors) never allocate by a
//!    count a file made up;
//! 2. the input and the output: `[tokens_per_rank, hidden]` in the layer's
//!    dtype, one of each;
//! 3. every launch: its kernel's constants are exactly those the layer gives
//!    its kind (`moec_kernels` describes the kernel from them), and every
//!    buffer it binds has the element type the kernel's parameter has
//!    ([`binding`](super::binding)); the assignment kernels' buffers have the
//!    routing's shapes;
//! 4. every GEMM: the `k` and `n` of its weights, its groups, float operands
//!    whose rows are `k` and the output's width wide and hold `m` rows;
//! 5. every collective: send and receive rows of the same type and width;
//! 6. the ops the layer needs and no others (`forms.rs`).

use super::binding::{binding, library_kind, Arg};
use super::validate::{field, PlanError};
use super::{
    Buffer, BufferRole, CapacityConfig, CollectiveKind, DType, Epilogue, GemmWeight, GroupScore,
    Kernel, KernelKind, Op, OpKind, Phase, Plan, Scoring, SoftmaxOver, WeightOn,
};
use moec_kernels::ir::{Elem, ParamKind};
use moec_kernels::library::describe;

/// Most streams a plan may have (the compiler makes at most three).
pub const MAX_STREAMS: usize = 64;
/// Most ops a plan may have (the largest example has about 120).
pub const MAX_OPS: usize = 1 << 16;
/// Most buffers, kernels and events a plan may have.
pub const MAX_ITEMS: usize = 1 << 16;
/// Most dimensions of a buffer's shape.
pub const MAX_DIMS: usize = 8;

/// The block of fp8 scales (one f32 per 128 elements of a row), which
/// [`buffer_bytes`](super::buffer_bytes) sizes fp8 buffers by.
const FP8_BLOCK: i64 = 128;

fn op_error(plan: &Plan, stream: usize, op: &Op, problem: impl Into<String>) -> PlanError {
    PlanError::Op {
        op: plan.op_ref(stream, op),
        problem: problem.into(),
    }
}

/// `a * b`, or an error naming what overflowed.
fn mul(a: u64, b: u64, what: &str) -> Result<u64, PlanError> {
    a.checked_mul(b)
        .ok_or_else(|| field(what, format!("{a} x {b} overflows 64 bits")))
}

fn as_i64(v: u64, what: &str) -> Result<i64, PlanError> {
    i64::try_from(v).map_err(|_| field(what, format!("is {v}, more than a kernel constant holds")))
}

/// The buffer type a kernel parameter of element type `elem` binds.
fn dtype_of(elem: Elem) -> DType {
    match elem {
        Elem::F32 => DType::F32,
        Elem::Bf16 => DType::Bf16,
        Elem::F16 => DType::F16,
        Elem::Fp8E4m3 => DType::Fp8E4m3,
        Elem::I32 => DType::I32,
        Elem::U8 => DType::U8,
    }
}

fn float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::Bf16 | DType::F16)
}

fn elements(b: &Buffer) -> Option<u64> {
    b.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// A buffer an assignment launch must bind: the op's input or output
/// `index`, its element type, and its shape or element count.
struct Bound {
    output: bool,
    index: usize,
    what: &'static str,
    dtype: DType,
    shape: Option<Vec<u64>>,
    len: Option<u64>,
}

/// The buffer a kernel parameter binds: rows of `cols` elements; with
/// `token_rows`, one row per token of the rank (a whole-layer buffer, of
/// which an op of a chunk sees the chunk's rows); with `input`, the layer's
/// input itself (what the router, the permute and the shared experts read).
#[derive(Clone, Copy, Debug)]
struct ParamShape {
    cols: u64,
    token_rows: bool,
    input: bool,
}

/// The numbers of the layer the checks compare with, computed once.
pub(super) struct Expect {
    pub tokens: u64,
    pub hidden: u64,
    pub experts: u64,
    pub top_k: u64,
    /// Expert FFN columns on one rank (`intermediate / etp`).
    pub ffn: u64,
    /// Shared experts' columns (`count x intermediate`), 0 without them.
    pub shared: u64,
    pub group: u64,
    /// Most experts (primaries and replicas) one EP rank holds.
    pub local_experts: u64,
}

impl Plan {
    pub(super) fn expect(&self) -> Result<Expect, PlanError> {
        let l = &self.layer;
        let shared = match &l.shared {
            Some(s) => mul(s.count, s.intermediate, "layer.shared.count")?,
            None => 0,
        };
        Ok(Expect {
            tokens: l.tokens_per_rank,
            hidden: l.hidden,
            experts: l.experts,
            top_k: l.router.top_k,
            ffn: (l.intermediate / self.mesh.etp.max(1)).max(1),
            shared,
            group: mul(self.mesh.ep, self.mesh.etp, "mesh.ep")?,
            local_experts: self
                .mesh
                .experts_of_ep_rank
                .iter()
                .map(|e| e.len() as u64)
                .max()
                .unwrap_or(0)
                .max(1),
        })
    }

    /// Counts a plan may not exceed (checked before anything is sized by them).
    pub(super) fn check_limits(&self) -> Result<(), PlanError> {
        let ops: usize = self.streams.iter().map(|s| s.ops.len()).sum();
        let counts = [
            ("streams", self.streams.len(), MAX_STREAMS),
            ("ops", ops, MAX_OPS),
            ("buffers", self.buffers.len(), MAX_ITEMS),
            ("kernels", self.kernels.len(), MAX_ITEMS),
            ("events", self.events as usize, MAX_ITEMS),
        ];
        for (what, found, limit) in counts {
            if found > limit {
                return Err(PlanError::Limit {
                    what,
                    found: found as u64,
                    limit: limit as u64,
                });
            }
        }
        if let Some((i, b)) = self
            .buffers
            .iter()
            .enumerate()
            .find(|(_, b)| b.shape.len() > MAX_DIMS)
        {
            return Err(field(
                format!("buffers[{i}].shape"),
                format!(
                    "of `{}` has {} dimensions, at most {MAX_DIMS} are accepted",
                    b.name,
                    b.shape.len()
                ),
            ));
        }
        Ok(())
    }

    /// One input and one output buffer, `[tokens_per_rank, hidden]` in the
    /// layer's dtype, neither of a chunk.
    pub(super) fn check_io(&self, x: &Expect) -> Result<(), PlanError> {
        for (role, what) in [(BufferRole::Input, "input"), (BufferRole::Output, "output")] {
            let found: Vec<usize> = (0..self.buffers.len())
                .filter(|&i| self.buffers[i].role == role)
                .collect();
            let [i] = found[..] else {
                return Err(field(
                    "buffers",
                    format!("hold {} {what} buffers, expected one", found.len()),
                ));
            };
            let b = &self.buffers[i];
            if b.dtype != self.layer.dtype || b.shape != [x.tokens, x.hidden] || b.chunk.is_some() {
                return Err(field(
                    format!("buffers[{i}]"),
                    format!(
                        "is the layer's {what} `{}`, {} {:?}{}, but the layer's {what} is {} [{}, {}]",
                        b.name,
                        b.dtype.name(),
                        b.shape,
                        if b.chunk.is_some() { " of one chunk" } else { "" },
                        self.layer.dtype.name(),
                        x.tokens,
                        x.hidden
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The constants a kernel of `kind` must have, launched in `phase`
    /// (`rows`, which no kernel computes with, may be there or not).
    fn expected_constants(
        &self,
        kind: KernelKind,
        phase: Phase,
        x: &Expect,
    ) -> Result<Vec<(&'static str, i64)>, PlanError> {
        let l = &self.layer;
        let r = &l.router;
        let mut c = vec![
            ("hidden", as_i64(x.hidden, "layer.hidden")?),
            ("dtype", l.dtype.code()),
        ];
        let top_k = ("top_k", as_i64(x.top_k, "layer.router.top_k")?);
        let weight_on_input = ("weight_on_input", i64::from(r.weight_on == WeightOn::Input));
        match kind {
            KernelKind::RouterFused
            | KernelKind::RouterScores
            | KernelKind::RouterBias
            | KernelKind::RouterGroupSelect
            | KernelKind::RouterTopk
            | KernelKind::RouterNormalize
            | KernelKind::RouterScale => {
                let (groups, kept) = r.groups.map_or((1, 1), |g| (g.count, g.kept));
                c.extend([
                    ("experts", as_i64(x.experts, "layer.experts")?),
                    top_k,
                    ("groups", as_i64(groups, "layer.router.groups.count")?),
                    ("groups_kept", as_i64(kept, "layer.router.groups.kept")?),
                    ("scoring", i64::from(r.scoring == Scoring::Sigmoid)),
                    (
                        "softmax_over",
                        i64::from(r.softmax_over == SoftmaxOver::Topk),
                    ),
                    ("selection_bias", i64::from(r.selection_bias)),
                    (
                        "group_score",
                        i64::from(matches!(r.groups.map(|g| g.score), Some(GroupScore::Max))),
                    ),
                    ("normalize", i64::from(r.normalize)),
                ]);
            }
            KernelKind::Assign => {
                let capacity = match l.capacity {
                    CapacityConfig::Dropless => 0,
                    CapacityConfig::Limited { slots, .. } => as_i64(slots, "layer.capacity.slots")?,
                };
                c.extend([
                    ("experts", as_i64(x.experts, "layer.experts")?),
                    top_k,
                    ("ep_ranks", as_i64(x.group, "mesh.ep")?),
                    ("capacity", capacity),
                ]);
            }
            KernelKind::Permute
            | KernelKind::PermutePack
            | KernelKind::WeightedSum
            | KernelKind::UnpermuteWeightedSum
            | KernelKind::Expand
            | KernelKind::Reduce => c.extend([top_k, weight_on_input]),
            // Over the destination ranks: the source packs unscaled rows and
            // sums the returned ones unweighted (the expert side applies the
            // weights).
            KernelKind::PackRank | KernelKind::SumRank => c.extend([
                ("top_k", as_i64(x.group, "mesh.ep")?),
                ("weight_on_input", i64::from(kind == KernelKind::SumRank)),
            ]),
            KernelKind::Unpermute => c.push(top_k),
            KernelKind::QuantizeFp8 | KernelKind::DequantizeFp8 | KernelKind::Pack => {
                c.push(("block", FP8_BLOCK));
            }
            KernelKind::Activation => {
                let (width, ffn, what) = match (phase, &l.shared) {
                    (Phase::Shared, Some(s)) => (x.shared, s.ffn, "layer.shared.intermediate"),
                    _ => (x.ffn, l.ffn, "layer.intermediate"),
                };
                c.extend([
                    ("ffn", as_i64(width, what)?),
                    ("gated", i64::from(ffn.gated())),
                    ("act", ffn.code()),
                    ("clamped", i64::from(ffn.limit().is_some())),
                ]);
            }
            KernelKind::ScaleRows | KernelKind::SharedGate | KernelKind::Add => {}
        }
        Ok(c)
    }

    /// The constants of kernel `k`, launched by `op`, against the layer.
    fn check_constants(
        &self,
        stream: usize,
        op: &Op,
        k: u32,
        kernel: &Kernel,
        x: &Expect,
    ) -> Result<(), PlanError> {
        let expected = self.expected_constants(kernel.kind, op.phase, x)?;
        let wrong = |problem: String| PlanError::KernelConstants {
            op: self.op_ref(stream, op),
            kernel: k,
            name: kernel.name.as_str().into(),
            problem,
        };
        for (name, value) in &kernel.constants {
            let want = expected.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
            match want {
                Some(want) if want != *value => {
                    return Err(wrong(format!(
                        "`{name}` is {value}, but the layer gives {want}"
                    )))
                }
                Some(_) => {}
                None if name == "rows" => {}
                None if name == "pass" && kernel.kind == KernelKind::Assign => {
                    let last = if self.by_rank() { 3 } else { 1 };
                    if !(0..=last).contains(value) {
                        return Err(wrong(format!("`pass` is {value}, expected 0 to {last}")));
                    }
                }
                None => {
                    return Err(wrong(format!(
                        "has a constant `{name}` = {value}, which a {} kernel does not take",
                        kind_name(kernel.kind)
                    )))
                }
            }
        }
        let missing = expected
            .iter()
            .map(|(n, _)| *n)
            .chain((kernel.kind == KernelKind::Assign).then_some("pass"))
            .find(|n| !kernel.constants.iter().any(|(m, _)| m == n));
        if let Some(name) = missing {
            return Err(wrong(format!("lacks the constant `{name}`")));
        }
        Ok(())
    }

    /// Every launch against its kernel: constants, bound buffers' types, the
    /// assignment kernels' shapes.
    pub(super) fn check_launches(&self, x: &Expect) -> Result<(), PlanError> {
        for (s, op) in self.ops() {
            let OpKind::Launch {
                kernel,
                inputs,
                outputs,
                ..
            } = &op.kind
            else {
                continue;
            };
            let Some(k) = self.kernels.get(*kernel as usize) else {
                continue; // reported by the reference checks
            };
            self.check_constants(s, op, *kernel, k, x)?;
            if k.kind == KernelKind::Assign {
                let pass = k.constants.iter().find(|(n, _)| n == "pass").map(|p| p.1);
                if matches!(pass, Some(2 | 3)) {
                    self.check_assign_by_rank(s, op, pass == Some(2), inputs, outputs, x)?;
                } else {
                    self.check_assign(s, op, k, inputs, outputs, x)?;
                }
                continue;
            }
            self.check_binding(s, op, k, inputs, outputs, x)?;
        }
        Ok(())
    }

    /// A described kernel's parameters against the buffers the launch binds.
    fn check_binding(
        &self,
        s: usize,
        op: &Op,
        k: &Kernel,
        inputs: &[u32],
        outputs: &[u32],
        x: &Expect,
    ) -> Result<(), PlanError> {
        let (Some(b), Some(lib)) = (binding(k.kind, op.phase), library_kind(k.kind)) else {
            return Err(op_error(
                self,
                s,
                op,
                format!(
                    "launches `{}`, a {} kernel, which no launch binds",
                    k.name,
                    kind_name(k.kind)
                ),
            ));
        };
        let desc = describe(lib, &k.constants)
            .map_err(|e| op_error(self, s, op, format!("kernel `{}`: {e}", k.name)))?;
        let mut params = desc.params.iter();
        for arg in b.args {
            let (list, i, what) = match *arg {
                Arg::Input(i) => (inputs, i, "input"),
                Arg::Output(i) => (outputs, i, "output"),
                _ => {
                    params.next();
                    continue;
                }
            };
            let param = params.next();
            let Some(&index) = list.get(i) else {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "has {} {what}s, but `{}` binds {what} {i}",
                        list.len(),
                        k.name
                    ),
                ));
            };
            let Some(buffer) = self.buffers.get(index as usize) else {
                continue; // reported by the reference checks
            };
            let Some(ParamKind::Buffer { elem, .. }) = param.map(|p| &p.kind) else {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!("`{}` has fewer parameters than its binding", k.name),
                ));
            };
            let want = dtype_of(*elem);
            if buffer.dtype != want {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "binds b{index} `{}` ({}) as {what} {i} of `{}`, whose parameter `{}` is {}",
                        buffer.name,
                        buffer.dtype.name(),
                        k.name,
                        param.map_or("", |p| p.name.as_str()),
                        want.name()
                    ),
                ));
            }
            if want == DType::Fp8E4m3 {
                params.next(); // the block scales, part of the same buffer
            }
            let name = param.map_or("", |p| p.name.as_str());
            if let Some(shape) = self.param_shape(k.kind, name, op.phase, x) {
                self.check_param_shape(s, op, (index, buffer), (name, shape))?;
            }
        }
        Ok(())
    }

    /// What a kernel parameter's buffer must look like (see [`ParamShape`]).
    fn param_shape(
        &self,
        kind: KernelKind,
        param: &str,
        phase: Phase,
        x: &Expect,
    ) -> Option<ParamShape> {
        let (h, k, e) = (x.hidden, x.top_k, x.experts);
        let tokens = |cols| ParamShape {
            cols,
            token_rows: true,
            input: false,
        };
        let rows = |cols| ParamShape {
            cols,
            token_rows: false,
            input: false,
        };
        let input = ParamShape {
            cols: h,
            token_rows: true,
            input: true,
        };
        // The by-rank kernels' rows are per destination rank: their shapes
        // are the assignment passes' and the race checks' to hold.
        if matches!(
            kind,
            KernelKind::PackRank | KernelKind::SumRank | KernelKind::Expand | KernelKind::Reduce
        ) {
            return None;
        }
        Some(match (kind, param) {
            (_, "logits" | "scores" | "selection" | "masked") => tokens(e),
            (_, "ids" | "slots" | "weights") => tokens(k),
            (KernelKind::Permute | KernelKind::PermutePack | KernelKind::SharedGate, "x") => input,
            (KernelKind::WeightedSum | KernelKind::UnpermuteWeightedSum, "out")
            | (KernelKind::SharedGate, "y")
            | (KernelKind::Add, "a" | "b" | "out") => tokens(h),
            (KernelKind::Activation, p) => {
                let (width, gated) = match (phase, &self.layer.shared) {
                    (Phase::Shared, Some(s)) => (x.shared, s.ffn.gated()),
                    _ => (x.ffn, self.layer.ffn.gated()),
                };
                match p {
                    "in" if gated => rows(width.saturating_mul(2)),
                    "in" | "out" => rows(width),
                    _ => return None,
                }
            }
            (_, "permuted" | "send" | "in" | "q" | "out" | "combined" | "unpermuted") => rows(h),
            _ => return None,
        })
    }

    fn check_param_shape(
        &self,
        s: usize,
        op: &Op,
        (index, b): (u32, &Buffer),
        (param, want): (&str, ParamShape),
    ) -> Result<(), PlanError> {
        let cols_ok = b.shape.len() == 2 && b.shape.last() == Some(&want.cols);
        let rows_ok = !want.token_rows
            || (b.shape.first() == Some(&self.layer.tokens_per_rank) && b.chunk.is_none());
        let input_ok = !want.input || b.role == BufferRole::Input;
        if cols_ok && rows_ok && input_ok {
            return Ok(());
        }
        let expected = match (want.input, want.token_rows) {
            (true, _) => "the layer's input".to_string(),
            (false, true) => format!(
                "[{}, {}] of the whole layer",
                self.layer.tokens_per_rank, want.cols
            ),
            (false, false) => format!("rows of {}", want.cols),
        };
        Err(op_error(
            self,
            s,
            op,
            format!(
                "binds b{index} `{}` {:?} as `{param}`, expected {expected}",
                b.name, b.shape
            ),
        ))
    }

    /// The assignment kernels' buffers: the routing `[T, k]` (ids i32,
    /// weights f32), this rank's metadata, the group's, the slots `[T, k]`,
    /// the overflow flag.
    fn check_assign(
        &self,
        s: usize,
        op: &Op,
        k: &Kernel,
        inputs: &[u32],
        outputs: &[u32],
        x: &Expect,
    ) -> Result<(), PlanError> {
        let pass = k.constants.iter().find(|(n, _)| n == "pass").map(|p| p.1);
        let meta_len = match self.layer.capacity {
            CapacityConfig::Limited {
                drop: super::DropPolicy::Probs,
                ..
            } => mul(
                mul(x.tokens, 2, "layer.tokens_per_rank")?,
                x.top_k,
                "layer.router.top_k",
            )?,
            _ => {
                // Dispatch by rank adds the rows per destination rank.
                let per_chunk = if self.by_rank() {
                    x.experts.saturating_add(x.group)
                } else {
                    x.experts
                };
                mul(self.choices.chunks, per_chunk, "choices.chunks")?
            }
        };
        let all_len = mul(meta_len, x.group, "mesh.ep")?;
        let routing = Some(vec![x.tokens, x.top_k]);
        let whole = |list: &'static str, index, what, dtype, shape, len| Bound {
            output: list == "output",
            index,
            what,
            dtype,
            shape,
            len,
        };
        let mut want = vec![
            whole("input", 0, "expert ids", DType::I32, routing.clone(), None),
            whole(
                "input",
                1,
                "routing weights",
                DType::F32,
                routing.clone(),
                None,
            ),
        ];
        if pass == Some(0) {
            want.push(whole(
                "output",
                0,
                "metadata",
                DType::I32,
                None,
                Some(meta_len),
            ));
        } else {
            want.push(whole(
                "input",
                2,
                "group's metadata",
                DType::I32,
                None,
                Some(all_len),
            ));
            want.push(whole("output", 0, "slots", DType::I32, routing, None));
            if self.choices.overflow_flag {
                want.push(whole(
                    "output",
                    1,
                    "overflow flag",
                    DType::U8,
                    Some(vec![1]),
                    None,
                ));
            }
        }
        let listed = inputs.len() + outputs.len();
        if listed != want.len() {
            return Err(op_error(
                self,
                s,
                op,
                format!(
                    "binds {listed} buffers, assignment pass {} binds {}",
                    pass.unwrap_or(1),
                    want.len()
                ),
            ));
        }
        for w in want {
            let list = if w.output { outputs } else { inputs };
            let Some(b) = list
                .get(w.index)
                .and_then(|&b| self.buffers.get(b as usize))
            else {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!("lacks its {} buffer", w.what),
                ));
            };
            let shape_ok = w.shape.as_ref().is_none_or(|sh| &b.shape == sh);
            let len_ok = w.len.is_none_or(|n| elements(b) == Some(n));
            if b.dtype != w.dtype || !shape_ok || !len_ok || b.chunk.is_some() {
                let expected = match (&w.shape, w.len) {
                    (Some(sh), _) => format!("{sh:?}"),
                    (None, Some(n)) => format!("of {n} elements"),
                    _ => String::new(),
                };
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "binds `{}` ({} {:?}) as its {}, expected {} {expected} of the whole layer",
                        b.name,
                        b.dtype.name(),
                        b.shape,
                        w.what,
                        w.dtype.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The plan dispatches by rank or reduces per rank: the assignment
    /// exchange carries by-rank counts and passes 2 and 3 exist.
    pub(super) fn by_rank(&self) -> bool {
        self.choices.dedup_dispatch || self.choices.reduce_combine
    }

    /// The by-rank assignment kernels' buffers: `assign_rank` (pass 2)
    /// reads the slots `[T, k]` and writes the by-rank slots `[T, G]` and a
    /// chunk's picks (`2k` i32 per row); `assign_expand` (pass 3) reads the
    /// received picks and writes each pick's expert row (i32) and weight
    /// (f32), `k` per row.
    fn check_assign_by_rank(
        &self,
        s: usize,
        op: &Op,
        rank: bool,
        inputs: &[u32],
        outputs: &[u32],
        x: &Expect,
    ) -> Result<(), PlanError> {
        if !self.by_rank() {
            return Err(op_error(
                self,
                s,
                op,
                "is a by-rank assignment pass in a plan that neither dispatches nor reduces by rank",
            ));
        }
        let picks = super::by_rank_pick_cols(x.top_k);
        // (list, index, what, dtype, columns, whole layer [T, G])
        let want: Vec<(bool, usize, &str, DType, u64, bool)> = if rank {
            vec![
                (false, 0, "slots", DType::I32, x.top_k, true),
                (true, 0, "by-rank slots", DType::I32, x.group, true),
                (true, 1, "picks", DType::I32, picks, false),
            ]
        } else {
            vec![
                (false, 0, "received picks", DType::I32, picks, false),
                (true, 0, "expert rows", DType::I32, x.top_k, false),
                (true, 1, "pick weights", DType::F32, x.top_k, false),
            ]
        };
        if inputs.len() + outputs.len() != want.len() {
            return Err(op_error(
                self,
                s,
                op,
                format!(
                    "binds {} buffers, by-rank assignment pass {} binds {}",
                    inputs.len() + outputs.len(),
                    if rank { 2 } else { 3 },
                    want.len()
                ),
            ));
        }
        for (output, i, what, dtype, cols, whole) in want {
            let list = if output { outputs } else { inputs };
            let Some(b) = list.get(i).and_then(|&b| self.buffers.get(b as usize)) else {
                return Err(op_error(self, s, op, format!("lacks its {what} buffer")));
            };
            let shape_ok = if whole {
                b.shape == [x.tokens, cols] && b.chunk.is_none()
            } else {
                b.shape.len() == 2 && b.shape.last() == Some(&cols)
            };
            if b.dtype != dtype || !shape_ok {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "binds `{}` ({} {:?}) as its {what}, expected {} rows of {cols}",
                        b.name,
                        b.dtype.name(),
                        b.shape,
                        dtype.name()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rows of `b` an op of `chunk` sees: its chunk's rows of a whole-layer
    /// buffer of token rows, the whole buffer otherwise.
    fn rows_seen(&self, b: &Buffer, chunk: Option<u64>) -> u64 {
        let rows = b.shape.first().copied().unwrap_or(1);
        match b.chunk_rows(chunk, self.layer.tokens_per_rank) {
            Some(c) => {
                let size = self.choices.chunk_tokens;
                let start = c.saturating_mul(size).min(rows);
                start.saturating_add(size).min(rows) - start
            }
            None => rows,
        }
    }

    /// Every GEMM: its weights' `k` and `n`, groups and operands.
    pub(super) fn check_gemms(&self, x: &Expect) -> Result<(), PlanError> {
        for (s, op) in self.ops() {
            let OpKind::Gemm {
                weight,
                a,
                c,
                m,
                n,
                k,
                groups,
                epilogue,
                by_rank,
            } = op.kind
            else {
                continue;
            };
            let (Some(ab), Some(cb)) = (self.buffers.get(a as usize), self.buffers.get(c as usize))
            else {
                continue; // reported by the reference checks
            };
            // The operand with one row per received by-rank row, when the
            // GEMM reads or sums through the expansion index.
            let rank_side = match by_rank {
                Some(r) => {
                    Some(self.check_gemm_by_rank(x, (s, op), (weight, epilogue), (a, c), r)?)
                }
                None => None,
            };
            let gated = |shared: bool| match (shared, &self.layer.shared) {
                (true, Some(sh)) => sh.ffn.gated(),
                _ => self.layer.ffn.gated(),
            };
            let up = |width: u64, shared: bool| {
                if gated(shared) {
                    width.saturating_mul(2)
                } else {
                    width
                }
            };
            let (want_k, want_n, want_groups, act_width) = match weight {
                GemmWeight::RouterGate => (x.hidden, x.experts, 1, None),
                GemmWeight::ExpertUp => (x.hidden, up(x.ffn, false), x.local_experts, Some(x.ffn)),
                GemmWeight::ExpertDown => (x.ffn, x.hidden, x.local_experts, None),
                GemmWeight::SharedUp | GemmWeight::SharedDown if self.layer.shared.is_none() => {
                    return Err(PlanError::Form {
                        problem: format!(
                            "op #{} `{}` runs a shared-expert GEMM, but the layer has no shared experts",
                            op.id, op.name
                        ),
                    })
                }
                GemmWeight::SharedUp => (x.hidden, up(x.shared, true), 1, Some(x.shared)),
                GemmWeight::SharedDown => (x.shared, x.hidden, 1, None),
            };
            let out_cols = match (epilogue, act_width) {
                (Epilogue::None, _) => want_n,
                (Epilogue::Activation, Some(width)) => width,
                (Epilogue::Activation, None) => {
                    return Err(op_error(
                        self,
                        s,
                        op,
                        "has an activation epilogue on a GEMM that is not an up projection",
                    ))
                }
            };
            if (k, n, groups) != (want_k, want_n, want_groups) {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "multiplies by weights of k {k}, n {n} in {groups} groups, but the layer's are k {want_k}, n {want_n} in {want_groups}"
                    ),
                ));
            }
            for (side, b, what, cols) in
                [(Side::A, ab, "input", k), (Side::C, cb, "output", out_cols)]
            {
                let rows = self.rows_seen(b, op.chunk);
                // The by-rank side holds the received by-rank rows, not `m`.
                let want_rows = if rank_side == Some(side) { 1 } else { m };
                if !float(b.dtype)
                    || b.shape.len() != 2
                    || b.shape.last() != Some(&cols)
                    || rows < want_rows
                    || m == 0
                {
                    return Err(op_error(
                        self,
                        s,
                        op,
                        format!(
                            "has `{}` ({} {:?}, {rows} rows seen) as its {what}, expected a float buffer of at least m = {m} rows of {cols}",
                            b.name,
                            b.dtype.name(),
                            b.shape
                        ),
                    ));
                }
            }
            let reads_input = matches!(weight, GemmWeight::RouterGate | GemmWeight::SharedUp);
            if reads_input && ab.role != BufferRole::Input {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!("multiplies `{}`, expected the layer's input", ab.name),
                ));
            }
            if weight == GemmWeight::RouterGate
                && (cb.dtype != DType::F32 || m != self.rows_seen(ab, op.chunk))
            {
                return Err(op_error(self, s, op, format!("computes the router logits into `{}` ({}), expected f32 logits of every row of its input", cb.name, cb.dtype.name())));
            }
        }
        Ok(())
    }

    /// A GEMM fused with the expansion index ([`super::RankIndex`]): only
    /// the expert projections of a plan that dispatches by rank (the down
    /// projection only when it also reduces before the return trip), the up
    /// projection only when the layer weighs the outputs (weighing the
    /// inputs scales each copy of a row: the expansion is a pass of its
    /// own), no activation on the down projection, and an index and weights
    /// of `[rows, top_k]` that cover every row of the by-rank operand.
    /// Returns which operand is the by-rank one.
    fn check_gemm_by_rank(
        &self,
        x: &Expect,
        (s, op): (usize, &super::Op),
        (weight, epilogue): (GemmWeight, Epilogue),
        (a, c): (u32, u32),
        r: super::RankIndex,
    ) -> Result<Side, PlanError> {
        let side = match weight {
            GemmWeight::ExpertUp if !self.choices.dedup_dispatch => None,
            GemmWeight::ExpertUp if self.layer.router.weight_on == super::WeightOn::Input => {
                return Err(op_error(self, s, op, "reads its rows through the expansion index, but the layer weighs the inputs (each copy is scaled: the expansion is a pass of its own)"))
            }
            GemmWeight::ExpertUp => Some(Side::A),
            GemmWeight::ExpertDown if !self.choices.reduce_combine => None,
            GemmWeight::ExpertDown if epilogue != Epilogue::None => None,
            GemmWeight::ExpertDown => Some(Side::C),
            _ => None,
        };
        let Some(side) = side else {
            return Err(op_error(
                self,
                s,
                op,
                "goes through the expansion index, which only the expert up projection of a plan that dispatches by rank, or the down projection (no epilogue) of one that also reduces, may",
            ));
        };
        let (Some(ib), Some(wb)) = (
            self.buffers.get(r.index as usize),
            self.buffers.get(r.weights as usize),
        ) else {
            return Ok(side); // reported by the reference checks
        };
        let by_rank_buf = match side {
            Side::A => a,
            Side::C => c,
        };
        let rows = self
            .buffers
            .get(by_rank_buf as usize)
            .map_or(0, |b| self.rows_seen(b, op.chunk));
        for (b, dtype) in [(ib, DType::I32), (wb, DType::F32)] {
            if b.dtype != dtype
                || b.shape.len() != 2
                || b.shape.get(1) != Some(&x.top_k)
                || self.rows_seen(b, op.chunk) < rows
            {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "has `{}` ({} {:?}) as its expansion {}, expected {} of [{rows} rows, top_k = {}]",
                        b.name,
                        b.dtype.name(),
                        b.shape,
                        if dtype == DType::I32 { "index" } else { "weights" },
                        dtype.name(),
                        x.top_k
                    ),
                ));
            }
        }
        Ok(side)
    }

    /// Collectives move rows of one type and width (tokens), or the
    /// metadata of every peer (`recv` holds `peers + 1` copies of `send`).
    pub(super) fn check_collectives(&self) -> Result<(), PlanError> {
        for (s, op) in self.ops() {
            let OpKind::Collective {
                kind, send, recv, ..
            } = op.kind
            else {
                continue;
            };
            let (Some(sb), Some(rb)) = (
                self.buffers.get(send as usize),
                self.buffers.get(recv as usize),
            ) else {
                continue;
            };
            let ok = match kind {
                CollectiveKind::AllToAll
                | CollectiveKind::AllToAllV
                | CollectiveKind::AllToAllRank => {
                    sb.dtype == rb.dtype
                        && sb.shape.len() == 2
                        && sb.shape.last() == rb.shape.last()
                }
                CollectiveKind::CountExchange | CollectiveKind::AllGather => {
                    sb.dtype == rb.dtype && sb.dtype == DType::I32
                }
            };
            if !ok || send == recv {
                return Err(op_error(
                    self,
                    s,
                    op,
                    format!(
                        "sends `{}` ({} {:?}) into `{}` ({} {:?}), expected distinct buffers of the same type and row width",
                        sb.name,
                        sb.dtype.name(),
                        sb.shape,
                        rb.name,
                        rb.dtype.name(),
                        rb.shape
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The name a kind has in the plan's JSON.
pub(super) fn kind_name(k: KernelKind) -> &'static str {
    match library_kind(k) {
        Some(lib) => lib.name(),
        None if k == KernelKind::Assign => "assign",
        None => "scale_rows",
    }
}

/// An operand of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    A,
    C,
}
