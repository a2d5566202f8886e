//! The CUDA backend.
//!
//! What runs without a GPU (and is tested here on every example):
//!
//! - [`plan`]: the kernels of a plan ([`plan::plan_kernels`]), lowered by
//!   [`moec_kernels::cuda`] from the same descriptions the CPU backend
//!   JIT-compiles, into one module with a content hash;
//! - [`nvrtc`]: NVRTC loaded at run time with `libloading` (a missing
//!   library is an error, never a panic; no GPU is needed to compile), to
//!   PTX and, for the device's architecture, the cubin the executor loads;
//! - [`cache`]: compiled code per plan, keyed by the module hash, the
//!   architecture and the NVRTC version;
//! - [`program`]: the lowering of a plan into a device program (per op, the
//!   launches, GEMMs, memsets, collectives and events on its stream, every
//!   buffer a span of a rank's arena, weights or workspace);
//! - [`route`]: the routing table the device's `assign_place` leaves, read
//!   back by the host;
//! - [`issue`]: the issuer, which resolves the routing-dependent steps,
//!   turns collectives into device-to-device copies between virtual ranks
//!   (or NCCL sends and receives) and status blocks into errors, against a
//!   [`issue::Target`];
//! - [`rdzv`]: the torchrun/SLURM rendezvous that hands out NCCL's id;
//! - [`device`]: the driver probe (`no CUDA driver found; use --backend cpu`).
//!
//! What needs a GPU (the `cuda` feature, on by default; compiled everywhere,
//! run only where a GPU is):
//!
//! - [`driver`]: the [`issue::Target`] on cudarc (streams, events, memory,
//!   module loading, launches, cuBLAS, NCCL);
//! - [`exec`]: [`CudaBackend`], which puts it all together.

pub mod cache;
pub mod device;
#[cfg(feature = "cuda")]
pub mod driver;
#[cfg(feature = "cuda")]
pub mod exec;
pub mod issue;
pub mod nvrtc;
pub mod plan;
pub mod program;
pub mod rdzv;
pub mod route;

#[cfg(feature = "cuda")]
pub use exec::{CommChoice, CudaBackend, CudaOptions};

pub use cache::PtxCache;
pub use nvrtc::{Nvrtc, NvrtcError, Ptx};
pub use plan::{plan_kernels, PlanKernel, PlanKernels, PlanKernelsError};
