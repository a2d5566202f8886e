//! Reading safetensors checkpoints: one file, or the shards of a
//! `model.safetensors.index.json`.
//!
//! Only the header of a file is parsed up front; a tensor's bytes are read
//! when it is asked for, with a seek, so loading one layer from a 5 GB shard
//! reads one layer. The header is checked against the file's length before
//! any offset is used, with checked arithmetic: a truncated or corrupt file is
//! an error, never a panic or a huge allocation.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use super::{build, round_to_dtype, storage_dtype, Dims, LayerWeights, Proj, Tensor, WeightsError};
use crate::plan::{DType, LayerConfig};

/// safetensors' own limit on the JSON header.
const MAX_HEADER: u64 = 100_000_000;

fn io(file: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        file: file.to_path_buf(),
        source,
    }
}

fn corrupt(file: &Path, detail: String) -> WeightsError {
    WeightsError::Corrupt {
        file: file.to_path_buf(),
        detail,
    }
}

/// One safetensors file: its header, and the file to read tensors from.
struct Shard {
    path: PathBuf,
    file: File,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    tensors: HashMap<String, TensorInfo>,
}

impl Shard {
    fn open(path: &Path) -> Result<Shard, WeightsError> {
        let mut file = File::open(path).map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        if len < 8 {
            return Err(corrupt(
                path,
                format!("{len} bytes, shorter than the 8-byte safetensors header length"),
            ));
        }
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(io(path))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER {
            return Err(corrupt(
                path,
                format!("header length {n} exceeds safetensors' limit of {MAX_HEADER} bytes"),
            ));
        }
        // n <= MAX_HEADER, so 8 + n cannot overflow.
        let data_start = 8 + n;
        if data_start > len {
            return Err(corrupt(
                path,
                format!(
                    "header of {n} bytes runs past the end of the {len}-byte file (truncated?)"
                ),
            ));
        }
        let header_len = usize::try_from(n)
            .map_err(|_| corrupt(path, format!("header length {n} does not fit in memory")))?;
        let mut header = vec![0u8; header_len];
        file.read_exact(&mut header).map_err(io(path))?;
        // Metadata's deserialisation checks that the tensors' offsets are
        // contiguous from 0 and that each covers exactly its shape and dtype,
        // with checked arithmetic.
        let metadata: Metadata = serde_json::from_slice(&header)
            .map_err(|e| corrupt(path, format!("safetensors header: {e}")))?;
        let data_len = u64::try_from(metadata.data_len()).unwrap_or(u64::MAX);
        let expected = data_start.checked_add(data_len);
        if expected != Some(len) {
            return Err(corrupt(
                path,
                format!(
                    "the header describes {data_len} bytes of tensor data but the file holds {} \
                     after its {data_start}-byte header (truncated?)",
                    len - data_start
                ),
            ));
        }
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Shard {
            path: path.to_path_buf(),
            file,
            data_start,
            tensors,
        })
    }

    fn bytes(&mut self, name: &str, info: &TensorInfo) -> Result<Vec<u8>, WeightsError> {
        let (start, end) = info.data_offsets;
        let bad = || {
            corrupt(
                &self.path,
                format!("tensor `{name}` has offsets {start}..{end} outside the file"),
            )
        };
        // The header check bounds every offset by the file length.
        let start = u64::try_from(start)
            .ok()
            .and_then(|s| s.checked_add(self.data_start))
            .ok_or_else(bad)?;
        let len = end.checked_sub(info.data_offsets.0).ok_or_else(bad)?;
        let mut out = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(start))
            .map_err(io(&self.path))?;
        self.file.read_exact(&mut out).map_err(io(&self.path))?;
        Ok(out)
    }
}

/// A checkpoint: which file holds each tensor, and the files opened so far.
pub(crate) struct Checkpoint {
    /// The file the caller named (a `.safetensors` file or an index).
    origin: PathBuf,
    /// Tensor name to the file holding it.
    names: HashMap<String, PathBuf>,
    shards: HashMap<PathBuf, Shard>,
}

/// How to turn stored values into the `f32` kept in memory.
#[derive(Clone, Copy)]
pub(crate) struct Decode {
    /// Round to this dtype after converting to f32.
    pub(crate) round: Option<DType>,
    /// NaN and infinities are errors.
    pub(crate) finite: bool,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, a `*.index.json` of shards, or a
    /// directory holding `model.safetensors.index.json` or `model.safetensors`.
    pub(crate) fn open(path: &Path) -> Result<Checkpoint, WeightsError> {
        if path.is_dir() {
            for name in ["model.safetensors.index.json", "model.safetensors"] {
                let candidate = path.join(name);
                if candidate.is_file() {
                    return Checkpoint::open(&candidate);
                }
            }
            return Err(WeightsError::Io {
                file: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "directory holds neither model.safetensors.index.json nor model.safetensors",
                ),
            });
        }
        if path.extension().is_some_and(|e| e == "json") {
            return Checkpoint::open_index(path);
        }
        let shard = Shard::open(path)?;
        let names = shard
            .tensors
            .keys()
            .map(|n| (n.clone(), path.to_path_buf()))
            .collect();
        Ok(Checkpoint {
            origin: path.to_path_buf(),
            names,
            shards: HashMap::from([(path.to_path_buf(), shard)]),
        })
    }

    fn open_index(path: &Path) -> Result<Checkpoint, WeightsError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| corrupt(path, format!("safetensors index: {e}")))?;
        let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(corrupt(
                path,
                "safetensors index without a `weight_map` object".to_string(),
            ));
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut names = HashMap::new();
        for (name, file) in map {
            let Some(file) = file.as_str() else {
                return Err(corrupt(
                    path,
                    format!("weight_map entry of `{name}` is not a file name"),
                ));
            };
            names.insert(name.clone(), dir.join(file));
        }
        Ok(Checkpoint {
            origin: path.to_path_buf(),
            names,
            shards: HashMap::new(),
        })
    }

    pub(crate) fn origin(&self) -> &Path {
        &self.origin
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Reads tensor `name`, which must have shape `expected`; `None` when the
    /// checkpoint has no such tensor.
    pub(crate) fn read(
        &mut self,
        name: &str,
        expected: &[usize],
        decode: Decode,
    ) -> Result<Option<Vec<f32>>, WeightsError> {
        let Some(file) = self.names.get(name) else {
            return Ok(None);
        };
        let shard = match self.shards.entry(file.clone()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let shard = Shard::open(v.key())?;
                v.insert(shard)
            }
        };
        let Some(info) = shard.tensors.get(name).cloned() else {
            return Err(corrupt(
                &shard.path,
                format!(
                    "the index {} puts tensor `{name}` in this file, which does not hold it",
                    self.origin.display()
                ),
            ));
        };
        if info.shape != expected {
            return Err(WeightsError::Shape {
                file: shard.path.clone(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: info.shape,
            });
        }
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F64 => 8,
            other => {
                return Err(WeightsError::Dtype {
                    file: shard.path.clone(),
                    tensor: name.to_string(),
                    found: format!("{other:?}"),
                })
            }
        };
        let bytes = shard.bytes(name, &info)?;
        let mut out = Vec::with_capacity(bytes.len() / width);
        for (index, c) in bytes.chunks_exact(width).enumerate() {
            let raw: f64 = match info.dtype {
                Dtype::F32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                Dtype::BF16 => f64::from(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                Dtype::F16 => f64::from(half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
                _ => f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
            };
            let v = raw as f32;
            let v = decode.round.map_or(v, |d| round_to_dtype(d, v));
            if decode.finite && !v.is_finite() {
                let rounded_to = raw
                    .is_finite()
                    .then(|| decode.round.map_or("f32", DType::name));
                return Err(WeightsError::NotFinite {
                    file: shard.path.clone(),
                    tensor: name.to_string(),
                    index,
                    value: raw,
                    rounded_to,
                });
            }
            out.push(v);
        }
        Ok(Some(out))
    }

    /// Where tensors with the same suffix as the missing `tensor` are, if the
    /// checkpoint has some under another prefix.
    fn hint(&self, prefix: &str, tensor: Tensor) -> Option<String> {
        let suffixes: Vec<String> = [Names::hf(), Names::mixtral()]
            .iter()
            .map(|n| n.suffix(tensor))
            .collect();
        let mut prefixes = BTreeSet::new();
        let mut example = None;
        for name in self.names.keys() {
            for suffix in &suffixes {
                let Some(p) = name.strip_suffix(suffix.as_str()) else {
                    continue;
                };
                if (p.is_empty() || p.ends_with('.')) && p != prefix {
                    prefixes.insert(p.to_string());
                    if example.as_ref().is_none_or(|e: &String| name < e) {
                        example = Some(name.clone());
                    }
                }
            }
        }
        let example = example?;
        let shown: Vec<String> = prefixes.iter().take(3).map(|p| format!("`{p}`")).collect();
        let more = match prefixes.len().saturating_sub(3) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Some(format!(
            "the file has `{example}`: the same tensor under prefix {}{more} (prefix given: `{prefix}`)",
            shown.join(", ")
        ))
    }
}

/// How a checkpoint names the MoE block's tensors.
struct Names {
    /// `mlp` (DeepSeek, Qwen) or `block_sparse_moe` (Mixtral).
    module: &'static str,
    /// Mixtral's `w1`/`w3`/`w2` for the experts' gate/up/down.
    mixtral: bool,
    /// `shared_experts` (DeepSeek) or `shared_expert` (Qwen2-MoE).
    shared: &'static str,
}

impl Names {
    fn hf() -> Names {
        Names {
            module: "mlp",
            mixtral: false,
            shared: "shared_experts",
        }
    }

    fn mixtral() -> Names {
        Names {
            module: "block_sparse_moe",
            mixtral: true,
            shared: "shared_experts",
        }
    }

    fn detect(ck: &Checkpoint, prefix: &str) -> Names {
        let mut names = if !ck.contains(&format!("{prefix}mlp.gate.weight"))
            && ck.contains(&format!("{prefix}block_sparse_moe.gate.weight"))
        {
            Names::mixtral()
        } else {
            Names::hf()
        };
        let module = names.module;
        if !ck.contains(&format!("{prefix}{module}.shared_experts.up_proj.weight"))
            && ck.contains(&format!("{prefix}{module}.shared_expert.up_proj.weight"))
        {
            names.shared = "shared_expert";
        }
        names
    }

    /// The name of `tensor` in this scheme, without the prefix.
    fn suffix(&self, tensor: Tensor) -> String {
        let module = self.module;
        let param = |bias: bool| if bias { "bias" } else { "weight" };
        match tensor {
            Tensor::Router => format!("{module}.gate.weight"),
            Tensor::RouterBias => format!("{module}.gate.e_score_correction_bias"),
            Tensor::Expert { index, proj, bias } => {
                let proj = match (self.mixtral, proj) {
                    (true, Proj::Gate) => "w1",
                    (true, Proj::Up) => "w3",
                    (true, Proj::Down) => "w2",
                    (false, p) => p.hf(),
                };
                format!("{module}.experts.{index}.{proj}.{}", param(bias))
            }
            Tensor::Shared { proj, bias } => {
                format!("{module}.{}.{}.{}", self.shared, proj.hf(), param(bias))
            }
            Tensor::SharedGate => format!("{module}.shared_expert_gate.weight"),
        }
    }
}

pub(crate) fn load(
    path: &Path,
    layer: &LayerConfig,
    prefix: &str,
) -> Result<LayerWeights, WeightsError> {
    let mut ck = Checkpoint::open(path)?;
    load_from(&mut ck, layer, prefix)
}

pub(crate) fn load_from(
    ck: &mut Checkpoint,
    layer: &LayerConfig,
    prefix: &str,
) -> Result<LayerWeights, WeightsError> {
    let dtype = storage_dtype(layer)?;
    let d = Dims::of(layer)?;
    let names = Names::detect(ck, prefix);
    build(layer, &d, |spec| {
        let name = format!("{prefix}{}", names.suffix(spec.tensor));
        let decode = Decode {
            round: spec.tensor.rounded().then_some(dtype),
            finite: true,
        };
        match ck.read(&name, &spec.shape, decode)? {
            Some(v) => Ok(v),
            None => Err(WeightsError::Missing {
                file: ck.origin().to_path_buf(),
                tensor: name,
                hint: ck.hint(prefix, spec.tensor),
            }),
        }
    })
}
