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
    KimiK2,
    Glm4Moe,
    DeepseekV2,
    Qwen3Moe,
    Qwen2Moe,
    Qwen3Next,
    Llama4,
    GptOss,
    Switch,
    GraniteMoe,
    Olmoe,
    Dbrx,
    Ernie45Moe,
    Minimax,
    Jamba,
    PhiMoe,
}

impl Kind {
    /// The kind of a `model_type` (or of an architecture name turned into one
    /// by [`arch_to_type`]).
    pub(super) fn from_type(model_type: &str) -> Option<Kind> {
        Some(match model_type {
            "mixtral" => Kind::Mixtral,
            "deepseek_v3" => Kind::DeepseekV3,
            "kimi_k2" => Kind::KimiK2,
            "glm4_moe" => Kind::Glm4Moe,
            "deepseek_v2" => Kind::DeepseekV2,
            "qwen3_moe" => Kind::Qwen3Moe,
            "qwen2_moe" => Kind::Qwen2Moe,
            "qwen3_next" => Kind::Qwen3Next,
            "llama4" | "llama4_text" => Kind::Llama4,
            "gpt_oss" => Kind::GptOss,
            "switch_transformers" => Kind::Switch,
            "granitemoe" | "granite_moe" => Kind::GraniteMoe,
            "olmoe" => Kind::Olmoe,
            "dbrx" => Kind::Dbrx,
            "ernie4_5_moe" => Kind::Ernie45Moe,
            "minimax" | "mini_max" => Kind::Minimax,
            "jamba" => Kind::Jamba,
            "phimoe" | "phi_mo_e" => Kind::PhiMoe,
            _ => return None,
        })
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Mixtral => "Mixtral",
            Kind::DeepseekV3 => "DeepSeek-V3",
            Kind::KimiK2 => "Kimi-K2",
            Kind::Glm4Moe => "GLM-4.5 MoE",
            Kind::DeepseekV2 => "DeepSeek-V2",
            Kind::Qwen3Moe => "Qwen3-MoE",
            Kind::Qwen2Moe => "Qwen2-MoE",
            Kind::Qwen3Next => "Qwen3-Next",
            Kind::Llama4 => "Llama-4",
            Kind::GptOss => "gpt-oss",
            Kind::Switch => "Switch Transformers",
            Kind::GraniteMoe => "Granite MoE",
            Kind::Olmoe => "OLMoE",
            Kind::Dbrx => "DBRX",
            Kind::Ernie45Moe => "ERNIE-4.5 MoE",
            Kind::Minimax => "MiniMax",
            Kind::Jamba => "Jamba",
            Kind::PhiMoe => "Phi-3.5-MoE",
        }
    }

    /// The reader of this kind's configs.
    fn reader(self) -> fn(Cfg, String, String) -> Result<Model, String> {
        match self {
            Kind::Mixtral => mixtral,
            Kind::DeepseekV3 | Kind::KimiK2 => deepseek_v3,
            Kind::Glm4Moe => glm4_moe,
            Kind::DeepseekV2 => deepseek_v2,
            Kind::Qwen3Moe => qwen3_moe,
            Kind::Qwen2Moe => qwen2_moe,
            Kind::Qwen3Next => qwen3_next,
            Kind::Llama4 => llama4,
            Kind::GptOss => gpt_oss,
            Kind::Switch => switch,
            Kind::GraniteMoe => granitemoe,
            Kind::Olmoe => olmoe,
            Kind::Dbrx => dbrx,
            Kind::Ernie45Moe => ernie4_5_moe,
            Kind::Minimax => minimax,
            Kind::Jamba => jamba,
            Kind::PhiMoe => phimoe,
        }
    }

    /// Whether the experts are SwiGLU with `hidden_act` as the gate's
    /// activation (everything but Switch's ReLU/GELU and DBRX's own field).
    fn swiglu_from_hidden_act(self) -> bool {
        !matches!(self, Kind::Switch | Kind::Dbrx | Kind::PhiMoe)
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

/// Reads the config and works out the layer it describes.
pub(super) fn read_model(
    root: &Map<String, Value>,
    generic_allowed: bool,
) -> Result<(Model, Vec<String>), String> {
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
        Some(k) => format!("{} {} model", article(k.label()), k.label()),
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
        return generic(cfg, name, title, &shown_type, generic_allowed);
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
    if kind.swiglu_from_hidden_act() {
        check_silu(cfg, "hidden_act")?;
    }
    let model = kind.reader()(cfg, name, title)?;
    Ok((model, Vec::new()))
}

/// "a" or "an" before a model's name, by its first letter as spoken
/// ("an OLMoE", "an ERNIE-4.5", "a Mixtral").
fn article(label: &str) -> &'static str {
    match label.chars().next() {
        Some('A' | 'E' | 'I' | 'O' | 'a' | 'e' | 'i' | 'o') => "an",
        _ => "a",
    }
}

/// SwiGLU experts gate with SiLU: any other activation is refused.
fn check_silu(c: Cfg, field: &str) -> Result<(), String> {
    match c.opt_str(field)? {
        None | Some("silu") | Some("swish") => Ok(()),
        Some(other) => Err(format!(
            "`{}` is {other:?}, but {} experts are SwiGLU with SiLU; moec does not guess \
             another gated activation.",
            c.path(field),
            c.label
        )),
    }
}

/// The routed experts' count from the first of `fields` present
/// (transformers 5 writes some families' counts as `num_local_experts`).
fn expert_count(c: Cfg, fields: &[&'static str]) -> Result<Noted<u64>, String> {
    match c.first_int(fields, 1)? {
        Some((n, field)) => Ok(noted(n, field)),
        None => Err(c.missing(fields[0])),
    }
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
        experts: ExpertsOut::swiglu(
            vec!["SwiGLU experts: w1 = gate, w3 = up, w2 = down.".to_string()],
            count,
            noted(inter, c.path("intermediate_size")),
        ),
        shared: None,
        router: RouterOut {
            comment: router_comment,
            scoring: plain("softmax"),
            top_k,
            logit_bias: None,
            softmax_over: Some("all"),
            selection_bias: None,
            groups: None,
            normalize: Some(noted(true, format!("{} always renormalises", c.label))),
            scale: None,
            weight_on_input: false,
        },
        capacity: CapacityOut::Dropless,
    })
}

/// The counts and sizes every DeepSeek MoE layer has.
pub(super) struct DeepseekBase {
    pub(super) count: Noted<u64>,
    pub(super) top_k: Noted<u64>,
    pub(super) inter: u64,
    pub(super) shared: Option<SharedOut>,
    pub(super) about: Vec<String>,
}

pub(super) fn deepseek_base(c: Cfg, shared_default: Option<u64>) -> Result<DeepseekBase, String> {
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
        (Some(n), Some(1)) if n > 1 => about.push(format!(
            "The first of its {n} layers is dense (first_k_dense_replace); \
             this is one of the other {}.",
            n - 1
        )),
        (Some(n), Some(k)) if k > 0 && k < n => about.push(format!(
            "The first {k} of its {n} layers are dense (first_k_dense_replace); \
             this is one of the other {}.",
            n - k
        )),
        (Some(n), _) => about.push(format!("One of its {} MoE layers.", n)),
        _ => {}
    }
    Ok(DeepseekBase {
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

/// The values transformers' config class gives the fields of DeepSeek-V3's
/// routing that a config leaves out.
pub(super) struct NoauxDefaults {
    shared: u64,
    groups: (u64, u64),
    scale: f64,
}

/// `DeepseekV3Config`'s defaults (also Kimi-K2's, which uses that class).
const DEEPSEEK_V3_DEFAULTS: NoauxDefaults = NoauxDefaults {
    shared: 1,
    groups: (8, 4),
    scale: 2.5,
};

/// `Glm4MoeConfig`'s defaults.
const GLM4_MOE_DEFAULTS: NoauxDefaults = NoauxDefaults {
    shared: 1,
    groups: (1, 1),
    scale: 1.0,
};

pub(super) fn deepseek_v3(c: Cfg, name: String, title: String) -> Result<Model, String> {
    noaux_tc(c, name, title, &DEEPSEEK_V3_DEFAULTS)
}

/// GLM-4.5 routes as DeepSeek-V3 does (its router is transformers'
/// `DeepseekV3TopkRouter`), under the same field names.
pub(super) fn glm4_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    noaux_tc(c, name, title, &GLM4_MOE_DEFAULTS)
}

/// DeepSeek-V3's `noaux_tc` routing: sigmoid scores, a selection-only
/// correction bias, group-limited selection, renormalised and scaled weights.
pub(super) fn noaux_tc(
    c: Cfg,
    name: String,
    title: String,
    defaults: &NoauxDefaults,
) -> Result<Model, String> {
    let base = deepseek_base(c, Some(defaults.shared))?;
    choice(c, "scoring_func", "sigmoid", &["sigmoid"])?;
    choice(c, "topk_method", "noaux_tc", &["noaux_tc"])?;
    let groups = deepseek_groups(
        c,
        base.count.value,
        base.top_k.value,
        Some(defaults.groups),
        "top2_sum",
    )?;
    let norm = match c.opt_bool("norm_topk_prob")? {
        Some(b) => noted(b, c.path("norm_topk_prob")),
        None => noted(true, default_note(&c.path("norm_topk_prob"))),
    };
    let scale = match c.opt_positive("routed_scaling_factor")? {
        Some(x) => noted(x, c.path("routed_scaling_factor")),
        None => noted(
            defaults.scale,
            default_note(&c.path("routed_scaling_factor")),
        ),
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
    SwigluLayer {
        about: base.about,
        count: base.count,
        intermediate: noted(base.inter, c.path("moe_intermediate_size")),
        shared: base.shared,
        router: RouterOut {
            comment,
            scoring: if c.has("scoring_func") {
                noted("sigmoid", c.path("scoring_func"))
            } else {
                plain("sigmoid")
            },
            top_k: base.top_k,
            logit_bias: None,
            softmax_over: None,
            selection_bias: Some(noted(true, "e_score_correction_bias")),
            groups,
            normalize: Some(normalize),
            scale: (scale.value != 1.0).then_some(scale),
            weight_on_input: false,
        },
    }
    .into_model(c, name, title)
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
    SwigluLayer {
        about: base.about,
        count: base.count,
        intermediate: noted(base.inter, c.path("moe_intermediate_size")),
        shared: base.shared,
        router: RouterOut {
            comment,
            scoring: plain("softmax"),
            top_k: base.top_k,
            logit_bias: None,
            softmax_over: Some("all"),
            selection_bias: None,
            groups,
            normalize: Some(normalize),
            scale,
            weight_on_input: false,
        },
    }
    .into_model(c, name, title)
}

/// The parts Qwen2-MoE and Qwen3-MoE share.
pub(super) fn qwen_router(
    c: Cfg,
    count: u64,
    top_k: Noted<u64>,
    norm_default: bool,
) -> Result<RouterOut, String> {
    let norm = match c.opt_bool("norm_topk_prob")? {
        Some(b) => noted(b, c.path("norm_topk_prob")),
        None => noted(norm_default, default_note(&c.path("norm_topk_prob"))),
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
        logit_bias: None,
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

/// What a reader works out for a dropless layer of SwiGLU experts without
/// biases.
struct SwigluLayer {
    about: Vec<String>,
    count: Noted<u64>,
    intermediate: Noted<u64>,
    shared: Option<SharedOut>,
    router: RouterOut,
}

impl SwigluLayer {
    fn into_model(self, c: Cfg, name: String, title: String) -> Result<Model, String> {
        Ok(Model {
            name,
            title,
            about: self.about,
            hidden: noted(c.int("hidden_size", 1)?, c.path("hidden_size")),
            experts: ExpertsOut::swiglu(Vec::new(), self.count, self.intermediate),
            shared: self.shared,
            router: self.router,
            capacity: CapacityOut::Dropless,
        })
    }
}

/// The top-k of a config under its usual field.
fn top_k(c: Cfg, field: &'static str, count: &Noted<u64>) -> Result<Noted<u64>, String> {
    let top_k = noted(c.int(field, 1)?, c.path(field));
    check_top_k(&top_k, count, c.label)?;
    Ok(top_k)
}

/// The expert counts transformers' Qwen, OLMoE and Jamba configs use.
const NUM_EXPERTS: [&str; 2] = ["num_experts", "num_local_experts"];

pub(super) fn qwen3_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let count = expert_count(c, &NUM_EXPERTS)?;
    let top_k = top_k(c, "num_experts_per_tok", &count)?;
    let inter = noted(
        c.int("moe_intermediate_size", 1)?,
        c.path("moe_intermediate_size"),
    );
    let mut about = qwen_about(c);
    about.push("No shared expert.".to_string());
    let router = qwen_router(c, count.value, top_k, false)?;
    SwigluLayer {
        about,
        count,
        intermediate: inter,
        shared: None,
        router,
    }
    .into_model(c, name, title)
}

/// OLMoE: Qwen3-MoE's routing (softmax over all, top-k, `norm_topk_prob`,
/// false by default) with the experts' size in `intermediate_size`.
pub(super) fn olmoe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let count = expert_count(c, &NUM_EXPERTS)?;
    let top_k = top_k(c, "num_experts_per_tok", &count)?;
    let inter = noted(c.int("intermediate_size", 1)?, c.path("intermediate_size"));
    let mut about = every_layer(c);
    about.push("No shared expert.".to_string());
    let router = qwen_router(c, count.value, top_k, false)?;
    SwigluLayer {
        about,
        count,
        intermediate: inter,
        shared: None,
        router,
    }
    .into_model(c, name, title)
}

/// "One of its N MoE layers (every layer is MoE)", when the config says N.
fn every_layer(c: Cfg) -> Vec<String> {
    c.info_int("num_hidden_layers")
        .map(|n| {
            format!(
                "One of its {} (every layer is MoE).",
                plural(n, "MoE layer", "MoE layers")
            )
        })
        .into_iter()
        .collect()
}

/// Jamba: softmax over all experts, top-k, and the chosen probabilities as
/// they are (its `JambaSparseMoeBlock` never renormalises).
pub(super) fn jamba(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let count = expert_count(c, &NUM_EXPERTS)?;
    let top_k = top_k(c, "num_experts_per_tok", &count)?;
    let inter = noted(c.int("intermediate_size", 1)?, c.path("intermediate_size"));
    let mut about = Vec::new();
    if let (Some(n), Some(period)) = (
        c.info_int("num_hidden_layers"),
        c.info_int("expert_layer_period"),
    ) {
        about.push(format!(
            "One of the MoE layers among its {n}: one layer in {period} is MoE \
             (expert_layer_period), from layer {} (expert_layer_offset).",
            c.info_int("expert_layer_offset").unwrap_or(1)
        ));
    }
    let router = RouterOut {
        comment: vec![format!(
            "Softmax over all {} logits, top-{}, without renormalisation.",
            count.value, top_k.value
        )],
        scoring: plain("softmax"),
        top_k,
        logit_bias: None,
        softmax_over: None,
        selection_bias: None,
        groups: None,
        normalize: Some(noted(false, "Jamba does not renormalise")),
        scale: None,
        weight_on_input: false,
    };
    SwigluLayer {
        about,
        count,
        intermediate: inter,
        shared: None,
        router,
    }
    .into_model(c, name, title)
}

/// Qwen2-MoE and Qwen3-Next: Qwen routing plus one shared expert whose
/// output is multiplied by `sigmoid(shared_expert_gate(x))`.
fn qwen_with_gated_shared(
    c: Cfg,
    name: String,
    title: String,
    norm_default: bool,
) -> Result<Model, String> {
    let count = expert_count(c, &NUM_EXPERTS)?;
    let top_k = top_k(c, "num_experts_per_tok", &count)?;
    let inter = noted(
        c.int("moe_intermediate_size", 1)?,
        c.path("moe_intermediate_size"),
    );
    let shared_inter = c.int("shared_expert_intermediate_size", 1)?;
    let router = qwen_router(c, count.value, top_k, norm_default)?;
    let shared = SharedOut {
        comment: vec![
            "One shared expert, its output multiplied by sigmoid(shared_expert_gate(x))."
                .to_string(),
        ],
        count: plain(1),
        intermediate: noted(shared_inter, c.path("shared_expert_intermediate_size")),
        sigmoid_gate: true,
    };
    SwigluLayer {
        about: qwen_about(c),
        count,
        intermediate: inter,
        shared: Some(shared),
        router,
    }
    .into_model(c, name, title)
}

pub(super) fn qwen2_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    qwen_with_gated_shared(c, name, title, false)
}

/// Qwen3-Next: Qwen2-MoE's layer (`norm_topk_prob` true by default).
pub(super) fn qwen3_next(c: Cfg, name: String, title: String) -> Result<Model, String> {
    qwen_with_gated_shared(c, name, title, true)
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
        experts: ExpertsOut::swiglu(
            experts_comment,
            count,
            noted(inter, c.path("intermediate_size")),
        ),
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
            logit_bias: None,
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
                "The router is a Linear with a bias: l = W x + b. Top-{} of l, then a softmax \
                 over the chosen ones.",
                top_k.value
            )],
            scoring: plain("softmax"),
            top_k,
            logit_bias: Some(noted(true, "mlp.router.bias")),
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
    // transformers' Switch router is `nn.Linear(..., bias=config.router_bias)`.
    let logit_bias =
        (c.opt_bool("router_bias")? == Some(true)).then(|| noted(true, c.path("router_bias")));
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
            logit_bias,
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

/// MiniMax (MiniMax-Text-01): Mixtral's sparse MoE block, under Mixtral's
/// field names. A shared expert (`shared_intermediate_size` above 0, which
/// transformers' MiniMax does not have) is refused.
pub(super) fn minimax(c: Cfg, name: String, title: String) -> Result<Model, String> {
    if let Some(n) = c.opt_int("shared_intermediate_size", 0)?.filter(|n| *n > 0) {
        return Err(format!(
            "`{}` is {n}: a MiniMax shared expert, which transformers' MiniMax layer does not \
             have and whose gating moec does not know; moec does not guess it.",
            c.path("shared_intermediate_size")
        ));
    }
    mixtral(c, name, title)
}

/// Granite MoE: a softmax over the top-k logits (`GraniteMoeTopKGating`),
/// SwiGLU experts (`input_linear` holds gate then up).
pub(super) fn granitemoe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    if let Some(n) = c.opt_int("shared_intermediate_size", 0)?.filter(|n| *n > 0) {
        return Err(format!(
            "`{}` is {n}: a shared expert, which `granitemoe` layers do not have (it is \
             `granitemoeshared`'s field); moec does not guess which model this is.",
            c.path("shared_intermediate_size")
        ));
    }
    let count = expert_count(c, &["num_local_experts", "num_experts"])?;
    let top_k = top_k(c, "num_experts_per_tok", &count)?;
    let inter = noted(c.int("intermediate_size", 1)?, c.path("intermediate_size"));
    let mut about = every_layer(c);
    if let Some(Value::Number(m)) = c.get("residual_multiplier") {
        about.push(format!(
            "The decoder layer scales this layer's output by residual_multiplier ({m}) \
             before adding it to the residual stream; that is outside the MoE layer."
        ));
    }
    let router = RouterOut {
        comment: vec![format!(
            "Top-{} logits, then a softmax over the chosen ones (the weights sum to 1).",
            top_k.value
        )],
        scoring: plain("softmax"),
        top_k,
        logit_bias: None,
        softmax_over: Some("topk"),
        selection_bias: None,
        groups: None,
        normalize: None,
        scale: None,
        weight_on_input: false,
    };
    SwigluLayer {
        about,
        count,
        intermediate: inter,
        shared: None,
        router,
    }
    .into_model(c, name, title)
}

/// DBRX: the MoE fields are under `ffn_config`; a softmax over all experts,
/// top-k, and the chosen weights divided by their `p`-norm with `p =
/// moe_normalize_expert_weights` (1 by default: the sum, as the weights are
/// positive; `null`: not normalised).
pub(super) fn dbrx(c: Cfg, name: String, title: String) -> Result<Model, String> {
    let ffn_obj = match c.get("ffn_config") {
        Some(Value::Object(o)) => o,
        Some(v) => {
            return Err(format!(
                "`{}` must be an object, but the config gives {}.",
                c.path("ffn_config"),
                describe(v)
            ))
        }
        None => return Err(c.missing("ffn_config")),
    };
    let f = Cfg {
        obj: ffn_obj,
        prefix: "ffn_config.",
        label: c.label,
    };
    match f.get("ffn_act_fn") {
        None => {}
        Some(Value::Object(act)) => {
            let act = Cfg {
                obj: act,
                prefix: "ffn_config.ffn_act_fn.",
                label: c.label,
            };
            check_silu(act, "name")?;
        }
        Some(v) => {
            return Err(format!(
                "`ffn_config.ffn_act_fn` must be an object, but the config gives {}.",
                describe(v)
            ))
        }
    }
    if f.opt_bool("uniform_expert_assignment")? == Some(true) {
        return Err(
            "`ffn_config.uniform_expert_assignment` is true: DBRX then assigns experts \
             round-robin, ignoring the router, which moec cannot express."
                .to_string(),
        );
    }
    let count = noted(f.int("moe_num_experts", 1)?, f.path("moe_num_experts"));
    let top_k = top_k(f, "moe_top_k", &count)?;
    let inter = noted(f.int("ffn_hidden_size", 1)?, f.path("ffn_hidden_size"));
    let field = "moe_normalize_expert_weights";
    let normalize = match ffn_obj.get(field) {
        Some(Value::Null) => noted(false, format!("{} is null", f.path(field))),
        None => noted(true, default_note(&f.path(field))),
        Some(v) => match v.as_f64() {
            Some(1.0) => noted(true, f.path(field)),
            _ => {
                return Err(format!(
                    "`{}` is {}: DBRX divides the chosen weights by their p-norm with that p; \
                     moec can renormalise by the sum (p = 1) or not at all (null), nothing else.",
                    f.path(field),
                    describe(v)
                ))
            }
        },
    };
    let mut about = Vec::new();
    if let Some(n) = c.info_int("n_layers") {
        about.push(format!(
            "One of its {} (every layer is MoE).",
            plural(n, "MoE layer", "MoE layers")
        ));
    }
    let router = RouterOut {
        comment: vec![format!(
            "Softmax over all {} logits, top-{}{}.",
            count.value,
            top_k.value,
            if normalize.value {
                ", renormalised over the chosen experts"
            } else {
                ", without renormalisation"
            }
        )],
        scoring: plain("softmax"),
        top_k,
        logit_bias: None,
        softmax_over: None,
        selection_bias: None,
        groups: None,
        normalize: Some(normalize),
        scale: None,
        weight_on_input: false,
    };
    Ok(Model {
        name,
        title,
        about,
        hidden: noted(c.int("d_model", 1)?, c.path("d_model")),
        experts: ExpertsOut::swiglu(
            vec!["SwiGLU experts: w1 = gate, v1 = up, w2 = down.".to_string()],
            count,
            inter,
        ),
        shared: None,
        router,
        capacity: CapacityOut::Dropless,
    })
}

/// ERNIE-4.5 MoE: a softmax over all experts; the experts are chosen by the
/// probabilities plus a per-expert correction bias (`moe_statics`), the
/// weights are the unbiased probabilities of the chosen, renormalised;
/// `moe_num_shared_experts` shared experts added unweighted.
pub(super) fn ernie4_5_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
    choice(c, "moe_gate", "topk", &["topk"])?;
    let count = noted(c.int("moe_num_experts", 1)?, c.path("moe_num_experts"));
    let top_k = top_k(c, "moe_k", &count)?;
    let inter = noted(
        c.int("moe_intermediate_size", 1)?,
        c.path("moe_intermediate_size"),
    );
    let shared = match c.opt_int("moe_num_shared_experts", 0)? {
        Some(n) if n > 0 => Some(SharedOut {
            comment: vec![format!(
                "{}, added unweighted to the routed output.",
                if n == 1 {
                    "One shared expert".to_string()
                } else {
                    format!("{n} shared experts (one SwiGLU of {n} x moe_intermediate_size)")
                }
            )],
            count: noted(n, c.path("moe_num_shared_experts")),
            intermediate: inter.clone(),
            sigmoid_gate: false,
        }),
        _ => None,
    };
    let mut about = Vec::new();
    if let Some(n) = c.info_int("num_hidden_layers") {
        about.push(format!(
            "One of the MoE layers among its {n} (from moe_layer_start_index = {}, \
             every moe_layer_interval = {}).",
            c.info_int("moe_layer_start_index").unwrap_or(0),
            c.info_int("moe_layer_interval").unwrap_or(1)
        ));
    }
    let router = RouterOut {
        comment: vec![format!(
            "Softmax over all {} logits; the probabilities plus a correction bias \
             (moe_statics.e_score_correction_bias) choose the top-{}; the weights are the \
             unbiased probabilities, renormalised.",
            count.value, top_k.value
        )],
        scoring: plain("softmax"),
        top_k,
        logit_bias: None,
        softmax_over: None,
        selection_bias: Some(noted(true, "moe_statics.e_score_correction_bias")),
        groups: None,
        normalize: Some(noted(true, "ERNIE-4.5 always renormalises")),
        scale: None,
        weight_on_input: false,
    };
    SwigluLayer {
        about,
        count,
        intermediate: inter,
        shared,
        router,
    }
    .into_model(c, name, title)
}

/// Phi-3.5-MoE is refused: its sparsemixer routing has no `.moe` form.
pub(super) fn phimoe(c: Cfg, _name: String, _title: String) -> Result<Model, String> {
    Err(format!(
        "{} routes with sparsemixer, which the .moe language cannot express: each of its two \
         experts is chosen from the logits left after masking those further than a relative \
         threshold (`{}`) from the best, and weighted by a softmax over that masked set, not \
         over all experts or the chosen ones.",
        c.label,
        c.path("router_jitter_noise")
    ))
}

/// Words in a field's name that say it may concern the MoE layer.
const MOE_WORDS: [&str; 15] = [
    "expert",
    "router",
    "routing",
    "moe",
    "topk",
    "top_k",
    "scor",
    "group",
    "gate",
    "scaling_factor",
    "capacity",
    "swiglu",
    "shared",
    "ffn",
    "jitter",
];

/// Fields with such words that the generic import reads, or that do not
/// change what one MoE layer computes at inference (training losses, which
/// layers are MoE).
const GENERIC_UNDERSTOOD: [&str; 24] = [
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "aux_loss_alpha",
    "seq_aux",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
    "decoder_sparse_step",
    "mlp_only_layers",
    "first_k_dense_replace",
    "moe_layer_freq",
    "interleave_moe_layer_step",
    "expert_layer_period",
    "expert_layer_offset",
    "moe_layer_start_index",
    "moe_layer_end_index",
    "moe_layer_interval",
    "num_experts_offload",
];

/// The fields of an unknown model that may change the layer's meaning and
/// that the generic import would ignore: names with one of [`MOE_WORDS`]
/// not in [`GENERIC_UNDERSTOOD`], and a `hidden_act` other than SiLU.
fn unread_moe_fields(c: Cfg) -> Vec<String> {
    let mut fields: Vec<String> = c
        .obj
        .iter()
        .filter(|(k, v)| !v.is_null() && !GENERIC_UNDERSTOOD.contains(&k.as_str()))
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            MOE_WORDS.iter().any(|w| k.contains(w))
        })
        .map(|(k, _)| c.path(k))
        .collect();
    if let Some(Value::String(act)) = c.get("hidden_act") {
        if act != "silu" && act != "swish" {
            fields.push(c.path("hidden_act"));
        }
    }
    fields.sort();
    fields
}

/// A list of field names in backticks.
fn field_list(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A model the importer does not know. Without `allowed` (`--generic`) it
/// is refused when it has fields that may change the layer's meaning;
/// otherwise it is imported as softmax routing over all experts with SwiGLU
/// experts, with a warning that names the fields ignored.
pub(super) fn generic(
    c: Cfg,
    name: String,
    title: String,
    shown_type: &str,
    allowed: bool,
) -> Result<(Model, Vec<String>), String> {
    if !c.has_expert_count() {
        let moe_like = unread_moe_fields(c);
        return Err(if moe_like.is_empty() {
            format!(
                "`{shown_type}` is not a Mixture-of-Experts model: it has none of {}.",
                EXPERT_COUNT_FIELDS.join(", ")
            )
        } else {
            format!(
                "`{shown_type}` is not a model moec knows, and it names its experts in fields \
                 moec does not read ({}); moec imports {} and generic configs with one of {}.",
                field_list(&moe_like),
                KNOWN_TYPES.join(", "),
                EXPERT_COUNT_FIELDS.join(", ")
            )
        });
    }
    let unread = unread_moe_fields(c);
    if !unread.is_empty() && !allowed {
        return Err(format!(
            "`{shown_type}` is not a model moec knows, and its config has fields that may \
             change what its MoE layer computes, which a generic import would ignore: {}. \
             Pass --generic to import it anyway as softmax routing over all experts with \
             SwiGLU experts.",
            field_list(&unread)
        ));
    }
    let mut warning = format!(
        "`{shown_type}` is not a model moec knows: imported generically (softmax over all \
         experts, top-k, SwiGLU experts); check the layer against the model's code"
    );
    if !unread.is_empty() {
        warning.push_str(&format!("; ignored: {}", field_list(&unread)));
    }
    let model = generic_model(c, name, title, &unread)?;
    Ok((model, vec![warning]))
}

/// The `model_type`s the importer reads exactly.
const KNOWN_TYPES: [&str; 18] = [
    "mixtral",
    "deepseek_v3",
    "kimi_k2",
    "glm4_moe",
    "deepseek_v2",
    "qwen3_moe",
    "qwen2_moe",
    "qwen3_next",
    "llama4",
    "gpt_oss",
    "switch_transformers",
    "granitemoe",
    "olmoe",
    "dbrx",
    "ernie4_5_moe",
    "minimax",
    "jamba",
    "phimoe (refused)",
];

fn generic_model(c: Cfg, name: String, title: String, unread: &[String]) -> Result<Model, String> {
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
    if !unread.is_empty() {
        about.push(format!("Not imported: {}.", unread.join(", ")));
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
        experts: ExpertsOut::swiglu(vec!["imported generically".to_string()], count, inter),
        shared: None,
        router: RouterOut {
            comment: router_comment,
            scoring: plain("softmax"),
            top_k,
            logit_bias: None,
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
