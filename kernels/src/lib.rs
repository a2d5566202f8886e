//! moec's kernel description language and the MoE kernels written in it.
//!
//! Every memory-bound kernel of a plan (the router chain, permute and pack,
//! un-permute and weighted sum, activations, fp8 quantisation, the shared
//! gate, the final add) is described once, here, as a [`ir::Kernel`]: a small
//! typed program that runs once per row of a launch. A backend lowers the
//! description: the CPU backend JIT-compiles it with Cranelift, the CUDA
//! backend prints it as CUDA C. [`interp`] runs a description directly; it is
//! the slow oracle the backends are tested against.
//!
//! [`library::describe`] specialises a kernel kind with a plan's constants
//! (hidden size, experts, top-k, dtypes, ...): the constants become literals
//! and loop bounds in the description, so a backend compiles one kernel per
//! distinct shape and never branches on them at run time.

pub mod build;
pub mod check;
pub mod interp;
pub mod ir;
pub mod library;
pub mod scalar;
