//! The importer on the config corpus (`tests/configs/`) and on broken configs.

use serde_json::{Map, Value};

use super::models::*;
use super::*;
use crate::spec::*;

const MIXTRAL: &str = include_str!("../../../tests/configs/mixtral_8x7b.json");
const DEEPSEEK_V3: &str = include_str!("../../../tests/configs/deepseek_v3.json");
const QWEN3: &str = include_str!("../../../tests/configs/qwen3_30b_a3b.json");
const QWEN2: &str = include_str!("../../../tests/configs/qwen2_57b_a14b.json");
const LLAMA4: &str = include_str!("../../../tests/configs/llama4_maverick.json");
const GPT_OSS: &str = include_str!("../../../tests/configs/gpt_oss_20b.json");
const SWITCH: &str = include_str!("../../../tests/configs/switch_base_128.json");
const LLAMA_DENSE: &str = include_str!("../../../tests/configs/llama_dense.json");
const GLM4_5: &str = include_str!("../../../tests/configs/glm4_5.json");
const KIMI_K2: &str = include_str!("../../../tests/configs/kimi_k2.json");
const DEEPSEEK_V2: &str = include_str!("../../../tests/configs/deepseek_v2.json");
const QWEN3_NEXT: &str = include_str!("../../../tests/configs/qwen3_next_80b_a3b.json");
const QWEN3_T5: &str = include_str!("../../../tests/configs/qwen3_30b_a3b_transformers5.json");
const GRANITE: &str = include_str!("../../../tests/configs/granite_3_0_3b_a800m.json");
const OLMOE: &str = include_str!("../../../tests/configs/olmoe_1b_7b.json");
const DBRX: &str = include_str!("../../../tests/configs/dbrx_instruct.json");
const ERNIE: &str = include_str!("../../../tests/configs/ernie4_5_21b_a3b.json");
const MINIMAX: &str = include_str!("../../../tests/configs/minimax_text_01.json");
const JAMBA: &str = include_str!("../../../tests/configs/jamba_v0_1.json");
const PHI_MOE: &str = include_str!("../../../tests/configs/phi_3_5_moe.json");

/// Every MoE fixture with its expert count.
const MOE_FIXTURES: [(&str, &str, u64); 7] = [
    ("mixtral_8x7b", MIXTRAL, 8),
    ("deepseek_v3", DEEPSEEK_V3, 256),
    ("qwen3_30b_a3b", QWEN3, 128),
    ("qwen2_57b_a14b", QWEN2, 64),
    ("llama4_maverick", LLAMA4, 128),
    ("gpt_oss_20b", GPT_OSS, 32),
    ("switch_base_128", SWITCH, 128),
];

fn opts() -> ImportOptions {
    ImportOptions {
        nodes: 1,
        gpus_per_node: 8,
        device: "H100".to_string(),
        ep: None,
        tokens_per_rank: 4096,
        dtype: "bf16".to_string(),
        source_name: "config.json".to_string(),
        generic: false,
    }
}

fn multi_node(ep: Option<u64>) -> ImportOptions {
    ImportOptions {
        nodes: 2,
        gpus_per_node: 8,
        ep,
        ..opts()
    }
}

/// Imports `json`, checks that the text checks without a single diagnostic, and returns both.
fn import_ok(json: &str, options: &ImportOptions) -> (String, Program) {
    let text = match import_config(json, options) {
        Ok(t) => t,
        Err(e) => panic!("import failed: {e}"),
    };
    let checked = crate::check_source(&text);
    assert!(
        checked.diagnostics.is_empty(),
        "diagnostics for\n{text}\n{}",
        crate::render("imported", &text, &checked.diagnostics, false)
    );
    let (program, _) = checked.program.expect("a program");
    (text, program)
}

fn import_err(json: &str, options: &ImportOptions) -> String {
    match import_config(json, options) {
        Ok(t) => panic!("expected an error, got\n{t}"),
        Err(e) => e,
    }
}

/// The fixture with `edit` applied to its JSON.
fn edited(json: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> String {
    let mut v: Value = serde_json::from_str(json).expect("fixture is JSON");
    edit(v.as_object_mut().expect("fixture is an object"));
    serde_json::to_string_pretty(&v).expect("serialises")
}

fn swiglu() -> Ffn {
    Ffn::SwiGlu { limit: None }
}

#[test]
fn mixtral_8x7b_imports() {
    let (text, p) = import_ok(MIXTRAL, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "mixtral");
    assert_eq!(l.hidden, 4096);
    assert_eq!(l.dtype, DType::Bf16);
    assert_eq!(l.tokens_per_rank, 4096);
    assert_eq!(
        l.experts,
        Experts {
            count: 8,
            ffn: swiglu(),
            intermediate: 14336,
            bias: false
        }
    );
    assert_eq!(l.shared, None);
    assert_eq!(
        l.router,
        Router {
            scoring: Scoring::Softmax,
            top_k: 2,
            logit_bias: false,
            softmax_over: SoftmaxOver::All,
            selection_bias: false,
            groups: None,
            normalize: true,
            scale: 1.0,
            weight_on: WeightOn::Output,
        }
    );
    assert_eq!(l.capacity, Capacity::Dropless);
    assert_eq!((p.mesh.nodes, p.mesh.gpus_per_node), (1, 8));
    assert_eq!((p.mesh.ep, p.mesh.dp, p.mesh.etp), (8, 1, 1));
    assert_eq!(p.mesh.device.name, "H100");
    assert!(p.mesh.inter_node.is_none());
    assert!(text.starts_with("// Imported by `moec import` from config.json: a Mixtral"));
    assert!(text.contains("count = 8 // num_local_experts"));
    assert!(!text.contains("dp ="), "dp = 1 is left out:\n{text}");
}

#[test]
fn deepseek_v3_imports() {
    let (text, p) = import_ok(DEEPSEEK_V3, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "deepseek_v3");
    assert_eq!(l.hidden, 7168);
    assert_eq!(
        l.experts,
        Experts {
            count: 256,
            ffn: swiglu(),
            intermediate: 2048,
            bias: false
        }
    );
    assert_eq!(
        l.shared,
        Some(SharedExperts {
            count: 1,
            intermediate: 2048,
            ffn: swiglu(),
            bias: false,
            sigmoid_gate: false,
        })
    );
    assert_eq!(
        l.router,
        Router {
            scoring: Scoring::Sigmoid,
            top_k: 8,
            logit_bias: false,
            softmax_over: SoftmaxOver::All,
            selection_bias: true,
            groups: Some(Groups {
                count: 8,
                kept: 4,
                score: GroupScore::Top2Sum
            }),
            normalize: true,
            scale: 2.5,
            weight_on: WeightOn::Output,
        }
    );
    assert_eq!(l.capacity, Capacity::Dropless);
    assert_eq!(p.mesh.ep, 8);
    assert!(text.contains("first_k_dense_replace"));
}

#[test]
fn deepseek_v3_on_eight_h800_nodes() {
    let options = ImportOptions {
        nodes: 8,
        device: "H800".to_string(),
        ..opts()
    };
    let (text, p) = import_ok(DEEPSEEK_V3, &options);
    assert_eq!((p.mesh.nodes, p.mesh.ep, p.mesh.dp), (8, 64, 1));
    assert_eq!(p.mesh.device.name, "H800");
    let inter = p.mesh.inter_node.expect("an inter-node link");
    assert!((inter.bandwidth - 50e9).abs() < 1.0, "{}", inter.bandwidth);
    assert!((inter.latency - 10e-6).abs() < 1e-12, "{}", inter.latency);
    assert!(text.contains("bandwidth = 400 Gb/s"));
    assert!(text.contains("latency = 10 us"));
}

#[test]
fn deepseek_v2_imports_with_group_max() {
    let json = r#"{
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "hidden_size": 5120,
        "moe_intermediate_size": 1536,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 3,
        "topk_method": "group_limited_greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": false,
        "routed_scaling_factor": 16.0,
        "first_k_dense_replace": 1,
        "num_hidden_layers": 60
    }"#;
    let (_, p) = import_ok(json, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "deepseek_v2");
    assert_eq!(
        (l.hidden, l.experts.count, l.experts.intermediate),
        (5120, 160, 1536)
    );
    let shared = l.shared.as_ref().expect("shared experts");
    assert_eq!((shared.count, shared.intermediate), (2, 1536));
    assert_eq!(l.router.scoring, Scoring::Softmax);
    assert_eq!(l.router.top_k, 6);
    assert!(!l.router.selection_bias);
    assert_eq!(
        l.router.groups,
        Some(Groups {
            count: 8,
            kept: 3,
            score: GroupScore::Max
        })
    );
    assert!(!l.router.normalize);
    assert_eq!(l.router.scale, 16.0);

    // V2-Lite: greedy, no groups, no scaling.
    let lite = edited(json, |m| {
        m.insert("topk_method".into(), "greedy".into());
        m.insert("n_group".into(), 1.into());
        m.insert("topk_group".into(), 1.into());
        m.insert("n_routed_experts".into(), 64.into());
        m.insert("routed_scaling_factor".into(), 1.0.into());
    });
    let (_, p) = import_ok(&lite, &opts());
    assert_eq!(p.layer.router.groups, None);
    assert_eq!(p.layer.router.scale, 1.0);

    // Renormalised weights are not scaled in DeepSeek-V2.
    let norm = edited(json, |m| {
        m.insert("norm_topk_prob".into(), true.into());
    });
    let (_, p) = import_ok(&norm, &opts());
    assert!(p.layer.router.normalize);
    assert_eq!(p.layer.router.scale, 1.0);
}

#[test]
fn qwen3_30b_a3b_imports() {
    let (_, p) = import_ok(QWEN3, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "qwen3_moe");
    assert_eq!(l.hidden, 2048);
    assert_eq!(
        l.experts,
        Experts {
            count: 128,
            ffn: swiglu(),
            intermediate: 768,
            bias: false
        }
    );
    assert_eq!(l.shared, None);
    assert_eq!(l.router.scoring, Scoring::Softmax);
    assert_eq!(l.router.softmax_over, SoftmaxOver::All);
    assert_eq!(l.router.top_k, 8);
    assert!(l.router.normalize);
    assert_eq!(l.router.groups, None);
    assert_eq!(l.router.scale, 1.0);
    assert_eq!(p.mesh.ep, 8);
}

#[test]
fn qwen2_57b_a14b_imports() {
    let (_, p) = import_ok(QWEN2, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "qwen2_moe");
    assert_eq!(l.hidden, 3584);
    assert_eq!((l.experts.count, l.experts.intermediate), (64, 2560));
    assert_eq!(
        l.shared,
        Some(SharedExperts {
            count: 1,
            intermediate: 20480,
            ffn: swiglu(),
            bias: false,
            sigmoid_gate: true,
        })
    );
    assert_eq!(l.router.scoring, Scoring::Softmax);
    assert_eq!(l.router.top_k, 8);
    assert!(!l.router.normalize);
}

#[test]
fn llama4_maverick_imports_from_text_config() {
    let (text, p) = import_ok(LLAMA4, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "llama4");
    assert_eq!(l.hidden, 5120);
    assert_eq!(
        l.experts,
        Experts {
            count: 128,
            ffn: swiglu(),
            intermediate: 8192,
            bias: false
        }
    );
    assert_eq!(
        l.shared,
        Some(SharedExperts {
            count: 1,
            intermediate: 8192,
            ffn: swiglu(),
            bias: false,
            sigmoid_gate: false,
        })
    );
    assert_eq!(
        l.router,
        Router {
            scoring: Scoring::Sigmoid,
            top_k: 1,
            logit_bias: false,
            softmax_over: SoftmaxOver::All,
            selection_bias: false,
            groups: None,
            normalize: false,
            scale: 1.0,
            weight_on: WeightOn::Input,
        }
    );
    assert!(text.contains("// text_config.num_local_experts"));
    assert!(
        !text.contains("intermediate = 16384"),
        "intermediate_size_mlp is for the dense layers"
    );
}

#[test]
fn bare_llama4_text_config_imports() {
    let root: Value = serde_json::from_str(LLAMA4).expect("JSON");
    let text_config = root.get("text_config").expect("text_config").to_string();
    let (_, p) = import_ok(&text_config, &opts());
    assert_eq!(p.layer.name, "llama4_text");
    assert_eq!(p.layer.hidden, 5120);
    assert_eq!(p.layer.experts.intermediate, 8192);
    assert_eq!(p.layer.router.weight_on, WeightOn::Input);
    assert_eq!(p.layer.shared.as_ref().map(|s| s.intermediate), Some(8192));
}

#[test]
fn gpt_oss_20b_imports() {
    let (text, p) = import_ok(GPT_OSS, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "gpt_oss");
    assert_eq!(l.hidden, 2880);
    assert_eq!(
        l.experts,
        Experts {
            count: 32,
            ffn: Ffn::SwiGlu { limit: Some(7.0) },
            intermediate: 2880,
            bias: true
        }
    );
    assert_eq!(l.shared, None);
    assert_eq!(l.router.scoring, Scoring::Softmax);
    assert_eq!(l.router.softmax_over, SoftmaxOver::TopK);
    assert_eq!(l.router.top_k, 4);
    assert!(
        l.router.logit_bias,
        "the router Linear's bias is part of the logits"
    );
    assert!(!l.router.selection_bias);
    assert!(!l.router.normalize);
    assert!(text.contains("swiglu_limit = 7.0\n"), "{text}");
    assert!(
        text.contains("logit_bias = true // mlp.router.bias\n"),
        "{text}"
    );
    assert_eq!(p.mesh.ep, 8);
}

#[test]
fn switch_base_128_imports_with_slots() {
    let (_, p) = import_ok(SWITCH, &opts());
    let l = &p.layer;
    assert_eq!(l.name, "switch_transformers");
    assert_eq!(l.hidden, 768);
    assert_eq!(
        l.experts,
        Experts {
            count: 128,
            ffn: Ffn::Relu,
            intermediate: 3072,
            bias: false
        }
    );
    assert_eq!(l.router.scoring, Scoring::Softmax);
    assert_eq!(l.router.softmax_over, SoftmaxOver::All);
    assert_eq!(l.router.top_k, 1);
    assert!(!l.router.normalize);
    assert_eq!(
        l.capacity,
        Capacity::Limited {
            limit: CapacityLimit::Slots(64),
            drop: DropPolicy::Position
        }
    );
}

#[test]
fn switch_without_expert_capacity_uses_factor() {
    let json = edited(SWITCH, |m| {
        m.remove("expert_capacity");
    });
    let (text, p) = import_ok(&json, &opts());
    assert_eq!(
        p.layer.capacity,
        Capacity::Limited {
            limit: CapacityLimit::Factor(1.25),
            drop: DropPolicy::Position
        }
    );
    assert!(text.contains("factor = 1.25"));
}

#[test]
fn every_fixture_imports_on_two_nodes_with_ep_16() {
    for (name, json, experts) in MOE_FIXTURES {
        let ep = if experts % 16 == 0 { Some(16) } else { None };
        let (text, p) = import_ok(json, &multi_node(ep));
        assert_eq!(p.mesh.nodes, 2, "{name}");
        assert!(p.mesh.inter_node.is_some(), "{name}");
        assert!(text.contains("inter_node {"), "{name}");
        if ep.is_some() {
            assert_eq!((p.mesh.ep, p.mesh.dp), (16, 1), "{name}");
        } else {
            // Mixtral: 8 experts on 16 GPUs, two copies of each.
            assert_eq!((p.mesh.ep, p.mesh.dp), (8, 2), "{name}");
            assert!(text.contains("dp = 2"), "{name}");
        }
    }
}

#[test]
fn every_fixture_checks_with_default_options_and_other_dtypes() {
    for (name, json, _) in MOE_FIXTURES {
        for dtype in ["bf16", "f16", "f32"] {
            let options = ImportOptions {
                dtype: dtype.to_string(),
                ..opts()
            };
            let (_, p) = import_ok(json, &options);
            assert_eq!(p.layer.dtype.keyword(), dtype, "{name}");
        }
    }
}

#[test]
fn default_ep_is_the_largest_common_divisor() {
    // 64 experts on 3 nodes of 8: ep 8, dp 3.
    let options = ImportOptions { nodes: 3, ..opts() };
    let (_, p) = import_ok(QWEN2, &options);
    assert_eq!((p.mesh.ep, p.mesh.dp), (8, 3));
    // 32 experts on 4 GPUs: ep 4.
    let options = ImportOptions {
        gpus_per_node: 4,
        ..opts()
    };
    let (_, p) = import_ok(GPT_OSS, &options);
    assert_eq!((p.mesh.ep, p.mesh.dp), (4, 1));
    // A user's ep smaller than the default leaves data parallelism.
    let options = ImportOptions {
        ep: Some(2),
        ..opts()
    };
    let (_, p) = import_ok(MIXTRAL, &options);
    assert_eq!((p.mesh.ep, p.mesh.dp), (2, 4));
}

#[test]
fn dense_config_is_refused() {
    let e = import_err(LLAMA_DENSE, &opts());
    assert_eq!(
        e,
        "`llama` is not a Mixture-of-Experts model: it has none of num_local_experts, num_experts, n_routed_experts."
    );
    let mistral = r#"{"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336}"#;
    assert!(import_err(mistral, &opts()).starts_with("`mistral` is not a Mixture-of-Experts"));
}

#[test]
fn invalid_json_is_refused() {
    let e = import_err("{\n  \"model_type\": \"mixtral\",\n  oops\n}", &opts());
    assert!(e.starts_with("the file is not valid JSON"), "{e}");
    assert!(e.contains("line 3, column 3"), "{e}");
    let e = import_err("", &opts());
    assert!(e.contains("line 1"), "{e}");
    let e = import_err(&MIXTRAL[..MIXTRAL.len() / 2], &opts());
    assert!(e.starts_with("the file is not valid JSON"), "{e}");
}

#[test]
fn non_object_is_refused() {
    let e = import_err("[1, 2, 3]", &opts());
    assert!(
        e.contains("must be a JSON object") && e.contains("a list"),
        "{e}"
    );
    let e = import_err("42", &opts());
    assert!(e.contains("the number 42"), "{e}");
    let e = import_err("{}", &opts());
    assert!(
        e.contains("neither `model_type` nor `architectures`"),
        "{e}"
    );
}

#[test]
fn bad_ep_is_refused() {
    // 16 divides the 16 GPUs but not Mixtral's 8 experts.
    let e = import_err(MIXTRAL, &multi_node(Some(16)));
    assert!(e.contains("ep 16 does not divide the 8 experts"), "{e}");
    assert!(e.contains("1, 2, 4, 8"), "{e}");
    // 3 divides neither.
    let e = import_err(
        QWEN3,
        &ImportOptions {
            ep: Some(3),
            ..opts()
        },
    );
    assert!(e.contains("ep 3 does not divide the 8 GPUs"), "{e}");
    let e = import_err(
        QWEN3,
        &ImportOptions {
            ep: Some(0),
            ..opts()
        },
    );
    assert!(e.contains("at least 1"), "{e}");
}

#[test]
fn bad_options_are_refused() {
    let e = import_err(
        MIXTRAL,
        &ImportOptions {
            dtype: "fp8_e4m3".into(),
            ..opts()
        },
    );
    assert!(e.contains("must be f32, bf16 or f16"), "{e}");
    let e = import_err(
        MIXTRAL,
        &ImportOptions {
            device: "TPU }".into(),
            ..opts()
        },
    );
    assert!(e.contains("unknown device") && e.contains("H100"), "{e}");
    for (nodes, gpus, tokens) in [(0, 8, 1), (1, 0, 1), (1, 8, 0), (u64::MAX, 2, 1)] {
        let options = ImportOptions {
            nodes,
            gpus_per_node: gpus,
            tokens_per_rank: tokens,
            ..opts()
        };
        import_err(MIXTRAL, &options);
    }
    // Devices are matched without regard to case.
    let (_, p) = import_ok(
        MIXTRAL,
        &ImportOptions {
            device: "h200".into(),
            ..opts()
        },
    );
    assert_eq!(p.mesh.device.name, "H200");
}

#[test]
fn wrong_typed_fields_are_refused() {
    let json = edited(MIXTRAL, |m| {
        m.insert("hidden_size".into(), "4096".into());
    });
    assert_eq!(
        import_err(&json, &opts()),
        "`hidden_size` must be a whole number, but the config gives the string \"4096\"."
    );
    let json = edited(QWEN3, |m| {
        m.insert("norm_topk_prob".into(), "yes".into());
    });
    assert!(import_err(&json, &opts()).contains("`norm_topk_prob` must be `true` or `false`"));
    let json = edited(DEEPSEEK_V3, |m| {
        m.insert("routed_scaling_factor".into(), (-2.5).into());
    });
    assert!(
        import_err(&json, &opts()).contains("`routed_scaling_factor` must be a positive number")
    );
    let json = edited(GPT_OSS, |m| {
        m.insert("num_local_experts".into(), 32.5.into());
    });
    assert!(import_err(&json, &opts()).contains("`num_local_experts` must be a whole number"));
    let json = edited(LLAMA4, |m| {
        if let Some(Value::Object(tc)) = m.get_mut("text_config") {
            tc.insert("hidden_size".into(), Value::Array(Vec::new()));
        }
    });
    assert!(import_err(&json, &opts())
        .contains("`text_config.hidden_size` must be a whole number, but the config gives a list"));
    let json = edited(MIXTRAL, |m| {
        m.insert("num_experts_per_tok".into(), (-1).into());
    });
    assert!(import_err(&json, &opts()).contains("must be at least 1"));
    let json = edited(MIXTRAL, |m| {
        m.insert("model_type".into(), 7.into());
    });
    assert!(import_err(&json, &opts()).contains("`model_type` must be a string"));
    // A whole number written as a decimal is accepted.
    let json = edited(MIXTRAL, |m| {
        m.insert("hidden_size".into(), 4096.0.into());
    });
    assert_eq!(import_ok(&json, &opts()).1.layer.hidden, 4096);
}

#[test]
fn oversized_layers_are_refused_with_a_sentence() {
    let json = edited(MIXTRAL, |m| {
        m.insert("num_local_experts".into(), 100_000.into());
    });
    let e = import_err(&json, &opts());
    assert!(e.contains("at most 65536"), "{e}");
    let json = edited(MIXTRAL, |m| {
        m.insert("hidden_size".into(), (1u64 << 50).into());
    });
    let e = import_err(&json, &opts());
    assert!(e.contains("overflow 64 bits"), "{e}");
    let json = edited(MIXTRAL, |m| {
        m.insert("hidden_size".into(), u64::MAX.into());
    });
    let e = import_err(&json, &opts());
    assert!(e.contains("too large for moec"), "{e}");
    let options = ImportOptions {
        nodes: 1 << 20,
        ..opts()
    };
    let e = import_err(MIXTRAL, &options);
    assert!(e.contains("GPUs is larger than"), "{e}");
}

#[test]
fn missing_and_inconsistent_fields_are_refused() {
    let json = edited(QWEN3, |m| {
        m.remove("moe_intermediate_size");
    });
    assert_eq!(
        import_err(&json, &opts()),
        "the config has no `moe_intermediate_size`, which a Qwen3-MoE layer needs."
    );
    let json = edited(MIXTRAL, |m| {
        m.insert("num_experts_per_tok".into(), 9.into());
    });
    assert!(import_err(&json, &opts()).contains("only 8"));
    let json = edited(DEEPSEEK_V3, |m| {
        m.insert("n_group".into(), 7.into());
    });
    assert!(import_err(&json, &opts()).contains("7 equal groups"));
    let json = edited(DEEPSEEK_V3, |m| {
        m.insert("topk_group".into(), 9.into());
    });
    assert!(import_err(&json, &opts()).contains("only 8 groups"));
    let json = edited(DEEPSEEK_V3, |m| {
        m.insert("scoring_func".into(), "softmax".into());
    });
    assert!(import_err(&json, &opts()).contains("`scoring_func` is \"softmax\""));
    let json = edited(LLAMA4, |m| {
        m.remove("text_config");
    });
    assert!(import_err(&json, &opts()).contains("text_config"));
    let json = edited(SWITCH, |m| {
        m.insert("feed_forward_proj".into(), "swish".into());
    });
    assert!(import_err(&json, &opts()).contains("feed_forward_proj"));
}

#[test]
fn unknown_moe_model_is_imported_generically_with_a_warning() {
    let json = r#"{
        "architectures": ["NewMoeForCausalLM"],
        "model_type": "new_moe",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "norm_topk_prob": false,
        "num_hidden_layers": 16,
        "router_aux_loss_coef": 0.01
    }"#;
    let (text, p) = import_ok(json, &opts());
    assert!(text.contains("// imported generically"), "{text}");
    assert_eq!(p.layer.name, "new_moe");
    assert_eq!((p.layer.hidden, p.layer.experts.count), (2048, 64));
    assert_eq!(p.layer.experts.intermediate, 1024);
    assert_eq!(p.layer.experts.ffn, swiglu());
    assert_eq!(p.layer.router.scoring, Scoring::Softmax);
    assert_eq!(p.layer.router.top_k, 8);
    assert!(!p.layer.router.normalize);
    let imported = import(json, &opts()).expect("imports");
    assert_eq!(imported.warnings.len(), 1, "{:?}", imported.warnings);
    assert!(
        imported.warnings[0].contains("`new_moe` is not a model moec knows: imported generically"),
        "{:?}",
        imported.warnings
    );
    // moe_intermediate_size wins over intermediate_size; a missing top-k is named.
    let json = r#"{"model_type": "some-new MoE", "hidden_size": 64, "intermediate_size": 256,
                   "moe_intermediate_size": 32, "n_routed_experts": 16}"#;
    assert!(import_err(json, &opts()).contains("`num_experts_per_tok`"));
    let json = json.replace(
        "16}",
        "16, \"num_experts_per_tok\": 2, \"norm_topk_prob\": true}",
    );
    let (_, p) = import_ok(&json, &opts());
    assert_eq!(p.layer.name, "some_new_moe");
    assert_eq!(p.layer.experts.intermediate, 32);
    assert!(p.layer.router.normalize);
}

#[test]
fn unknown_model_with_fields_that_change_the_layer_is_refused_unless_generic() {
    let json = r#"{
        "model_type": "minimax_m2",
        "hidden_size": 3072,
        "intermediate_size": 1536,
        "num_local_experts": 256,
        "num_experts_per_tok": 8,
        "scoring_func": "sigmoid",
        "use_routing_bias": true,
        "shared_intermediate_size": 0,
        "hidden_act": "silu",
        "router_aux_loss_coef": 0.001
    }"#;
    let err = import_err(json, &opts());
    assert!(
        err.contains(
            "fields that may change what its MoE layer computes, which a generic import would \
             ignore: `scoring_func`, `shared_intermediate_size`, `use_routing_bias`"
        ) && err.contains("--generic"),
        "{err}"
    );
    let options = ImportOptions {
        generic: true,
        ..opts()
    };
    let imported = import(json, &options).expect("imports with --generic");
    assert!(
        imported.warnings[0]
            .contains("ignored: `scoring_func`, `shared_intermediate_size`, `use_routing_bias`"),
        "{:?}",
        imported.warnings
    );
    assert!(
        imported.text.contains("// Not imported: scoring_func"),
        "{}",
        imported.text
    );
    // An activation other than SiLU changes SwiGLU experts too.
    let gelu = json
        .replace("\"scoring_func\": \"sigmoid\",", "")
        .replace("\"use_routing_bias\": true,", "")
        .replace("\"shared_intermediate_size\": 0,", "")
        .replace("silu", "gelu");
    assert!(import_err(&gelu, &opts()).contains("`hidden_act`"));
    // Experts counted in fields moec does not read: not "not an MoE model".
    let json = r#"{"model_type": "future_moe", "hidden_size": 64, "moe_num_routed": 8}"#;
    let err = import_err(json, &opts());
    assert!(
        err.contains("names its experts in fields moec does not read (`moe_num_routed`)"),
        "{err}"
    );
}

#[test]
fn architecture_names_the_model_when_model_type_is_absent() {
    let json = edited(MIXTRAL, |m| {
        m.remove("model_type");
    });
    let (_, p) = import_ok(&json, &opts());
    assert_eq!(p.layer.name, "mixtral");
    assert!(p.layer.router.normalize);
    assert_eq!(arch_to_type("Qwen3MoeForCausalLM"), "qwen3_moe");
    assert_eq!(arch_to_type("DeepseekV3ForCausalLM"), "deepseek_v3");
    assert_eq!(arch_to_type("GptOssForCausalLM"), "gpt_oss");
    assert_eq!(arch_to_type("Llama4ForConditionalGeneration"), "llama4");
    assert_eq!(
        arch_to_type("SwitchTransformersEncoderModel"),
        "switch_transformers"
    );
}

#[test]
fn layer_names_are_sanitised() {
    assert_eq!(layer_name("Qwen3-MoE"), "qwen3_moe");
    assert_eq!(layer_name("deepseek_v3"), "deepseek_v3");
    assert_eq!(layer_name("9__x--y"), "x_y");
    assert_eq!(layer_name("ü"), "imported");
    assert_eq!(layer_name("let"), "let_layer");
    assert_eq!(layer_name("us"), "us_layer");
    // Such names still give a file that checks.
    for model_type in ["let", "s", "123", "true", "a b\nc"] {
        let json = edited(MIXTRAL, |m| {
            m.insert("model_type".into(), model_type.into());
        });
        import_ok(&json, &opts());
    }
}

#[test]
fn source_name_cannot_break_the_file() {
    let options = ImportOptions {
        source_name: "evil\n}\nlayer x {\r\n".into(),
        ..opts()
    };
    let (text, _) = import_ok(MIXTRAL, &options);
    assert!(text.starts_with("// Imported by `moec import` from evil } layer x {:"));
}

#[test]
fn output_follows_the_examples_style() {
    for (name, json, _) in MOE_FIXTURES {
        for options in [opts(), multi_node(None)] {
            let (text, _) = import_ok(json, &options);
            assert!(text.ends_with("}\n"), "{name}");
            assert!(!text.contains("\n\n\n"), "{name}");
            assert!(!text.contains('\t'), "{name}");
            for line in text.lines() {
                assert_eq!(line, line.trim_end(), "{name}: trailing space");
                let indent = line.len() - line.trim_start().len();
                assert_eq!(indent % 4, 0, "{name}: {line:?}");
                if line.trim_start().starts_with("//") {
                    assert!(line.chars().count() <= 80, "{name}: {line:?}");
                }
            }
            assert!(text.contains("\n\nmesh {\n"), "{name}");
        }
    }
}

#[test]
fn output_is_in_canonical_form() {
    for (name, json, _) in MOE_FIXTURES {
        for options in [opts(), multi_node(None)] {
            let (text, _) = import_ok(json, &options);
            let formatted = crate::format_source(&text).expect("formats");
            assert_eq!(
                formatted, text,
                "{name}: `moec fmt` would change the import"
            );
        }
    }
}

/// Values that replace one field at a time in the never-panic test.
fn odd_values() -> Vec<Value> {
    vec![
        Value::Null,
        Value::Bool(true),
        Value::from(0),
        Value::from(1),
        Value::from(3),
        Value::from(-1),
        Value::from(1.5),
        Value::from(1e300),
        Value::from(u64::MAX),
        Value::from(i64::MAX),
        Value::from("x"),
        Value::Array(vec![Value::from(1)]),
        Value::Object(Map::new()),
    ]
}

#[test]
fn never_panics_on_mutated_fixtures() {
    let mut imported = 0;
    let newer = [
        GLM4_5,
        KIMI_K2,
        DEEPSEEK_V2,
        QWEN3_NEXT,
        GRANITE,
        OLMOE,
        DBRX,
        ERNIE,
        MINIMAX,
        JAMBA,
        PHI_MOE,
    ];
    let all = MOE_FIXTURES.iter().map(|(_, json, _)| *json).chain(newer);
    for json in all {
        let root: Value = serde_json::from_str(json).expect("JSON");
        let Value::Object(top) = root else {
            panic!("fixture is not an object")
        };
        let mut cases: Vec<Map<String, Value>> = Vec::new();
        for key in top.keys() {
            for v in odd_values() {
                let mut m = top.clone();
                m.insert(key.clone(), v);
                cases.push(m);
            }
            let mut m = top.clone();
            m.remove(key);
            cases.push(m);
        }
        for nested in ["text_config", "ffn_config"] {
            let Some(Value::Object(tc)) = top.get(nested) else {
                continue;
            };
            for key in tc.keys() {
                for v in odd_values() {
                    let mut inner = tc.clone();
                    inner.insert(key.clone(), v);
                    let mut m = top.clone();
                    m.insert(nested.into(), Value::Object(inner));
                    cases.push(m);
                }
            }
        }
        for m in cases {
            let text = Value::Object(m).to_string();
            for options in [opts(), multi_node(Some(16))] {
                // import_config checks what it returns, so Ok means a clean file;
                // a refusal is a sentence of the importer's, not the checker's safety net.
                match import_config(&text, &options) {
                    Ok(out) => {
                        assert!(!crate::check_source(&out).has_errors());
                        imported += 1;
                    }
                    Err(e) => assert!(!e.contains("moec's checks"), "{e}\n{text}"),
                }
            }
        }
    }
    assert!(imported > 100, "only {imported} variants imported");
}

/// What one imported layer must be, field by field (bf16, dropless, output
/// weighting and SwiGLU experts without biases in every case below).
struct Expected {
    name: &'static str,
    hidden: u64,
    experts: (u64, u64),
    shared: Option<(u64, u64, bool)>,
    router: Router,
}

fn router(scoring: Scoring, top_k: u64) -> Router {
    Router {
        scoring,
        top_k,
        logit_bias: false,
        softmax_over: SoftmaxOver::All,
        selection_bias: false,
        groups: None,
        normalize: false,
        scale: 1.0,
        weight_on: WeightOn::Output,
    }
}

fn check_expected(json: &str, want: Expected) {
    let (text, p) = import_ok(json, &opts());
    let l = &p.layer;
    assert_eq!(l.name, want.name, "{text}");
    assert_eq!(l.hidden, want.hidden, "{}", want.name);
    assert_eq!(
        l.experts,
        Experts {
            count: want.experts.0,
            ffn: swiglu(),
            intermediate: want.experts.1,
            bias: false
        },
        "{}",
        want.name
    );
    let shared = want
        .shared
        .map(|(count, intermediate, sigmoid_gate)| SharedExperts {
            count,
            intermediate,
            ffn: swiglu(),
            bias: false,
            sigmoid_gate,
        });
    assert_eq!(l.shared, shared, "{}", want.name);
    assert_eq!(l.router, want.router, "{}", want.name);
    assert_eq!(l.capacity, Capacity::Dropless, "{}", want.name);
    assert_eq!(l.dtype, DType::Bf16);
}

#[test]
fn glm4_5_imports_with_deepseek_v3_routing() {
    check_expected(
        GLM4_5,
        Expected {
            name: "glm4_moe",
            hidden: 5120,
            experts: (160, 1536),
            shared: Some((1, 1536, false)),
            router: Router {
                selection_bias: true,
                normalize: true,
                scale: 2.5,
                ..router(Scoring::Sigmoid, 8)
            },
        },
    );
    // GLM's own defaults when the routing fields are left out: one group, no scale.
    let bare = edited(GLM4_5, |m| {
        for f in ["n_group", "topk_group", "routed_scaling_factor"] {
            m.remove(f);
        }
    });
    let (_, p) = import_ok(&bare, &opts());
    assert_eq!(p.layer.router.groups, None);
    assert_eq!(p.layer.router.scale, 1.0);
}

#[test]
fn kimi_k2_imports_with_384_experts_and_one_group() {
    check_expected(
        KIMI_K2,
        Expected {
            name: "kimi_k2",
            hidden: 7168,
            experts: (384, 2048),
            shared: Some((1, 2048, false)),
            router: Router {
                selection_bias: true,
                normalize: true,
                scale: 2.827,
                ..router(Scoring::Sigmoid, 8)
            },
        },
    );
}

#[test]
fn deepseek_v2_imports_with_group_limited_greedy() {
    check_expected(
        DEEPSEEK_V2,
        Expected {
            name: "deepseek_v2",
            hidden: 5120,
            experts: (160, 1536),
            shared: Some((2, 1536, false)),
            router: Router {
                groups: Some(Groups {
                    count: 8,
                    kept: 3,
                    score: GroupScore::Max,
                }),
                scale: 16.0,
                ..router(Scoring::Softmax, 6)
            },
        },
    );
}

#[test]
fn qwen3_next_imports_with_its_gated_shared_expert() {
    check_expected(
        QWEN3_NEXT,
        Expected {
            name: "qwen3_next",
            hidden: 2048,
            experts: (512, 512),
            shared: Some((1, 512, true)),
            router: Router {
                normalize: true,
                ..router(Scoring::Softmax, 10)
            },
        },
    );
}

#[test]
fn qwen3_moe_saved_by_transformers_5_imports_with_num_local_experts() {
    let (_, old) = import_ok(QWEN3, &opts());
    let (text, new) = import_ok(QWEN3_T5, &opts());
    assert_eq!(old.layer.experts, new.layer.experts);
    assert_eq!(old.layer.router, new.layer.router);
    assert!(text.contains("count = 128 // num_local_experts"), "{text}");
}

#[test]
fn granitemoe_imports_with_a_softmax_over_the_top_k() {
    check_expected(
        GRANITE,
        Expected {
            name: "granitemoe",
            hidden: 1536,
            experts: (40, 512),
            shared: None,
            router: Router {
                softmax_over: SoftmaxOver::TopK,
                ..router(Scoring::Softmax, 8)
            },
        },
    );
}

#[test]
fn olmoe_imports_without_renormalisation() {
    check_expected(
        OLMOE,
        Expected {
            name: "olmoe",
            hidden: 2048,
            experts: (64, 1024),
            shared: None,
            router: router(Scoring::Softmax, 8),
        },
    );
}

#[test]
fn dbrx_imports_from_ffn_config() {
    check_expected(
        DBRX,
        Expected {
            name: "dbrx",
            hidden: 6144,
            experts: (16, 10752),
            shared: None,
            router: Router {
                normalize: true,
                ..router(Scoring::Softmax, 4)
            },
        },
    );
    let no_norm = edited(DBRX, |m| {
        m["ffn_config"]["moe_normalize_expert_weights"] = Value::Null;
    });
    let (_, p) = import_ok(&no_norm, &opts());
    assert!(!p.layer.router.normalize);
    let p2 = edited(DBRX, |m| {
        m["ffn_config"]["moe_normalize_expert_weights"] = 2.into();
    });
    assert!(import_err(&p2, &opts()).contains("p-norm"));
    let gelu = edited(DBRX, |m| {
        m["ffn_config"]["ffn_act_fn"] = serde_json::json!({"name": "gelu"});
    });
    assert!(import_err(&gelu, &opts()).contains("`ffn_config.ffn_act_fn.name`"));
}

#[test]
fn ernie4_5_moe_imports_with_its_selection_bias_and_shared_experts() {
    check_expected(
        ERNIE,
        Expected {
            name: "ernie4_5_moe",
            hidden: 2560,
            experts: (64, 1536),
            shared: Some((2, 1536, false)),
            router: Router {
                selection_bias: true,
                normalize: true,
                ..router(Scoring::Softmax, 6)
            },
        },
    );
}

#[test]
fn minimax_imports_as_mixtral_routing() {
    check_expected(
        MINIMAX,
        Expected {
            name: "minimax",
            hidden: 6144,
            experts: (32, 9216),
            shared: None,
            router: Router {
                normalize: true,
                ..router(Scoring::Softmax, 2)
            },
        },
    );
    let shared = edited(MINIMAX, |m| {
        m.insert("shared_intermediate_size".into(), 4096.into());
    });
    assert!(import_err(&shared, &opts()).contains("`shared_intermediate_size` is 4096"));
}

#[test]
fn jamba_imports_without_renormalisation() {
    check_expected(
        JAMBA,
        Expected {
            name: "jamba",
            hidden: 4096,
            experts: (16, 14336),
            shared: None,
            router: router(Scoring::Softmax, 2),
        },
    );
}

#[test]
fn switch_router_bias_becomes_the_logit_bias() {
    let (_, p) = import_ok(SWITCH, &opts());
    assert!(!p.layer.router.logit_bias);
    let biased = edited(SWITCH, |m| {
        m.insert("router_bias".into(), true.into());
    });
    let (text, p) = import_ok(&biased, &opts());
    assert!(p.layer.router.logit_bias);
    assert!(text.contains("logit_bias = true // router_bias"), "{text}");
}

#[test]
fn ernie_gates_other_than_topk_are_refused() {
    let other = edited(ERNIE, |m| {
        m.insert("moe_gate".into(), "top2".into());
    });
    let err = import_err(&other, &opts());
    assert!(err.contains("`moe_gate` is \"top2\""), "{err}");
}

#[test]
fn phi_3_5_moe_is_refused_for_its_sparsemixer_routing() {
    let err = import_err(PHI_MOE, &opts());
    assert!(
        err.starts_with(
            "Phi-3.5-MoE routes with sparsemixer, which the .moe language cannot express"
        ),
        "{err}"
    );
}

#[test]
fn a_gated_activation_other_than_silu_is_refused() {
    let gelu = edited(OLMOE, |m| {
        m.insert("hidden_act".into(), "gelu".into());
    });
    let err = import_err(&gelu, &opts());
    assert!(err.contains("`hidden_act` is \"gelu\""), "{err}");
}
