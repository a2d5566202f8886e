//! Layer weights: random draws, safetensors loading (HF, Mixtral, Qwen2,
//! sharded), the checks, and saved runs.

// Helpers outside #[test] functions unwrap too: a failure is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use moec_runtime::plan::*;
use moec_runtime::weights::*;
use safetensors::{Dtype, SafeTensors};

fn base() -> LayerConfig {
    LayerConfig {
        name: "test".to_string(),
        hidden: 16,
        dtype: DType::F32,
        dispatch_dtype: DType::F32,
        tokens_per_rank: 8,
        experts: 4,
        intermediate: 8,
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
    }
}

/// Every optional tensor present, bf16.
fn full() -> LayerConfig {
    let mut l = base();
    l.dtype = DType::Bf16;
    l.dispatch_dtype = DType::Fp8E4m3;
    l.ffn = Activation::Swiglu { limit: Some(7.0) };
    l.expert_bias = true;
    l.shared = Some(SharedConfig {
        count: 2,
        intermediate: 4,
        ffn: Activation::Swiglu { limit: None },
        bias: true,
        sigmoid_gate: true,
    });
    l.router.scoring = Scoring::Sigmoid;
    l.router.logit_bias = true;
    l.router.selection_bias = true;
    l.router.groups = Some(GroupConfig {
        count: 2,
        kept: 1,
        score: GroupScore::Top2Sum,
    });
    l.router.scale = 2.5;
    l.capacity = CapacityConfig::Limited {
        slots: 6,
        factor: Some(1.25),
        drop: DropPolicy::Probs,
    };
    l
}

fn gelu() -> LayerConfig {
    let mut l = base();
    l.ffn = Activation::Gelu;
    l.expert_bias = true;
    l.shared = Some(SharedConfig {
        count: 1,
        intermediate: 8,
        ffn: Activation::Relu,
        bias: false,
        sigmoid_gate: false,
    });
    l
}

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("weights")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => values
            .iter()
            .flat_map(|v| f64::from(*v).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::I32 => values
            .iter()
            .flat_map(|v| (*v as i32).to_le_bytes())
            .collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

fn write_file(path: &Path, entries: &[Entry]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Entries for every tensor of `w`, named `prefix + rename(hf name)`.
/// Whether a tensor is one of the two vectors kept in f32.
fn f32_vector(name: &str) -> bool {
    name.ends_with("e_score_correction_bias") || name.ends_with("shared_expert_gate.weight")
}

/// Entries for every tensor of `w`, named `prefix + rename(hf name)`, in
/// `dtype` except the two f32 vectors, as real checkpoints store them.
fn entries(
    w: &LayerWeights,
    prefix: &str,
    dtype: Dtype,
    rename: impl Fn(&str) -> String,
) -> Vec<Entry> {
    w.tensors()
        .into_iter()
        .map(|(name, shape, values)| {
            let dtype = if f32_vector(&name) && matches!(dtype, Dtype::BF16 | Dtype::F16) {
                Dtype::F32
            } else {
                dtype
            };
            (
                format!("{prefix}{}", rename(&name)),
                dtype,
                shape,
                encode(dtype, values),
            )
        })
        .collect()
}

/// Tensor by tensor, so a failure names the tensor instead of dumping both.
fn assert_same(a: &LayerWeights, b: &LayerWeights) {
    let (ta, tb) = (a.tensors(), b.tensors());
    let names =
        |t: &[(String, Vec<usize>, &[f32])]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb));
    for (x, y) in ta.iter().zip(&tb) {
        assert_eq!(x.1, y.1, "shape of {}", x.0);
        assert!(x.2 == y.2, "values of {} differ", x.0);
    }
    assert!(a == b);
}

fn same(name: &str) -> String {
    name.to_string()
}

fn all_values(w: &LayerWeights) -> Vec<f32> {
    w.tensors()
        .into_iter()
        .flat_map(|(_, _, v)| v.to_vec())
        .collect()
}

#[test]
fn random_is_deterministic_and_depends_on_the_seed() {
    for layer in [base(), full(), gelu()] {
        let a = LayerWeights::random(&layer, 7);
        let b = LayerWeights::random(&layer, 7);
        let c = LayerWeights::random(&layer, 8);
        assert_same(&a, &b);
        assert_ne!(all_values(&a), all_values(&c));
        a.check(&layer).unwrap();
        c.check(&layer).unwrap();
    }
}

#[test]
fn random_follows_the_documented_bounds() {
    let layer = full();
    let w = LayerWeights::random(&layer, 1);
    let h = 16f32;
    for (name, shape, values) in w.tensors() {
        let bound = if name.ends_with("e_score_correction_bias") {
            0.5 / 12.0 // sigmoid scoring
        } else if name.contains("down_proj") {
            // fan_in is the FFN's width: 8 routed, 2 x 4 shared.
            1.0 / 8f32.sqrt()
        } else {
            1.0 / h.sqrt()
        };
        let expected: usize = shape.iter().product();
        assert_eq!(values.len(), expected, "{name}");
        let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        // bf16 rounding may step just past the bound.
        assert!(max <= bound * 1.01, "{name}: max {max} > bound {bound}");
        assert!(
            max >= bound * 0.3,
            "{name}: max {max} far below bound {bound}"
        );
    }
}

#[test]
fn random_has_every_tensor_of_the_layer_in_order() {
    let w = LayerWeights::random(&full(), 3);
    let names: Vec<String> = w.tensors().into_iter().map(|(n, _, _)| n).collect();
    let mut expected = vec![
        "mlp.gate.weight".to_string(),
        "mlp.gate.bias".to_string(),
        "mlp.gate.e_score_correction_bias".to_string(),
    ];
    for e in 0..4 {
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            expected.push(format!("mlp.experts.{e}.{proj}.weight"));
            expected.push(format!("mlp.experts.{e}.{proj}.bias"));
        }
    }
    for proj in ["gate_proj", "up_proj", "down_proj"] {
        expected.push(format!("mlp.shared_experts.{proj}.weight"));
        expected.push(format!("mlp.shared_experts.{proj}.bias"));
    }
    expected.push("mlp.shared_expert_gate.weight".to_string());
    assert_eq!(names, expected);

    let shapes: Vec<Vec<usize>> = w.tensors().into_iter().map(|(_, s, _)| s).collect();
    assert_eq!(shapes[0], vec![4, 16]);
    assert_eq!(shapes[1], vec![4]); // logit bias
    assert_eq!(shapes[2], vec![4]); // selection bias
    assert_eq!(shapes[3], vec![8, 16]); // gate
    assert_eq!(shapes[4], vec![8]);
    assert_eq!(shapes[7], vec![16, 8]); // down
    assert_eq!(shapes[8], vec![16]);
    let shared_down = names
        .iter()
        .position(|n| n == "mlp.shared_experts.down_proj.weight")
        .unwrap();
    assert_eq!(shapes[shared_down], vec![16, 8]); // fused 2 x 4
    assert_eq!(*shapes.last().unwrap(), vec![1, 16]);

    // GELU/ReLU FFNs have no gate projection.
    let w = LayerWeights::random(&gelu(), 3);
    assert!(w
        .experts
        .iter()
        .all(|e| e.gate.is_none() && e.gate_bias.is_none()));
    assert!(w.tensors().iter().all(|(n, _, _)| !n.contains("gate_proj")));
    let shared = w.shared.as_ref().unwrap();
    assert!(shared.gate.is_none() && shared.up_bias.is_none());
}

#[test]
fn random_rounds_to_the_layer_dtype_except_the_f32_vectors() {
    let w = LayerWeights::random(&full(), 5);
    for (name, _, values) in w.tensors() {
        let exact = values
            .iter()
            .all(|v| half::bf16::from_f32(*v).to_f32() == *v);
        if f32_vector(&name) {
            assert!(!exact, "{name} should stay f32");
        } else {
            assert!(exact, "{name} is not rounded to bf16");
        }
    }
    let mut layer = full();
    layer.dtype = DType::F16;
    let w = LayerWeights::random(&layer, 5);
    assert!(w
        .experts
        .iter()
        .flat_map(|e| e.up.iter())
        .all(|v| half::f16::from_f32(*v).to_f32() == *v));
    // f32 layers keep full precision.
    let w = LayerWeights::random(&base(), 5);
    assert!(w
        .router
        .iter()
        .any(|v| half::bf16::from_f32(*v).to_f32() != *v));
}

#[test]
fn random_inputs_are_reproducible_rounded_and_independent_of_the_weights() {
    let layer = full();
    let a = random_inputs(&layer, 2, 4, 9);
    assert_eq!(a, random_inputs(&layer, 2, 4, 9));
    assert_ne!(a, random_inputs(&layer, 2, 4, 10));
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|r| r.len() == 4 * 16));
    let flat: Vec<f32> = a.concat();
    assert!(flat.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(flat.iter().all(|v| half::bf16::from_f32(*v).to_f32() == *v));
    // Global token order: 2 ranks of 4 tokens are 1 rank of 8.
    assert_eq!(random_inputs(&layer, 1, 8, 9)[0], flat);
    // Not the weights' stream: the first router weights scaled to [-1, 1)
    // would equal the first inputs if they shared it.
    let mut f32_layer = base();
    f32_layer.hidden = 16;
    let w = LayerWeights::random(&f32_layer, 9);
    let x = random_inputs(&f32_layer, 1, 1, 9);
    let scaled: Vec<f32> = w.router[..16].iter().map(|v| v * 4.0).collect();
    assert_ne!(scaled, x[0]);
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn std(v: &[f32]) -> f32 {
    let n = v.len() as f32;
    let mean = v.iter().sum::<f32>() / n;
    (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt()
}

#[test]
fn random_logits_and_projections_are_order_one() {
    let mut layer = base();
    layer.hidden = 256;
    layer.experts = 16;
    layer.intermediate = 64;
    let w = LayerWeights::random(&layer, 11);
    let x = random_inputs(&layer, 1, 64, 12).remove(0);
    let mut logits = Vec::new();
    let mut ups = Vec::new();
    for t in x.chunks(256) {
        for e in w.router.chunks(256) {
            logits.push(dot(t, e));
        }
        for row in w.experts[0].up.chunks(256) {
            ups.push(dot(t, row));
        }
    }
    let (sl, su) = (std(&logits), std(&ups));
    assert!((0.2..0.5).contains(&sl), "logit std {sl}");
    assert!((0.2..0.5).contains(&su), "up std {su}");
}

/// The top-k of `scores` (+ `bias`), as a sorted set of expert indices.
fn top_k(scores: &[f32], bias: Option<&[f32]>, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let c = |e: usize| scores[e] + bias.map_or(0.0, |b| b[e]);
    idx.sort_by(|&a, &b| c(b).total_cmp(&c(a)));
    let mut top = idx[..k].to_vec();
    top.sort();
    top
}

#[test]
fn selection_bias_changes_some_choices_but_does_not_decide_them() {
    for (scoring, over) in [
        (Scoring::Sigmoid, SoftmaxOver::All),
        (Scoring::Softmax, SoftmaxOver::All),
        (Scoring::Softmax, SoftmaxOver::Topk),
    ] {
        let mut layer = base();
        layer.hidden = 64;
        layer.experts = 16;
        layer.router.top_k = 4;
        layer.router.scoring = scoring;
        layer.router.softmax_over = over;
        layer.router.selection_bias = true;
        let w = LayerWeights::random(&layer, 21);
        let bias = w.router_bias.as_deref().unwrap();
        let x = random_inputs(&layer, 1, 400, 22).remove(0);
        let (mut changed, mut moved, mut total) = (0, 0, 0);
        let mut picked_by_bias_alone = 0;
        let bias_top = top_k(&[0.0; 16], Some(bias), 4);
        for t in x.chunks(64) {
            let logits: Vec<f32> = w.router.chunks(64).map(|e| dot(t, e)).collect();
            let scores: Vec<f32> = match (scoring, over) {
                (Scoring::Sigmoid, _) => logits.iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
                (Scoring::Softmax, SoftmaxOver::Topk) => logits.clone(),
                (Scoring::Softmax, SoftmaxOver::All) => {
                    let z: f32 = logits.iter().map(|l| l.exp()).sum();
                    logits.iter().map(|l| l.exp() / z).collect()
                }
            };
            let with = top_k(&scores, Some(bias), 4);
            let without = top_k(&scores, None, 4);
            changed += usize::from(with != without);
            moved += with.iter().filter(|e| !without.contains(e)).count();
            picked_by_bias_alone += usize::from(with == bias_top);
            total += 1;
        }
        let tokens = changed as f64 / total as f64;
        let assignments = moved as f64 / (4 * total) as f64;
        assert!(
            (0.2..0.9).contains(&tokens) && (0.05..0.35).contains(&assignments),
            "{scoring:?}/{over:?}: the bias changed {tokens} of the tokens, {assignments} of the assignments"
        );
        assert!(
            (picked_by_bias_alone as f64) < 0.2 * total as f64,
            "{scoring:?}/{over:?}: the bias alone decides"
        );
    }
}

#[test]
fn save_run_and_load_run_round_trip() {
    let dir = tmp("round_trip");
    let layer = full();
    let w = LayerWeights::random(&layer, 2);
    let inputs = random_inputs(&layer, 2, 3, 2);
    let outputs: Vec<Vec<f32>> = (0..2)
        .map(|r| (0..48).map(|i| (r * 100 + i) as f32 * 0.5).collect())
        .collect();
    save_run(&dir, &layer, &w, 2, 3, &inputs, &outputs).unwrap();

    // The tensors file, read with safetensors directly: all F32, HF names.
    let bytes = std::fs::read(dir.join("run.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names: BTreeSet<String> = st.names().into_iter().map(str::to_string).collect();
    let mut expected: BTreeSet<String> = w.tensors().into_iter().map(|(n, _, _)| n).collect();
    expected.insert("input".to_string());
    expected.insert("output".to_string());
    assert_eq!(names, expected);
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
    }
    let input = st.tensor("input").unwrap();
    assert_eq!(input.shape(), &[6, 16]);
    assert_eq!(
        input.data(),
        encode(Dtype::F32, &inputs.concat()).as_slice()
    );
    for (name, shape, values) in w.tensors() {
        let t = st.tensor(&name).unwrap();
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
        assert_eq!(t.data(), encode(Dtype::F32, values).as_slice(), "{name}");
    }

    // config.json: the listed keys exactly, plus the documented extras.
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "hidden_size",
            "moe_intermediate_size",
            "num_experts",
            "num_experts_per_tok",
            "scoring_func",
            "softmax_over",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "routed_scaling_factor",
            "router_weight_on",
            "expert_act",
            "swiglu_limit",
            "n_shared_experts",
            "shared_expert_intermediate_size",
            "capacity_factor",
            "drop_policy",
            "ranks",
            "tokens_per_rank",
            "dtype",
            "dispatch_dtype",
            "expert_bias",
            "router_bias",
            "selection_bias",
            "group_score",
            "shared_expert_act",
            "shared_swiglu_limit",
            "shared_expert_bias",
            "shared_expert_gate",
            "capacity_slots",
        ]
    );
    let expect = serde_json::json!({
        "hidden_size": 16,
        "moe_intermediate_size": 8,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "scoring_func": "sigmoid",
        "softmax_over": "all",
        "n_group": 2,
        "topk_group": 1,
        "norm_topk_prob": true,
        "routed_scaling_factor": 2.5,
        "router_weight_on": "output",
        "expert_act": "swiglu",
        "swiglu_limit": 7.0,
        "n_shared_experts": 2,
        "shared_expert_intermediate_size": 4,
        "capacity_factor": 1.25,
        "drop_policy": "probs",
        "ranks": 2,
        "tokens_per_rank": 3,
        "dtype": "bf16",
        "dispatch_dtype": "fp8_e4m3",
        "expert_bias": true,
        "router_bias": true,
        "selection_bias": true,
        "group_score": "top2_sum",
        "shared_expert_act": "swiglu",
        "shared_swiglu_limit": null,
        "shared_expert_bias": true,
        "shared_expert_gate": true,
        "capacity_slots": 6,
    });
    assert_eq!(json, expect);

    // And back.
    let run = load_run(&dir).unwrap();
    assert_same(&run.weights, &w);
    assert_eq!(run.inputs, inputs);
    assert_eq!(run.outputs, outputs);
    assert_eq!(run.config, RunConfig::new(&layer, 2, 3));
    let mut expected_layer = layer.clone();
    expected_layer.name = "run".to_string();
    expected_layer.tokens_per_rank = 3;
    assert_eq!(run.layer, expected_layer);

    // Saving again replaces the files.
    let w2 = LayerWeights::random(&layer, 3);
    save_run(&dir, &layer, &w2, 2, 3, &inputs, &outputs).unwrap();
    assert_same(&load_run(&dir).unwrap().weights, &w2);
}

#[test]
fn config_json_for_each_capacity_and_router_kind() {
    let cases: Vec<(LayerConfig, serde_json::Value)> = vec![
        (
            base(),
            serde_json::json!({"capacity_factor": null, "capacity_slots": null, "drop_policy": "position",
                "n_group": 1, "topk_group": 1, "group_score": null, "swiglu_limit": null,
                "n_shared_experts": 0, "shared_expert_intermediate_size": 0, "shared_expert_act": null,
                "scoring_func": "softmax", "expert_act": "swiglu", "router_weight_on": "output"}),
        ),
        (
            {
                let mut l = gelu();
                l.capacity = CapacityConfig::Limited {
                    slots: 5,
                    factor: None,
                    drop: DropPolicy::Position,
                };
                l.router.softmax_over = SoftmaxOver::Topk;
                l.router.weight_on = WeightOn::Input;
                l.router.groups = Some(GroupConfig {
                    count: 2,
                    kept: 2,
                    score: GroupScore::Max,
                });
                l
            },
            serde_json::json!({"capacity_factor": null, "capacity_slots": 5, "drop_policy": "position",
                "n_group": 2, "topk_group": 2, "group_score": "max", "softmax_over": "topk",
                "router_weight_on": "input", "expert_act": "gelu", "n_shared_experts": 1,
                "shared_expert_intermediate_size": 8, "shared_expert_act": "relu",
                "shared_expert_bias": false, "shared_expert_gate": false, "expert_bias": true}),
        ),
        (
            {
                let mut l = base();
                l.ffn = Activation::GeluTanh;
                l
            },
            serde_json::json!({"expert_act": "gelu_tanh", "swiglu_limit": null}),
        ),
    ];
    for (i, (layer, expect)) in cases.into_iter().enumerate() {
        let dir = tmp(&format!("config_{i}"));
        let w = LayerWeights::random(&layer, 1);
        let x = random_inputs(&layer, 1, 2, 1);
        save_run(&dir, &layer, &w, 1, 2, &x, &x).unwrap();
        let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (key, value) in expect.as_object().unwrap() {
            assert_eq!(&json[key], value, "case {i}: `{key}`");
        }
        let run = load_run(&dir).unwrap();
        let mut expected_layer = layer.clone();
        expected_layer.name = "run".to_string();
        expected_layer.tokens_per_rank = 2;
        assert_eq!(run.layer, expected_layer, "case {i}");
        assert_same(&run.weights, &w);
    }
}

#[test]
fn load_reads_hf_names_with_and_without_a_prefix() {
    let dir = tmp("hf");
    let layer = full();
    let w = LayerWeights::random(&layer, 4);
    let other = LayerWeights::random(&layer, 5);

    let plain = dir.join("plain.safetensors");
    write_file(&plain, &entries(&w, "", Dtype::BF16, same));
    assert_same(&LayerWeights::load(&plain, &layer, "").unwrap(), &w);

    // A file holding two layers, F32: the prefix picks one.
    let two = dir.join("two.safetensors");
    let mut e = entries(&other, "model.layers.2.", Dtype::F32, same);
    e.extend(entries(&w, "model.layers.3.", Dtype::F32, same));
    e.push((
        "model.embed_tokens.weight".to_string(),
        Dtype::F32,
        vec![2, 2],
        encode(Dtype::F32, &[0.0; 4]),
    ));
    write_file(&two, &e);
    assert_same(
        &LayerWeights::load(&two, &layer, "model.layers.3.").unwrap(),
        &w,
    );
    assert_same(
        &LayerWeights::load(&two, &layer, "model.layers.2.").unwrap(),
        &other,
    );

    // F64 files are converted.
    let f64_file = dir.join("f64.safetensors");
    write_file(&f64_file, &entries(&w, "", Dtype::F64, same));
    assert_same(&LayerWeights::load(&f64_file, &layer, "").unwrap(), &w);

    // A directory holding model.safetensors.
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    write_file(
        &model_dir.join("model.safetensors"),
        &entries(&w, "", Dtype::F32, same),
    );
    assert_same(&LayerWeights::load(&model_dir, &layer, "").unwrap(), &w);
}

#[test]
fn load_rounds_to_the_layer_dtype() {
    let dir = tmp("rounding");
    let f32_layer = full_f32();
    let w = LayerWeights::random(&f32_layer, 6);
    let path = dir.join("w.safetensors");
    write_file(&path, &entries(&w, "", Dtype::F32, same));
    for (dtype, round) in [
        (
            DType::Bf16,
            (|v: f32| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
        ),
        (DType::F16, |v: f32| half::f16::from_f32(v).to_f32()),
        (DType::F32, |v: f32| v),
    ] {
        let mut layer = full_f32();
        layer.dtype = dtype;
        let loaded = LayerWeights::load(&path, &layer, "").unwrap();
        for ((name, _, got), (_, _, stored)) in loaded.tensors().into_iter().zip(w.tensors()) {
            let keep = f32_vector(&name);
            let want: Vec<f32> = if keep {
                stored.to_vec()
            } else {
                stored.iter().map(|v| round(*v)).collect()
            };
            assert_eq!(got, want.as_slice(), "{dtype:?} {name}");
        }
    }

    // F16 storage read into an f16 layer is exact.
    let mut layer = full_f32();
    layer.dtype = DType::F16;
    let w16 = LayerWeights::random(&layer, 6);
    let path = dir.join("w16.safetensors");
    write_file(&path, &entries(&w16, "", Dtype::F16, same));
    assert_same(&LayerWeights::load(&path, &layer, "").unwrap(), &w16);
}

fn full_f32() -> LayerConfig {
    let mut l = full();
    l.dtype = DType::F32;
    l
}

fn mixtral_layer() -> LayerConfig {
    let mut l = base();
    l.dtype = DType::Bf16;
    l.experts = 8;
    l
}

fn to_mixtral(name: &str) -> String {
    name.replace("mlp.", "block_sparse_moe.")
        .replace("gate_proj", "w1")
        .replace("up_proj", "w3")
        .replace("down_proj", "w2")
}

#[test]
fn load_reads_mixtral_names() {
    let dir = tmp("mixtral");
    let layer = mixtral_layer();
    let w = LayerWeights::random(&layer, 8);
    let path = dir.join("mixtral.safetensors");
    let e = entries(&w, "model.layers.0.", Dtype::BF16, to_mixtral);
    assert!(e
        .iter()
        .any(|t| t.0 == "model.layers.0.block_sparse_moe.experts.7.w2.weight"));
    write_file(&path, &e);
    assert_same(
        &LayerWeights::load(&path, &layer, "model.layers.0.").unwrap(),
        &w,
    );

    // A missing expert is named in Mixtral's terms.
    let e: Vec<Entry> = e
        .into_iter()
        .filter(|t| !t.0.ends_with("experts.5.w3.weight"))
        .collect();
    write_file(&path, &e);
    let err = LayerWeights::load(&path, &layer, "model.layers.0.").unwrap_err();
    assert!(matches!(err, WeightsError::Missing { .. }));
    assert!(
        err.to_string()
            .contains("`model.layers.0.block_sparse_moe.experts.5.w3.weight`"),
        "{err}"
    );
}

#[test]
fn load_reads_qwen2_singular_shared_expert_names() {
    let dir = tmp("qwen2");
    let mut layer = base();
    layer.shared = Some(SharedConfig {
        count: 1,
        intermediate: 12,
        ffn: Activation::Swiglu { limit: None },
        bias: false,
        sigmoid_gate: true,
    });
    let w = LayerWeights::random(&layer, 8);
    let path = dir.join("qwen2.safetensors");
    write_file(
        &path,
        &entries(&w, "model.layers.1.", Dtype::F32, |n| {
            n.replace("shared_experts.", "shared_expert.")
        }),
    );
    assert_same(
        &LayerWeights::load(&path, &layer, "model.layers.1.").unwrap(),
        &w,
    );
}

#[test]
fn load_reads_a_sharded_checkpoint() {
    let dir = tmp("sharded");
    let layer = full();
    let w = LayerWeights::random(&layer, 10);
    let e = entries(&w, "model.layers.0.", Dtype::BF16, same);
    let (a, b) = e.split_at(e.len() / 2);
    write_file(&dir.join("model-00001-of-00002.safetensors"), a);
    write_file(&dir.join("model-00002-of-00002.safetensors"), b);
    let mut map = serde_json::Map::new();
    for (name, file) in a
        .iter()
        .map(|t| (&t.0, "model-00001-of-00002.safetensors"))
        .chain(b.iter().map(|t| (&t.0, "model-00002-of-00002.safetensors")))
    {
        map.insert(name.clone(), serde_json::Value::from(file));
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).unwrap();
    assert_same(
        &LayerWeights::load(&index_path, &layer, "model.layers.0.").unwrap(),
        &w,
    );
    assert_same(
        &LayerWeights::load(&dir, &layer, "model.layers.0.").unwrap(),
        &w,
    );

    // A shard that is gone is an I/O error naming it.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = LayerWeights::load(&index_path, &layer, "model.layers.0.").unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }));
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_is_named_with_a_prefix_hint() {
    let dir = tmp("missing");
    let layer = full();
    let w = LayerWeights::random(&layer, 1);
    let path = dir.join("w.safetensors");
    let e: Vec<Entry> = entries(&w, "", Dtype::BF16, same)
        .into_iter()
        .filter(|t| t.0 != "mlp.experts.2.down_proj.bias")
        .collect();
    write_file(&path, &e);
    let err = LayerWeights::load(&path, &layer, "").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightsError::Missing { .. }), "{err:?}");
    assert!(msg.contains("`mlp.experts.2.down_proj.bias`"), "{msg}");
    assert!(msg.contains("w.safetensors"), "{msg}");

    // Layers of a model under the wrong prefix: the hint says which.
    let path = dir.join("model.safetensors");
    let mut e = entries(&w, "model.layers.3.", Dtype::BF16, same);
    e.extend(entries(&w, "model.layers.4.", Dtype::BF16, same));
    write_file(&path, &e);
    let err = LayerWeights::load(&path, &layer, "model.layers.3").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("no MoE block: looked for a router named `model.layers.3mlp.gate.weight`"),
        "{msg}"
    );
    assert!(msg.contains("`model.layers.3.`"), "{msg}");
    assert!(msg.contains("`model.layers.4.`"), "{msg}");
    let err = LayerWeights::load(&path, &layer, "").unwrap_err();
    assert!(
        err.to_string().contains("under prefix `model.layers.3.`"),
        "{err}"
    );

    // Mixtral names under another prefix are found too.
    let path = dir.join("mixtral.safetensors");
    let ml = mixtral_layer();
    write_file(
        &path,
        &entries(
            &LayerWeights::random(&ml, 1),
            "model.layers.0.",
            Dtype::BF16,
            to_mixtral,
        ),
    );
    let err = LayerWeights::load(&path, &ml, "").unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.0.block_sparse_moe.gate.weight"),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_names_expected_and_found() {
    let dir = tmp("shape");
    let layer = full();
    let w = LayerWeights::random(&layer, 1);
    let path = dir.join("w.safetensors");
    let mut e = entries(&w, "", Dtype::BF16, same);
    let up = e
        .iter_mut()
        .find(|t| t.0 == "mlp.experts.1.up_proj.weight")
        .unwrap();
    up.2 = vec![16, 8]; // transposed
    write_file(&path, &e);
    let err = LayerWeights::load(&path, &layer, "").unwrap_err();
    assert!(matches!(err, WeightsError::Shape { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("`mlp.experts.1.up_proj.weight`"), "{msg}");
    assert!(
        msg.contains("[16, 8]") && msg.contains("expected [8, 16]"),
        "{msg}"
    );

    // The router of a layer with more experts than the file.
    let mut bigger = layer.clone();
    bigger.experts = 8;
    bigger.router.groups = None;
    let err = LayerWeights::load(&dir.join("w.safetensors"), &bigger, "").unwrap_err();
    assert!(
        err.to_string()
            .contains("`mlp.gate.weight` has shape [4, 16], expected [8, 16]"),
        "{err}"
    );
}

#[test]
fn unsupported_dtypes_are_rejected() {
    let dir = tmp("dtype");
    let layer = base();
    let w = LayerWeights::random(&layer, 1);
    let path = dir.join("w.safetensors");
    let mut e = entries(&w, "", Dtype::F32, same);
    e[0] = (
        e[0].0.clone(),
        Dtype::I32,
        vec![4, 16],
        encode(Dtype::I32, &[0.0; 64]),
    );
    write_file(&path, &e);
    let err = LayerWeights::load(&path, &layer, "").unwrap_err();
    assert!(matches!(err, WeightsError::Dtype { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("`mlp.gate.weight`") && msg.contains("I32"),
        "{msg}"
    );
    assert!(msg.contains("F32, BF16, F16 or F64"), "{msg}");

    e[0] = (e[0].0.clone(), Dtype::F8_E4M3, vec![4, 16], vec![0u8; 64]);
    write_file(&path, &e);
    let msg = LayerWeights::load(&path, &layer, "")
        .unwrap_err()
        .to_string();
    // fp8 without its block scales.
    assert!(
        msg.contains("`mlp.gate.weight_scale_inv` not found") && msg.contains("fp8 e4m3"),
        "{msg}"
    );

    // A layer dtype that is not a storage dtype.
    let mut fp8 = layer.clone();
    fp8.dtype = DType::Fp8E4m3;
    let err = LayerWeights::load(&path, &fp8, "").unwrap_err();
    assert!(matches!(err, WeightsError::Layer { .. }), "{err:?}");
    assert!(w.check(&fp8).is_err());
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let dir = tmp("corrupt");
    let layer = base();
    let w = LayerWeights::random(&layer, 1);
    let good = dir.join("good.safetensors");
    write_file(&good, &entries(&w, "", Dtype::F32, same));
    let bytes = std::fs::read(&good).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "shorter than the 8-byte"),
        ("tiny", vec![1, 2, 3], "shorter than the 8-byte"),
        ("truncated", bytes[..bytes.len() - 10].to_vec(), "truncated"),
        (
            "truncated_header",
            bytes[..8 + header_len / 2].to_vec(),
            "truncated",
        ),
        (
            "trailing",
            [bytes.clone(), vec![0; 4]].concat(),
            "the file holds",
        ),
        (
            "huge_header",
            [u64::MAX.to_le_bytes().to_vec(), vec![b'{'; 16]].concat(),
            "limit",
        ),
        (
            "not_json",
            [8u64.to_le_bytes().to_vec(), b"not json".to_vec()].concat(),
            "header",
        ),
    ];
    // Offsets that overflow when added up, and a shape whose size overflows.
    let evil = |header: &str| -> Vec<u8> {
        let mut h = header.as_bytes().to_vec();
        while h.len() % 8 != 0 {
            h.push(b' ');
        }
        [(h.len() as u64).to_le_bytes().to_vec(), h, vec![0; 8]].concat()
    };
    let max = usize::MAX;
    let overflow_offsets = evil(&format!(
        r#"{{"a":{{"dtype":"U8","shape":[{}],"data_offsets":[0,{}]}},"b":{{"dtype":"U8","shape":[4],"data_offsets":[{},{}]}}}}"#,
        max - 4,
        max - 4,
        max - 4,
        max
    ));
    cases.push(("overflow_offsets", overflow_offsets, ""));
    let overflow_shape = evil(&format!(
        r#"{{"mlp.gate.weight":{{"dtype":"F32","shape":[{max},{max}],"data_offsets":[0,8]}}}}"#
    ));
    cases.push(("overflow_shape", overflow_shape, ""));
    let past_end =
        evil(r#"{"mlp.gate.weight":{"dtype":"F32","shape":[4,16],"data_offsets":[0,256]}}"#);
    cases.push(("past_end", past_end, "truncated"));

    for (name, data, needle) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, &data).unwrap();
        let err = LayerWeights::load(&path, &layer, "").unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, WeightsError::Corrupt { .. }),
            "{name}: {err:?}"
        );
        assert!(
            msg.contains(&format!("{name}.safetensors")),
            "{name}: {msg}"
        );
        assert!(msg.contains(needle), "{name}: {msg}");
    }

    let err = LayerWeights::load(&dir.join("absent.safetensors"), &layer, "").unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("absent.safetensors"));

    let index = dir.join("model.safetensors.index.json");
    std::fs::write(&index, "{\"weight_map\": 3}").unwrap();
    let err = LayerWeights::load(&index, &layer, "").unwrap_err();
    assert!(err.to_string().contains("weight_map"), "{err}");
}

#[test]
fn non_finite_values_are_rejected() {
    let dir = tmp("nan");
    let layer = full();
    let w = LayerWeights::random(&layer, 1);
    let path = dir.join("w.safetensors");
    for (bad, dtype) in [
        (f32::NAN, Dtype::BF16),
        (f32::INFINITY, Dtype::F32),
        (f32::NEG_INFINITY, Dtype::F16),
    ] {
        let mut e = entries(&w, "", Dtype::BF16, same);
        let t = e
            .iter_mut()
            .find(|t| t.0 == "mlp.experts.3.gate_proj.weight")
            .unwrap();
        let mut values = w.experts[3].gate.clone().unwrap();
        values[17] = bad;
        *t = (t.0.clone(), dtype, t.2.clone(), encode(dtype, &values));
        write_file(&path, &e);
        let err = LayerWeights::load(&path, &layer, "").unwrap_err();
        assert!(
            matches!(err, WeightsError::NotFinite { index: 17, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("`mlp.experts.3.gate_proj.weight`") && msg.contains("index 17"),
            "{msg}"
        );
        assert!(msg.contains("not finite"), "{msg}");
    }

    // Finite in the file but too large for f16.
    let mut f16_layer = layer.clone();
    f16_layer.dtype = DType::F16;
    let mut e = entries(&w, "", Dtype::F32, same);
    let mut router = w.router.clone();
    router[5] = 1.0e6;
    e[0] = (
        e[0].0.clone(),
        Dtype::F32,
        e[0].2.clone(),
        encode(Dtype::F32, &router),
    );
    write_file(&path, &e);
    let msg = LayerWeights::load(&path, &f16_layer, "")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`mlp.gate.weight`") && msg.contains("overflows f16"),
        "{msg}"
    );
    // The same file is fine in bf16.
    let mut bf16_layer = layer.clone();
    bf16_layer.dtype = DType::Bf16;
    assert!(LayerWeights::load(&path, &bf16_layer, "").is_ok());
}

#[test]
fn check_catches_weights_built_by_hand_wrong() {
    let layer = full();
    let good = LayerWeights::random(&layer, 1);
    good.check(&layer).unwrap();

    let expect_err = |w: &LayerWeights, needle: &str| {
        let err = w.check(&layer).unwrap_err();
        assert!(matches!(err, WeightsError::Mismatch { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{err}");
    };
    let mut w = good.clone();
    w.experts[2].up.pop();
    expect_err(&w, "`mlp.experts.2.up_proj.weight`: expected 128 values");

    let mut w = good.clone();
    w.experts[1].gate = None;
    expect_err(&w, "`mlp.experts.1.gate_proj.weight`");

    let mut w = good.clone();
    w.router_bias = None;
    expect_err(&w, "`mlp.gate.e_score_correction_bias`");

    let mut w = good.clone();
    w.experts.pop();
    expect_err(&w, "4 experts");

    let mut w = good.clone();
    w.hidden = 8;
    expect_err(&w, "hidden 16");

    let mut w = good.clone();
    w.shared.as_mut().unwrap().width = 4;
    expect_err(&w, "width 8");

    let mut w = good.clone();
    w.shared_gate = None;
    expect_err(&w, "`mlp.shared_expert_gate.weight`");

    // A tensor the layer does not have.
    let g = gelu();
    let mut w = LayerWeights::random(&g, 1);
    w.experts[0].gate = Some(vec![0.0; 8 * 16]);
    let err = w.check(&g).unwrap_err();
    assert!(
        err.to_string().contains("`mlp.experts.0.gate_proj.weight`"),
        "{err}"
    );
    let mut w = LayerWeights::random(&g, 1);
    w.router_bias = Some(vec![0.0; 4]);
    assert!(w.check(&g).is_err());
}

#[test]
fn save_run_checks_its_arguments() {
    let dir = tmp("save_args");
    let layer = base();
    let w = LayerWeights::random(&layer, 1);
    let x = random_inputs(&layer, 2, 3, 1);
    let err = save_run(&dir, &layer, &w, 3, 3, &x, &x).unwrap_err();
    assert!(
        err.to_string()
            .contains("`input`: 2 ranks of values, expected 3"),
        "{err}"
    );
    let mut y = x.clone();
    y[1].pop();
    let err = save_run(&dir, &layer, &w, 2, 3, &x, &y).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("run.safetensors") && msg.contains("`output`: rank 1 has 47 values"),
        "{msg}"
    );
    let mut bad = w.clone();
    bad.router.pop();
    assert!(matches!(
        save_run(&dir, &layer, &bad, 2, 3, &x, &x).unwrap_err(),
        WeightsError::Mismatch { .. }
    ));
    // Nothing was written by the failed calls.
    assert!(!dir.join("config.json").exists());
    // Zero tokens is a valid (empty) run.
    let empty = vec![Vec::new(); 2];
    save_run(&dir, &layer, &w, 2, 0, &empty, &empty).unwrap();
    let run = load_run(&dir).unwrap();
    assert_eq!(run.inputs, empty);
}

#[test]
fn load_run_reports_bad_configs() {
    let dir = tmp("bad_config");
    let err = load_run(&dir).unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }));
    assert!(err.to_string().contains("config.json"));

    let layer = base();
    let w = LayerWeights::random(&layer, 1);
    let x = random_inputs(&layer, 1, 2, 1);
    save_run(&dir, &layer, &w, 1, 2, &x, &x).unwrap();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"softmax\"", "\"softmx\"")).unwrap();
    let msg = load_run(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("`scoring_func`") && msg.contains("softmx"),
        "{msg}"
    );

    std::fs::write(&path, "{\"hidden_size\": 16}").unwrap();
    let msg = load_run(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("config.json") && msg.contains("missing field"),
        "{msg}"
    );
}

/// `random` draws large tensors on several threads, each from its own
/// position in the stream: the values are exactly those of one sequential
/// `random_range` per value, tensor after tensor, as documented. The layer's
/// tensors span several million values, so the threaded path runs.
#[test]
fn random_draws_the_documented_sequential_stream() {
    use rand::{Rng, SeedableRng};
    let mut l = base();
    l.hidden = 1024;
    l.intermediate = 1536;
    l.experts = 3;
    let w = LayerWeights::random(&l, 11);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut checked = 0usize;
    for (name, _, values) in w.tensors() {
        let fan_in = if name.contains("down_proj") {
            l.intermediate
        } else {
            l.hidden
        };
        let bound = (1.0 / (fan_in as f64).sqrt()) as f32;
        for (i, v) in values.iter().enumerate() {
            let want: f32 = rng.random_range(-bound..bound);
            assert_eq!(v.to_bits(), want.to_bits(), "{name}[{i}]");
        }
        checked += values.len();
    }
    assert!(checked > 4_000_000, "{checked}");
}
