//! [`WeightsError`]: what can go wrong with a layer's weights.
//!
//! Every variant carries enough to act on without a debugger: the file (when
//! there is one), the tensor by its full name, and what was expected beside
//! what was found.

use std::fmt;
use std::path::PathBuf;

/// An error loading, checking or saving a layer's weights or a saved run.
#[derive(Debug)]
#[non_exhaustive]
pub enum WeightsError {
    /// Opening, reading, writing or creating `file` failed.
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    /// `file` is not a valid safetensors file, index or `config.json`.
    Corrupt { file: PathBuf, detail: String },
    /// A tensor the layer needs is not in the checkpoint. `hint` says where
    /// tensors with the same suffix are, when the file has some.
    Missing {
        file: PathBuf,
        tensor: String,
        hint: Option<String>,
    },
    /// No MoE block under the prefix given: none of the routers' names
    /// (`looked_for`) is in the checkpoint. `hint` says where routers are.
    NoMoeBlock {
        file: PathBuf,
        looked_for: Vec<String>,
        hint: Option<String>,
    },
    /// The checkpoint has no MoE block numbered `layer`: no tensor named
    /// `...layers.{layer}.` and one of the routers' names (`looked_for`);
    /// `found` says which MoE layers it has.
    NoLayer {
        file: PathBuf,
        layer: u64,
        looked_for: Vec<String>,
        found: String,
    },
    /// More than one MoE block is numbered `layer` (an encoder's and a
    /// decoder's): the prefix must be given.
    AmbiguousLayer {
        file: PathBuf,
        layer: u64,
        prefixes: Vec<String>,
    },
    /// A tensor holds something moec's layers cannot express or read.
    Unsupported {
        file: PathBuf,
        tensor: String,
        detail: String,
    },
    /// A tensor has the wrong shape.
    Shape {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype moec cannot read.
    Dtype {
        file: PathBuf,
        tensor: String,
        found: String,
    },
    /// A value is NaN or infinite, in the file or after rounding to the
    /// layer's dtype (`rounded_to`).
    NotFinite {
        file: PathBuf,
        tensor: String,
        index: usize,
        value: f64,
        rounded_to: Option<&'static str>,
    },
    /// Weights (built by hand) do not fit the layer: wrong length, or a
    /// tensor present that the layer does not have, or the reverse.
    Mismatch {
        layer: String,
        tensor: String,
        expected: String,
        found: String,
    },
    /// The layer itself cannot have weights in memory: a dtype that is not a
    /// storage dtype, or sizes that overflow.
    Layer { layer: String, detail: String },
    /// The arguments of [`save_run`](super::save_run) disagree with each other.
    Run {
        file: PathBuf,
        tensor: String,
        detail: String,
    },
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsError::Io { file, source } => write!(f, "{}: {source}", file.display()),
            WeightsError::Corrupt { file, detail } => {
                write!(f, "{}: not a valid file: {detail}", file.display())
            }
            WeightsError::Missing { file, tensor, hint } => {
                write!(f, "{}: tensor `{tensor}` not found", file.display())?;
                if let Some(hint) = hint {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            WeightsError::NoMoeBlock {
                file,
                looked_for,
                hint,
            } => {
                write!(
                    f,
                    "{}: no MoE block: looked for a router named {}",
                    file.display(),
                    quoted(looked_for)
                )?;
                if let Some(hint) = hint {
                    write!(f, "; {hint}")?;
                }
                Ok(())
            }
            WeightsError::NoLayer {
                file,
                layer,
                looked_for,
                found,
            } => write!(
                f,
                "{}: no MoE layer {layer}: looked for `layers.{layer}.`, `blocks.{layer}.`, \
                 `block.{layer}.` or `h.{layer}.` followed by a router's name ({}); {found}",
                file.display(),
                quoted(looked_for)
            ),
            WeightsError::AmbiguousLayer {
                file,
                layer,
                prefixes,
            } => write!(
                f,
                "{}: more than one MoE block is layer {layer}: under {}; give the prefix instead",
                file.display(),
                quoted(prefixes)
            ),
            WeightsError::Unsupported {
                file,
                tensor,
                detail,
            } => write!(f, "{}: tensor `{tensor}`: {detail}", file.display()),
            WeightsError::Shape {
                file,
                tensor,
                expected,
                found,
            } => write!(
                f,
                "{}: tensor `{tensor}` has shape {found:?}, expected {expected:?}",
                file.display()
            ),
            WeightsError::Dtype {
                file,
                tensor,
                found,
            } => {
                write!(
                    f,
                    "{}: tensor `{tensor}` has dtype {found}, expected F32, BF16, F16 or F64 \
                     (or fp8 e4m3 with block scales, or MXFP4 blocks)",
                    file.display()
                )?;
                Ok(())
            }
            WeightsError::NotFinite {
                file,
                tensor,
                index,
                value,
                rounded_to,
            } => match rounded_to {
                Some(dtype) => write!(
                    f,
                    "{}: tensor `{tensor}`: value {value} at flat index {index} overflows {dtype}",
                    file.display()
                ),
                None => write!(
                    f,
                    "{}: tensor `{tensor}`: value {value} at flat index {index} is not finite",
                    file.display()
                ),
            },
            WeightsError::Mismatch {
                layer,
                tensor,
                expected,
                found,
            } => write!(
                f,
                "weights of layer `{layer}`: tensor `{tensor}`: expected {expected}, found {found}"
            ),
            WeightsError::Layer { layer, detail } => write!(f, "layer `{layer}`: {detail}"),
            WeightsError::Run {
                file,
                tensor,
                detail,
            } => write!(f, "{}: tensor `{tensor}`: {detail}", file.display()),
        }
    }
}

/// `a`, `b` or `c`, each in backticks.
fn quoted(names: &[String]) -> String {
    let q: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match q.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

impl std::error::Error for WeightsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WeightsError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
