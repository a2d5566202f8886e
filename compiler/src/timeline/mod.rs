//! The timeline simulator: plays a [`Plan`] on one rank and says where the time goes.
//!
//! A plan is SPMD and the cost model assumes uniform routing, so every rank has
//! the same timeline; simulating one rank is simulating the layer. [`simulate`]
//! is a discrete-event list scheduler:
//!
//! * every op lasts its [`Op::estimate_us`](moec_runtime::plan::Op::estimate_us); `Record` and `Wait` last nothing and
//!   produce no [`Span`];
//! * a rank has three resources: **compute** (the SMs), held by every `Launch`
//!   and `Gemm`, and its two links, **NVLink** (the node's links) and the
//!   **network** (the inter-node NIC). A collective holds the links its scope
//!   crosses: the intra-node leg of a hierarchical all-to-all the node's
//!   links, the inter-node leg the network, a collective over the whole EP
//!   group both (its cost is the slower of its two legs, run at once). An op
//!   holds its resources for its whole duration, so kernels on two compute
//!   streams serialise, a collective overlaps with compute, and the two legs
//!   of different chunks overlap each other when the plan puts them on
//!   different streams;
//! * an op starts when the previous op of its stream has finished, the waits
//!   before it are satisfied and its resource is free; among ops that could
//!   start on a resource at the same moment, the lowest op id goes first;
//! * a `Record` marks its event at the time every earlier op of its stream has
//!   finished; a `Wait` completes at the later of its stream's ready time and the
//!   time of the record it waits for. As in CUDA, a wait refers to the latest
//!   record of its event that comes before it in op-id order (ids follow one
//!   valid sequential order of the plan).
//!
//! A plan that cannot complete (a wait on an event nobody records, a cycle of
//! waits) is an error that names the stuck streams; the simulator never loops
//! and never panics.
//!
//! [`trace`] writes the result as a Chrome/Perfetto trace, [`svg`] as a Gantt
//! chart.

pub mod svg;
pub mod trace;

use moec_runtime::plan::{CollectiveScope, OpKind, Phase, Plan, StreamRole};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// One op that ran: a bar of the timeline.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub op_id: u32,
    /// Index of the stream in [`Plan::streams`].
    pub stream: usize,
    pub name: String,
    pub phase: Phase,
    pub chunk: Option<u64>,
    pub start_us: f64,
    pub end_us: f64,
}

impl Span {
    pub fn duration_us(&self) -> f64 {
        self.end_us - self.start_us
    }
}

/// Whether a [`SyncPoint`] records or waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncKind {
    Record,
    Wait,
}

/// When a `Record` or `Wait` op took effect (they take no time and have no span).
#[derive(Clone, Debug, PartialEq)]
pub struct SyncPoint {
    pub op_id: u32,
    pub stream: usize,
    pub event: u32,
    pub kind: SyncKind,
    pub time_us: f64,
}

/// Where one phase's time went.
///
/// `time_us` is busy time: the sum of the durations of the phase's ops, each
/// counted in full even when it overlaps with others. `exposed_us` is the part
/// of the wall time attributed to this phase (see [`Timeline`] for the rule):
/// the exposed times of all phases plus [`Timeline::idle_us`] add up to
/// [`Timeline::total_us`].
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseSummary {
    pub phase: Phase,
    pub time_us: f64,
    /// Bytes one rank sends in the phase's collectives (`bytes_sent`); 0 for
    /// phases without collectives.
    pub bytes: u64,
    pub exposed_us: f64,
    /// Wall time from the start of the phase's first op to the end of its
    /// last: for a pipelined all-to-all, the time from the first row leaving
    /// to the last arriving, legs and chunks overlapped.
    pub span_us: f64,
}

/// The simulated timeline of one rank.
///
/// **Exposed time.** Every instant of `[0, total_us)` is attributed to exactly
/// one phase: among the phases with an op running at that instant, the one of
/// highest priority, where compute phases outrank communication phases. The
/// priority, highest first, is [`EXPOSURE_PRIORITY`]: experts, shared, router,
/// permute, unpermute, output, then combine, dispatch. An instant where nothing
/// runs is idle. So the exposed time of dispatch is the time a dispatch
/// collective runs while no compute runs (and no combine): the communication
/// that overlap failed to hide. The exposed times of all phases plus the idle
/// time equal `total_us`.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    /// End of the last op.
    pub total_us: f64,
    /// One span per op that takes time (not `Record`/`Wait`), in the order they
    /// were started.
    pub spans: Vec<Span>,
    /// When each `Record` and `Wait` took effect, in the order they did.
    pub syncs: Vec<SyncPoint>,
    /// In [`Phase::ALL`] order, only phases that have at least one span.
    pub phases: Vec<PhaseSummary>,
    pub stream_names: Vec<String>,
    pub stream_roles: Vec<StreamRole>,
}

/// Phases by exposure priority, highest first: an instant where several phases
/// run is charged to the first of them in this list.
pub const EXPOSURE_PRIORITY: [Phase; 8] = [
    Phase::Experts,
    Phase::Shared,
    Phase::Router,
    Phase::Permute,
    Phase::Unpermute,
    Phase::Output,
    Phase::Combine,
    Phase::Dispatch,
];

/// The resources of one rank: the SMs, the node's links, the network.
const RESOURCES: usize = 3;
const COMPUTE: usize = 0;
const INTRA_LINK: usize = 1;
const INTER_LINK: usize = 2;

/// The resources an op holds (none for `Record` and `Wait`).
fn resources(kind: &OpKind) -> &'static [usize] {
    match kind {
        OpKind::Collective { scope, .. } => match scope {
            CollectiveScope::IntraNode => &[INTRA_LINK],
            CollectiveScope::InterNode => &[INTER_LINK],
            CollectiveScope::EpGroup => &[INTRA_LINK, INTER_LINK],
        },
        OpKind::Record { .. } | OpKind::Wait { .. } => &[],
        // Launches and GEMMs (and any other kernel) run on the SMs.
        _ => &[COMPUTE],
    }
}

/// Runs the plan's streams on one rank under the cost model's estimates.
///
/// Errors when the plan refers to an event outside `0..plan.events`, has two
/// ops with one id, an estimate that is negative or not finite, a wait with no
/// earlier record of its event, or cannot complete (a cycle of waits); the
/// message names the stuck streams.
pub fn simulate(plan: &Plan) -> Result<Timeline, String> {
    let streams = &plan.streams;

    // Check the ops and index the records of each event by op id.
    let mut seen_ids: BTreeMap<u32, usize> = BTreeMap::new();
    let mut records_of_event: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut op_count = 0usize;
    for (s, op) in plan.ops() {
        op_count += 1;
        if let Some(other) = seen_ids.insert(op.id, s) {
            return Err(format!(
                "op id {} is used twice (streams '{}' and '{}')",
                op.id,
                stream_name(plan, other),
                stream_name(plan, s)
            ));
        }
        match op.kind {
            OpKind::Record { event } | OpKind::Wait { event } => {
                if event >= plan.events {
                    return Err(format!(
                        "op {} '{}' on stream '{}' refers to event {event}, but the plan has {} events",
                        op.id,
                        op.name,
                        stream_name(plan, s),
                        plan.events
                    ));
                }
                if matches!(op.kind, OpKind::Record { .. }) {
                    records_of_event.entry(event).or_default().push(op.id);
                }
            }
            _ => {
                if !op.estimate_us.is_finite() || op.estimate_us < 0.0 {
                    return Err(format!(
                        "op {} '{}' on stream '{}' has estimate {} us; estimates must be finite and not negative",
                        op.id,
                        op.name,
                        stream_name(plan, s),
                        op.estimate_us
                    ));
                }
            }
        }
    }
    // Each wait refers to the latest record of its event with a smaller op id.
    let mut wait_target: BTreeMap<u32, u32> = BTreeMap::new();
    for (s, op) in plan.ops() {
        if let OpKind::Wait { event } = op.kind {
            let target = records_of_event
                .get(&event)
                .and_then(|ids| ids.iter().copied().filter(|&r| r < op.id).max());
            match target {
                Some(r) => {
                    wait_target.insert(op.id, r);
                }
                None => {
                    return Err(format!(
                        "op {} '{}' on stream '{}' waits for event {event}, which no op records before it (in op id order)",
                        op.id,
                        op.name,
                        stream_name(plan, s)
                    ))
                }
            }
        }
    }

    let mut pc = vec![0usize; streams.len()];
    let mut ready = vec![0.0f64; streams.len()];
    let mut free = [0.0f64; RESOURCES];
    let mut recorded: BTreeMap<u32, f64> = BTreeMap::new();
    let mut spans: Vec<Span> = Vec::with_capacity(op_count);
    let mut syncs: Vec<SyncPoint> = Vec::new();

    loop {
        // Take every Record and every satisfied Wait at the head of a stream.
        let mut progressed = true;
        while progressed {
            progressed = false;
            for (s, stream) in streams.iter().enumerate() {
                while let Some(op) = stream.ops.get(pc[s]) {
                    match op.kind {
                        OpKind::Record { event } => {
                            recorded.insert(op.id, ready[s]);
                            syncs.push(SyncPoint {
                                op_id: op.id,
                                stream: s,
                                event,
                                kind: SyncKind::Record,
                                time_us: ready[s],
                            });
                        }
                        OpKind::Wait { event } => {
                            let at = wait_target.get(&op.id).and_then(|r| recorded.get(r));
                            match at {
                                Some(&t) => {
                                    ready[s] = ready[s].max(t);
                                    syncs.push(SyncPoint {
                                        op_id: op.id,
                                        stream: s,
                                        event,
                                        kind: SyncKind::Wait,
                                        time_us: ready[s],
                                    });
                                }
                                None => break,
                            }
                        }
                        _ => break,
                    }
                    pc[s] += 1;
                    progressed = true;
                }
            }
        }

        // Of the ops at the head of a stream that need a resource, start the
        // one that can start first; ties go to the lowest op id.
        let mut best: Option<(f64, u32, usize, &'static [usize])> = None;
        for (s, stream) in streams.iter().enumerate() {
            let Some(op) = stream.ops.get(pc[s]) else {
                continue;
            };
            let resource = resources(&op.kind);
            if resource.is_empty() {
                continue;
            }
            let start = resource.iter().fold(ready[s], |t, &r| t.max(free[r]));
            let better = match best {
                None => true,
                Some((b_start, b_id, _, _)) => {
                    if same_moment(start, b_start) {
                        op.id < b_id
                    } else {
                        start < b_start
                    }
                }
            };
            if better {
                best = Some((start, op.id, s, resource));
            }
        }

        let Some((start, _, s, resource)) = best else {
            break;
        };
        let Some(op) = streams[s].ops.get(pc[s]) else {
            return Err(format!(
                "internal error: stream '{}' has no op {}",
                stream_name(plan, s),
                pc[s]
            ));
        };
        let end = start + op.estimate_us;
        for &r in resource {
            free[r] = end;
        }
        ready[s] = end;
        pc[s] += 1;
        spans.push(Span {
            op_id: op.id,
            stream: s,
            name: op.name.clone(),
            phase: op.phase,
            chunk: op.chunk,
            start_us: start,
            end_us: end,
        });
    }

    // Every stream must have run to its end.
    let stuck: Vec<String> = streams
        .iter()
        .enumerate()
        .filter_map(|(s, stream)| {
            let op = stream.ops.get(pc[s])?;
            let why = match op.kind {
                OpKind::Wait { event } => {
                    let by = wait_target
                        .get(&op.id)
                        .and_then(|r| seen_ids.get(r).map(|&rs| (*r, rs)));
                    match by {
                        Some((r, rs)) => format!(
                            "waits for event {event}, recorded by op {r} on stream '{}', which never gets there",
                            stream_name(plan, rs)
                        ),
                        None => format!("waits for event {event}"),
                    }
                }
                _ => "cannot start".to_string(),
            };
            Some(format!(
                "stream '{}' is stuck at op {} '{}' ({} of {} ops ran): it {why}",
                stream.name,
                op.id,
                op.name,
                pc[s],
                stream.ops.len()
            ))
        })
        .collect();
    if !stuck.is_empty() {
        return Err(format!(
            "the plan cannot complete (a cycle of waits): {}",
            stuck.join("; ")
        ));
    }

    let total_us = ready.iter().copied().fold(0.0f64, f64::max);
    let phases = summarise(plan, &spans);
    Ok(Timeline {
        total_us,
        spans,
        syncs,
        phases,
        stream_names: streams.iter().map(|s| s.name.clone()).collect(),
        stream_roles: streams.iter().map(|s| s.role).collect(),
    })
}

/// Two start times within a relative 1e-9 of each other are the same moment
/// (sums along different paths may differ in the last bits).
fn same_moment(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn stream_name(plan: &Plan, s: usize) -> &str {
    plan.streams
        .get(s)
        .map(|st| st.name.as_str())
        .unwrap_or("?")
}

fn phase_index(phase: Phase) -> usize {
    Phase::ALL
        .iter()
        .position(|&p| p == phase)
        .unwrap_or(Phase::ALL.len())
}

/// Exposed time per phase (indexed like [`Phase::ALL`]) by a sweep over the
/// span boundaries.
fn exposed_by_phase(spans: &[Span]) -> [f64; 8] {
    let mut exposed = [0.0f64; 8];
    // (time, +1 start / -1 end, phase index)
    let mut edges: Vec<(f64, i32, usize)> = Vec::with_capacity(spans.len() * 2);
    for span in spans {
        if span.end_us > span.start_us {
            let p = phase_index(span.phase);
            edges.push((span.start_us, 1, p));
            edges.push((span.end_us, -1, p));
        }
    }
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut running = [0i64; 8];
    let mut i = 0;
    while i < edges.len() {
        let t = edges[i].0;
        while i < edges.len() && edges[i].0 == t {
            let (_, delta, p) = edges[i];
            if let Some(r) = running.get_mut(p) {
                *r += i64::from(delta);
            }
            i += 1;
        }
        let Some(&(next, _, _)) = edges.get(i) else {
            break;
        };
        let top = EXPOSURE_PRIORITY
            .iter()
            .map(|&p| phase_index(p))
            .find(|&p| running.get(p).is_some_and(|&n| n > 0));
        if let Some(slot) = top.and_then(|p| exposed.get_mut(p)) {
            *slot += next - t;
        }
    }
    exposed
}

fn summarise(plan: &Plan, spans: &[Span]) -> Vec<PhaseSummary> {
    let exposed = exposed_by_phase(spans);
    let mut bytes_of_op: BTreeMap<u32, u64> = BTreeMap::new();
    for (_, op) in plan.ops() {
        if let OpKind::Collective { bytes_sent, .. } = op.kind {
            bytes_of_op.insert(op.id, bytes_sent);
        }
    }
    Phase::ALL
        .iter()
        .enumerate()
        .filter_map(|(i, &phase)| {
            let of_phase: Vec<&Span> = spans.iter().filter(|s| s.phase == phase).collect();
            if of_phase.is_empty() {
                return None;
            }
            Some(PhaseSummary {
                phase,
                time_us: of_phase.iter().map(|s| s.duration_us()).sum(),
                bytes: of_phase
                    .iter()
                    .filter_map(|s| bytes_of_op.get(&s.op_id))
                    .fold(0u64, |a, &b| a.saturating_add(b)),
                exposed_us: exposed.get(i).copied().unwrap_or(0.0),
                span_us: of_phase.iter().map(|s| s.end_us).fold(0.0, f64::max)
                    - of_phase
                        .iter()
                        .map(|s| s.start_us)
                        .fold(f64::INFINITY, f64::min),
            })
        })
        .collect()
}

/// Rounds to 3 decimals (nanoseconds when the unit is microseconds), so
/// printed numbers are stable; never returns `-0`.
pub(crate) fn round3(x: f64) -> f64 {
    let r = (x * 1000.0).round() / 1000.0;
    if r == 0.0 {
        0.0
    } else {
        r
    }
}

pub(crate) use moec_runtime::plan::human_bytes;

impl Timeline {
    /// Time where no op runs: `total_us` minus the union of the spans.
    pub fn idle_us(&self) -> f64 {
        let mut intervals: Vec<(f64, f64)> = self
            .spans
            .iter()
            .filter(|s| s.end_us > s.start_us)
            .map(|s| (s.start_us, s.end_us))
            .collect();
        intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut covered = 0.0;
        let mut current: Option<(f64, f64)> = None;
        for (a, b) in intervals {
            current = match current {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    covered += cb - ca;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((ca, cb)) = current {
            covered += cb - ca;
        }
        (self.total_us - covered).max(0.0)
    }

    /// The summary of one phase, when it occurs.
    pub fn phase(&self, phase: Phase) -> Option<&PhaseSummary> {
        self.phases.iter().find(|p| p.phase == phase)
    }

    /// `{"total_us": .., "idle_us": .., "phases": [{"name", "time_us", "bytes",
    /// "exposed_us", "span_us"}, ..]}` with times rounded to 3 decimals.
    pub fn to_json(&self) -> Value {
        let phases: Vec<Value> = self
            .phases
            .iter()
            .map(|p| {
                json!({
                    "name": p.phase.name(),
                    "time_us": round3(p.time_us),
                    "bytes": p.bytes,
                    "exposed_us": round3(p.exposed_us),
                    "span_us": round3(p.span_us),
                })
            })
            .collect();
        json!({
            "total_us": round3(self.total_us),
            "idle_us": round3(self.idle_us()),
            "phases": phases,
        })
    }

    /// An aligned text table: one row per phase with its busy time, exposed
    /// time, bytes sent and share of the total (exposed / total), then the idle
    /// time and a total row.
    pub fn phase_table(&self) -> String {
        let share = |us: f64| {
            if self.total_us > 0.0 {
                format!("{:.1}%", 100.0 * us / self.total_us)
            } else {
                "-".to_string()
            }
        };
        let bytes = |b: u64| {
            if b == 0 {
                "-".to_string()
            } else {
                human_bytes(b)
            }
        };
        let mut rows: Vec<[String; 5]> = vec![[
            "phase".into(),
            "time us".into(),
            "exposed us".into(),
            "bytes".into(),
            "share".into(),
        ]];
        for p in &self.phases {
            rows.push([
                p.phase.name().into(),
                format!("{:.3}", p.time_us),
                format!("{:.3}", p.exposed_us),
                bytes(p.bytes),
                share(p.exposed_us),
            ]);
        }
        let idle = self.idle_us();
        rows.push([
            "idle".into(),
            String::new(),
            format!("{idle:.3}"),
            String::new(),
            share(idle),
        ]);
        let busy: f64 = self.phases.iter().map(|p| p.time_us).sum();
        let total_bytes = self
            .phases
            .iter()
            .fold(0u64, |a, p| a.saturating_add(p.bytes));
        rows.push([
            "total".into(),
            format!("{busy:.3}"),
            format!("{:.3}", self.total_us),
            bytes(total_bytes),
            share(self.total_us),
        ]);
        let mut widths = [0usize; 5];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = format!("{:<w$}", row[0], w = widths[0]);
            for (cell, w) in row.iter().zip(widths).skip(1) {
                line.push_str(&format!("  {cell:>w$}"));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A builder of small hand-made plans for the tests of this module and its
/// children.
#[cfg(test)]
pub(crate) mod test_plan {
    use moec_runtime::plan::*;

    pub struct Builder {
        plan: Plan,
        next_id: u32,
    }

    impl Builder {
        pub fn new() -> Builder {
            let plan = Plan {
                version: PLAN_FORMAT_VERSION,
                layer: LayerConfig {
                    name: "test <layer> & \"friends\"".into(),
                    hidden: 64,
                    dtype: DType::Bf16,
                    dispatch_dtype: DType::Bf16,
                    tokens_per_rank: 16,
                    experts: 4,
                    intermediate: 128,
                    ffn: Activation::Swiglu { limit: None },
                    expert_bias: false,
                    shared: None,
                    router: RouterConfig {
                        scoring: Scoring::Softmax,
                        top_k: 2,
                        logit_bias: false,
                        softmax_over: SoftmaxOver::All,
                        selection_bias: false,
                        groups: None,
                        normalize: true,
                        scale: 1.0,
                        weight_on: WeightOn::Output,
                    },
                    capacity: CapacityConfig::Dropless,
                },
                mesh: MeshConfig {
                    nodes: 1,
                    gpus_per_node: 4,
                    ep: 4,
                    etp: 1,
                    dp: 1,
                    device: DeviceConfig {
                        name: "test".into(),
                        peak_flops: 1e15,
                        memory_bandwidth: 3e12,
                        memory: 8e10,
                    },
                    intra_node: LinkConfig {
                        bandwidth: 4.5e11,
                        latency: 3e-6,
                    },
                    inter_node: None,
                    experts_of_ep_rank: vec![vec![0], vec![1], vec![2], vec![3]],
                },
                choices: Choices {
                    chunks: 1,
                    chunk_tokens: 16,
                    fused_router: true,
                    fused_permute: true,
                    fused_combine: true,
                    fused_activation: true,
                    shared_concurrent: false,
                    dispatch: A2aAlgorithm::Flat,
                    dispatch_dtype: DType::Bf16,
                    expert_rows: 32,
                    rank_rows: 0,
                    headroom: None,
                    overflow_flag: true,
                    dedup_dispatch: false,
                    reduce_combine: false,
                },
                kernels: vec![Kernel {
                    name: "router_fused".into(),
                    kind: KernelKind::RouterFused,
                    constants: vec![],
                }],
                buffers: vec![],
                events: 0,
                streams: vec![],
                memory: MemoryPlan {
                    peak_activation_bytes: 0,
                    total_buffer_bytes: 0,
                    weight_bytes: 0,
                },
            };
            Builder { plan, next_id: 0 }
        }

        pub fn stream(&mut self, name: &str, role: StreamRole) -> usize {
            self.plan.streams.push(Stream {
                name: name.into(),
                role,
                ops: vec![],
            });
            self.plan.streams.len() - 1
        }

        fn push(
            &mut self,
            s: usize,
            name: &str,
            phase: Phase,
            chunk: Option<u64>,
            kind: OpKind,
            us: f64,
        ) -> u32 {
            let id = self.next_id;
            self.next_id += 1;
            self.plan.streams[s].ops.push(Op {
                id,
                name: name.into(),
                phase,
                chunk,
                kind,
                estimate_us: us,
            });
            id
        }

        /// An op with an explicit id (to build plans whose ids are out of order).
        pub fn with_id(&mut self, id: u32) -> &mut Self {
            self.next_id = id;
            self
        }

        pub fn launch(
            &mut self,
            s: usize,
            name: &str,
            phase: Phase,
            chunk: Option<u64>,
            us: f64,
        ) -> u32 {
            let kind = OpKind::Launch {
                kernel: 0,
                inputs: vec![],
                outputs: vec![],
                rows: 16,
            };
            self.push(s, name, phase, chunk, kind, us)
        }

        pub fn gemm(
            &mut self,
            s: usize,
            name: &str,
            phase: Phase,
            chunk: Option<u64>,
            us: f64,
        ) -> u32 {
            let kind = OpKind::Gemm {
                weight: GemmWeight::ExpertUp,
                a: 0,
                c: 0,
                m: 32,
                n: 256,
                k: 64,
                groups: 1,
                epilogue: Epilogue::None,
                by_rank: None,
            };
            self.push(s, name, phase, chunk, kind, us)
        }

        pub fn collective(
            &mut self,
            s: usize,
            name: &str,
            phase: Phase,
            chunk: Option<u64>,
            us: f64,
            bytes: u64,
        ) -> u32 {
            self.collective_over(s, name, phase, chunk, us, bytes, CollectiveScope::EpGroup)
        }

        #[allow(clippy::too_many_arguments)]
        pub fn collective_over(
            &mut self,
            s: usize,
            name: &str,
            phase: Phase,
            chunk: Option<u64>,
            us: f64,
            bytes: u64,
            scope: CollectiveScope,
        ) -> u32 {
            let kind = OpKind::Collective {
                kind: CollectiveKind::AllToAllV,
                scope,
                send: 0,
                recv: 0,
                peers: 4,
                bytes_per_peer: bytes / 4,
                bytes_sent: bytes,
            };
            self.push(s, name, phase, chunk, kind, us)
        }

        pub fn record(&mut self, s: usize, event: u32) -> u32 {
            self.plan.events = self.plan.events.max(event + 1);
            let name = format!("record_e{event}");
            self.push(s, &name, Phase::Output, None, OpKind::Record { event }, 0.0)
        }

        pub fn wait(&mut self, s: usize, event: u32) -> u32 {
            self.plan.events = self.plan.events.max(event + 1);
            let name = format!("wait_e{event}");
            self.push(s, &name, Phase::Output, None, OpKind::Wait { event }, 0.0)
        }

        pub fn build(self) -> Plan {
            self.plan
        }
    }

    /// The 2-stream pipeline of the tests, timed by hand:
    ///
    /// ```text
    /// compute: router 0-10 | shared 10-40 | experts 40-60 | output 75-80
    /// comm:    dispatch 10-35 | combine 60-75
    /// ```
    pub fn pipeline() -> Plan {
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.launch(c, "router", Phase::Router, None, 10.0); // 0
        b.record(c, 0); // 1
        b.wait(n, 0); // 2
        b.collective(n, "dispatch", Phase::Dispatch, Some(0), 25.0, 1 << 20); // 3
        b.record(n, 1); // 4
        b.gemm(c, "shared_up", Phase::Shared, None, 30.0); // 5
        b.wait(c, 1); // 6
        b.gemm(c, "experts_up", Phase::Experts, Some(0), 20.0); // 7
        b.record(c, 2); // 8
        b.wait(n, 2); // 9
        b.collective(n, "combine", Phase::Combine, Some(0), 15.0, 1 << 19); // 10
        b.record(n, 3); // 11
        b.wait(c, 3); // 12
        b.launch(c, "output", Phase::Output, None, 5.0); // 13
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::test_plan::{pipeline, Builder};
    use super::*;

    fn span<'a>(t: &'a Timeline, name: &str) -> &'a Span {
        t.spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no span {name}"))
    }

    fn times(t: &Timeline, name: &str) -> (f64, f64) {
        let s = span(t, name);
        (s.start_us, s.end_us)
    }

    fn assert_exposed_adds_up(t: &Timeline) {
        let exposed: f64 = t.phases.iter().map(|p| p.exposed_us).sum();
        let sum = exposed + t.idle_us();
        assert!(
            (sum - t.total_us).abs() <= 1e-6 * t.total_us.max(1.0),
            "exposed {exposed} + idle {} != total {}",
            t.idle_us(),
            t.total_us
        );
    }

    #[test]
    fn pipeline_times_by_hand() {
        let t = simulate(&pipeline()).expect("simulates");
        assert_eq!(times(&t, "router"), (0.0, 10.0));
        assert_eq!(times(&t, "dispatch"), (10.0, 35.0));
        assert_eq!(times(&t, "shared_up"), (10.0, 40.0));
        assert_eq!(times(&t, "experts_up"), (40.0, 60.0));
        assert_eq!(times(&t, "combine"), (60.0, 75.0));
        assert_eq!(times(&t, "output"), (75.0, 80.0));
        assert_eq!(t.total_us, 80.0);
        assert_eq!(t.spans.len(), 6);
        assert_eq!(span(&t, "dispatch").stream, 1);
        assert_eq!(span(&t, "dispatch").chunk, Some(0));
        assert_eq!(t.stream_names, vec!["compute", "comm"]);
        assert_eq!(t.stream_roles, vec![StreamRole::Compute, StreamRole::Comm]);
        // Records and waits: 4 records, 4 waits.
        assert_eq!(t.syncs.len(), 8);
        let wait_e1 = t
            .syncs
            .iter()
            .find(|p| p.kind == SyncKind::Wait && p.event == 1)
            .expect("wait e1");
        assert_eq!(wait_e1.time_us, 40.0); // the stream was busy past the record at 35
        let record_e1 = t
            .syncs
            .iter()
            .find(|p| p.kind == SyncKind::Record && p.event == 1)
            .expect("record e1");
        assert_eq!(record_e1.time_us, 35.0);
    }

    #[test]
    fn pipeline_phases() {
        let t = simulate(&pipeline()).expect("simulates");
        let names: Vec<&str> = t.phases.iter().map(|p| p.phase.name()).collect();
        assert_eq!(
            names,
            ["router", "dispatch", "experts", "combine", "shared", "output"]
        );
        let get = |p| t.phase(p).expect("phase");
        assert_eq!(get(Phase::Dispatch).time_us, 25.0);
        assert_eq!(get(Phase::Dispatch).bytes, 1 << 20);
        assert_eq!(get(Phase::Dispatch).exposed_us, 0.0); // hidden under shared
        assert_eq!(get(Phase::Combine).exposed_us, 15.0);
        assert_eq!(get(Phase::Shared).exposed_us, 30.0);
        assert_eq!(get(Phase::Experts).exposed_us, 20.0);
        assert_eq!(get(Phase::Router).exposed_us, 10.0);
        assert_eq!(get(Phase::Output).exposed_us, 5.0);
        assert_eq!(get(Phase::Experts).bytes, 0);
        assert_eq!(t.idle_us(), 0.0);
        assert_exposed_adds_up(&t);
    }

    #[test]
    fn partially_hidden_dispatch() {
        // dispatch 0-50 beside a 20 us compute kernel: 30 us exposed.
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.collective(n, "dispatch", Phase::Dispatch, None, 50.0, 100);
        b.gemm(c, "shared", Phase::Shared, None, 20.0);
        let t = simulate(&b.build()).expect("simulates");
        assert_eq!(t.total_us, 50.0);
        assert_eq!(t.phase(Phase::Dispatch).expect("d").exposed_us, 30.0);
        assert_eq!(t.phase(Phase::Shared).expect("s").exposed_us, 20.0);
        assert_exposed_adds_up(&t);
    }

    #[test]
    fn compute_streams_serialise_and_ties_go_to_lowest_id() {
        let mut b = Builder::new();
        let c1 = b.stream("compute0", StreamRole::Compute);
        let c2 = b.stream("compute1", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.gemm(c1, "a", Phase::Experts, None, 10.0); // 0
        b.gemm(c2, "c", Phase::Shared, None, 5.0); // 1
        b.gemm(c1, "b", Phase::Experts, None, 10.0); // 2
        b.collective(n, "e", Phase::Dispatch, None, 8.0, 64); // 3
        let t = simulate(&b.build()).expect("simulates");
        assert_eq!(times(&t, "a"), (0.0, 10.0));
        // At 10 both b (id 2) and c (id 1) can start: c goes first.
        assert_eq!(times(&t, "c"), (10.0, 15.0));
        assert_eq!(times(&t, "b"), (15.0, 25.0));
        // The collective overlaps with compute.
        assert_eq!(times(&t, "e"), (0.0, 8.0));
        assert_eq!(t.total_us, 25.0);
        assert_eq!(t.phase(Phase::Dispatch).expect("d").exposed_us, 0.0);
        assert_exposed_adds_up(&t);
    }

    #[test]
    fn collectives_share_the_network() {
        let mut b = Builder::new();
        let n1 = b.stream("comm0", StreamRole::Comm);
        let n2 = b.stream("comm1", StreamRole::Comm);
        b.collective(n1, "x", Phase::Dispatch, Some(0), 4.0, 8);
        b.collective(n2, "y", Phase::Dispatch, Some(1), 6.0, 8);
        let t = simulate(&b.build()).expect("simulates");
        assert_eq!(times(&t, "x"), (0.0, 4.0));
        assert_eq!(times(&t, "y"), (4.0, 10.0));
        assert_eq!(t.phase(Phase::Dispatch).expect("d").bytes, 16);
        assert_exposed_adds_up(&t);
    }

    /// The two legs of a hierarchical all-to-all hold different links, so
    /// on two streams they overlap; a collective over the whole group holds
    /// both and waits for either.
    #[test]
    fn hierarchical_legs_overlap_on_their_own_links() {
        let mut b = Builder::new();
        let intra = b.stream("comm", StreamRole::Comm);
        let inter = b.stream("comm_inter", StreamRole::Comm);
        b.collective_over(
            intra,
            "nvlink",
            Phase::Dispatch,
            Some(0),
            4.0,
            8,
            CollectiveScope::IntraNode,
        );
        b.collective_over(
            inter,
            "rdma",
            Phase::Dispatch,
            Some(1),
            6.0,
            8,
            CollectiveScope::InterNode,
        );
        b.collective(intra, "flat", Phase::Combine, Some(0), 1.0, 8);
        let t = simulate(&b.build()).expect("simulates");
        assert_eq!(times(&t, "nvlink"), (0.0, 4.0));
        assert_eq!(times(&t, "rdma"), (0.0, 6.0));
        assert_eq!(times(&t, "flat"), (6.0, 7.0));
        assert_exposed_adds_up(&t);
    }

    #[test]
    fn latest_record_before_the_wait_counts() {
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.launch(c, "k1", Phase::Permute, None, 10.0); // 0
        b.record(c, 0); // 1
        b.wait(n, 0); // 2: waits for the record at 10
        b.collective(n, "d1", Phase::Dispatch, None, 1.0, 8); // 3
        b.launch(c, "k2", Phase::Permute, None, 10.0); // 4
        b.record(c, 0); // 5
        b.wait(n, 0); // 6: waits for the record at 20
        b.collective(n, "d2", Phase::Dispatch, None, 1.0, 8); // 7
        let t = simulate(&b.build()).expect("simulates");
        assert_eq!(times(&t, "d1"), (10.0, 11.0));
        assert_eq!(times(&t, "d2"), (20.0, 21.0));
    }

    #[test]
    fn cycle_is_an_error_naming_the_streams() {
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.with_id(2).wait(c, 0);
        b.with_id(1).record(c, 1);
        b.with_id(3).wait(n, 1);
        b.with_id(0).record(n, 0);
        b.with_id(4).launch(c, "k", Phase::Router, None, 1.0);
        let err = simulate(&b.build()).expect_err("deadlock");
        assert!(err.contains("'compute'"), "{err}");
        assert!(err.contains("'comm'"), "{err}");
        assert!(err.contains("cannot complete"), "{err}");
    }

    #[test]
    fn wait_without_record_is_an_error() {
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        b.wait(c, 0);
        b.launch(c, "k", Phase::Router, None, 1.0);
        let err = simulate(&b.build()).expect_err("never recorded");
        assert!(err.contains("event 0"), "{err}");
        assert!(err.contains("'compute'"), "{err}");
    }

    #[test]
    fn bad_references_are_errors() {
        let mut plan = pipeline();
        plan.events = 2; // events 2 and 3 are now out of range
        assert!(simulate(&plan)
            .expect_err("out of range")
            .contains("refers to event"));

        let mut plan = pipeline();
        plan.streams[0].ops[0].estimate_us = f64::NAN;
        assert!(simulate(&plan).expect_err("nan").contains("estimate"));

        let mut plan = pipeline();
        plan.streams[1].ops[1].id = 0;
        assert!(simulate(&plan).expect_err("dup").contains("used twice"));
    }

    #[test]
    fn empty_plan() {
        let t = simulate(&Builder::new().build()).expect("simulates");
        assert_eq!(t.total_us, 0.0);
        assert!(t.spans.is_empty() && t.phases.is_empty());
        assert_eq!(t.idle_us(), 0.0);
        assert!(t.phase_table().contains("total"));
    }

    #[test]
    fn json_and_table() {
        let t = simulate(&pipeline()).expect("simulates");
        let j = t.to_json();
        assert_eq!(j["total_us"], 80.0);
        assert_eq!(j["phases"][1]["name"], "dispatch");
        assert_eq!(j["phases"][1]["bytes"], 1 << 20);
        assert_eq!(j["phases"][1]["exposed_us"], 0.0);
        let table = t.phase_table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1 + 6 + 2);
        assert!(lines[0].starts_with("phase"));
        assert!(lines[2].starts_with("dispatch"));
        assert!(lines[2].contains("1.00 MiB"));
        assert!(lines[8].starts_with("total"));
        assert!(lines[8].contains("100.0%"));
        // Aligned: every row has the share column ending at the same place.
        let width = lines[0].len();
        assert!(lines.iter().all(|l| l.len() == width), "{table}");
        assert_eq!(round3(1.23456), 1.235);
        assert_eq!(round3(-0.0001), 0.0);
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }

    #[test]
    fn deterministic() {
        let a = simulate(&pipeline()).expect("a");
        let b = simulate(&pipeline()).expect("b");
        assert_eq!(a, b);
        assert_eq!(a.to_json().to_string(), b.to_json().to_string());
        assert_eq!(a.phase_table(), b.phase_table());
    }

    #[test]
    fn many_chunks_exposed_adds_up() {
        // A chunked pipeline: dispatch / experts / combine over 6 chunks on
        // three streams, plus shared experts on a second compute stream.
        let mut b = Builder::new();
        let c = b.stream("compute", StreamRole::Compute);
        let c2 = b.stream("shared", StreamRole::Compute);
        let n = b.stream("comm", StreamRole::Comm);
        b.launch(c, "router", Phase::Router, None, 3.0);
        b.record(c, 0);
        b.wait(c2, 0);
        b.gemm(c2, "shared", Phase::Shared, None, 17.5);
        let mut event = 1;
        for chunk in 0..6u64 {
            b.launch(c, "permute", Phase::Permute, Some(chunk), 1.25);
            b.record(c, event);
            b.wait(n, event);
            b.collective(
                n,
                "dispatch",
                Phase::Dispatch,
                Some(chunk),
                7.0 + chunk as f64,
                4096,
            );
            b.record(n, event + 1);
            b.wait(c, event + 1);
            b.gemm(c, "experts", Phase::Experts, Some(chunk), 5.5);
            b.record(c, event + 2);
            b.wait(n, event + 2);
            b.collective(n, "combine", Phase::Combine, Some(chunk), 6.0, 4096);
            event += 3;
        }
        b.record(n, event);
        b.wait(c, event);
        b.launch(c, "unpermute", Phase::Unpermute, None, 2.0);
        let t = simulate(&b.build()).expect("simulates");
        assert_eq!(t.spans.len(), 2 + 6 * 4 + 1);
        assert_exposed_adds_up(&t);
        // Compute never overlaps compute.
        let mut compute: Vec<&Span> = t
            .spans
            .iter()
            .filter(|s| t.stream_roles[s.stream] == StreamRole::Compute)
            .collect();
        compute.sort_by(|a, b| a.start_us.total_cmp(&b.start_us));
        for w in compute.windows(2) {
            assert!(w[0].end_us <= w[1].start_us + 1e-9);
        }
        assert_eq!(t.phase(Phase::Dispatch).expect("d").bytes, 6 * 4096);
    }
}
