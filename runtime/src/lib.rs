//! The moec runtime: executes compiled plans.
//!
//! This crate never depends on the compiler, so an application can ship the
//! runtime and a plan file without it. Today it holds the [`plan::Plan`] type:
//! its JSON and text forms and the checks a plan passes when it is loaded. The
//! CPU executor and the CUDA backend land here next (see ARCHITECTURE.md).

pub mod cpu;
pub mod plan;
pub mod weights;

pub use plan::{Plan, PlanError, PLAN_FORMAT_VERSION};
