//! The CPU backend: every rank a thread, every stream a thread of its rank,
//! collectives in memory, memory-bound kernels JIT-compiled with Cranelift from
//! the kernel descriptions, GEMMs through the `gemm` crate.

pub mod comm;
mod exec;
pub mod finite;
pub mod gemm;
pub(crate) mod hier;
pub mod jit;
pub mod layout;
pub mod memory;
pub mod traffic;

pub use exec::{CpuBackend, CpuOptions, ExecError, Forward, Growth, RoutingStats};
pub use finite::{check_finite, NonFinite};
