//! The executor: runs a plan's streams on every rank.
//!
//! Two schedules run the same ops:
//! - **Concurrent** ([`CpuBackend::forward`]): every rank is a group of
//!   threads, one per stream; a stream is an in-order queue; the plan's events
//!   are real synchronisation (mutex and condition variable); collectives go
//!   through a [`Comm`]. A failing rank aborts the comm and the events, so the
//!   others return an error instead of waiting.
//! - **Shuffled** ([`CpuBackend::forward_shuffled`]): one thread runs every
//!   rank's streams, picking at each step a random op among those the plan's
//!   events and collectives allow. Different seeds give different legal
//!   interleavings; if the outputs differ, the plan lacks an event (`moec run
//!   --shuffle K`).

mod by_rank;
mod growth;

pub use growth::Growth;
use growth::PassError;

use super::comm::{Comm, CommError, InProcessComm, Incoming, Outgoing, Run, Tag};
use super::finite::{self, NonFinite, Trace};
use super::gemm::matmul_wt;
use super::hier::{self, ByRankBlocks, Staged, Topology};
use super::jit::{JitKernel, RawArg};
use super::layout::{
    assign_count, assign_place, expand_index, ChunkTable, Geometry, Placement, Routing,
};
use super::memory::{self, Arena, Region};
use super::traffic::{LinkClass, Moved, RankTraffic};
use crate::footprint::{Budget, Footprint};
use crate::plan::arena::RowNeed;
use crate::plan::binding::{binding, library_kind, Arg, LaunchRows};
use crate::plan::{binding, RankIndex};
use crate::plan::{
    Activation, Buffer, BufferRole, CollectiveKind, CollectiveScope, DType, Epilogue, GemmWeight,
    KernelKind, Op, OpKind, Phase, Plan, WeightOn,
};
use crate::stats::TokenRouting;
use crate::weights::{Ffn, LayerWeights};
use moec_kernels::library::{self, Kind};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// An error of one rank, with the op it happened at.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecError {
    pub rank: Option<usize>,
    pub op: Option<String>,
    pub message: String,
}

impl ExecError {
    fn new(message: impl Into<String>) -> ExecError {
        ExecError {
            rank: None,
            op: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.rank, &self.op) {
            (Some(r), Some(op)) => write!(f, "rank {r}, {op}: {}", self.message),
            (Some(r), None) => write!(f, "rank {r}: {}", self.message),
            _ => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for ExecError {}

/// Settings of the CPU backend.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// How long a rank waits for an event or a peer before giving up.
    pub timeout: Duration,
    /// Threads each GEMM may use (1: the calling stream's thread only).
    pub gemm_threads: usize,
    /// Most bytes the layer may hold in this process (every rank's arena,
    /// the weights, inputs and outputs: [`crate::footprint`]); `None`: what
    /// the machine has available.
    pub memory_budget: Option<u64>,
    /// What a pass whose output is not finite does: fail (the default) or
    /// return it with a warning; either way the message names the phase the
    /// values first appeared in ([`super::finite`]).
    pub non_finite: NonFinite,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            timeout: Duration::from_secs(300),
            gemm_threads: 1,
            memory_budget: None,
            non_finite: NonFinite::Error,
        }
    }
}

/// Routing figures of one forward pass, summed over every rank.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoutingStats {
    /// Assignments routed to each expert (before capacity drops).
    pub routed_per_expert: Vec<u64>,
    /// Assignments dropped by capacity.
    pub dropped: u64,
    /// Total assignments (tokens × top_k over all ranks).
    pub assignments: u64,
}

impl RoutingStats {
    /// The busiest expert's load over the mean load.
    pub fn imbalance(&self) -> f64 {
        let n = self.routed_per_expert.len().max(1) as f64;
        let total: u64 = self.routed_per_expert.iter().sum();
        let max = self.routed_per_expert.iter().copied().max().unwrap_or(0);
        if total == 0 {
            1.0
        } else {
            max as f64 / (total as f64 / n)
        }
    }
}

/// The result of a forward pass.
#[derive(Clone, Debug)]
pub struct Forward {
    /// Per rank, `[tokens, hidden]` as f32 (values rounded to the layer dtype).
    pub outputs: Vec<Vec<f32>>,
    pub stats: RoutingStats,
    /// Seconds spent in ops of each phase, averaged over ranks (streams overlap,
    /// so the phases may sum to more than the wall time).
    pub phase_seconds: BTreeMap<Phase, f64>,
    /// Wall time of the pass.
    pub wall_seconds: f64,
    /// Per rank, what its collectives sent, by collective and link class
    /// (the CPU backend counts every exchange; empty where a backend does not
    /// count, today the CUDA backend).
    pub traffic: Vec<RankTraffic>,
    /// What the pass warns of: non-finite output values, where the options
    /// make them a warning ([`NonFinite::Warn`]).
    pub warnings: Vec<String>,
    /// Dropless plans: the routing of this pass needed more rows than the
    /// bounded buffers held, and the pass re-ran with grown buffers.
    pub grown: Option<Growth>,
    /// Per rank, what its router chose (empty where a backend does not keep
    /// it, today the CUDA backend): the data of a statistics file
    /// ([`RoutingStatistics::from_passes`](crate::stats::RoutingStatistics::from_passes)).
    pub routing: Vec<TokenRouting>,
}

/// An FFN's weights laid out for the GEMMs: the gate and up projections
/// stacked (`[gate; up]`, `[2F, H]` for SwiGLU), the down projection `[H, F]`.
struct PreparedFfn {
    up: Vec<f32>,
    up_bias: Option<Vec<f32>>,
    up_rows: usize,
    down: Vec<f32>,
    down_bias: Option<Vec<f32>>,
    width: usize,
}

impl PreparedFfn {
    fn new(ffn: &Ffn, hidden: usize) -> PreparedFfn {
        let mut up = Vec::with_capacity(ffn.up.len() * 2);
        let mut up_bias = None;
        if let Some(gate) = &ffn.gate {
            up.extend_from_slice(gate);
            if let (Some(gb), Some(ub)) = (&ffn.gate_bias, &ffn.up_bias) {
                up_bias = Some(gb.iter().chain(ub).copied().collect());
            }
        } else {
            up_bias = ffn.up_bias.clone();
        }
        up.extend_from_slice(&ffn.up);
        let up_rows = up.len() / hidden.max(1);
        PreparedFfn {
            up,
            up_bias,
            up_rows,
            down: ffn.down.clone(),
            down_bias: ffn.down_bias.clone(),
            width: ffn.width,
        }
    }
}

/// A plan made ready to run on the CPU: kernels compiled, weights laid out.
pub struct CpuBackend {
    plan: Plan,
    geo: Geometry,
    /// Nodes of an EP group, for plans with a hierarchical all-to-all.
    topo: Option<Topology>,
    regions: Vec<Region>,
    arena_bytes: usize,
    /// The kernels and weights, which do not depend on the buffers' sizes:
    /// shared with the backend of the grown plan.
    prepared: Arc<Prepared>,
    world: usize,
    options: CpuOptions,
    passes: AtomicU64,
    /// Arenas of finished passes, reused so a pass does not allocate and
    /// zero its ranks' memory again (every buffer is written before it is read).
    spare_arenas: Mutex<Vec<Arena>>,
    /// Dropless plans: the backend of the plan grown for a pass whose routing
    /// overflowed the bounded buffers; later passes start from it.
    grown: Mutex<Option<Arc<CpuBackend>>>,
}

/// What a backend compiles and lays out once: kernels and weights.
struct Prepared {
    /// One compiled kernel per plan kernel (`None` for the native assignment kernels).
    kernels: Vec<Option<JitKernel>>,
    /// The activation applied in a GEMM epilogue (reads the f32 GEMM result).
    expert_epilogue: Option<JitKernel>,
    /// The down projection's reducing epilogue (`unpermute_weighted_sum`
    /// over its `f32` product), when a GEMM sums through the expansion index.
    rank_reduce: Option<JitKernel>,
    shared_epilogue: Option<JitKernel>,
    router: Vec<f32>,
    /// The router's logit bias, added in the router GEMM (gpt-oss).
    router_logit_bias: Option<Vec<f32>>,
    router_bias: Vec<f32>,
    experts: Vec<PreparedFfn>,
    shared: Option<PreparedFfn>,
    shared_gate: Vec<f32>,
}

/// The error when a rank's thread cannot be started.
fn thread_limit(rank: usize, e: &std::io::Error) -> String {
    format!(
        "cannot start a thread for rank {rank}: {e} (every stream of every rank is a thread: \
         raise the process's thread limit, `ulimit -u`, or run fewer ranks with --ranks)"
    )
}

/// Constants of the activation a GEMM epilogue applies: it reads the GEMM's
/// f32 result (`in_dtype` 0) and stores the layer dtype.
fn activation_constants(plan: &Plan, width: usize, ffn: Activation) -> Vec<(String, i64)> {
    vec![
        ("act".into(), ffn.code()),
        ("clamped".into(), i64::from(ffn.limit().is_some())),
        ("dtype".into(), plan.layer.dtype.code()),
        ("ffn".into(), width as i64),
        ("gated".into(), i64::from(ffn.gated())),
        ("hidden".into(), plan.layer.hidden as i64),
        ("in_dtype".into(), 0),
    ]
}

fn compile(kind: Kind, constants: &[(String, i64)]) -> Result<JitKernel, ExecError> {
    let desc = library::describe(kind, constants)
        .map_err(|e| ExecError::new(format!("kernel `{}`: {e}", kind.name())))?;
    JitKernel::compile(&desc).map_err(|e| ExecError::new(format!("kernel `{}`: {e}", kind.name())))
}

impl CpuBackend {
    /// Prepares `plan` (already validated) with `weights` for `world` ranks.
    pub fn new(
        plan: Plan,
        weights: &LayerWeights,
        options: CpuOptions,
    ) -> Result<CpuBackend, ExecError> {
        Footprint::of(&plan)
            .check(Budget::host(options.memory_budget))
            .map_err(|e| ExecError::new(e.to_string()))?;
        let geo = Geometry::new(&plan).map_err(ExecError::new)?;
        let world = usize::try_from(plan.mesh.world_size())
            .map_err(|_| ExecError::new("the mesh is too large"))?;
        let group = geo.group;
        if world == 0 || world % group != 0 {
            return Err(ExecError::new(format!(
                "{world} ranks do not divide into EP groups of {group}"
            )));
        }
        weights
            .check(&plan.layer)
            .map_err(|e| ExecError::new(e.to_string()))?;
        let regions = memory::regions(&plan.buffers, plan.memory.peak_activation_bytes)
            .map_err(ExecError::new)?;
        let arena_bytes = usize::try_from(plan.memory.peak_activation_bytes)
            .map_err(|_| ExecError::new("the arena does not fit this machine"))?;
        let mut kernels = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            kernels.push(match library_kind(k.kind) {
                Some(kind) => Some(compile(kind, &k.constants)?),
                None if k.kind == KernelKind::Assign => None,
                None => {
                    return Err(ExecError::new(format!(
                        "kernel `{}` of kind {:?} is not supported",
                        k.name, k.kind
                    )))
                }
            });
        }
        let hierarchical = plan.ops().any(|(_, op)| {
            matches!(op.kind, OpKind::Collective { scope, .. } if scope != CollectiveScope::EpGroup)
        });
        let topo = if hierarchical {
            if plan.layer.router.weight_on == WeightOn::Input && geo.top_k > 1 {
                return Err(ExecError::new(
                    "a hierarchical dispatch sends one copy per token and node, but with the router weight on the input the rows of a token differ",
                ));
            }
            let gpus_per_node = usize::try_from(plan.mesh.gpus_per_node)
                .map_err(|_| ExecError::new("gpus_per_node does not fit this machine"))?;
            Some(Topology::new(group, gpus_per_node).map_err(ExecError::new)?)
        } else {
            None
        };
        let hidden = plan.layer.hidden as usize;
        let experts: Vec<PreparedFfn> = weights
            .experts
            .iter()
            .map(|f| PreparedFfn::new(f, hidden))
            .collect();
        let shared = weights.shared.as_ref().map(|f| PreparedFfn::new(f, hidden));
        let mut expert_epilogue = None;
        let mut shared_epilogue = None;
        for (_, op) in plan.ops() {
            if let OpKind::Gemm {
                weight,
                epilogue: Epilogue::Activation,
                ..
            } = op.kind
            {
                match weight {
                    GemmWeight::ExpertUp if expert_epilogue.is_none() => {
                        let width = experts.first().map_or(0, |f| f.width);
                        let c = activation_constants(&plan, width, plan.layer.ffn);
                        expert_epilogue = Some(compile(Kind::Activation, &c)?);
                    }
                    GemmWeight::SharedUp if shared_epilogue.is_none() => {
                        let (width, ffn) = match (&shared, &plan.layer.shared) {
                            (Some(f), Some(s)) => (f.width, s.ffn),
                            _ => {
                                return Err(ExecError::new("a shared GEMM without shared weights"))
                            }
                        };
                        let c = activation_constants(&plan, width, ffn);
                        shared_epilogue = Some(compile(Kind::Activation, &c)?);
                    }
                    _ => {}
                }
            }
        }
        let reduces_in_gemm = plan.ops().any(|(_, op)| {
            matches!(
                op.kind,
                OpKind::Gemm {
                    weight: GemmWeight::ExpertDown,
                    by_rank: Some(_),
                    ..
                }
            )
        });
        let rank_reduce = if reduces_in_gemm {
            Some(compile(
                Kind::UnpermuteWeightedSum,
                &binding::reduce_epilogue_constants(&plan),
            )?)
        } else {
            None
        };
        let prepared = Prepared {
            router: weights.router.clone(),
            router_logit_bias: weights.router_logit_bias.clone(),
            router_bias: weights.router_bias.clone().unwrap_or_default(),
            experts,
            shared,
            shared_gate: weights.shared_gate.clone().unwrap_or_default(),
            kernels,
            expert_epilogue,
            rank_reduce,
            shared_epilogue,
        };
        Ok(CpuBackend {
            plan,
            geo,
            topo,
            regions,
            arena_bytes,
            prepared: Arc::new(prepared),
            world,
            options,
            passes: AtomicU64::new(0),
            spare_arenas: Mutex::new(Vec::new()),
            grown: Mutex::new(None),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The `limit` argument of an activation kernel: the SwiGLU clamp of the
    /// shared or the routed experts (unused, 0, when they are not clamped).
    fn clamp_limit(&self, shared: bool) -> f32 {
        let ffn = match (shared, &self.plan.layer.shared) {
            (true, Some(s)) => s.ffn,
            _ => self.plan.layer.ffn,
        };
        ffn.limit().unwrap_or(0.0) as f32
    }

    /// Ranks this backend runs.
    pub fn ranks(&self) -> usize {
        self.world
    }

    fn buffer_index(&self, role: BufferRole) -> Result<usize, ExecError> {
        self.plan
            .buffers
            .iter()
            .position(|b| b.role == role)
            .ok_or_else(|| ExecError::new(format!("the plan has no {role:?} buffer")))
    }

    fn check_inputs(&self, inputs: &[&[f32]]) -> Result<(), ExecError> {
        let per = self.geo.tokens * self.plan.layer.hidden as usize;
        if inputs.len() != self.world {
            return Err(ExecError::new(format!(
                "{} input tensors for {} ranks",
                inputs.len(),
                self.world
            )));
        }
        for (r, x) in inputs.iter().enumerate() {
            if x.len() != per {
                return Err(ExecError::new(format!(
                    "rank {r}'s input holds {} values, [{}, {}] needs {per}",
                    x.len(),
                    self.geo.tokens,
                    self.plan.layer.hidden
                )));
            }
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                return Err(ExecError::new(format!(
                    "rank {r}'s input has a non-finite value {} at token {}, column {}",
                    x[i],
                    i / self.plan.layer.hidden as usize,
                    i % self.plan.layer.hidden as usize
                )));
            }
        }
        Ok(())
    }

    /// Rank contexts holding `inputs`; `reuse` takes arenas of earlier passes
    /// (never for the race check: stale values of an earlier pass could hide
    /// a read that the plan does not order after its write).
    fn new_ranks(&self, inputs: &[&[f32]], reuse: bool) -> Result<Vec<RankCtx>, ExecError> {
        let x = self.buffer_index(BufferRole::Input)?;
        let mut ranks = Vec::with_capacity(self.world);
        for (r, input) in inputs.iter().enumerate() {
            let spare = if reuse {
                self.spare_arenas
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop()
            } else {
                None
            };
            let arena = spare.unwrap_or_else(|| Arena::new(self.arena_bytes));
            // SAFETY: the arena was just created; no other thread sees it yet.
            let bytes = unsafe { arena.bytes_mut(self.regions[x]) };
            memory::write_f32(input, self.plan.buffers[x].dtype, bytes);
            ranks.push(RankCtx {
                rank: r,
                arena,
                events: (0..self.plan.events).map(|_| Event::default()).collect(),
                placement: Mutex::new(None),
                routing: Mutex::new(None),
                overflow: Mutex::new(None),
                staged: Mutex::new(BTreeMap::new()),
                rank_staged: Mutex::new(BTreeMap::new()),
                phase_seconds: Mutex::new(BTreeMap::new()),
                traffic: Mutex::new(RankTraffic::new()),
            });
        }
        Ok(ranks)
    }

    /// Keeps the arenas of a finished pass for the next one.
    fn recycle(&self, ranks: Vec<RankCtx>) {
        let mut spare = self.spare_arenas.lock().unwrap_or_else(|p| p.into_inner());
        spare.extend(ranks.into_iter().map(|ctx| ctx.arena));
    }

    fn finish(&self, ranks: &[RankCtx], start: Instant) -> Result<Forward, ExecError> {
        let out = self.buffer_index(BufferRole::Output)?;
        let hidden = self.plan.layer.hidden as usize;
        let mut outputs = Vec::with_capacity(ranks.len());
        let mut stats = RoutingStats {
            routed_per_expert: vec![0; self.geo.experts],
            ..RoutingStats::default()
        };
        let mut phase_seconds: BTreeMap<Phase, f64> = BTreeMap::new();
        let mut traffic = Vec::with_capacity(ranks.len());
        let mut routing = Vec::with_capacity(ranks.len());
        for ctx in ranks {
            traffic.push(
                ctx.traffic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            );
            // SAFETY: every stream thread of this pass has finished.
            let bytes = unsafe { ctx.arena.bytes(self.regions[out]) };
            let mut values = vec![0.0f32; self.geo.tokens * hidden];
            memory::read_f32(bytes, self.plan.buffers[out].dtype, &mut values);
            outputs.push(values);
            let placement = ctx.placement.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = placement.as_ref() {
                for (acc, n) in stats.routed_per_expert.iter_mut().zip(&p.routed_per_expert) {
                    *acc += n;
                }
                stats.dropped += p.dropped;
            }
            let picks = ctx.routing.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let (Some((ids, weights)), Some(p)) = (picks, placement.as_ref()) {
                let n = self.geo.tokens * self.geo.top_k;
                let dropped = p.slots.iter().take(n).map(|&s| s < 0).collect();
                routing.push(TokenRouting {
                    experts: ids.into_iter().take(n).collect(),
                    weights: weights.into_iter().take(n).collect(),
                    dropped,
                });
            }
            for (phase, s) in ctx
                .phase_seconds
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                *phase_seconds.entry(*phase).or_default() += s / ranks.len() as f64;
            }
        }
        stats.assignments = stats.routed_per_expert.iter().sum();
        Ok(Forward {
            outputs,
            stats,
            phase_seconds,
            wall_seconds: start.elapsed().as_secs_f64(),
            traffic,
            warnings: Vec::new(),
            grown: None,
            routing,
        })
    }

    /// A pass's output must be finite. When it is not, the pass runs again
    /// with every op's written buffers checked (passes are deterministic),
    /// so the message names the op and phase where the values first
    /// appeared; then it is an error or, with [`NonFinite::Warn`], a warning.
    fn check_output(&self, inputs: &[&[f32]], forward: &mut Forward) -> Result<(), ExecError> {
        let Some(bad) = finite::scan_outputs(&forward.outputs) else {
            return Ok(());
        };
        let trace = Trace::default();
        // The traced pass runs on the same buffers, so it cannot overflow
        // where the first did not; if it fails anyway, the phase is unknown.
        let origin = match self.run_concurrent(inputs, Some(&trace)) {
            Ok(_) => trace.first(),
            Err(_) => None,
        };
        let message = finite::message(&bad, self.plan.layer.dtype, origin.as_ref());
        match self.options.non_finite {
            NonFinite::Error => Err(ExecError::new(message)),
            NonFinite::Warn => {
                forward.warnings.push(message);
                Ok(())
            }
        }
    }

    /// Checks what `op` on this stream's rank wrote, for a traced pass.
    fn trace_writes(run: &StreamRun<'_>, op: &Op, trace: &Trace) {
        for b in run.backend.plan.written_buffers(op) {
            let Ok((region, buf)) = run.region(b, op.chunk) else {
                continue;
            };
            if !matches!(buf.dtype, DType::F32 | DType::Bf16 | DType::F16) {
                continue;
            }
            let mut values = vec![0.0f32; region.bytes / buf.dtype.bytes() as usize];
            // SAFETY: the op that wrote the region just finished on this
            // thread; the plan's events keep its readers and writers apart.
            let bytes = unsafe { run.ctx.arena.bytes(region) };
            memory::read_f32(bytes, buf.dtype, &mut values);
            trace.check(op, run.ctx.rank, &buf.name, &values);
        }
    }

    /// Runs the layer on `inputs` (one `[tokens, hidden]` tensor per rank),
    /// every stream of every rank a thread.
    ///
    /// A dropless plan whose bounded buffers are too small for this pass's
    /// routing runs again with grown buffers ([`Forward::grown`] says so).
    pub fn forward(&self, inputs: &[Vec<f32>]) -> Result<Forward, ExecError> {
        let slices: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        self.forward_slices(&slices)
    }

    /// [`forward`](CpuBackend::forward) on borrowed tensors (one
    /// `[tokens, hidden]` slice per rank): the inputs are read straight
    /// into the ranks' arenas, with no copy of their own (what the Python
    /// binding uses for a NumPy array).
    pub fn forward_slices(&self, inputs: &[&[f32]]) -> Result<Forward, ExecError> {
        self.with_growth(|backend| {
            let mut forward = backend.run_concurrent(inputs, None)?;
            backend.check_output(inputs, &mut forward)?;
            Ok(forward)
        })
    }

    /// The rows the routing needed, when a rank of this pass found that it
    /// overflows the bounded buffers.
    fn overflow_of(ranks: &[RankCtx]) -> Option<RowNeed> {
        ranks
            .iter()
            .filter_map(|c| *c.overflow.lock().unwrap_or_else(|p| p.into_inner()))
            .reduce(RowNeed::max)
    }

    /// One pass, every stream of every rank a thread; with `trace`, every
    /// op's written buffers are checked for non-finite values after it.
    fn run_concurrent(
        &self,
        inputs: &[&[f32]],
        trace: Option<&Trace>,
    ) -> Result<Forward, PassError> {
        self.check_inputs(inputs)?;
        let start = Instant::now();
        // A traced pass starts from zeroed arenas: bytes no op of the pass
        // wrote (rows a collective left alone) must not hold an earlier
        // pass's values.
        let ranks = self.new_ranks(inputs, trace.is_none())?;
        let pass = self.passes.fetch_add(1, Ordering::Relaxed);
        let comm = InProcessComm::new(self.options.timeout);
        let abort = Abort::default();
        let errors: Mutex<Vec<ExecError>> = Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for ctx in &ranks {
                for (s, stream) in self.plan.streams.iter().enumerate() {
                    let (comm, abort, errors) = (&comm, &abort, &errors);
                    let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
                        let run = StreamRun {
                            backend: self,
                            ctx,
                            pass,
                            abort,
                        };
                        for op in &stream.ops {
                            if abort.is_set() {
                                return;
                            }
                            let done = run.op(op, Some(comm));
                            if let (Ok(()), Some(trace)) = (&done, trace) {
                                Self::trace_writes(&run, op, trace);
                            }
                            if let Err(mut e) = done {
                                e.rank = Some(ctx.rank);
                                e.op = Some(format!("op #{} `{}` on stream {}", op.id, op.name, s));
                                let text = e.to_string();
                                errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                                abort.set();
                                comm.abort(&text);
                                return;
                            }
                        }
                    });
                    if let Err(e) = spawned {
                        // The threads already running see the abort and stop.
                        let text = thread_limit(ctx.rank, &e);
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(ExecError::new(text.clone()));
                        abort.set();
                        comm.abort(&text);
                    }
                }
            }
        });
        let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
        if !errors.is_empty() {
            if let Some(need) = Self::overflow_of(&ranks) {
                self.recycle(ranks);
                return Err(PassError::Overflow(need));
            }
            // Report the root cause: the first error that is not a consequence of an abort.
            let root = errors
                .iter()
                .position(|e| !e.message.starts_with("aborted"))
                .unwrap_or(0);
            return Err(errors.swap_remove(root).into());
        }
        let result = self.finish(&ranks, start);
        self.recycle(ranks);
        Ok(result?)
    }

    /// Runs the layer with every rank's streams interleaved, one op at a time,
    /// in a random order the plan allows (seeded).
    pub fn forward_shuffled(&self, inputs: &[Vec<f32>], seed: u64) -> Result<Forward, ExecError> {
        let slices: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
        self.with_growth(|backend| backend.shuffled_pass(&slices, seed))
    }

    fn shuffled_pass(&self, inputs: &[&[f32]], seed: u64) -> Result<Forward, PassError> {
        self.check_inputs(inputs)?;
        let start = Instant::now();
        let ranks = self.new_ranks(inputs, false)?;
        let pass = self.passes.fetch_add(1, Ordering::Relaxed);
        let abort = Abort::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let streams = &self.plan.streams;
        let mut pos = vec![vec![0usize; streams.len()]; ranks.len()];
        loop {
            let mut ready: Vec<(usize, usize)> = Vec::new();
            let mut pending = false;
            for (r, ctx) in ranks.iter().enumerate() {
                for (s, stream) in streams.iter().enumerate() {
                    let Some(op) = stream.ops.get(pos[r][s]) else {
                        continue;
                    };
                    pending = true;
                    let runnable = match &op.kind {
                        OpKind::Wait { event } => {
                            ctx.events.get(*event as usize).is_some_and(Event::is_set)
                        }
                        OpKind::Collective { .. } => {
                            // Runnable once every group member is at this op.
                            let base = r - r % self.geo.group;
                            (base..base + self.geo.group)
                                .all(|p| streams[s].ops.get(pos[p][s]).map(|o| o.id) == Some(op.id))
                        }
                        _ => true,
                    };
                    if runnable {
                        ready.push((r, s));
                    }
                }
            }
            if !pending {
                break;
            }
            if ready.is_empty() {
                return Err(ExecError::new(
                    "no op can run: the plan's streams wait on each other (deadlock)",
                )
                .into());
            }
            let (r, s) = ready[rng.random_range(0..ready.len())];
            let op = &streams[s].ops[pos[r][s]];
            let tag_err = |mut e: ExecError, rank: usize| {
                e.rank = Some(rank);
                e.op = Some(format!("op #{} `{}` on stream {}", op.id, op.name, s));
                e
            };
            if let OpKind::Collective { .. } = op.kind {
                let base = r - r % self.geo.group;
                let group = base..base + self.geo.group;
                self.collective_together(&ranks, group.clone(), op, pass, &abort)
                    .map_err(|e| {
                        let rank = e.rank.unwrap_or(r);
                        tag_err(e, rank)
                    })?;
                for p in group {
                    pos[p][s] += 1;
                }
            } else {
                let run = StreamRun {
                    backend: self,
                    ctx: &ranks[r],
                    pass,
                    abort: &abort,
                };
                if let Err(e) = run.op(op, None) {
                    return Err(match Self::overflow_of(&ranks) {
                        Some(need) => PassError::Overflow(need),
                        None => tag_err(e, r).into(),
                    });
                }
                pos[r][s] += 1;
            }
        }
        let mut forward = self.finish(&ranks, start)?;
        self.check_output(inputs, &mut forward)?;
        Ok(forward)
    }

    /// Runs one collective for every member of an EP group at once (shuffled
    /// mode): each member on a thread of its own, through a fresh comm, so the
    /// collective runs the very code of the concurrent mode.
    fn collective_together(
        &self,
        ranks: &[RankCtx],
        group: Range<usize>,
        op: &Op,
        pass: u64,
        abort: &Abort,
    ) -> Result<(), ExecError> {
        let comm = InProcessComm::new(self.options.timeout);
        let results: Vec<Result<(), ExecError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranks[group]
                .iter()
                .map(|ctx| {
                    let comm = &comm;
                    let spawned = std::thread::Builder::new().spawn_scoped(scope, move || {
                        let run = StreamRun {
                            backend: self,
                            ctx,
                            pass,
                            abort,
                        };
                        let result = run.collective(op, comm);
                        if let Err(e) = &result {
                            comm.abort(&e.to_string());
                        }
                        result.map_err(|mut e| {
                            e.rank = Some(ctx.rank);
                            e
                        })
                    });
                    spawned.map_err(|e| {
                        let text = thread_limit(ctx.rank, &e);
                        comm.abort(&text);
                        ExecError::new(text)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err(ExecError::new("a collective thread panicked"))),
                    Err(e) => Err(e),
                })
                .collect()
        });
        let mut errors: Vec<ExecError> = results.into_iter().filter_map(Result::err).collect();
        match errors
            .iter()
            .position(|e| !e.message.starts_with("aborted"))
        {
            Some(i) => Err(errors.swap_remove(i)),
            None => errors.into_iter().next().map_or(Ok(()), Err),
        }
    }

    /// The routing table of an op's chunk.
    fn table_of(&self, ctx: &RankCtx, op: &Op) -> Result<ChunkTableRef, ExecError> {
        let placement = ctx.placement()?;
        let chunk = op.chunk.unwrap_or(0) as usize;
        if chunk >= placement.tables.len() {
            return Err(ExecError::new(format!(
                "no routing table for chunk {chunk}"
            )));
        }
        Ok(ChunkTableRef { placement, chunk })
    }

    /// The byte runs one rank sends to and receives from each peer.
    fn collective_plan(
        &self,
        ctx: &RankCtx,
        me: usize,
        op: &Op,
    ) -> Result<CollectivePlan, ExecError> {
        let OpKind::Collective {
            kind,
            scope,
            send,
            recv,
            ..
        } = op.kind
        else {
            return Err(ExecError::new("not a collective"));
        };
        if scope != CollectiveScope::EpGroup {
            return Err(ExecError::new(
                "internal: a hierarchical leg planned as flat",
            ));
        }
        let g = self.geo.group;
        let send_buf = &self.plan.buffers[send as usize];
        let recv_buf = &self.plan.buffers[recv as usize];
        match kind {
            CollectiveKind::CountExchange | CollectiveKind::AllGather => {
                let len = self.regions[send as usize].bytes;
                if self.regions[recv as usize].bytes < len * g {
                    return Err(ExecError::new(format!(
                        "`{}` is too small to gather {g} blocks of {len} bytes",
                        recv_buf.name
                    )));
                }
                Ok(CollectivePlan {
                    to: (0..g).map(|_| vec![Run { offset: 0, len }]).collect(),
                    from: (0..g)
                        .map(|p| {
                            vec![Run {
                                offset: p * len,
                                len,
                            }]
                        })
                        .collect(),
                })
            }
            CollectiveKind::AllToAllRank => {
                let table = self.table_of(ctx, op)?;
                let table = table.get();
                let send_rows = RowLayout::of(send_buf)?;
                let recv_rows = RowLayout::of(recv_buf)?;
                // Token side: by destination; rank side: by source.
                let token_side = |p: usize| {
                    let start = table.rank_send_start(me, p);
                    start..start + table.rank_rows(me, p)
                };
                let rank_side = |p: usize| {
                    let start = table.rank_recv_start(p, me);
                    start..start + table.rank_rows(p, me)
                };
                let (out_rows, in_rows): (Vec<Range<usize>>, Vec<Range<usize>>) =
                    if op.phase != Phase::Combine {
                        (
                            (0..g).map(token_side).collect(),
                            (0..g).map(rank_side).collect(),
                        )
                    } else {
                        (
                            (0..g).map(rank_side).collect(),
                            (0..g).map(token_side).collect(),
                        )
                    };
                let mut to = Vec::with_capacity(g);
                let mut from = Vec::with_capacity(g);
                for (out, inc) in out_rows.into_iter().zip(in_rows) {
                    to.push(send_rows.runs(&[out], &send_buf.name)?);
                    from.push(recv_rows.runs(&[inc], &recv_buf.name)?);
                }
                Ok(CollectivePlan { to, from })
            }
            CollectiveKind::AllToAll | CollectiveKind::AllToAllV => {
                let chunk = op.chunk.unwrap_or(0) as usize;
                let placement = ctx.placement()?;
                let table = placement
                    .tables
                    .get(chunk)
                    .ok_or_else(|| ExecError::new(format!("no routing table for chunk {chunk}")))?;
                let send_rows = RowLayout::of(send_buf)?;
                let recv_rows = RowLayout::of(recv_buf)?;
                let dispatch = op.phase != Phase::Combine;
                // Rows on the token side (send order) and the expert side (receive order).
                let token_side = |s: usize, e: usize, l: usize| {
                    table.send_start(s, e, l)..table.send_start(s, e, l) + table.rows(s, e, l)
                };
                let expert_side = |s: usize, e: usize, l: usize| {
                    table.recv_start(s, e, l)..table.recv_start(s, e, l) + table.rows(s, e, l)
                };
                let lmax = table.max_local();
                let mut to = Vec::with_capacity(g);
                let mut from = Vec::with_capacity(g);
                for p in 0..g {
                    let (out_rows, in_rows): (Vec<Range<usize>>, Vec<Range<usize>>) = if dispatch {
                        (
                            (0..lmax).map(|l| token_side(me, p, l)).collect(),
                            (0..lmax).map(|l| expert_side(p, me, l)).collect(),
                        )
                    } else {
                        (
                            (0..lmax).map(|l| expert_side(p, me, l)).collect(),
                            (0..lmax).map(|l| token_side(me, p, l)).collect(),
                        )
                    };
                    to.push(send_rows.runs(&out_rows, &send_buf.name)?);
                    from.push(recv_rows.runs(&in_rows, &recv_buf.name)?);
                }
                Ok(CollectivePlan { to, from })
            }
        }
    }
}

/// Rows of one GEMM group, its weights `[n, k]`, bias and `n`.
type GemmGroup<'w> = (Range<usize>, &'w [f32], Option<&'w [f32]>, usize);

struct CollectivePlan {
    to: Vec<Vec<Run>>,
    from: Vec<Vec<Run>>,
}

/// Rows of a 2-D buffer as byte runs: the plan's layout
/// ([`crate::plan::rows`], which also cuts the runs), with the sizes the
/// kernel arguments need in this machine's `usize`.
struct RowLayout {
    plan: crate::plan::rows::RowLayout,
    rows: usize,
    /// Byte offset of the scales area and bytes of one row's scales (fp8).
    scales: Option<(usize, usize)>,
}

impl RowLayout {
    fn of(b: &Buffer) -> Result<RowLayout, ExecError> {
        let plan = crate::plan::rows::RowLayout::of(b).map_err(ExecError::new)?;
        let size = |v: u64| {
            usize::try_from(v)
                .map_err(|_| ExecError::new(format!("`{}` does not fit this machine", b.name)))
        };
        Ok(RowLayout {
            rows: size(plan.rows)?,
            scales: match plan.scales {
                Some((base, per_row)) => Some((size(base)?, size(per_row)?)),
                None => None,
            },
            plan,
        })
    }

    /// Bytes one row occupies on the wire (fp8: its data and its scales).
    fn bytes_per_row(&self) -> usize {
        self.plan.bytes_per_row() as usize
    }

    fn runs(&self, rows: &[Range<usize>], name: &str) -> Result<Vec<Run>, ExecError> {
        self.plan.runs(rows, name).map_err(ExecError::new)
    }
}

/// A one-shot flag other streams can wait for.
#[derive(Default)]
struct Event {
    set: Mutex<bool>,
    changed: Condvar,
}

impl Event {
    fn record(&self) {
        *self.set.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.set.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait(&self, abort: &Abort, timeout: Duration) -> Result<(), ExecError> {
        let deadline = Instant::now() + timeout;
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        while !*set {
            if abort.is_set() {
                return Err(ExecError::new("aborted because another stream failed"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ExecError::new(format!(
                    "timed out after {timeout:?} waiting for an event"
                )));
            }
            // Wake up now and then to notice an abort.
            let step = (deadline - now).min(Duration::from_millis(20));
            set = self
                .changed
                .wait_timeout(set, step)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }
}

#[derive(Default)]
struct Abort(AtomicBool);

impl Abort {
    fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One rank's memory and synchronisation for one pass.
struct RankCtx {
    rank: usize,
    arena: Arena,
    events: Vec<Event>,
    /// The routing table `assign_place` leaves in rank memory.
    placement: Mutex<Option<Arc<Placement>>>,
    /// The router's picks and weights (`[tokens, top_k]`), kept by
    /// `assign_place` for the pass's statistics.
    routing: Mutex<Option<(Vec<i32>, Vec<f32>)>>,
    /// Set by `assign_place` when the routing needs more rows than the
    /// bounded buffers hold (the pass then stops).
    overflow: Mutex<Option<RowNeed>>,
    /// Routing of the rows a hierarchical dispatch staged, by staging buffer.
    staged: Mutex<BTreeMap<u32, Arc<Staged>>>,
    /// The same for the by-rank legs, by chunk: the reducing combine sums
    /// the returning rows by it.
    rank_staged: Mutex<BTreeMap<u64, Arc<Staged>>>,
    phase_seconds: Mutex<BTreeMap<Phase, f64>>,
    /// What this rank's collectives sent, counted at the `Comm`.
    traffic: Mutex<RankTraffic>,
}

impl RankCtx {
    fn placement(&self) -> Result<Arc<Placement>, ExecError> {
        self.placement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| ExecError::new("the routing is used before `assign place` ran"))
    }
}

/// One stream of one rank, executing ops.
struct StreamRun<'a> {
    backend: &'a CpuBackend,
    ctx: &'a RankCtx,
    pass: u64,
    abort: &'a Abort,
}

impl StreamRun<'_> {
    fn op(&self, op: &Op, comm: Option<&dyn Comm>) -> Result<(), ExecError> {
        let start = Instant::now();
        match &op.kind {
            OpKind::Record { event } => self.event(*event)?.record(),
            OpKind::Wait { event } => self
                .event(*event)?
                .wait(self.abort, self.backend.options.timeout)?,
            OpKind::Launch {
                kernel,
                inputs,
                outputs,
                ..
            } => self.launch(op, *kernel, inputs, outputs)?,
            OpKind::Gemm {
                weight,
                a,
                c,
                epilogue,
                by_rank,
                ..
            } => self.gemm(op, *weight, (*a, *c), *epilogue, *by_rank)?,
            OpKind::Collective { .. } => {
                let comm =
                    comm.ok_or_else(|| ExecError::new("internal: a collective without a comm"))?;
                self.collective(op, comm)?;
            }
        }
        if !matches!(op.kind, OpKind::Record { .. } | OpKind::Wait { .. }) {
            let mut phases = self
                .ctx
                .phase_seconds
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *phases.entry(op.phase).or_default() += start.elapsed().as_secs_f64();
        }
        Ok(())
    }

    fn event(&self, e: u32) -> Result<&Event, ExecError> {
        self.ctx
            .events
            .get(e as usize)
            .ok_or_else(|| ExecError::new(format!("event e{e} does not exist")))
    }

    fn me(&self) -> usize {
        self.ctx.rank % self.backend.geo.group
    }

    fn collective(&self, op: &Op, comm: &dyn Comm) -> Result<(), ExecError> {
        let OpKind::Collective {
            scope, send, recv, ..
        } = op.kind
        else {
            return Ok(());
        };
        let b = self.backend;
        if scope != CollectiveScope::EpGroup {
            return self.hierarchical(op, comm, scope, send, recv);
        }
        let group: Vec<usize> = (0..b.geo.group).collect();
        let plan = b.collective_plan(self.ctx, self.me(), op)?;
        // Token rows are counted as rows; metadata (counts, routing) as bytes.
        let send_buf = &b.plan.buffers[send as usize];
        let rows = match op.kind {
            OpKind::Collective {
                kind:
                    CollectiveKind::AllToAll | CollectiveKind::AllToAllV | CollectiveKind::AllToAllRank,
                ..
            } if !matches!(send_buf.dtype, DType::I32 | DType::U8) => {
                Some(RowLayout::of(send_buf)?.bytes_per_row())
            }
            _ => None,
        };
        // SAFETY: the plan's events order this collective after the ops that
        // write its send buffer and before those that read its receive buffer;
        // send and receive are distinct live buffers, so they do not overlap.
        let (data, dst) = unsafe {
            (
                self.ctx.arena.bytes(b.regions[send as usize]),
                self.ctx.arena.bytes_mut(b.regions[recv as usize]),
            )
        };
        self.exchange(
            comm,
            op,
            (0, rows),
            &group,
            (data, plan.to),
            (dst, plan.from),
        )
    }

    /// One exchange of this rank with the EP ranks `group` (EP indices; this
    /// rank among them): `out` is what it sends (bytes, runs per peer), `inc`
    /// where it receives. `part` numbers the exchanges of one op, with the
    /// bytes of one token row when they are rows (`None`: metadata), for the
    /// traffic count.
    #[allow(clippy::type_complexity)] // the two sides of an exchange, spelled out
    fn exchange(
        &self,
        comm: &dyn Comm,
        op: &Op,
        (part, row_bytes): (u8, Option<usize>),
        group: &[usize],
        out: (&[u8], Vec<Vec<Run>>),
        inc: (&mut [u8], Vec<Vec<Run>>),
    ) -> Result<(), ExecError> {
        let base = self.ctx.rank - self.me();
        let me = group
            .iter()
            .position(|&q| q == self.me())
            .ok_or_else(|| ExecError::new("internal: a rank outside its own group"))?;
        let global: Vec<usize> = group.iter().map(|q| base + q).collect();
        let sent: Vec<usize> = out
            .1
            .iter()
            .map(|runs| runs.iter().map(|r| r.len).sum())
            .collect();
        let tag = Tag {
            group: global[0],
            pass: self.pass,
            op: op.id,
            part,
        };
        comm.exchange(
            tag,
            &global,
            me,
            Outgoing {
                data: out.0,
                to: out.1,
            },
            Incoming {
                data: inc.0,
                from: inc.1,
            },
        )
        .map_err(|e| match e {
            CommError::Aborted(_) => ExecError::new(format!("aborted: {e}")),
            other => ExecError::new(other.to_string()),
        })?;
        self.count_traffic(op, &global, me, &sent, row_bytes);
        Ok(())
    }

    /// Adds what this rank sent to each peer of an exchange to its traffic.
    fn count_traffic(
        &self,
        op: &Op,
        global: &[usize],
        me: usize,
        sent: &[usize],
        row_bytes: Option<usize>,
    ) {
        let per_node = self.backend.plan.mesh.gpus_per_node as usize;
        let mut traffic = self.ctx.traffic.lock().unwrap_or_else(|p| p.into_inner());
        for (&peer, &bytes) in global.iter().zip(sent).filter(|(_, &b)| b > 0) {
            let link = LinkClass::between(global[me], peer, per_node);
            let moved = traffic.entry((op.name.clone(), link)).or_default();
            moved.add(Moved {
                rows: row_bytes.map_or(0, |r| (bytes / r.max(1)) as u64),
                bytes: bytes as u64,
                messages: 1,
            });
        }
    }

    /// One leg of the hierarchical all-to-all (see `hier.rs`).
    fn hierarchical(
        &self,
        op: &Op,
        comm: &dyn Comm,
        scope: CollectiveScope,
        send: u32,
        recv: u32,
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let topo = b
            .topo
            .ok_or_else(|| ExecError::new("internal: a hierarchical leg without a topology"))?;
        let me = self.me();
        let table = self.chunk_table(op.chunk)?;
        let table = table.get();
        let (send_buf, recv_buf) = (
            &b.plan.buffers[send as usize],
            &b.plan.buffers[recv as usize],
        );
        let (send_rows, recv_rows) = (RowLayout::of(send_buf)?, RowLayout::of(recv_buf)?);
        let runs = |layout: &RowLayout, rows: &[Range<usize>], name: &str| layout.runs(rows, name);
        let dispatch = op.phase != Phase::Combine;
        let by_rank = is_by_rank(op);
        let (group, to, from) = match (dispatch, scope) {
            (true, CollectiveScope::InterNode) => {
                return self.dispatch_inter(op, comm, topo, send, recv);
            }
            (false, CollectiveScope::IntraNode) if by_rank => {
                return self.combine_intra_reduce(op, comm, topo, send, recv);
            }
            (false, _) if by_rank => {
                return self.combine_inter_by_rank(op, comm, topo, send, recv);
            }
            (true, _) => {
                let staged = self
                    .ctx
                    .staged
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&send)
                    .cloned()
                    .ok_or_else(|| {
                        ExecError::new(
                            "the intra-node leg runs before the inter-node leg staged its rows",
                        )
                    })?;
                let to = staged.sends(topo.per_node);
                let from = if by_rank {
                    hier::dispatch_intra_recv(&topo, &ByRankBlocks(table), me)
                } else {
                    hier::dispatch_intra_recv(&topo, table, me)
                };
                (topo.within(me), to, from)
            }
            (false, CollectiveScope::IntraNode) => {
                let (to, from) = hier::combine_intra(&topo, table, me);
                (topo.within(me), to, from)
            }
            (false, _) => {
                let (to, from) = hier::combine_inter(&topo, table, me);
                let to = to.into_iter().map(|r| vec![r]).collect();
                let from = from.into_iter().map(|r| vec![r]).collect();
                (topo.across(me), to, from)
            }
        };
        let to = to
            .iter()
            .map(|rows| runs(&send_rows, rows, &send_buf.name))
            .collect::<Result<Vec<_>, _>>()?;
        let from = from
            .iter()
            .map(|rows| runs(&recv_rows, rows, &recv_buf.name))
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: as for the flat collective: the plan's events give this op
        // its two distinct buffers.
        let (data, dst) = unsafe {
            (
                self.ctx.arena.bytes(b.regions[send as usize]),
                self.ctx.arena.bytes_mut(b.regions[recv as usize]),
            )
        };
        let rows = Some(send_rows.bytes_per_row());
        self.exchange(comm, op, (0, rows), &group, (data, to), (dst, from))
    }

    /// The inter-node leg of the dispatch: sizes, then each token's routing,
    /// then the rows (one copy per token and destination node).
    fn dispatch_inter(
        &self,
        op: &Op,
        comm: &dyn Comm,
        topo: Topology,
        send: u32,
        recv: u32,
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let me = self.me();
        let chunk = op.chunk.unwrap_or(0) as usize;
        let placement = self.ctx.placement()?;
        let table = placement
            .tables
            .get(chunk)
            .ok_or_else(|| ExecError::new(format!("no routing table for chunk {chunk}")))?;
        let by_rank = is_by_rank(op);
        let out = if by_rank {
            let rank_slots = placement
                .by_rank
                .as_ref()
                .ok_or_else(|| ExecError::new("a by-rank leg without by-rank routing"))?;
            hier::dispatch_inter_send(
                &topo,
                &ByRankBlocks(table),
                me,
                &rank_slots.rank_slots,
                b.geo.group,
                b.geo.chunk_range(chunk),
            )
        } else {
            hier::dispatch_inter_send(
                &topo,
                table,
                me,
                &placement.slots,
                b.geo.top_k,
                b.geo.chunk_range(chunk),
            )
        }
        .map_err(ExecError::new)?;
        let group = topo.across(me);
        let nodes = topo.nodes;
        let runs_each = |sizes: &[usize]| -> Vec<Vec<Run>> {
            let mut at = 0;
            sizes
                .iter()
                .map(|&len| {
                    at += len;
                    vec![Run {
                        offset: at - len,
                        len,
                    }]
                })
                .collect()
        };
        // 1. How many rows and routing values each node sends this rank.
        let mut sizes = Vec::with_capacity(nodes * 16);
        for n in 0..nodes {
            sizes.extend_from_slice(&(out.rows[n].len() as u64).to_le_bytes());
            sizes.extend_from_slice(&(out.routing[n].len() as u64).to_le_bytes());
        }
        let mut got = vec![0u8; nodes * 16];
        self.exchange(
            comm,
            op,
            (1, None),
            &group,
            (&sizes, runs_each(&vec![16; nodes])),
            (&mut got, runs_each(&vec![16; nodes])),
        )?;
        let word = |i: usize| -> Result<usize, ExecError> {
            let mut w = [0u8; 8];
            w.copy_from_slice(&got[i * 8..i * 8 + 8]);
            usize::try_from(u64::from_le_bytes(w))
                .map_err(|_| ExecError::new("a peer announced an impossible size"))
        };
        let counts: Vec<usize> = (0..nodes).map(|m| word(2 * m)).collect::<Result<_, _>>()?;
        let lens: Vec<usize> = (0..nodes)
            .map(|m| word(2 * m + 1))
            .collect::<Result<_, _>>()?;
        // 2. The routing of every staged token.
        let routing_out: Vec<u8> = out
            .routing
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let out_lens: Vec<usize> = out.routing.iter().map(|r| r.len() * 4).collect();
        let in_lens: Vec<usize> = lens.iter().map(|l| l.saturating_mul(4)).collect();
        let mut routing_in = vec![0u8; in_lens.iter().sum()];
        self.exchange(
            comm,
            op,
            (2, None),
            &group,
            (&routing_out, runs_each(&out_lens)),
            (&mut routing_in, runs_each(&in_lens)),
        )?;
        let routing: Vec<u32> = routing_in
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let staged = Staged::decode(&counts, &routing, topo.per_node).map_err(ExecError::new)?;
        // 3. The rows, into `node_stage` by source node.
        let (send_buf, recv_buf) = (
            &b.plan.buffers[send as usize],
            &b.plan.buffers[recv as usize],
        );
        let (send_rows, recv_rows) = (RowLayout::of(send_buf)?, RowLayout::of(recv_buf)?);
        let to = out
            .rows
            .iter()
            .map(|rows| {
                let ranges: Vec<Range<usize>> = rows.iter().map(|&r| r..r + 1).collect();
                send_rows.runs(&ranges, &send_buf.name)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut at = 0;
        let from = counts
            .iter()
            .map(|&n| {
                at += n;
                recv_rows.runs(std::slice::from_ref(&(at - n..at)), &recv_buf.name)
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: as for the flat collective.
        let (data, dst) = unsafe {
            (
                self.ctx.arena.bytes(b.regions[send as usize]),
                self.ctx.arena.bytes_mut(b.regions[recv as usize]),
            )
        };
        let rows = Some(send_rows.bytes_per_row());
        self.exchange(comm, op, (3, rows), &group, (data, to), (dst, from))?;
        let staged = Arc::new(staged);
        if by_rank {
            // The reducing combine of this chunk sums by the same routing.
            self.ctx
                .rank_staged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(chunk as u64, Arc::clone(&staged));
        }
        self.ctx
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(recv, staged);
        Ok(())
    }

    /// The region of `buffer` an op of `chunk` touches: a whole-layer
    /// per-token buffer is cut to the chunk's tokens.
    fn region(&self, buffer: u32, chunk: Option<u64>) -> Result<(Region, &Buffer), ExecError> {
        let b = self.backend;
        let i = buffer as usize;
        let buf = b
            .plan
            .buffers
            .get(i)
            .ok_or_else(|| ExecError::new(format!("buffer b{i} does not exist")))?;
        let mut region = b.regions[i];
        if let Some(c) = buf.chunk_rows(chunk, b.geo.tokens as u64) {
            let range = b.geo.chunk_range(c as usize);
            let row_bytes = region.bytes / b.geo.tokens.max(1);
            region = Region {
                offset: region.offset + range.start * row_bytes,
                bytes: range.len() * row_bytes,
            };
        }
        Ok((region, buf))
    }

    /// A buffer as kernel arguments: one, or two for fp8 (data, scales).
    fn raw(&self, buffer: u32, chunk: Option<u64>) -> Result<Vec<RawArg>, ExecError> {
        let (region, buf) = self.region(buffer, chunk)?;
        let ptr = self.ctx.arena.ptr(region);
        if buf.dtype == DType::Fp8E4m3 {
            let layout = RowLayout::of(buf)?;
            let (base, per_row) = layout.scales.unwrap_or((0, 0));
            Ok(vec![
                RawArg::Buf {
                    ptr,
                    len: base as u64,
                },
                RawArg::Buf {
                    ptr: ptr.wrapping_add(base),
                    len: (layout.rows * per_row / 4) as u64,
                },
            ])
        } else {
            Ok(vec![RawArg::Buf {
                ptr,
                len: (region.bytes / buf.dtype.bytes() as usize) as u64,
            }])
        }
    }

    fn launch(
        &self,
        op: &Op,
        kernel: u32,
        inputs: &[u32],
        outputs: &[u32],
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let k = b
            .plan
            .kernels
            .get(kernel as usize)
            .ok_or_else(|| ExecError::new(format!("kernel k{kernel} does not exist")))?;
        if k.kind == KernelKind::Assign {
            return match constant(k, "pass")? {
                2 => self.assign_rank(op.chunk, outputs),
                3 => self.assign_expand(op.chunk, inputs, outputs),
                _ => self.assign(k, inputs, outputs),
            };
        }
        let Some(Some(jit)) = b.prepared.kernels.get(kernel as usize) else {
            return Err(ExecError::new(format!(
                "kernel `{}` was not compiled",
                k.name
            )));
        };
        let chunk = op.chunk;
        let input = |i: usize| {
            inputs
                .get(i)
                .copied()
                .ok_or_else(|| ExecError::new(format!("`{}` needs input {i}", k.name)))
        };
        let output = |i: usize| {
            outputs
                .get(i)
                .copied()
                .ok_or_else(|| ExecError::new(format!("`{}` needs output {i}", k.name)))
        };
        let binding = binding(k.kind, op.phase)
            .ok_or_else(|| ExecError::new(format!("`{}` cannot be launched", k.name)))?;
        let mut args: Vec<RawArg> = Vec::new();
        for arg in binding.args {
            match *arg {
                Arg::Input(i) => args.extend(self.raw(input(i)?, chunk)?),
                Arg::Output(i) => args.extend(self.raw(output(i)?, chunk)?),
                Arg::RouterBias => args.push(RawArg::Buf {
                    ptr: b.prepared.router_bias.as_ptr() as *mut u8,
                    len: b.prepared.router_bias.len() as u64,
                }),
                Arg::RouterScale => args.push(RawArg::F32(b.plan.layer.router.scale as f32)),
                Arg::SharedGate => args.push(RawArg::Buf {
                    ptr: b.prepared.shared_gate.as_ptr() as *mut u8,
                    len: b.prepared.shared_gate.len() as u64,
                }),
                Arg::ClampLimit => args.push(RawArg::F32(b.clamp_limit(op.phase == Phase::Shared))),
            }
        }
        let rows = match binding.rows {
            LaunchRows::ChunkTokens => match chunk {
                Some(c) => b.geo.chunk_range(c as usize).len(),
                None => b.geo.tokens,
            },
            LaunchRows::LayerTokens => b.geo.tokens,
            LaunchRows::Sent => self.chunk_table(chunk)?.get().sent(self.me()),
            LaunchRows::Received => self.chunk_table(chunk)?.get().received(self.me()),
            LaunchRows::ReceivedByRank => self.chunk_table(chunk)?.get().rank_received(self.me()),
            LaunchRows::WireSent => {
                let table = self.chunk_table(chunk)?;
                if b.geo.by_rank {
                    table.get().rank_sent(self.me())
                } else {
                    table.get().sent(self.me())
                }
            }
            LaunchRows::WireReceived => {
                let table = self.chunk_table(chunk)?;
                if b.geo.by_rank {
                    table.get().rank_received(self.me())
                } else {
                    table.get().received(self.me())
                }
            }
        };
        // SAFETY: every pointer comes from this rank's arena (a region checked
        // against the arena at load, `len` elements long) or from the
        // backend's weight vectors (read-only parameters). The plan's events
        // give this op exclusive use of the buffers it writes.
        unsafe { jit.launch_raw(&args, 0..rows as u64) }
            .map_err(|e| ExecError::new(format!("kernel `{}`: {e}", k.name)))
    }

    fn chunk_table(&self, chunk: Option<u64>) -> Result<ChunkTableRef, ExecError> {
        let placement = self.ctx.placement()?;
        let c = chunk.unwrap_or(0) as usize;
        if c >= placement.tables.len() {
            return Err(ExecError::new(format!("no routing table for chunk {c}")));
        }
        Ok(ChunkTableRef {
            placement,
            chunk: c,
        })
    }

    /// `assign_rank` (pass 2): this rank's by-rank send layout of the op's
    /// chunk, computed by `assign place`, into `rank_slots` (the chunk's
    /// tokens) and the chunk's metadata rows.
    fn assign_rank(&self, chunk: Option<u64>, outputs: &[u32]) -> Result<(), ExecError> {
        let (Some(&slots_buf), Some(&meta_buf)) = (outputs.first(), outputs.get(1)) else {
            return Err(ExecError::new("`assign_rank` lacks its buffers"));
        };
        let placement = self.ctx.placement()?;
        let by_rank = placement.by_rank.as_ref().ok_or_else(|| {
            ExecError::new("`assign_rank` in a plan that does not dispatch by rank")
        })?;
        let c = chunk.unwrap_or(0) as usize;
        let meta = by_rank
            .meta
            .get(c)
            .ok_or_else(|| ExecError::new(format!("no routing table for chunk {c}")))?;
        let g = self.backend.geo.group;
        let tokens = self.backend.geo.chunk_range(c);
        let rank_slots = &by_rank.rank_slots[tokens.start * g..tokens.end * g];
        let (slots_region, _) = self.region(slots_buf, chunk)?;
        let (meta_region, _) = self.region(meta_buf, chunk)?;
        // SAFETY: this op owns its outputs (plan events).
        let (dst_slots, dst_meta) = unsafe {
            (
                self.ctx.arena.bytes_mut(slots_region),
                self.ctx.arena.bytes_mut(meta_region),
            )
        };
        if dst_slots.len() < rank_slots.len() * 4 || dst_meta.len() < meta.len() * 4 {
            return Err(ExecError::new(
                "the by-rank routing buffers are too small for this routing",
            ));
        }
        memory::write_i32s(rank_slots, dst_slots);
        memory::write_i32s(meta, dst_meta);
        Ok(())
    }

    /// `assign_expand` (pass 3): where the received by-rank rows of the op's
    /// chunk go on the expert side, from their metadata.
    fn assign_expand(
        &self,
        chunk: Option<u64>,
        inputs: &[u32],
        outputs: &[u32],
    ) -> Result<(), ExecError> {
        let (Some(&meta_buf), Some(&index_buf), Some(&weights_buf)) =
            (inputs.first(), outputs.first(), outputs.get(1))
        else {
            return Err(ExecError::new("`assign_expand` lacks its buffers"));
        };
        let table = self.chunk_table(chunk)?;
        let (meta_region, _) = self.region(meta_buf, chunk)?;
        // SAFETY: the collective that filled the metadata finished before this op.
        let meta = unsafe { memory::read_i32s(self.ctx.arena.bytes(meta_region)) };
        let (index, weights) = expand_index(&self.backend.geo, table.get(), self.me(), &meta)
            .map_err(ExecError::new)?;
        let (index_region, _) = self.region(index_buf, chunk)?;
        let (weights_region, _) = self.region(weights_buf, chunk)?;
        // SAFETY: this op owns its outputs (plan events).
        let (dst_index, dst_weights) = unsafe {
            (
                self.ctx.arena.bytes_mut(index_region),
                self.ctx.arena.bytes_mut(weights_region),
            )
        };
        if dst_index.len() < index.len() * 4 || dst_weights.len() < weights.len() * 4 {
            return Err(ExecError::new(
                "the expansion buffers are smaller than the rows this rank received",
            ));
        }
        memory::write_i32s(&index, dst_index);
        memory::write_f32s(&weights, dst_weights);
        Ok(())
    }

    fn assign(
        &self,
        k: &crate::plan::Kernel,
        inputs: &[u32],
        outputs: &[u32],
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let pass = constant(k, "pass")?;
        let (Some(&ids), Some(&weights), Some(&out)) =
            (inputs.first(), inputs.get(1), outputs.first())
        else {
            return Err(ExecError::new(format!("`{}` lacks its buffers", k.name)));
        };
        // SAFETY: the routing buffers were written by the router before this
        // op (events or stream order); nothing writes them concurrently.
        let (ids, weights) = unsafe {
            (
                memory::read_i32s(self.ctx.arena.bytes(b.regions[ids as usize])),
                memory::read_f32s(self.ctx.arena.bytes(b.regions[weights as usize])),
            )
        };
        let routing = Routing {
            ids: &ids,
            weights: &weights,
        };
        if pass == 0 {
            let meta = assign_count(&b.geo, self.me(), &routing).map_err(ExecError::new)?;
            // SAFETY: this op owns its output buffer (plan events).
            let dst = unsafe { self.ctx.arena.bytes_mut(b.regions[out as usize]) };
            if dst.len() < meta.len() * 4 {
                return Err(ExecError::new(
                    "the assignment metadata buffer is too small",
                ));
            }
            memory::write_i32s(&meta, dst);
            return Ok(());
        }
        let meta_buf = inputs
            .get(2)
            .copied()
            .ok_or_else(|| ExecError::new(format!("`{}` lacks its metadata input", k.name)))?;
        // SAFETY: the exchange that filled the metadata finished before this op.
        let meta_all =
            unsafe { memory::read_i32s(self.ctx.arena.bytes(b.regions[meta_buf as usize])) };
        let placement =
            assign_place(&b.geo, self.me(), &routing, &meta_all).map_err(ExecError::new)?;
        // SAFETY: this op owns its outputs (plan events).
        let dst = unsafe { self.ctx.arena.bytes_mut(b.regions[out as usize]) };
        if dst.len() < placement.slots.len() * 4 {
            return Err(ExecError::new("the slots buffer is too small"));
        }
        memory::write_i32s(&placement.slots, dst);
        // Every rank of the group derives the same tables from the exchanged
        // counts, so all of them find an overflow here and stop together,
        // before any row moves; the host grows the buffers and re-runs.
        let need = placement.row_need();
        let overflow = b.plan.overflows(need);
        if let Some(&flag) = outputs.get(1) {
            // SAFETY: as above.
            let f = unsafe { self.ctx.arena.bytes_mut(b.regions[flag as usize]) };
            if let Some(first) = f.first_mut() {
                *first = u8::from(overflow.is_some());
            }
        }
        if let Some(need) = overflow {
            *self.ctx.overflow.lock().unwrap_or_else(|p| p.into_inner()) = Some(need);
            let have = b.plan.row_bounds();
            return Err(ExecError::new(format!(
                "the routing needs {} expert rows ({} by-rank rows) of one rank in a chunk, \
                 the buffers hold {} ({}): overflow",
                need.expert_rows, need.rank_rows, have.expert_rows, have.rank_rows
            )));
        }
        *self.ctx.placement.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(placement));
        *self.ctx.routing.lock().unwrap_or_else(|p| p.into_inner()) = Some((ids, weights));
        Ok(())
    }

    fn gemm(
        &self,
        op: &Op,
        weight: GemmWeight,
        (a, c): (u32, u32),
        epilogue: Epilogue,
        by_rank: Option<RankIndex>,
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let (a_region, a_buf) = self.region(a, op.chunk)?;
        let (c_region, c_buf) = self.region(c, op.chunk)?;
        let expansion = match by_rank {
            Some(r) => Some(self.expansion(op.chunk, r)?),
            None => None,
        };
        // The up projection reads its expert rows through the index: the
        // by-rank row each expert row is a copy of.
        let gather = match (&expansion, weight) {
            (Some(x), GemmWeight::ExpertUp) => Some(self.expert_sources(x)?),
            _ => None,
        };
        // The down projection sums through it: its product, every expert
        // row of the chunk in `f32`, is kept for the reducing epilogue.
        let reduce = matches!(weight, GemmWeight::ExpertDown) && expansion.is_some();
        let mut product: Vec<f32> = Vec::new();
        let threads = b.options.gemm_threads;
        let (groups, k, n) = self.gemm_groups(op, weight, a_region, a_buf)?;
        let out_cols = if epilogue == Epilogue::Activation {
            let width = match weight {
                GemmWeight::SharedUp => b.prepared.shared.as_ref().map_or(0, |f| f.width),
                _ => b.prepared.experts.first().map_or(0, |f| f.width),
            };
            width
        } else {
            n
        };
        let c_elem = c_buf.dtype.bytes() as usize;
        let mut a_f32: Vec<f32> = Vec::new();
        let mut c_f32: Vec<f32> = Vec::new();
        for (rows, w, bias, n) in groups {
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            if reduce {
                product.resize(product.len().max(rows.end * n), 0.0);
                let a_in = self.gemm_input(a_region, a_buf, &rows, k, &mut a_f32)?;
                let out = &mut product[rows.start * n..rows.end * n];
                matmul_wt(a_in, w, bias, out, m, n, k, threads).map_err(ExecError::new)?;
                continue;
            }
            let c_bytes = Region {
                offset: c_region.offset + rows.start * out_cols * c_elem,
                bytes: m * out_cols * c_elem,
            };
            if c_bytes.offset + c_bytes.bytes > c_region.offset + c_region.bytes {
                return Err(ExecError::new(format!(
                    "GEMM rows {}..{} fall outside `{}`",
                    rows.start, rows.end, c_buf.name
                )));
            }
            let a_in: &[f32] = match &gather {
                Some(sources) => {
                    let src = sources.get(rows.clone()).ok_or_else(|| {
                        ExecError::new(format!(
                            "GEMM rows {}..{} lie beyond the expansion index",
                            rows.start, rows.end
                        ))
                    })?;
                    self.gathered_input(a_region, a_buf, src, k, &mut a_f32)?
                }
                None => self.gemm_input(a_region, a_buf, &rows, k, &mut a_f32)?,
            };
            // SAFETY: the plan's events give this op the output to write; it
            // is a live buffer distinct from the input.
            let c_raw = unsafe { self.ctx.arena.bytes_mut(c_bytes) };
            if epilogue == Epilogue::None && c_buf.dtype == DType::F32 {
                if let Some(c_out) = memory::as_f32s_mut(c_raw) {
                    matmul_wt(a_in, w, bias, c_out, m, n, k, threads).map_err(ExecError::new)?;
                    continue;
                }
            }
            c_f32.resize(m * n, 0.0);
            matmul_wt(a_in, w, bias, &mut c_f32, m, n, k, threads).map_err(ExecError::new)?;
            match epilogue {
                Epilogue::None => memory::write_f32(&c_f32, c_buf.dtype, c_raw),
                Epilogue::Activation => {
                    self.activation_epilogue(weight, &mut c_f32, (c_raw, m * out_cols), m)?
                }
            }
        }
        if let (true, Some(x)) = (reduce, &expansion) {
            self.reduce_epilogue(x, &mut product, n, c_region)?;
        }
        Ok(())
    }

    /// The row groups of a GEMM (rows of `a` and `c`, weights, bias, `n`)
    /// with its `k` and `n`: one group, or one per local expert from the
    /// chunk's routing table.
    fn gemm_groups(
        &self,
        op: &Op,
        weight: GemmWeight,
        a_region: Region,
        a_buf: &Buffer,
    ) -> Result<(Vec<GemmGroup<'_>>, usize, usize), ExecError> {
        let b = self.backend;
        let h = b.plan.layer.hidden as usize;
        let mut groups: Vec<GemmGroup<'_>> = Vec::new();
        let (k, n);
        match weight {
            GemmWeight::RouterGate => {
                k = h;
                n = b.geo.experts;
                let rows = a_region.bytes / (k * a_buf.dtype.bytes() as usize).max(1);
                groups.push((
                    0..rows,
                    &b.prepared.router,
                    b.prepared.router_logit_bias.as_deref(),
                    n,
                ));
            }
            GemmWeight::SharedUp | GemmWeight::SharedDown => {
                let ffn =
                    b.prepared.shared.as_ref().ok_or_else(|| {
                        ExecError::new("a shared-expert GEMM without shared weights")
                    })?;
                let rows = b.geo.tokens;
                if weight == GemmWeight::SharedUp {
                    k = h;
                    n = ffn.up_rows;
                    groups.push((0..rows, &ffn.up, ffn.up_bias.as_deref(), n));
                } else {
                    k = ffn.width;
                    n = h;
                    groups.push((0..rows, &ffn.down, ffn.down_bias.as_deref(), n));
                }
            }
            GemmWeight::ExpertUp | GemmWeight::ExpertDown => {
                let table = self.chunk_table(op.chunk)?;
                let me = self.me();
                let local = &b.geo.experts_of[me];
                let first = local
                    .first()
                    .and_then(|&e| b.prepared.experts.get(e))
                    .ok_or_else(|| ExecError::new("this rank holds no experts"))?;
                if weight == GemmWeight::ExpertUp {
                    k = h;
                    n = first.up_rows;
                } else {
                    k = first.width;
                    n = h;
                }
                for (l, &e) in local.iter().enumerate() {
                    let ffn = &b.prepared.experts[e];
                    let t = table.get();
                    let start = t.expert_start(me, l);
                    let range = start..start + t.expert_rows(me, l);
                    if weight == GemmWeight::ExpertUp {
                        groups.push((range, &ffn.up, ffn.up_bias.as_deref(), n));
                    } else {
                        groups.push((range, &ffn.down, ffn.down_bias.as_deref(), n));
                    }
                }
            }
        }
        Ok((groups, k, n))
    }

    /// The activation epilogue of `m` rows: the compiled activation over the
    /// `f32` product into the output's dtype.
    fn activation_epilogue(
        &self,
        weight: GemmWeight,
        product: &mut [f32],
        (out, out_len): (&mut [u8], usize),
        m: usize,
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let jit = match weight {
            GemmWeight::SharedUp => b.prepared.shared_epilogue.as_ref(),
            _ => b.prepared.expert_epilogue.as_ref(),
        }
        .ok_or_else(|| ExecError::new("no epilogue kernel was compiled"))?;
        let limit = b.clamp_limit(weight == GemmWeight::SharedUp);
        let args = [
            RawArg::Buf {
                ptr: product.as_mut_ptr().cast(),
                len: product.len() as u64,
            },
            RawArg::Buf {
                ptr: out.as_mut_ptr(),
                len: out_len as u64,
            },
            RawArg::F32(limit),
        ];
        // SAFETY: both buffers are live Rust slices of the stated lengths
        // owned by this op for its duration.
        unsafe { jit.launch_raw(&args, 0..m as u64) }
            .map_err(|e| ExecError::new(format!("activation epilogue: {e}")))
    }

    /// Rows `rows` of a GEMM input: `f32` in place, other dtypes widened
    /// into `scratch` (the GEMM accumulates in `f32` either way).
    fn gemm_input<'s>(
        &'s self,
        region: Region,
        buf: &Buffer,
        rows: &Range<usize>,
        k: usize,
        scratch: &'s mut Vec<f32>,
    ) -> Result<&'s [f32], ExecError> {
        let elem = buf.dtype.bytes() as usize;
        let part = Region {
            offset: region.offset + rows.start * k * elem,
            bytes: rows.len() * k * elem,
        };
        if part.offset + part.bytes > region.offset + region.bytes {
            return Err(ExecError::new(format!(
                "GEMM rows {}..{} fall outside `{}`",
                rows.start, rows.end, buf.name
            )));
        }
        // SAFETY: the plan's events give this op its input to read; nothing
        // writes it concurrently.
        let raw = unsafe { self.ctx.arena.bytes(part) };
        if let (DType::F32, Some(a)) = (buf.dtype, memory::as_f32s(raw)) {
            return Ok(a);
        }
        scratch.resize(rows.len() * k, 0.0);
        memory::read_f32(raw, buf.dtype, scratch);
        Ok(scratch)
    }

    /// A GEMM input read through the expansion index: row `i` is by-rank row
    /// `sources[i]` of `buf`, widened to `f32` into `scratch` (a copy is
    /// exact, so this is the unfused expansion's input bit for bit).
    fn gathered_input<'s>(
        &self,
        region: Region,
        buf: &Buffer,
        sources: &[usize],
        k: usize,
        scratch: &'s mut Vec<f32>,
    ) -> Result<&'s [f32], ExecError> {
        let row = k * buf.dtype.bytes() as usize;
        // SAFETY: as in `gemm_input`.
        let raw = unsafe { self.ctx.arena.bytes(region) };
        scratch.resize(sources.len() * k, 0.0);
        for (out, &src) in scratch.chunks_exact_mut(k.max(1)).zip(sources) {
            let from = raw.get(src * row..(src + 1) * row).ok_or_else(|| {
                ExecError::new(format!(
                    "the expansion index points at by-rank row {src}, beyond `{}`",
                    buf.name
                ))
            })?;
            memory::read_f32(from, buf.dtype, out);
        }
        Ok(scratch)
    }

    /// The expansion index of the op's chunk, read for a fused GEMM.
    fn expansion(&self, chunk: Option<u64>, r: RankIndex) -> Result<Expansion, ExecError> {
        let table = self.chunk_table(chunk)?;
        let me = self.me();
        let t = table.get();
        let received = t.rank_received(me);
        let locals = self.backend.geo.experts_of.get(me).map_or(0, Vec::len);
        let expert_rows = (0..locals)
            .map(|l| t.expert_start(me, l) + t.expert_rows(me, l))
            .max()
            .unwrap_or(0);
        let (index_region, _) = self.region(r.index, chunk)?;
        let (weights_region, _) = self.region(r.weights, chunk)?;
        let k = self.backend.geo.top_k;
        if index_region.bytes.min(weights_region.bytes) < received * k * 4 {
            return Err(ExecError::new(
                "the expansion index is smaller than the rows this rank received",
            ));
        }
        Ok(Expansion {
            weights_region,
            index_region,
            received,
            expert_rows,
            top_k: k,
        })
    }

    /// The by-rank row each expert row copies: every expert row must be the
    /// pick of exactly one received row, or the index is corrupt.
    fn expert_sources(&self, x: &Expansion) -> Result<Vec<usize>, ExecError> {
        // SAFETY: `assign_expand` wrote the index before this op (plan events).
        let index = unsafe { memory::read_i32s(self.ctx.arena.bytes(x.index_region)) };
        let mut src = vec![usize::MAX; x.expert_rows];
        for (i, &e) in index.iter().take(x.received * x.top_k).enumerate() {
            if e < 0 {
                continue;
            }
            match src.get_mut(e as usize) {
                Some(s) if *s == usize::MAX => *s = i / x.top_k,
                _ => {
                    return Err(ExecError::new(format!(
                        "corrupt expansion index: expert row {e} is named twice or lies beyond the {} expert rows",
                        x.expert_rows
                    )))
                }
            }
        }
        if let Some(row) = src.iter().position(|&s| s == usize::MAX) {
            return Err(ExecError::new(format!(
                "corrupt expansion index: expert row {row} has no received row"
            )));
        }
        Ok(src)
    }

    /// The down projection's reducing epilogue: the `f32` product of every
    /// expert row summed per received by-rank row into `c`, by the same
    /// library kernel the CUDA backend runs on its accumulator.
    fn reduce_epilogue(
        &self,
        x: &Expansion,
        product: &mut [f32],
        n: usize,
        c_region: Region,
    ) -> Result<(), ExecError> {
        let jit = self
            .backend
            .prepared
            .rank_reduce
            .as_ref()
            .ok_or_else(|| ExecError::new("no reducing epilogue was compiled"))?;
        if product.len() < x.expert_rows * n {
            return Err(ExecError::new(
                "the expansion index names expert rows the GEMM did not compute",
            ));
        }
        let rows = x.received;
        let out_bytes = c_region
            .bytes
            .min(rows * n * self.backend.plan.layer.dtype.bytes() as usize);
        // SAFETY: the plan's events give this op its output and the index
        // (written by `assign_expand`) to read; the product is this op's own.
        let (index, weights, out) = unsafe {
            (
                self.ctx.arena.bytes(x.index_region),
                self.ctx.arena.bytes(x.weights_region),
                self.ctx.arena.bytes_mut(Region {
                    offset: c_region.offset,
                    bytes: out_bytes,
                }),
            )
        };
        let k = x.top_k as u64;
        let args = [
            RawArg::Buf {
                ptr: product.as_mut_ptr().cast(),
                len: product.len() as u64,
            },
            RawArg::Buf {
                ptr: index.as_ptr().cast_mut(),
                len: rows as u64 * k,
            },
            RawArg::Buf {
                ptr: weights.as_ptr().cast_mut(),
                len: rows as u64 * k,
            },
            RawArg::Buf {
                ptr: out.as_mut_ptr(),
                len: (out_bytes / self.backend.plan.layer.dtype.bytes().max(1) as usize) as u64,
            },
        ];
        // SAFETY: every buffer is a live slice of the stated length, the
        // kernel only reads the first three, and this op owns the output.
        unsafe { jit.launch_raw(&args, 0..rows as u64) }
            .map_err(|e| ExecError::new(format!("reducing epilogue: {e}")))
    }
}

/// Where a chunk's expansion index lies, as a fused GEMM reads it.
struct Expansion {
    /// `[received, top_k]` i32: the expert row of every pick of every
    /// received by-rank row, or `-1`.
    index_region: Region,
    weights_region: Region,
    received: usize,
    /// The expert rows of this rank in the chunk.
    expert_rows: usize,
    top_k: usize,
}

/// A collective that moves one row per (token, destination rank).
fn is_by_rank(op: &Op) -> bool {
    matches!(
        op.kind,
        OpKind::Collective {
            kind: CollectiveKind::AllToAllRank,
            ..
        }
    )
}

/// The constant `name` of kernel `k`.
fn constant(k: &crate::plan::Kernel, name: &str) -> Result<i64, ExecError> {
    k.constants
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .ok_or_else(|| ExecError::new(format!("`{}` has no `{name}` constant", k.name)))
}

/// A chunk's routing table, kept alive with its placement.
struct ChunkTableRef {
    placement: Arc<Placement>,
    chunk: usize,
}

impl ChunkTableRef {
    fn get(&self) -> &ChunkTable {
        &self.placement.tables[self.chunk]
    }
}
