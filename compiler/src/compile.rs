//! The compiler driver: lower, rewrite, extract, schedule, choose.
//!
//! egg's extractor picks, bottom-up, the cheapest form of every e-class by
//! [`OverlapCost`] (fusions, topology, fp8). The overlap decisions at the top
//! (how many chunks, whether the shared experts run beside the dispatch) are
//! then compared exactly: every such candidate is scheduled into a plan and
//! replayed by the timeline simulator, which knows the streams' concurrency,
//! and the fastest wins. The candidate with one chunk and the shared experts
//! in line is the no-overlap baseline kept for reporting; with `overlap = auto`
//! it is one of the candidates, so the chosen plan never predicts worse than
//! the baseline (a forced `overlap = N` is obeyed even when it is slower).
//!
//! Memory comes before time: a candidate whose activations and weights do not
//! fit the device's memory loses to any that fits (more chunks mean more
//! worst-case receive buffers). When none fits, the smallest is chosen and
//! [`Report::warnings`] says by how much it misses.

use crate::cost::{OverlapCost, RoutingForm};
use crate::ir::{lower, MetaAnalysis, Model, MoeIr, AUTO_HEADROOM_FALLBACKS};
use crate::rules::{family_of, rules};
use crate::schedule::{schedule_with, Order};
use crate::timeline::{simulate, Timeline};
use egg::{EGraph, Extractor, Id, Language, RecExpr, Runner, SimpleScheduler, StopReason};
use moec_lang::spec::{Headroom, Overlap, Program};
use moec_runtime::plan::Plan;
use std::collections::BTreeMap;
use std::time::Duration;

/// Bounds of the e-graph. The IR is per rank, so these do not grow with the
/// mesh; they guard against a rule set that would not saturate.
pub const NODE_LIMIT: usize = 20_000;
pub const ITERATION_LIMIT: usize = 32;
/// A safety net only: hitting it would make the result depend on the
/// machine's speed, so it is reported as an error rather than used.
pub const TIME_LIMIT: Duration = Duration::from_secs(10);
/// Chunks smaller than this are not considered by `overlap = auto`.
pub const MIN_CHUNK_TOKENS: u64 = 64;
/// Overlap degrees `overlap = auto` considers.
pub const AUTO_DEGREES: &[u64] = &[2, 3, 4, 6, 8, 12, 16];

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Tokens per rank instead of the file's `tokens_per_rank`.
    pub tokens: Option<u64>,
    /// Only candidates of this routing form (the tests use it to run each
    /// form; an error when the rewrites could not make it).
    pub routing: Option<RoutingForm>,
    /// Measured routing instead of uniform routing (`moec simulate --stats`):
    /// the busiest rank's load and the ranks and nodes tokens reach.
    pub stats: Option<moec_runtime::stats::RoutingStatistics>,
    /// Rewrite families left out whatever the file's schedule allows (a
    /// CUDA graph cannot wait for the host, which lays out the
    /// hierarchical legs).
    pub without: Vec<&'static str>,
}

impl Options {
    /// The options of a plan the CUDA backend runs eagerly, on virtual ranks
    /// or over NCCL: every routing form (each rank's host lays its by-rank
    /// rows out from its own routing, read back after `assign_place`).
    pub fn cuda() -> Options {
        Options::default()
    }

    /// The options of a plan whose pass must not wait for the host: a CUDA
    /// graph (`--graph`). Per-pick routing and the flat all-to-all only,
    /// since the by-rank send layout and the hierarchical legs are laid out
    /// on the host from the routing read back mid-pass.
    pub fn cuda_device_routed() -> Options {
        Options {
            routing: Some(RoutingForm::PerAssignment),
            without: vec!["hierarchical_a2a"],
            ..Options::default()
        }
    }

    /// The CUDA options of a run: [`Options::cuda_device_routed`] for a
    /// CUDA graph, else [`Options::cuda`].
    pub fn cuda_run(graph: bool) -> Options {
        if graph {
            Options::cuda_device_routed()
        } else {
            Options::cuda()
        }
    }
}

/// One overlap candidate and its simulated time.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub chunks: u64,
    pub shared_concurrent: bool,
    /// How tokens travel (per pick, by rank, by rank with the reducing combine).
    pub routing: RoutingForm,
    pub total_us: f64,
    /// Activations and weights of one rank, bytes.
    pub memory_bytes: u64,
    /// The chunk order kept for this candidate ([`Order::combine_lag`]).
    pub combine_lag: u64,
}

/// What the rewrites did.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Nodes of the lowered expression.
    pub initial_nodes: usize,
    pub egraph_nodes: usize,
    pub egraph_classes: usize,
    pub iterations: usize,
    pub stop_reason: String,
    /// Rewrites applied, per rule family, in the order of [`crate::rules::FAMILIES`].
    pub fired: Vec<(String, usize)>,
    /// Families the schedule section denied.
    pub denied: Vec<String>,
    pub candidates: Vec<Candidate>,
    /// The extracted expression of the chosen plan, as an s-expression.
    pub chosen_expr: String,
    /// What the user should know about the chosen plan (`moec` prints these
    /// on stderr): today, a plan that does not fit the device's memory.
    pub warnings: Vec<String>,
    /// The busiest EP rank's load over the mean that the prediction assumes
    /// (1 under uniform routing on an even placement; measured with
    /// `Options::stats`).
    pub load_skew: f64,
    /// Expected nodes other than its own that a token's picks reach (0 on
    /// one node), under uniform or measured routing.
    pub remote_nodes: f64,
}

pub struct Compiled {
    pub plan: Plan,
    pub timeline: Timeline,
    pub baseline: Plan,
    pub baseline_timeline: Timeline,
    pub report: Report,
}

impl Compiled {
    /// What `moec simulate --json` prints (and the Python `Plan.simulate`
    /// returns): the timeline's `total_us`, `idle_us` and `phases`, the
    /// layer, tokens per rank, ranks, chunks, whether the routing was
    /// `measured` (`--stats`) or `uniform`, and the baseline's total and
    /// phases.
    pub fn simulation_json(&self, measured: bool) -> serde_json::Value {
        let mut value = self.timeline.to_json();
        if let Some(obj) = value.as_object_mut() {
            let p = &self.plan;
            obj.insert("layer".into(), p.layer.name.clone().into());
            obj.insert("tokens_per_rank".into(), p.layer.tokens_per_rank.into());
            obj.insert("ranks".into(), p.mesh.world_size().into());
            obj.insert("chunks".into(), p.choices.chunks.into());
            obj.insert(
                "routing".into(),
                if measured { "measured" } else { "uniform" }.into(),
            );
            let base = self.baseline_timeline.to_json();
            obj.insert(
                "baseline_total_us".into(),
                base.get("total_us").cloned().unwrap_or_default(),
            );
            obj.insert(
                "baseline_phases".into(),
                base.get("phases").cloned().unwrap_or_default(),
            );
        }
        value
    }
}

/// Compiles a checked program.
///
/// A dropless layer with `headroom = auto` is compiled with its buffers
/// sized for [`AUTO_HEADROOM`](crate::ir::AUTO_HEADROOM) times the expected load; when that plan does
/// not fit the device, with each of [`AUTO_HEADROOM_FALLBACKS`] in turn
/// until one fits (the last is kept when none does).
pub fn compile(program: &Program, options: &Options) -> Result<Compiled, String> {
    let mut model = Model::new(program)?;
    if let Some(t) = options.tokens {
        if t == 0 {
            return Err("--tokens must be at least 1".into());
        }
        model = model.with_tokens(t);
    }
    if let Some(stats) = &options.stats {
        model = model.with_stats(stats)?;
    }
    let mut compiled = compile_model(program, options, &model)?;
    let auto = program.schedule.headroom == Headroom::Auto && model.capacity.is_none();
    if auto && !fits_device(&compiled.plan) {
        for &h in AUTO_HEADROOM_FALLBACKS {
            compiled = compile_model(program, options, &model.with_headroom(Some(h)))?;
            if fits_device(&compiled.plan) {
                break;
            }
        }
    }
    Ok(compiled)
}

/// Compiles a checked program for `model` (the program's layer and mesh,
/// with the caller's token count and headroom).
fn compile_model(program: &Program, options: &Options, model: &Model) -> Result<Compiled, String> {
    let model = model.clone();
    let has_comm = model.group_ranks > 1;
    let degrees: Vec<u64> = match program.schedule.overlap {
        Overlap::Auto if has_comm => AUTO_DEGREES
            .iter()
            .copied()
            .filter(|&d| model.tokens / d >= MIN_CHUNK_TOKENS)
            .collect(),
        Overlap::Auto => Vec::new(),
        Overlap::Degree(d) => {
            if d > model.tokens {
                return Err(format!(
                    "overlap degree {d} is more than the {} tokens per rank",
                    model.tokens
                ));
            }
            if d > 1 {
                vec![d]
            } else {
                Vec::new()
            }
        }
    };
    let allowed: Vec<&str> = program
        .schedule
        .rules
        .iter()
        .copied()
        .filter(|family| !options.without.contains(family))
        .collect();
    let rule_set = rules(&model, &allowed, &degrees)?;
    let expr = lower(&model);
    let initial_nodes = expr.as_ref().len();
    let runner: Runner<MoeIr, MetaAnalysis> = Runner::new(MetaAnalysis {
        model: model.clone(),
    })
    .with_expr(&expr)
    .with_node_limit(NODE_LIMIT)
    .with_iter_limit(ITERATION_LIMIT)
    .with_time_limit(TIME_LIMIT)
    .with_scheduler(SimpleScheduler)
    .run(&rule_set);
    let stop_reason = match &runner.stop_reason {
        Some(StopReason::Saturated) => "saturated".to_string(),
        Some(StopReason::TimeLimit(s)) => {
            return Err(format!(
                "internal: the rewrites did not finish within {s} s; please report this file"
            ))
        }
        Some(StopReason::NodeLimit(n)) => format!("node limit {n}"),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit {n}"),
        Some(StopReason::Other(s)) => s.clone(),
        None => "not run".into(),
    };
    let mut fired: BTreeMap<&str, usize> = BTreeMap::new();
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *fired.entry(family_of(name.as_str())).or_default() += n;
        }
    }
    let fired: Vec<(String, usize)> = crate::rules::FAMILIES
        .iter()
        .filter_map(|f| fired.get(f).map(|n| (f.to_string(), *n)))
        .collect();
    let denied = crate::rules::FAMILIES
        .iter()
        .filter(|f| !allowed.contains(f))
        .map(|f| f.to_string())
        .collect();
    let egraph = &runner.egraph;
    let root = runner
        .roots
        .first()
        .copied()
        .ok_or("internal: the e-graph has no root")?;
    let root = egraph.find(root);
    // One extraction per routing form the rewrites made possible.
    let has = |f: &dyn Fn(&MoeIr) -> bool| egraph.classes().any(|c| c.nodes.iter().any(f));
    let forms: Vec<RoutingForm> = RoutingForm::ALL
        .into_iter()
        .filter(|form| form.possible(&has))
        .collect();
    let extractors: Vec<(RoutingForm, Extractor<OverlapCost, MoeIr, MetaAnalysis>)> = forms
        .iter()
        .map(|&form| (form, Extractor::new(egraph, OverlapCost { egraph, form })))
        .collect();

    // The top-level alternatives: how the shared branch joins, how many chunks.
    let joins: Vec<Option<MoeIr>> = {
        let adds: Vec<MoeIr> = egraph[root]
            .nodes
            .iter()
            .filter(|n| matches!(n, MoeIr::Add(_) | MoeIr::AddPar(_)))
            .cloned()
            .collect();
        if adds.is_empty() {
            vec![None]
        } else {
            adds.into_iter().map(Some).collect()
        }
    };
    let routed_class = match &joins[0] {
        Some(MoeIr::Add([r, _]) | MoeIr::AddPar([r, _])) => egraph.find(*r),
        _ => root,
    };
    let pipelines: Vec<MoeIr> = egraph[routed_class]
        .nodes
        .iter()
        .filter(|n| matches!(n, MoeIr::Pipeline(_)))
        .cloned()
        .collect();
    let chunks_of = |n: &MoeIr| match n {
        MoeIr::Pipeline([d, ..]) => egraph[*d].data.num.unwrap_or(1),
        _ => 1,
    };
    let forced = match program.schedule.overlap {
        Overlap::Degree(d) => Some(d),
        Overlap::Auto => None,
    };

    let mut best: Option<Best> = None;
    let mut baseline: Option<(Plan, Timeline)> = None;
    let mut candidates = Vec::new();
    for (routing, extractor) in &extractors {
        for join in &joins {
            for pipeline in &pipelines {
                let chunks = chunks_of(pipeline);
                let concurrent = matches!(join, Some(MoeIr::AddPar(_)));
                let is_baseline =
                    chunks == 1 && !concurrent && *routing == RoutingForm::PerAssignment;
                let eligible = forced.is_none_or(|d| d == chunks)
                    && options.routing.is_none_or(|f| f == *routing);
                if !eligible && !is_baseline {
                    continue;
                }
                let mut overrides = BTreeMap::new();
                if let Some(j) = join {
                    overrides.insert(root, j.clone());
                }
                overrides.insert(routed_class, pipeline.clone());
                let chosen = build_expr(egraph, extractor, root, &overrides)?;
                if chosen.as_ref().iter().any(|n| routing.forbids(n)) {
                    // The form has no complete plan for this candidate.
                    continue;
                }
                let (plan, timeline, combine_lag) =
                    order_chunks(&model, &chosen, chunks, is_baseline)?;
                let total = timeline.total_us;
                let memory = rank_memory_bytes(&plan);
                let fits = fits_device(&plan);
                candidates.push(Candidate {
                    chunks,
                    shared_concurrent: concurrent,
                    routing: *routing,
                    total_us: total,
                    memory_bytes: memory,
                    combine_lag,
                });
                if is_baseline {
                    baseline = Some((plan.clone(), timeline.clone()));
                }
                if !eligible {
                    continue;
                }
                let better = match &best {
                    None => true,
                    Some(b) if fits != b.fits => fits,
                    // Neither fits: the one that needs the least memory.
                    Some(b) if !fits => {
                        (memory, chunks, concurrent) < (b.memory, b.chunks, b.concurrent)
                    }
                    Some(b) => {
                        // Strictly faster by more than rounding, or as fast and simpler.
                        total < b.total - 1e-6
                            || ((total - b.total).abs() <= 1e-6
                                && (chunks, concurrent) < (b.chunks, b.concurrent))
                    }
                };
                if better {
                    best = Some(Best {
                        total,
                        chunks,
                        concurrent,
                        memory,
                        fits,
                        plan,
                        timeline,
                        expr: chosen.to_string(),
                    });
                }
            }
        }
    }
    if let Some(form) = options.routing.filter(|f| !forms.contains(f)) {
        return Err(format!(
            "no plan sends tokens {}: {}",
            form.name(),
            crate::rules::by_rank_guard(model.ep, model.etp, model.top_k)
                .unwrap_or_else(|| "the schedule denies its rules".into())
        ));
    }
    let (baseline, baseline_timeline) =
        baseline.ok_or("internal: no baseline candidate was extracted")?;
    let best = best.ok_or("internal: no candidate plan was extracted")?;
    candidates.sort_by_key(|c| (c.routing, c.chunks, c.shared_concurrent));
    let mut warnings = Vec::new();
    if !best.fits {
        warnings.push(memory_warning(&best.plan));
    }
    let (plan, timeline, chosen_expr) = (best.plan, best.timeline, best.expr);
    Ok(Compiled {
        plan,
        timeline,
        baseline,
        baseline_timeline,
        report: Report {
            initial_nodes,
            egraph_nodes: egraph.total_number_of_nodes(),
            egraph_classes: egraph.number_of_classes(),
            iterations: runner.iterations.len(),
            stop_reason,
            fired,
            denied,
            candidates,
            chosen_expr,
            warnings,
            load_skew: model.load_skew,
            remote_nodes: crate::cost::expected_remote_nodes(&model),
        },
    })
}

/// Schedules one candidate in every chunk order worth trying (the lags of
/// [`Order::combine_lag`], 1 to the chunk count, at most
/// [`MAX_COMBINE_LAG`]) and keeps the fastest by the simulator; ties keep the
/// smaller lag, so the choice is deterministic; a lag whose plan does not fit
/// the device loses to one that does. The baseline keeps lag 1.
fn order_chunks(
    model: &Model,
    expr: &RecExpr<MoeIr>,
    chunks: u64,
    is_baseline: bool,
) -> Result<(Plan, Timeline, u64), String> {
    let lags = if is_baseline {
        1
    } else {
        chunks.clamp(1, MAX_COMBINE_LAG)
    };
    let mut best: Option<(Plan, Timeline, u64)> = None;
    for lag in 1..=lags {
        let plan = schedule_with(model, expr, &Order { combine_lag: lag })?;
        plan.validate()
            .map_err(|e| format!("internal: the scheduler made an invalid plan: {e}"))?;
        let timeline = simulate(&plan)?;
        let better = match &best {
            None => true,
            // A lag that keeps more buffers alive must not push the plan out of memory.
            Some((p, ..)) if fits_device(&plan) != fits_device(p) => fits_device(&plan),
            Some((_, t, _)) => timeline.total_us < t.total_us - 1e-6,
        };
        if better {
            best = Some((plan, timeline, lag));
        }
    }
    best.ok_or_else(|| "internal: no chunk order was scheduled".into())
}

/// The most chunks' experts a chunk's un-permute may wait behind.
pub const MAX_COMBINE_LAG: u64 = 4;

/// The best candidate so far, and what it is compared by.
struct Best {
    total: f64,
    chunks: u64,
    concurrent: bool,
    memory: u64,
    /// Activations and weights fit the device's memory.
    fits: bool,
    plan: Plan,
    timeline: Timeline,
    expr: String,
}

/// What one rank of a plan holds: its activation arena and its weights.
pub fn rank_memory_bytes(plan: &Plan) -> u64 {
    plan.memory
        .peak_activation_bytes
        .saturating_add(plan.memory.weight_bytes)
}

/// The plan's activations and weights fit its device's memory.
pub fn fits_device(plan: &Plan) -> bool {
    rank_memory_bytes(plan) as f64 <= plan.mesh.device.memory
}

/// What a plan that does not fit its device needs, against what the device has.
pub fn memory_warning(plan: &Plan) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    let m = &plan.memory;
    let mut text = format!(
        "the plan needs {:.2} GiB per rank ({:.2} GiB of activations, {:.2} GiB of weights), \
         more than the {:.2} GiB of the {}; no overlap candidate fits, this is the smallest",
        rank_memory_bytes(plan) as f64 / GIB,
        m.peak_activation_bytes as f64 / GIB,
        m.weight_bytes as f64 / GIB,
        plan.mesh.device.memory / GIB,
        plan.mesh.device.name,
    );
    if plan.layer.capacity == moec_runtime::plan::CapacityConfig::Dropless {
        text.push_str(&match plan.choices.headroom {
            Some(h) => format!(
                " (its dropless buffers hold {h}x the expected load; a smaller `headroom` \
                 in the schedule section, more ranks or a capacity limit shrink them)"
            ),
            None => " (with `headroom = worst_case` a dropless plan reserves every row the \
                     routing could send; a headroom or a capacity limit bounds it)"
                .to_string(),
        });
    }
    text
}

/// The expression rooted at `root`, taking the extractor's best node in every
/// class except those in `overrides`.
fn build_expr(
    egraph: &EGraph<MoeIr, MetaAnalysis>,
    extractor: &Extractor<OverlapCost, MoeIr, MetaAnalysis>,
    root: Id,
    overrides: &BTreeMap<Id, MoeIr>,
) -> Result<RecExpr<MoeIr>, String> {
    let mut expr = RecExpr::default();
    let mut done: BTreeMap<Id, Id> = BTreeMap::new();
    // Iterative post-order walk (the IR is shallow, but never trust recursion depth).
    let mut stack: Vec<(Id, bool)> = vec![(egraph.find(root), false)];
    while let Some((class, expanded)) = stack.pop() {
        if done.contains_key(&class) {
            continue;
        }
        let node = overrides
            .get(&class)
            .cloned()
            .unwrap_or_else(|| extractor.find_best_node(class).clone());
        if expanded {
            let mapped = node.map_children(|c| done.get(&egraph.find(c)).copied().unwrap_or(c));
            let id = expr.add(mapped);
            done.insert(class, id);
        } else {
            stack.push((class, true));
            for c in node.children().iter().rev() {
                let c = egraph.find(*c);
                if !done.contains_key(&c) {
                    stack.push((c, false));
                }
            }
        }
    }
    if expr.as_ref().is_empty() {
        return Err("internal: empty extraction".into());
    }
    Ok(expr)
}
