//! The CUDA backend, first part: the plan's memory-bound kernels as CUDA C
//! and their compilation to PTX.
//!
//! - [`plan`]: the kernels of a plan ([`plan::plan_kernels`]), lowered by
//!   [`moec_kernels::cuda`] from the same descriptions the CPU backend
//!   JIT-compiles, into one module with a content hash;
//! - [`nvrtc`]: NVRTC loaded at run time with `libloading` (a missing
//!   library is an error, never a panic; no GPU is needed to compile);
//! - [`cache`]: compiled PTX per plan, keyed by the module hash, the
//!   architecture and the NVRTC version.
//!
//! Not here yet: the executor on the GPU (driver, streams, events from the
//! plan), cuBLAS grouped GEMMs, virtual ranks on one GPU and NCCL.

pub mod cache;
pub mod device;
#[cfg(feature = "cuda")]
pub mod driver;
pub mod nvrtc;
pub mod plan;

pub use cache::PtxCache;
pub use nvrtc::{Nvrtc, NvrtcError, Ptx};
pub use plan::{plan_kernels, PlanKernel, PlanKernels, PlanKernelsError};
