//! The models the importer knows: each family's reader turns its config into
//! a [`Model`], following the model's reference code (see `MODELS.md`).

use serde_json::{Map, Value};

use super::json::*;
use super::model::*;
use super::render::{clean_comment, decimal, plural, short_number};

/// The models whose routing the importer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Mixtral,
    DeepseekV3,
    DeepseekV2,
    Qwen3Moe,
    Qwen2Moe,
    Llama4,
    GptOss,
    Switch,
}

impl Kind {
    pub(super) fn from_type(model_type: &str) -> Option<Kind> {
        Some(match model_type {
            "mixtral" => Kind::Mixtral,
            "deepseek_v3" => Kind::DeepseekV3,
            "deepseek_v2" => Kind::DeepseekV2,
            "qwen3_moe" => Kind::Qwen3Moe,
            "qwen2_moe" => Kind::Qwen2Moe,
            "llama4" | "llama4_text" => Kind::Llama4,
            "gpt_oss" => Kind::GptOss,
            "switch_transformers" => Kind::Switch,
            _ => return None,
        })
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Mixtral => "Mixtral",
            Kind::DeepseekV3 => "DeepSeek-V3",
            Kind::DeepseekV2 => "DeepSeek-V2",
            Kind::Qwen3Moe => "Qwen3-MoE",
            Kind::Qwen2Moe => "Qwen2-MoE",
            Kind::Llama4 => "Llama-4",
            Kind::GptOss => "gpt-oss",
            Kind::Switch => "Switch Transformers",
        }
    }
}

/// `MixtralForCausalLM` -> `mixtral`, `Qwen3MoeForCausalLM` -> `qwen3_moe`.
pub(super) fn arch_to_type(arch: &str) -> String {
    let base = match arch.find("For") {
        Some(i) if i > 0 => &arch[..i],
        _ => {
            let a = arch.strip_suffix("Model").unwrap_or(arch);
            a.strip_suffix("Encoder").unwrap_or(a)
        }
    };
    let mut out = String::new();
    let mut prev: Option<char> = None;
    for c in base.chars() {
        if c.is_ascii_uppercase()
            && prev.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit())
        {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
        prev = Some(c);
    }
    out
}

/// Words the lexer reads as something other than a name.
pub(super) const RESERVED_NAMES: [&str; 7] = ["let", "true", "false", "ns", "us", "ms", "s"];

/// A layer name: `[a-z0-9_]`, starting with a letter.
pub(super) fn layer_name(raw: &str) -> String {
    let mut s = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('_') {
            s.push('_');
        }
    }
    let s = s
        .trim_start_matches(|c: char| !c.is_ascii_lowercase())
        .trim_end_matches('_');
    if s.is_empty() {
        "imported".to_string()
    } else if RESERVED_NAMES.contains(&s) {
        format!("{s}_layer")
    } else {
        s.to_string()
    }
}

/// Text safe to put in a `//` comment: one line, no control characters.
/// Reads the config and works out the layer it describes.
pub(super) fn read_model(root: &Map<String, Value>) -> Result<Model, String> {
    let top = Cfg {
        obj: root,
        prefix: "",
        label: "MoE",
    };
    let model_type = top.opt_str("model_type")?;
    let arch = match root.get("architectures") {
        Some(Value::Array(list)) => list.first().and_then(Value::as_str),
        _ => None,
    };
    let arch_type = arch.map(arch_to_type);
    let name_source = match (model_type, &arch_type) {
        (Some(t), _) if !t.trim().is_empty() => t.to_string(),
        (_, Some(a)) if !a.is_empty() => a.clone(),
        _ => {
            return Err(
                "the config does not say which model it describes: it has neither `model_type` nor `architectures`."
                    .to_string(),
            )
        }
    };

    // Multimodal configs (Llama-4 and others) keep the language model under `text_config`.
    let text_config = match root.get("text_config") {
        Some(Value::Object(tc)) => Some(tc),
        Some(Value::Null) | None => None,
        Some(v) if !top.has_expert_count() => {
            return Err(format!(
                "`text_config` must be an object, but the config gives {}.",
                describe(v)
            ))
        }
        Some(_) => None,
    };
    let (obj, prefix) = match text_config {
        Some(tc) if !top.has_expert_count() => (tc, "text_config."),
        _ => (root, ""),
    };
    let inner_type = if prefix.is_empty() {
        None
    } else {
        Cfg {
            obj,
            prefix,
            label: "MoE",
        }
        .opt_str("model_type")?
    };

    let kind = model_type
        .and_then(Kind::from_type)
        .or_else(|| inner_type.and_then(Kind::from_type))
        .or_else(|| arch_type.as_deref().and_then(Kind::from_type));

    let shown_type = clean_comment(&name_source);
    let mut title = match kind {
        Some(k) => format!("a {} model", k.label()),
        None => format!("a `{shown_type}` model"),
    };
    if let Some(a) = arch {
        title.push_str(&format!(" ({})", clean_comment(a)));
    }
    if let Some(Value::String(path)) = root.get("_name_or_path") {
        let path = clean_comment(path);
        if !path.is_empty() {
            title.push_str(&format!(", `{path}`"));
        }
    }

    let name = layer_name(&name_source);
    let Some(kind) = kind else {
        let cfg = Cfg {
            obj,
            prefix,
            label: "MoE",
        };
        if !cfg.has_expert_count() {
            return Err(format!(
                "`{shown_type}` is not a Mixture-of-Experts model: it has none of {}.",
                EXPERT_COUNT_FIELDS.join(", ")
            ));
        }
        return generic(cfg, name, title);
    };
    let cfg = Cfg {
        obj,
        prefix,
        label: kind.label(),
    };
    if kind == Kind::Llama4 && model_type == Some("llama4") && prefix.is_empty() {
        return Err(
            "a `llama4` config keeps its language model under `text_config`, which this config lacks."
                .to_string(),
        );
    }
    let build = match kind {
        Kind::Mixtral => mixtral,
        Kind::DeepseekV3 => deepseek_v3,
        Kind::DeepseekV2 => deepseek_v2,
        Kind::Qwen3Moe => qwen3_moe,
        Kind::Qwen2Moe => qwen2_moe,
        Kind::Llama4 => llama4,
        Kind::GptOss => gpt_oss,
        Kind::Switch => switch,
    };
    build(cfg, name, title)
}

/// `top_k` must not exceed the expert count.
pub(super) fn check_top_k(
    top_k: &Noted<u64>,
    count: &Noted<u64>,
    label: &str,
) -> Result<(), String> {
    if top_k.value > count.value {
        return Err(format!(
            "the config routes each token to {} experts (`{}`), but the {label} layer has only {} (`{}`).",
            top_k.value,
            top_k.note.as_deref().unwrap_or("top_k"),
            count.value,
            count.note.as_deref().unwrap_or("experts"),
        ));
    }
    Ok(())
}

/// A note for a value the config left out, so transformers' default applies.
pub(super) fn default_note(field: &str) -> String {
    format!("{field} (absent: transformers' default)")
}

pub(super) fn mixtral(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let hidden = c.int("hidden_size", 1)?;
    let count = noted(c.int("num_local_experts", 1)?, c.path("num_local_experts"));
    let top_k = noted(
        c.int("num_experts_per_tok", 1)?,
        c.path("num_experts_per_tok"),
    );
    let inter = c.int("intermediate_size", 1)?;
    check_top_k(&top_k, &count, c.label)?;
    let mut about = Vec::new();
    if let Some(n) = c.info_int("num_hidden_layers") {
        about.push(format!(
            "One of its {} (every layer is MoE).",
            plural(n, "MoE layer", "MoE layers")
        ));
    }
    let router_comment = vec![format!(
        "Softmax over all {} logits, top-{}, renormalised over the chosen experts: \
         the same as a softmax over the chosen logits.",
        count.value, top_k.value
    )];
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: vec!["SwiGLU experts: w1 = gate, w3 = up, w2 = down.".to_string()],
            count,
            ffn: plain("swiglu"),
            intermediate: noted(inter, c.path("intermediate_size")),
            bias: false,
            swiglu_limit: None,
        },
        shared: None,
        router: RouterOut {
            comment: router_comment,
            scoring: plain("softmax"),
            top_k,
            softmax_over: Some("all"),
            selection_bias: None,
            groups: None,
            normalize: Some(noted(true, "Mixtral always renormalises")),
            scale: None,
            weight_on_input: false,
        },
        capacity: CapacityOut::Dropless,
    })
}

/// The counts and sizes every DeepSeek MoE layer has.
pub(super) struct DeepseekBase {
    pub(super) hidden: u64,
    pub(super) count: Noted<u64>,
    pub(super) top_k: Noted<u64>,
    pub(super) inter: u64,
    pub(super) shared: Option<SharedOut>,
    pub(super) about: Vec<String>,
}

pub(super) fn deepseek_base(c: Cfg, shared_default: Option<u64>) -> Result<DeepseekBase, String> {
    let hidden = c.int("hidden_size", 1)?;
    let count = noted(c.int("n_routed_experts", 1)?, c.path("n_routed_experts"));
    let top_k = noted(
        c.int("num_experts_per_tok", 1)?,
        c.path("num_experts_per_tok"),
    );
    let inter = c.int("moe_intermediate_size", 1)?;
    check_top_k(&top_k, &count, c.label)?;
    let shared_count = match c.opt_int("n_shared_experts", 0)? {
        Some(n) => Some(noted(n, c.path("n_shared_experts"))),
        None => shared_default.map(|n| noted(n, default_note(&c.path("n_shared_experts")))),
    };
    let shared = shared_count.filter(|n| n.value > 0).map(|count| SharedOut {
        comment: vec![format!(
            "{}, added unweighted to the routed output.",
            if count.value == 1 {
                "One shared expert".to_string()
            } else {
                format!(
                    "{} shared experts (one SwiGLU of {} x moe_intermediate_size)",
                    count.value, count.value
                )
            }
        )],
        count,
        intermediate: noted(inter, c.path("moe_intermediate_size")),
        sigmoid_gate: false,
    });
    let mut about = Vec::new();
    match (
        c.info_int("num_hidden_layers"),
        c.info_int("first_k_dense_replace"),
    ) {
        (Some(n), Some(k)) if k > 0 && k < n => about.push(format!(
            "The first {k} of its {n} layers are dense (first_k_dense_replace); \
             this is one of the other {}.",
            n - k
        )),
        (Some(n), _) => about.push(format!("One of its {} MoE layers.", n)),
        _ => {}
    }
    Ok(DeepseekBase {
        hidden,
        count,
        top_k,
        inter,
        shared,
        about,
    })
}

/// Group-limited selection: `None` when the config has a single group.
pub(super) fn deepseek_groups(
    c: Cfg,
    count: u64,
    top_k: u64,
    defaults: Option<(u64, u64)>,
    score: &'static str,
) -> Result<Option<GroupsOut>, String> {
    let groups = match (c.opt_int("n_group", 1)?, defaults) {
        (Some(n), _) => noted(n, c.path("n_group")),
        (None, Some((n, _))) => noted(n, default_note(&c.path("n_group"))),
        (None, None) => return Err(c.missing("n_group")),
    };
    if groups.value == 1 {
        return Ok(None);
    }
    let kept = match (c.opt_int("topk_group", 1)?, defaults) {
        (Some(n), _) => noted(n, c.path("topk_group")),
        (None, Some((_, k))) => noted(k, default_note(&c.path("topk_group"))),
        (None, None) => return Err(c.missing("topk_group")),
    };
    let (g, k) = (groups.value, kept.value);
    if count % g != 0 {
        return Err(format!(
            "the {count} routed experts cannot be split into `{}` = {g} equal groups.",
            c.path("n_group")
        ));
    }
    if k > g {
        return Err(format!(
            "`{}` is {k}, but there are only {g} groups (`{}`).",
            c.path("topk_group"),
            c.path("n_group")
        ));
    }
    let per_group = count / g;
    if score == "top2_sum" && per_group < 2 {
        return Err(format!(
            "a group of {per_group} expert has no two best scores to sum: `{}` = {g} is too many groups for {count} experts.",
            c.path("n_group")
        ));
    }
    if k.saturating_mul(per_group) < top_k {
        return Err(format!(
            "the {k} kept groups (`{}`) hold {} experts, fewer than the {top_k} each token needs.",
            c.path("topk_group"),
            k * per_group
        ));
    }
    Ok(Some(GroupsOut {
        count: groups,
        kept,
        score,
    }))
}

/// A string field that must be one of `allowed`, with a default when absent.
pub(super) fn choice<'a>(
    c: Cfg<'a>,
    field: &str,
    default: &'static str,
    allowed: &[&'static str],
) -> Result<&'a str, String> {
    let value = c.opt_str(field)?.unwrap_or(default);
    if allowed.contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "`{}` is {:?}, which {} routing does not define; moec knows {}.",
            c.path(field),
            value,
            c.label,
            allowed
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(" and ")
        ))
    }
}

pub(super) fn deepseek_v3(c: Cfg, name: String, title: String) -> Result<Model, String> {
    // Transformers' DeepseekV3Config defaults, for fields a config leaves out.
    let base = deepseek_base(c, Some(1))?;
    choice(c, "scoring_func", "sigmoid", &["sigmoid"])?;
    choice(c, "topk_method", "noaux_tc", &["noaux_tc"])?;
    let groups = deepseek_groups(
        c,
        base.count.value,
        base.top_k.value,
        Some((8, 4)),
        "top2_sum",
    )?;
    let norm = match c.opt_bool("norm_topk_prob")? {
        Some(b) => noted(b, c.path("norm_topk_prob")),
        None => noted(true, default_note(&c.path("norm_topk_prob"))),
    };
    let scale = match c.opt_positive("routed_scaling_factor")? {
        Some(x) => noted(x, c.path("routed_scaling_factor")),
        None => noted(2.5, default_note(&c.path("routed_scaling_factor"))),
    };
    // The reference code renormalises only when more than one expert is chosen.
    let normalize = Noted {
        value: norm.value && base.top_k.value > 1,
        note: if norm.value && base.top_k.value == 1 {
            Some("norm_topk_prob applies only when top_k > 1".to_string())
        } else {
            norm.note
        },
    };
    let mut comment = vec![format!(
        "noaux_tc: sigmoid scores plus a correction bias (e_score_correction_bias) choose the experts{}; \
         the weights are the unbiased scores{}{}.",
        match &groups {
            Some(g) => format!(
                ", within the best {} of {} groups (a group scores the sum of its two best)",
                g.kept.value, g.count.value
            ),
            None => String::new(),
        },
        if normalize.value { ", renormalised" } else { "" },
        if scale.value != 1.0 {
            format!(", times {}", decimal(scale.value))
        } else {
            String::new()
        }
    )];
    if groups.is_none() {
        comment.push("n_group = 1: no group limit.".to_string());
    }
    Ok(Model {
        name,
        title,
        about: base.about,
        hidden: noted(base.hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: Vec::new(),
            count: base.count,
            ffn: plain("swiglu"),
            intermediate: noted(base.inter, c.path("moe_intermediate_size")),
            bias: false,
            swiglu_limit: None,
        },
        shared: base.shared,
        router: RouterOut {
            comment,
            scoring: noted("sigmoid", c.path("scoring_func")),
            top_k: base.top_k,
            softmax_over: None,
            selection_bias: Some(noted(true, "e_score_correction_bias")),
            groups,
            normalize: Some(normalize),
            scale: (scale.value != 1.0).then_some(scale),
            weight_on_input: false,
        },
        capacity: CapacityOut::Dropless,
    })
}

pub(super) fn deepseek_v2(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let base = deepseek_base(c, None)?;
    choice(c, "scoring_func", "softmax", &["softmax"])?;
    let method = choice(
        c,
        "topk_method",
        "greedy",
        &["greedy", "group_limited_greedy"],
    )?;
    let groups = if method == "group_limited_greedy" {
        deepseek_groups(c, base.count.value, base.top_k.value, None, "max")?
    } else {
        None
    };
    let norm = match c.opt_bool("norm_topk_prob")? {
        Some(b) => noted(b, c.path("norm_topk_prob")),
        None => noted(false, default_note(&c.path("norm_topk_prob"))),
    };
    let factor = match c.opt_positive("routed_scaling_factor")? {
        Some(x) => noted(x, c.path("routed_scaling_factor")),
        None => noted(1.0, default_note(&c.path("routed_scaling_factor"))),
    };
    let normalize = Noted {
        value: norm.value && base.top_k.value > 1,
        note: if norm.value && base.top_k.value == 1 {
            Some("norm_topk_prob applies only when top_k > 1".to_string())
        } else {
            norm.note
        },
    };
    let mut comment = vec![format!(
        "{method}: softmax over all experts, top-{}{}; {}.",
        base.top_k.value,
        match &groups {
            Some(g) => format!(
                " within the best {} of {} groups (a group scores its best expert)",
                g.kept.value, g.count.value
            ),
            None => String::new(),
        },
        if normalize.value {
            "the weights are renormalised (and then not scaled)".to_string()
        } else if factor.value != 1.0 {
            format!("the weights are scaled by {}", decimal(factor.value))
        } else {
            "the weights are the raw probabilities".to_string()
        }
    )];
    if method == "group_limited_greedy" && groups.is_none() {
        comment.push("n_group = 1: no group limit.".to_string());
    }
    // DeepSeek-V2 scales the weights only when it does not renormalise them.
    let scale = (!normalize.value && factor.value != 1.0).then_some(factor);
    Ok(Model {
        name,
        title,
        about: base.about,
        hidden: noted(base.hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: Vec::new(),
            count: base.count,
            ffn: plain("swiglu"),
            intermediate: noted(base.inter, c.path("moe_intermediate_size")),
            bias: false,
            swiglu_limit: None,
        },
        shared: base.shared,
        router: RouterOut {
            comment,
            scoring: plain("softmax"),
            top_k: base.top_k,
            softmax_over: Some("all"),
            selection_bias: None,
            groups,
            normalize: Some(normalize),
            scale,
            weight_on_input: false,
        },
        capacity: CapacityOut::Dropless,
    })
}

/// The parts Qwen2-MoE and Qwen3-MoE share.
pub(super) fn qwen_router(c: Cfg, count: u64, top_k: Noted<u64>) -> Result<RouterOut, String> {
    let norm = match c.opt_bool("norm_topk_prob")? {
        Some(b) => noted(b, c.path("norm_topk_prob")),
        None => noted(false, default_note(&c.path("norm_topk_prob"))),
    };
    Ok(RouterOut {
        comment: vec![format!(
            "Softmax over all {count} logits, top-{}{}.",
            top_k.value,
            if norm.value {
                ", renormalised over the chosen experts"
            } else {
                ", without renormalisation"
            }
        )],
        scoring: plain("softmax"),
        top_k,
        softmax_over: None,
        selection_bias: None,
        groups: None,
        normalize: Some(norm),
        scale: None,
        weight_on_input: false,
    })
}

pub(super) fn qwen_about(c: Cfg) -> Vec<String> {
    let mut about = Vec::new();
    if let Some(n) = c.info_int("num_hidden_layers") {
        let step = c.info_int("decoder_sparse_step").unwrap_or(1);
        let dense = match c.get("mlp_only_layers") {
            Some(Value::Array(list)) => list.len() as u64,
            _ => 0,
        };
        if step <= 1 && dense == 0 {
            about.push(format!(
                "One of its {} (every layer is MoE).",
                plural(n, "MoE layer", "MoE layers")
            ));
        } else {
            about.push(format!(
                "One of the MoE layers among its {n} (decoder_sparse_step = {step}, {} in mlp_only_layers).",
                plural(dense, "dense layer", "dense layers")
            ));
        }
    }
    about
}

pub(super) fn qwen3_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let hidden = c.int("hidden_size", 1)?;
    let count = noted(c.int("num_experts", 1)?, c.path("num_experts"));
    let top_k = noted(
        c.int("num_experts_per_tok", 1)?,
        c.path("num_experts_per_tok"),
    );
    let inter = c.int("moe_intermediate_size", 1)?;
    check_top_k(&top_k, &count, c.label)?;
    let mut about = qwen_about(c);
    about.push("No shared expert.".to_string());
    let router = qwen_router(c, count.value, top_k)?;
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: Vec::new(),
            count,
            ffn: plain("swiglu"),
            intermediate: noted(inter, c.path("moe_intermediate_size")),
            bias: false,
            swiglu_limit: None,
        },
        shared: None,
        router,
        capacity: CapacityOut::Dropless,
    })
}

pub(super) fn qwen2_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let hidden = c.int("hidden_size", 1)?;
    let count = noted(c.int("num_experts", 1)?, c.path("num_experts"));
    let top_k = noted(
        c.int("num_experts_per_tok", 1)?,
        c.path("num_experts_per_tok"),
    );
    let inter = c.int("moe_intermediate_size", 1)?;
    let shared_inter = c.int("shared_expert_intermediate_size", 1)?;
    check_top_k(&top_k, &count, c.label)?;
    let router = qwen_router(c, count.value, top_k)?;
    Ok(Model {
        name,
        title,
        about: qwen_about(c),
        hidden: noted(hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: Vec::new(),
            count,
            ffn: plain("swiglu"),
            intermediate: noted(inter, c.path("moe_intermediate_size")),
            bias: false,
            swiglu_limit: None,
        },
        shared: Some(SharedOut {
            comment: vec![
                "One shared expert, its output multiplied by sigmoid(shared_expert_gate(x))."
                    .to_string(),
            ],
            count: plain(1),
            intermediate: noted(shared_inter, c.path("shared_expert_intermediate_size")),
            sigmoid_gate: true,
        }),
        router,
        capacity: CapacityOut::Dropless,
    })
}

pub(super) fn llama4(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let hidden = c.int("hidden_size", 1)?;
    let count = noted(c.int("num_local_experts", 1)?, c.path("num_local_experts"));
    let top_k = noted(
        c.int("num_experts_per_tok", 1)?,
        c.path("num_experts_per_tok"),
    );
    let inter = c.int("intermediate_size", 1)?;
    check_top_k(&top_k, &count, c.label)?;
    let mut about = Vec::new();
    match (
        c.info_int("num_hidden_layers"),
        c.info_int("interleave_moe_layer_step"),
    ) {
        (Some(n), Some(step)) if step > 1 => about.push(format!(
            "One of the MoE layers among its {n}: one layer in {step} is MoE (interleave_moe_layer_step)."
        )),
        (Some(n), _) => about.push(format!(
            "One of its {} (every layer is MoE).",
            plural(n, "MoE layer", "MoE layers")
        )),
        _ => {}
    }
    let mut experts_comment = Vec::new();
    if let Some(dense) = c.info_int("intermediate_size_mlp") {
        experts_comment.push(format!(
            "The experts use intermediate_size; intermediate_size_mlp ({dense}) sizes the dense layers."
        ));
    }
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: experts_comment,
            count,
            ffn: plain("swiglu"),
            intermediate: noted(inter, c.path("intermediate_size")),
            bias: false,
            swiglu_limit: None,
        },
        shared: Some(SharedOut {
            comment: vec!["One shared expert, added to the routed output.".to_string()],
            count: plain(1),
            intermediate: noted(inter, c.path("intermediate_size")),
            sigmoid_gate: false,
        }),
        router: RouterOut {
            comment: vec![
                "The sigmoid of each chosen logit scales the expert's input, not its output."
                    .to_string(),
            ],
            scoring: plain("sigmoid"),
            top_k,
            softmax_over: None,
            selection_bias: None,
            groups: None,
            normalize: None,
            scale: None,
            weight_on_input: true,
        },
        capacity: CapacityOut::Dropless,
    })
}

pub(super) fn gpt_oss(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let hidden = c.int("hidden_size", 1)?;
    let count = noted(c.int("num_local_experts", 1)?, c.path("num_local_experts"));
    let top_k = match c.first_int(&["num_experts_per_tok", "experts_per_token"], 1)? {
        Some((n, field)) => noted(n, field),
        None => return Err(c.missing("num_experts_per_tok")),
    };
    let inter = c.int("intermediate_size", 1)?;
    check_top_k(&top_k, &count, c.label)?;
    let limit = match c.opt_positive("swiglu_limit")? {
        Some(x) => noted(x, c.path("swiglu_limit")),
        None => noted(7.0, default_note(&c.path("swiglu_limit"))),
    };
    let l = short_number(limit.value);
    let mut about = Vec::new();
    if let Some(n) = c.info_int("num_hidden_layers") {
        about.push(format!(
            "One of its {} (every layer is MoE).",
            plural(n, "MoE layer", "MoE layers")
        ));
    }
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: vec![
                "Clamped SwiGLU with a bias on every projection:".to_string(),
                format!(
                    "h = (clamp(up, -{l}, {l}) + 1) * g * sigmoid(1.702 * g), g = min(gate, {l})"
                ),
            ],
            count,
            ffn: plain("swiglu"),
            intermediate: noted(inter, c.path("intermediate_size")),
            bias: true,
            swiglu_limit: Some(limit),
        },
        shared: None,
        router: RouterOut {
            comment: vec![format!(
                "Top-{} logits, then a softmax over the chosen ones.",
                top_k.value
            )],
            scoring: plain("softmax"),
            top_k,
            softmax_over: Some("topk"),
            selection_bias: None,
            groups: None,
            normalize: None,
            scale: None,
            weight_on_input: false,
        },
        capacity: CapacityOut::Dropless,
    })
}

pub(super) fn switch(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let hidden = c.int("d_model", 1)?;
    let count = noted(c.int("num_experts", 1)?, c.path("num_experts"));
    let inter = c.int("d_ff", 1)?;
    let proj = c.opt_str("feed_forward_proj")?.unwrap_or("relu");
    let ffn = match proj {
        "relu" => plain("relu"),
        "gelu" => noted("gelu", c.path("feed_forward_proj")),
        "gelu_new" | "gated-gelu" => noted("gelu_tanh", c.path("feed_forward_proj")),
        other => {
            return Err(format!(
                "`{}` is {other:?}, which moec cannot express; it knows \"relu\", \"gelu\", \"gelu_new\" and \"gated-gelu\".",
                c.path("feed_forward_proj")
            ))
        }
    };
    let capacity = match c.opt_int("expert_capacity", 0)? {
        Some(n) if n > 0 => CapacityOut::Slots(noted(n, c.path("expert_capacity"))),
        _ => CapacityOut::Factor(noted(1.25, "the Switch paper's training factor")),
    };
    let mut about = Vec::new();
    let enc = c.info_int("num_sparse_encoder_layers");
    let dec = c.info_int("num_sparse_decoder_layers");
    if let (Some(e), Some(d)) = (enc, dec) {
        about.push(format!(
            "One of its {} sparse encoder and {} sparse decoder layers.",
            e, d
        ));
    }
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(hidden, c.path("d_model")),
        experts: ExpertsOut {
            comment: Vec::new(),
            count,
            ffn,
            intermediate: noted(inter, c.path("d_ff")),
            bias: false,
            swiglu_limit: None,
        },
        shared: None,
        router: RouterOut {
            comment: vec![
                "Top-1 routing with the raw softmax probability (no renormalisation).".to_string(),
            ],
            scoring: plain("softmax"),
            top_k: noted(1, "Switch routes each token to one expert"),
            softmax_over: None,
            selection_bias: None,
            groups: None,
            normalize: None,
            scale: None,
            weight_on_input: false,
        },
        capacity,
    })
}

/// An unknown model that nevertheless names an expert count and a top-k.
pub(super) fn generic(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let c = Cfg {
        label: "Mixture-of-Experts",
        ..c
    };
    let hidden = c.int("hidden_size", 1)?;
    let count = match c.first_int(&EXPERT_COUNT_FIELDS, 1)? {
        Some((n, field)) => noted(n, field),
        None => return Err(c.missing("num_local_experts")),
    };
    let top_k = noted(
        c.int("num_experts_per_tok", 1)?,
        c.path("num_experts_per_tok"),
    );
    let inter = match c.first_int(&["moe_intermediate_size", "intermediate_size"], 1)? {
        Some((n, field)) => noted(n, field),
        None => {
            return Err(format!(
            "the config has neither `{}` nor `{}`, one of which a Mixture-of-Experts layer needs.",
            c.path("moe_intermediate_size"),
            c.path("intermediate_size")
        ))
        }
    };
    check_top_k(&top_k, &count, c.label)?;
    let normalize = c
        .opt_bool("norm_topk_prob")?
        .map(|b| noted(b, c.path("norm_topk_prob")));
    let mut about = vec![
        "Imported generically: softmax routing over all experts and SwiGLU experts are assumed; \
         check them against the model's code."
            .to_string(),
    ];
    let ignored: Vec<&str> = [
        "n_shared_experts",
        "shared_expert_intermediate_size",
        "num_shared_experts",
        "scoring_func",
        "topk_method",
        "n_group",
        "routed_scaling_factor",
    ]
    .into_iter()
    .filter(|f| c.has(f))
    .collect();
    if !ignored.is_empty() {
        about.push(format!(
            "Not imported: {}.",
            ignored
                .iter()
                .map(|f| c.path(f))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let router_comment = if normalize.is_none() {
        vec!["The config has no norm_topk_prob: the weights are not renormalised.".to_string()]
    } else {
        Vec::new()
    };
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(hidden, c.path("hidden_size")),
        experts: ExpertsOut {
            comment: vec!["imported generically".to_string()],
            count,
            ffn: plain("swiglu"),
            intermediate: inter,
            bias: false,
            swiglu_limit: None,
        },
        shared: None,
        router: RouterOut {
            comment: router_comment,
            scoring: plain("softmax"),
            top_k,
            softmax_over: None,
            selection_bias: None,
            groups: None,
            normalize,
            scale: None,
            weight_on_input: false,
        },
        capacity: CapacityOut::Dropless,
    })
}
