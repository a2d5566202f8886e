//! Shared helpers for the end-to-end tests live in the test files themselves,
//! except the independent reference implementation of one MoE layer
//! ([`reference`]) that the runtime's numerics are held against, and the
//! writers of small checkpoints in each model family's layout
//! ([`checkpoint`]).

pub mod checkpoint;
pub mod reference;
