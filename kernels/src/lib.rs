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
//!
//! The modules, in the order a kernel meets them:
//!
//! - [`ir`]: the language and the semantics every backend implements;
//!   [`scalar`]: those semantics for single values (rounding, NaN-propagating
//!   `min`/`max`, `exp` and friends), shared by the interpreter and the
//!   Cranelift backend so that they agree bit for bit;
//! - [`build`]: a builder that makes descriptions read like code;
//! - [`check`]: the type checker every description passes before a backend
//!   sees it;
//! - [`library`]: the MoE kernels, written with the builder;
//! - [`interp`]: the reference interpreter, the oracle of the backends' tests;
//! - [`cuda`]: the CUDA C code generator (the CPU backend's Cranelift lowering
//!   lives in the runtime, next to the executor that calls it), with
//!   [`parallel`], which finds the loops a block's threads can share;
//! - [`native`]: the hand-written CUDA C of the assignment kernels, which
//!   scan across tokens and so are no per-row descriptions.
//!
//! A description prints as pseudo-code with `{}` ([`ir::Kernel`]'s
//! `Display`), which is the quickest way to see what a kernel does with a
//! given set of constants.

pub mod build;
pub mod check;
pub mod cuda;
pub mod interp;
pub mod ir;
pub mod library;
pub mod native;
pub mod parallel;
pub mod scalar;
