//! The moec runtime: executes compiled plans.
//!
//! This crate never depends on the compiler, so an application can ship the
//! runtime and a plan file without it. The Plan type, the CPU executor and the
//! CUDA backend land here (see ARCHITECTURE.md for the roadmap).
