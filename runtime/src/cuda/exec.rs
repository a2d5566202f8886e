//! The CUDA executor: a plan on one GPU (every rank a virtual rank) or on
//! one GPU per process (NCCL, under torchrun or SLURM).
//!
//! [`CudaBackend::new`] probes the driver, lowers the plan
//! ([`Program::lower`]), compiles the kernels with NVRTC for the device's
//! architecture, allocates every local rank's memory once and uploads the
//! weights; [`CudaBackend::forward`] issues one pass through the
//! [`issue`](super::issue) module onto the [`driver`](super::driver) layer.

use std::collections::BTreeMap;
use std::time::Duration;

use super::device::{self, DeviceInfo};
use super::driver::{CudaTarget, TargetSetup};
use super::issue::{
    capturable, graph_pass, run_pass, upload_weights, GraphStage, PassMode, Timing,
};
use super::program::Program;
use super::rdzv::{self, Launch};
use super::{Nvrtc, PtxCache};
use crate::cpu::{ExecError, Forward};
use crate::plan::{Phase, Plan};
use crate::weights::LayerWeights;

/// How ranks talk to each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommChoice {
    /// NCCL when the environment describes a multi-process launch
    /// (`WORLD_SIZE` > 1), virtual ranks otherwise; `MOEC_COMM=virtual` or
    /// `MOEC_COMM=nccl` decides instead (`nccl` in a single process is a
    /// world of one: a smoke test of the NCCL path on one GPU).
    #[default]
    Auto,
    /// Every rank of the plan in this process, on one GPU.
    Virtual,
    /// NCCL, with the launch from the environment (a world of one without).
    Nccl,
}

/// The launch `choice` asks for.
fn launch_for(choice: CommChoice) -> Result<Option<Launch>, String> {
    let choice = match (choice, std::env::var("MOEC_COMM").ok().as_deref()) {
        (CommChoice::Auto, Some("virtual")) => CommChoice::Virtual,
        (CommChoice::Auto, Some("nccl")) => CommChoice::Nccl,
        (CommChoice::Auto, Some(other)) if !other.is_empty() => {
            return Err(format!("MOEC_COMM={other}: expected `virtual` or `nccl`"))
        }
        (c, _) => c,
    };
    match choice {
        CommChoice::Virtual => Ok(None),
        CommChoice::Auto => Launch::from_env(),
        CommChoice::Nccl => Ok(Some(match Launch::from_env()? {
            Some(l) => l,
            None => Launch {
                rank: 0,
                world: 1,
                local_rank: 0,
                master_addr: "127.0.0.1".into(),
                port: std::env::var("MOEC_RDZV_PORT")
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(29_501),
            },
        })),
    }
}

/// Settings of the CUDA backend.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// How long a rank waits for the device, a peer or the rendezvous.
    pub timeout: Duration,
    /// The GPU (default: `LOCAL_RANK` modulo the visible GPUs under a
    /// multi-process launch, else `MOEC_CUDA_DEVICE` or 0; see
    /// [`device::choose_ordinal`]).
    pub device: Option<usize>,
    pub comm: CommChoice,
    /// Most bytes of GPU memory the plan may take (every local rank's
    /// arena, weights and workspace, the cuBLAS workspaces, the context);
    /// `None`: what the GPU has free. The free memory bounds it either way.
    pub memory_budget: Option<u64>,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            timeout: Duration::from_secs(300),
            device: None,
            comm: CommChoice::Auto,
            memory_budget: None,
        }
    }
}

/// A plan made ready to run on a GPU.
pub struct CudaBackend {
    program: Program,
    target: CudaTarget,
    local: Vec<usize>,
    info: DeviceInfo,
    arch: String,
    /// The driver's and NVRTC's versions and where NVRTC was found.
    toolchain: String,
    launch: Option<Launch>,
    /// Whether the target holds the graph of a captured pass.
    graph: GraphStage,
}

fn fail(message: impl Into<String>) -> ExecError {
    ExecError {
        rank: None,
        op: None,
        message: message.into(),
    }
}

impl CudaBackend {
    /// Prepares `plan` (validated) with `weights` on the GPU.
    pub fn new(
        plan: Plan,
        weights: &LayerWeights,
        options: CudaOptions,
    ) -> Result<CudaBackend, ExecError> {
        let info = device::probe().map_err(|e| fail(e.to_string()))?;
        weights
            .check(&plan.layer)
            .map_err(|e| fail(e.to_string()))?;
        let program = Program::lower(&plan).map_err(fail)?;
        let launch = launch_for(options.comm).map_err(fail)?;
        let local: Vec<usize> = match &launch {
            Some(l) => {
                if l.world != program.ranks {
                    return Err(fail(format!(
                        "the launch has {} processes but the plan has {} ranks; run one process per rank",
                        l.world, program.ranks
                    )));
                }
                vec![l.rank]
            }
            None => (0..program.ranks).collect(),
        };
        let ordinal = device::choose_ordinal(
            options.device,
            launch.as_ref().map(|l| l.local_rank),
            std::env::var("MOEC_CUDA_DEVICE").ok().as_deref(),
            info.count,
        )
        .map_err(fail)?;
        let nvrtc = Nvrtc::load().map_err(|e| fail(e.to_string()))?;
        super::nvrtc::driver_compatible(nvrtc.version(), info.driver).map_err(|e| {
            fail(format!(
                "{e} (NVRTC from {})",
                nvrtc.location().library.display()
            ))
        })?;
        let toolchain = format!(
            "CUDA driver {}.{}, NVRTC {}.{} from {}",
            info.driver.0,
            info.driver.1,
            nvrtc.version().0,
            nvrtc.version().1,
            nvrtc.location().library.display()
        );
        let cache = PtxCache::global();
        let setup = device::guarded(|| {
            let ctx = CudaTarget::context(ordinal).map_err(device::DeviceError::Driver)?;
            let capability = CudaTarget::capability(&ctx).map_err(device::DeviceError::Driver)?;
            Ok((ctx, capability))
        });
        let (ctx, capability) = setup.map_err(|e| fail(e.to_string()))?;
        let arch = device::arch_of(capability);
        let need = program.device_memory(local.len());
        let free = device::guarded(|| {
            ctx.bind_to_thread()
                .and_then(|()| cudarc::driver::result::mem_get_info())
                .map_err(|e| device::DeviceError::Driver(super::driver::describe(e)))
        })
        .map_err(|e| fail(e.to_string()))?
        .0 as u64;
        let (limit, what) = match options.memory_budget {
            Some(budget) if budget < free => (budget, "the memory budget is"),
            _ => (free, "are free"),
        };
        if need.total() > limit {
            let gb = |b: u64| b as f64 / 1e9;
            return Err(fail(format!(
                "the plan needs {:.1} GB of GPU memory ({:.1} GB for {} rank(s), {:.1} GB of cuBLAS workspaces, {:.1} GB for the context and the local-memory reserve), {:.1} GB {what}; shrink the layer (hidden, intermediate, tokens_per_rank) or build it for more ranks, one per GPU",
                gb(need.total()),
                gb(need.allocations),
                local.len(),
                gb(need.cublas),
                gb(need.context + need.local_reserve),
                gb(limit)
            )));
        }
        let (generated, _) = cache
            .get_or_compile(&nvrtc, &program.kernels.module, &arch)
            .map_err(|e| fail(e.to_string()))?;
        let (native, _) = cache
            .get_or_compile_source(&nvrtc, "moec_native", moec_kernels::native::SOURCE, &arch)
            .map_err(|e| fail(e.to_string()))?;
        let plan_hash = rdzv::fnv64(plan.to_json().as_bytes());
        let target = device::guarded(|| {
            CudaTarget::new(
                ctx,
                &program,
                TargetSetup {
                    local: &local,
                    code: (&generated, &native),
                    launch: launch.as_ref(),
                    plan_hash,
                    timeout: options.timeout,
                },
            )
            .map_err(device::DeviceError::Driver)
        })
        // A module that does not load: which driver and NVRTC made it.
        .map_err(|e| fail(format!("{e} ({toolchain})")))?;
        let mut backend = CudaBackend {
            program,
            target,
            local,
            info,
            arch,
            toolchain,
            launch,
            graph: GraphStage::Cold,
        };
        upload_weights(
            &backend.program,
            &mut backend.target,
            &backend.local,
            weights,
        )?;
        Ok(backend)
    }

    /// The global ranks this process runs (all of them with virtual ranks).
    pub fn local_ranks(&self) -> &[usize] {
        &self.local
    }

    /// Ranks of the plan.
    pub fn ranks(&self) -> usize {
        self.program.ranks
    }

    /// One line about where the plan runs: the GPU and its architecture
    /// (the cubins' target), the ranks, the driver's and NVRTC's versions
    /// and the NVRTC library used.
    pub fn describe(&self) -> String {
        let ranks = match &self.launch {
            Some(l) => format!("rank {} of {} over NCCL", l.rank, l.world),
            None => format!("{} virtual rank(s) on one GPU", self.local.len()),
        };
        format!(
            "{} ({} cubin), {ranks}; {}",
            self.info.name, self.arch, self.toolchain
        )
    }

    /// Runs the layer on `inputs` (one `[tokens, hidden]` tensor per rank
    /// of the plan; a process of a multi-process launch uses its own). The
    /// outputs are the local ranks' (all of them with virtual ranks).
    /// `wall_seconds` is the layer's time with its inputs on the device:
    /// from the first command issued to the device going idle (the upload of
    /// the inputs and the read-back of the outputs are not in it).
    /// `phase_seconds` is empty: [`CudaBackend::forward_profiled`] measures
    /// phases.
    pub fn forward(&mut self, inputs: &[Vec<f32>]) -> Result<Forward, ExecError> {
        Ok(self.pass(inputs, Some(PassMode::Eager))?.0)
    }

    /// [`CudaBackend::forward`] through a CUDA graph: the first call runs
    /// an eager pass (so that first-use work, cuBLAS's and lazy module
    /// loading's, stays out of the graph), then records the pass into a
    /// graph and runs it; later calls only write the inputs and launch the
    /// graph, so the host issues one launch per pass instead of every
    /// kernel, GEMM, copy and event. Only plans that need nothing of the
    /// host during a pass can ([`CudaBackend::graph_capable`]): capacity
    /// plans, with every rank on this GPU; others are an error.
    pub fn forward_graph(&mut self, inputs: &[Vec<f32>]) -> Result<Forward, ExecError> {
        Ok(self.pass(inputs, None)?.0)
    }

    /// Whether [`CudaBackend::forward_graph`] can run this plan here.
    pub fn graph_capable(&self) -> bool {
        capturable(&self.program, &self.local)
    }

    /// [`CudaBackend::forward`] with a timing event before and after every
    /// step on every rank: `phase_seconds` holds each phase's device time
    /// (the sum of its steps' intervals, the mean over the local ranks), and
    /// the timings every step's and every cuBLAS GEMM's. The events cost a
    /// little: time layers with `forward`, phases with this.
    pub fn forward_profiled(
        &mut self,
        inputs: &[Vec<f32>],
    ) -> Result<(Forward, Vec<Timing>), ExecError> {
        let (mut forward, timings) = self.pass(inputs, Some(PassMode::Profiled))?;
        let ranks = self.local.len().max(1) as f64;
        for t in timings.iter().filter(|t| t.gemm.is_none()) {
            if let Some(op) = self.program.ops.get(t.op) {
                *forward.phase_seconds.entry(op.phase).or_default() += t.seconds / ranks;
            }
        }
        Ok((forward, timings))
    }

    /// The phase of op `op` (an index of [`Timing::op`]).
    pub fn op_phase(&self, op: usize) -> Option<Phase> {
        self.program.ops.get(op).map(|o| o.phase)
    }

    /// One pass in `mode`, or through the graph ([`graph_pass`]) with `None`.
    fn pass(
        &mut self,
        inputs: &[Vec<f32>],
        mode: Option<PassMode>,
    ) -> Result<(Forward, Vec<Timing>), ExecError> {
        if inputs.len() != self.program.ranks {
            return Err(fail(format!(
                "{} input tensors for {} ranks",
                inputs.len(),
                self.program.ranks
            )));
        }
        let mine: Vec<Vec<f32>> = self.local.iter().map(|&r| inputs[r].clone()).collect();
        let result = device::guarded(|| {
            Ok(match mode {
                Some(mode) => run_pass(&self.program, &mut self.target, &self.local, &mine, mode),
                None => graph_pass(
                    &self.program,
                    &mut self.target,
                    &self.local,
                    &mine,
                    &mut self.graph,
                ),
            })
        });
        let pass = result.map_err(|e| fail(e.to_string()))??;
        crate::cpu::check_finite(&pass.outputs, self.program.layer_dtype)?;
        Ok((
            Forward {
                outputs: pass.outputs,
                stats: pass.stats,
                phase_seconds: BTreeMap::new(),
                wall_seconds: pass.seconds,
                // The device's copies are not counted yet.
                traffic: Vec::new(),
                warnings: Vec::new(),
                grown: None,
                routing: Vec::new(),
            },
            pass.timings,
        ))
    }
}
