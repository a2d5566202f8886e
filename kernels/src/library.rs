//! The MoE kernel library: every memory-bound kernel of a plan, written once
//! in the description language and specialised with a plan's constants.
//!
//! [`describe`] takes a [`Kind`] and the constants the compiler writes into
//! a plan's kernel table (`hidden`, `experts`, `top_k`, `dtype`, ...; the
//! names of the table in the book's *Kernels* chapter) and returns a checked
//! [`Kernel`] in which the constants are literals and loop bounds. A backend
//! therefore compiles one kernel per distinct shape and never branches on a
//! shape at run time, and the description is small enough to read: print a
//! kernel with `{}` to see it.
//!
//! # Conventions shared by every kernel
//!
//! - One row of a launch is one token `t` (for `pack`, `quantize_fp8`,
//!   `dequantize_fp8`, `activation`, one row of the buffer), and buffers are
//!   row-major: row `t` of an `[T, H]` buffer is elements `t·H .. t·H + H`.
//! - Activations are stored in `dtype` (`0` f32, `1` bf16, `2` f16); every
//!   computation is in `f32`, and a value is rounded to `dtype` only when it is
//!   stored. Router buffers, routing weights, fp8 scales and the shared gate
//!   vector are always `f32`; expert ids and slots are `i32`.
//! - Sums run sequentially from `0.0` in index order (`j = 0 .. k`,
//!   `h = 0 .. H`), and every formula is evaluated in the order its doc
//!   comment writes it, so a test (or another implementation) that follows the
//!   same order gets the same bits.
//! - A slot `< 0` is a dropped token-expert pair: it is skipped (or gives a
//!   zero row, for `unpermute`).
//! - Constants the compiler writes but a kernel does not use (`rows`, or
//!   `hidden` for a router kernel) are accepted and ignored. A constant listed
//!   twice must have the same value both times.
//!
//! # Defaults
//!
//! `in_dtype` defaults to `dtype`. The switches `scoring`, `softmax_over`,
//! `selection_bias`, `group_score`, `normalize`, `weight_on_input` and
//! `clamped` default to `0`. `groups` defaults to `1`, and `groups_kept` to `1`
//! when there is one group (with more groups it is required: no default keeps
//! the right number). For `activation`, `act` defaults to `0` (SwiGLU) and
//! `gated` to `1` exactly when `act = 0`; a non-gated activation therefore
//! needs `act`, since nothing else says which of GELU, tanh-GELU or ReLU it
//! is. Everything else a kernel uses (`hidden`, `dtype`, `experts`, `top_k`,
//! `ffn`, `block`) is required.

mod router;

use std::fmt;

use crate::build::{abs, eq, erf, ge, lt, max, min, select, sigmoid, tanh, Builder, E};
use crate::check::CheckError;
use crate::ir::{Access, Elem, Kernel, Ty, MAX_ARRAY_LEN};

/// A kernel of the library.
///
/// Each variant's doc lists the kernel's parameters in launch order (buffers
/// as `name elem [shape] access`, scalars last) and what one row computes.
/// `T` is the launch's row count, `H` = `hidden`, `E` = `experts`, `k` =
/// `top_k`, `F` = `ffn`, `B` = `block`, `NB` = `⌈H / B⌉`, and `dt` the
/// `dtype` element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `router_fused`: `logits f32 [T,E] Read`, `ids i32 [T,k] Write`,
    /// `weights f32 [T,k] Write`, `bias f32 [E] Read`, `scale f32`.
    ///
    /// The whole router of the book's router reference: scores, selection
    /// bias, group-limited selection, top-k, weights, normalisation, scaling.
    /// `bias` is read only with `selection_bias = 1` (a zero-length buffer
    /// works otherwise); `scale` always multiplies the final weights (pass
    /// `1.0` for no scaling). Unlike `router_groups`, experts of dropped groups
    /// are excluded from the top-k outright rather than set to `-inf`, so the
    /// weights are exactly the unbiased scores even in degenerate cases
    /// (all-`-inf` scores).
    RouterFused,
    /// `router_scores`: `logits f32 [T,E] Read`, `scores f32 [T,E] Write`.
    ///
    /// Softmax over all experts (`scoring = 0, softmax_over = 0`), sigmoid
    /// (`scoring = 1`), or a copy (`softmax_over = 1`).
    RouterScores,
    /// `router_bias`: `scores f32 [T,E] Read`, `selection f32 [T,E] Write`,
    /// `bias f32 [E] Read`. `c_e = s_e + b_e`.
    RouterBias,
    /// `router_groups`: `selection f32 [T,E] Read`, `masked f32 [T,E] Write`.
    ///
    /// The `groups_kept` best of `groups` groups (scored by `group_score`)
    /// keep their selection scores; the others' experts become `-inf`.
    RouterGroupSelect,
    /// `router_topk`: `selection f32 [T,E] Read`, `ids i32 [T,k] Write`,
    /// `weights f32 [T,k] Write`, `bias f32 [E] Read`.
    ///
    /// Top-k of the selection scores; the weight of a chosen expert is
    /// `c_e - b_e` with `selection_bias = 1` (else `c_e`), then, with
    /// `softmax_over = 1`, a softmax over the chosen ones. `bias` is read only
    /// with `selection_bias = 1`.
    RouterTopk,
    /// `router_normalize`: `weights f32 [T,k] ReadWrite`. `w_j ← w_j / Σ w`.
    RouterNormalize,
    /// `router_scale`: `weights f32 [T,k] ReadWrite`, `scale f32`.
    /// `w_j ← w_j · scale`.
    RouterScale,
    /// `permute`: `x dt [T,H] Read`, `slots i32 [T,k] Read`,
    /// `weights f32 [T,k] Read`, `permuted dt [rows,H] Write`.
    ///
    /// For each `j` with `s = slots[t,j] ≥ 0`: `permuted[s] = x[t]`, times
    /// `weights[t,j]` with `weight_on_input = 1` (`weights` is read only
    /// then).
    Permute,
    /// `pack`: `permuted dt [T,H] Read`, `send dt [T,H] Write`. A row copy.
    Pack,
    /// `permute_pack`: `x dt [T,H] Read`, `slots i32 [T,k] Read`,
    /// `weights f32 [T,k] Read`, `send dt [rows,H] Write`. As `permute`.
    PermutePack,
    /// `quantize_fp8`: `in dt [T,H] Read`, `q fp8_e4m3 [T,H] Write`,
    /// `scales f32 [T,NB] Write`.
    ///
    /// Per block of `B` elements (the last one may be shorter):
    /// `amax = max |v|`, `scale = amax / 448` (`1` when `amax = 0`),
    /// `q = e4m3(v / scale)`.
    QuantizeFp8,
    /// `dequantize_fp8`: `q fp8_e4m3 [T,H] Read`, `scales f32 [T,NB] Read`,
    /// `out dt [T,H] Write`. `out = q · scale` of its block.
    DequantizeFp8,
    /// `activation`: `in in_dt [T,2F or F] Read`, `out dt [T,F] Write`,
    /// `limit f32` (read only with `clamped = 1`, but always a parameter).
    ///
    /// - `act = 0` (SwiGLU; `in` is `[gate | up]`, `2F` wide):
    ///   `out = (g · σ(g)) · u`; clamped (gpt-oss):
    ///   `g' = min(g, L)`, `u' = max(min(u, L), -L)`,
    ///   `out = ((u' + 1) · g') · σ(1.702 · g')`;
    /// - `act = 1` (GELU): `out = (0.5 · v) · (1 + erf(v / √2))`;
    /// - `act = 2` (tanh GELU):
    ///   `out = (0.5 · v) · (1 + tanh(√(2/π) · (v + 0.044715 · ((v · v) · v))))`;
    /// - `act = 3` (ReLU): `out = v < 0 ? 0 : v`, so NaN stays NaN and `-0`
    ///   stays `-0` on every backend (a float `max` is not specified for
    ///   signed zeros).
    ///
    /// `σ(v) = 1 / (1 + exp(-v))`; `√2` and `√(2/π)` are the `f32` nearest
    /// the real constants.
    Activation,
    /// `unpermute`: `combined dt [rows,H] Read`, `slots i32 [T,k] Read`,
    /// `unpermuted dt [T·k,H] Write`.
    ///
    /// Row `t·k+j` is `combined[slots[t,j]]`, or zeros for a dropped slot.
    Unpermute,
    /// `weighted_sum`: `unpermuted dt [T·k,H] Read`, `weights f32 [T,k] Read`,
    /// `out dt [T,H] Write`.
    ///
    /// `out[t] = Σ_j w_j · unpermuted[t·k+j]` over every `j` (a dropped
    /// slot's row is zeros already), or `Σ_j unpermuted[t·k+j]` with
    /// `weight_on_input = 1`.
    WeightedSum,
    /// `unpermute_weighted_sum`: `combined in_dt [rows,H] Read`,
    /// `slots i32 [T,k] Read`, `weights f32 [T,k] Read`, `out dt [T,H] Write`.
    ///
    /// `out[t] = Σ_j w_j · combined[slots[t,j]]` over the slots `≥ 0` (the
    /// weight is left out with `weight_on_input = 1`). With `in_dtype = f32`
    /// it sums a GEMM's `f32` product (the down projection's reducing
    /// epilogue).
    UnpermuteWeightedSum,
    /// `shared_gate`: `x dt [T,H] Read`, `y dt [T,H] ReadWrite`,
    /// `w f32 [H] Read`. `y ← y · σ(Σ_h x_h · w_h)`.
    SharedGate,
    /// `add`: `a dt [T,H] Read`, `b dt [T,H] Read`, `out dt [T,H] Write`.
    /// `out = a + b`.
    Add,
    /// `gemm_store`: `acc f32 [T,H] Read`, `bias f32 [H] Read`,
    /// `out dt [T,H] Write`, where `H` = `hidden` is the row width (a GEMM's
    /// `n`, not necessarily the layer's hidden size).
    ///
    /// `out = acc + bias` with `bias = 1` (`bias` is read only then), else
    /// `out = acc`, rounded to `dt` on the store: what a backend whose GEMM
    /// leaves an `f32` product (cuBLAS with an `f32` output) does to finish
    /// it as the CPU backend does (bias added in `f32`, then rounded once).
    GemmStore,
}

impl Kind {
    /// Every kind, in the order of the book's table (router first).
    pub const ALL: [Kind; 19] = [
        Kind::RouterFused,
        Kind::RouterScores,
        Kind::RouterBias,
        Kind::RouterGroupSelect,
        Kind::RouterTopk,
        Kind::RouterNormalize,
        Kind::RouterScale,
        Kind::Permute,
        Kind::Pack,
        Kind::PermutePack,
        Kind::QuantizeFp8,
        Kind::DequantizeFp8,
        Kind::Activation,
        Kind::Unpermute,
        Kind::WeightedSum,
        Kind::UnpermuteWeightedSum,
        Kind::SharedGate,
        Kind::Add,
        Kind::GemmStore,
    ];

    /// The kernel's name in the book's table and in plans (also the name of
    /// the described [`Kernel`]).
    pub fn name(self) -> &'static str {
        match self {
            Kind::RouterFused => "router_fused",
            Kind::RouterScores => "router_scores",
            Kind::RouterBias => "router_bias",
            Kind::RouterGroupSelect => "router_groups",
            Kind::RouterTopk => "router_topk",
            Kind::RouterNormalize => "router_normalize",
            Kind::RouterScale => "router_scale",
            Kind::Permute => "permute",
            Kind::Pack => "pack",
            Kind::PermutePack => "permute_pack",
            Kind::QuantizeFp8 => "quantize_fp8",
            Kind::DequantizeFp8 => "dequantize_fp8",
            Kind::Activation => "activation",
            Kind::Unpermute => "unpermute",
            Kind::WeightedSum => "weighted_sum",
            Kind::UnpermuteWeightedSum => "unpermute_weighted_sum",
            Kind::SharedGate => "shared_gate",
            Kind::Add => "add",
            Kind::GemmStore => "gemm_store",
        }
    }

    /// The kind named `name` (the inverse of [`Kind::name`]).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a kernel could not be described.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescribeError {
    /// A constant the kernel needs is absent.
    Missing {
        kernel: &'static str,
        constant: &'static str,
    },
    /// A constant has a value the kernel cannot work with (or two values).
    Invalid {
        kernel: &'static str,
        constant: &'static str,
        value: i64,
        why: String,
    },
    /// The description failed the type checker: a bug in the library.
    Check(CheckError),
}

impl fmt::Display for DescribeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DescribeError::Missing { kernel, constant } => {
                write!(f, "kernel `{kernel}`: the constant `{constant}` is missing")
            }
            DescribeError::Invalid {
                kernel,
                constant,
                value,
                why,
            } => write!(
                f,
                "kernel `{kernel}`: the constant `{constant}` = {value} is invalid: {why}"
            ),
            DescribeError::Check(e) => write!(f, "internal error in the kernel library: {e}"),
        }
    }
}

impl std::error::Error for DescribeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DescribeError::Check(e) => Some(e),
            _ => None,
        }
    }
}

impl From<CheckError> for DescribeError {
    fn from(e: CheckError) -> DescribeError {
        DescribeError::Check(e)
    }
}

/// The kernel `kind` specialised with `constants` (name, value pairs as a
/// plan's kernel table lists them). See the module docs for which constants
/// each kernel needs and their defaults; every described kernel passes
/// [`crate::check::check`].
pub fn describe(kind: Kind, constants: &[(String, i64)]) -> Result<Kernel, DescribeError> {
    let c = Consts {
        kernel: kind.name(),
        list: constants,
    };
    match kind {
        Kind::RouterFused
        | Kind::RouterScores
        | Kind::RouterBias
        | Kind::RouterGroupSelect
        | Kind::RouterTopk
        | Kind::RouterNormalize
        | Kind::RouterScale => router::describe(kind, &c),
        Kind::Permute | Kind::PermutePack => permute(kind, &c),
        Kind::Pack => pack(&c),
        Kind::QuantizeFp8 => quantize(&c),
        Kind::DequantizeFp8 => dequantize(&c),
        Kind::Activation => activation(&c),
        Kind::Unpermute => unpermute(&c),
        Kind::WeightedSum => weighted_sum(&c),
        Kind::UnpermuteWeightedSum => unpermute_weighted_sum(&c),
        Kind::SharedGate => shared_gate(&c),
        Kind::Add => add(&c),
        Kind::GemmStore => gemm_store(&c),
    }
}

/// Largest `hidden`, `ffn` and `block`: keeps every index of a row well
/// inside `i64` and every buffer length inside what a launch can address.
const MAX_WIDTH: i64 = 1 << 30;

/// The constants of one kernel, with the kernel's name for errors.
pub(crate) struct Consts<'a> {
    pub(crate) kernel: &'static str,
    list: &'a [(String, i64)],
}

type Res<T> = Result<T, DescribeError>;

impl Consts<'_> {
    pub(crate) fn invalid(
        &self,
        constant: &'static str,
        value: i64,
        why: impl Into<String>,
    ) -> DescribeError {
        DescribeError::Invalid {
            kernel: self.kernel,
            constant,
            value,
            why: why.into(),
        }
    }

    /// The constant's value, if given (the same value however often).
    pub(crate) fn get(&self, name: &'static str) -> Res<Option<i64>> {
        let mut found: Option<i64> = None;
        for (n, v) in self.list {
            if n == name {
                match found {
                    Some(prev) if prev != *v => {
                        return Err(self.invalid(name, *v, format!("it is also given as {prev}")))
                    }
                    _ => found = Some(*v),
                }
            }
        }
        Ok(found)
    }

    pub(crate) fn required(&self, name: &'static str) -> Res<i64> {
        self.get(name)?.ok_or(DescribeError::Missing {
            kernel: self.kernel,
            constant: name,
        })
    }

    /// A required constant in `lo ..= hi`.
    pub(crate) fn range(&self, name: &'static str, lo: i64, hi: i64) -> Res<i64> {
        let v = self.required(name)?;
        if v < lo || v > hi {
            return Err(self.invalid(name, v, format!("it must be in {lo} ..= {hi}")));
        }
        Ok(v)
    }

    /// A `0`/`1` switch, `0` when absent.
    pub(crate) fn switch(&self, name: &'static str) -> Res<bool> {
        match self.get(name)? {
            None | Some(0) => Ok(false),
            Some(1) => Ok(true),
            Some(v) => Err(self.invalid(name, v, "it must be 0 or 1")),
        }
    }

    fn dtype_code(&self, name: &'static str, code: i64) -> Res<Elem> {
        match code {
            0 => Ok(Elem::F32),
            1 => Ok(Elem::Bf16),
            2 => Ok(Elem::F16),
            _ => Err(self.invalid(
                name,
                code,
                "an activation dtype is 0 (f32), 1 (bf16) or 2 (f16)",
            )),
        }
    }

    /// The activation storage type `dtype`.
    fn dtype(&self) -> Res<Elem> {
        let code = self.required("dtype")?;
        self.dtype_code("dtype", code)
    }

    /// `hidden`.
    fn hidden(&self) -> Res<i64> {
        self.range("hidden", 1, MAX_WIDTH)
    }

    /// `top_k`, for the kernels that need nothing else of the router.
    fn top_k(&self) -> Res<i64> {
        self.range("top_k", 1, i64::from(MAX_ARRAY_LEN))
    }
}

/// `permute` and `permute_pack`.
fn permute(kind: Kind, c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h, k) = (c.dtype()?, c.hidden()?, c.top_k()?);
    let weighted = c.switch("weight_on_input")?;
    let mut b = Builder::new(kind.name());
    let x = b.buffer("x", dt, Access::Read);
    let slots = b.buffer("slots", Elem::I32, Access::Read);
    let weights = b.buffer("weights", Elem::F32, Access::Read);
    let out_name = if kind == Kind::Permute {
        "permuted"
    } else {
        "send"
    };
    let out = b.buffer(out_name, dt, Access::Write);
    let t = b.row();
    let x_row = b.local("x_row", &t * h);
    let slot = b.var("slot", Ty::I64);
    let w = b.var("w", Ty::F32);
    b.for_range(0, k, |b, j| {
        b.set(slot, slots.at(&t * k + j));
        b.if_(ge(slot, 0), |b| {
            if weighted {
                b.set(w, weights.at(&t * k + j));
            }
            b.for_range(0, h, |b, i| {
                let v = x.at(x_row + i);
                let v = if weighted { v * w } else { v };
                b.store(out, slot * h + i, v);
            });
        });
    });
    Ok(b.finish()?)
}

/// `pack`.
fn pack(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h) = (c.dtype()?, c.hidden()?);
    let mut b = Builder::new(Kind::Pack.name());
    let src = b.buffer("permuted", dt, Access::Read);
    let dst = b.buffer("send", dt, Access::Write);
    let base = b.local("base", b.row() * h);
    b.for_range(0, h, |b, i| {
        b.store(dst, base + i, src.at(base + i));
    });
    Ok(b.finish()?)
}

/// The fp8 block size and the number of blocks of a row.
fn blocks(c: &Consts<'_>, h: i64) -> Res<(i64, i64)> {
    let block = c.range("block", 1, MAX_WIDTH)?;
    Ok((block, (h + block - 1) / block))
}

/// `quantize_fp8`.
fn quantize(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h) = (c.dtype()?, c.hidden()?);
    let (block, nb) = blocks(c, h)?;
    let mut b = Builder::new(Kind::QuantizeFp8.name());
    let input = b.buffer("in", dt, Access::Read);
    let q = b.buffer("q", Elem::Fp8E4m3, Access::Write);
    let scales = b.buffer("scales", Elem::F32, Access::Write);
    let t = b.row();
    let base = b.local("base", &t * h);
    let lo = b.var("lo", Ty::I64);
    let hi = b.var("hi", Ty::I64);
    let amax = b.var("amax", Ty::F32);
    let scale = b.var("scale", Ty::F32);
    b.for_range(0, nb, |b, blk| {
        b.set(lo, blk * block);
        b.set(hi, min(lo + block, h));
        b.set(amax, 0.0f32);
        b.for_range(lo, hi, |b, i| {
            b.set(amax, max(amax, abs(input.at(base + i))));
        });
        b.set(
            scale,
            select(eq(amax, 0.0f32), 1.0f32, amax / crate::scalar::FP8_E4M3_MAX),
        );
        b.store(scales, &t * nb + blk, scale);
        b.for_range(lo, hi, |b, i| {
            b.store(q, base + i, input.at(base + i) / scale);
        });
    });
    Ok(b.finish()?)
}

/// `dequantize_fp8`.
fn dequantize(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h) = (c.dtype()?, c.hidden()?);
    let (block, nb) = blocks(c, h)?;
    let mut b = Builder::new(Kind::DequantizeFp8.name());
    let q = b.buffer("q", Elem::Fp8E4m3, Access::Read);
    let scales = b.buffer("scales", Elem::F32, Access::Read);
    let out = b.buffer("out", dt, Access::Write);
    let t = b.row();
    let base = b.local("base", &t * h);
    let lo = b.var("lo", Ty::I64);
    let scale = b.var("scale", Ty::F32);
    b.for_range(0, nb, |b, blk| {
        b.set(lo, blk * block);
        b.set(scale, scales.at(&t * nb + blk));
        b.for_range(lo, min(lo + block, h), |b, i| {
            b.store(out, base + i, q.at(base + i) * scale);
        });
    });
    Ok(b.finish()?)
}

/// `activation`.
fn activation(c: &Consts<'_>) -> Res<Kernel> {
    let dt = c.dtype()?;
    let in_dt = match c.get("in_dtype")? {
        Some(code) => c.dtype_code("in_dtype", code)?,
        None => dt,
    };
    let f = c.range("ffn", 1, MAX_WIDTH)?;
    let gated_given = c.switch("gated")?;
    let act = match c.get("act")? {
        Some(a @ 0..=3) => a,
        Some(a) => {
            return Err(c.invalid(
                "act",
                a,
                "it must be 0 (swiglu), 1 (gelu), 2 (gelu_tanh) or 3 (relu)",
            ))
        }
        None if c.get("gated")? == Some(0) => {
            return Err(DescribeError::Missing {
                kernel: c.kernel,
                constant: "act",
            })
        }
        None => 0,
    };
    let gated = if c.get("gated")?.is_some() {
        gated_given
    } else {
        act == 0
    };
    if gated != (act == 0) {
        return Err(c.invalid(
            "gated",
            i64::from(gated),
            format!("act = {act} is gated exactly when it is swiglu (act = 0)"),
        ));
    }
    let clamped = c.switch("clamped")?;
    if clamped && act != 0 {
        return Err(c.invalid("clamped", 1, format!("only swiglu is clamped, act = {act}")));
    }

    let mut b = Builder::new(Kind::Activation.name());
    let input = b.buffer("in", in_dt, Access::Read);
    let out = b.buffer("out", dt, Access::Write);
    let limit = b.scalar("limit", Ty::F32);
    let t = b.row();
    let width = if gated { 2 * f } else { f };
    let in_row = b.local("in_row", &t * width);
    let out_row = b.local("out_row", &t * f);
    if gated {
        let g = b.var("g", Ty::F32);
        let u = b.var("u", Ty::F32);
        b.for_range(0, f, |b, i| {
            b.set(g, input.at(in_row + i));
            b.set(u, input.at(in_row + f + i));
            let v = if clamped {
                b.set(g, min(g, &limit));
                b.set(u, max(min(u, &limit), -&limit));
                (u + 1.0f32) * g * sigmoid(g * 1.702f32)
            } else {
                g * sigmoid(g) * u
            };
            b.store(out, out_row + i, v);
        });
    } else {
        let v = b.var("v", Ty::F32);
        b.for_range(0, f, |b, i| {
            b.set(v, input.at(in_row + i));
            let y = match act {
                1 => v * 0.5f32 * (erf(v / std::f32::consts::SQRT_2) + 1.0f32),
                2 => {
                    let cube = v * v * v;
                    let inner = (cube * 0.044715f32 + v) * sqrt_2_over_pi();
                    v * 0.5f32 * (tanh(inner) + 1.0f32)
                }
                _ => select(lt(v, 0.0f32), 0.0f32, v),
            };
            b.store(out, out_row + i, y);
        });
    }
    Ok(b.finish()?)
}

/// `√(2/π)` rounded once to `f32` (0.797_884_6).
fn sqrt_2_over_pi() -> f32 {
    (2.0f64 / std::f64::consts::PI).sqrt() as f32
}

/// `unpermute`.
fn unpermute(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h, k) = (c.dtype()?, c.hidden()?, c.top_k()?);
    let mut b = Builder::new(Kind::Unpermute.name());
    let combined = b.buffer("combined", dt, Access::Read);
    let slots = b.buffer("slots", Elem::I32, Access::Read);
    let out = b.buffer("unpermuted", dt, Access::Write);
    let t = b.row();
    let slot = b.var("slot", Ty::I64);
    let out_row = b.var("out_row", Ty::I64);
    b.for_range(0, k, |b, j| {
        b.set(slot, slots.at(&t * k + j));
        b.set(out_row, (&t * k + j) * h);
        b.if_else(
            ge(slot, 0),
            |b| {
                b.for_range(0, h, |b, i| {
                    b.store(out, out_row + i, combined.at(slot * h + i));
                });
            },
            |b| {
                b.for_range(0, h, |b, i| {
                    b.store(out, out_row + i, 0.0f32);
                });
            },
        );
    });
    Ok(b.finish()?)
}

/// `weighted_sum`.
fn weighted_sum(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h, k) = (c.dtype()?, c.hidden()?, c.top_k()?);
    let unweighted = c.switch("weight_on_input")?;
    let mut b = Builder::new(Kind::WeightedSum.name());
    let unpermuted = b.buffer("unpermuted", dt, Access::Read);
    let weights = b.buffer("weights", Elem::F32, Access::Read);
    let out = b.buffer("out", dt, Access::Write);
    let t = b.row();
    let w = b.array("w", Ty::F32, k as u32);
    if !unweighted {
        b.for_range(0, k, |b, j| b.array_set(w, j, weights.at(&t * k + j)));
    }
    let acc = b.var("acc", Ty::F32);
    let first = b.local("first", &t * k * h);
    b.for_range(0, h, |b, i| {
        b.set(acc, 0.0f32);
        b.for_range(0, k, |b, j| {
            let v = unpermuted.at(first + j * h + i);
            let v = if unweighted { v } else { w.at(j) * v };
            b.set(acc, acc + v);
        });
        b.store(out, &t * h + i, acc);
    });
    Ok(b.finish()?)
}

/// `unpermute_weighted_sum`.
fn unpermute_weighted_sum(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h, k) = (c.dtype()?, c.hidden()?, c.top_k()?);
    let in_dt = match c.get("in_dtype")? {
        Some(code) => c.dtype_code("in_dtype", code)?,
        None => dt,
    };
    let unweighted = c.switch("weight_on_input")?;
    let mut b = Builder::new(Kind::UnpermuteWeightedSum.name());
    let combined = b.buffer("combined", in_dt, Access::Read);
    let slots = b.buffer("slots", Elem::I32, Access::Read);
    let weights = b.buffer("weights", Elem::F32, Access::Read);
    let out = b.buffer("out", dt, Access::Write);
    let t = b.row();
    let s = b.array("s", Ty::I64, k as u32);
    let w = b.array("w", Ty::F32, k as u32);
    b.for_range(0, k, |b, j| {
        b.array_set(s, j, slots.at(&t * k + j));
        if !unweighted {
            b.array_set(w, j, weights.at(&t * k + j));
        }
    });
    let acc = b.var("acc", Ty::F32);
    b.for_range(0, h, |b, i| {
        b.set(acc, 0.0f32);
        b.for_range(0, k, |b, j| {
            b.if_(ge(s.at(j), 0), |b| {
                let v = combined.at(s.at(j) * h + i);
                let v = if unweighted { v } else { w.at(j) * v };
                b.set(acc, acc + v);
            });
        });
        b.store(out, &t * h + i, acc);
    });
    Ok(b.finish()?)
}

/// `shared_gate`.
fn shared_gate(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h) = (c.dtype()?, c.hidden()?);
    let mut b = Builder::new(Kind::SharedGate.name());
    let x = b.buffer("x", dt, Access::Read);
    let y = b.buffer("y", dt, Access::ReadWrite);
    let w = b.buffer("w", Elem::F32, Access::Read);
    let base = b.local("base", b.row() * h);
    let dot = b.local("dot", 0.0f32);
    b.for_range(0, h, |b, i| {
        b.set(dot, dot + x.at(base + i) * w.at(i));
    });
    let gate = b.local("gate", sigmoid(dot));
    b.for_range(0, h, |b, i| {
        b.store(y, base + i, y.at(base + i) * gate);
    });
    Ok(b.finish()?)
}

/// `add`.
fn add(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h) = (c.dtype()?, c.hidden()?);
    let mut b = Builder::new(Kind::Add.name());
    let x = b.buffer("a", dt, Access::Read);
    let y = b.buffer("b", dt, Access::Read);
    let out = b.buffer("out", dt, Access::Write);
    let base = b.local("base", b.row() * h);
    b.for_range(0, h, |b, i| {
        b.store(out, base + i, x.at(base + i) + y.at(base + i));
    });
    Ok(b.finish()?)
}

/// `gemm_store`.
fn gemm_store(c: &Consts<'_>) -> Res<Kernel> {
    let (dt, h) = (c.dtype()?, c.hidden()?);
    let with_bias = c.switch("bias")?;
    let mut b = Builder::new(Kind::GemmStore.name());
    let acc = b.buffer("acc", Elem::F32, Access::Read);
    let bias = b.buffer("bias", Elem::F32, Access::Read);
    let out = b.buffer("out", dt, Access::Write);
    let base = b.local("base", b.row() * h);
    b.for_range(0, h, |b, i| {
        if with_bias {
            b.store(out, base + i, acc.at(base + i) + bias.at(i));
        } else {
            b.store(out, base + i, acc.at(base + i));
        }
    });
    Ok(b.finish()?)
}

/// An `f32` expression for `-∞`.
pub(crate) fn neg_inf() -> E {
    E::from(f32::NEG_INFINITY)
}
