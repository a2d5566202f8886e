//! A saved run: `run.safetensors` and `config.json`, for checking a run
//! without moec.
//!
//! `run.safetensors` holds, all F32, `input` and `output` as
//! `[ranks * tokens_per_rank, hidden]` in global token order (rank-major),
//! and every weight under its Hugging Face name (see
//! [`LayerWeights::tensors`]). `config.json` holds the layer's numerics with
//! Hugging Face-style keys ([`RunConfig`]). With numpy and the `safetensors`
//! package a reference implementation reads both and recomputes `output`.

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::layout::load_from;
use super::load::{Checkpoint, Decode};
use super::{storage_dtype, LayerWeights, WeightsError};
use crate::plan::{
    Activation, CapacityConfig, DType, DropPolicy, GroupConfig, GroupScore, LayerConfig,
    RouterConfig, Scoring, SharedConfig, SoftmaxOver, WeightOn,
};

/// The `config.json` of a saved run.
///
/// The first keys are the ones a Hugging Face `config.json` would use (or
/// close to them); they are always written, `null` where noted. The keys from
/// `dtype` on describe what the Hugging Face keys cannot; a hand-written
/// config may leave them out.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub hidden_size: u64,
    pub moe_intermediate_size: u64,
    pub num_experts: u64,
    pub num_experts_per_tok: u64,
    /// `"softmax"` or `"sigmoid"`.
    pub scoring_func: String,
    /// `"all"` or `"topk"`.
    pub softmax_over: String,
    /// 1 when selection is not group-limited.
    pub n_group: u64,
    /// 1 when selection is not group-limited.
    pub topk_group: u64,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    /// `"output"` or `"input"`.
    pub router_weight_on: String,
    /// `"swiglu"`, `"gelu"`, `"gelu_tanh"` or `"relu"`.
    pub expert_act: String,
    /// gpt-oss's clamp; `null` for plain SwiGLU and the other FFNs.
    pub swiglu_limit: Option<f64>,
    /// 0 without shared experts.
    pub n_shared_experts: u64,
    /// The intermediate size of *one* shared expert (they run fused,
    /// `n_shared_experts` times as wide); 0 without shared experts.
    pub shared_expert_intermediate_size: u64,
    /// `null` when dropless or when the capacity was given in slots.
    pub capacity_factor: Option<f64>,
    /// `"position"` or `"probs"`; `"position"` (and meaningless) when dropless.
    pub drop_policy: String,
    pub ranks: u64,
    pub tokens_per_rank: u64,
    /// The storage dtype the weights and inputs were rounded to: `"f32"`,
    /// `"bf16"` or `"f16"`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// The dtype tokens travel in to the experts (`"fp8_e4m3"` loses
    /// precision a reference must allow for); `null` means `dtype`.
    #[serde(default)]
    pub dispatch_dtype: Option<String>,
    /// Every expert projection has a bias (`*.bias` tensors).
    #[serde(default)]
    pub expert_bias: bool,
    /// `mlp.gate.bias` is added to the router's logits (gpt-oss).
    #[serde(default)]
    pub router_bias: bool,
    /// `mlp.gate.e_score_correction_bias` is added to the scores for selection.
    #[serde(default)]
    pub selection_bias: bool,
    /// `"top2_sum"` or `"max"` when selection is group-limited, else `null`.
    #[serde(default)]
    pub group_score: Option<String>,
    /// The shared experts' FFN, `null` without shared experts.
    #[serde(default)]
    pub shared_expert_act: Option<String>,
    /// The shared experts' SwiGLU clamp, `null` when none.
    #[serde(default)]
    pub shared_swiglu_limit: Option<f64>,
    /// The shared projections have biases.
    #[serde(default)]
    pub shared_expert_bias: bool,
    /// The shared output is multiplied by `sigmoid(x · mlp.shared_expert_gate.weight)`.
    #[serde(default)]
    pub shared_expert_gate: bool,
    /// Slots per expert per EP group when capacity is limited, `null` when dropless.
    #[serde(default)]
    pub capacity_slots: Option<u64>,
}

fn default_dtype() -> String {
    "f32".to_string()
}

fn limit(ffn: Activation) -> Option<f64> {
    match ffn {
        Activation::Swiglu { limit } => limit,
        _ => None,
    }
}

impl RunConfig {
    /// The config of a run of `layer` on `ranks` ranks.
    pub fn new(layer: &LayerConfig, ranks: u64, tokens_per_rank: u64) -> RunConfig {
        let r = &layer.router;
        let (capacity_factor, capacity_slots, drop) = match layer.capacity {
            CapacityConfig::Dropless => (None, None, DropPolicy::Position),
            CapacityConfig::Limited {
                slots,
                factor,
                drop,
            } => (factor, Some(slots), drop),
        };
        let shared = layer.shared.as_ref();
        RunConfig {
            hidden_size: layer.hidden,
            moe_intermediate_size: layer.intermediate,
            num_experts: layer.experts,
            num_experts_per_tok: r.top_k,
            scoring_func: match r.scoring {
                Scoring::Softmax => "softmax",
                Scoring::Sigmoid => "sigmoid",
            }
            .to_string(),
            softmax_over: match r.softmax_over {
                SoftmaxOver::All => "all",
                SoftmaxOver::Topk => "topk",
            }
            .to_string(),
            n_group: r.groups.map_or(1, |g| g.count),
            topk_group: r.groups.map_or(1, |g| g.kept),
            norm_topk_prob: r.normalize,
            routed_scaling_factor: r.scale,
            router_weight_on: match r.weight_on {
                WeightOn::Output => "output",
                WeightOn::Input => "input",
            }
            .to_string(),
            expert_act: layer.ffn.name().to_string(),
            swiglu_limit: limit(layer.ffn),
            n_shared_experts: shared.map_or(0, |s| s.count),
            shared_expert_intermediate_size: shared.map_or(0, |s| s.intermediate),
            capacity_factor,
            drop_policy: match drop {
                DropPolicy::Position => "position",
                DropPolicy::Probs => "probs",
            }
            .to_string(),
            ranks,
            tokens_per_rank,
            dtype: layer.dtype.name().to_string(),
            dispatch_dtype: Some(layer.dispatch_dtype.name().to_string()),
            expert_bias: layer.expert_bias,
            router_bias: r.logit_bias,
            selection_bias: r.selection_bias,
            group_score: r.groups.map(|g| {
                match g.score {
                    GroupScore::Top2Sum => "top2_sum",
                    GroupScore::Max => "max",
                }
                .to_string()
            }),
            shared_expert_act: shared.map(|s| s.ffn.name().to_string()),
            shared_swiglu_limit: shared.and_then(|s| limit(s.ffn)),
            shared_expert_bias: shared.is_some_and(|s| s.bias),
            shared_expert_gate: shared.is_some_and(|s| s.sigmoid_gate),
            capacity_slots,
        }
    }

    /// The layer this config describes (named `run`). Fails, saying which
    /// key, on a value that names nothing.
    pub fn layer(&self) -> Result<LayerConfig, String> {
        let bad = |key: &str, value: &str| format!("`{key}`: unknown value `{value}`");
        let dtype = |key: &str, value: &str| match value {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            "f16" => Ok(DType::F16),
            "fp8_e4m3" => Ok(DType::Fp8E4m3),
            other => Err(bad(key, other)),
        };
        let act = |key: &str, value: &str, limit: Option<f64>| {
            let a = match value {
                "swiglu" => Activation::Swiglu { limit },
                "gelu" => Activation::Gelu,
                "gelu_tanh" => Activation::GeluTanh,
                "relu" => Activation::Relu,
                other => return Err(bad(key, other)),
            };
            if limit.is_some() && !a.gated() {
                return Err(format!("a SwiGLU limit with `{key}` = `{value}`"));
            }
            Ok(a)
        };
        let layer_dtype = dtype("dtype", &self.dtype)?;
        let dispatch_dtype = match &self.dispatch_dtype {
            Some(d) => dtype("dispatch_dtype", d)?,
            None => layer_dtype,
        };
        let ffn = act("expert_act", &self.expert_act, self.swiglu_limit)?;
        let shared = if self.n_shared_experts == 0 {
            None
        } else {
            let shared_ffn = match &self.shared_expert_act {
                Some(a) => act("shared_expert_act", a, self.shared_swiglu_limit)?,
                None => ffn,
            };
            Some(SharedConfig {
                count: self.n_shared_experts,
                intermediate: self.shared_expert_intermediate_size,
                ffn: shared_ffn,
                bias: self.shared_expert_bias,
                sigmoid_gate: self.shared_expert_gate,
            })
        };
        let scoring = match self.scoring_func.as_str() {
            "softmax" => Scoring::Softmax,
            "sigmoid" => Scoring::Sigmoid,
            other => return Err(bad("scoring_func", other)),
        };
        let softmax_over = match self.softmax_over.as_str() {
            "all" => SoftmaxOver::All,
            "topk" => SoftmaxOver::Topk,
            other => return Err(bad("softmax_over", other)),
        };
        let groups = match (&self.group_score, self.n_group, self.topk_group) {
            (None, 1, 1) => None,
            (score, count, kept) => Some(GroupConfig {
                count,
                kept,
                score: match score.as_deref() {
                    None | Some("top2_sum") => GroupScore::Top2Sum,
                    Some("max") => GroupScore::Max,
                    Some(other) => return Err(bad("group_score", other)),
                },
            }),
        };
        let weight_on = match self.router_weight_on.as_str() {
            "output" => WeightOn::Output,
            "input" => WeightOn::Input,
            other => return Err(bad("router_weight_on", other)),
        };
        let drop = match self.drop_policy.as_str() {
            "position" => DropPolicy::Position,
            "probs" => DropPolicy::Probs,
            other => return Err(bad("drop_policy", other)),
        };
        let capacity = match (self.capacity_slots, self.capacity_factor) {
            (None, None) => CapacityConfig::Dropless,
            (Some(slots), factor) => CapacityConfig::Limited {
                slots,
                factor,
                drop,
            },
            (None, Some(_)) => {
                return Err("`capacity_factor` without `capacity_slots`: the slots \
                            depend on the mesh and must be given"
                    .to_string())
            }
        };
        Ok(LayerConfig {
            name: "run".to_string(),
            hidden: self.hidden_size,
            dtype: layer_dtype,
            dispatch_dtype,
            tokens_per_rank: self.tokens_per_rank,
            experts: self.num_experts,
            intermediate: self.moe_intermediate_size,
            ffn,
            expert_bias: self.expert_bias,
            shared,
            router: RouterConfig {
                scoring,
                top_k: self.num_experts_per_tok,
                logit_bias: self.router_bias,
                softmax_over,
                selection_bias: self.selection_bias,
                groups,
                normalize: self.norm_topk_prob,
                scale: self.routed_scaling_factor,
                weight_on,
            },
            capacity,
        })
    }
}

/// A run read back by [`load_run`].
#[derive(Clone, Debug, PartialEq)]
pub struct SavedRun {
    pub config: RunConfig,
    /// The layer of `config` ([`RunConfig::layer`]).
    pub layer: LayerConfig,
    pub weights: LayerWeights,
    /// Per rank, `[tokens_per_rank, hidden]`.
    pub inputs: Vec<Vec<f32>>,
    /// Per rank, `[tokens_per_rank, hidden]`.
    pub outputs: Vec<Vec<f32>>,
}

/// The two files of a saved run in `dir`.
fn files(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("run.safetensors"), dir.join("config.json"))
}

/// Saves a run in `dir` (created if needed): `run.safetensors` with `input`,
/// `output` and every weight, all F32, and `config.json` ([`RunConfig`]).
///
/// `inputs` and `outputs` are per rank, `[tokens_per_rank, hidden]` each.
/// Existing files are replaced. Non-finite outputs are saved as they are: a
/// broken run is worth keeping for the diagnosis.
pub fn save_run(
    dir: &Path,
    layer: &LayerConfig,
    weights: &LayerWeights,
    ranks: usize,
    tokens_per_rank: usize,
    inputs: &[Vec<f32>],
    outputs: &[Vec<f32>],
) -> Result<(), WeightsError> {
    let (tensors_file, config_file) = files(dir);
    storage_dtype(layer)?;
    weights.check(layer)?;
    let h = weights.hidden;
    let run_err = |tensor: &str, detail: String| WeightsError::Run {
        file: tensors_file.clone(),
        tensor: tensor.to_string(),
        detail,
    };
    let per_rank = tokens_per_rank
        .checked_mul(h)
        .ok_or_else(|| run_err("input", "tokens_per_rank * hidden overflows".to_string()))?;
    let rows = ranks
        .checked_mul(tokens_per_rank)
        .ok_or_else(|| run_err("input", "ranks * tokens_per_rank overflows".to_string()))?;
    for (tensor, per) in [("input", inputs), ("output", outputs)] {
        if per.len() != ranks {
            return Err(run_err(
                tensor,
                format!("{} ranks of values, expected {ranks}", per.len()),
            ));
        }
        for (rank, v) in per.iter().enumerate() {
            if v.len() != per_rank {
                return Err(run_err(
                    tensor,
                    format!(
                        "rank {rank} has {} values, expected {tokens_per_rank} tokens x {h} = {per_rank}",
                        v.len()
                    ),
                ));
            }
        }
    }

    let le = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = vec![
        ("input".to_string(), vec![rows, h], le(&inputs.concat())),
        ("output".to_string(), vec![rows, h], le(&outputs.concat())),
    ];
    for (name, shape, values) in weights.tensors() {
        owned.push((name, shape, le(values)));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (name, shape, bytes) in &owned {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| run_err(name, format!("cannot be serialised: {e}")))?;
        views.push((name.as_str(), view));
    }

    std::fs::create_dir_all(dir).map_err(|source| WeightsError::Io {
        file: dir.to_path_buf(),
        source,
    })?;
    let info = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("producer".to_string(), "moec".to_string()),
    ]);
    safetensors::serialize_to_file(views, Some(info), &tensors_file).map_err(|e| {
        WeightsError::Io {
            file: tensors_file.clone(),
            source: match e {
                safetensors::SafeTensorError::IoError(source) => source,
                other => std::io::Error::other(other.to_string()),
            },
        }
    })?;

    let config = RunConfig::new(layer, ranks as u64, tokens_per_rank as u64);
    let mut text = serde_json::to_string_pretty(&config).map_err(|e| WeightsError::Io {
        file: config_file.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    text.push('\n');
    std::fs::write(&config_file, text).map_err(|source| WeightsError::Io {
        file: config_file.clone(),
        source,
    })
}

/// Reads back a run saved by [`save_run`]: its config, the layer it
/// describes, the weights (checked like [`LayerWeights::load`]) and the
/// inputs and outputs split per rank.
pub fn load_run(dir: &Path) -> Result<SavedRun, WeightsError> {
    let (tensors_file, config_file) = files(dir);
    let text = crate::files::read_to_string(&config_file).map_err(|source| WeightsError::Io {
        file: config_file.clone(),
        source,
    })?;
    let corrupt = |detail: String| WeightsError::Corrupt {
        file: config_file.clone(),
        detail,
    };
    let config: RunConfig = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
    let layer = config.layer().map_err(corrupt)?;
    let size = |key: &str, v: u64| {
        usize::try_from(v).map_err(|_| corrupt(format!("`{key}` = {v} does not fit in memory")))
    };
    let ranks = size("ranks", config.ranks)?;
    let tokens = size("tokens_per_rank", config.tokens_per_rank)?;
    let h = size("hidden_size", config.hidden_size)?;
    let rows = ranks
        .checked_mul(tokens)
        .ok_or_else(|| corrupt("ranks * tokens_per_rank overflows".to_string()))?;
    let per_rank = tokens
        .checked_mul(h)
        .ok_or_else(|| corrupt("tokens_per_rank * hidden_size overflows".to_string()))?;

    let mut ck = Checkpoint::open(&tensors_file)?;
    let (weights, _) = load_from(&mut ck, &layer, "")?;
    let mut read = |name: &str| -> Result<Vec<Vec<f32>>, WeightsError> {
        let decode = Decode {
            round: None,
            finite: false,
        };
        let all = ck
            .read(name, &[rows, h], decode)?
            .ok_or_else(|| WeightsError::Missing {
                file: tensors_file.clone(),
                tensor: name.to_string(),
                hint: None,
            })?;
        Ok(if per_rank == 0 {
            vec![Vec::new(); ranks]
        } else {
            all.chunks(per_rank).map(<[f32]>::to_vec).collect()
        })
    };
    let inputs = read("input")?;
    let outputs = read("output")?;
    Ok(SavedRun {
        config,
        layer,
        weights,
        inputs,
        outputs,
    })
}
