//! Import of Hugging Face `config.json` files: `moec import CONFIG.json`.
//!
//! The importer reads a model's configuration, recognises the model by its
//! `model_type` (or, failing that, its first `architectures` entry), and
//! writes one MoE layer of that model as a `.moe` file on the mesh the options
//! describe. The routing semantics of each supported model follow the model's
//! reference code (see `MODELS.md`): which scoring function, whether the top-k
//! weights are renormalised, group-limited selection, shared experts and so on.
//!
//! Every value comes from the JSON through checked conversions, so no input
//! can make the importer panic: a missing or wrongly typed field is an error
//! that names the field. The generated text is run through the checker before
//! it is returned, so what `import_config` returns always checks clean.

use serde_json::{Map, Value};

/// Options for the mesh of an imported layer.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Nodes in the mesh.
    pub nodes: u64,
    /// GPUs per node.
    pub gpus_per_node: u64,
    /// A device preset: H100, H200, H800, A100 or B200.
    pub device: String,
    /// Expert-parallel degree; by default the largest that divides both the
    /// GPUs of the mesh and the experts.
    pub ep: Option<u64>,
    /// Tokens per rank.
    pub tokens_per_rank: u64,
    /// Compute dtype: f32, bf16 or f16.
    pub dtype: String,
    /// How to name the config file in the generated comments.
    pub source_name: String,
}

/// Turns the text of a Hugging Face `config.json` into a `.moe` file.
///
/// Returns the text of the file, which passes [`crate::check_source`] without
/// diagnostics, or a sentence saying why the config cannot be imported.
pub fn import_config(json: &str, options: &ImportOptions) -> Result<String, String> {
    let root = parse_json(json)?;
    let mesh = mesh_plan(options)?;
    let model = read_model(&root)?;
    let text = render(&model, &mesh, options)?;
    let checked = crate::check_source(&text);
    if checked.has_errors() {
        let shown = format!("{} (imported)", clean_comment(&options.source_name));
        return Err(format!(
            "the imported layer does not pass moec's checks:\n{}",
            crate::render(&shown, &text, &checked.diagnostics, false)
        ));
    }
    Ok(text)
}

// ------------------------------------------------------------------ reading

fn parse_json(json: &str) -> Result<Map<String, Value>, String> {
    let json = json.strip_prefix('\u{feff}').unwrap_or(json);
    let value: Value = serde_json::from_str(json).map_err(|e| {
        let full = e.to_string();
        let message = match full.rfind(" at line ") {
            Some(i) => &full[..i],
            None => full.as_str(),
        };
        format!(
            "the file is not valid JSON: {message} (line {}, column {}).",
            e.line(),
            e.column()
        )
    })?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(format!(
            "the top level of a config.json must be a JSON object, but this file holds {}.",
            describe(&other)
        )),
    }
}

/// How a JSON value is named in error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "`null`".to_string(),
        Value::Bool(b) => format!("`{b}`"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => {
            let short: String = s.chars().take(40).collect();
            let more = if s.chars().count() > 40 { "..." } else { "" };
            format!("the string {:?}", format!("{short}{more}"))
        }
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

/// The largest integer a `.moe` literal can hold.
const MAX_INT: u64 = i64::MAX as u64;

/// The fields that give the number of routed experts, in the order they are tried.
const EXPERT_COUNT_FIELDS: [&str; 3] = ["num_local_experts", "num_experts", "n_routed_experts"];

/// One JSON object of the config (the top level, or `text_config`) with checked accessors.
#[derive(Clone, Copy)]
struct Cfg<'a> {
    obj: &'a Map<String, Value>,
    /// `""` or `"text_config."`, so that messages name the field as it is nested.
    prefix: &'static str,
    /// The model, as named in "which a ... layer needs".
    label: &'static str,
}

impl<'a> Cfg<'a> {
    fn path(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The value of a field; `null` counts as absent.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    fn missing(&self, name: &str) -> String {
        format!(
            "the config has no `{}`, which a {} layer needs.",
            self.path(name),
            self.label
        )
    }

    fn opt_int(&self, name: &str, min: u64) -> Result<Option<u64>, String> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let wrong = || {
            format!(
                "`{}` must be a whole number, but the config gives {}.",
                self.path(name),
                describe(v)
            )
        };
        let n = if let Some(n) = v.as_u64() {
            n
        } else if let Some(n) = v.as_i64() {
            return Err(format!(
                "`{}` must be at least {min}, but the config gives {n}.",
                self.path(name)
            ));
        } else if let Some(x) = v.as_f64() {
            // A whole number written as a decimal (`4096.0`) is still a whole number.
            if x.fract() != 0.0 || !x.is_finite() {
                return Err(wrong());
            }
            if x < 0.0 {
                return Err(format!(
                    "`{}` must be at least {min}, but the config gives {x}.",
                    self.path(name)
                ));
            }
            if x > MAX_INT as f64 {
                return Err(too_large(&self.path(name), &x.to_string()));
            }
            x as u64
        } else {
            return Err(wrong());
        };
        if n < min {
            return Err(format!(
                "`{}` must be at least {min}, but the config gives {n}.",
                self.path(name)
            ));
        }
        if n > MAX_INT {
            return Err(too_large(&self.path(name), &n.to_string()));
        }
        Ok(Some(n))
    }

    fn int(&self, name: &str, min: u64) -> Result<u64, String> {
        self.opt_int(name, min)?.ok_or_else(|| self.missing(name))
    }

    /// The first of `names` that is present, with its name.
    fn first_int(&self, names: &[&'static str], min: u64) -> Result<Option<(u64, String)>, String> {
        for name in names {
            if let Some(n) = self.opt_int(name, min)? {
                return Ok(Some((n, self.path(name))));
            }
        }
        Ok(None)
    }

    fn opt_bool(&self, name: &str) -> Result<Option<bool>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(format!(
                "`{}` must be `true` or `false`, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
        }
    }

    /// A positive, finite number.
    fn opt_positive(&self, name: &str) -> Result<Option<f64>, String> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
            Some(_) => Err(format!(
                "`{}` must be a positive number, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
            None => Err(format!(
                "`{}` must be a number, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
        }
    }

    fn opt_str(&self, name: &str) -> Result<Option<&'a str>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(format!(
                "`{}` must be a string, but the config gives {}.",
                self.path(name),
                describe(v)
            )),
        }
    }

    /// An informational whole number for comments: ignored when absent or not a count.
    fn info_int(&self, name: &str) -> Option<u64> {
        self.get(name)
            .and_then(Value::as_u64)
            .filter(|n| *n <= MAX_INT)
    }

    fn has_expert_count(&self) -> bool {
        EXPERT_COUNT_FIELDS.iter().any(|f| self.has(f))
    }
}

fn too_large(field: &str, value: &str) -> String {
    format!("`{field}` is {value}, which is too large for moec (at most {MAX_INT}).")
}

// ------------------------------------------------------------------ models

/// The models whose routing the importer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
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
    fn from_type(model_type: &str) -> Option<Kind> {
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

    fn label(self) -> &'static str {
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
fn arch_to_type(arch: &str) -> String {
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
const RESERVED_NAMES: [&str; 7] = ["let", "true", "false", "ns", "us", "ms", "s"];

/// A layer name: `[a-z0-9_]`, starting with a letter.
fn layer_name(raw: &str) -> String {
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
fn clean_comment(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// A value with the comment written after it on its line.
struct Noted<T> {
    value: T,
    note: Option<String>,
}

fn noted<T>(value: T, note: impl Into<String>) -> Noted<T> {
    Noted {
        value,
        note: Some(note.into()),
    }
}

fn plain<T>(value: T) -> Noted<T> {
    Noted { value, note: None }
}

struct ExpertsOut {
    comment: Vec<String>,
    count: Noted<u64>,
    ffn: Noted<&'static str>,
    intermediate: Noted<u64>,
    bias: bool,
    swiglu_limit: Option<Noted<f64>>,
}

struct SharedOut {
    comment: Vec<String>,
    count: Noted<u64>,
    intermediate: Noted<u64>,
    sigmoid_gate: bool,
}

struct GroupsOut {
    count: Noted<u64>,
    kept: Noted<u64>,
    score: &'static str,
}

struct RouterOut {
    comment: Vec<String>,
    scoring: Noted<&'static str>,
    top_k: Noted<u64>,
    softmax_over: Option<&'static str>,
    selection_bias: Option<Noted<bool>>,
    groups: Option<GroupsOut>,
    normalize: Option<Noted<bool>>,
    scale: Option<Noted<f64>>,
    weight_on_input: bool,
}

enum CapacityOut {
    Dropless,
    Slots(Noted<u64>),
    Factor(Noted<f64>),
}

/// Everything the generated layer says, before it is written out.
struct Model {
    name: String,
    /// "Mixtral (MixtralForCausalLM)".
    title: String,
    /// Extra sentences for the header comment.
    about: Vec<String>,
    hidden: Noted<u64>,
    experts: ExpertsOut,
    shared: Option<SharedOut>,
    router: RouterOut,
    capacity: CapacityOut,
}

/// Reads the config and works out the layer it describes.
fn read_model(root: &Map<String, Value>) -> Result<Model, String> {
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
fn check_top_k(top_k: &Noted<u64>, count: &Noted<u64>, label: &str) -> Result<(), String> {
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
fn default_note(field: &str) -> String {
    format!("{field} (absent: transformers' default)")
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {many}")
    }
}

fn mixtral(c: Cfg, name: String, title: String) -> Result<Model, String> {
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
struct DeepseekBase {
    hidden: u64,
    count: Noted<u64>,
    top_k: Noted<u64>,
    inter: u64,
    shared: Option<SharedOut>,
    about: Vec<String>,
}

fn deepseek_base(c: Cfg, shared_default: Option<u64>) -> Result<DeepseekBase, String> {
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
fn deepseek_groups(
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
fn choice<'a>(
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

fn deepseek_v3(c: Cfg, name: String, title: String) -> Result<Model, String> {
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

fn deepseek_v2(c: Cfg, name: String, title: String) -> Result<Model, String> {
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
fn qwen_router(c: Cfg, count: u64, top_k: Noted<u64>) -> Result<RouterOut, String> {
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

fn qwen_about(c: Cfg) -> Vec<String> {
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

fn qwen3_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
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

fn qwen2_moe(c: Cfg, name: String, title: String) -> Result<Model, String> {
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

fn llama4(c: Cfg, name: String, title: String) -> Result<Model, String> {
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

fn gpt_oss(c: Cfg, name: String, title: String) -> Result<Model, String> {
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

fn switch(c: Cfg, name: String, title: String) -> Result<Model, String> {
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
fn generic(c: Cfg, name: String, title: String) -> Result<Model, String> {
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

// --------------------------------------------------------------------- mesh

const DEVICES: [&str; 5] = ["H100", "H200", "H800", "A100", "B200"];

/// The mesh options, validated; `ep` is settled once the expert count is known.
struct MeshPlan {
    nodes: u64,
    gpus_per_node: u64,
    world: u64,
    device: &'static str,
    dtype: &'static str,
    tokens_per_rank: u64,
}

fn mesh_plan(o: &ImportOptions) -> Result<MeshPlan, String> {
    if o.nodes == 0 || o.nodes > MAX_INT {
        return Err(format!(
            "the mesh needs at least one node and at most {MAX_INT}, not {}.",
            o.nodes
        ));
    }
    if o.gpus_per_node == 0 || o.gpus_per_node > MAX_INT {
        return Err(format!(
            "a node needs at least one GPU and at most {MAX_INT}, not {}.",
            o.gpus_per_node
        ));
    }
    let world = o
        .nodes
        .checked_mul(o.gpus_per_node)
        .filter(|w| *w <= MAX_INT)
        .ok_or_else(|| {
            format!(
                "a mesh of {} nodes of {} GPUs is too large to describe.",
                o.nodes, o.gpus_per_node
            )
        })?;
    let device = DEVICES
        .iter()
        .find(|d| d.eq_ignore_ascii_case(o.device.trim()))
        .copied()
        .ok_or_else(|| {
            format!(
                "unknown device `{}`: the device presets are {}.",
                clean_comment(&o.device),
                DEVICES.join(", ")
            )
        })?;
    let dtype = match o.dtype.trim().to_ascii_lowercase().as_str() {
        "f32" => "f32",
        "bf16" => "bf16",
        "f16" => "f16",
        _ => {
            return Err(format!(
                "unknown dtype `{}`: the compute dtype must be f32, bf16 or f16.",
                clean_comment(&o.dtype)
            ))
        }
    };
    if o.tokens_per_rank == 0 || o.tokens_per_rank > MAX_INT {
        return Err(format!(
            "tokens per rank must be at least 1 and at most {MAX_INT}, not {}.",
            o.tokens_per_rank
        ));
    }
    Ok(MeshPlan {
        nodes: o.nodes,
        gpus_per_node: o.gpus_per_node,
        world,
        device,
        dtype,
        tokens_per_rank: o.tokens_per_rank,
    })
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The expert-parallel degree: the user's, checked, or the largest that divides both.
fn choose_ep(requested: Option<u64>, world: u64, experts: u64) -> Result<u64, String> {
    let common = gcd(world, experts);
    let choices = || {
        let divisors: Vec<String> = (1..=common.min(4096))
            .filter(|d| common % d == 0)
            .map(|d| d.to_string())
            .collect();
        format!(
            "ep must divide both the GPUs and the experts: choose one of {}",
            divisors.join(", ")
        )
    };
    let Some(ep) = requested else {
        return Ok(common);
    };
    if ep == 0 {
        return Err("ep must be at least 1.".to_string());
    }
    if world % ep != 0 {
        return Err(format!(
            "ep {ep} does not divide the {world} GPUs of the mesh, so the GPUs cannot form whole expert-parallel groups; {}.",
            choices()
        ));
    }
    if experts % ep != 0 {
        return Err(format!(
            "ep {ep} does not divide the {experts} experts, so the expert-parallel ranks cannot hold equal shares; {}.",
            choices()
        ));
    }
    Ok(ep)
}

// ------------------------------------------------------------------ writing

/// Writes `.moe` text in the style of `examples/`: four-space indentation,
/// one entry per line, comments wrapped at 80 columns.
#[derive(Default)]
struct Out {
    text: String,
    depth: usize,
}

const WIDTH: usize = 80;

impl Out {
    fn indent(&self) -> String {
        "    ".repeat(self.depth)
    }

    /// A `//` comment of one or more lines, wrapped at [`WIDTH`].
    fn comment(&mut self, text: &str) {
        let indent = self.indent();
        let room = WIDTH.saturating_sub(indent.len() + 3).max(20);
        let mut line = String::new();
        for word in clean_comment(text).split_whitespace() {
            if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > room {
                self.text.push_str(&format!("{indent}// {line}\n"));
                line.clear();
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
        if !line.is_empty() {
            self.text.push_str(&format!("{indent}// {line}\n"));
        }
    }

    fn comments(&mut self, lines: &[String]) {
        for l in lines {
            self.comment(l);
        }
    }

    fn entry(&mut self, key: &str, value: &str, note: Option<&str>) {
        let indent = self.indent();
        match note
            .map(clean_comment)
            .filter(|n| !n.is_empty() && n != key)
        {
            Some(n) => self
                .text
                .push_str(&format!("{indent}{key} = {value} // {n}\n")),
            None => self.text.push_str(&format!("{indent}{key} = {value}\n")),
        }
    }

    fn int(&mut self, key: &str, v: &Noted<u64>) {
        self.entry(key, &v.value.to_string(), v.note.as_deref());
    }

    fn word(&mut self, key: &str, v: &Noted<&str>) {
        self.entry(key, v.value, v.note.as_deref());
    }

    fn boolean(&mut self, key: &str, v: &Noted<bool>) {
        self.entry(
            key,
            if v.value { "true" } else { "false" },
            v.note.as_deref(),
        );
    }

    fn float(&mut self, key: &str, v: &Noted<f64>) {
        self.entry(key, &decimal(v.value), v.note.as_deref());
    }

    fn open(&mut self, head: &str) {
        let indent = self.indent();
        self.text.push_str(&format!("{indent}{head} {{\n"));
        self.depth += 1;
    }

    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        let indent = self.indent();
        self.text.push_str(&format!("{indent}}}\n"));
    }

    fn blank(&mut self) {
        self.text.push('\n');
    }
}

/// A number for a comment: `7` rather than `7.0`.
fn short_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        decimal(x)
    }
}

/// A finite number as a `.moe` decimal literal: `7.0`, `2.5`, `1e-5`.
fn decimal(x: f64) -> String {
    format!("{x:?}")
}

/// Refuses layers beyond what the checker accepts, with a sentence rather than diagnostics.
fn check_limits(m: &Model, plan: &MeshPlan) -> Result<(), String> {
    let max_experts = crate::check::MAX_EXPERTS;
    let max_ranks = crate::check::MAX_RANKS;
    let count = &m.experts.count;
    if count.value > max_experts {
        return Err(format!(
            "the model has {} experts (`{}`); moec supports at most {max_experts}.",
            count.value,
            count.note.as_deref().unwrap_or("experts")
        ));
    }
    if plan.world > max_ranks {
        return Err(format!(
            "a mesh of {} GPUs is larger than the {max_ranks} moec supports.",
            plan.world
        ));
    }
    let bytes = match plan.dtype {
        "f32" => 4,
        _ => 2,
    };
    let (hidden, inter, top_k) = (
        m.hidden.value,
        m.experts.intermediate.value,
        m.router.top_k.value,
    );
    let matrices: u64 = if m.experts.ffn.value == "swiglu" {
        3
    } else {
        2
    };
    let activations = plan
        .tokens_per_rank
        .checked_mul(hidden)
        .and_then(|x| x.checked_mul(top_k))
        .and_then(|x| x.checked_mul(bytes))
        .and_then(|x| x.checked_mul(plan.world));
    let weights = matrices
        .checked_mul(hidden)
        .and_then(|x| x.checked_mul(inter))
        .and_then(|x| x.checked_add(matrices.checked_mul(inter)?.checked_add(hidden)?))
        .and_then(|x| x.checked_mul(bytes))
        .and_then(|x| x.checked_mul(count.value));
    let shared = m.shared.as_ref().map_or(Some(0), |s| {
        matrices
            .checked_mul(hidden)
            .and_then(|x| x.checked_mul(s.intermediate.value))
            .and_then(|x| x.checked_mul(s.count.value))
            .and_then(|x| x.checked_mul(bytes))
    });
    if activations.is_none() || weights.is_none() || shared.is_none() {
        return Err(format!(
            "the layer is too large for moec: with hidden = {hidden}, intermediate = {inter}, \
             {} experts and {} tokens per rank, its byte counts overflow 64 bits.",
            count.value, plan.tokens_per_rank
        ));
    }
    Ok(())
}

fn render(m: &Model, plan: &MeshPlan, options: &ImportOptions) -> Result<String, String> {
    check_limits(m, plan)?;
    let experts = m.experts.count.value;
    let ep = choose_ep(options.ep, plan.world, experts)?;
    let dp = plan.world / ep;
    let per_rank = experts / ep;

    let mut out = Out::default();
    let source = clean_comment(&options.source_name);
    out.comment(&format!(
        "Imported by `moec import` from {}: {}.",
        if source.is_empty() {
            "a config.json".to_string()
        } else {
            source
        },
        m.title
    ));
    out.comments(&m.about);
    out.comment(&format!(
        "Mesh: {} of {} {}s, expert parallelism {ep}{}.",
        plural(plan.nodes, "node", "nodes"),
        plan.gpus_per_node,
        plan.device,
        if dp > 1 {
            format!(" and data parallelism {dp}")
        } else {
            String::new()
        }
    ));
    out.blank();

    out.open(&format!("layer {}", m.name));
    out.int("hidden", &m.hidden);
    out.entry("dtype", plan.dtype, None);
    out.entry("tokens_per_rank", &plan.tokens_per_rank.to_string(), None);

    let e = &m.experts;
    out.blank();
    out.comments(&e.comment);
    out.open("experts");
    out.int("count", &e.count);
    out.word("ffn", &e.ffn);
    out.int("intermediate", &e.intermediate);
    if e.bias {
        out.entry("bias", "true", None);
    }
    if let Some(limit) = &e.swiglu_limit {
        out.float("swiglu_limit", limit);
    }
    out.close();

    if let Some(s) = &m.shared {
        out.blank();
        out.comments(&s.comment);
        out.open("shared_experts");
        out.int("count", &s.count);
        out.int("intermediate", &s.intermediate);
        if s.sigmoid_gate {
            out.entry("gate", "sigmoid", None);
        }
        out.close();
    }

    let r = &m.router;
    out.blank();
    out.comments(&r.comment);
    out.open("router");
    out.word("scoring", &r.scoring);
    out.int("top_k", &r.top_k);
    if let Some(over) = r.softmax_over {
        out.entry("softmax_over", over, None);
    }
    if let Some(b) = &r.selection_bias {
        out.boolean("selection_bias", b);
    }
    if let Some(g) = &r.groups {
        out.int("groups", &g.count);
        out.int("groups_kept", &g.kept);
        out.entry("group_score", g.score, None);
    }
    if let Some(n) = &r.normalize {
        out.boolean("normalize", n);
    }
    if let Some(s) = &r.scale {
        out.float("scale", s);
    }
    if r.weight_on_input {
        out.entry("weight_on", "input", None);
    }
    out.close();

    out.blank();
    match &m.capacity {
        CapacityOut::Dropless => out.entry("capacity", "dropless", None),
        CapacityOut::Slots(n) => {
            out.comment(
                "Tokens beyond an expert's capacity are dropped and pass through on the residual.",
            );
            out.open("capacity");
            out.int("slots", n);
            out.entry("drop", "position", None);
            out.close();
        }
        CapacityOut::Factor(f) => {
            out.comment(
                "Tokens beyond an expert's capacity are dropped and pass through on the residual.",
            );
            out.open("capacity");
            out.float("factor", f);
            out.entry("drop", "position", None);
            out.close();
        }
    }
    out.close();

    out.blank();
    out.open("mesh");
    out.entry("nodes", &plan.nodes.to_string(), None);
    out.entry("gpus_per_node", &plan.gpus_per_node.to_string(), None);
    out.entry("device", plan.device, None);
    if plan.nodes > 1 {
        out.open("inter_node");
        out.entry(
            "bandwidth",
            "400 Gb/s",
            Some("one ConnectX-7 NDR NIC per GPU"),
        );
        out.entry("latency", "10 us", None);
        out.close();
    }
    let ep_note = format!("{} per GPU", plural(per_rank, "expert", "experts"));
    out.entry("ep", &ep.to_string(), Some(&ep_note));
    if dp > 1 {
        out.entry(
            "dp",
            &dp.to_string(),
            Some(&format!("{dp} copies of each expert")),
        );
    }
    out.close();
    Ok(out.text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::*;

    const MIXTRAL: &str = include_str!("../../tests/configs/mixtral_8x7b.json");
    const DEEPSEEK_V3: &str = include_str!("../../tests/configs/deepseek_v3.json");
    const QWEN3: &str = include_str!("../../tests/configs/qwen3_30b_a3b.json");
    const QWEN2: &str = include_str!("../../tests/configs/qwen2_57b_a14b.json");
    const LLAMA4: &str = include_str!("../../tests/configs/llama4_maverick.json");
    const GPT_OSS: &str = include_str!("../../tests/configs/gpt_oss_20b.json");
    const SWITCH: &str = include_str!("../../tests/configs/switch_base_128.json");
    const LLAMA_DENSE: &str = include_str!("../../tests/configs/llama_dense.json");

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
        assert!(!l.router.normalize);
        assert!(text.contains("swiglu_limit = 7.0\n"), "{text}");
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
        let mistral =
            r#"{"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336}"#;
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
        assert!(import_err(&json, &opts())
            .contains("`routed_scaling_factor` must be a positive number"));
        let json = edited(GPT_OSS, |m| {
            m.insert("num_local_experts".into(), 32.5.into());
        });
        assert!(import_err(&json, &opts()).contains("`num_local_experts` must be a whole number"));
        let json = edited(LLAMA4, |m| {
            if let Some(Value::Object(tc)) = m.get_mut("text_config") {
                tc.insert("hidden_size".into(), Value::Array(Vec::new()));
            }
        });
        assert!(import_err(&json, &opts()).contains(
            "`text_config.hidden_size` must be a whole number, but the config gives a list"
        ));
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
    fn unknown_moe_model_is_imported_generically() {
        let json = r#"{
            "architectures": ["OlmoeForCausalLM"],
            "model_type": "olmoe",
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": false,
            "num_hidden_layers": 16
        }"#;
        let (text, p) = import_ok(json, &opts());
        assert!(text.contains("// imported generically"), "{text}");
        assert_eq!(p.layer.name, "olmoe");
        assert_eq!((p.layer.hidden, p.layer.experts.count), (2048, 64));
        assert_eq!(p.layer.experts.intermediate, 1024);
        assert_eq!(p.layer.experts.ffn, swiglu());
        assert_eq!(p.layer.router.scoring, Scoring::Softmax);
        assert_eq!(p.layer.router.top_k, 8);
        assert!(!p.layer.router.normalize);
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
        for (_, json, _) in MOE_FIXTURES {
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
            if let Some(Value::Object(tc)) = top.get("text_config") {
                for key in tc.keys() {
                    for v in odd_values() {
                        let mut inner = tc.clone();
                        inner.insert(key.clone(), v);
                        let mut m = top.clone();
                        m.insert("text_config".into(), Value::Object(inner));
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
}
