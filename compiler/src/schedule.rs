//! From an extracted expression to a [`Plan`]: ops on streams, the events
//! between them, kernels with their specialisation constants, and a buffer plan
//! with lifetimes, arena offsets and the peak memory of a rank.
//!
//! Streams: `compute` (router, permute, experts, un-permute, output), `comm`
//! (every collective) and, when the shared experts overlap the dispatch, a
//! `shared` stream. A pipeline of `d` chunks is unrolled so that the comm
//! stream sends chunk i+1 while the compute stream runs chunk i's experts and
//! the comm stream returns chunk i-1 (compute order `E0 E1 U0 E2 U1 ...`).
//! Op ids follow one valid sequential order, in the priority the scheduler
//! wants (the simulator and the backends start the lowest id first).

mod by_rank;

use crate::cost::{self, node_cost, NodeCost};
use crate::ir::{value_bytes, Meta, Model, MoeIr};
use egg::{Id, RecExpr};
use moec_runtime::plan::arena::allocate;
use moec_runtime::plan::order::HappensBefore;
use moec_runtime::plan::{
    A2aAlgorithm, Activation, Buffer, BufferRole, CapacityConfig, Choices, CollectiveKind,
    CollectiveScope, DType, Epilogue, GemmWeight, GroupScore, Kernel, KernelKind, MemoryPlan, Op,
    OpKind, Phase, Plan, RankIndex, RowBound, Scoring, SoftmaxOver, Stream, StreamRole, WeightOn,
    PLAN_FORMAT_VERSION,
};
use std::collections::BTreeMap;

const COMPUTE: usize = 0;
const COMM: usize = 1;
const SHARED: usize = 2;
/// The inter-node legs of the hierarchical all-to-all: on a stream of their
/// own, so one chunk's network leg overlaps another chunk's NVLink leg.
const COMM_INTER: usize = 3;

/// Builds the plan of an extracted expression (its root is the last node),
/// with the un-permute of chunk `i` right after the experts of chunk `i + 1`.
pub fn schedule(model: &Model, expr: &RecExpr<MoeIr>) -> Result<Plan, String> {
    schedule_with(model, expr, &Order::default())
}

/// The order of the chunked pipeline on the compute stream: how many
/// chunks' experts run before a chunk's un-permute (the op that waits for
/// its combine). `combine_lag = 1` puts the un-permute of chunk `i` after
/// the experts of chunk `i + 1`; a larger lag lets the experts of later
/// chunks, whose input arrived, run while a combine is still in flight, at
/// the price of keeping more combine buffers alive. The compiler simulates
/// the lags and keeps the fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order {
    pub combine_lag: u64,
}

impl Default for Order {
    fn default() -> Order {
        Order { combine_lag: 1 }
    }
}

/// Builds the plan of an extracted expression in the given chunk order.
pub fn schedule_with(model: &Model, expr: &RecExpr<MoeIr>, order: &Order) -> Result<Plan, String> {
    let mut b = Builder::new(model, expr)?;
    b.combine_lag = order.combine_lag.max(1) as usize;
    b.build()?;
    b.finish()
}

struct PendingOp {
    stream: usize,
    name: String,
    phase: Phase,
    chunk: Option<u64>,
    kind: OpKind,
    estimate_us: f64,
}

/// Ops of one chunk, by pipeline stage.
#[derive(Default)]
struct ChunkOps {
    pre: Vec<PendingOp>,
    dispatch: Vec<PendingOp>,
    experts: Vec<PendingOp>,
    combine: Vec<PendingOp>,
    post: Vec<PendingOp>,
}

struct Builder<'a> {
    model: &'a Model,
    expr: &'a RecExpr<MoeIr>,
    metas: Vec<Meta>,
    kernels: Vec<Kernel>,
    buffers: Vec<Buffer>,
    /// Buffer of each (node, chunk) already emitted.
    values: BTreeMap<(usize, Option<u64>), Value>,
    /// The global sequence of ops (stream, op) with event ops in place.
    sequence: Vec<PendingOp>,
    events: u32,
    chunks: u64,
    shared_concurrent: bool,
    fused: BTreeMap<&'static str, bool>,
    hierarchical: bool,
    dispatch_dtype: DType,
    expert_rows: u64,
    /// Current stage list being filled for per-chunk nodes.
    stage_ops: Vec<ChunkOps>,
    routing: Option<Routing>,
    output: Option<u32>,
    /// The chunk whose buffers are being created (`None` outside the pipeline).
    current_chunk: Option<u64>,
    /// Buffers the caller reads after the layer (the dropless overflow flag):
    /// live to the last op, so no later buffer reuses their bytes.
    read_after_layer: Vec<u32>,
    /// See [`Order::combine_lag`].
    combine_lag: usize,
    /// The plan dispatches by rank or reduces before the combine: the
    /// exchange carries by-rank counts and `rank_slots` exists.
    by_rank: bool,
    /// `[T, G]`: every token's by-rank send row per destination rank.
    rank_slots: Option<u32>,
    /// The by-rank routing already emitted, per chunk.
    rank_routes: BTreeMap<u64, RankRoute>,
}

/// The by-rank routing of one chunk, as far as it was emitted: the source's
/// metadata rows (`assign_rank`), the received ones (their all-to-all) and
/// the expert row and weight of every received pick (`assign_expand`).
#[derive(Clone, Copy, Default)]
struct RankRoute {
    send_meta: Option<u32>,
    recv_meta: Option<u32>,
    expand: Option<(u32, u32)>,
}

#[derive(Clone, Copy, Debug)]
enum Value {
    /// A buffer.
    Buf(u32),
    /// The routing: ids and weights buffers.
    Route { ids: u32, weights: u32 },
    /// The assignment: slots buffer plus the routing it came from.
    Assign { slots: u32 },
    /// A leaf without storage (a number).
    Nothing,
    /// Received by-rank rows that the up projection reads through the
    /// chunk's expansion index (`gather`).
    Gathered { rows: u32, index: u32, weights: u32 },
}

#[derive(Clone, Copy)]
struct Routing {
    weights: u32,
    slots: u32,
}

/// Where a node is emitted: its chunk (and the ops' `chunk` field), the
/// buffer-name suffix, its analysis and cost, its pipeline stage, the
/// routing, and the buffer the chunk's routed output goes to.
struct NodeAt {
    chunk: u64,
    c: Option<u64>,
    suffix: String,
    meta: Meta,
    cost: NodeCost,
    stage: Stage,
    routing: Routing,
    routed_out: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pre,
    Dispatch,
    Experts,
    Combine,
    Post,
}

impl<'a> Builder<'a> {
    fn new(model: &'a Model, expr: &'a RecExpr<MoeIr>) -> Result<Builder<'a>, String> {
        let metas = crate::ir::metas(model, expr);
        Ok(Builder {
            model,
            expr,
            metas,
            kernels: Vec::new(),
            buffers: Vec::new(),
            values: BTreeMap::new(),
            sequence: Vec::new(),
            events: 0,
            chunks: 1,
            shared_concurrent: false,
            fused: BTreeMap::new(),
            hierarchical: false,
            dispatch_dtype: model.dtype,
            expert_rows: 0,
            stage_ops: Vec::new(),
            routing: None,
            output: None,
            current_chunk: None,
            read_after_layer: Vec::new(),
            combine_lag: 1,
            by_rank: expr.as_ref().iter().any(|n| {
                matches!(
                    n,
                    MoeIr::PackRank(_)
                        | MoeIr::DispatchRank(_)
                        | MoeIr::Expand(_)
                        | MoeIr::Gather(_)
                        | MoeIr::Reduce(_)
                        | MoeIr::DownReduce(_)
                )
            }),
            rank_slots: None,
            rank_routes: BTreeMap::new(),
        })
    }

    fn has_node(&self, f: impl Fn(&MoeIr) -> bool) -> bool {
        self.expr.as_ref().iter().any(f)
    }

    fn node(&self, id: Id) -> &MoeIr {
        &self.expr[id]
    }

    fn meta(&self, id: Id) -> Meta {
        self.metas[usize::from(id)].clone()
    }

    fn cost(&self, node: &MoeIr) -> NodeCost {
        let metas = &self.metas;
        node_cost(self.model, node, &|id: Id| metas[usize::from(id)].clone())
    }

    fn buffer(&mut self, name: &str, dtype: DType, shape: Vec<u64>, role: BufferRole) -> u32 {
        // fp8 scales are per row (one per 128-element block of each row), so
        // the size follows the row structure, not the element count alone.
        let bytes = match shape.as_slice() {
            [rows, cols] => value_bytes(*rows, *cols, dtype),
            _ => {
                let elements = shape.iter().fold(1u64, |a, &d| a.saturating_mul(d));
                value_bytes(1, elements, dtype)
            }
        };
        self.buffers.push(Buffer {
            name: name.to_string(),
            dtype,
            shape,
            bytes,
            role,
            offset: 0,
            live: (0, 0),
            chunk: self.current_chunk,
            bound: None,
        });
        (self.buffers.len() - 1) as u32
    }

    fn kernel(&mut self, kind: KernelKind, base: &str, mut constants: Vec<(String, i64)>) -> u32 {
        constants.sort();
        if let Some(i) = self
            .kernels
            .iter()
            .position(|k| k.kind == kind && k.constants == constants)
        {
            return i as u32;
        }
        let same = self.kernels.iter().filter(|k| k.kind == kind).count();
        let name = if same == 0 {
            base.to_string()
        } else {
            format!("{base}_{same}")
        };
        self.kernels.push(Kernel {
            name,
            kind,
            constants,
        });
        (self.kernels.len() - 1) as u32
    }

    /// The constants of a kernel over `rows` rows that follows each pick
    /// (the permutes, the expansion, the sums back): `top_k` and the side
    /// the router's weight is on.
    fn pick_constants(&self, rows: u64) -> Vec<(String, i64)> {
        let m = self.model;
        self.constants(&[
            ("top_k", m.top_k as i64),
            ("rows", rows as i64),
            (
                "weight_on_input",
                i64::from(m.layer.router.weight_on == WeightOn::Input),
            ),
        ])
    }

    fn constants(&self, extra: &[(&str, i64)]) -> Vec<(String, i64)> {
        let m = self.model;
        let mut c: Vec<(String, i64)> = vec![
            ("hidden".into(), m.hidden as i64),
            ("dtype".into(), m.dtype.code()),
        ];
        for (k, v) in extra {
            c.push(((*k).to_string(), *v));
        }
        c
    }

    fn event(&mut self) -> u32 {
        self.events += 1;
        self.events - 1
    }

    fn push(&mut self, op: PendingOp) {
        self.sequence.push(op);
    }

    fn record(&mut self, stream: usize, event: u32) {
        self.push(PendingOp {
            stream,
            name: format!("record e{event}"),
            phase: Phase::Output,
            chunk: None,
            kind: OpKind::Record { event },
            estimate_us: 0.0,
        });
    }

    fn wait(&mut self, stream: usize, event: u32) {
        self.push(PendingOp {
            stream,
            name: format!("wait e{event}"),
            phase: Phase::Output,
            chunk: None,
            kind: OpKind::Wait { event },
            estimate_us: 0.0,
        });
    }

    fn build(&mut self) -> Result<(), String> {
        let root = Id::from(self.expr.as_ref().len().saturating_sub(1));
        let (routed, shared) = match self.node(root).clone() {
            MoeIr::Add([r, s]) => (r, Some((s, false))),
            MoeIr::AddPar([r, s]) => (r, Some((s, true))),
            MoeIr::Pipeline(_) => (root, None),
            other => return Err(format!("internal: unexpected plan root `{other}`")),
        };
        let MoeIr::Pipeline([d, x, a, body]) = self.node(routed).clone() else {
            return Err("internal: the routed part is not a pipeline".into());
        };
        self.chunks = self.meta(d).num.unwrap_or(1).max(1);
        self.shared_concurrent = matches!(shared, Some((_, true)));
        let t = self.model.tokens;
        let h = self.model.hidden;
        let x_buf = self.buffer("x", self.model.dtype, vec![t, h], BufferRole::Input);
        self.values
            .insert((usize::from(x), None), Value::Buf(x_buf));
        let out_buf = self.buffer("out", self.model.dtype, vec![t, h], BufferRole::Output);
        self.output = Some(out_buf);

        // Router and assignment: whole-layer, before the pipeline.
        self.emit_global(a)?;
        if self.routing.is_none() {
            return Err("internal: the assignment was not emitted".into());
        }

        // The pipeline body, once per chunk.
        let routed_out = if shared.is_some() {
            self.buffer("routed", self.model.dtype, vec![t, h], BufferRole::Scratch)
        } else {
            out_buf
        };
        self.stage_ops = (0..self.chunks).map(|_| ChunkOps::default()).collect();
        for c in 0..self.chunks {
            self.emit_chunk(body, c, routed_out)?;
        }
        let stages = std::mem::take(&mut self.stage_ops);
        let comm = stages
            .iter()
            .any(|s| !s.dispatch.is_empty() || !s.combine.is_empty());

        // Shared experts, emitted into a side list.
        let mut shared_ops = Vec::new();
        let mut shared_buf = None;
        if let Some((s, _)) = shared {
            let before = self.sequence.len();
            let buf = self.emit_shared(s)?;
            shared_ops = self.sequence.split_off(before);
            shared_buf = Some(buf);
        }

        // Assemble the global order.
        let d = self.chunks as usize;
        let mut pre_events = Vec::new();
        let mut disp_events = Vec::new();
        let mut stages: Vec<ChunkOps> = stages;
        for ops in stages.iter_mut() {
            for op in std::mem::take(&mut ops.pre) {
                self.push(op);
            }
            if comm {
                let e = self.event();
                self.record(COMPUTE, e);
                pre_events.push(e);
                let last = self.push_comm(std::mem::take(&mut ops.dispatch), e);
                let e = self.event();
                self.record(last, e);
                disp_events.push(e);
            }
        }
        let shared_done = if self.shared_concurrent {
            if let Some(&last) = pre_events.last() {
                self.wait(SHARED, last);
            }
            for mut op in std::mem::take(&mut shared_ops) {
                op.stream = SHARED;
                self.push(op);
            }
            let e = self.event();
            self.record(SHARED, e);
            Some(e)
        } else {
            None
        };
        let mut comb_events = Vec::new();
        for i in 0..d {
            if comm {
                self.wait(COMPUTE, disp_events[i]);
            }
            for op in std::mem::take(&mut stages[i].experts) {
                self.push(op);
            }
            if comm {
                let e = self.event();
                self.record(COMPUTE, e);
                let last = self.push_comm(std::mem::take(&mut stages[i].combine), e);
                let e = self.event();
                self.record(last, e);
                comb_events.push(e);
                if i >= self.combine_lag {
                    let j = i - self.combine_lag;
                    self.wait(COMPUTE, comb_events[j]);
                    for op in std::mem::take(&mut stages[j].post) {
                        self.push(op);
                    }
                }
            } else {
                for op in std::mem::take(&mut stages[i].post) {
                    self.push(op);
                }
            }
        }
        if comm {
            // The un-permutes the lag left for after the last experts, in order.
            for j in d.saturating_sub(self.combine_lag)..d {
                self.wait(COMPUTE, comb_events[j]);
                for op in std::mem::take(&mut stages[j].post) {
                    self.push(op);
                }
            }
        }
        for op in shared_ops {
            self.push(op);
        }
        if let (Some(shared_buf), Some(out)) = (shared_buf, self.output) {
            if let Some(e) = shared_done {
                self.wait(COMPUTE, e);
            }
            let k = self.kernel(KernelKind::Add, "add", self.constants(&[]));
            let c = self.cost(&MoeIr::Add([routed, routed]));
            self.push(PendingOp {
                stream: COMPUTE,
                name: "add shared".into(),
                phase: Phase::Output,
                chunk: None,
                kind: OpKind::Launch {
                    kernel: k,
                    inputs: vec![routed_out, shared_buf],
                    outputs: vec![out],
                    rows: t,
                },
                estimate_us: c.compute_us,
            });
        }
        Ok(())
    }

    /// Pushes one stage's collectives after `entry`, in order; where two
    /// consecutive ones are on different comm streams, the second waits for
    /// the first. Returns the stream of the last.
    fn push_comm(&mut self, ops: Vec<PendingOp>, entry: u32) -> usize {
        let mut last: Option<usize> = None;
        for op in ops {
            match last {
                None => self.wait(op.stream, entry),
                Some(prev) if prev != op.stream => {
                    let e = self.event();
                    self.record(prev, e);
                    self.wait(op.stream, e);
                }
                Some(_) => {}
            }
            last = Some(op.stream);
            self.push(op);
        }
        last.unwrap_or_else(|| {
            self.wait(COMM, entry);
            COMM
        })
    }

    /// Emits the router chain and the assignment (whole layer, compute and comm).
    fn emit_global(&mut self, id: Id) -> Result<Value, String> {
        if let Some(v) = self.values.get(&(usize::from(id), None)) {
            return Ok(*v);
        }
        let node = self.node(id).clone();
        let cost = self.cost(&node);
        let t = self.model.tokens;
        let e = self.model.experts;
        let k = self.model.top_k;
        let value = match &node {
            MoeIr::Logits(x) => {
                let Value::Buf(xb) = self.emit_global(*x)? else {
                    return Err("internal: logits of a non-buffer".into());
                };
                let logits = self.buffer("logits", DType::F32, vec![t, e], BufferRole::Scratch);
                self.push(PendingOp {
                    stream: COMPUTE,
                    name: "router gate gemm".into(),
                    phase: Phase::Router,
                    chunk: None,
                    kind: OpKind::Gemm {
                        weight: GemmWeight::RouterGate,
                        a: xb,
                        c: logits,
                        m: t,
                        n: e,
                        k: self.model.hidden,
                        groups: 1,
                        epilogue: Epilogue::None,
                        by_rank: None,
                    },
                    estimate_us: cost.compute_us,
                });
                Value::Buf(logits)
            }
            MoeIr::Scores(p) | MoeIr::Bias(p) | MoeIr::Groups(p) => {
                let Value::Buf(input) = self.emit_global(*p)? else {
                    return Err("internal: router stage over routing".into());
                };
                let (kind, name) = match node {
                    MoeIr::Scores(_) => (KernelKind::RouterScores, "router_scores"),
                    MoeIr::Bias(_) => (KernelKind::RouterBias, "router_bias"),
                    _ => (KernelKind::RouterGroupSelect, "router_groups"),
                };
                let out = self.buffer(
                    &format!("{name}_out"),
                    DType::F32,
                    vec![t, e],
                    BufferRole::Scratch,
                );
                let kernel = self.kernel(kind, name, self.router_constants());
                self.launch(
                    COMPUTE,
                    name,
                    Phase::Router,
                    None,
                    kernel,
                    vec![input],
                    vec![out],
                    t,
                    cost.compute_us,
                );
                Value::Buf(out)
            }
            MoeIr::Topk(p) | MoeIr::Router(p) => {
                let Value::Buf(input) = self.emit_global(*p)? else {
                    return Err("internal: top-k over routing".into());
                };
                let ids = self.buffer("topk_ids", DType::I32, vec![t, k], BufferRole::Scratch);
                let weights =
                    self.buffer("topk_weights", DType::F32, vec![t, k], BufferRole::Scratch);
                let (kind, name) = if matches!(node, MoeIr::Router(_)) {
                    (KernelKind::RouterFused, "router_fused")
                } else {
                    (KernelKind::RouterTopk, "router_topk")
                };
                let kernel = self.kernel(kind, name, self.router_constants());
                self.launch(
                    COMPUTE,
                    name,
                    Phase::Router,
                    None,
                    kernel,
                    vec![input],
                    vec![ids, weights],
                    t,
                    cost.compute_us,
                );
                Value::Route { ids, weights }
            }
            MoeIr::Normalize(p) | MoeIr::Scale(p) => {
                let Value::Route { ids, weights } = self.emit_global(*p)? else {
                    return Err("internal: normalise before top-k".into());
                };
                let (kind, name) = if matches!(node, MoeIr::Normalize(_)) {
                    (KernelKind::RouterNormalize, "router_normalize")
                } else {
                    (KernelKind::RouterScale, "router_scale")
                };
                let kernel = self.kernel(kind, name, self.router_constants());
                self.launch(
                    COMPUTE,
                    name,
                    Phase::Router,
                    None,
                    kernel,
                    vec![weights],
                    vec![weights],
                    t,
                    cost.compute_us,
                );
                Value::Route { ids, weights }
            }
            MoeIr::Assign(r) => {
                let Value::Route { ids, weights } = self.emit_global(*r)? else {
                    return Err("internal: assignment without routing".into());
                };
                self.emit_assign(ids, weights, &cost)?
            }
            MoeIr::Input => {
                return self
                    .values
                    .get(&(usize::from(id), None))
                    .copied()
                    .ok_or_else(|| "internal: input not bound".to_string())
            }
            other => return Err(format!("internal: `{other}` outside the pipeline")),
        };
        self.values.insert((usize::from(id), None), value);
        Ok(value)
    }

    fn router_constants(&self) -> Vec<(String, i64)> {
        let m = self.model;
        let r = &m.layer.router;
        let (groups, kept) = r
            .groups
            .map(|g| (g.count as i64, g.kept as i64))
            .unwrap_or((1, 1));
        let group_score = match r.groups.map(|g| g.score) {
            Some(GroupScore::Max) => 1,
            _ => 0,
        };
        self.constants(&[
            ("experts", m.experts as i64),
            ("top_k", m.top_k as i64),
            ("groups", groups),
            ("groups_kept", kept),
            ("scoring", i64::from(r.scoring == Scoring::Sigmoid)),
            (
                "softmax_over",
                i64::from(r.softmax_over == SoftmaxOver::Topk),
            ),
            ("selection_bias", i64::from(r.selection_bias)),
            ("group_score", group_score),
            ("normalize", i64::from(r.normalize)),
        ])
    }

    /// Constants of an activation kernel for an FFN of `width` columns.
    fn activation_constants(&self, width: u64, ffn: Activation) -> Vec<(String, i64)> {
        self.constants(&[
            ("ffn", width as i64),
            ("gated", i64::from(ffn.gated())),
            ("act", ffn.code()),
            ("clamped", i64::from(ffn.limit().is_some())),
        ])
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        stream: usize,
        name: &str,
        phase: Phase,
        chunk: Option<u64>,
        kernel: u32,
        inputs: Vec<u32>,
        outputs: Vec<u32>,
        rows: u64,
        estimate_us: f64,
    ) {
        self.push(PendingOp {
            stream,
            name: name.to_string(),
            phase,
            chunk,
            kind: OpKind::Launch {
                kernel,
                inputs,
                outputs,
                rows,
            },
            estimate_us,
        });
    }

    fn emit_assign(&mut self, ids: u32, weights: u32, cost: &NodeCost) -> Result<Value, String> {
        let m = self.model;
        let t = m.tokens;
        let e = m.experts;
        let k = m.top_k;
        let group = m.group_ranks;
        let probs = matches!(
            m.layer.capacity,
            CapacityConfig::Limited {
                drop: moec_runtime::plan::DropPolicy::Probs,
                ..
            }
        );
        // Probs drops need every assignment's weight; the other modes need the
        // per-chunk, per-expert counts (a chunk's dispatch moves only its rows).
        // Dispatch by rank adds the rows per destination rank to the counts.
        let rank_counts = if self.by_rank { group } else { 0 };
        let (meta_shape, meta_dtype) = if probs {
            (vec![t, 2 * k], DType::I32)
        } else {
            (vec![self.chunks, e + rank_counts], DType::I32)
        };
        let counts = self.buffer(
            "assign_meta",
            meta_dtype,
            meta_shape.clone(),
            BufferRole::Scratch,
        );
        let slots = self.buffer("slots", DType::I32, vec![t, k], BufferRole::Scratch);
        let consts = self.assign_constants(0);
        let count_kernel = self.kernel(KernelKind::Assign, "assign_count", consts);
        let half = cost.compute_us / 2.0;
        self.launch(
            COMPUTE,
            "assign count",
            Phase::Router,
            None,
            count_kernel,
            vec![ids, weights],
            vec![counts],
            t,
            half,
        );
        let mut gathered = counts;
        if group > 1 {
            let mut shape = meta_shape;
            if let Some(first) = shape.first_mut() {
                *first = first.saturating_mul(group);
            }
            let all = self.buffer("assign_meta_all", meta_dtype, shape, BufferRole::Comm);
            let e1 = self.event();
            self.record(COMPUTE, e1);
            self.wait(COMM, e1);
            let kind = match m.layer.capacity {
                CapacityConfig::Dropless => CollectiveKind::CountExchange,
                CapacityConfig::Limited { .. } => CollectiveKind::AllGather,
            };
            // Counts travel per chunk (the cost model's figure is for one chunk).
            let per_chunk = if probs { 1.0 } else { self.chunks as f64 };
            let peers = group - 1;
            let rank_bytes = if probs {
                0.0
            } else {
                (peers * rank_counts * 4) as f64
            };
            let sent = ((cost::assign_exchange_bytes(m, t as f64) + rank_bytes) * per_chunk).round()
                as u64;
            self.push(PendingOp {
                stream: COMM,
                name: if probs {
                    "gather routing".into()
                } else {
                    "exchange counts".into()
                },
                phase: Phase::Router,
                chunk: None,
                kind: OpKind::Collective {
                    kind,
                    scope: CollectiveScope::EpGroup,
                    send: counts,
                    recv: all,
                    peers,
                    bytes_per_peer: sent / peers.max(1),
                    bytes_sent: sent,
                },
                estimate_us: cost.network_us,
            });
            let e2 = self.event();
            self.record(COMM, e2);
            self.wait(COMPUTE, e2);
            gathered = all;
        }
        let mut outputs = vec![slots];
        if m.capacity.is_none() {
            let flag = self.buffer("overflow_flag", DType::U8, vec![1], BufferRole::Scratch);
            self.read_after_layer.push(flag);
            outputs.push(flag);
        }
        let consts = self.assign_constants(1);
        let place_kernel = self.kernel(KernelKind::Assign, "assign_place", consts);
        self.launch(
            COMPUTE,
            "assign place",
            Phase::Router,
            None,
            place_kernel,
            vec![ids, weights, gathered],
            outputs,
            t,
            half,
        );
        self.routing = Some(Routing { weights, slots });
        if self.by_rank {
            self.rank_slots = Some(self.buffer(
                "rank_slots",
                DType::I32,
                vec![t, group],
                BufferRole::Scratch,
            ));
        }
        Ok(Value::Assign { slots })
    }

    fn stage_of(node: &MoeIr) -> Stage {
        match node {
            MoeIr::Dispatch(_) | MoeIr::DispatchInter(_) | MoeIr::DispatchIntra(_) => {
                Stage::Dispatch
            }
            MoeIr::Dequant(_) | MoeIr::Up(_) | MoeIr::Act(_) | MoeIr::UpAct(_) | MoeIr::Down(_) => {
                Stage::Experts
            }
            MoeIr::DispatchRank(_) | MoeIr::DispatchRankInter(_) | MoeIr::DispatchRankIntra(_) => {
                Stage::Dispatch
            }
            MoeIr::Expand(_) | MoeIr::Gather(_) | MoeIr::Reduce(_) | MoeIr::DownReduce(_) => {
                Stage::Experts
            }
            MoeIr::Combine(_)
            | MoeIr::CombineInter(_)
            | MoeIr::CombineIntra(_)
            | MoeIr::CombineRank(_)
            | MoeIr::CombineRankIntra(_)
            | MoeIr::CombineRankInter(_) => Stage::Combine,
            MoeIr::Unpermute(_) | MoeIr::Wsum(_) | MoeIr::UnpermuteWsum(_) | MoeIr::SumRank(_) => {
                Stage::Post
            }
            _ => Stage::Pre,
        }
    }

    fn push_stage(&mut self, chunk: u64, op: PendingOp, stage: Stage) {
        if let Some(ops) = self.stage_ops.get_mut(chunk as usize) {
            match stage {
                Stage::Pre => ops.pre.push(op),
                Stage::Dispatch => ops.dispatch.push(op),
                Stage::Experts => ops.experts.push(op),
                Stage::Combine => ops.combine.push(op),
                Stage::Post => ops.post.push(op),
            }
        }
    }

    /// Emits one chunk of the pipeline body; returns its value.
    fn emit_chunk(&mut self, body: Id, chunk: u64, routed_out: u32) -> Result<(), String> {
        self.current_chunk = (self.chunks > 1).then_some(chunk);
        let result = self.emit_in_chunk(body, chunk, routed_out);
        self.current_chunk = None;
        result.map(|_| ())
    }

    /// The buffer node `child` leaves in `chunk` (emitting it first).
    fn buf_in(&mut self, child: Id, chunk: u64, routed_out: u32) -> Result<u32, String> {
        match self.emit_in_chunk(child, chunk, routed_out)? {
            Value::Buf(x) => Ok(x),
            Value::Assign { slots } => Ok(slots),
            Value::Route { weights, .. } => Ok(weights),
            Value::Nothing => Err("internal: a value without storage".into()),
            Value::Gathered { .. } => {
                Err("internal: gathered rows read by another node than the up projection".into())
            }
        }
    }

    fn emit_in_chunk(&mut self, id: Id, chunk: u64, routed_out: u32) -> Result<Value, String> {
        let key = (usize::from(id), Some(chunk));
        if let Some(v) = self.values.get(&key) {
            return Ok(*v);
        }
        if let Some(v) = self.values.get(&(usize::from(id), None)) {
            return Ok(*v);
        }
        let node = self.node(id).clone();
        let meta = self.meta(id);
        let cost = self.cost(&node);
        let d = self.chunks;
        let c = if d > 1 { Some(chunk) } else { None };
        let suffix = if d > 1 {
            format!(".c{chunk}")
        } else {
            String::new()
        };
        let routing = self
            .routing
            .ok_or_else(|| "internal: pipeline before the router".to_string())?;
        let m = self.model;
        let h = m.hidden;
        let stage = Self::stage_of(&node);
        let buf_of = |b: &mut Self, child: Id| b.buf_in(child, chunk, routed_out);
        let value = match &node {
            MoeIr::Num(_) => Value::Nothing,
            MoeIr::Split([_, v]) => self.emit_in_chunk(*v, chunk, routed_out)?,
            MoeIr::Permute([x, _]) | MoeIr::PermutePack([x, _]) => {
                let xb = buf_of(self, *x)?;
                let fused = matches!(node, MoeIr::PermutePack(_));
                let (kind, base, bname) = if fused {
                    (KernelKind::PermutePack, "permute_pack", "send")
                } else {
                    (KernelKind::Permute, "permute", "permuted")
                };
                let out = self.buffer(
                    &format!("{bname}{suffix}"),
                    m.dtype,
                    vec![meta.rows, h],
                    if fused {
                        BufferRole::Comm
                    } else {
                        BufferRole::Scratch
                    },
                );
                let consts = self.pick_constants(meta.rows);
                let kernel = self.kernel(kind, base, consts);
                let op = self.op_launch(
                    base,
                    Phase::Permute,
                    c,
                    kernel,
                    vec![xb, routing.slots, routing.weights],
                    vec![out],
                    meta.rows,
                    cost.compute_us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(out)
            }
            MoeIr::Pack(p) | MoeIr::Quant(p) | MoeIr::Dequant(p) => {
                let input = buf_of(self, *p)?;
                let (kind, base, bname, role, phase) = match node {
                    MoeIr::Pack(_) => (
                        KernelKind::Pack,
                        "pack",
                        "send",
                        BufferRole::Comm,
                        Phase::Permute,
                    ),
                    MoeIr::Quant(_) => (
                        KernelKind::QuantizeFp8,
                        "quantize_fp8",
                        "send_fp8",
                        BufferRole::Comm,
                        Phase::Permute,
                    ),
                    _ => (
                        KernelKind::DequantizeFp8,
                        "dequantize_fp8",
                        // By rank, the received rows are expanded after this.
                        if self.by_rank {
                            "recv_rows"
                        } else {
                            "expert_in"
                        },
                        BufferRole::Scratch,
                        Phase::Experts,
                    ),
                };
                let out = self.buffer(
                    &format!("{bname}{suffix}"),
                    meta.dtype,
                    vec![meta.rows, meta.cols],
                    role,
                );
                let consts = self.constants(&[("rows", meta.rows as i64), ("block", 128)]);
                let kernel = self.kernel(kind, base, consts);
                let op = self.op_launch(
                    base,
                    phase,
                    c,
                    kernel,
                    vec![input],
                    vec![out],
                    meta.rows,
                    cost.compute_us,
                );
                self.push_stage(chunk, op, stage);
                if matches!(node, MoeIr::Quant(_)) {
                    self.dispatch_dtype = DType::Fp8E4m3;
                }
                Value::Buf(out)
            }
            MoeIr::Dispatch(p) | MoeIr::DispatchInter(p) | MoeIr::DispatchIntra(p) => {
                let send = buf_of(self, *p)?;
                let (scope, bname, name) = match node {
                    MoeIr::Dispatch(_) => (CollectiveScope::EpGroup, "recv", "dispatch"),
                    MoeIr::DispatchInter(_) => (
                        CollectiveScope::InterNode,
                        "node_stage",
                        "dispatch inter-node",
                    ),
                    _ => (CollectiveScope::IntraNode, "recv", "dispatch intra-node"),
                };
                if !matches!(node, MoeIr::Dispatch(_)) {
                    self.hierarchical = true;
                }
                let recv = self.buffer(
                    &format!("{bname}{suffix}"),
                    meta.dtype,
                    vec![meta.rows, meta.cols],
                    BufferRole::Comm,
                );
                if matches!(node, MoeIr::Dispatch(_) | MoeIr::DispatchIntra(_)) {
                    self.expert_rows = self.expert_rows.max(meta.rows);
                }
                let op = self.op_collective(name, Phase::Dispatch, c, scope, send, recv, &cost);
                self.push_stage(chunk, op, stage);
                Value::Buf(recv)
            }
            MoeIr::Up(r) | MoeIr::UpAct(r) | MoeIr::Down(r) | MoeIr::DownReduce([r, _]) => {
                let (a, by_rank) = match self.emit_in_chunk(*r, chunk, routed_out)? {
                    Value::Gathered {
                        rows,
                        index,
                        weights,
                    } if !matches!(node, MoeIr::Down(_) | MoeIr::DownReduce(_)) => {
                        (rows, Some(RankIndex { index, weights }))
                    }
                    _ => (buf_of(self, *r)?, None),
                };
                let by_rank = match node {
                    MoeIr::DownReduce(_) => {
                        let (index, weights) = self.rank_expand_index(chunk)?;
                        Some(RankIndex { index, weights })
                    }
                    _ => by_rank,
                };
                let (weight, n, k, epilogue, bname) = match node {
                    MoeIr::Up(_) => (
                        GemmWeight::ExpertUp,
                        meta.cols,
                        h,
                        Epilogue::None,
                        "expert_up",
                    ),
                    MoeIr::UpAct(_) => (
                        GemmWeight::ExpertUp,
                        if m.gated { 2 * meta.cols } else { meta.cols },
                        h,
                        Epilogue::Activation,
                        "expert_act",
                    ),
                    _ => (
                        GemmWeight::ExpertDown,
                        h,
                        m.ffn_local,
                        Epilogue::None,
                        "expert_out",
                    ),
                };
                if matches!(node, MoeIr::UpAct(_)) {
                    self.fused.insert("activation", true);
                }
                // The reducing epilogue writes the return trip's send rows.
                let (bname, role) = match node {
                    MoeIr::DownReduce(_) => ("reduced", BufferRole::Comm),
                    _ => (bname, BufferRole::Scratch),
                };
                let out = self.buffer(
                    &format!("{bname}{suffix}"),
                    m.dtype,
                    vec![meta.rows, meta.cols],
                    role,
                );
                // The GEMM runs over the expert rows, whichever side is by rank.
                let gemm_rows = match node {
                    MoeIr::DownReduce(_) => self.meta(*r).rows,
                    _ => meta.rows,
                };
                let name = match node {
                    MoeIr::DownReduce(_) => "experts down gemm + reduce per rank",
                    MoeIr::Down(_) => "experts down gemm",
                    MoeIr::UpAct(_) => "experts up gemm + activation",
                    _ => "experts up gemm",
                };
                let op = PendingOp {
                    stream: COMPUTE,
                    name: name.into(),
                    phase: Phase::Experts,
                    chunk: c,
                    kind: OpKind::Gemm {
                        weight,
                        a,
                        c: out,
                        m: gemm_rows,
                        n,
                        k,
                        groups: m.local_experts,
                        epilogue,
                        by_rank,
                    },
                    estimate_us: cost.compute_us,
                };
                self.push_stage(chunk, op, stage);
                Value::Buf(out)
            }
            MoeIr::Act(u) => {
                let input = buf_of(self, *u)?;
                let out = self.buffer(
                    &format!("expert_act{suffix}"),
                    m.dtype,
                    vec![meta.rows, meta.cols],
                    BufferRole::Scratch,
                );
                let consts = self.activation_constants(m.ffn_local, m.layer.ffn);
                let kernel = self.kernel(KernelKind::Activation, "activation", consts);
                let op = self.op_launch(
                    "activation",
                    Phase::Experts,
                    c,
                    kernel,
                    vec![input],
                    vec![out],
                    meta.rows,
                    cost.compute_us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(out)
            }
            MoeIr::Combine([y, _]) | MoeIr::CombineIntra([y, _]) | MoeIr::CombineInter([y, _]) => {
                let send = buf_of(self, *y)?;
                let (scope, bname, name) = match node {
                    MoeIr::Combine(_) => (CollectiveScope::EpGroup, "combined", "combine"),
                    MoeIr::CombineIntra(_) => {
                        (CollectiveScope::IntraNode, "node_sum", "combine intra-node")
                    }
                    _ => (CollectiveScope::InterNode, "combined", "combine inter-node"),
                };
                let recv = self.buffer(
                    &format!("{bname}{suffix}"),
                    m.dtype,
                    vec![meta.rows, h],
                    BufferRole::Comm,
                );
                let op = self.op_collective(name, Phase::Combine, c, scope, send, recv, &cost);
                self.push_stage(chunk, op, stage);
                Value::Buf(recv)
            }
            MoeIr::Unpermute([cb, _]) => {
                let input = buf_of(self, *cb)?;
                let out = self.buffer(
                    &format!("unpermuted{suffix}"),
                    m.dtype,
                    vec![meta.rows, h],
                    BufferRole::Scratch,
                );
                let consts =
                    self.constants(&[("top_k", m.top_k as i64), ("rows", meta.rows as i64)]);
                let kernel = self.kernel(KernelKind::Unpermute, "unpermute", consts);
                let op = self.op_launch(
                    "unpermute",
                    Phase::Unpermute,
                    c,
                    kernel,
                    vec![input, routing.slots],
                    vec![out],
                    meta.rows,
                    cost.compute_us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(out)
            }
            MoeIr::Wsum([u, _]) | MoeIr::UnpermuteWsum([u, _]) => {
                let input = buf_of(self, *u)?;
                let fused = matches!(node, MoeIr::UnpermuteWsum(_));
                let (kind, base) = if fused {
                    (KernelKind::UnpermuteWeightedSum, "unpermute_weighted_sum")
                } else {
                    (KernelKind::WeightedSum, "weighted_sum")
                };
                let consts = self.pick_constants(meta.rows);
                let kernel = self.kernel(kind, base, consts);
                let inputs = if fused {
                    vec![input, routing.slots, routing.weights]
                } else {
                    vec![input, routing.weights]
                };
                let op = self.op_launch(
                    base,
                    Phase::Unpermute,
                    c,
                    kernel,
                    inputs,
                    vec![routed_out],
                    meta.rows,
                    cost.compute_us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(routed_out)
            }
            MoeIr::PackRank(_)
            | MoeIr::DispatchRank(_)
            | MoeIr::DispatchRankInter(_)
            | MoeIr::DispatchRankIntra(_)
            | MoeIr::Gather(_)
            | MoeIr::Expand(_)
            | MoeIr::Reduce(_)
            | MoeIr::CombineRank(_)
            | MoeIr::CombineRankIntra(_)
            | MoeIr::CombineRankInter(_)
            | MoeIr::SumRank(_) => {
                let at = NodeAt {
                    chunk,
                    c,
                    suffix: suffix.clone(),
                    meta: meta.clone(),
                    cost: cost.clone(),
                    stage,
                    routing,
                    routed_out,
                };
                self.emit_by_rank(&node, &at)?
            }
            MoeIr::Input => {
                return self
                    .values
                    .get(&(usize::from(id), None))
                    .copied()
                    .ok_or_else(|| "internal: input not bound".to_string())
            }
            MoeIr::Assign(_) => {
                return Ok(Value::Assign {
                    slots: routing.slots,
                });
            }
            other => return Err(format!("internal: `{other}` inside the pipeline")),
        };
        if let (Value::Buf(b), Some(bound)) = (value, meta.bound) {
            self.mark_bounded(b, meta.rows, bound);
        }
        self.values.insert(key, value);
        Ok(value)
    }

    /// Marks buffer `b` as holding `rows` rows sized by `bound` (the value
    /// the node of a bounded meta leaves), so the runtime grows it with the
    /// bound when a pass overflows.
    pub(super) fn mark_bounded(&mut self, b: u32, rows: u64, bound: RowBound) {
        if let Some(buf) = self.buffers.get_mut(b as usize) {
            if buf.shape.first() == Some(&rows) {
                buf.bound = Some(bound);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn op_launch(
        &self,
        name: &str,
        phase: Phase,
        chunk: Option<u64>,
        kernel: u32,
        inputs: Vec<u32>,
        outputs: Vec<u32>,
        rows: u64,
        estimate_us: f64,
    ) -> PendingOp {
        PendingOp {
            stream: COMPUTE,
            name: name.replace('_', " "),
            phase,
            chunk,
            kind: OpKind::Launch {
                kernel,
                inputs,
                outputs,
                rows,
            },
            estimate_us,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn op_collective(
        &self,
        name: &str,
        phase: Phase,
        chunk: Option<u64>,
        scope: CollectiveScope,
        send: u32,
        recv: u32,
        cost: &NodeCost,
    ) -> PendingOp {
        let m = self.model;
        let peers = match scope {
            CollectiveScope::EpGroup => m.group_ranks.saturating_sub(1),
            CollectiveScope::IntraNode => m.group_ranks_per_node.saturating_sub(1),
            CollectiveScope::InterNode => m.group_nodes.saturating_sub(1),
        };
        let sent = cost.wire_bytes.round().max(0.0) as u64;
        let kind = if m.capacity.is_some() {
            CollectiveKind::AllToAll
        } else {
            CollectiveKind::AllToAllV
        };
        PendingOp {
            stream: if scope == CollectiveScope::InterNode {
                COMM_INTER
            } else {
                COMM
            },
            name: name.into(),
            phase,
            chunk,
            kind: OpKind::Collective {
                kind,
                scope,
                send,
                recv,
                peers,
                bytes_per_peer: sent / peers.max(1),
                bytes_sent: sent,
            },
            estimate_us: cost.network_us,
        }
    }

    /// Emits the shared experts (on the compute stream; moved by the caller).
    fn emit_shared(&mut self, id: Id) -> Result<u32, String> {
        if let Some(Value::Buf(b)) = self.values.get(&(usize::from(id), None)) {
            return Ok(*b);
        }
        let node = self.node(id).clone();
        let meta = self.meta(id);
        let cost = self.cost(&node);
        let m = self.model;
        let t = m.tokens;
        let h = m.hidden;
        let width = m.shared.as_ref().map(|s| s.width).unwrap_or(0);
        let gated = m.shared.as_ref().map(|s| s.gated).unwrap_or(false);
        let buf = match &node {
            MoeIr::Input => {
                return match self.values.get(&(usize::from(id), None)) {
                    Some(Value::Buf(b)) => Ok(*b),
                    _ => Err("internal: input not bound".into()),
                }
            }
            MoeIr::SharedUp(x) | MoeIr::SharedUpAct(x) | MoeIr::SharedDown(x) => {
                let a = self.emit_shared(*x)?;
                let (weight, n, k, epilogue, bname, name) = match node {
                    MoeIr::SharedUp(_) => (
                        GemmWeight::SharedUp,
                        meta.cols,
                        h,
                        Epilogue::None,
                        "shared_up",
                        "shared up gemm",
                    ),
                    MoeIr::SharedUpAct(_) => (
                        GemmWeight::SharedUp,
                        if gated { 2 * width } else { width },
                        h,
                        Epilogue::Activation,
                        "shared_act",
                        "shared up gemm + activation",
                    ),
                    _ => (
                        GemmWeight::SharedDown,
                        h,
                        width,
                        Epilogue::None,
                        "shared_out",
                        "shared down gemm",
                    ),
                };
                let out = self.buffer(bname, m.dtype, vec![t, meta.cols], BufferRole::Scratch);
                self.push(PendingOp {
                    stream: COMPUTE,
                    name: name.into(),
                    phase: Phase::Shared,
                    chunk: None,
                    kind: OpKind::Gemm {
                        weight,
                        a,
                        c: out,
                        m: t,
                        n,
                        k,
                        groups: 1,
                        epilogue,
                        by_rank: None,
                    },
                    estimate_us: cost.compute_us,
                });
                out
            }
            MoeIr::SharedAct(u) => {
                let input = self.emit_shared(*u)?;
                let out = self.buffer("shared_act", m.dtype, vec![t, width], BufferRole::Scratch);
                let ffn = m
                    .layer
                    .shared
                    .as_ref()
                    .map(|s| s.ffn)
                    .unwrap_or(m.layer.ffn);
                let consts = self.activation_constants(width, ffn);
                let kernel = self.kernel(KernelKind::Activation, "shared_activation", consts);
                self.launch(
                    COMPUTE,
                    "shared activation",
                    Phase::Shared,
                    None,
                    kernel,
                    vec![input],
                    vec![out],
                    t,
                    cost.compute_us,
                );
                out
            }
            MoeIr::SharedGate([x, y]) => {
                let xb = self.emit_shared(*x)?;
                let yb = self.emit_shared(*y)?;
                let kernel =
                    self.kernel(KernelKind::SharedGate, "shared_gate", self.constants(&[]));
                self.launch(
                    COMPUTE,
                    "shared gate",
                    Phase::Shared,
                    None,
                    kernel,
                    vec![xb, yb],
                    vec![yb],
                    t,
                    cost.compute_us,
                );
                yb
            }
            other => return Err(format!("internal: `{other}` in the shared branch")),
        };
        self.values.insert((usize::from(id), None), Value::Buf(buf));
        Ok(buf)
    }

    fn finish(mut self) -> Result<Plan, String> {
        let m = self.model;
        let mut streams = vec![
            Stream {
                name: "compute".into(),
                role: StreamRole::Compute,
                ops: Vec::new(),
            },
            Stream {
                name: "comm".into(),
                role: StreamRole::Comm,
                ops: Vec::new(),
            },
            Stream {
                name: "shared".into(),
                role: StreamRole::Compute,
                ops: Vec::new(),
            },
            Stream {
                name: "comm_inter".into(),
                role: StreamRole::Comm,
                ops: Vec::new(),
            },
        ];
        for (i, p) in std::mem::take(&mut self.sequence).into_iter().enumerate() {
            let id = u32::try_from(i).map_err(|_| "plan too large".to_string())?;
            // Phase of an event op: the phase of the op it follows on its stream.
            let phase = match p.kind {
                OpKind::Record { .. } | OpKind::Wait { .. } => streams[p.stream]
                    .ops
                    .last()
                    .map(|o| o.phase)
                    .unwrap_or(p.phase),
                _ => p.phase,
            };
            streams[p.stream].ops.push(Op {
                id,
                name: p.name,
                phase,
                chunk: p.chunk,
                kind: p.kind,
                estimate_us: (p.estimate_us * 1000.0).round() / 1000.0,
            });
        }
        let mut streams: Vec<Stream> = streams.into_iter().filter(|s| !s.ops.is_empty()).collect();
        // Renumber event-less stream indices are implicit (by position); nothing refers to them.
        let ops: Vec<&Op> = streams.iter().flat_map(|s| s.ops.iter()).collect();
        let mut uses: Vec<Vec<u32>> = vec![Vec::new(); self.buffers.len()];
        for b in self.buffers.iter_mut() {
            b.live = (u32::MAX, 0);
        }
        for op in &ops {
            for buf in op_buffers(&op.kind) {
                if let Some(b) = self.buffers.get_mut(buf as usize) {
                    b.live.0 = b.live.0.min(op.id);
                    b.live.1 = b.live.1.max(op.id);
                    uses[buf as usize].push(op.id);
                }
            }
        }
        let last = ops.iter().map(|o| o.id).max().unwrap_or(0);
        for b in self.buffers.iter_mut() {
            if matches!(b.role, BufferRole::Input | BufferRole::Output) {
                b.live = (0, last);
            }
            if b.live.0 == u32::MAX {
                b.live = (0, 0);
            }
        }
        for &flag in &self.read_after_layer {
            if let Some(b) = self.buffers.get_mut(flag as usize) {
                b.live.1 = last;
                // A use at the last op: `allocate` shares bytes only between
                // buffers whose uses are ordered, and nothing follows the last op.
                uses[flag as usize].push(last);
            }
        }
        // Sizes saturate rather than wrap; a saturated one is a layer too
        // large to describe in bytes, refused here rather than allocated.
        if let Some(b) = self.buffers.iter().find(|b| b.bytes == u64::MAX) {
            return Err(format!(
                "buffer `{}` of shape {:?} has more than 2^64 bytes: the layer is too large \
                 (check tokens_per_rank, hidden and the expert sizes)",
                b.name, b.shape
            ));
        }
        let order = HappensBefore::new(&streams, self.events);
        let peak = allocate(&mut self.buffers, &uses, &order);
        let total = self
            .buffers
            .iter()
            .fold(0u64, |sum, b| sum.saturating_add(b.bytes));
        let weight_bytes = weight_bytes(m);
        let chunk_tokens = m.chunk_tokens(self.chunks);
        let has = |k: KernelKind| self.kernels.iter().any(|x| x.kind == k);
        let dedup_dispatch = self.has_node(|n| {
            matches!(
                n,
                MoeIr::DispatchRank(_) | MoeIr::DispatchRankInter(_) | MoeIr::DispatchRankIntra(_)
            )
        });
        let choices = Choices {
            chunks: self.chunks,
            chunk_tokens,
            fused_router: has(KernelKind::RouterFused),
            // Dispatch by rank packs straight from the tokens: a fused permute.
            fused_permute: self
                .has_node(|n| matches!(n, MoeIr::PermutePack(_) | MoeIr::PackRank(_))),
            // The sum over ranks un-permutes and sums in one kernel too.
            fused_combine: self
                .has_node(|n| matches!(n, MoeIr::UnpermuteWsum(_) | MoeIr::SumRank(_))),
            fused_activation: self.fused.get("activation").copied().unwrap_or(false),
            shared_concurrent: self.shared_concurrent,
            dispatch: if self.hierarchical {
                A2aAlgorithm::Hierarchical
            } else {
                A2aAlgorithm::Flat
            },
            dispatch_dtype: self.dispatch_dtype,
            expert_rows: self.expert_rows.max(m.expert_rows_max(self.chunks)),
            rank_rows: if dedup_dispatch {
                m.rank_rows_received_max(self.chunks)
            } else {
                0
            },
            headroom: m.headroom.filter(|_| m.capacity.is_none()),
            overflow_flag: m.capacity.is_none(),
            dedup_dispatch,
            reduce_combine: self.has_node(|n| matches!(n, MoeIr::Reduce(_) | MoeIr::DownReduce(_))),
        };
        for s in streams.iter_mut() {
            s.ops.sort_by_key(|o| o.id);
        }
        Ok(Plan {
            version: PLAN_FORMAT_VERSION,
            layer: m.layer.clone(),
            mesh: m.mesh.clone(),
            choices,
            kernels: self.kernels,
            buffers: self.buffers,
            events: self.events,
            streams,
            memory: MemoryPlan {
                peak_activation_bytes: peak,
                total_buffer_bytes: total,
                weight_bytes,
            },
        })
    }
}

/// The buffers an op touches.
pub fn op_buffers(kind: &OpKind) -> Vec<u32> {
    kind.buffers().into_iter().map(|(_, b)| b).collect()
}

/// Weights one rank holds: router gate, its experts (primaries and replicas),
/// shared experts.
fn weight_bytes(m: &Model) -> u64 {
    let db = m.dtype.bytes();
    let h = m.hidden;
    let f = m.ffn_local;
    let mats = if m.gated { 3 } else { 2 };
    let bias = if m.layer.expert_bias {
        (mats - 1) * f + h
    } else {
        0
    };
    let expert = (mats * h * f + bias).saturating_mul(db);
    let router = m.experts.saturating_mul(h).saturating_mul(4);
    let shared = m
        .shared
        .as_ref()
        .map(|s| {
            let smats = if s.gated { 3 } else { 2 };
            let gate = if s.sigmoid_gate { h } else { 0 };
            (smats * h * s.width + gate).saturating_mul(db)
        })
        .unwrap_or(0);
    expert
        .saturating_mul(m.local_experts)
        .saturating_add(router)
        .saturating_add(shared)
}
