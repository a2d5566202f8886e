//! Where a checkpoint keeps one MoE block's tensors, under which names and in
//! which layout, as each model family's checkpoints are written.
//!
//! The family is recognised by the router's name under the layer's prefix
//! (the first of [`ROUTERS`] present), so a checkpoint loads as it was saved,
//! without renaming:
//!
//! | family | router | routed experts |
//! | --- | --- | --- |
//! | DeepSeek, Qwen, GLM, OLMoE (per expert) | `mlp.gate.weight` | `mlp.experts.{e}.{gate,up,down}_proj.weight`, `[out, in]` |
//! | transformers 5, fused | `mlp.gate.weight` | `mlp.experts.gate_up_proj` `[E, 2F, H]` (gate = rows `0..F`), `mlp.experts.down_proj` `[E, H, F]`; in fp8 with `*_scale_inv` `[E, ⌈out/128⌉, ⌈in/128⌉]` |
//! | Mixtral | `block_sparse_moe.gate.weight` | `block_sparse_moe.experts.{e}.w1/w3/w2.weight` (gate/up/down) |
//! | gpt-oss | `mlp.router.weight` (+ `mlp.router.bias`) | `mlp.experts.gate_up_proj` `[E, H, 2F]`, gate = columns `0::2`, up = `1::2`; `gate_up_proj_bias` `[E, 2F]` likewise; `down_proj` `[E, F, H]`, `down_proj_bias` `[E, H]`; or MXFP4 `*_blocks` + `*_scales` |
//! | Llama-4 | `feed_forward.router.weight` | `feed_forward.experts.gate_up_proj` `[E, H, 2F]`, gate = columns `0..F`; `down_proj` `[E, F, H]` |
//! | Switch Transformers | `mlp.router.classifier.weight` | `mlp.experts.expert_{e}.wi.weight` (up), `.wo.weight` (down) |
//! | Jamba | `feed_forward.router.weight` | `feed_forward.experts.{e}.{gate,up,down}_proj.weight` |
//! | Granite MoE | `block_sparse_moe.router.layer.weight` | `block_sparse_moe.input_linear.weight` `[E, 2F, H]` (gate = rows `0..F`), `output_linear.weight` `[E, H, F]` |
//! | DBRX | `ffn.router.layer.weight` | `ffn.experts.mlp.w1` (gate), `v1` (up) `[E*F, H]`, `w2` `[E*F, H]` (down, input-major) |
//!
//! Shared experts are `mlp.shared_experts.*` (DeepSeek, GLM, ERNIE),
//! `mlp.shared_expert.*` with `mlp.shared_expert_gate.weight` (Qwen2-MoE,
//! Qwen3-Next) and `feed_forward.shared_expert.*` (Llama-4). The selection
//! bias is `mlp.gate.e_score_correction_bias` (DeepSeek, GLM) or
//! `mlp.moe_statics.e_score_correction_bias` `[1, E]` (ERNIE-4.5). A per-expert or shared `Linear`
//! stored in fp8 e4m3 with its `weight_scale_inv` is dequantised at load
//! ([`super::quant`]), as is gpt-oss's MXFP4.
//!
//! Fused tensors are read one expert at a time (one slab of the leading
//! dimension), so a layer costs one expert's tensor in memory beside the
//! result.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::load::{finish, finish_named, Checkpoint, Decode, Stored};
use super::quant;
use super::{build, storage_dtype, Dims, LayerWeights, Proj, Tensor, WeightsError};
use crate::plan::LayerConfig;

/// How a checkpoint names and lays out an MoE block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// One `[out, in]` tensor per expert projection under `mlp.experts.{e}.`
    /// (DeepSeek, Qwen, GLM, OLMoE; also what transformers 5 saves by default).
    PerExpert,
    /// transformers 5's in-memory layout, saved with
    /// `save_pretrained(save_original_format=False)`: `[E, 2F, H]` and
    /// `[E, H, F]` fused tensors, output-major, gate before up.
    Transformers5Fused,
    /// Mixtral: `block_sparse_moe`, experts `w1` (gate), `w3` (up), `w2` (down).
    Mixtral,
    /// gpt-oss: fused, input-major, gate and up interleaved; biases; MXFP4.
    GptOss,
    /// Llama-4: fused, input-major, gate then up; `feed_forward.`.
    Llama4,
    /// Switch Transformers: `mlp.router.classifier`, experts `wi`/`wo`.
    Switch,
    /// Jamba: per-expert tensors under `feed_forward`.
    Jamba,
    /// Granite MoE: fused `input_linear`/`output_linear`, output-major.
    Granite,
    /// DBRX: `w1`/`v1`/`w2` of all experts stacked as `[E*F, H]`.
    Dbrx,
}

impl Family {
    /// How the book and `moec run` name the layout.
    pub fn describe(self) -> &'static str {
        match self {
            Family::PerExpert => "per-expert tensors (mlp.experts.{e}.*_proj)",
            Family::Transformers5Fused => {
                "transformers 5 fused experts (mlp.experts.gate_up_proj [E, 2F, H])"
            }
            Family::Mixtral => "Mixtral (block_sparse_moe.experts.{e}.w1/w3/w2)",
            Family::GptOss => "gpt-oss fused experts (gate/up interleaved, input-major)",
            Family::Llama4 => "Llama-4 fused experts (gate then up, input-major)",
            Family::Switch => "Switch Transformers (mlp.experts.expert_{e}.wi/wo)",
            Family::Jamba => "Jamba (feed_forward.experts.{e}.*_proj)",
            Family::Granite => "Granite MoE fused experts (input_linear [E, 2F, H])",
            Family::Dbrx => "DBRX stacked experts (ffn.experts.mlp.w1/v1/w2 [E*F, H])",
        }
    }
}

/// The router names that identify each family, in the order they are tried.
/// `mlp.gate.weight` is refined to [`Family::Transformers5Fused`] when the
/// experts are fused, `feed_forward.router.weight` to [`Family::Jamba`] when
/// they are not.
pub(crate) const ROUTERS: [(&str, Family); 7] = [
    ("mlp.gate.weight", Family::PerExpert),
    ("block_sparse_moe.gate.weight", Family::Mixtral),
    ("mlp.router.weight", Family::GptOss),
    ("feed_forward.router.weight", Family::Llama4),
    ("mlp.router.classifier.weight", Family::Switch),
    ("block_sparse_moe.router.layer.weight", Family::Granite),
    ("ffn.router.layer.weight", Family::Dbrx),
];

/// Path components after which a checkpoint numbers its layers
/// (`model.layers.3.`, `encoder.block.1.layer.1.`, `transformer.h.0.`).
const LAYER_LISTS: [&str; 4] = ["layers", "block", "blocks", "h"];

/// What loading did beside reading: where the layer was and what was
/// converted, for the caller to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// The prefix of the layer's tensor names.
    pub prefix: String,
    /// How the checkpoint laid the block out.
    pub family: Family,
    /// Matrices dequantised on the CPU, by format (one per expert of a
    /// fused tensor).
    pub dequantised: BTreeMap<&'static str, usize>,
}

/// How [`LoadReport::dequantised`] names what it counts: one per matrix.
const FP8_FORMAT: &str = "fp8 e4m3 matrices (128x128 block scales)";
const MXFP4_FORMAT: &str = "MXFP4 expert matrices (an e8m0 scale per 32 values)";

/// The module and names of one family, with the per-checkpoint variants.
struct Layout {
    family: Family,
    /// `mlp`, `block_sparse_moe` or `feed_forward`.
    module: &'static str,
    /// `shared_experts` (DeepSeek), `shared_expert` (Qwen2-MoE, Llama-4).
    shared: &'static str,
    /// The experts have a gate (SwiGLU): Switch's gated variant is `wi_0`/`wi_1`.
    gated: bool,
}

/// Routed experts stored together, by name under the module.
#[derive(Clone, Copy)]
enum Stacked {
    /// A `gate_up` tensor `[E, 2F, H]` (or `[E, H, 2F]` input-major, paired
    /// as `pairing` says) and a `down` tensor `[E, H, F]` (or `[E, F, H]`);
    /// biases, when the layer has them, are `{gate_up}_bias` `[E, 2F]` and
    /// `{down}_bias` `[E, H]`.
    Fused {
        gate_up: &'static str,
        down: &'static str,
        input_major: bool,
        pairing: Pairing,
    },
    /// DBRX: `gate` and `up` `[E*F, H]` (expert `e`'s `[F, H]` at rows
    /// `e*F..`), `down` `[E*F, H]` input-major (expert `e`'s `[F, H]`).
    Split {
        gate: &'static str,
        up: &'static str,
        down: &'static str,
    },
}

/// How a fused `gate_up` tensor orders its `2F` outputs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pairing {
    /// gate = outputs `0::2`, up = `1::2` (gpt-oss).
    Interleaved,
    /// gate = outputs `0..F`, up = `F..2F` (Llama-4, transformers 5).
    Concatenated,
}

impl Layout {
    fn of(family: Family, ck: &Checkpoint, prefix: &str, gated: bool) -> Layout {
        let module = match family {
            Family::Mixtral | Family::Granite => "block_sparse_moe",
            Family::Llama4 | Family::Jamba => "feed_forward",
            Family::Dbrx => "ffn",
            _ => "mlp",
        };
        let singular = ck.contains(&format!("{prefix}{module}.shared_expert.up_proj.weight"))
            && !ck.contains(&format!("{prefix}{module}.shared_experts.up_proj.weight"));
        let shared = if family == Family::Llama4 || singular {
            "shared_expert"
        } else {
            "shared_experts"
        };
        Layout {
            family,
            module,
            shared,
            gated,
        }
    }

    /// How the routed experts are stored when they are not one tensor per
    /// expert and projection.
    fn experts(&self) -> Option<Stacked> {
        let fused = |gate_up, down, input_major, pairing| {
            Some(Stacked::Fused {
                gate_up,
                down,
                input_major,
                pairing,
            })
        };
        match self.family {
            Family::GptOss => fused(
                "experts.gate_up_proj",
                "experts.down_proj",
                true,
                Pairing::Interleaved,
            ),
            Family::Llama4 => fused(
                "experts.gate_up_proj",
                "experts.down_proj",
                true,
                Pairing::Concatenated,
            ),
            Family::Transformers5Fused => fused(
                "experts.gate_up_proj",
                "experts.down_proj",
                false,
                Pairing::Concatenated,
            ),
            Family::Granite => fused(
                "input_linear.weight",
                "output_linear.weight",
                false,
                Pairing::Concatenated,
            ),
            Family::Dbrx => Some(Stacked::Split {
                gate: "experts.mlp.w1",
                up: "experts.mlp.v1",
                down: "experts.mlp.w2",
            }),
            _ => None,
        }
    }

    fn router(&self) -> &'static str {
        let index = match self.family {
            Family::PerExpert | Family::Transformers5Fused => 0,
            Family::Mixtral => 1,
            Family::GptOss => 2,
            Family::Llama4 | Family::Jamba => 3,
            Family::Switch => 4,
            Family::Granite => 5,
            Family::Dbrx => 6,
        };
        ROUTERS[index].0
    }

    /// The name of a tensor that is stored on its own (everything but fused
    /// experts), without the prefix.
    fn suffix(&self, tensor: Tensor) -> String {
        let module = self.module;
        let param = |bias: bool| if bias { "bias" } else { "weight" };
        match tensor {
            Tensor::Router => self.router().to_string(),
            Tensor::RouterLogitBias => {
                format!("{}.bias", self.router().trim_end_matches(".weight"))
            }
            Tensor::RouterBias => format!(
                "{}.e_score_correction_bias",
                self.router().trim_end_matches(".weight")
            ),
            Tensor::Expert { index, proj, bias } => {
                let proj = match (self.family, proj) {
                    (Family::Mixtral, Proj::Gate) => "w1",
                    (Family::Mixtral, Proj::Up) => "w3",
                    (Family::Mixtral, Proj::Down) => "w2",
                    (Family::Switch, Proj::Gate) => "wi_0",
                    (Family::Switch, Proj::Up) if self.gated => "wi_1",
                    (Family::Switch, Proj::Up) => "wi",
                    (Family::Switch, Proj::Down) => "wo",
                    (_, p) => p.hf(),
                };
                let expert = match self.family {
                    Family::Switch => format!("expert_{index}"),
                    _ => index.to_string(),
                };
                format!("{module}.experts.{expert}.{proj}.{}", param(bias))
            }
            Tensor::Shared { proj, bias } => {
                format!("{module}.{}.{}.{}", self.shared, proj.hf(), param(bias))
            }
            Tensor::SharedGate => format!("{module}.shared_expert_gate.weight"),
        }
    }
}

/// Which family's router is under `prefix`, if any.
fn detect(ck: &Checkpoint, prefix: &str) -> Option<Family> {
    let (_, family) = ROUTERS
        .iter()
        .find(|(router, _)| ck.contains(&format!("{prefix}{router}")))?;
    let fused = |module: &str| ck.contains(&format!("{prefix}{module}.experts.gate_up_proj"));
    Some(match family {
        Family::PerExpert if fused("mlp") => Family::Transformers5Fused,
        Family::Llama4 if !fused("feed_forward") => Family::Jamba,
        f => *f,
    })
}

/// The layer number in a prefix: the component after the last of
/// [`LAYER_LISTS`] (`model.layers.3.` -> 3, `encoder.block.1.layer.1.` -> 1).
fn layer_number(prefix: &str) -> Option<u64> {
    let parts: Vec<&str> = prefix.split('.').collect();
    (0..parts.len().saturating_sub(1))
        .rev()
        .find(|&i| LAYER_LISTS.contains(&parts[i]) && parts[i + 1].parse::<u64>().is_ok())
        .and_then(|i| parts[i + 1].parse().ok())
}

/// Every MoE block in the checkpoint: prefix by layer number.
fn moe_blocks(ck: &Checkpoint) -> BTreeMap<u64, BTreeSet<String>> {
    let mut blocks: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for name in ck.names() {
        for (router, _) in ROUTERS {
            let Some(prefix) = name.strip_suffix(router) else {
                continue;
            };
            if !(prefix.is_empty() || prefix.ends_with('.')) {
                continue;
            }
            if let Some(n) = layer_number(prefix) {
                blocks.entry(n).or_default().insert(prefix.to_string());
            }
        }
    }
    blocks
}

/// A list of layer numbers as runs: `0-23`, `1, 3, 5` (at most eight shown).
fn runs(numbers: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let mut j = i;
        while j + 1 < numbers.len() && numbers[j + 1] == numbers[j] + 1 {
            j += 1;
        }
        parts.push(if j > i + 1 {
            format!("{}-{}", numbers[i], numbers[j])
        } else if j == i + 1 {
            format!("{}, {}", numbers[i], numbers[j])
        } else {
            numbers[i].to_string()
        });
        i = j + 1;
    }
    if parts.len() > 8 {
        let more = parts.len() - 8;
        parts.truncate(8);
        format!("{} and {more} more", parts.join(", "))
    } else {
        parts.join(", ")
    }
}

/// The prefix of MoE layer `number`: the one block whose router's prefix
/// numbers it so. An error lists the names looked for and the MoE layers
/// the checkpoint has.
pub(crate) fn layer_prefix(ck: &Checkpoint, number: u64) -> Result<String, WeightsError> {
    let blocks = moe_blocks(ck);
    match blocks.get(&number) {
        Some(prefixes) if prefixes.len() == 1 => {
            Ok(prefixes.iter().next().cloned().unwrap_or_default())
        }
        Some(prefixes) => Err(WeightsError::AmbiguousLayer {
            file: ck.origin().to_path_buf(),
            layer: number,
            prefixes: prefixes.iter().cloned().collect(),
        }),
        None => {
            let dense = ck.names().any(|n| {
                n.contains(&format!("layers.{number}.")) || n.contains(&format!("block.{number}."))
            });
            let found: Vec<u64> = blocks.keys().copied().collect();
            Err(WeightsError::NoLayer {
                file: ck.origin().to_path_buf(),
                layer: number,
                looked_for: ROUTERS
                    .iter()
                    .map(|(router, _)| router.to_string())
                    .collect(),
                found: if found.is_empty() {
                    "the checkpoint has no MoE router at all".to_string()
                } else if dense {
                    format!(
                        "layer {number} has no router (a dense layer?); the MoE layers are {}",
                        runs(&found)
                    )
                } else {
                    format!("the MoE layers are {}", runs(&found))
                },
            })
        }
    }
}

/// Where routers are under other prefixes than the one given, for an error:
/// an example name and up to three prefixes.
fn router_hint(ck: &Checkpoint, prefix: &str) -> Option<String> {
    let mut found: BTreeMap<String, String> = BTreeMap::new();
    for name in ck.names() {
        for (router, _) in ROUTERS {
            if let Some(p) = name.strip_suffix(router) {
                if (p.is_empty() || p.ends_with('.')) && p != prefix {
                    found.insert(p.to_string(), name.clone());
                }
            }
        }
    }
    let (_, example) = found.iter().next()?;
    let shown: Vec<String> = found.keys().take(3).map(|p| format!("`{p}`")).collect();
    let more = match found.len().saturating_sub(3) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Some(format!(
        "the checkpoint has `{example}`: MoE blocks under prefix {}{more} (prefix given: `{prefix}`)",
        shown.join(", ")
    ))
}

/// Reads one layer's weights from an open checkpoint.
pub(crate) fn load_from(
    ck: &mut Checkpoint,
    layer: &LayerConfig,
    prefix: &str,
) -> Result<(LayerWeights, LoadReport), WeightsError> {
    let dtype = storage_dtype(layer)?;
    let d = Dims::of(layer)?;
    let Some(family) = detect(ck, prefix) else {
        return Err(WeightsError::NoMoeBlock {
            file: ck.origin().to_path_buf(),
            looked_for: ROUTERS
                .iter()
                .map(|(router, _)| format!("{prefix}{router}"))
                .collect(),
            hint: router_hint(ck, prefix),
        });
    };
    let layout = Layout::of(family, ck, prefix, layer.ffn.gated());
    if layout.experts().is_some() && !layout.gated {
        return Err(WeightsError::Unsupported {
            file: ck.origin().to_path_buf(),
            tensor: format!("{prefix}{}.experts", layout.module),
            detail: format!(
                "a {} checkpoint has gated (SwiGLU) experts, but the layer's experts are {}",
                family.describe(),
                layer.ffn.name()
            ),
        });
    }
    let mut reader = Reader {
        ck,
        prefix,
        layout,
        experts: d.experts,
        cache: None,
        report: LoadReport {
            prefix: prefix.to_string(),
            family,
            dequantised: BTreeMap::new(),
        },
    };
    if !layer.router.logit_bias {
        reader.check_router_logit_bias()?;
    }
    let weights = build(layer, &d, |spec| {
        let decode = Decode {
            round: spec.tensor.rounded().then_some(dtype),
            finite: true,
        };
        reader.tensor(spec.tensor, &spec.shape, &d, decode)
    })?;
    Ok((weights, reader.report))
}

/// Reads the tensors of one layout, remembering the last fused expert.
struct Reader<'a> {
    ck: &'a mut Checkpoint,
    prefix: &'a str,
    layout: Layout,
    /// The layer's expert count, which fused tensors lead with.
    experts: usize,
    /// The last fused `gate_up` matrix read: (name, expert, `[2F, H]` values).
    cache: Option<(String, usize, Vec<f32>)>,
    report: LoadReport,
}

impl Reader<'_> {
    fn origin(&self) -> PathBuf {
        self.ck.origin().to_path_buf()
    }

    fn missing(&self, name: String, hint: Option<String>) -> WeightsError {
        WeightsError::Missing {
            file: self.origin(),
            tensor: name,
            hint,
        }
    }

    fn counted(&mut self, format: &'static str) {
        *self.report.dequantised.entry(format).or_insert(0) += 1;
    }

    /// A router bias in the checkpoint when the layer has no `logit_bias`:
    /// a nonzero one is refused rather than dropped, since dropping it
    /// changes which experts are chosen.
    fn check_router_logit_bias(&mut self) -> Result<(), WeightsError> {
        let name = format!(
            "{}{}",
            self.prefix,
            self.layout.router().replace(".weight", ".bias")
        );
        let Some(stored) = self.ck.stored(&name)? else {
            return Ok(());
        };
        let bytes = self.ck.bytes(&stored, None)?;
        let values = stored.widen(&bytes)?;
        if let Some(index) = values.iter().position(|v| *v != 0.0) {
            return Err(WeightsError::Unsupported {
                file: stored.file.clone(),
                tensor: name,
                detail: format!(
                    "the router adds a bias to its logits (value {} at index {index}), but the \
                     layer has no `logit_bias = true`; dropping the bias would change which \
                     experts are chosen",
                    values[index]
                ),
            });
        }
        Ok(())
    }

    fn tensor(
        &mut self,
        tensor: Tensor,
        shape: &[usize],
        d: &Dims,
        decode: Decode,
    ) -> Result<Vec<f32>, WeightsError> {
        if let (Tensor::Expert { index, proj, bias }, Some(stacked)) =
            (tensor, self.layout.experts())
        {
            let part = ExpertPart { index, proj, bias };
            return match stacked {
                Stacked::Fused {
                    gate_up,
                    down,
                    input_major,
                    pairing,
                } => {
                    let names = FusedNames {
                        gate_up,
                        down,
                        input_major,
                        pairing,
                    };
                    self.fused_expert(part, &names, d, decode)
                }
                Stacked::Split { gate, up, down } => {
                    self.split_expert(part, [gate, up, down], d, decode)
                }
            };
        }
        let name = format!("{}{}", self.prefix, self.layout.suffix(tensor));
        match self.linear(&name, shape, decode)? {
            Some(v) => Ok(v),
            None if tensor == Tensor::RouterBias => self.moe_statics_bias(name, shape, decode),
            None => {
                let hint =
                    router_hint(self.ck, self.prefix).filter(|_| matches!(tensor, Tensor::Router));
                Err(self.missing(name, hint))
            }
        }
    }

    /// A tensor stored on its own, in a float dtype or as fp8 e4m3 with
    /// block scales in `{name}_scale_inv`.
    fn linear(
        &mut self,
        name: &str,
        shape: &[usize],
        decode: Decode,
    ) -> Result<Option<Vec<f32>>, WeightsError> {
        let Some(stored) = self.ck.stored(name)? else {
            return Ok(None);
        };
        stored.expect_shape(shape)?;
        let bytes = self.ck.bytes(&stored, None)?;
        let values = stored.widen(&bytes)?;
        let values = if stored.dtype() == Dtype::F8_E4M3 {
            self.scale_fp8(&stored, &bytes)?
        } else {
            values
        };
        finish(&stored, values, decode).map(Some)
    }

    /// Dequantises the fp8 codes of `stored` (`[rows, cols]`) with its
    /// `weight_scale_inv`.
    fn scale_fp8(&mut self, stored: &Stored, codes: &[u8]) -> Result<Vec<f32>, WeightsError> {
        let &[rows, cols] = stored.shape() else {
            return Err(stored.dtype_error());
        };
        self.dequant_fp8(stored, codes, rows, cols, None)
    }

    /// Dequantises `codes`, the `[rows, cols]` fp8 values of `stored` (or of
    /// its expert `slab`), with the block scales of `{name}_scale_inv`
    /// (`[⌈rows/128⌉, ⌈cols/128⌉]`, with a leading expert dimension for a
    /// fused tensor).
    fn dequant_fp8(
        &mut self,
        stored: &Stored,
        codes: &[u8],
        rows: usize,
        cols: usize,
        slab: Option<(usize, usize)>,
    ) -> Result<Vec<f32>, WeightsError> {
        let scale_name = format!("{}_scale_inv", stored.name);
        let Some(scale) = self.ck.stored(&scale_name)? else {
            return Err(self.missing(
                scale_name,
                Some(format!(
                    "`{}` is fp8 e4m3, whose values need their block scales",
                    stored.name
                )),
            ));
        };
        let grid = quant::fp8_scale_shape(rows, cols);
        let expected: Vec<usize> = match slab {
            Some((_, experts)) => vec![experts, grid[0], grid[1]],
            None => grid.to_vec(),
        };
        scale.expect_shape(&expected)?;
        if !matches!(scale.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(scale.dtype_error());
        }
        let scale_bytes = self.ck.bytes(&scale, slab)?;
        let scales = finish(
            &scale,
            scale.widen(&scale_bytes)?,
            Decode {
                round: None,
                finite: true,
            },
        )?;
        self.counted(FP8_FORMAT);
        quant::dequant_fp8_blocks(codes, &scales, rows, cols).map_err(|index| {
            WeightsError::NotFinite {
                file: stored.file.clone(),
                tensor: stored.name.clone(),
                index: slab.map_or(0, |(e, _)| e * rows * cols) + index,
                value: f64::NAN,
                rounded_to: None,
            }
        })
    }

    /// ERNIE-4.5 keeps the selection bias as `moe_statics.e_score_correction_bias`
    /// `[1, E]`; `name` is the usual name, reported when neither exists.
    fn moe_statics_bias(
        &mut self,
        name: String,
        shape: &[usize],
        decode: Decode,
    ) -> Result<Vec<f32>, WeightsError> {
        let ernie = format!(
            "{}{}.moe_statics.e_score_correction_bias",
            self.prefix, self.layout.module
        );
        let row: Vec<usize> = std::iter::once(1).chain(shape.iter().copied()).collect();
        match self.linear(&ernie, &row, decode)? {
            Some(v) => Ok(v),
            None => Err(self.missing(name, Some(format!("nor ERNIE-4.5's `{ernie}`")))),
        }
    }

    /// One routed expert's projection or bias from fused tensors.
    fn fused_expert(
        &mut self,
        part: ExpertPart,
        names: &FusedNames,
        d: &Dims,
        decode: Decode,
    ) -> Result<Vec<f32>, WeightsError> {
        let ExpertPart { index, proj, bias } = part;
        let (f, h) = (d.intermediate, d.hidden);
        let base = format!("{}{}.", self.prefix, self.layout.module);
        let gate_up = format!("{base}{}", names.gate_up);
        let down = format!("{base}{}", names.down);
        let shown = format!(
            "{}{} (expert {index}'s {})",
            if proj == Proj::Down { &down } else { &gate_up },
            if bias { "_bias" } else { "" },
            part.what()
        );
        let values = match (proj, bias) {
            (Proj::Down, false) => self.fused_matrix(&down, index, h, f, names.input_major)?,
            (Proj::Down, true) => self.fused_vector(&format!("{down}_bias"), index, h)?,
            (_, false) => {
                let matrix = match &self.cache {
                    Some((n, e, m)) if *n == gate_up && *e == index => m.clone(),
                    _ => {
                        let m = self.fused_matrix(&gate_up, index, 2 * f, h, names.input_major)?;
                        self.cache = Some((gate_up, index, m.clone()));
                        m
                    }
                };
                pick_rows(&matrix, h, f, proj, names.pairing)
            }
            (_, true) => {
                let v = self.fused_vector(&format!("{gate_up}_bias"), index, 2 * f)?;
                pick_rows(&v, 1, f, proj, names.pairing)
            }
        };
        finish_named(&self.origin(), &shown, values, decode)
    }

    /// One routed expert's projection from DBRX's stacked `[E*F, H]` tensors
    /// `[gate, up, down]` (no biases).
    fn split_expert(
        &mut self,
        part: ExpertPart,
        names: [&str; 3],
        d: &Dims,
        decode: Decode,
    ) -> Result<Vec<f32>, WeightsError> {
        let ExpertPart { index, proj, bias } = part;
        let (f, h) = (d.intermediate, d.hidden);
        let which = match proj {
            Proj::Gate => 0,
            Proj::Up => 1,
            Proj::Down => 2,
        };
        let name = format!("{}{}.{}", self.prefix, self.layout.module, names[which]);
        if bias {
            return Err(self.missing(
                format!("{name}_bias"),
                Some("DBRX experts have no biases".to_string()),
            ));
        }
        let Some(stored) = self.ck.stored(&name)? else {
            return Err(self.missing(name, None));
        };
        let rows = d
            .experts
            .checked_mul(f)
            .ok_or_else(|| WeightsError::Layer {
                layer: name.clone(),
                detail: "experts * intermediate overflows".to_string(),
            })?;
        stored.expect_shape(&[rows, h])?;
        let slab = self.ck.bytes(&stored, Some((index, d.experts)))?;
        let values = stored.widen(&slab)?;
        // w1 and v1 hold expert e's [F, H] as a Linear would; w2 is its down
        // projection input-major.
        let values = if proj == Proj::Down {
            transpose(&values, f, h)
        } else {
            values
        };
        let shown = format!("{name} (expert {index}'s {})", part.what());
        finish_named(&self.origin(), &shown, values, decode)
    }

    /// Expert `index`'s `[out, in]` matrix from a fused `[E, in, out]`
    /// (input-major) or `[E, out, in]` tensor, or from its MXFP4 blocks.
    fn fused_matrix(
        &mut self,
        name: &str,
        index: usize,
        out: usize,
        inn: usize,
        input_major: bool,
    ) -> Result<Vec<f32>, WeightsError> {
        let experts = self.experts;
        if let Some(stored) = self.ck.stored(name)? {
            let shape = if input_major {
                [experts, inn, out]
            } else {
                [experts, out, inn]
            };
            stored.expect_shape(&shape)?;
            let slab = self.ck.bytes(&stored, Some((index, experts)))?;
            if stored.dtype() == Dtype::F8_E4M3 {
                // transformers' fp8 experts (`FP8Experts`) are output-major,
                // with `{name}_scale_inv` `[E, ⌈out/128⌉, ⌈in/128⌉]`.
                if input_major {
                    return Err(WeightsError::Unsupported {
                        file: stored.file.clone(),
                        tensor: stored.name.clone(),
                        detail: "fp8 weights of an input-major fused tensor are a layout moec \
                                 does not know (block scales are defined on [out, in])"
                            .to_string(),
                    });
                }
                return self.dequant_fp8(&stored, &slab, out, inn, Some((index, experts)));
            }
            let values = stored.widen(&slab)?;
            return Ok(if input_major {
                transpose(&values, inn, out)
            } else {
                values
            });
        }
        let blocks_name = format!("{name}_blocks");
        let Some(blocks) = self.ck.stored(&blocks_name)? else {
            return Err(self.missing(
                name.to_string(),
                Some(format!("nor its MXFP4 form `{blocks_name}`")),
            ));
        };
        let scales_name = format!("{name}_scales");
        let Some(scales) = self.ck.stored(&scales_name)? else {
            return Err(self.missing(
                scales_name,
                Some(format!(
                    "`{blocks_name}` is MXFP4, whose values need their scales"
                )),
            ));
        };
        if inn % quant::MXFP4_BLOCK != 0 {
            return Err(WeightsError::Unsupported {
                file: blocks.file.clone(),
                tensor: blocks_name,
                detail: format!(
                    "MXFP4 packs the input dimension in blocks of {}, which {inn} is not a multiple of",
                    quant::MXFP4_BLOCK
                ),
            });
        }
        let groups = inn / quant::MXFP4_BLOCK;
        blocks.expect_shape(&[experts, out, groups, quant::MXFP4_BLOCK_BYTES])?;
        scales.expect_shape(&[experts, out, groups])?;
        for t in [&blocks, &scales] {
            if t.dtype() != Dtype::U8 {
                return Err(WeightsError::Dtype {
                    file: t.file.clone(),
                    tensor: t.name.clone(),
                    found: format!("{:?} (MXFP4 blocks and scales are U8)", t.dtype()),
                });
            }
        }
        let block_bytes = self.ck.bytes(&blocks, Some((index, experts)))?;
        let scale_bytes = self.ck.bytes(&scales, Some((index, experts)))?;
        self.counted(MXFP4_FORMAT);
        quant::dequant_mxfp4(&block_bytes, &scale_bytes).map_err(|block| WeightsError::NotFinite {
            file: scales.file.clone(),
            tensor: scales_name.clone(),
            index: index * out * groups + block,
            value: f64::NAN,
            rounded_to: None,
        })
    }

    /// Expert `index`'s row of a fused `[E, len]` bias.
    fn fused_vector(
        &mut self,
        name: &str,
        index: usize,
        len: usize,
    ) -> Result<Vec<f32>, WeightsError> {
        let experts = self.experts;
        let Some(stored) = self.ck.stored(name)? else {
            return Err(self.missing(name.to_string(), None));
        };
        stored.expect_shape(&[experts, len])?;
        let slab = self.ck.bytes(&stored, Some((index, experts)))?;
        stored.widen(&slab)
    }
}

/// Which part of which expert a fused read is for.
#[derive(Clone, Copy)]
struct ExpertPart {
    index: usize,
    proj: Proj,
    bias: bool,
}

impl ExpertPart {
    fn what(self) -> &'static str {
        match (self.proj, self.bias) {
            (Proj::Gate, false) => "gate",
            (Proj::Up, false) => "up",
            (Proj::Down, false) => "down",
            (Proj::Gate, true) => "gate bias",
            (Proj::Up, true) => "up bias",
            (Proj::Down, true) => "down bias",
        }
    }
}

/// The names and layout of fused experts, under the module.
struct FusedNames {
    gate_up: &'static str,
    down: &'static str,
    input_major: bool,
    pairing: Pairing,
}

/// The gate's or up's `f` rows of `width` values from a `[2f, width]`
/// gate-up matrix paired as `pairing` says; down passes through.
fn pick_rows(matrix: &[f32], width: usize, f: usize, proj: Proj, pairing: Pairing) -> Vec<f32> {
    let row = |i: usize| match (pairing, proj) {
        (Pairing::Interleaved, Proj::Gate) => 2 * i,
        (Pairing::Interleaved, _) => 2 * i + 1,
        (Pairing::Concatenated, Proj::Gate) => i,
        (Pairing::Concatenated, _) => f + i,
    };
    let mut out = Vec::with_capacity(f * width);
    for i in 0..f {
        let r = row(i);
        out.extend_from_slice(&matrix[r * width..(r + 1) * width]);
    }
    out
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// Opens `path` and reads the layer under `prefix`.
pub(crate) fn load(
    path: &Path,
    layer: &LayerConfig,
    prefix: &str,
) -> Result<(LayerWeights, LoadReport), WeightsError> {
    let mut ck = Checkpoint::open(path)?;
    load_from(&mut ck, layer, prefix)
}

/// Opens `path`, finds MoE layer `number` and reads it.
pub(crate) fn load_layer(
    path: &Path,
    layer: &LayerConfig,
    number: u64,
) -> Result<(LayerWeights, LoadReport), WeightsError> {
    let mut ck = Checkpoint::open(path)?;
    let prefix = layer_prefix(&ck, number)?;
    load_from(&mut ck, layer, &prefix)
}
