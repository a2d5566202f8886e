//! Bounded dropless buffers: a dropless plan's expert-side buffers hold the
//! expected load times a headroom, not the worst case; a pass whose routing
//! needs more stops at the assignment, before any row moves, and runs again
//! on the plan grown to the real counts. The answer must be exactly the one
//! of the worst-case plan, every routing form, concurrent and shuffled.

#![allow(clippy::unwrap_used)]

use moec::compile::{compile, Options};
use moec::cost::RoutingForm;
use moec::run::{apply, Overrides};
use moec_runtime::cpu::{CpuBackend, CpuOptions, Forward};
use moec_runtime::plan::{Plan, RowBound};
use moec_runtime::weights::{random_inputs, LayerWeights};

fn tiny_source(schedule: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.moe");
    format!("{}\n{schedule}\n", std::fs::read_to_string(path).unwrap())
}

fn compile_form(source: &str, overrides: &Overrides, routing: Option<RoutingForm>) -> Plan {
    let (program, _) = moec_lang::check_source(source).program.unwrap();
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    let options = Options {
        routing,
        ..Options::default()
    };
    compile(&program, &options).unwrap().plan
}

fn run(plan: Plan, weights: &LayerWeights, seed: u64, shuffled: bool) -> Forward {
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, seed);
    let backend = CpuBackend::new(plan, weights, CpuOptions::default()).unwrap();
    if shuffled {
        backend.forward_shuffled(&inputs, seed).unwrap()
    } else {
        backend.forward(&inputs).unwrap()
    }
}

/// The worst case a dropless plan's expert buffers would need: every token
/// of the EP group's chunk to every local expert (at most `top_k` of them).
fn worst_expert_rows(plan: &Plan) -> u64 {
    let local = plan
        .mesh
        .experts_of_ep_rank
        .iter()
        .map(Vec::len)
        .max()
        .unwrap() as u64;
    plan.choices.chunk_tokens * plan.mesh.ep * plan.mesh.etp * plan.layer.router.top_k.min(local)
}

#[test]
fn the_default_headroom_bounds_the_buffers_and_uniform_routing_never_grows_them() {
    let plan = compile_form(&tiny_source(""), &Overrides::default(), None);
    assert_eq!(plan.choices.headroom, Some(2.0));
    // 32 tokens x top-2 expected per rank, twice that held; the worst case
    // is all 4 ranks' 32 tokens to both local experts.
    assert_eq!(plan.choices.expert_rows, 128);
    assert_eq!(worst_expert_rows(&plan), 256);
    let bounded: Vec<&str> = plan
        .buffers
        .iter()
        .filter(|b| b.bound == Some(RowBound::ExpertRows))
        .map(|b| b.name.as_str())
        .collect();
    assert!(bounded.contains(&"recv"), "{bounded:?}");
    assert!(bounded.contains(&"expert_act"), "{bounded:?}");
    for b in plan.buffers.iter().filter(|b| b.bound.is_some()) {
        assert_eq!(b.shape[0], 128, "{}", b.name);
    }
    let weights = LayerWeights::random(&plan.layer, 1);
    for seed in 0..4 {
        let f = run(plan.clone(), &weights, seed, false);
        assert_eq!(
            f.grown, None,
            "seed {seed}: uniform routing grew the buffers"
        );
    }
    // `headroom = worst_case` keeps every row the routing could send.
    let worst = compile_form(
        &tiny_source("schedule {\n headroom = worst_case\n}"),
        &Overrides::default(),
        None,
    );
    assert_eq!(worst.choices.headroom, None);
    assert_eq!(worst.choices.expert_rows, 256);
    assert!(worst.memory.peak_activation_bytes > plan.memory.peak_activation_bytes);
}

/// Every token picks experts 0 and 1 (a zero router ties every logit, and
/// the top-k keeps the lowest indices): rank 0 receives every row of the
/// group, twice what the bounded buffers hold.
#[test]
fn skewed_routing_grows_the_buffers_and_gives_the_worst_case_answer() {
    let plan = compile_form(&tiny_source(""), &Overrides::default(), None);
    let worst = compile_form(
        &tiny_source("schedule {\n headroom = worst_case\n}"),
        &Overrides::default(),
        None,
    );
    let mut weights = LayerWeights::random(&plan.layer, 3);
    weights.router.iter_mut().for_each(|w| *w = 0.0);
    let want = run(worst, &weights, 7, false);
    assert_eq!(want.grown, None);
    assert_eq!(want.stats.routed_per_expert[..2], [128, 128]);

    let layer = plan.layer.clone();
    let inputs = random_inputs(&layer, 4, 32, 7);
    let backend = CpuBackend::new(plan, &weights, CpuOptions::default()).unwrap();
    let got = backend.forward(&inputs).unwrap();
    let grown = got
        .grown
        .clone()
        .expect("the pass should have grown the buffers");
    assert_eq!(grown.planned.expert_rows, 128);
    assert_eq!(grown.needed.expert_rows, 256);
    assert_eq!(grown.reruns, 1);
    assert!(
        got.outputs == want.outputs,
        "the grown pass differs from the worst-case plan"
    );
    assert_eq!(got.stats, want.stats);
    // The backend keeps the grown buffers: the next pass does not re-run.
    let again = backend.forward(&inputs).unwrap();
    assert_eq!(again.grown, None);
    assert!(again.outputs == want.outputs);
    // The race check on a fresh backend grows the same way.
    let fresh = CpuBackend::new(backend.plan().clone(), &weights, CpuOptions::default()).unwrap();
    let shuffled = fresh.forward_shuffled(&inputs, 5).unwrap();
    assert_eq!(shuffled.grown.map(|g| g.needed), Some(grown.needed));
    assert!(shuffled.outputs == want.outputs);
}

/// A budget that holds the bounded plan but not the grown one: a clear
/// error naming both row counts, never an allocation past the budget.
#[test]
fn growing_past_the_memory_budget_is_an_error() {
    let plan = compile_form(&tiny_source(""), &Overrides::default(), None);
    let mut weights = LayerWeights::random(&plan.layer, 3);
    weights.router.iter_mut().for_each(|w| *w = 0.0);
    let need = moec_runtime::footprint::Footprint::of(&plan).total();
    let options = CpuOptions {
        memory_budget: Some(need + 1024),
        ..CpuOptions::default()
    };
    let inputs = random_inputs(&plan.layer, 4, 32, 7);
    let backend = CpuBackend::new(plan, &weights, options).unwrap();
    let e = backend.forward(&inputs).unwrap_err().to_string();
    for part in ["256 expert rows", "hold 128", "does not fit"] {
        assert!(e.contains(part), "`{part}` is not in: {e}");
    }
}

/// DeepSeek-V3 shrunk onto two nodes, its selection bias steering every
/// token to the experts of rank 0: the by-rank forms (flat and across
/// nodes, with the reducing combine) overflow both bounds, grow, and give
/// the worst-case plan's answer bit for bit.
#[test]
fn skewed_routing_grows_every_routing_form() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deepseek_v3.moe");
    let source = std::fs::read_to_string(path)
        .unwrap()
        .replace("bandwidth = 400 Gb/s", "bandwidth = 10 Gb/s");
    let overrides = Overrides {
        ranks: Some(16),
        tokens: Some(128),
        dtype: Some(moec_lang::spec::DType::F32),
        hidden: Some(64),
        ffn: Some(32),
    };
    let worst_source = format!("{source}\nschedule {{\n headroom = worst_case\n}}\n");
    for form in [
        RoutingForm::PerAssignment,
        RoutingForm::DedupReduce,
        RoutingForm::NodeDedupReduce,
    ] {
        let plan = compile_form(&source, &overrides, Some(form));
        let worst = compile_form(&worst_source, &overrides, Some(form));
        let mut weights = LayerWeights::random(&plan.layer, 11);
        let bias = weights.router_bias.as_mut().unwrap();
        // Experts 0-15 live on EP rank 0 and in the first group.
        bias.iter_mut().take(16).for_each(|b| *b = 100.0);
        let want = run(worst, &weights, 2, false);
        for shuffled in [false, true] {
            let got = run(plan.clone(), &weights, 2, shuffled);
            let grown = got
                .grown
                .clone()
                .unwrap_or_else(|| panic!("{}: no growth", form.name()));
            assert!(
                grown.needed.expert_rows > grown.planned.expert_rows,
                "{}",
                form.name()
            );
            if plan.choices.dedup_dispatch {
                assert!(
                    grown.needed.rank_rows > grown.planned.rank_rows,
                    "{}",
                    form.name()
                );
            }
            assert!(
                got.outputs == want.outputs,
                "{} (shuffled {shuffled}): the grown pass differs from the worst-case plan",
                form.name()
            );
        }
    }
}
