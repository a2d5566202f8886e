//! The kernels a plan runs on the GPU, as one CUDA module.
//!
//! [`plan_kernels`] lowers every kernel of the plan's kernel table that the
//! kernel library describes, in table order, and then the activation each
//! GEMM with an activation epilogue needs (the expert and shared-expert up
//! projections read the GEMM's `f32` result and store the layer dtype; the
//! CPU backend JIT-compiles the same kernels for its epilogues). Equal
//! kernels are generated once. The assignment kernels (`assign`) and
//! `scale_rows` are written natively per backend and are listed apart.

use moec_kernels::cuda::{CudaError, Module};
use moec_kernels::library::{self, Kind};

use crate::plan::{Epilogue, GemmWeight, KernelKind, OpKind, Plan};

/// One generated kernel of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanKernel {
    /// The plan's name for it (`router_fused`, `permute_pack`, ...), or
    /// `expert_activation` / `shared_activation` for a GEMM epilogue.
    pub label: String,
    /// Its index in the plan's kernel table (`None` for an epilogue).
    pub table_index: Option<usize>,
    pub kind: Kind,
    /// Its index in [`PlanKernels::module`]'s kernels.
    pub module_index: usize,
}

/// The CUDA module of a plan.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanKernels {
    pub module: Module,
    /// Every generated kernel, in table order, then the epilogues; two
    /// entries may share a module kernel.
    pub kernels: Vec<PlanKernel>,
    /// Kernels of the table that are not generated (name, kind): the
    /// backend's native ones.
    pub native: Vec<(String, KernelKind)>,
}

/// Why a plan's kernels cannot be generated.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanKernelsError {
    /// The library rejects a kernel's constants.
    Describe { kernel: String, message: String },
    /// The description cannot be lowered.
    Lower(CudaError),
}

impl std::fmt::Display for PlanKernelsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanKernelsError::Describe { kernel, message } => {
                write!(f, "kernel `{kernel}`: {message}")
            }
            PlanKernelsError::Lower(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for PlanKernelsError {}

/// The library kind of a plan kernel, or `None` for a native one.
pub fn library_kind(kind: KernelKind) -> Option<Kind> {
    Some(match kind {
        KernelKind::RouterFused => Kind::RouterFused,
        KernelKind::RouterScores => Kind::RouterScores,
        KernelKind::RouterBias => Kind::RouterBias,
        KernelKind::RouterGroupSelect => Kind::RouterGroupSelect,
        KernelKind::RouterTopk => Kind::RouterTopk,
        KernelKind::RouterNormalize => Kind::RouterNormalize,
        KernelKind::RouterScale => Kind::RouterScale,
        KernelKind::Permute => Kind::Permute,
        KernelKind::Pack => Kind::Pack,
        KernelKind::PermutePack => Kind::PermutePack,
        KernelKind::QuantizeFp8 => Kind::QuantizeFp8,
        KernelKind::DequantizeFp8 => Kind::DequantizeFp8,
        KernelKind::Activation => Kind::Activation,
        KernelKind::Unpermute => Kind::Unpermute,
        KernelKind::WeightedSum => Kind::WeightedSum,
        KernelKind::UnpermuteWeightedSum => Kind::UnpermuteWeightedSum,
        KernelKind::SharedGate => Kind::SharedGate,
        KernelKind::Add => Kind::Add,
        KernelKind::Assign | KernelKind::ScaleRows => return None,
    })
}

/// Lowers the kernels of `plan` into one module (see the module docs).
pub fn plan_kernels(plan: &Plan) -> Result<PlanKernels, PlanKernelsError> {
    let mut out = PlanKernels {
        module: Module::new(),
        kernels: Vec::new(),
        native: Vec::new(),
    };
    let add = |out: &mut PlanKernels,
               label: &str,
               table_index: Option<usize>,
               kind: Kind,
               constants: &[(String, i64)]| {
        let desc = library::describe(kind, constants).map_err(|e| PlanKernelsError::Describe {
            kernel: label.to_string(),
            message: e.to_string(),
        })?;
        let module_index = out.module.add(&desc).map_err(PlanKernelsError::Lower)?;
        out.kernels.push(PlanKernel {
            label: label.to_string(),
            table_index,
            kind,
            module_index,
        });
        Ok(())
    };
    for (i, k) in plan.kernels.iter().enumerate() {
        match library_kind(k.kind) {
            Some(kind) => add(&mut out, &k.name, Some(i), kind, &k.constants)?,
            None => out.native.push((k.name.clone(), k.kind)),
        }
    }
    let (mut expert, mut shared) = (false, false);
    for (_, op) in plan.ops() {
        let OpKind::Gemm {
            weight,
            n,
            epilogue: Epilogue::Activation,
            ..
        } = op.kind
        else {
            continue;
        };
        let (label, ffn) = match weight {
            GemmWeight::ExpertUp if !expert => {
                expert = true;
                ("expert_activation", plan.layer.ffn)
            }
            GemmWeight::SharedUp if !shared => {
                shared = true;
                match &plan.layer.shared {
                    Some(s) => ("shared_activation", s.ffn),
                    None => continue,
                }
            }
            _ => continue,
        };
        // The GEMM's output is the activation's input: `[gate | up]`, twice
        // the activation's width, when gated.
        let width = if ffn.gated() { n / 2 } else { n };
        let constants = vec![
            ("act".to_string(), ffn.code()),
            ("clamped".to_string(), i64::from(ffn.limit().is_some())),
            ("dtype".to_string(), plan.layer.dtype.code()),
            ("ffn".to_string(), i64::try_from(width).unwrap_or(i64::MAX)),
            ("gated".to_string(), i64::from(ffn.gated())),
            ("in_dtype".to_string(), 0),
        ];
        add(&mut out, label, None, Kind::Activation, &constants)?;
    }
    Ok(out)
}
