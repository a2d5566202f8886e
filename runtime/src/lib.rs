//! The moec runtime: executes compiled plans.
//!
//! This crate never depends on the compiler, so an application ships the
//! runtime and a plan file (`moec build layer.moe --emit json -o plan.json`)
//! without it. [`Layer`] is the embedding API: load a plan and its weights,
//! run [`forward`](Layer::forward) on one tensor per rank, read the outputs
//! and the routing statistics from the returned [`Forward`]. Every failure is
//! an [`Error`].
//!
//! ```
//! use moec_runtime::{CpuOptions, Layer, Weights};
//!
//! # fn main() -> Result<(), moec_runtime::Error> {
//! // A plan written by `moec build examples/tiny.moe --emit json -o tiny.plan.json`;
//! // `Layer::from_plan_file("tiny.plan.json", ...)` reads it from the file.
//! let json = include_str!("../tests/fixtures/tiny.plan.json");
//! let layer = Layer::from_plan_json(json, Weights::Random { seed: 0 }, CpuOptions::default())?;
//!
//! // One row-major [tokens_per_rank, hidden] f32 tensor per rank.
//! let inputs = layer.random_inputs(1);
//! let forward = layer.forward(&inputs)?;
//!
//! assert_eq!(forward.outputs.len(), layer.ranks());
//! assert_eq!(forward.outputs[0].len(), layer.tokens_per_rank() * layer.hidden());
//! let stats = &forward.stats;
//! println!("tokens per expert: {:?}", stats.routed_per_expert);
//! println!("dropped {} of {}, imbalance {:.2}", stats.dropped, stats.assignments, stats.imbalance());
//! # Ok(())
//! # }
//! ```
//!
//! The modules underneath: [`plan`] (the plan type, its JSON and text forms
//! and its load checks), [`weights`] (a layer's weights: random, from
//! safetensors, saved runs) and [`cpu`] (the CPU backend that [`Layer`]
//! wraps), and the first part of the CUDA backend ([`cuda`]: the plan's kernels
//! as CUDA C, compiled by NVRTC loaded at run time). See ARCHITECTURE.md.

pub mod cpu;
pub mod cuda;
pub mod files;
pub mod footprint;
pub mod layer;
pub mod plan;
pub mod stats;
pub mod weights;

pub use cpu::{CpuOptions, Forward, RoutingStats};
pub use layer::{Error, Layer, Weights};
pub use plan::{Plan, PlanError, PLAN_FORMAT_VERSION};
