//! Cranelift JIT for the kernel description language.
//!
//! [`JitKernel::compile`] lowers a [`Kernel`] to one native function that
//! runs a range of rows, and [`JitKernel::launch`] (safe, on byte slices) or
//! [`JitKernel::launch_raw`] (on raw pointers, for the executor's arenas)
//! calls it. The generated code implements exactly the semantics documented
//! in [`moec_kernels::ir`]; the interpreter in `moec-kernels` is the oracle.
//!
//! # Why it looks the way it does
//!
//! - **Bit-identical to the interpreter.** `exp`, `log`, `tanh`, `erf` and
//!   the `f16` and `fp8` conversions are calls into the very functions of
//!   [`moec_kernels::scalar`] (through small `extern "C"` wrappers registered
//!   as JIT symbols), never a native approximation. `bf16` loads (a shift;
//!   a NaN gets the quiet bit) and stores (round to nearest even) are the
//!   same bit arithmetic as `half`, inline, so the common activation dtype
//!   costs no call. `min` and `max` are inline too and return exactly what
//!   `scalar::fmin`/`fmax` return (`f32::NAN` if either operand is NaN, the
//!   first operand of two equal ones, so `max(-0.0, 0.0)` is `-0.0`).
//!   `sqrt`, `floor`, `+ - * /` and the conversions between `i64` and `f32`
//!   are IEEE-exact native instructions.
//! - **Bounds checks stay on.** Every buffer and local-array access is checked
//!   against its length (`index as u64 < len`, one compare and a branch that
//!   is never taken). The kernels are memory-bound, so the check costs close
//!   to nothing, and it turns a wrong description, a wrong plan constant or a
//!   short buffer into [`LaunchError::OutOfBounds`] naming the buffer instead
//!   of silent memory corruption in a process that also holds model weights.
//!   The out-of-bounds path writes nothing; the failing row has stored only
//!   the elements before the failing access.
//! - **Integer division never traps.** A zero divisor branches to an error
//!   exit ([`LaunchError::DivideByZero`]); `i64::MIN / -1` wraps (the divisor
//!   `-1` is replaced by `1` and the quotient negated), as the language says.
//! - **No global state.** Variables are SSA values, local arrays live in one
//!   stack slot (or, above [`STACK_ARRAY_BYTES`], in a scratch block the
//!   launch allocates), and both are zeroed at the start of every row. So any
//!   number of threads may launch one [`JitKernel`] at once, on disjoint rows
//!   or on different buffers.
//! - **One function per kernel, one module per function.** Dropping the
//!   [`JitKernel`] frees its code.
//!
//! # The generated function's ABI
//!
//! ```text
//! extern "C" fn(args: *const u64, row_begin: i64, row_end: i64,
//!               status: *mut i64, scratch: *mut u8) -> i32
//! ```
//!
//! `args` holds, in parameter order, two slots per buffer parameter (base
//! address, length in elements) and one per scalar (`f32` bits in the low 32
//! bits, or the `i64`). The function runs rows `row_begin .. row_end` in
//! order and returns `0`, or on the first failure:
//!
//! | code | meaning | `status[0]` | `status[1]` |
//! | --- | --- | --- | --- |
//! | `1` | buffer index out of bounds | parameter index | index |
//! | `2` | local array index out of bounds | array index | index |
//! | `3` | integer division or remainder by zero | | |
//!
//! `scratch` is the local-array block when the arrays need more than
//! [`STACK_ARRAY_BYTES`] (8-byte aligned, [`JitKernel`] knows the size), and
//! is ignored otherwise.
//!
//! # Order of evaluation
//!
//! Operands are evaluated left to right, depth first; a load checks its index
//! after evaluating it; a store evaluates its index, then its value, then
//! checks the index. A `for` loop evaluates `start` then `end` once, assigns
//! the loop variable each iteration, and leaves it holding the last
//! iteration's value (unchanged if the loop did not run). The first failing
//! operation in that order is the one reported.
//!
//! # Cost
//!
//! The code is scalar (Cranelift does not vectorise): an `f32` copy loop is
//! about eight instructions per element, two of them the bounds checks,
//! roughly a non-vectorised Rust loop. `bf16` conversions add a few integer
//! instructions; `f16` and `fp8` conversions and `exp`, `log`, `tanh`, `erf`
//! are a call each. A launch costs a few tens of nanoseconds; compiling a
//! small kernel well under a millisecond.

use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, OnceLock, PoisonError};

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::immediates::Ieee32;
use cranelift_codegen::ir::{
    types, AbiParam, Block, BlockArg, FuncRef, InstBuilder, MemFlagsData, Signature, StackSlotData,
    StackSlotKind, Type, UserFuncName, Value,
};
use cranelift_codegen::isa::{OwnedTargetIsa, TargetFrontendConfig};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, FuncId, Linkage, Module};
use moec_kernels::ir::{
    Access, ArrayId, BinOp, Elem, Expr, Kernel, LaunchError, Param, ParamId, ParamKind, Stmt, Ty,
    UnOp, VarId, MAX_ARRAY_LEN, ROW,
};
use moec_kernels::scalar;

pub use moec_kernels::ir::Arg;

/// Local arrays up to this many bytes in total live in the generated
/// function's stack frame; larger ones in a scratch block each launch
/// allocates (a 65 536-entry `i64` array is 512 KiB, more than a worker
/// thread's stack should hold).
pub const STACK_ARRAY_BYTES: u64 = 64 * 1024;

/// Arrays up to this many bytes are zeroed with inline stores at the start
/// of each row; larger ones with a call to `memset`.
const INLINE_ZERO_BYTES: u64 = 256;

const RET_OK: i32 = 0;
const RET_OOB_BUFFER: i32 = 1;
const RET_OOB_ARRAY: i32 = 2;
const RET_DIV_ZERO: i32 = 3;

/// The generated function (see the module docs for the ABI).
type EntryFn = unsafe extern "C" fn(*const u64, i64, i64, *mut i64, *mut u8) -> i32;

/// A kernel could not be compiled: the description is ill-formed (a type
/// error, an undeclared variable, a store to a read-only buffer, ...) or
/// Cranelift rejected it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitError {
    /// The kernel's name.
    pub kernel: String,
    pub message: String,
}

impl fmt::Display for JitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot compile kernel `{}`: {}",
            self.kernel, self.message
        )
    }
}

impl std::error::Error for JitError {}

/// One launch argument for [`JitKernel::launch_raw`], in the order of the
/// kernel's parameters.
#[derive(Clone, Copy, Debug)]
pub enum RawArg {
    /// A buffer: its base address and its length in elements.
    Buf {
        ptr: *mut u8,
        len: u64,
    },
    F32(f32),
    I64(i64),
}

/// A compiled kernel. `Send + Sync`: any number of threads may launch it at
/// once (each launch keeps its state on its own stack).
pub struct JitKernel {
    name: String,
    params: Vec<Param>,
    /// Name and length of each local array (for error messages).
    arrays: Vec<(String, u32)>,
    /// `u64` slots of the `args` block.
    slots: usize,
    /// `u64` words of heap scratch a launch allocates (0: arrays on the stack).
    scratch_words: usize,
    entry: EntryFn,
    /// Owns the code `entry` points into. Only touched again by `Drop`; the
    /// mutex makes the kernel `Sync` (a `JITModule` is `Send` but not `Sync`).
    module: Mutex<Option<JITModule>>,
}

impl fmt::Debug for JitKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JitKernel")
            .field("name", &self.name)
            .field("params", &self.params)
            .field("entry", &(self.entry as *const u8))
            .finish_non_exhaustive()
    }
}

impl Drop for JitKernel {
    fn drop(&mut self) {
        let module = self
            .module
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(module) = module {
            // SAFETY: `drop` has the kernel exclusively, so no launch (which
            // borrows it) is running, and `entry` is never called again.
            unsafe { module.free_memory() };
        }
    }
}

impl JitKernel {
    /// Compiles `kernel` to native code for this machine.
    pub fn compile(kernel: &Kernel) -> Result<JitKernel, JitError> {
        let err = |message: String| JitError {
            kernel: kernel.name.clone(),
            message,
        };
        let mut built = build(kernel).map_err(err)?;
        let Built {
            module,
            ctx,
            func_id,
            layout,
        } = &mut built;
        module
            .define_function(*func_id, ctx)
            .map_err(|e| err(format!("code generation failed: {e:?}")))?;
        module.clear_context(ctx);
        module
            .finalize_definitions()
            .map_err(|e| err(format!("linking failed: {e}")))?;
        let code = module.get_finalized_function(*func_id);
        // SAFETY: `code` is the finalized function just defined with the
        // signature `entry_signature` builds, which is `EntryFn` under the
        // platform's C calling convention (the ISA default). It stays valid
        // while `module` lives, which `JitKernel` keeps until `drop`.
        let entry = unsafe { std::mem::transmute::<*const u8, EntryFn>(code) };
        let slots = layout.slots;
        let scratch_words = layout.scratch_words;
        Ok(JitKernel {
            name: kernel.name.clone(),
            params: kernel.params.clone(),
            arrays: kernel
                .arrays
                .iter()
                .map(|a| (a.name.clone(), a.len))
                .collect(),
            slots,
            scratch_words,
            entry,
            module: Mutex::new(Some(built.module)),
        })
    }

    /// The Cranelift IR of `kernel` before optimisation, for debugging.
    pub fn clif(kernel: &Kernel) -> Result<String, JitError> {
        let built = build(kernel).map_err(|message| JitError {
            kernel: kernel.name.clone(),
            message,
        })?;
        Ok(built.ctx.func.display().to_string())
    }

    /// The machine code Cranelift generates for `kernel` (its own listing
    /// of the final instructions, before linking), for performance work.
    pub fn disassembly(kernel: &Kernel) -> Result<String, JitError> {
        let err = |message: String| JitError {
            kernel: kernel.name.clone(),
            message,
        };
        let mut built = build(kernel).map_err(err)?;
        built.ctx.set_disasm(true);
        built
            .module
            .define_function(built.func_id, &mut built.ctx)
            .map_err(|e| err(format!("code generation failed: {e:?}")))?;
        Ok(built
            .ctx
            .compiled_code()
            .and_then(|c| c.vcode.clone())
            .unwrap_or_default())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Runs rows `0 .. rows` on byte-slice arguments.
    ///
    /// The arguments are checked against the parameters first (count; a
    /// `Write` or `ReadWrite` buffer needs [`Arg::Write`], a `Read` buffer
    /// takes either; a byte length that is a multiple of the element size;
    /// the scalar's type), failing with [`LaunchError::BadArguments`].
    pub fn launch(&self, args: &mut [Arg<'_>], rows: u64) -> Result<(), LaunchError> {
        if args.len() != self.params.len() {
            return Err(self.bad(format!(
                "{} arguments for {} parameters",
                args.len(),
                self.params.len()
            )));
        }
        let mut raw = Vec::with_capacity(args.len());
        for (arg, param) in args.iter_mut().zip(&self.params) {
            let what = |got: &str| {
                self.bad(format!(
                    "parameter `{}` is {}, got {got}",
                    param.name,
                    describe(param.kind)
                ))
            };
            raw.push(match (param.kind, arg) {
                (ParamKind::Buffer { elem, access }, Arg::Read(bytes)) => {
                    if access.writes() {
                        return Err(what("a read-only buffer"));
                    }
                    // The kernel never stores to a `Read` parameter (`compile`
                    // rejects that), so the `*mut` is never written through.
                    RawArg::Buf {
                        ptr: bytes.as_ptr().cast_mut(),
                        len: self.elements(&param.name, elem, bytes.len())?,
                    }
                }
                (ParamKind::Buffer { elem, .. }, Arg::Write(bytes)) => RawArg::Buf {
                    len: self.elements(&param.name, elem, bytes.len())?,
                    ptr: bytes.as_mut_ptr(),
                },
                (ParamKind::Scalar(Ty::F32), Arg::F32(v)) => RawArg::F32(*v),
                (ParamKind::Scalar(Ty::I64), Arg::I64(v)) => RawArg::I64(*v),
                (_, Arg::Read(_)) => return Err(what("a buffer")),
                (_, Arg::Write(_)) => return Err(what("a buffer")),
                (_, Arg::F32(_)) => return Err(what("an f32")),
                (_, Arg::I64(_)) => return Err(what("an i64")),
            });
        }
        // SAFETY: every buffer comes from a live slice of exactly `len`
        // elements borrowed for this call; writable parameters come from
        // `&mut` slices, which alias nothing else; read-only parameters are
        // never written (see above).
        unsafe { self.launch_raw(&raw, 0..rows) }
    }

    /// Runs rows `rows.start .. rows.end` on raw buffers.
    ///
    /// The argument kinds are checked ([`LaunchError::BadArguments`]); the
    /// pointers cannot be.
    ///
    /// # Safety
    ///
    /// For every buffer argument, `ptr` must be valid for reads of `len`
    /// elements of the parameter's element type (`len * elem.bytes()` bytes,
    /// no alignment required) for the duration of the call, and for writes
    /// when the parameter is `Write` or `ReadWrite`. While the call runs, no
    /// other thread may write any element this launch reads, nor read or
    /// write any element it writes (launches on disjoint row ranges of the
    /// same buffers are fine when, as the language requires, rows touch
    /// disjoint elements). Buffers the kernel writes must not overlap other
    /// buffers of the same launch unless the kernel tolerates it.
    pub unsafe fn launch_raw(&self, args: &[RawArg], rows: Range<u64>) -> Result<(), LaunchError> {
        if args.len() != self.params.len() {
            return Err(self.bad(format!(
                "{} arguments for {} parameters",
                args.len(),
                self.params.len()
            )));
        }
        let mut slots = Vec::with_capacity(self.slots);
        for (arg, param) in args.iter().zip(&self.params) {
            match (param.kind, *arg) {
                (ParamKind::Buffer { .. }, RawArg::Buf { ptr, len }) => {
                    slots.push(ptr as u64);
                    slots.push(len);
                }
                (ParamKind::Scalar(Ty::F32), RawArg::F32(v)) => slots.push(u64::from(v.to_bits())),
                (ParamKind::Scalar(Ty::I64), RawArg::I64(v)) => slots.push(v as u64),
                (kind, got) => {
                    let got = match got {
                        RawArg::Buf { .. } => "a buffer",
                        RawArg::F32(_) => "an f32",
                        RawArg::I64(_) => "an i64",
                    };
                    return Err(self.bad(format!(
                        "parameter `{}` is {}, got {got}",
                        param.name,
                        describe(kind)
                    )));
                }
            }
        }
        debug_assert_eq!(slots.len(), self.slots);
        if rows.start >= rows.end {
            return Ok(());
        }
        let (Ok(begin), Ok(end)) = (i64::try_from(rows.start), i64::try_from(rows.end)) else {
            return Err(self.bad(format!(
                "row range {}..{} goes past i64::MAX",
                rows.start, rows.end
            )));
        };
        let mut scratch = vec![0u64; self.scratch_words];
        let mut status = [0i64; 2];
        // SAFETY: `entry` was compiled for exactly this argument layout
        // (checked above) and is kept alive by `self.module`. `slots` holds
        // `self.slots` words, `status` two, `scratch` the words the arrays
        // need. The generated code bounds-checks every access, so it touches
        // only `len` elements of each buffer (the caller vouches for those),
        // its own stack frame, `scratch` and `status`; it does not unwind.
        let code = unsafe {
            (self.entry)(
                slots.as_ptr(),
                begin,
                end,
                status.as_mut_ptr(),
                scratch.as_mut_ptr().cast::<u8>(),
            )
        };
        match code {
            RET_OK => Ok(()),
            RET_OOB_BUFFER => {
                let p = status[0] as usize;
                let len = match args.get(p) {
                    Some(RawArg::Buf { len, .. }) => *len,
                    _ => 0,
                };
                Err(LaunchError::OutOfBounds {
                    param: self
                        .params
                        .get(p)
                        .map_or_else(String::new, |p| p.name.clone()),
                    index: status[1],
                    len,
                })
            }
            RET_OOB_ARRAY => {
                let (name, len) = self
                    .arrays
                    .get(status[0] as usize)
                    .cloned()
                    .unwrap_or_default();
                Err(LaunchError::OutOfBounds {
                    param: name,
                    index: status[1],
                    len: u64::from(len),
                })
            }
            RET_DIV_ZERO => Err(LaunchError::DivideByZero),
            other => Err(self.bad(format!("internal error: kernel returned {other}"))),
        }
    }

    fn bad(&self, why: String) -> LaunchError {
        LaunchError::BadArguments(format!("kernel `{}`: {why}", self.name))
    }

    fn elements(&self, name: &str, elem: Elem, bytes: usize) -> Result<u64, LaunchError> {
        if bytes % elem.bytes() != 0 {
            return Err(self.bad(format!(
                "buffer `{name}` has {bytes} bytes, not a multiple of {} ({})",
                elem.bytes(),
                elem.name()
            )));
        }
        Ok((bytes / elem.bytes()) as u64)
    }
}

fn describe(kind: ParamKind) -> String {
    match kind {
        ParamKind::Buffer { elem, access } => {
            let access = match access {
                Access::Read => "read",
                Access::Write => "write",
                Access::ReadWrite => "read-write",
            };
            format!("a {access} {} buffer", elem.name())
        }
        ParamKind::Scalar(Ty::F32) => "an f32 scalar".to_string(),
        ParamKind::Scalar(Ty::I64) => "an i64 scalar".to_string(),
        ParamKind::Scalar(Ty::Bool) => "a bool scalar".to_string(),
    }
}

// ---------------------------------------------------------------------------
// The scalar functions generated code calls.

extern "C" fn jit_exp(v: f32) -> f32 {
    scalar::exp(v)
}
extern "C" fn jit_log(v: f32) -> f32 {
    scalar::log(v)
}
extern "C" fn jit_tanh(v: f32) -> f32 {
    scalar::tanh(v)
}
extern "C" fn jit_erf(v: f32) -> f32 {
    scalar::erf(v)
}
extern "C" fn jit_f16_to_f32(bits: u32) -> f32 {
    scalar::f16_to_f32(bits as u16)
}
extern "C" fn jit_f32_to_f16(v: f32) -> u32 {
    u32::from(scalar::f32_to_f16(v))
}
extern "C" fn jit_fp8_to_f32(bits: u32) -> f32 {
    scalar::fp8_e4m3_to_f32(bits as u8)
}
extern "C" fn jit_f32_to_fp8(v: f32) -> u32 {
    u32::from(scalar::f32_to_fp8_e4m3(v))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Helper {
    Exp,
    Log,
    Tanh,
    Erf,
    F16ToF32,
    F32ToF16,
    Fp8ToF32,
    F32ToFp8,
}

impl Helper {
    const ALL: [Helper; 8] = [
        Helper::Exp,
        Helper::Log,
        Helper::Tanh,
        Helper::Erf,
        Helper::F16ToF32,
        Helper::F32ToF16,
        Helper::Fp8ToF32,
        Helper::F32ToFp8,
    ];

    fn symbol(self) -> &'static str {
        match self {
            Helper::Exp => "moec_jit_exp",
            Helper::Log => "moec_jit_log",
            Helper::Tanh => "moec_jit_tanh",
            Helper::Erf => "moec_jit_erf",
            Helper::F16ToF32 => "moec_jit_f16_to_f32",
            Helper::F32ToF16 => "moec_jit_f32_to_f16",
            Helper::Fp8ToF32 => "moec_jit_fp8_to_f32",
            Helper::F32ToFp8 => "moec_jit_f32_to_fp8",
        }
    }

    fn address(self) -> *const u8 {
        let float: extern "C" fn(f32) -> f32 = match self {
            Helper::Exp => jit_exp,
            Helper::Log => jit_log,
            Helper::Tanh => jit_tanh,
            Helper::Erf => jit_erf,
            Helper::F16ToF32 => return jit_f16_to_f32 as *const u8,
            Helper::Fp8ToF32 => return jit_fp8_to_f32 as *const u8,
            Helper::F32ToF16 => return jit_f32_to_f16 as *const u8,
            Helper::F32ToFp8 => return jit_f32_to_fp8 as *const u8,
        };
        float as *const u8
    }

    /// Parameter and result type.
    fn types(self) -> (Type, Type) {
        match self {
            Helper::Exp | Helper::Log | Helper::Tanh | Helper::Erf => (types::F32, types::F32),
            Helper::F16ToF32 | Helper::Fp8ToF32 => (types::I32, types::F32),
            Helper::F32ToF16 | Helper::F32ToFp8 => (types::F32, types::I32),
        }
    }
}

// ---------------------------------------------------------------------------
// Building the function.

/// The host ISA with moec's flags, built once per process.
fn native_isa() -> Result<OwnedTargetIsa, String> {
    static ISA: OnceLock<Result<OwnedTargetIsa, String>> = OnceLock::new();
    ISA.get_or_init(|| {
        let mut flags = settings::builder();
        for (name, value) in [
            ("opt_level", "speed"),
            // cranelift-jit needs these two.
            ("is_pic", "false"),
            ("use_colocated_libcalls", "false"),
            // Frames with large local arrays touch every page on the way
            // down, so they hit the guard page instead of jumping over it.
            ("enable_probestack", "true"),
            ("probestack_strategy", "inline"),
        ] {
            flags
                .set(name, value)
                .map_err(|e| format!("setting {name}={value}: {e}"))?;
        }
        let isa = cranelift_native::builder()
            .map_err(|e| format!("this host is not supported by Cranelift: {e}"))?;
        isa.finish(settings::Flags::new(flags))
            .map_err(|e| format!("cannot configure the native ISA: {e}"))
    })
    .clone()
}

struct FrameLayout {
    slots: usize,
    /// Byte offset of each local array in the array block.
    array_offsets: Vec<u32>,
    array_bytes: u64,
    scratch_words: usize,
}

struct Built {
    module: JITModule,
    ctx: cranelift_codegen::Context,
    func_id: FuncId,
    layout: FrameLayout,
}

fn value_type(ty: Ty) -> Type {
    match ty {
        Ty::F32 => types::F32,
        Ty::I64 => types::I64,
        Ty::Bool => types::I8,
    }
}

fn array_elem_bytes(ty: Ty) -> u64 {
    match ty {
        Ty::F32 => 4,
        Ty::I64 => 8,
        Ty::Bool => 1,
    }
}

/// Checks what the code generator relies on before it starts, and lays out
/// the argument block and the local arrays.
fn check_declarations(kernel: &Kernel) -> Result<FrameLayout, String> {
    if kernel.name.is_empty()
        || !kernel
            .name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
    {
        return Err("the name must be non-empty and made of [a-z0-9_]".to_string());
    }
    match kernel.vars.first() {
        Some(row) if row.ty == Ty::I64 => {}
        _ => return Err("variable 0 must be the row index, of type i64".to_string()),
    }
    let mut slots = 0;
    for p in &kernel.params {
        slots += match p.kind {
            ParamKind::Buffer { .. } => 2,
            ParamKind::Scalar(Ty::F32 | Ty::I64) => 1,
            ParamKind::Scalar(Ty::Bool) => {
                return Err(format!("scalar parameter `{}` cannot be a bool", p.name))
            }
        };
    }
    let mut array_offsets = Vec::with_capacity(kernel.arrays.len());
    let mut offset = 0u64;
    for a in &kernel.arrays {
        if a.len > MAX_ARRAY_LEN {
            return Err(format!(
                "array `{}` has {} elements, more than {MAX_ARRAY_LEN}",
                a.name, a.len
            ));
        }
        array_offsets.push(u32::try_from(offset).map_err(|_| "local arrays too large")?);
        offset += (u64::from(a.len) * array_elem_bytes(a.ty)).next_multiple_of(8);
    }
    let scratch_words = if offset > STACK_ARRAY_BYTES {
        usize::try_from(offset / 8).map_err(|_| "local arrays too large")?
    } else {
        0
    };
    Ok(FrameLayout {
        slots,
        array_offsets,
        array_bytes: offset,
        scratch_words,
    })
}

fn entry_signature(module: &JITModule) -> Signature {
    let mut sig = module.make_signature();
    for ty in [types::I64; 5] {
        sig.params.push(AbiParam::new(ty));
    }
    sig.returns.push(AbiParam::new(types::I32));
    sig
}

fn build(kernel: &Kernel) -> Result<Built, String> {
    let layout = check_declarations(kernel)?;
    let isa = native_isa()?;
    let mut jit = JITBuilder::with_isa(isa, default_libcall_names());
    for h in Helper::ALL {
        jit.symbol(h.symbol(), h.address());
    }
    let mut module = JITModule::new(jit);
    let config = module.target_config();
    if config.pointer_type() != types::I64 {
        return Err("the JIT needs a 64-bit target".to_string());
    }

    let mut helper_ids = Vec::with_capacity(Helper::ALL.len());
    for h in Helper::ALL {
        let (param, ret) = h.types();
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(param));
        sig.returns.push(AbiParam::new(ret));
        let id = module
            .declare_function(h.symbol(), Linkage::Import, &sig)
            .map_err(|e| e.to_string())?;
        helper_ids.push(id);
    }

    let sig = entry_signature(&module);
    let func_id = module
        .declare_function(&kernel.name, Linkage::Export, &sig)
        .map_err(|e| e.to_string())?;
    let mut ctx = module.make_context();
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, func_id.as_u32());
    let helpers: Vec<FuncRef> = helper_ids
        .iter()
        .map(|id| module.declare_func_in_func(*id, &mut ctx.func))
        .collect();

    let mut fctx = FunctionBuilderContext::new();
    let b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
    let mut gen = Gen {
        k: kernel,
        b,
        config,
        helpers,
        vars: Vec::new(),
        params: Vec::new(),
        arrays: Vec::new(),
        array_block: None,
        status: None,
        oob_buffer: vec![None; kernel.params.len()],
        oob_array: vec![None; kernel.arrays.len()],
        oob_exits: Vec::new(),
        div_zero: None,
        loop_vars: Vec::new(),
    };
    gen.function(&layout)?;
    gen.b.seal_all_blocks();
    gen.b.finalize(config);
    Ok(Built {
        module,
        ctx,
        func_id,
        layout,
    })
}

#[derive(Clone, Copy)]
enum ParamVal {
    Buffer {
        ptr: Value,
        len: Value,
        elem: Elem,
        access: Access,
    },
    Scalar(Value, Ty),
}

#[derive(Clone, Copy)]
struct ArrayVal {
    base: Value,
    ty: Ty,
    len: u32,
}

struct Gen<'k, 'f> {
    k: &'k Kernel,
    b: FunctionBuilder<'f>,
    config: TargetFrontendConfig,
    /// Indexed like `Helper::ALL`.
    helpers: Vec<FuncRef>,
    vars: Vec<Variable>,
    params: Vec<ParamVal>,
    arrays: Vec<ArrayVal>,
    /// Base address and size of all local arrays.
    array_block: Option<(Value, u64)>,
    status: Option<Value>,
    /// The out-of-bounds exit of each buffer parameter and each array, made
    /// on first use: a cold block taking the index (so the hot path passes
    /// one value, not also a constant naming the buffer).
    oob_buffer: Vec<Option<Block>>,
    oob_array: Vec<Option<Block>>,
    /// Every such exit with what it reports: `(block, code, which)`.
    oob_exits: Vec<(Block, i32, u32)>,
    div_zero: Option<Block>,
    /// Variables of the enclosing `for` loops (a body must not assign them).
    loop_vars: Vec<VarId>,
}

/// Buffer accesses: bounds-checked, so they never trap; not known aligned.
fn buffer_flags() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Accesses of the argument block, the status and the local arrays.
fn trusted() -> MemFlagsData {
    MemFlagsData::trusted()
}

const NO_ARGS: &[BlockArg] = &[];

impl Gen<'_, '_> {
    fn function(&mut self, layout: &FrameLayout) -> Result<(), String> {
        let k = self.k;
        let entry = self.b.create_block();
        self.b.append_block_params_for_function_params(entry);
        self.b.switch_to_block(entry);
        let p = self.b.block_params(entry).to_vec();
        let (args, row_begin, row_end, status, scratch) = (p[0], p[1], p[2], p[3], p[4]);
        self.status = Some(status);

        // Arguments: read once, before the row loop.
        let mut slot = 0i32;
        for param in &k.params {
            let val = match param.kind {
                ParamKind::Buffer { elem, access } => {
                    let ptr = self.b.ins().load(types::I64, trusted(), args, slot * 8);
                    let len = self.b.ins().load(types::I64, trusted(), args, slot * 8 + 8);
                    slot += 2;
                    ParamVal::Buffer {
                        ptr,
                        len,
                        elem,
                        access,
                    }
                }
                ParamKind::Scalar(Ty::F32) => {
                    let v = self.b.ins().load(types::F32, trusted(), args, slot * 8);
                    slot += 1;
                    ParamVal::Scalar(v, Ty::F32)
                }
                ParamKind::Scalar(ty) => {
                    let v = self.b.ins().load(types::I64, trusted(), args, slot * 8);
                    slot += 1;
                    ParamVal::Scalar(v, ty)
                }
            };
            self.params.push(val);
        }

        // Local arrays: one block, on the stack or in the launch's scratch.
        if layout.array_bytes > 0 {
            let base = if layout.scratch_words > 0 {
                scratch
            } else {
                let size = u32::try_from(layout.array_bytes).map_err(|_| "arrays too large")?;
                let ss = self.b.create_sized_stack_slot(StackSlotData::new(
                    StackSlotKind::ExplicitSlot,
                    size,
                    4,
                ));
                self.b.ins().stack_addr(types::I64, ss, 0)
            };
            self.array_block = Some((base, layout.array_bytes));
            for (a, off) in k.arrays.iter().zip(&layout.array_offsets) {
                let base = self.b.ins().iadd_imm_s(base, i64::from(*off));
                self.arrays.push(ArrayVal {
                    base,
                    ty: a.ty,
                    len: a.len,
                });
            }
        } else {
            for a in &k.arrays {
                // Zero-length arrays: every access fails its bounds check.
                self.arrays.push(ArrayVal {
                    base: scratch,
                    ty: a.ty,
                    len: a.len,
                });
            }
        }

        for v in &k.vars {
            let var = self.b.declare_var(value_type(v.ty));
            self.vars.push(var);
        }

        // The row loop.
        let header = self.b.create_block();
        let row = self.b.append_block_param(header, types::I64);
        let body = self.b.create_block();
        let exit = self.b.create_block();
        self.b.ins().jump(header, &[BlockArg::Value(row_begin)]);

        self.b.switch_to_block(header);
        let more = self.b.ins().icmp(IntCC::SignedLessThan, row, row_end);
        self.b.ins().brif(more, body, NO_ARGS, exit, NO_ARGS);

        self.b.switch_to_block(body);
        for (i, v) in k.vars.iter().enumerate() {
            let zero = self.zero(v.ty);
            self.b.def_var(self.vars[i], zero);
        }
        self.b.def_var(self.vars[ROW.0 as usize], row);
        if let Some((base, bytes)) = self.array_block {
            self.zero_bytes(base, bytes);
        }
        self.stmts(&k.body)?;
        let next = self.b.ins().iadd_imm_s(row, 1);
        self.b.ins().jump(header, &[BlockArg::Value(next)]);

        self.b.switch_to_block(exit);
        let ok = self.b.ins().iconst(types::I32, i64::from(RET_OK));
        self.b.ins().return_(&[ok]);

        self.error_exits();
        Ok(())
    }

    fn zero(&mut self, ty: Ty) -> Value {
        match ty {
            Ty::F32 => self.b.ins().f32const(Ieee32::with_bits(0)),
            Ty::I64 => self.b.ins().iconst(types::I64, 0),
            Ty::Bool => self.b.ins().iconst(types::I8, 0),
        }
    }

    /// Zeroes `bytes` (a multiple of 8) bytes at the 8-byte aligned `base`.
    fn zero_bytes(&mut self, base: Value, bytes: u64) {
        if bytes <= INLINE_ZERO_BYTES {
            let zero = self.b.ins().iconst(types::I64, 0);
            for off in (0..bytes).step_by(8) {
                self.b.ins().store(trusted(), zero, base, off as i32);
            }
        } else {
            let zero = self.b.ins().iconst(types::I8, 0);
            let size = self.b.ins().iconst(types::I64, bytes as i64);
            self.b.call_memset(self.config, base, zero, size);
        }
    }

    fn error_exits(&mut self) {
        let Some(status) = self.status else { return };
        for (block, code, which) in std::mem::take(&mut self.oob_exits) {
            self.b.switch_to_block(block);
            let index = self.b.block_params(block)[0];
            let which = self.b.ins().iconst(types::I64, i64::from(which));
            self.b.ins().store(trusted(), which, status, 0);
            self.b.ins().store(trusted(), index, status, 8);
            let code = self.b.ins().iconst(types::I32, i64::from(code));
            self.b.ins().return_(&[code]);
        }
        if let Some(block) = self.div_zero {
            self.b.switch_to_block(block);
            let code = self.b.ins().iconst(types::I32, i64::from(RET_DIV_ZERO));
            self.b.ins().return_(&[code]);
        }
    }

    /// A cold exit taking the index, reporting `code` and `which`.
    fn oob_exit(&mut self, code: i32, which: u32) -> Block {
        let block = self.b.create_block();
        self.b.append_block_param(block, types::I64);
        self.b.set_cold_block(block);
        self.oob_exits.push((block, code, which));
        block
    }

    fn oob_buffer_block(&mut self, id: ParamId) -> Block {
        match self.oob_buffer[id.0 as usize] {
            Some(b) => b,
            None => {
                let b = self.oob_exit(RET_OOB_BUFFER, id.0);
                self.oob_buffer[id.0 as usize] = Some(b);
                b
            }
        }
    }

    fn oob_array_block(&mut self, id: ArrayId) -> Block {
        match self.oob_array[id.0 as usize] {
            Some(b) => b,
            None => {
                let b = self.oob_exit(RET_OOB_ARRAY, id.0);
                self.oob_array[id.0 as usize] = Some(b);
                b
            }
        }
    }

    fn div_zero_block(&mut self) -> Block {
        match self.div_zero {
            Some(b) => b,
            None => {
                let b = self.b.create_block();
                self.b.set_cold_block(b);
                self.div_zero = Some(b);
                b
            }
        }
    }

    /// Continues in a new block when `ok` is nonzero, else jumps to `err`
    /// with `args`.
    fn guard(&mut self, ok: Value, err: Block, args: &[Value]) {
        let cont = self.b.create_block();
        let args: Vec<BlockArg> = args.iter().map(|v| BlockArg::Value(*v)).collect();
        self.b.ins().brif(ok, cont, NO_ARGS, err, &args);
        self.b.switch_to_block(cont);
    }

    /// `base + index * size`, after checking `0 <= index < len`.
    fn element_address(&mut self, base: Value, index: Value, size: u64) -> Value {
        let shift = i64::from(size.trailing_zeros());
        let offset = if shift == 0 {
            index
        } else {
            self.b.ins().ishl_imm_u(index, shift)
        };
        self.b.ins().iadd(base, offset)
    }

    fn call(&mut self, helper: Helper, arg: Value) -> Value {
        let i = Helper::ALL
            .iter()
            .position(|h| *h == helper)
            .unwrap_or_default();
        let inst = self.b.ins().call(self.helpers[i], &[arg]);
        self.b.inst_results(inst)[0]
    }

    fn var(&self, id: VarId) -> Result<(Variable, Ty), String> {
        match self.k.vars.get(id.0 as usize) {
            Some(decl) => Ok((self.vars[id.0 as usize], decl.ty)),
            None => Err(format!("variable {} is not declared", id.0)),
        }
    }

    fn var_name(&self, id: VarId) -> &str {
        self.k.vars.get(id.0 as usize).map_or("?", |v| &v.name)
    }

    fn param(&self, id: ParamId) -> Result<(ParamVal, &str), String> {
        match self.k.params.get(id.0 as usize) {
            Some(p) => Ok((self.params[id.0 as usize], &p.name)),
            None => Err(format!("parameter {} is not declared", id.0)),
        }
    }

    fn buffer(&self, id: ParamId) -> Result<(Value, Value, Elem, Access, String), String> {
        match self.param(id)? {
            (
                ParamVal::Buffer {
                    ptr,
                    len,
                    elem,
                    access,
                },
                name,
            ) => Ok((ptr, len, elem, access, name.to_string())),
            (ParamVal::Scalar(..), name) => Err(format!("`{name}` is a scalar, not a buffer")),
        }
    }

    fn array(&self, id: ArrayId) -> Result<(ArrayVal, &str), String> {
        match self.k.arrays.get(id.0 as usize) {
            Some(a) => Ok((self.arrays[id.0 as usize], &a.name)),
            None => Err(format!("array {} is not declared", id.0)),
        }
    }

    fn index(&mut self, e: &Expr, what: &str) -> Result<Value, String> {
        let (v, ty) = self.expr(e)?;
        if ty != Ty::I64 {
            return Err(format!("the index into `{what}` is {ty:?}, not I64"));
        }
        Ok(v)
    }

    /// The checked address of element `index` of buffer `id`.
    fn buffer_address(
        &mut self,
        id: ParamId,
        ptr: Value,
        len: Value,
        index: Value,
        elem: Elem,
    ) -> Value {
        let ok = self.b.ins().icmp(IntCC::UnsignedLessThan, index, len);
        let err = self.oob_buffer_block(id);
        self.guard(ok, err, &[index]);
        self.element_address(ptr, index, elem.bytes() as u64)
    }

    /// The checked address of element `index` of local array `id`.
    fn array_address(&mut self, id: ArrayId, a: ArrayVal, index: Value) -> Value {
        let ok = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedLessThan, index, i64::from(a.len));
        let err = self.oob_array_block(id);
        self.guard(ok, err, &[index]);
        self.element_address(a.base, index, array_elem_bytes(a.ty))
    }

    fn stmts(&mut self, stmts: &[Stmt]) -> Result<(), String> {
        for s in stmts {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::Set(id, e) => {
                let (var, ty) = self.var(*id)?;
                if *id == ROW {
                    return Err("the row index (variable 0) cannot be assigned".to_string());
                }
                if self.loop_vars.contains(id) {
                    return Err(format!(
                        "loop variable `{}` is assigned in its loop",
                        self.var_name(*id)
                    ));
                }
                let (v, vty) = self.expr(e)?;
                if vty != ty {
                    return Err(format!(
                        "variable `{}` is {ty:?}, assigned {vty:?}",
                        self.var_name(*id)
                    ));
                }
                self.b.def_var(var, v);
            }
            Stmt::Store { buf, index, value } => {
                let (ptr, len, elem, access, name) = self.buffer(*buf)?;
                if !access.writes() {
                    return Err(format!("store to read-only buffer `{name}`"));
                }
                let i = self.index(index, &name)?;
                let (v, ty) = self.expr(value)?;
                if ty != elem.value_ty() {
                    return Err(format!("store of {ty:?} to `{name}` of {}", elem.name()));
                }
                let addr = self.buffer_address(*buf, ptr, len, i, elem);
                self.store_elem(elem, v, addr);
            }
            Stmt::ArrayStore {
                array,
                index,
                value,
            } => {
                let (a, name) = self.array(*array)?;
                let name = name.to_string();
                let i = self.index(index, &name)?;
                let (v, ty) = self.expr(value)?;
                if ty != a.ty {
                    return Err(format!("store of {ty:?} to array `{name}` of {:?}", a.ty));
                }
                let addr = self.array_address(*array, a, i);
                self.b.ins().store(trusted(), v, addr, 0);
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                let (v, ty) = self.var(*var)?;
                if ty != Ty::I64 || *var == ROW || self.loop_vars.contains(var) {
                    return Err(format!(
                        "`{}` cannot be a loop variable (it must be an i64 variable other than the row index and the enclosing loops' variables)",
                        self.var_name(*var)
                    ));
                }
                let (s, sty) = self.expr(start)?;
                let (e, ety) = self.expr(end)?;
                if sty != Ty::I64 || ety != Ty::I64 {
                    return Err(format!(
                        "the bounds of the loop over `{}` are {sty:?}..{ety:?}, not I64",
                        self.var_name(*var)
                    ));
                }
                let header = self.b.create_block();
                let counter = self.b.append_block_param(header, types::I64);
                let body_block = self.b.create_block();
                let exit = self.b.create_block();
                self.b.ins().jump(header, &[BlockArg::Value(s)]);
                self.b.switch_to_block(header);
                let more = self.b.ins().icmp(IntCC::SignedLessThan, counter, e);
                self.b.ins().brif(more, body_block, NO_ARGS, exit, NO_ARGS);
                self.b.switch_to_block(body_block);
                self.b.def_var(v, counter);
                self.loop_vars.push(*var);
                self.stmts(body)?;
                self.loop_vars.pop();
                let next = self.b.ins().iadd_imm_s(counter, 1);
                self.b.ins().jump(header, &[BlockArg::Value(next)]);
                self.b.switch_to_block(exit);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let (c, ty) = self.expr(cond)?;
                if ty != Ty::Bool {
                    return Err(format!("an `if` condition is {ty:?}, not Bool"));
                }
                let then_block = self.b.create_block();
                let else_block = self.b.create_block();
                let merge = self.b.create_block();
                self.b
                    .ins()
                    .brif(c, then_block, NO_ARGS, else_block, NO_ARGS);
                self.b.switch_to_block(then_block);
                self.stmts(then)?;
                self.b.ins().jump(merge, NO_ARGS);
                self.b.switch_to_block(else_block);
                self.stmts(otherwise)?;
                self.b.ins().jump(merge, NO_ARGS);
                self.b.switch_to_block(merge);
            }
        }
        Ok(())
    }

    fn expr(&mut self, e: &Expr) -> Result<(Value, Ty), String> {
        Ok(match e {
            Expr::F32(v) => (
                self.b.ins().f32const(Ieee32::with_bits(v.to_bits())),
                Ty::F32,
            ),
            Expr::I64(v) => (self.b.ins().iconst(types::I64, *v), Ty::I64),
            Expr::Bool(v) => (self.b.ins().iconst(types::I8, i64::from(*v)), Ty::Bool),
            Expr::Var(id) => {
                let (var, ty) = self.var(*id)?;
                (self.b.use_var(var), ty)
            }
            Expr::Scalar(id) => match self.param(*id)? {
                (ParamVal::Scalar(v, ty), _) => (v, ty),
                (ParamVal::Buffer { .. }, name) => {
                    return Err(format!("`{name}` is a buffer, not a scalar"))
                }
            },
            Expr::Load { buf, index } => {
                let (ptr, len, elem, _, name) = self.buffer(*buf)?;
                let i = self.index(index, &name)?;
                let addr = self.buffer_address(*buf, ptr, len, i, elem);
                (self.load_elem(elem, addr), elem.value_ty())
            }
            Expr::ArrayLoad { array, index } => {
                let (a, name) = self.array(*array)?;
                let name = name.to_string();
                let i = self.index(index, &name)?;
                let addr = self.array_address(*array, a, i);
                let v = self.b.ins().load(value_type(a.ty), trusted(), addr, 0);
                (v, a.ty)
            }
            Expr::Unary(op, a) => self.unary(*op, a)?,
            Expr::Binary(op, a, b) => self.binary(*op, a, b)?,
            Expr::Select(c, a, b) => {
                let (c, cty) = self.expr(c)?;
                let (a, aty) = self.expr(a)?;
                let (b, bty) = self.expr(b)?;
                if cty != Ty::Bool || aty != bty {
                    return Err(format!(
                        "select({cty:?}, {aty:?}, {bty:?}) needs a Bool condition and arms of one type"
                    ));
                }
                (self.b.ins().select(c, a, b), aty)
            }
        })
    }

    fn load_elem(&mut self, elem: Elem, addr: Value) -> Value {
        let f = buffer_flags();
        match elem {
            Elem::F32 => self.b.ins().load(types::F32, f, addr, 0),
            Elem::Bf16 => {
                let bits = self.b.ins().uload16(types::I32, f, addr, 0);
                self.bf16_to_f32(bits)
            }
            Elem::F16 => {
                let bits = self.b.ins().uload16(types::I32, f, addr, 0);
                self.call(Helper::F16ToF32, bits)
            }
            Elem::Fp8E4m3 => {
                let bits = self.b.ins().uload8(types::I32, f, addr, 0);
                self.call(Helper::Fp8ToF32, bits)
            }
            Elem::I32 => self.b.ins().sload32(f, addr, 0),
            Elem::U8 => self.b.ins().uload8(types::I64, f, addr, 0),
        }
    }

    fn store_elem(&mut self, elem: Elem, v: Value, addr: Value) {
        let f = buffer_flags();
        match elem {
            Elem::F32 => {
                self.b.ins().store(f, v, addr, 0);
            }
            Elem::Bf16 => {
                let bits = self.f32_to_bf16(v);
                self.b.ins().istore16(f, bits, addr, 0);
            }
            Elem::F16 => {
                let bits = self.call(Helper::F32ToF16, v);
                self.b.ins().istore16(f, bits, addr, 0);
            }
            Elem::Fp8E4m3 => {
                let bits = self.call(Helper::F32ToFp8, v);
                self.b.ins().istore8(f, bits, addr, 0);
            }
            Elem::I32 => {
                self.b.ins().istore32(f, v, addr, 0);
            }
            Elem::U8 => {
                self.b.ins().istore8(f, v, addr, 0);
            }
        }
    }

    /// `half::bf16::to_f32` of the bits in the `i32` `bits`: a shift, except
    /// that a NaN gets the quiet bit (as `half` does), so loads agree with
    /// the interpreter bit for bit.
    fn bf16_to_f32(&mut self, bits: Value) -> Value {
        let magnitude = self.b.ins().band_imm_u(bits, 0x7fff);
        let is_nan = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedGreaterThan, magnitude, 0x7f80);
        let quiet = self.b.ins().bor_imm_u(bits, 0x40);
        let bits = self.b.ins().select(is_nan, quiet, bits);
        let bits = self.b.ins().ishl_imm_u(bits, 16);
        self.b.ins().bitcast(types::F32, MemFlagsData::new(), bits)
    }

    /// `half::bf16::from_f32`'s bits (round to nearest even; a NaN keeps its
    /// top mantissa bits and gets the quiet bit), as an `i32` whose low 16
    /// bits are the result.
    fn f32_to_bf16(&mut self, v: Value) -> Value {
        let x = self.b.ins().bitcast(types::I32, MemFlagsData::new(), v);
        let high = self.b.ins().ushr_imm_u(x, 16);
        let magnitude = self.b.ins().band_imm_u(x, 0x7fff_ffff);
        let is_nan = self
            .b
            .ins()
            .icmp_imm_u(IntCC::UnsignedGreaterThan, magnitude, 0x7f80_0000);
        let nan = self.b.ins().bor_imm_u(high, 0x40);
        let round_bit = self.b.ins().band_imm_u(x, 0x8000);
        let has_round = self.b.ins().icmp_imm_u(IntCC::NotEqual, round_bit, 0);
        // Round up past the halfway point, or at it when the result is odd:
        // any of the bits below the round bit, or the result's lowest bit.
        let rest = self.b.ins().band_imm_u(x, 3 * 0x8000 - 1);
        let has_rest = self.b.ins().icmp_imm_u(IntCC::NotEqual, rest, 0);
        let round = self.b.ins().band(has_round, has_rest);
        let round = self.b.ins().uextend(types::I32, round);
        let rounded = self.b.ins().iadd(high, round);
        self.b.ins().select(is_nan, nan, rounded)
    }

    fn unary(&mut self, op: UnOp, a: &Expr) -> Result<(Value, Ty), String> {
        let (v, ty) = self.expr(a)?;
        Ok(match (op, ty) {
            (UnOp::Neg, Ty::F32) => (self.b.ins().fneg(v), ty),
            (UnOp::Neg, Ty::I64) => (self.b.ins().ineg(v), ty),
            (UnOp::Abs, Ty::F32) => (self.b.ins().fabs(v), ty),
            (UnOp::Abs, Ty::I64) => (self.b.ins().iabs(v), ty),
            (UnOp::Exp, Ty::F32) => (self.call(Helper::Exp, v), ty),
            (UnOp::Log, Ty::F32) => (self.call(Helper::Log, v), ty),
            (UnOp::Tanh, Ty::F32) => (self.call(Helper::Tanh, v), ty),
            (UnOp::Erf, Ty::F32) => (self.call(Helper::Erf, v), ty),
            (UnOp::Sqrt, Ty::F32) => (self.b.ins().sqrt(v), ty),
            (UnOp::Floor, Ty::F32) => (self.b.ins().floor(v), ty),
            (UnOp::Not, Ty::Bool) => (self.b.ins().bxor_imm_u(v, 1), ty),
            (UnOp::ToF32, Ty::I64) => (self.b.ins().fcvt_from_sint(types::F32, v), Ty::F32),
            (UnOp::ToI64, Ty::F32) => (self.b.ins().fcvt_to_sint_sat(types::I64, v), Ty::I64),
            _ => return Err(format!("{op:?} does not apply to {ty:?}")),
        })
    }

    fn binary(&mut self, op: BinOp, a: &Expr, b: &Expr) -> Result<(Value, Ty), String> {
        let (x, xt) = self.expr(a)?;
        let (y, yt) = self.expr(b)?;
        if xt != yt {
            return Err(format!("{op:?} of {xt:?} and {yt:?}"));
        }
        let ty = xt;
        let v = match (op, ty) {
            (BinOp::Add, Ty::F32) => self.b.ins().fadd(x, y),
            (BinOp::Add, Ty::I64) => self.b.ins().iadd(x, y),
            (BinOp::Sub, Ty::F32) => self.b.ins().fsub(x, y),
            (BinOp::Sub, Ty::I64) => self.b.ins().isub(x, y),
            (BinOp::Mul, Ty::F32) => self.b.ins().fmul(x, y),
            (BinOp::Mul, Ty::I64) => self.b.ins().imul(x, y),
            (BinOp::Div, Ty::F32) => self.b.ins().fdiv(x, y),
            (BinOp::Div, Ty::I64) => self.int_div_rem(x, y, false),
            (BinOp::Rem, Ty::I64) => self.int_div_rem(x, y, true),
            (BinOp::Min, Ty::F32) => self.float_min_max(x, y, FloatCC::LessThan),
            (BinOp::Min, Ty::I64) => self.b.ins().smin(x, y),
            (BinOp::Max, Ty::F32) => self.float_min_max(x, y, FloatCC::GreaterThan),
            (BinOp::Max, Ty::I64) => self.b.ins().smax(x, y),
            (BinOp::And, Ty::Bool) => self.b.ins().band(x, y),
            (BinOp::Or, Ty::Bool) => self.b.ins().bor(x, y),
            (cmp, Ty::F32) if cmp.is_comparison() => {
                let cc = match cmp {
                    BinOp::Lt => FloatCC::LessThan,
                    BinOp::Le => FloatCC::LessThanOrEqual,
                    BinOp::Gt => FloatCC::GreaterThan,
                    BinOp::Ge => FloatCC::GreaterThanOrEqual,
                    BinOp::Eq => FloatCC::Equal,
                    // Unordered or not equal: true when either is NaN.
                    _ => FloatCC::NotEqual,
                };
                return Ok((self.b.ins().fcmp(cc, x, y), Ty::Bool));
            }
            (cmp, Ty::I64) if cmp.is_comparison() => {
                let cc = match cmp {
                    BinOp::Lt => IntCC::SignedLessThan,
                    BinOp::Le => IntCC::SignedLessThanOrEqual,
                    BinOp::Gt => IntCC::SignedGreaterThan,
                    BinOp::Ge => IntCC::SignedGreaterThanOrEqual,
                    BinOp::Eq => IntCC::Equal,
                    _ => IntCC::NotEqual,
                };
                return Ok((self.b.ins().icmp(cc, x, y), Ty::Bool));
            }
            (BinOp::Eq, Ty::Bool) => self.b.ins().icmp(IntCC::Equal, x, y),
            (BinOp::Ne, Ty::Bool) => self.b.ins().icmp(IntCC::NotEqual, x, y),
            _ => return Err(format!("{op:?} does not apply to {ty:?}")),
        };
        Ok((v, ty))
    }

    /// `scalar::fmin` (`cc` is `LessThan`) or `scalar::fmax` (`GreaterThan`)
    /// bit for bit: `f32::NAN` when either operand is NaN, else `y` when it
    /// is strictly smaller (larger), else `x`, so of two equal operands
    /// (`0.0` and `-0.0`) the first. Cranelift's `fmin`/`fmax` would order
    /// `-0.0` below `0.0` and pass NaN payloads through.
    fn float_min_max(&mut self, x: Value, y: Value, cc: FloatCC) -> Value {
        let take_y = self.b.ins().fcmp(cc, y, x);
        let picked = self.b.ins().select(take_y, y, x);
        let unordered = self.b.ins().fcmp(FloatCC::Unordered, x, y);
        let nan = self.b.ins().f32const(Ieee32::with_bits(f32::NAN.to_bits()));
        self.b.ins().select(unordered, nan, picked)
    }

    /// Truncating `x / y` or `x % y` on `i64`: a zero divisor exits with
    /// `RET_DIV_ZERO`; `i64::MIN / -1` wraps to `i64::MIN` (and `% -1` is 0)
    /// instead of trapping.
    fn int_div_rem(&mut self, x: Value, y: Value, rem: bool) -> Value {
        let err = self.div_zero_block();
        self.guard(y, err, &[]);
        let minus_one = self.b.ins().icmp_imm_s(IntCC::Equal, y, -1);
        let one = self.b.ins().iconst(types::I64, 1);
        let divisor = self.b.ins().select(minus_one, one, y);
        if rem {
            // x % 1 == x % -1 == 0.
            self.b.ins().srem(x, divisor)
        } else {
            let q = self.b.ins().sdiv(x, divisor);
            let negated = self.b.ins().ineg(x);
            self.b.ins().select(minus_one, negated, q)
        }
    }
}
