//! The CPU runtime against the independent reference (`reference.rs`): every
//! router variant of MODELS.md, capacity with both drop policies, dropless,
//! shared experts with and without their gate, biases, the clamped SwiGLU,
//! the weight on the input, GELU and ReLU experts, chunked (overlapped)
//! plans, unfused kernel chains, and every example shrunk. In f32 the largest
//! difference must stay under 1e-5 of the largest output value; the routing
//! statistics (assignments per expert, drops) must match exactly.

#![allow(clippy::unwrap_used)]

use moec::compile::{compile, Options};
use moec::cost::RoutingForm;
use moec::run::{apply, Overrides};
use moec_runtime::cpu::{CpuBackend, CpuOptions};
use moec_runtime::weights::{random_inputs, LayerWeights};
use moec_tests::reference::{self, Tensor};
use std::collections::BTreeMap;

/// Compiles `source` (with `overrides`), runs it on the CPU backend with
/// random weights and inputs, runs the reference, and returns the relative error.
fn run_against_reference(
    name: &str,
    source: &str,
    overrides: &Overrides,
    seed: u64,
    shuffles: u64,
) -> f64 {
    run_form_against_reference(name, source, overrides, seed, shuffles, None)
}

/// [`run_against_reference`] with the plan restricted to one routing form.
fn run_form_against_reference(
    name: &str,
    source: &str,
    overrides: &Overrides,
    seed: u64,
    shuffles: u64,
    routing: Option<RoutingForm>,
) -> f64 {
    let checked = moec_lang::check_source(source);
    let (program, _) = checked
        .program
        .unwrap_or_else(|| panic!("{name}: {:?}", checked.diagnostics));
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    let options = Options {
        routing,
        ..Options::default()
    };
    let compiled = compile(&program, &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let plan = compiled.plan;
    if let Some(form) = routing {
        assert_eq!(RoutingForm::of(&plan.choices), form, "{name}: routing form");
    }
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let ep = plan.mesh.ep as usize;
    let weights = LayerWeights::random(&layer, seed);
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, seed);
    let backend = CpuBackend::new(plan, &weights, CpuOptions::default()).unwrap();
    let got = backend.forward(&inputs).unwrap();
    // Race check: random legal interleavings of every rank's streams give
    // bit-identical outputs.
    for s in 0..shuffles {
        let shuffled = backend.forward_shuffled(&inputs, s).unwrap();
        assert!(
            shuffled.outputs == got.outputs,
            "{name}: interleaving {s} changed the output"
        );
    }

    let tensors: BTreeMap<String, Tensor> = weights
        .tensors()
        .into_iter()
        .map(|(n, shape, data)| (n, Tensor::new(shape, data.to_vec())))
        .collect();
    let want = reference::forward(&layer, ep, &inputs, &tensors).unwrap();
    assert_eq!(
        got.stats.routed_per_expert, want.tokens_per_expert,
        "{name}: assignments per expert"
    );
    assert_eq!(
        got.stats.dropped, want.dropped,
        "{name}: dropped assignments"
    );
    let mut max_diff = 0.0f64;
    let mut max_ref = 0.0f64;
    for (g, w) in got
        .outputs
        .iter()
        .flatten()
        .zip(want.outputs.iter().flatten())
    {
        max_diff = max_diff.max(f64::from((g - w).abs()));
        max_ref = max_ref.max(f64::from(w.abs()));
    }
    assert!(max_ref > 1e-3, "{name}: the outputs are all (nearly) zero");
    max_diff / max_ref
}

fn assert_close(name: &str, source: &str, overrides: Overrides) {
    for seed in [1, 2] {
        let err = run_against_reference(name, source, &overrides, seed, 0);
        assert!(err < 1e-5, "{name} (seed {seed}): relative error {err:e}");
    }
}

/// A small layer with the given router, experts and capacity, on 4 ranks.
fn layer(router: &str, experts: &str, extra: &str, schedule: &str) -> String {
    format!(
        "layer t {{\n hidden = 32\n dtype = f32\n tokens_per_rank = 48\n experts {{\n count = 16\n {experts}\n }}\n router {{\n {router}\n }}\n {extra}\n}}\n\nmesh {{\n gpus_per_node = 4\n device = H100\n ep = 4\n}}\n{schedule}\n"
    )
}

const SWIGLU: &str = "ffn = swiglu\n intermediate = 24";

#[test]
fn mixtral_router_softmax_topk2_normalised() {
    let s = layer(
        "scoring = softmax\n top_k = 2\n normalize = true",
        SWIGLU,
        "",
        "",
    );
    assert_close("mixtral", &s, Overrides::default());
}

#[test]
fn deepseek_router_sigmoid_bias_groups_scale_shared() {
    let s = layer(
        "scoring = sigmoid\n top_k = 4\n selection_bias = true\n groups = 4\n groups_kept = 2\n group_score = top2_sum\n normalize = true\n scale = 2.5",
        SWIGLU,
        "shared_experts {\n intermediate = 24\n }",
        "",
    );
    assert_close("deepseek", &s, Overrides::default());
}

#[test]
fn group_score_max() {
    let s = layer(
        "scoring = sigmoid\n top_k = 2\n groups = 8\n groups_kept = 3\n group_score = max",
        SWIGLU,
        "",
        "",
    );
    assert_close("group max", &s, Overrides::default());
}

#[test]
fn qwen2_router_unnormalised_gated_shared() {
    let s = layer(
        "scoring = softmax\n top_k = 4",
        SWIGLU,
        "shared_experts {\n intermediate = 64\n gate = sigmoid\n }",
        "",
    );
    assert_close("qwen2", &s, Overrides::default());
}

#[test]
fn gpt_oss_softmax_over_topk_clamped_swiglu_with_biases() {
    let s = layer(
        "scoring = softmax\n top_k = 4\n softmax_over = topk",
        "ffn = swiglu\n intermediate = 24\n bias = true\n swiglu_limit = 7.0",
        "",
        "",
    );
    assert_close("gpt-oss", &s, Overrides::default());
}

#[test]
fn gpt_oss_router_logit_bias() {
    let s = layer(
        "scoring = softmax\n top_k = 4\n logit_bias = true\n softmax_over = topk",
        "ffn = swiglu\n intermediate = 24\n bias = true\n swiglu_limit = 7.0",
        "",
        "",
    );
    assert_close("gpt-oss with its router bias", &s, Overrides::default());
    // The logit bias beside a selection bias, groups and sigmoid scores:
    // the one changes the scores, the other only the choice.
    let s = layer(
        "scoring = sigmoid\n top_k = 4\n logit_bias = true\n selection_bias = true\n groups = 4\n groups_kept = 2\n normalize = true\n scale = 2.5",
        SWIGLU,
        "",
        "",
    );
    assert_close(
        "sigmoid with logit and selection biases",
        &s,
        Overrides::default(),
    );
}

#[test]
fn the_plan_carries_the_logit_bias_only_when_the_layer_has_it() {
    let with = compile_with(
        &layer(
            "scoring = softmax\n top_k = 4\n logit_bias = true\n softmax_over = topk",
            SWIGLU,
            "",
            "",
        ),
        &Overrides::default(),
    );
    let json = with.to_json();
    assert!(json.contains("\"logit_bias\": true"), "{json}");
    assert!(with
        .to_string()
        .contains("softmax over the top-k + logit bias"));
    let back = moec_runtime::Plan::from_json(&json).unwrap();
    assert!(back.layer.router.logit_bias);
    let without = compile_with(
        &layer("scoring = softmax\n top_k = 4", SWIGLU, "", ""),
        &Overrides::default(),
    );
    assert!(!without.to_json().contains("logit_bias"));
}

#[test]
fn llama4_sigmoid_top1_weight_on_input_with_shared() {
    let s = layer(
        "scoring = sigmoid\n top_k = 1\n weight_on = input",
        SWIGLU,
        "shared_experts {\n intermediate = 24\n }",
        "",
    );
    assert_close("llama4", &s, Overrides::default());
}

#[test]
fn gelu_and_relu_experts() {
    for ffn in ["gelu", "gelu_tanh", "relu"] {
        let experts = format!("ffn = {ffn}\n intermediate = 24\n bias = true");
        let s = layer("scoring = softmax\n top_k = 2", &experts, "", "");
        assert_close(ffn, &s, Overrides::default());
    }
}

#[test]
fn capacity_drops_by_position_and_by_probs() {
    for drop in ["position", "probs"] {
        let s = layer(
            "scoring = softmax\n top_k = 1",
            "ffn = relu\n intermediate = 24",
            &format!("capacity {{\n factor = 0.5\n drop = {drop}\n }}"),
            "",
        );
        assert_close(drop, &s, Overrides::default());
    }
}

#[test]
fn chunked_plans_match() {
    for d in [2, 3] {
        let s = layer(
            "scoring = softmax\n top_k = 2\n normalize = true",
            SWIGLU,
            "shared_experts {\n intermediate = 24\n }",
            &format!("schedule {{\n overlap = {d}\n }}"),
        );
        assert_close("chunked", &s, Overrides::default());
        let s = layer(
            "scoring = softmax\n top_k = 2",
            "ffn = relu\n intermediate = 24",
            "capacity {\n factor = 0.75\n drop = position\n }",
            &format!("schedule {{\n overlap = {d}\n }}"),
        );
        assert_close("chunked capacity", &s, Overrides::default());
    }
}

#[test]
fn unfused_kernel_chains_match() {
    let s = layer(
        "scoring = sigmoid\n top_k = 4\n selection_bias = true\n groups = 4\n groups_kept = 2\n normalize = true\n scale = 2.5",
        SWIGLU,
        "shared_experts {\n intermediate = 24\n gate = sigmoid\n }",
        "schedule {\n allow = []\n }",
    );
    assert_close("unfused", &s, Overrides::default());
}

/// Every example, shrunk, in f32, on its own mesh, against the reference and
/// under three shuffled interleavings.
#[test]
fn every_example_shrunk_matches_the_reference_and_survives_shuffles() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "moe"))
        .collect();
    names.sort();
    assert!(names.len() >= 8);
    for path in names {
        let source = std::fs::read_to_string(&path).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let (program, _) = moec_lang::check_source(&source).program.unwrap();
        let fp8 = program.layer.dispatch_dtype == moec_lang::spec::DType::Fp8E4m3;
        let overrides = Overrides {
            ranks: None,
            tokens: Some(128),
            dtype: Some(moec_lang::spec::DType::F32),
            hidden: Some(64),
            ffn: Some(32),
        };
        let err = run_against_reference(&name, &source, &overrides, 3, 3);
        // fp8 e4m3 keeps 3 mantissa bits on the wire: a few percent.
        let bound = if fp8 { 0.08 } else { 1e-5 };
        assert!(
            err < bound,
            "{name}: relative error {err:e} (bound {bound:e})"
        );
    }
}

fn deepseek_on_two_nodes(dtype: moec_lang::spec::DType, tokens: u64) -> (String, Overrides) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deepseek_v3.moe");
    // A slow network (10 Gb/s), where one copy of a token per node pays even
    // at this small size (at 400 Gb/s the flat all-to-all wins below about
    // a thousand tokens: the hierarchical legs run one after the other).
    let source = std::fs::read_to_string(path)
        .unwrap()
        .replace("bandwidth = 400 Gb/s", "bandwidth = 10 Gb/s");
    let overrides = Overrides {
        ranks: Some(16),
        tokens: Some(tokens),
        dtype: Some(dtype),
        hidden: Some(64),
        ffn: Some(32),
    };
    (source, overrides)
}

fn compile_with(source: &str, overrides: &Overrides) -> moec_runtime::Plan {
    let (program, _) = moec_lang::check_source(source).program.unwrap();
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    compile(&program, &Options::default()).unwrap().plan
}

/// DeepSeek-V3 on two nodes of eight ranks, at a size where the compiler
/// picks the hierarchical dispatch (one copy of a token per destination node,
/// forwarded inside the node): the reference's numbers, under shuffled
/// interleavings.
#[test]
fn hierarchical_dispatch_matches_the_reference() {
    let (source, overrides) = deepseek_on_two_nodes(moec_lang::spec::DType::F32, 256);
    // f32 on the wire, for the 1e-5 bound (the slow network would pick fp8).
    let source = format!("{source}\nschedule {{\n    deny = [fp8_dispatch]\n}}\n");
    let plan = compile_with(&source, &overrides);
    assert_eq!(
        plan.choices.dispatch,
        moec_runtime::plan::A2aAlgorithm::Hierarchical,
        "this size should pick the hierarchical dispatch"
    );
    let err = run_against_reference("deepseek_v3 hierarchical", &source, &overrides, 4, 2);
    assert!(err < 1e-5, "relative error {err:e}");
}

/// In bf16 (where the reference's f64 router may break near-ties differently)
/// the hierarchical dispatch must move exactly the bytes the flat one does,
/// per pick and by rank (the combines return the same rows either way; only
/// the reducing combine adds in another order).
#[test]
fn hierarchical_and_flat_dispatch_agree_bit_for_bit() {
    hierarchical_and_flat_agree(RoutingForm::PerAssignment, RoutingForm::PerAssignment);
    hierarchical_and_flat_agree(RoutingForm::NodeDedupDispatch, RoutingForm::DedupDispatch);
}

fn hierarchical_and_flat_agree(hierarchical: RoutingForm, flat: RoutingForm) {
    let (source, overrides) = deepseek_on_two_nodes(moec_lang::spec::DType::Bf16, 512);
    let flat_source = format!("{source}\nschedule {{\n    deny = [hierarchical_a2a]\n}}\n");
    let mut outputs = Vec::new();
    for (src, want, form) in [
        (
            &source,
            moec_runtime::plan::A2aAlgorithm::Hierarchical,
            hierarchical,
        ),
        (&flat_source, moec_runtime::plan::A2aAlgorithm::Flat, flat),
    ] {
        let (program, _) = moec_lang::check_source(src).program.unwrap();
        let mut program = program.clone();
        apply(&mut program, &overrides).unwrap();
        let options = Options {
            routing: Some(form),
            ..Options::default()
        };
        let plan = compile(&program, &options).unwrap().plan;
        assert_eq!(plan.choices.dispatch, want, "{}", form.name());
        let layer = plan.layer.clone();
        let weights = LayerWeights::random(&layer, 5);
        let inputs = random_inputs(&layer, 16, layer.tokens_per_rank as usize, 5);
        let backend = CpuBackend::new(plan, &weights, CpuOptions::default()).unwrap();
        outputs.push(backend.forward(&inputs).unwrap().outputs);
    }
    assert!(
        outputs[0] == outputs[1],
        "{}: hierarchical and flat outputs differ",
        flat.name()
    );
}

/// Finite but huge expert weights overflow the layer: the pass fails and
/// says so, naming the phase and op where the values first appear, instead
/// of returning `inf` as if it were an answer; with `NonFinite::Warn` the
/// pass returns its output and the same message as a warning.
#[test]
fn an_overflowing_layer_is_an_error_not_an_infinite_output() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.moe");
    let source = std::fs::read_to_string(path).unwrap();
    let plan = compile_with(&source, &Overrides::default());
    let layer = plan.layer.clone();
    let mut weights = LayerWeights::random(&layer, 1);
    for expert in &mut weights.experts {
        expert.down.iter_mut().for_each(|w| *w = 3e38);
    }
    let inputs = random_inputs(&layer, 4, layer.tokens_per_rank as usize, 1);
    let backend = CpuBackend::new(plan.clone(), &weights, CpuOptions::default()).unwrap();
    let e = backend
        .forward(&inputs)
        .expect_err("an overflow is an error");
    let text = e.to_string();
    for part in [
        "non-finite",
        "first appear in the experts phase",
        "`experts down gemm`",
        "`expert_out`",
        "an expert FFN overflowed",
    ] {
        assert!(text.contains(part), "`{part}` is not in: {text}");
    }
    // The shuffled (race-check) pass reports the same.
    let e = backend.forward_shuffled(&inputs, 3).unwrap_err();
    assert!(e.to_string().contains("experts phase"), "{e}");
    // A warning instead, when asked for.
    let warn = CpuOptions {
        non_finite: moec_runtime::cpu::NonFinite::Warn,
        ..CpuOptions::default()
    };
    let backend = CpuBackend::new(plan, &weights, warn.clone()).unwrap();
    let f = backend.forward(&inputs).unwrap();
    assert!(f.outputs.iter().flatten().any(|v| !v.is_finite()));
    assert_eq!(f.warnings.len(), 1, "{:?}", f.warnings);
    assert!(f.warnings[0].contains("experts phase"), "{:?}", f.warnings);
    // A finite pass warns of nothing.
    let fine = LayerWeights::random(&layer, 1);
    let backend =
        CpuBackend::new(compile_with(&source, &Overrides::default()), &fine, warn).unwrap();
    assert!(backend.forward(&inputs).unwrap().warnings.is_empty());
}

/// Huge shared-expert weights: the values first appear in the shared phase.
#[test]
fn an_overflowing_shared_expert_names_the_shared_phase() {
    let source = layer(
        "scoring = softmax\n top_k = 2",
        SWIGLU,
        "shared_experts {\n intermediate = 24\n }",
        "",
    );
    let plan = compile_with(&source, &Overrides::default());
    let layer = plan.layer.clone();
    let mut weights = LayerWeights::random(&layer, 2);
    if let Some(shared) = &mut weights.shared {
        shared.down.iter_mut().for_each(|w| *w = 3e38);
    }
    let ranks = plan.mesh.world_size() as usize;
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, 2);
    let backend = CpuBackend::new(plan, &weights, CpuOptions::default()).unwrap();
    let e = backend.forward(&inputs).unwrap_err().to_string();
    assert!(e.contains("first appear in the shared phase"), "{e}");
    assert!(e.contains("`shared down gemm`"), "{e}");
}

/// Dispatch by rank, alone and with the reducing combine, for every router
/// variant the rules accept: weight on the output and on the input, both
/// capacity drop policies, replicas, shared experts beside them, chunked
/// plans, and fp8 on the wire; the reference's numbers under shuffled
/// interleavings.
#[test]
fn dispatch_by_rank_and_reducing_combine_match_the_reference() {
    let replicas = "mesh {\n gpus_per_node = 4\n device = H100\n ep = 4\n replicas {\n 0 = [2, 3]\n 5 = [0]\n }\n}";
    let cases: Vec<(&str, String)> = vec![
        (
            "softmax top-2",
            layer("scoring = softmax\n top_k = 2\n normalize = true", SWIGLU, "", ""),
        ),
        (
            "sigmoid groups shared",
            layer(
                "scoring = sigmoid\n top_k = 4\n selection_bias = true\n groups = 4\n groups_kept = 2\n normalize = true\n scale = 2.5",
                SWIGLU,
                "shared_experts {\n intermediate = 24\n gate = sigmoid\n }",
                "schedule {\n overlap = 2\n }",
            ),
        ),
        (
            "weight on input",
            layer(
                "scoring = sigmoid\n top_k = 3\n weight_on = input",
                "ffn = gelu\n intermediate = 24",
                "shared_experts {\n intermediate = 24\n }",
                "",
            ),
        ),
        (
            "capacity position",
            layer(
                "scoring = softmax\n top_k = 2",
                "ffn = relu\n intermediate = 24",
                "capacity {\n factor = 0.5\n drop = position\n }",
                "schedule {\n overlap = 3\n }",
            ),
        ),
        (
            // The fused reduction sums the biased products.
            "expert biases",
            layer(
                "scoring = softmax\n top_k = 4",
                "ffn = swiglu\n intermediate = 24\n bias = true\n swiglu_limit = 7.0",
                "",
                "",
            ),
        ),
        (
            "capacity probs",
            layer(
                "scoring = softmax\n top_k = 3",
                "ffn = relu\n intermediate = 24",
                "capacity {\n factor = 0.5\n drop = probs\n }",
                "",
            ),
        ),
        (
            "replicas",
            layer("scoring = softmax\n top_k = 4", SWIGLU, "", "")
                .replace("mesh {\n gpus_per_node = 4\n device = H100\n ep = 4\n}", replicas),
        ),
    ];
    let fp8 = layer(
        "scoring = softmax\n top_k = 4",
        SWIGLU,
        "dispatch_dtype = fp8_e4m3",
        "",
    );
    for (name, source) in cases.iter().chain([&("fp8 on the wire", fp8)]) {
        // fp8 e4m3 keeps 3 mantissa bits on the wire: a few percent.
        let bound = if source.contains("fp8") { 0.08 } else { 1e-5 };
        for form in [RoutingForm::DedupDispatch, RoutingForm::DedupReduce] {
            let label = format!("{name} ({})", form.name());
            let err =
                run_form_against_reference(&label, source, &Overrides::default(), 5, 2, Some(form));
            assert!(err < bound, "{label}: relative error {err:e}");
        }
    }
}

/// A top-1 layer keeps the per-pick forms, and says why.
#[test]
fn top_1_has_no_dispatch_by_rank() {
    let source = layer("scoring = softmax\n top_k = 1", SWIGLU, "", "");
    let (program, _) = moec_lang::check_source(&source).program.unwrap();
    let options = Options {
        routing: Some(RoutingForm::DedupDispatch),
        ..Options::default()
    };
    let err = compile(&program, &options).err().unwrap();
    assert!(err.contains("top_k = 1"), "{err}");
}

/// DeepSeek-V3 on two nodes of eight ranks, dispatched by rank through the
/// hierarchical legs (one copy per token and node, then one per token and
/// rank inside the node), with and without the reducing combine (the node's
/// forwarder sums a token's partials before one row per node crosses back):
/// the reference's numbers under shuffled interleavings.
#[test]
fn hierarchical_dispatch_by_rank_and_reducing_combine_match_the_reference() {
    let (source, overrides) = deepseek_on_two_nodes(moec_lang::spec::DType::F32, 256);
    let source = format!("{source}\nschedule {{\n    deny = [fp8_dispatch]\n}}\n");
    for form in [RoutingForm::NodeDedupDispatch, RoutingForm::NodeDedupReduce] {
        let (program, _) = moec_lang::check_source(&source).program.unwrap();
        let mut program = program.clone();
        apply(&mut program, &overrides).unwrap();
        let options = Options {
            routing: Some(form),
            ..Options::default()
        };
        let plan = compile(&program, &options).unwrap().plan;
        assert_eq!(
            plan.choices.dispatch,
            moec_runtime::plan::A2aAlgorithm::Hierarchical,
            "{}: this size should pick the hierarchical legs",
            form.name()
        );
        let label = format!("deepseek_v3 hierarchical ({})", form.name());
        let err = run_form_against_reference(&label, &source, &overrides, 4, 2, Some(form));
        assert!(err < 1e-5, "{label}: relative error {err:e}");
    }
}
