//! The weights of one MoE layer in memory, where they come from, and how a run
//! is saved so that anyone can check it.
//!
//! A plan names its weights but does not hold them (see [`crate::plan`]): the
//! runtime gets them from one of three places.
//!
//! - [`LayerWeights::load`] reads a Hugging Face safetensors checkpoint (one
//!   file, a directory, or a sharded `model.safetensors.index.json`), so a
//!   plan can run on a real model's layer.
//! - [`LayerWeights::random`] draws them from a seed, so tests, benchmarks and
//!   `moec run` need no multi-gigabyte download and every run is reproducible
//!   from two integers (the seed and the layer).
//! - An embedder builds [`LayerWeights`] by hand; [`LayerWeights::check`]
//!   says whether they fit the layer.
//!
//! [`save_run`] writes the inputs, outputs and weights of a run as one F32
//! `run.safetensors` under Hugging Face names, and the layer's numerics as a
//! `config.json` with Hugging Face-style keys. An independent reference (a few
//! lines of numpy) can recompute the layer from those two files without moec;
//! [`load_run`] reads them back.
//!
//! Everything is `f32` in memory, already rounded to the layer's storage dtype
//! (round to nearest even via `half`), so every backend starts from the very
//! same values whatever the dtype it computes in. The router's selection bias
//! and the shared expert's sigmoid gate are the exceptions: they stay `f32`,
//! as real checkpoints keep these tiny vectors in `f32`.
//!
//! Layout is PyTorch `Linear`'s `[out, in]`, row-major: `gate` and `up` are
//! `[width, hidden]`, `down` is `[hidden, width]`, the router is
//! `[experts, hidden]`.

mod error;
mod layout;
mod load;
mod quant;
mod run;

pub use error::WeightsError;
pub use layout::{Family, LoadReport};
pub use run::{load_run, save_run, RunConfig, SavedRun};

use std::convert::Infallible;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::plan::{DType, LayerConfig, Scoring, SoftmaxOver};

/// One feed-forward network: a routed expert, or the shared experts fused.
#[derive(Clone, Debug, PartialEq)]
pub struct Ffn {
    /// The intermediate size.
    pub width: usize,
    /// `[width, hidden]`; present exactly for gated (SwiGLU) FFNs.
    pub gate: Option<Vec<f32>>,
    /// `[width, hidden]`.
    pub up: Vec<f32>,
    /// `[hidden, width]`.
    pub down: Vec<f32>,
    /// `[width]`; with biases and a gate.
    pub gate_bias: Option<Vec<f32>>,
    /// `[width]`; with biases.
    pub up_bias: Option<Vec<f32>>,
    /// `[hidden]`; with biases.
    pub down_bias: Option<Vec<f32>>,
}

/// The weights of one MoE layer, `f32` rounded to the layer's dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub hidden: usize,
    /// The router (`mlp.gate.weight`), `[experts, hidden]`.
    pub router: Vec<f32>,
    /// The router's logit bias (`mlp.gate.bias`; gpt-oss's
    /// `mlp.router.bias`), `[experts]`, added to the logits; present exactly
    /// with `router.logit_bias`.
    pub router_logit_bias: Option<Vec<f32>>,
    /// The selection bias (`e_score_correction_bias`), `[experts]`, f32
    /// (not rounded); present exactly with `router.selection_bias`.
    pub router_bias: Option<Vec<f32>>,
    /// The routed experts, `experts` of them, each `intermediate` wide.
    pub experts: Vec<Ffn>,
    /// The shared experts run as one FFN `count * intermediate` wide.
    pub shared: Option<Ffn>,
    /// The shared expert's sigmoid gate vector, `[hidden]`, f32 (not
    /// rounded); present exactly with `shared.sigmoid_gate`.
    pub shared_gate: Option<Vec<f32>>,
}

/// Rounds `v` to `dtype` (round to nearest even) and back to `f32`. `f32` and
/// the dtypes that are not float storage dtypes leave `v` unchanged.
pub fn round_to_dtype(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::Bf16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

/// The ChaCha stream of [`random_inputs`]; the weights use stream 0.
const INPUT_STREAM: u64 = 1;

/// Standard deviation of a router logit with [`LayerWeights::random`]'s router
/// and [`random_inputs`]'s tokens: `H` terms of variance
/// `1/(3H)` (weights) times `1/3` (inputs) give `1/9`.
const LOGIT_STD: f64 = 1.0 / 3.0;

/// Random token rows for a layer: per rank a `[tokens_per_rank, hidden]`
/// row-major vector, every value uniform in `[-1, 1)`, rounded to the layer's
/// dtype.
///
/// The values come from `ChaCha8Rng::seed_from_u64(seed)` on stream 1 (the
/// weights of [`LayerWeights::random`] use stream 0 of the same seed, so the
/// two are independent), drawn in global token order: rank 0's tokens first,
/// each token's `hidden` values in order. So 2 ranks of 4 tokens hold the same
/// rows as 1 rank of 8.
///
/// # Panics
///
/// When `ranks * tokens_per_rank * hidden` values do not fit in memory.
pub fn random_inputs(
    layer: &LayerConfig,
    ranks: usize,
    tokens_per_rank: usize,
    seed: u64,
) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(INPUT_STREAM);
    let len = tokens_per_rank.saturating_mul(usize_of(layer.hidden));
    (0..ranks)
        .map(|_| {
            (0..len)
                .map(|_| round_to_dtype(layer.dtype, rng.random_range(-1.0f32..1.0)))
                .collect()
        })
        .collect()
}

/// What a tensor is, independently of how a checkpoint names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tensor {
    Router,
    /// The router `Linear`'s bias, part of the logits (gpt-oss).
    RouterLogitBias,
    /// The selection-only bias (`e_score_correction_bias`).
    RouterBias,
    Expert {
        index: usize,
        proj: Proj,
        bias: bool,
    },
    Shared {
        proj: Proj,
        bias: bool,
    },
    SharedGate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    pub(crate) fn hf(self) -> &'static str {
        match self {
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }
}

impl Tensor {
    /// The Hugging Face name, without a prefix (DeepSeek/Qwen naming).
    pub(crate) fn hf_name(self) -> String {
        let param = |bias: bool| if bias { "bias" } else { "weight" };
        match self {
            Tensor::Router => "mlp.gate.weight".to_string(),
            Tensor::RouterLogitBias => "mlp.gate.bias".to_string(),
            Tensor::RouterBias => "mlp.gate.e_score_correction_bias".to_string(),
            Tensor::Expert { index, proj, bias } => {
                format!("mlp.experts.{index}.{}.{}", proj.hf(), param(bias))
            }
            Tensor::Shared { proj, bias } => {
                format!("mlp.shared_experts.{}.{}", proj.hf(), param(bias))
            }
            Tensor::SharedGate => "mlp.shared_expert_gate.weight".to_string(),
        }
    }

    /// Whether values are rounded to the layer's dtype (all but the two small
    /// f32 vectors).
    pub(crate) fn rounded(self) -> bool {
        !matches!(self, Tensor::RouterBias | Tensor::SharedGate)
    }
}

/// One tensor the layer needs: what it is, its shape and its fan-in (the `in`
/// of its `Linear`, for the random bound).
pub(crate) struct Spec {
    pub(crate) tensor: Tensor,
    pub(crate) shape: Vec<usize>,
    fan_in: usize,
}

impl Spec {
    fn len(&self) -> usize {
        self.shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
    }
}

/// The sizes of a layer as `usize`.
pub(crate) struct Dims {
    hidden: usize,
    experts: usize,
    intermediate: usize,
    /// Fused width of the shared experts, 0 without.
    shared: usize,
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl Dims {
    /// The sizes, checking that every tensor's element count fits in `usize`.
    pub(crate) fn of(layer: &LayerConfig) -> Result<Dims, WeightsError> {
        let err = |detail: String| WeightsError::Layer {
            layer: layer.name.clone(),
            detail,
        };
        let conv = |what: &str, v: u64| {
            usize::try_from(v).map_err(|_| err(format!("{what} = {v} does not fit in memory")))
        };
        let hidden = conv("hidden", layer.hidden)?;
        let experts = conv("experts", layer.experts)?;
        let intermediate = conv("intermediate", layer.intermediate)?;
        let shared = match &layer.shared {
            None => 0,
            Some(s) => conv("shared.count", s.count)?
                .checked_mul(conv("shared.intermediate", s.intermediate)?)
                .ok_or_else(|| {
                    err(format!(
                        "shared width {} * {} overflows",
                        s.count, s.intermediate
                    ))
                })?,
        };
        for (what, rows) in [
            ("router", experts),
            ("expert", intermediate),
            ("shared expert", shared),
        ] {
            if rows.checked_mul(hidden).is_none() {
                return Err(err(format!(
                    "{what} weight of {rows} x {hidden} values overflows"
                )));
            }
        }
        Ok(Dims {
            hidden,
            experts,
            intermediate,
            shared,
        })
    }

    /// The sizes, saturating where they do not fit (allocation then fails).
    fn saturating(layer: &LayerConfig) -> Dims {
        Dims {
            hidden: usize_of(layer.hidden),
            experts: usize_of(layer.experts),
            intermediate: usize_of(layer.intermediate),
            shared: layer.shared.as_ref().map_or(0, |s| {
                usize_of(s.count).saturating_mul(usize_of(s.intermediate))
            }),
        }
    }
}

/// Builds a layer's weights by asking `get` for every tensor, in the fixed
/// order of [`LayerWeights::tensors`].
pub(crate) fn build<E>(
    layer: &LayerConfig,
    d: &Dims,
    mut get: impl FnMut(&Spec) -> Result<Vec<f32>, E>,
) -> Result<LayerWeights, E> {
    let h = d.hidden;
    let router = get(&Spec {
        tensor: Tensor::Router,
        shape: vec![d.experts, h],
        fan_in: h,
    })?;
    let router_logit_bias = if layer.router.logit_bias {
        Some(get(&Spec {
            tensor: Tensor::RouterLogitBias,
            shape: vec![d.experts],
            fan_in: h,
        })?)
    } else {
        None
    };
    let router_bias = if layer.router.selection_bias {
        Some(get(&Spec {
            tensor: Tensor::RouterBias,
            shape: vec![d.experts],
            fan_in: h,
        })?)
    } else {
        None
    };
    let mut experts = Vec::new();
    for index in 0..d.experts {
        let ffn = build_ffn(
            h,
            d.intermediate,
            layer.ffn.gated(),
            layer.expert_bias,
            |proj, bias| Tensor::Expert { index, proj, bias },
            &mut get,
        )?;
        experts.push(ffn);
    }
    let shared = match &layer.shared {
        None => None,
        Some(s) => Some(build_ffn(
            h,
            d.shared,
            s.ffn.gated(),
            s.bias,
            |proj, bias| Tensor::Shared { proj, bias },
            &mut get,
        )?),
    };
    let shared_gate = match &layer.shared {
        Some(s) if s.sigmoid_gate => Some(get(&Spec {
            tensor: Tensor::SharedGate,
            shape: vec![1, h],
            fan_in: h,
        })?),
        _ => None,
    };
    Ok(LayerWeights {
        hidden: h,
        router,
        router_logit_bias,
        router_bias,
        experts,
        shared,
        shared_gate,
    })
}

fn build_ffn<E>(
    hidden: usize,
    width: usize,
    gated: bool,
    bias: bool,
    tensor: impl Fn(Proj, bool) -> Tensor,
    get: &mut impl FnMut(&Spec) -> Result<Vec<f32>, E>,
) -> Result<Ffn, E> {
    let mut pair = |proj: Proj| -> Result<(Vec<f32>, Option<Vec<f32>>), E> {
        let (shape, fan_in, out) = match proj {
            Proj::Gate | Proj::Up => (vec![width, hidden], hidden, width),
            Proj::Down => (vec![hidden, width], width, hidden),
        };
        let w = get(&Spec {
            tensor: tensor(proj, false),
            shape,
            fan_in,
        })?;
        let b = if bias {
            Some(get(&Spec {
                tensor: tensor(proj, true),
                shape: vec![out],
                fan_in,
            })?)
        } else {
            None
        };
        Ok((w, b))
    };
    let (gate, gate_bias) = if gated {
        let (w, b) = pair(Proj::Gate)?;
        (Some(w), b)
    } else {
        (None, None)
    };
    let (up, up_bias) = pair(Proj::Up)?;
    let (down, down_bias) = pair(Proj::Down)?;
    Ok(Ffn {
        width,
        gate,
        up,
        down,
        gate_bias,
        up_bias,
        down_bias,
    })
}

/// The bound `b` of the random selection bias, uniform in `[-b, b)`: half the
/// typical spread of the selection scores it is added to. With top-4 of 16
/// experts that changes about one assignment in six (most tokens keep most of
/// their experts) without letting the bias decide alone.
fn selection_bias_bound(layer: &LayerConfig) -> f64 {
    let spread = match (layer.router.scoring, layer.router.softmax_over) {
        // σ'(0) = 1/4.
        (Scoring::Sigmoid, _) => LOGIT_STD / 4.0,
        // Selection on the logits themselves.
        (Scoring::Softmax, SoftmaxOver::Topk) => LOGIT_STD,
        // Probabilities ≈ (1 + l)/E.
        (Scoring::Softmax, SoftmaxOver::All) => LOGIT_STD / (layer.experts.max(1) as f64),
    };
    0.5 * spread
}

/// Fills `values` with the draws `first_word..` of the stream
/// `ChaCha8Rng::seed_from_u64(seed)`, uniform in `[-bound, bound)` and
/// rounded to `round`'s dtype when given: the values one sequential
/// `random_range` per value would give, drawn by up to one thread per core
/// from their own positions in the stream (a DeepSeek-V3 layer has 11
/// billion weights).
fn fill_uniform(values: &mut [f32], seed: u64, first_word: u128, bound: f32, round: Option<DType>) {
    const CHUNK: usize = 1 << 20;
    let draw = |chunk: &mut [f32], at: u128| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos(at);
        for v in chunk {
            let x = rng.random_range(-bound..bound);
            *v = match round {
                Some(dtype) => round_to_dtype(dtype, x),
                None => x,
            };
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || values.len() <= CHUNK {
        draw(values, first_word);
        return;
    }
    let per_thread = values.len().div_ceil(threads).max(CHUNK);
    // A queue of parts the calling thread also works on: if no thread can be
    // started (the process's thread limit), every part is still drawn.
    let parts: std::sync::Mutex<Vec<(u128, &mut [f32])>> = std::sync::Mutex::new(
        values
            .chunks_mut(per_thread)
            .enumerate()
            .map(|(i, part)| (first_word + (i * per_thread) as u128, part))
            .collect(),
    );
    let work = || loop {
        let next = parts.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match next {
            Some((at, part)) => draw(part, at),
            None => break,
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            if std::thread::Builder::new().spawn_scoped(s, work).is_err() {
                break;
            }
        }
        work();
    });
}

impl LayerWeights {
    /// Random weights for `layer`, a deterministic function of `seed`.
    ///
    /// Every `Linear` weight and bias is uniform in `[-1/√fan_in, 1/√fan_in)`
    /// as PyTorch initialises `nn.Linear` (fan_in is `hidden` for the router,
    /// `gate` and `up`, and the FFN's width for `down`), then rounded to the
    /// layer's dtype. With [`random_inputs`]' tokens (uniform in `[-1, 1)`)
    /// the router logits and the projections have a standard deviation of
    /// about 1/3: O(1), far from saturating a softmax, a sigmoid or the SwiGLU
    /// clamp, while still spreading the logits so the top-k is not a tie.
    ///
    /// The selection bias (with `router.selection_bias`) is uniform in
    /// `[-b, b)`, not rounded, where `b` is half the typical spread of the
    /// scores it is added to: 1/24 for sigmoid scoring (σ'(0)·1/3), 1/6 for
    /// the logits of `softmax_over = topk`, `1/(6E)` for softmax
    /// probabilities over all `E` experts. With top-4 of 16 experts it changes
    /// about one assignment in six: it matters, it does not decide alone. The
    /// shared expert's sigmoid gate is uniform in
    /// `[-1/√hidden, 1/√hidden)`, not rounded.
    ///
    /// The values come from `ChaCha8Rng::seed_from_u64(seed)` (stream 0), one
    /// `random_range` draw per value, row-major, tensor after tensor in the
    /// order of [`LayerWeights::tensors`]: the router, its logit bias (uniform
    /// in `[-1/√hidden, 1/√hidden)` as a `Linear`'s bias), its selection bias,
    /// then for each expert in order `gate_proj.weight`, `gate_proj.bias`,
    /// `up_proj.weight`, `up_proj.bias`, `down_proj.weight`, `down_proj.bias`
    /// (those the layer has), then the shared experts in the same order, then
    /// the shared gate. A layer that differs in a size, an FFN kind or a bias
    /// therefore gets different values from the first tensor that differs on.
    ///
    /// # Panics
    ///
    /// When the layer's weights do not fit in memory.
    pub fn random(layer: &LayerConfig, seed: u64) -> LayerWeights {
        let d = Dims::saturating(layer);
        let bias_bound = selection_bias_bound(layer) as f32;
        let shared_gate_bound = (1.0 / (d.hidden.max(1) as f64).sqrt()) as f32;
        // The position of the tensor's first value in the stream: one 32-bit
        // word per value (rand's uniform f32 draws exactly one `u32`).
        let mut word: u128 = 0;
        let built: Result<LayerWeights, Infallible> = build(layer, &d, |spec| {
            let bound = match spec.tensor {
                Tensor::RouterBias => bias_bound,
                Tensor::SharedGate => shared_gate_bound,
                _ => (1.0 / (spec.fan_in.max(1) as f64).sqrt()) as f32,
            };
            let dtype = spec.tensor.rounded().then_some(layer.dtype);
            let mut values = vec![0.0f32; spec.len()];
            fill_uniform(&mut values, seed, word, bound, dtype);
            word += spec.len() as u128;
            Ok(values)
        });
        match built {
            Ok(w) => w,
            Err(never) => match never {},
        }
    }

    /// Loads the layer's weights from a Hugging Face safetensors checkpoint.
    ///
    /// `path` is a `.safetensors` file, a sharded checkpoint's
    /// `model.safetensors.index.json`, or a directory holding either. Tensor
    /// names are `{prefix}` followed by the names of the model family whose
    /// router is under the prefix (e.g. prefix `model.layers.3.`): per-expert
    /// `mlp.experts.{e}.{gate,up,down}_proj` (DeepSeek, Qwen, GLM, OLMoE),
    /// Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`, the fused 3-D
    /// tensors of gpt-oss, Llama-4 and transformers 5, or Switch
    /// Transformers' `mlp.experts.expert_{e}.wi/wo`; the book's weights page
    /// has the table. [`LayerWeights::load_layer`] finds the prefix from a
    /// layer number.
    ///
    /// F32, BF16, F16 and F64 tensors are read and rounded to the layer's
    /// dtype (the selection bias and shared gate stay f32); fp8 e4m3 weights
    /// with 128 x 128 block scales (`weight_scale_inv`) and MXFP4 experts
    /// (`_blocks` + `_scales`) are dequantised exactly on the CPU first. A
    /// missing tensor, a wrong shape, another dtype, a NaN or infinite value
    /// (also after rounding), a nonzero router bias in a layer without
    /// `logit_bias` (dropping it would change the routing) or a corrupt file
    /// is an error naming the file and tensor.
    /// Only the header and the tensors the layer needs are read (one expert
    /// of a fused tensor at a time), so a shard of many gigabytes costs the
    /// size of one layer.
    pub fn load(
        path: &std::path::Path,
        layer: &LayerConfig,
        prefix: &str,
    ) -> Result<LayerWeights, WeightsError> {
        layout::load(path, layer, prefix).map(|(w, _)| w)
    }

    /// [`LayerWeights::load`] of MoE layer `number`: the prefix is the one
    /// under which the checkpoint has a router numbered so
    /// (`model.layers.{number}.`, `language_model.model.layers.{number}.`,
    /// `encoder.block.{number}.layer.1.`). An error lists the router names
    /// looked for and the MoE layers the checkpoint has, or, when an encoder
    /// and a decoder both have layer `number`, both prefixes.
    pub fn load_layer(
        path: &std::path::Path,
        layer: &LayerConfig,
        number: u64,
    ) -> Result<LayerWeights, WeightsError> {
        layout::load_layer(path, layer, number).map(|(w, _)| w)
    }

    /// Checks that every tensor has the length the layer implies and is
    /// present exactly when the layer has it, and that the layer's dtype is a
    /// storage dtype (f32, bf16, f16). For weights built by hand;
    /// [`LayerWeights::random`] and [`LayerWeights::load`] always pass. The
    /// values themselves are not looked at.
    pub fn check(&self, layer: &LayerConfig) -> Result<(), WeightsError> {
        storage_dtype(layer)?;
        let d = Dims::of(layer)?;
        let mismatch = |tensor: String, expected: String, found: String| WeightsError::Mismatch {
            layer: layer.name.clone(),
            tensor,
            expected,
            found,
        };
        if self.hidden != d.hidden {
            return Err(mismatch(
                "hidden".to_string(),
                format!("hidden {}", d.hidden),
                format!("hidden {}", self.hidden),
            ));
        }
        if self.experts.len() != d.experts {
            return Err(mismatch(
                "mlp.experts".to_string(),
                format!("{} experts", d.experts),
                format!("{} experts", self.experts.len()),
            ));
        }
        if let Some(s) = &self.shared {
            if s.width != d.shared {
                return Err(mismatch(
                    "mlp.shared_experts".to_string(),
                    format!("width {}", d.shared),
                    format!("width {}", s.width),
                ));
            }
        }
        for (index, e) in self.experts.iter().enumerate() {
            if e.width != d.intermediate {
                return Err(mismatch(
                    format!("mlp.experts.{index}"),
                    format!("width {}", d.intermediate),
                    format!("width {}", e.width),
                ));
            }
        }
        // Walk the tensors the layer needs in order, comparing with ours.
        let mut needed = std::collections::HashSet::new();
        let result: Result<LayerWeights, WeightsError> = build(layer, &d, |spec| {
            let name = spec.tensor.hf_name();
            match self.get(spec.tensor) {
                None => Err(mismatch(
                    name,
                    format!("a tensor of shape {:?}", spec.shape),
                    "none".to_string(),
                )),
                Some(v) if v.len() != spec.len() => Err(mismatch(
                    name,
                    format!("{} values (shape {:?})", spec.len(), spec.shape),
                    format!("{} values", v.len()),
                )),
                Some(_) => {
                    needed.insert(name);
                    Ok(Vec::new())
                }
            }
        });
        result?;
        // And the reverse: nothing the layer does not have.
        for (name, _, _) in self.tensors() {
            if !needed.contains(&name) {
                return Err(mismatch(
                    name,
                    "no such tensor (the layer does not have it)".to_string(),
                    "one".to_string(),
                ));
            }
        }
        Ok(())
    }

    /// Every tensor with its Hugging Face name (no prefix) and shape, in a
    /// fixed order: `mlp.gate.weight`, `mlp.gate.bias` (the logit bias),
    /// `mlp.gate.e_score_correction_bias`,
    /// each expert's `gate_proj`, `up_proj`, `down_proj` (weight, then bias),
    /// the shared experts' likewise under `mlp.shared_experts.`, and
    /// `mlp.shared_expert_gate.weight` (`[1, hidden]`). Absent tensors are
    /// skipped.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let h = self.hidden;
        let mut out: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        let rows = |v: &[f32]| v.len().checked_div(h).unwrap_or(0);
        out.push((
            Tensor::Router.hf_name(),
            vec![rows(&self.router), h],
            &self.router,
        ));
        if let Some(b) = &self.router_logit_bias {
            out.push((Tensor::RouterLogitBias.hf_name(), vec![b.len()], b));
        }
        if let Some(b) = &self.router_bias {
            out.push((Tensor::RouterBias.hf_name(), vec![b.len()], b));
        }
        for (index, e) in self.experts.iter().enumerate() {
            push_ffn(&mut out, h, e, |proj, bias| Tensor::Expert {
                index,
                proj,
                bias,
            });
        }
        if let Some(s) = &self.shared {
            push_ffn(&mut out, h, s, |proj, bias| Tensor::Shared { proj, bias });
        }
        if let Some(g) = &self.shared_gate {
            out.push((Tensor::SharedGate.hf_name(), vec![1, g.len()], g));
        }
        out
    }

    /// The values of one tensor, when present.
    fn get(&self, tensor: Tensor) -> Option<&[f32]> {
        fn ffn(f: &Ffn, proj: Proj, bias: bool) -> Option<&[f32]> {
            match (proj, bias) {
                (Proj::Gate, false) => f.gate.as_deref(),
                (Proj::Gate, true) => f.gate_bias.as_deref(),
                (Proj::Up, false) => Some(&f.up),
                (Proj::Up, true) => f.up_bias.as_deref(),
                (Proj::Down, false) => Some(&f.down),
                (Proj::Down, true) => f.down_bias.as_deref(),
            }
        }
        match tensor {
            Tensor::Router => Some(&self.router),
            Tensor::RouterLogitBias => self.router_logit_bias.as_deref(),
            Tensor::RouterBias => self.router_bias.as_deref(),
            Tensor::Expert { index, proj, bias } => {
                self.experts.get(index).and_then(|f| ffn(f, proj, bias))
            }
            Tensor::Shared { proj, bias } => self.shared.as_ref().and_then(|f| ffn(f, proj, bias)),
            Tensor::SharedGate => self.shared_gate.as_deref(),
        }
    }
}

fn push_ffn<'a>(
    out: &mut Vec<(String, Vec<usize>, &'a [f32])>,
    h: usize,
    f: &'a Ffn,
    tensor: impl Fn(Proj, bool) -> Tensor,
) {
    let w = f.width;
    if let Some(g) = &f.gate {
        out.push((tensor(Proj::Gate, false).hf_name(), vec![w, h], g));
    }
    if let Some(b) = &f.gate_bias {
        out.push((tensor(Proj::Gate, true).hf_name(), vec![b.len()], b));
    }
    out.push((tensor(Proj::Up, false).hf_name(), vec![w, h], &f.up));
    if let Some(b) = &f.up_bias {
        out.push((tensor(Proj::Up, true).hf_name(), vec![b.len()], b));
    }
    out.push((tensor(Proj::Down, false).hf_name(), vec![h, w], &f.down));
    if let Some(b) = &f.down_bias {
        out.push((tensor(Proj::Down, true).hf_name(), vec![b.len()], b));
    }
}

/// Which layer of a checkpoint to read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Select {
    /// The layer whose tensor names start with this prefix.
    Prefix(String),
    /// MoE layer `N`, its prefix found in the checkpoint.
    Layer(u64),
}

/// [`LayerWeights::load`] or [`LayerWeights::load_layer`], with what the
/// load found and converted (for a tool to report).
pub fn load_checkpoint(
    path: &std::path::Path,
    layer: &LayerConfig,
    select: &Select,
) -> Result<(LayerWeights, LoadReport), WeightsError> {
    match select {
        Select::Prefix(prefix) => layout::load(path, layer, prefix),
        Select::Layer(number) => layout::load_layer(path, layer, *number),
    }
}

/// The layer's dtype, when it is one weights can be stored in.
pub(crate) fn storage_dtype(layer: &LayerConfig) -> Result<DType, WeightsError> {
    match layer.dtype {
        DType::F32 | DType::Bf16 | DType::F16 => Ok(layer.dtype),
        other => Err(WeightsError::Layer {
            layer: layer.name.clone(),
            detail: format!(
                "dtype {} is not a weight storage dtype (f32, bf16 or f16)",
                other.name()
            ),
        }),
    }
}
