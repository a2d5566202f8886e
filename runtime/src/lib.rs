//! The moec runtime: executes compiled plans.
//!
//! This crate never depends on the compiler, so an application can ship the
//! runtime and a plan file without it. It holds the [`plan::Plan`] type (its
//! JSON and text forms and the checks a plan passes when it is loaded), the
//! CPU executor ([`cpu`]), the weights ([`weights`]) and the first part of
//! the CUDA backend ([`cuda`]: the plan's kernels as CUDA C, compiled by
//! NVRTC loaded at run time). See ARCHITECTURE.md.

pub mod cpu;
pub mod cuda;
pub mod plan;
pub mod weights;

pub use plan::{Plan, PlanError, PLAN_FORMAT_VERSION};
