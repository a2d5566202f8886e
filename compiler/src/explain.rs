//! `moec explain`: why the plan is what it is.

use crate::compile::Compiled;
use crate::cost::RoutingForm;
use moec_runtime::plan::{human_bytes, A2aAlgorithm, DType, Phase, Plan};
use std::fmt::Write;

/// Whether a rule family shows in the chosen plan.
fn in_plan(plan: &Plan, family: &str) -> bool {
    let c = &plan.choices;
    match family {
        "fuse_router" => c.fused_router,
        "fuse_permute" => c.fused_permute,
        "fuse_combine" => c.fused_combine,
        "fuse_activation" => c.fused_activation,
        "overlap_chunks" => c.chunks > 1,
        "overlap_shared" => c.shared_concurrent,
        "hierarchical_a2a" => c.dispatch == A2aAlgorithm::Hierarchical,
        "fp8_dispatch" => c.dispatch_dtype == DType::Fp8E4m3 && plan.layer.dtype != DType::Fp8E4m3,
        "dedup_dispatch" => c.dedup_dispatch,
        "reduce_combine" => c.reduce_combine,
        _ => false,
    }
}

/// Why a family could not fire on this layer at all.
fn not_applicable(plan: &Plan, family: &str) -> Option<String> {
    let l = &plan.layer;
    let m = &plan.mesh;
    let group_ranks = m.ep.saturating_mul(m.etp);
    match family {
        "overlap_shared" if l.shared.is_none() => Some("the layer has no shared experts".into()),
        "hierarchical_a2a" if group_ranks <= m.gpus_per_node => {
            Some("the EP group fits in one node".into())
        }
        "hierarchical_a2a" if m.gpus_per_node <= 1 => {
            Some("one GPU per node: the flat all-to-all already sends one copy per node".into())
        }
        "fp8_dispatch" if l.dispatch_dtype != DType::Fp8E4m3 => Some(format!(
            "the layer dispatches in {} (set `dispatch_dtype = fp8_e4m3` to allow it)",
            l.dispatch_dtype.name()
        )),
        "dedup_dispatch" | "reduce_combine" => {
            crate::rules::by_rank_guard(m.ep, m.etp, l.router.top_k)
        }
        "overlap_chunks" if group_ranks <= 1 => {
            Some("one rank: there is no communication to hide".into())
        }
        "overlap_chunks"
            if plan.choices.chunks == 1
                && l.tokens_per_rank / 2 < crate::compile::MIN_CHUNK_TOKENS =>
        {
            Some(format!(
                "{} tokens per rank: `overlap = auto` keeps chunks of at least {} tokens",
                l.tokens_per_rank,
                crate::compile::MIN_CHUNK_TOKENS
            ))
        }
        _ => None,
    }
}

/// The routing form of a plan.
fn routing_of(plan: &Plan) -> RoutingForm {
    RoutingForm::of(&plan.choices)
}

/// The report `moec explain` prints.
pub fn explain(c: &Compiled) -> String {
    let p = &c.plan;
    let r = &c.report;
    let mut s = String::new();
    let m = &p.mesh;
    let _ = writeln!(
        s,
        "layer {}: {} tokens per rank on {} node(s) x {} {} ({} ranks; ep {}, etp {}, dp {})",
        p.layer.name,
        p.layer.tokens_per_rank,
        m.nodes,
        m.gpus_per_node,
        m.device.name,
        m.world_size(),
        m.ep,
        m.etp,
        m.dp
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "rewrites: {} lowered nodes -> e-graph of {} nodes in {} classes after {} iteration(s) ({})",
        r.initial_nodes, r.egraph_nodes, r.egraph_classes, r.iterations, r.stop_reason
    );
    for family in crate::rules::FAMILIES {
        let fired = r
            .fired
            .iter()
            .find(|(f, _)| f == family)
            .map(|(_, n)| *n)
            .unwrap_or(0);
        let status = if r.denied.iter().any(|d| d == family) {
            "denied by the schedule section".to_string()
        } else if let Some(why) = not_applicable(p, family) {
            format!("not applicable: {why}")
        } else if fired == 0 {
            "did not match".to_string()
        } else if in_plan(p, family) {
            format!("fired {fired}x, in the chosen plan")
        } else {
            format!("fired {fired}x, rejected by the cost model")
        };
        let _ = writeln!(s, "  {family:<18} {status}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "overlap candidates (each scheduled and simulated):");
    let _ = writeln!(
        s,
        "  {:>6}  {:<14} {:<20} {:>5} {:>12}",
        "chunks", "shared", "tokens travel", "lag", "total us"
    );
    let best = c.timeline.total_us;
    for cand in &r.candidates {
        let shared = if p.layer.shared.is_none() {
            "-"
        } else if cand.shared_concurrent {
            "own stream"
        } else {
            "in line"
        };
        let mut mark = String::new();
        if cand.chunks == 1 && !cand.shared_concurrent && cand.routing == RoutingForm::PerAssignment
        {
            mark.push_str("  baseline");
        }
        if cand.chunks == p.choices.chunks
            && cand.shared_concurrent == p.choices.shared_concurrent
            && cand.routing == routing_of(p)
            && (cand.total_us - best).abs() < 1e-9
        {
            mark.push_str("  <- chosen");
        }
        let _ = writeln!(
            s,
            "  {:>6}  {:<14} {:<20} {:>5} {:>12.1}{mark}",
            cand.chunks,
            shared,
            cand.routing.name(),
            cand.combine_lag,
            cand.total_us
        );
    }
    let _ = writeln!(s);
    let ch = &p.choices;
    let _ = writeln!(
        s,
        "chosen: {} chunk(s) of {} tokens; dispatch {}{} in {}; shared experts {}",
        ch.chunks,
        ch.chunk_tokens,
        match ch.dispatch {
            A2aAlgorithm::Flat => "flat",
            A2aAlgorithm::Hierarchical => "hierarchical (one copy per node, then NVLink)",
        },
        match (ch.dedup_dispatch, ch.reduce_combine) {
            (true, true) if ch.dispatch == A2aAlgorithm::Hierarchical => {
                " by rank, combine reduced per rank and per node"
            }
            (true, true) => " by rank, combine reduced per rank",
            (true, false) => " by rank",
            (false, true) => ", combine reduced per rank",
            (false, false) => "",
        },
        ch.dispatch_dtype.name(),
        if p.layer.shared.is_none() {
            "none"
        } else if ch.shared_concurrent {
            "on their own stream during the dispatch"
        } else {
            "after the routed experts"
        }
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<10} {:>12} {:>12}   {:>12} {:>12}",
        "phase", "chosen us", "exposed us", "baseline us", "exposed us"
    );
    for phase in Phase::ALL {
        let a = c.timeline.phase(phase);
        let b = c.baseline_timeline.phase(phase);
        if a.is_none() && b.is_none() {
            continue;
        }
        let f = |x: Option<f64>| x.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "{:<10} {:>12} {:>12}   {:>12} {:>12}",
            phase.name(),
            f(a.map(|x| x.time_us)),
            f(a.map(|x| x.exposed_us)),
            f(b.map(|x| x.time_us)),
            f(b.map(|x| x.exposed_us)),
        );
    }
    let base = c.baseline_timeline.total_us;
    let _ = writeln!(
        s,
        "{:<10} {:>12.1} {:>12}   {:>12.1}",
        "total", best, "", base
    );
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "predicted {:.1} us against {:.1} us without overlap: {:.2}x; memory {} peak activations + {} weights per rank",
        best,
        base,
        base / best.max(1e-9),
        human_bytes(p.memory.peak_activation_bytes),
        human_bytes(p.memory.weight_bytes),
    );
    s
}
