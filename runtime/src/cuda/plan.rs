//! The kernels a plan runs on the GPU, as one CUDA module.
//!
//! [`plan_kernels`] lowers every kernel of the plan's kernel table that the
//! kernel library describes, in table order, and then the activation each
//! GEMM with an activation epilogue needs (the expert and shared-expert up
//! projections read the GEMM's `f32` result and store the layer dtype; the
//! CPU backend JIT-compiles the same kernels for its epilogues), and the
//! `gemm_store` each GEMM needs whose `f32` product cuBLAS cannot leave in
//! place: an output in another dtype than `f32`, or a bias (labelled
//! `<weight>_store`: `expert_down_store`, ...). Equal kernels are generated
//! once. The assignment kernels (`assign`) and `scale_rows` are written
//! natively per backend and are listed apart.

use moec_kernels::cuda::{CudaError, Module};
use moec_kernels::library::{self, Kind};

use crate::plan::{DType, Epilogue, GemmWeight, KernelKind, OpKind, Plan};

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

pub use crate::plan::binding::library_kind;

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
    let mut stores: Vec<(String, Vec<(String, i64)>)> = Vec::new();
    for (_, op) in plan.ops() {
        if let OpKind::Gemm {
            weight,
            n,
            c,
            epilogue,
            by_rank,
            ..
        } = op.kind
        {
            let reduces = by_rank.is_some() && weight == GemmWeight::ExpertDown;
            if let Some(constants) = store_constants(plan, weight, n, (c, reduces), epilogue) {
                let label = format!("{}_store", weight_label(weight));
                match stores.iter().find(|(l, _)| *l == label) {
                    Some((_, prev)) if *prev != constants => {
                        return Err(PlanKernelsError::Describe {
                            kernel: label,
                            message: "two GEMMs of this weight need different stores".into(),
                        })
                    }
                    Some(_) => {}
                    None => stores.push((label, constants)),
                }
            }
        }
    }
    for (label, constants) in &stores {
        add(&mut out, label, None, Kind::GemmStore, constants)?;
    }
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
    let fused = |w: GemmWeight| {
        plan.ops().any(|(_, op)| {
            matches!(op.kind, OpKind::Gemm { weight, by_rank: Some(_), .. } if weight == w)
        })
    };
    if fused(GemmWeight::ExpertUp) {
        let constants = crate::plan::binding::gather_constants(plan);
        add(&mut out, EXPERT_GATHER, None, Kind::Permute, &constants)?;
    }
    if fused(GemmWeight::ExpertDown) {
        let constants = crate::plan::binding::reduce_epilogue_constants(plan);
        add(
            &mut out,
            EXPERT_REDUCE,
            None,
            Kind::UnpermuteWeightedSum,
            &constants,
        )?;
    }
    if let Some(constants) = forwarder_sum_constants(plan) {
        add(
            &mut out,
            FORWARDER_SUM,
            None,
            Kind::UnpermuteWeightedSum,
            &constants,
        )?;
    }
    Ok(out)
}

/// The label of the kernel that copies the received by-rank rows to the
/// expert rows before an up projection that reads through the expansion
/// index ([`crate::plan::binding::gather_constants`]).
pub const EXPERT_GATHER: &str = "expert_gather";

/// The label of the down projection's reducing epilogue
/// (`unpermute_weighted_sum` from the `f32` product,
/// [`crate::plan::binding::reduce_epilogue_constants`]).
pub const EXPERT_REDUCE: &str = "expert_reduce";

/// The label of the kernel that sums, on a forwarder, the partial rows its
/// node's ranks return in the reducing hierarchical combine
/// (`cpu::hier::forwarder_parts` names them): `unpermute_weighted_sum`,
/// unweighted, over up to one part per rank of the node, as the CPU
/// backend adds them (in `f32`, in destination order, rounded once).
pub const FORWARDER_SUM: &str = "forwarder_sum";

/// The constants of the [`FORWARDER_SUM`] kernel, when the plan has a
/// reducing intra-node combine leg.
fn forwarder_sum_constants(plan: &Plan) -> Option<Vec<(String, i64)>> {
    let leg = plan.ops().find_map(|(_, op)| match op.kind {
        OpKind::Collective {
            kind: crate::plan::CollectiveKind::AllToAllRank,
            scope: crate::plan::CollectiveScope::IntraNode,
            send,
            ..
        } if op.phase == crate::plan::Phase::Combine => plan.buffers.get(send as usize),
        _ => None,
    })?;
    let width = leg.shape.get(1).copied().unwrap_or(0);
    Some(vec![
        ("dtype".to_string(), leg.dtype.code()),
        (
            "hidden".to_string(),
            i64::try_from(width).unwrap_or(i64::MAX),
        ),
        // One part per rank of the node (`cpu::hier::Topology`).
        (
            "top_k".to_string(),
            i64::try_from(plan.mesh.ep.min(plan.mesh.gpus_per_node).max(1)).unwrap_or(i64::MAX),
        ),
        ("weight_on_input".to_string(), 1),
    ])
}

/// The name of a GEMM weight in kernel labels.
fn weight_label(w: GemmWeight) -> &'static str {
    match w {
        GemmWeight::RouterGate => "router_gate",
        GemmWeight::ExpertUp => "expert_up",
        GemmWeight::ExpertDown => "expert_down",
        GemmWeight::SharedUp => "shared_up",
        GemmWeight::SharedDown => "shared_down",
    }
}

/// Whether a GEMM's weights come with a bias (the layer's expert or shared
/// expert biases, the router's logit bias).
pub fn gemm_has_bias(plan: &Plan, weight: GemmWeight) -> bool {
    match weight {
        GemmWeight::RouterGate => plan.layer.router.logit_bias,
        GemmWeight::ExpertUp | GemmWeight::ExpertDown => plan.layer.expert_bias,
        GemmWeight::SharedUp | GemmWeight::SharedDown => {
            plan.layer.shared.as_ref().is_some_and(|s| s.bias)
        }
    }
}

/// The constants of the `gemm_store` a GEMM needs, if any: with an
/// activation epilogue or a reducing one (`reduces`), only to add a bias
/// (into an `f32` copy the epilogue reads); otherwise for a bias or an
/// output that is not `f32`.
fn store_constants(
    plan: &Plan,
    weight: GemmWeight,
    n: u64,
    (c, reduces): (u32, bool),
    epilogue: Epilogue,
) -> Option<Vec<(String, i64)>> {
    let bias = gemm_has_bias(plan, weight);
    let c_dtype = plan.buffers.get(c as usize).map_or(DType::F32, |b| b.dtype);
    let dtype = match epilogue {
        Epilogue::Activation if bias => DType::F32,
        Epilogue::Activation => return None,
        Epilogue::None if reduces && bias => DType::F32,
        Epilogue::None if reduces => return None,
        Epilogue::None if bias || c_dtype != DType::F32 => c_dtype,
        Epilogue::None => return None,
    };
    Some(vec![
        ("bias".to_string(), i64::from(bias)),
        ("dtype".to_string(), dtype.code()),
        ("hidden".to_string(), i64::try_from(n).unwrap_or(i64::MAX)),
    ])
}
