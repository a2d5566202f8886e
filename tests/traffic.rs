//! The bytes a plan moves, counted where the CPU backend hands them to its
//! collectives, against the routing that produced them (exactly) and against
//! the cost model's expectation for uniform routing (within a few percent).
//!
//! Uniform routing is made, not hoped for: the router weight is the identity
//! on the first `experts` input features (so `hidden >= experts`), the
//! selection bias is zero, and the inputs are independent and identically
//! distributed, so every expert's logit has the same distribution and the
//! picks are exchangeable: exactly the routing the cost model assumes.

#![allow(clippy::unwrap_used)]

use moec::compile::{compile, Options};
use moec::cost::RoutingForm;
use moec::run::{apply, expected_traffic, Overrides};
use moec_runtime::cpu::traffic::{total, LinkClass, RankTraffic};
use moec_runtime::cpu::{CpuBackend, CpuOptions, Forward};
use moec_runtime::plan::{A2aAlgorithm, CapacityConfig, Plan};
use moec_runtime::weights::{random_inputs, LayerWeights};

/// Tokens per rank: enough assignments that the mean over ranks is within
/// a fraction of a percent of its expectation.
const TOKENS: u64 = 256;

/// How far the measured mean bytes per rank may be from the plan's figure.
const EXPECTATION_TOLERANCE: f64 = 0.05;

fn examples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "moe"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().to_string();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

/// Compiles `source` shrunk (f32, small FFN, `hidden >= experts`) and runs
/// one pass with uniform routing.
fn run_uniform(name: &str, source: &str, extra: &str, ranks: Option<u64>) -> (Plan, Forward) {
    run_uniform_form(name, source, extra, ranks, None)
}

/// [`run_uniform`] with the plan restricted to one routing form.
fn run_uniform_form(
    name: &str,
    source: &str,
    extra: &str,
    ranks: Option<u64>,
    routing: Option<RoutingForm>,
) -> (Plan, Forward) {
    let source = format!("{source}{extra}");
    let (program, _) = moec_lang::check_source(&source)
        .program
        .unwrap_or_else(|| panic!("{name} does not check"));
    let mut program = program.clone();
    let hidden = program.layer.experts.count.max(64);
    let overrides = Overrides {
        ranks,
        tokens: Some(TOKENS),
        dtype: Some(moec_lang::spec::DType::F32),
        hidden: Some(hidden),
        ffn: Some(16),
    };
    apply(&mut program, &overrides).unwrap();
    let options = Options {
        routing,
        ..Options::default()
    };
    let plan = compile(&program, &options)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .plan;
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let mut weights = LayerWeights::random(&layer, 11);
    let (e, h) = (layer.experts as usize, layer.hidden as usize);
    weights.router = (0..e * h)
        .map(|i| if i % h == i / h { 1.0 } else { 0.0 })
        .collect();
    if let Some(bias) = weights.router_bias.as_mut() {
        bias.iter_mut().for_each(|b| *b = 0.0);
    }
    let inputs = random_inputs(&layer, ranks, TOKENS as usize, 11);
    let backend = CpuBackend::new(plan.clone(), &weights, CpuOptions::default()).unwrap();
    let forward = backend.forward(&inputs).unwrap();
    (plan, forward)
}

fn rows(traffic: &RankTraffic, collective: &str) -> u64 {
    LinkClass::ALL
        .iter()
        .filter_map(|l| traffic.get(&(collective.to_string(), *l)))
        .map(|m| m.rows)
        .sum()
}

/// Every kept assignment leaves its source once on the flat dispatch and
/// comes back once on the combine; on the hierarchical all-to-all, once on
/// the fan-out inside the node and once on each combine leg.
fn check_conservation(name: &str, plan: &Plan, forward: &Forward) {
    let sum = total(&forward.traffic);
    let kept = forward.stats.assignments - forward.stats.dropped;
    // Every collective that carries one row per kept assignment.
    const PER_ASSIGNMENT: [&str; 5] = [
        "dispatch",
        "dispatch intra-node",
        "combine",
        "combine intra-node",
        "combine inter-node",
    ];
    let collectives: Vec<String> = expected_traffic(plan).into_iter().map(|(n, _)| n).collect();
    let legs: Vec<&str> = PER_ASSIGNMENT
        .into_iter()
        .filter(|leg| collectives.iter().any(|c| c == leg))
        .collect();
    assert!(legs.len() >= 2, "{name}: collectives {collectives:?}");
    for leg in legs {
        assert_eq!(
            rows(&sum, leg),
            kept,
            "{name}: {leg} moved {} rows for {kept} kept assignments",
            rows(&sum, leg)
        );
    }
    if plan.choices.dispatch == A2aAlgorithm::Hierarchical {
        // One copy per token and destination node: never more than the tokens
        // times the nodes, never more than the assignments.
        let staged = rows(&sum, "dispatch inter-node");
        let tokens = forward.outputs.len() as u64 * TOKENS;
        assert!(staged <= kept, "{name}: {staged} staged rows");
        assert!(
            staged >= tokens.min(kept) / 2,
            "{name}: {staged} staged rows"
        );
    }
}

/// The mean bytes per rank over the links, per collective, against the plan.
fn check_expectation(name: &str, plan: &Plan, forward: &Forward) {
    let ranks = forward.traffic.len() as f64;
    let sum = total(&forward.traffic);
    for (collective, plan_bytes) in expected_traffic(plan) {
        let measured: u64 = [LinkClass::IntraNode, LinkClass::InterNode]
            .iter()
            .filter_map(|l| sum.get(&(collective.clone(), *l)))
            .map(|m| m.bytes)
            .sum();
        let mean = measured as f64 / ranks;
        let want = plan_bytes as f64;
        let off = (mean - want).abs() / want.max(1.0);
        assert!(
            off <= EXPECTATION_TOLERANCE,
            "{name}: {collective}: {mean:.0} B per rank measured, the plan expects {want:.0} B \
             ({:.1}% off)",
            off * 100.0
        );
    }
}

/// Every multi-rank example: the rows are conserved exactly, and in dropless
/// plans the bytes per rank are within a few percent of the plan's figures.
/// (Capacity plans drop by the real, fluctuating load: `E[min(C, load)]` is
/// below `min(C, E[load])`, which the cost model charges, so only the exact
/// count is checked there.)
#[test]
fn every_example_moves_the_rows_its_routing_needs_and_the_bytes_its_plan_expects() {
    let mut checked = 0;
    for (name, source) in examples() {
        let (plan, forward) = run_uniform(&name, &source, "", None);
        if plan.mesh.ep < 2 {
            continue;
        }
        check_conservation(&name, &plan, &forward);
        if plan.layer.capacity == CapacityConfig::Dropless {
            check_expectation(&name, &plan, &forward);
        }
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} multi-rank examples");
}

/// DeepSeek-V3 on two nodes of eight ranks, hierarchical and flat: the same
/// routing, each form's own legs, each as its plan expects.
#[test]
fn hierarchical_and_flat_legs_move_what_their_plans_expect() {
    let source = examples()
        .into_iter()
        .find(|(n, _)| n == "deepseek_v3")
        .map(|(_, s)| s)
        .unwrap()
        // A slow network, where the hierarchical form wins at this size.
        .replace("bandwidth = 400 Gb/s", "bandwidth = 10 Gb/s");
    // Per-pick routing in both, so the two all-to-alls are compared alone.
    let hierarchical = "\nschedule {\n    deny = [dedup_dispatch, reduce_combine]\n}\n";
    let flat = "\nschedule {\n    deny = [hierarchical_a2a, dedup_dispatch, reduce_combine]\n}\n";
    for (extra, want) in [
        (hierarchical, A2aAlgorithm::Hierarchical),
        (flat, A2aAlgorithm::Flat),
    ] {
        let (plan, forward) = run_uniform("deepseek_v3 on 16 ranks", &source, extra, Some(16));
        assert_eq!(plan.choices.dispatch, want);
        check_conservation("deepseek_v3 on 16 ranks", &plan, &forward);
        check_expectation("deepseek_v3 on 16 ranks", &plan, &forward);
    }
}

/// Dispatch by rank on every multi-rank example that allows it: one row per
/// (token, destination rank), never more than one per kept assignment (as
/// DeepEP sends); with the reducing combine, the same rows come back, so the
/// return trip moves what the dispatch moved; the bytes per rank are within a
/// few percent of the plan's figures.
#[test]
fn dispatch_by_rank_moves_one_row_per_token_and_rank() {
    let mut checked = 0;
    for (name, source) in examples() {
        for form in [RoutingForm::DedupDispatch, RoutingForm::DedupReduce] {
            let (program, _) = moec_lang::check_source(&source).program.unwrap();
            if program.mesh.ep < 2 || program.layer.router.top_k < 2 {
                continue;
            }
            let label = format!("{name} ({})", form.name());
            let (plan, forward) = run_uniform_form(&label, &source, "", None, Some(form));
            let sum = total(&forward.traffic);
            let kept = forward.stats.assignments - forward.stats.dropped;
            let by_rank = rows(&sum, "dispatch by rank");
            assert!(
                by_rank > 0 && by_rank <= forward.stats.assignments,
                "{label}: {by_rank} rows"
            );
            // Several experts per rank: some tokens pick two on one rank.
            let per_rank = plan.mesh.experts_of_ep_rank.iter().map(Vec::len).max();
            if plan.layer.capacity == CapacityConfig::Dropless && per_rank > Some(1) {
                assert!(by_rank < kept, "{label}: {by_rank} rows for {kept} picks");
            }
            if form == RoutingForm::DedupReduce {
                assert_eq!(rows(&sum, "combine by rank"), by_rank, "{label}");
            } else {
                assert_eq!(rows(&sum, "combine"), kept, "{label}");
            }
            if plan.layer.capacity == CapacityConfig::Dropless {
                check_expectation(&label, &plan, &forward);
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} by-rank runs");
}

/// DeepSeek-V3 on two nodes, by rank through the hierarchical legs with the
/// reducing combine: one row per (token, node) crosses the network each way
/// (the forwarder sums before the return trip), one row per (token, rank)
/// crosses NVLink each way, and the bytes are what the plan expects.
#[test]
fn hierarchical_legs_by_rank_move_one_row_per_token_and_node_each_way() {
    let source = examples()
        .into_iter()
        .find(|(n, _)| n == "deepseek_v3")
        .map(|(_, s)| s)
        .unwrap()
        .replace("bandwidth = 400 Gb/s", "bandwidth = 10 Gb/s");
    let name = "deepseek_v3 on 16 ranks by rank";
    let (plan, forward) = run_uniform_form(
        name,
        &source,
        "",
        Some(16),
        Some(RoutingForm::NodeDedupReduce),
    );
    assert_eq!(plan.choices.dispatch, A2aAlgorithm::Hierarchical);
    let sum = total(&forward.traffic);
    let staged = rows(&sum, "dispatch by rank inter-node");
    let tokens = forward.outputs.len() as u64 * TOKENS;
    assert!(
        staged >= tokens && staged <= 2 * tokens,
        "{staged} staged rows"
    );
    assert_eq!(rows(&sum, "combine by rank inter-node"), staged);
    let fanned = rows(&sum, "dispatch by rank intra-node");
    assert!(
        fanned >= staged && fanned < forward.stats.assignments,
        "{fanned} rows"
    );
    assert_eq!(rows(&sum, "combine by rank intra-node"), fanned);
    check_expectation(name, &plan, &forward);
}

/// Rows one pass moved over each link, summed over ranks: (dispatch
/// intra-node, dispatch inter-node, combine intra-node, combine
/// inter-node). The routing metadata beside the rows (`dispatch picks`) and
/// the count exchange are not rows of tokens.
fn link_rows(forward: &Forward) -> [u64; 4] {
    let sum = total(&forward.traffic);
    let mut out = [0u64; 4];
    for ((collective, link), moved) in &sum {
        let combine = collective.starts_with("combine");
        if !(combine || collective.starts_with("dispatch")) || collective == "dispatch picks" {
            continue;
        }
        let at = match link {
            LinkClass::IntraNode => 0,
            LinkClass::InterNode => 1,
            LinkClass::Local => continue,
        };
        out[at + 2 * usize::from(combine)] += moved.rows;
    }
    out
}

/// The batch up to which DeepEP's users run its low-latency kernels
/// (decoding): its README asks for `num_max_dispatch_tokens_per_rank`, "the
/// actual batch size in the decoding engine", below 256, and SGLang and
/// vLLM set 128. Those kernels send one message per (token, expert) pick,
/// straight to the expert's rank (no forwarding, no deduplication), and
/// return one per pick, summed at the source (`internode_ll.cu`): the rows
/// of our per-pick flat all-to-all. Above it, DeepEP's normal kernels send
/// a token once per destination node across the network and once per
/// destination rank over NVLink, and sum the expert outputs per rank and
/// per node before the return trip.
const DEEPEP_LOW_LATENCY_TOKENS: u64 = 128;

/// Every multi-rank example in the routing form the compiler chooses for it
/// at full size, against the same layer in the form DeepEP would run at the
/// layer's batch ([`DEEPEP_LOW_LATENCY_TOKENS`]), on the same uniform
/// routing: rows per link and direction. No example moves more on any link
/// (top-1 layers have nothing to deduplicate). Prints the table
/// BENCHMARKS.md shows (`-- --nocapture`).
#[test]
fn the_chosen_plans_against_deepeps_rows_per_link() {
    let mut table = String::from(
        "| example | chosen form | DeepEP's kernels | dispatch NVLink | dispatch network | combine NVLink | combine network |\n| --- | --- | --- | ---: | ---: | ---: | ---: |\n",
    );
    for (name, source) in examples() {
        let (program, _) = moec_lang::check_source(&source).program.unwrap();
        if program.mesh.ep < 2 {
            continue;
        }
        let full = compile(&program, &Options::default()).unwrap().plan;
        let chosen = RoutingForm::of(&full.choices);
        let (_, ours) = run_uniform_form(&name, &source, "", None, Some(chosen));
        let ours = link_rows(&ours);
        let low_latency = program.layer.tokens_per_rank <= DEEPEP_LOW_LATENCY_TOKENS;
        let deepep = if program.layer.router.top_k < 2 {
            // One row per token each way whatever the form: nothing to
            // deduplicate (DeepEP also forwards over NVLink what a flat
            // all-to-all sends straight).
            ours
        } else if low_latency {
            let (plan, forward) =
                run_uniform_form(&name, &source, "", None, Some(RoutingForm::PerAssignment));
            assert_eq!(
                plan.choices.dispatch,
                A2aAlgorithm::Flat,
                "{name}: DeepEP's low-latency kernels do not forward"
            );
            link_rows(&forward)
        } else {
            let multi_node = full.mesh.nodes > 1 && full.mesh.ep > full.mesh.gpus_per_node;
            let form = if multi_node {
                RoutingForm::NodeDedupReduce
            } else {
                RoutingForm::DedupReduce
            };
            link_rows(&run_uniform_form(&name, &source, "", None, Some(form)).1)
        };
        let above = ours.iter().zip(&deepep).any(|(o, d)| o > d);
        assert!(
            !above,
            "{name} ({}): rows per link {ours:?}, DeepEP's {deepep:?}",
            chosen.name()
        );
        let cell = |i: usize| {
            if ours[i] == deepep[i] {
                format!("{}", ours[i])
            } else {
                format!("{} ({} DeepEP)", ours[i], deepep[i])
            }
        };
        let kernels = if low_latency { "low-latency" } else { "normal" };
        table.push_str(&format!(
            "| {name} | {} | {kernels} | {} | {} | {} | {} |\n",
            chosen.name(),
            cell(0),
            cell(1),
            cell(2),
            cell(3)
        ));
    }
    eprintln!("{table}");
}
