//! Shared helpers for the end-to-end tests live in the test files themselves,
//! except the independent reference implementation of one MoE layer
//! ([`reference`]) that the runtime's numerics are held against.

pub mod reference;
