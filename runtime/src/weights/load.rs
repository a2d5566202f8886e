//! Reading safetensors checkpoints: one file, or the shards of a
//! `model.safetensors.index.json`.
//!
//! Only the header of a file is parsed up front; a tensor's bytes are read
//! when it is asked for, with a seek, so loading one layer from a 5 GB shard
//! reads one layer. The header is checked against the file's length before
//! any offset is used, with checked arithmetic: a truncated or corrupt file is
//! an error, never a panic or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use super::{round_to_dtype, WeightsError};
use crate::plan::DType;

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
        let mut file = crate::files::open(path).map_err(io(path))?;
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

    /// The bytes `start..end` of the data section, part of tensor `name`.
    fn bytes(&mut self, name: &str, start: usize, end: usize) -> Result<Vec<u8>, WeightsError> {
        let bad = || {
            corrupt(
                &self.path,
                format!("tensor `{name}` has offsets {start}..{end} outside the file"),
            )
        };
        // The header check bounds every offset by the file length.
        let len = end.checked_sub(start).ok_or_else(bad)?;
        let at = u64::try_from(start)
            .ok()
            .and_then(|s| s.checked_add(self.data_start))
            .ok_or_else(bad)?;
        let mut out = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(at))
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
        let text = crate::files::read_to_string(path).map_err(io(path))?;
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

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// The stored form (file, dtype, shape, offsets) of tensor `name`, opening
    /// its shard; `None` when the checkpoint has no such tensor.
    pub(crate) fn stored(&mut self, name: &str) -> Result<Option<Stored>, WeightsError> {
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
        Ok(Some(Stored {
            name: name.to_string(),
            file: shard.path.clone(),
            info,
        }))
    }

    /// The bytes of `stored`, or, with `slab = Some((index, of))`, of the
    /// `index`-th of `of` equal slabs along its first dimension (one expert
    /// of a fused `[E, ...]` tensor, or of DBRX's `[E*F, H]`).
    pub(crate) fn bytes(
        &mut self,
        stored: &Stored,
        slab: Option<(usize, usize)>,
    ) -> Result<Vec<u8>, WeightsError> {
        let Some(shard) = self.shards.get_mut(&stored.file) else {
            return Err(corrupt(
                &stored.file,
                format!("internal: shard of `{}` not open", stored.name),
            ));
        };
        let (start, end) = stored.info.data_offsets;
        let Some((index, of)) = slab else {
            return shard.bytes(&stored.name, start, end);
        };
        let rows = stored.info.shape.first().copied().unwrap_or(0);
        if index >= of || of == 0 || rows % of != 0 {
            return Err(corrupt(
                &stored.file,
                format!(
                    "internal: slab {index} of {of} of `{}` with {rows} rows",
                    stored.name
                ),
            ));
        }
        // The data is `end - start` bytes for `rows` rows; `of` divides `rows`.
        let Some(total) = end.checked_sub(start) else {
            return Err(corrupt(
                &stored.file,
                format!("tensor `{}` ends before it starts", stored.name),
            ));
        };
        let len = total / of;
        let at = start + index * len;
        shard.bytes(&stored.name, at, at + len)
    }

    /// Reads tensor `name`, which must have shape `expected` and a float
    /// dtype; `None` when the checkpoint has no such tensor.
    pub(crate) fn read(
        &mut self,
        name: &str,
        expected: &[usize],
        decode: Decode,
    ) -> Result<Option<Vec<f32>>, WeightsError> {
        let Some(stored) = self.stored(name)? else {
            return Ok(None);
        };
        stored.expect_shape(expected)?;
        let bytes = self.bytes(&stored, None)?;
        let values = stored.widen(&bytes)?;
        finish(&stored, values, decode).map(Some)
    }

    /// Every tensor name in the checkpoint.
    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }
}

/// A tensor as the checkpoint stores it.
pub(crate) struct Stored {
    pub(crate) name: String,
    pub(crate) file: PathBuf,
    pub(crate) info: TensorInfo,
}

impl Stored {
    pub(crate) fn dtype(&self) -> Dtype {
        self.info.dtype
    }

    pub(crate) fn shape(&self) -> &[usize] {
        &self.info.shape
    }

    pub(crate) fn expect_shape(&self, expected: &[usize]) -> Result<(), WeightsError> {
        if self.info.shape != expected {
            return Err(WeightsError::Shape {
                file: self.file.clone(),
                tensor: self.name.clone(),
                expected: expected.to_vec(),
                found: self.info.shape.clone(),
            });
        }
        Ok(())
    }

    pub(crate) fn dtype_error(&self) -> WeightsError {
        WeightsError::Dtype {
            file: self.file.clone(),
            tensor: self.name.clone(),
            found: format!("{:?}", self.info.dtype),
        }
    }

    /// The values of float `bytes` of this tensor, widened to f32 exactly
    /// (F64 rounded once). fp8 e4m3 is widened too, for the caller to scale.
    pub(crate) fn widen(&self, bytes: &[u8]) -> Result<Vec<f32>, WeightsError> {
        let dtype = self.info.dtype;
        let width = match dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            Dtype::F64 => 8,
            Dtype::F8_E4M3 => 1,
            _ => return Err(self.dtype_error()),
        };
        let mut out = Vec::with_capacity(bytes.len() / width);
        for (index, c) in bytes.chunks_exact(width).enumerate() {
            out.push(match dtype {
                Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                Dtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                Dtype::F8_E4M3 => moec_kernels::scalar::fp8_e4m3_to_f32(c[0]),
                _ => {
                    let wide = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    let narrow = wide as f32;
                    if wide.is_finite() && !narrow.is_finite() {
                        return Err(WeightsError::NotFinite {
                            file: self.file.clone(),
                            tensor: self.name.clone(),
                            index,
                            value: wide,
                            rounded_to: Some("f32"),
                        });
                    }
                    narrow
                }
            });
        }
        Ok(out)
    }
}

/// Rounds `values` of `stored` as `decode` says, refusing NaN and infinities
/// when it asks.
pub(crate) fn finish(
    stored: &Stored,
    values: Vec<f32>,
    decode: Decode,
) -> Result<Vec<f32>, WeightsError> {
    finish_named(&stored.file, &stored.name, values, decode)
}

/// [`finish`] for values that came from part of a tensor, named `tensor`.
pub(crate) fn finish_named(
    file: &Path,
    tensor: &str,
    mut values: Vec<f32>,
    decode: Decode,
) -> Result<Vec<f32>, WeightsError> {
    for (index, v) in values.iter_mut().enumerate() {
        let raw = *v;
        let rounded = decode.round.map_or(raw, |d| round_to_dtype(d, raw));
        if decode.finite && !rounded.is_finite() {
            let rounded_to = raw
                .is_finite()
                .then(|| decode.round.map_or("f32", DType::name));
            return Err(WeightsError::NotFinite {
                file: file.to_path_buf(),
                tensor: tensor.to_string(),
                index,
                value: f64::from(raw),
                rounded_to,
            });
        }
        *v = rounded;
    }
    Ok(values)
}
