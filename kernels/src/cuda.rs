//! CUDA C for kernel descriptions: the GPU backend's code generator.
//!
//! [`lower`] prints one [`Kernel`] as one `extern "C" __global__` function;
//! a [`Module`] collects the kernels of a plan into one translation unit with
//! the helper functions they use, in a stable order, with a content hash
//! ([`Module::hash`]) that keys the per-plan PTX cache. NVRTC compiles the
//! source at load time with [`NVRTC_OPTIONS`]; the source includes no header,
//! so only `libnvrtc` is needed.
//!
//! # What the generated code computes
//!
//! Exactly the semantics of [`crate::ir`], bit for bit what the interpreter
//! and the Cranelift backend compute:
//!
//! - **Conversions are explicit bit code**, a transcription of
//!   [`crate::scalar`] (which is `half`'s `bf16`/`f16` conversions and the
//!   fp8 e4m3 rounding of this crate): round to nearest even, fp8 saturating
//!   at ±448, and NaN payloads kept the way `half` keeps them. CUDA's
//!   `__float2bfloat16_rn` and `__nv_cvt_float_to_fp8` round the same way
//!   but canonicalise NaNs, and using them would need `cuda_bf16.h` and
//!   `cuda_fp8.h` on the include path.
//! - **`exp`, `log`, `tanh` and `erf` are transcriptions of the `libm`
//!   functions** the CPU calls (FreeBSD's `expf`, `logf`, `expm1f`, `tanhf`,
//!   `erff`, all single-precision arithmetic), with the same constants (printed
//!   from the same `f32` values), not CUDA's `expf` and friends, which differ
//!   from them in the last bit now and then.
//! - **No contraction:** [`NVRTC_OPTIONS`] has `--fmad=false`, so `a * b + c`
//!   rounds twice as the language says, never once as a fused multiply-add.
//!   Division and `sqrt` are IEEE (`--prec-div=true --prec-sqrt=true`),
//!   subnormals are kept (`--ftz=false`).
//! - `min`/`max` return NaN when either operand is NaN and otherwise the
//!   second operand only when it is strictly smaller (larger), as the
//!   Cranelift backend does; `i64` arithmetic wraps (it goes through
//!   `unsigned long long`, so the C++ compiler never sees signed overflow);
//!   `f32 -> i64` saturates and maps NaN to 0.
//! - **Evaluation order** is the Cranelift backend's: every operation that can
//!   fail (a load, a local-array access, an integer division) is emitted as a
//!   temporary in left-to-right, depth-first order; a store evaluates its
//!   index, then its value, then checks the index; a `for` loop evaluates its
//!   bounds once and leaves its variable holding the last iteration's value.
//!   Pure arithmetic stays a nested C expression.
//!
//! # Launch contract
//!
//! A kernel's parameters are the description's parameters in order (a buffer
//! is a pointer and its length in elements, `unsigned long long`; a scalar is
//! a `float` or a `long long`), then `long long rows`, then
//! `long long* status` (four words, zero before the launch), then, only when
//! [`CudaKernel::scratch_bytes_per_thread`] is not zero,
//! `unsigned char* scratch` of `gridDim.x · blockDim.x · scratch_bytes_per_thread`
//! bytes. Buffers are aligned to their element size; a buffer the kernel
//! writes overlaps no other buffer of the launch (the pointers are
//! `__restrict__`).
//!
//! In the thread-per-row shape one thread runs one row at a time, over rows
//! `blockIdx.x · blockDim.x + threadIdx.x` stepping by `gridDim.x ·
//! blockDim.x` (a grid-stride loop). In the block-per-row shape
//! ([`CudaKernel::block_per_row`], chosen by [`crate::parallel`]) a block runs
//! one row at a time (rows `blockIdx.x` stepping by `gridDim.x`) and the
//! row's shared loops hand iteration `start + threadIdx.x + n · blockDim.x`
//! to each thread. Either way any one-dimensional launch shape covers all
//! rows and computes the same bits. Every buffer and local
//! array access is bounds-checked. A failing access (or an integer division by
//! zero) writes nothing, records the failure in `status` if none is recorded
//! yet (an `atomicCAS` on word 0) and stops that thread; other threads finish
//! their rows. `status` then holds:
//!
//! | word | meaning |
//! | --- | --- |
//! | 0 | [`STATUS_OOB_BUFFER`], [`STATUS_OOB_ARRAY`] or [`STATUS_DIV_ZERO`] (0: no failure) |
//! | 1 | the parameter index (buffers) or the local array index |
//! | 2 | the index |
//! | 3 | the row |
//!
//! These are the Cranelift backend's return codes, so a backend turns them
//! into the same [`crate::ir::LaunchError`].
//!
//! Local arrays live in the thread's local memory (registers when the
//! compiler can) while they take at most [`LOCAL_ARRAY_BYTES`] together; a
//! kernel with larger arrays (a router over thousands of experts) keeps them
//! in the `scratch` block instead, `scratch_bytes_per_thread` per thread.
//!
//! **What to tune on a GPU:** the block-per-row shape coalesces the
//! streaming kernels; next are vector loads, the hardware `cvt` instructions
//! for `bf16` where NaN payloads need not be kept, and a per-kernel block
//! size, each to be measured on a GPU first.
//!
//! # Names
//!
//! No identifier of a `.moe` file reaches the source: a kernel's symbol is
//! `moec_<kind>_<hash>`, where `<kind>` is the description's name (the
//! library kind, `[a-z0-9_]+`) and `<hash>` 16 hex digits of the SHA3-256 of
//! the kernel's generated code, which is a function of the kind and its
//! constants only. Parameters, variables and local arrays are named by their
//! index with the description's name appended (`p0_logits`, `v3_slot`,
//! `a1_taken`); those names are the library's, sanitised to `[A-Za-z0-9_]`.
//! Equal kernels get equal symbols, so a [`Module`] holds each once.

use std::collections::BTreeSet;
use std::fmt::{self, Write as _};

use sha3::{Digest, Sha3_256};

use crate::check::{check, CheckError};
use crate::ir::{
    Access, ArrayId, BinOp, Elem, Expr, Kernel, Param, ParamId, ParamKind, Stmt, Ty, UnOp, VarId,
    ROW,
};

/// The NVRTC options the generated source is written for (the target
/// architecture, `--gpu-architecture=sm_90` say, comes on top).
pub const NVRTC_OPTIONS: [&str; 5] = [
    "--std=c++17",
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
];

/// Local arrays up to this many bytes in total live in a thread's local
/// memory; larger ones in the launch's scratch block.
pub const LOCAL_ARRAY_BYTES: u64 = 16 * 1024;

/// Words of the `status` block of a launch.
pub const STATUS_WORDS: usize = 4;
/// `status[0]` after a buffer access out of bounds (`status[1]`: the parameter).
pub const STATUS_OOB_BUFFER: i64 = 1;
/// `status[0]` after a local-array access out of bounds (`status[1]`: the array).
pub const STATUS_OOB_ARRAY: i64 = 2;
/// `status[0]` after an integer division or remainder by zero.
pub const STATUS_DIV_ZERO: i64 = 3;

/// A kernel could not be lowered: its description is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaError {
    /// The description's name.
    pub kernel: String,
    pub message: String,
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot generate CUDA C for kernel `{}`: {}",
            self.kernel, self.message
        )
    }
}

impl std::error::Error for CudaError {}

impl From<CheckError> for CudaError {
    fn from(e: CheckError) -> CudaError {
        CudaError {
            kernel: e.kernel,
            message: e.message,
        }
    }
}

/// One kernel as CUDA C.
#[derive(Clone, Debug, PartialEq)]
pub struct CudaKernel {
    name: String,
    kind: String,
    params: Vec<Param>,
    scratch_bytes_per_thread: u64,
    block_per_row: bool,
    helpers: BTreeSet<Helper>,
    text: String,
}

impl CudaKernel {
    /// The launch shape: a block per row (its threads share the row's
    /// parallel loops; see [`crate::parallel`]) rather than a thread per
    /// row. Any grid and block size computes the same result either way;
    /// this says which one is fast.
    pub fn block_per_row(&self) -> bool {
        self.block_per_row
    }

    /// The `extern "C"` symbol: `moec_<kind>_<hash>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description's name (the library kind).
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The description's parameters, which lead the launch parameters.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Bytes of the `scratch` block per thread (0: no `scratch` parameter).
    pub fn scratch_bytes_per_thread(&self) -> u64 {
        self.scratch_bytes_per_thread
    }

    /// The function's source (a comment with the description, then the
    /// function), without the helpers it calls.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The kernels of one plan as one translation unit.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Module {
    kernels: Vec<CudaKernel>,
}

impl Module {
    pub fn new() -> Module {
        Module::default()
    }

    /// Lowers `kernel` and adds it unless an equal kernel is there already;
    /// returns its index in [`Module::kernels`]. Kernels keep the order of
    /// their first `add`.
    pub fn add(&mut self, kernel: &Kernel) -> Result<usize, CudaError> {
        let k = lower(kernel)?;
        if let Some(i) = self.kernels.iter().position(|o| o.name == k.name) {
            if self.kernels[i].text != k.text {
                return Err(CudaError {
                    kernel: kernel.name.clone(),
                    message: format!("two different kernels hash to the symbol `{}`", k.name),
                });
            }
            return Ok(i);
        }
        self.kernels.push(k);
        Ok(self.kernels.len() - 1)
    }

    pub fn kernels(&self) -> &[CudaKernel] {
        &self.kernels
    }

    /// The translation unit: a header comment, the helpers the kernels call
    /// (each once, in a fixed order), then the kernels in order.
    pub fn source(&self) -> String {
        let mut helpers = BTreeSet::new();
        for k in &self.kernels {
            for h in &k.helpers {
                add_helper(&mut helpers, *h);
            }
        }
        let mut s = String::new();
        s.push_str(HEADER);
        s.push_str("// NVRTC options:");
        for o in NVRTC_OPTIONS {
            s.push(' ');
            s.push_str(o);
        }
        s.push_str(" (no header is included)\n");
        for h in &helpers {
            s.push('\n');
            s.push_str(&h.source());
        }
        for k in &self.kernels {
            s.push('\n');
            s.push_str(&k.text);
        }
        s
    }

    /// The content hash of [`Module::source`]: 32 hex digits (128 bits of
    /// SHA3-256). Equal sources, equal hashes; the per-plan cache key.
    pub fn hash(&self) -> String {
        hex(&Sha3_256::digest(self.source().as_bytes())[..16])
    }
}

const HEADER: &str = "\
// Generated by moec: the memory-bound kernels of one plan as CUDA C.
// Each kernel runs its description once per row, one thread per row in a
// grid-stride loop; every access is bounds-checked into `status`. The launch
// contract is in the moec book, \"The runtime\" > \"CUDA kernels\".
";

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Lowers one kernel description to CUDA C (see the module docs).
pub fn lower(kernel: &Kernel) -> Result<CudaKernel, CudaError> {
    check(kernel)?;
    let err = |message: String| CudaError {
        kernel: kernel.name.clone(),
        message,
    };
    let mut read = vec![false; kernel.vars.len()];
    mark_vars(&kernel.body, &mut read);
    let mut l = Lower {
        k: kernel,
        read: read.clone(),
        out: String::new(),
        depth: 2,
        temps: 0,
        loops: 0,
        helpers: BTreeSet::new(),
        ranges: Vec::new(),
        shared: BTreeSet::new(),
    };
    l.helpers.insert(Helper::Fail);

    // Local arrays: in local memory, or at offsets of a scratch block.
    let mut offsets = Vec::with_capacity(kernel.arrays.len());
    let mut total = 0u64;
    for a in &kernel.arrays {
        offsets.push(total);
        total += (u64::from(a.len) * elem_bytes(a.ty)).next_multiple_of(16);
    }
    let scratch = if total > LOCAL_ARRAY_BYTES { total } else { 0 };
    let shared = crate::parallel::parallel_loops(kernel, scratch > 0);
    let block_per_row = shared.is_some();
    l.shared = shared.unwrap_or_default();

    l.stmts(&kernel.body).map_err(err)?;
    let body = std::mem::take(&mut l.out);

    let mut text = String::new();
    // The description, as a comment (its declarations are the C ones).
    let _ = writeln!(text, "// {}:", kernel.name);
    for line in kernel.to_string().lines() {
        let t = line.trim_start();
        if !(t.starts_with("var ") || t.starts_with("array ")) {
            let _ = writeln!(text, "//   {line}");
        }
    }
    let mut sig = String::new();
    let mut params = Vec::new();
    for (i, p) in kernel.params.iter().enumerate() {
        let name = param_name(i, p);
        match p.kind {
            ParamKind::Buffer { elem, access } => {
                let konst = if access == Access::Read { "const " } else { "" };
                params.push(format!("{konst}{}* __restrict__ {name}", c_elem(elem)));
                params.push(format!("unsigned long long {name}_len"));
            }
            ParamKind::Scalar(ty) => params.push(format!("{} {name}", c_ty(ty))),
        }
    }
    params.push("long long moec_rows".to_string());
    params.push("long long* __restrict__ moec_status".to_string());
    if scratch > 0 {
        params.push("unsigned char* __restrict__ moec_scratch".to_string());
    }
    let _ = writeln!(sig, "(\n    {})\n{{", params.join(",\n    "));
    let i1 = "    ";
    let i2 = "        ";
    if !block_per_row {
        let _ = writeln!(
            sig,
            "{i1}const long long moec_step = (long long)gridDim.x * (long long)blockDim.x;"
        );
    }
    if scratch > 0 {
        let _ = writeln!(
            sig,
            "{i1}unsigned char* const moec_mine = moec_scratch + ((unsigned long long)blockIdx.x * blockDim.x + threadIdx.x) * {scratch}ull;"
        );
        for (i, a) in kernel.arrays.iter().enumerate() {
            let _ = writeln!(
                sig,
                "{i1}{ty}* const {name} = ({ty}*)(moec_mine + {off});",
                ty = c_ty(a.ty),
                name = array_name(ArrayId(i as u32), &a.name),
                off = offsets[i],
            );
        }
    }
    if block_per_row {
        // A block per row; the shared loops hand out their iterations.
        let _ = writeln!(
            sig,
            "{i1}for (long long moec_row = (long long)blockIdx.x; moec_row < moec_rows; moec_row += (long long)gridDim.x) {{"
        );
    } else {
        let _ = writeln!(
            sig,
            "{i1}for (long long moec_row = (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;\n{i1}     moec_row < moec_rows; moec_row += moec_step) {{"
        );
    }

    for (i, v) in kernel.vars.iter().enumerate() {
        let id = VarId(i as u32);
        if !read[i] {
            continue;
        }
        let name = var_name(id, &v.name);
        if id == ROW {
            let _ = writeln!(sig, "{i2}const long long {name} = moec_row;");
        } else {
            let _ = writeln!(sig, "{i2}{} {name} = {};", c_ty(v.ty), zero(v.ty));
        }
    }
    for (i, a) in kernel.arrays.iter().enumerate() {
        let name = array_name(ArrayId(i as u32), &a.name);
        if scratch == 0 {
            let _ = writeln!(sig, "{i2}{} {name}[{}];", c_ty(a.ty), a.len);
        }
        let _ = writeln!(
            sig,
            "{i2}for (int z = 0; z < {}; ++z) {name}[z] = {};",
            a.len,
            zero(a.ty)
        );
    }
    sig.push_str(&body);
    let _ = writeln!(sig, "{i1}}}\n}}");

    // The symbol hashes everything but itself.
    let mut h = Sha3_256::new();
    h.update(kernel.name.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.update(sig.as_bytes());
    let name = format!("moec_{}_{}", kernel.name, hex(&h.finalize()[..8]));
    let _ = write!(text, "extern \"C\" __global__ void {name}{sig}");
    Ok(CudaKernel {
        name,
        kind: kernel.name.clone(),
        params: kernel.params.clone(),
        scratch_bytes_per_thread: scratch,
        block_per_row,
        helpers: l.helpers,
        text,
    })
}

fn elem_bytes(ty: Ty) -> u64 {
    match ty {
        Ty::F32 => 4,
        Ty::I64 => 8,
        Ty::Bool => 1,
    }
}

fn c_ty(ty: Ty) -> &'static str {
    match ty {
        Ty::F32 => "float",
        Ty::I64 => "long long",
        Ty::Bool => "bool",
    }
}

fn zero(ty: Ty) -> &'static str {
    match ty {
        Ty::F32 => "0.0f",
        Ty::I64 => "0",
        Ty::Bool => "false",
    }
}

/// The C type of an element in memory.
fn c_elem(elem: Elem) -> &'static str {
    match elem {
        Elem::F32 => "float",
        Elem::Bf16 | Elem::F16 => "unsigned short",
        Elem::Fp8E4m3 | Elem::U8 => "unsigned char",
        Elem::I32 => "int",
    }
}

/// `[A-Za-z0-9_]` of a description name, at most 32 characters.
fn sanitize(name: &str) -> String {
    name.chars()
        .take(32)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn suffixed(prefix: char, id: u32, name: &str) -> String {
    let s = sanitize(name);
    if s.is_empty() {
        format!("{prefix}{id}")
    } else {
        format!("{prefix}{id}_{s}")
    }
}

fn param_name(i: usize, p: &Param) -> String {
    suffixed('p', i as u32, &p.name)
}

fn var_name(v: VarId, name: &str) -> String {
    suffixed('v', v.0, name)
}

fn array_name(a: ArrayId, name: &str) -> String {
    suffixed('a', a.0, name)
}

/// An `f32` constant as C: a decimal literal when the shortest decimal that
/// round-trips is exact enough that any C compiler reads back the same
/// `float`, else a hexadecimal literal (exact) with the decimal as a comment.
pub fn f32_literal(v: f32) -> String {
    if !v.is_finite() {
        let what = if v.is_nan() {
            "nan"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        };
        return format!("__uint_as_float(0x{:08x}u) /* {what} */", v.to_bits());
    }
    let s = format!("{v:?}");
    let exact = s
        .parse::<f64>()
        .is_ok_and(|d| d.to_bits() == f64::from(v).to_bits());
    let lit = if exact {
        format!("{s}f")
    } else {
        format!("{} /* {s} */", hex_float(v))
    };
    if v.is_sign_negative() {
        format!("({lit})")
    } else {
        lit
    }
}

/// A finite `f32` as an exact C++17 hexadecimal floating literal.
pub fn hex_float(v: f32) -> String {
    let bits = v.to_bits();
    let sign = if bits >> 31 != 0 { "-" } else { "" };
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0 && man == 0 {
        return format!("{sign}0.0f");
    }
    let (lead, e) = if exp == 0 { (0, -126) } else { (1, exp - 127) };
    // 23 mantissa bits, shifted to 24 to print as 6 hex digits.
    let digits = format!("{:06x}", man << 1);
    let digits = digits.trim_end_matches('0');
    if digits.is_empty() {
        format!("{sign}0x{lead}p{e:+}f")
    } else {
        format!("{sign}0x{lead}.{digits}p{e:+}f")
    }
}

fn i64_literal(v: i64) -> String {
    if v == i64::MIN {
        "(-9223372036854775807LL - 1LL)".to_string()
    } else if v < 0 {
        format!("({v}LL)")
    } else {
        format!("{v}LL")
    }
}

/// A lowered expression.
struct Val {
    code: String,
    ty: Ty,
    /// A literal or a temporary: evaluating it again costs nothing and sees
    /// the same value whatever ran in between.
    fixed: bool,
    /// `lo .. hi`, when the value is known to lie in it (an `i64` literal, or
    /// the variable of a loop with literal bounds inside that loop).
    range: Option<(i64, i64)>,
}

struct Lower<'k> {
    k: &'k Kernel,
    /// The variables the kernel reads.
    read: Vec<bool>,
    out: String,
    depth: usize,
    temps: u32,
    loops: u32,
    helpers: BTreeSet<Helper>,
    /// The variables of the enclosing loops with literal bounds, and those
    /// bounds (a loop variable is never assigned in its body).
    ranges: Vec<(VarId, i64, i64)>,
    /// Block-per-row shape: the loops (by pre-order number) whose
    /// iterations the block's threads share.
    shared: BTreeSet<u32>,
}

impl Lower<'_> {
    fn line(&mut self, s: &str) {
        for _ in 0..self.depth {
            self.out.push_str("    ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn temp(&mut self, ty: Ty, code: &str) -> Val {
        let name = format!("t{}", self.temps);
        self.temps += 1;
        self.line(&format!("const {} {name} = {code};", c_ty(ty)));
        Val {
            code: name,
            ty,
            fixed: true,
            range: None,
        }
    }

    fn fail(&mut self, cond: &str, code: i64, which: u32, index: &str) {
        self.line(&format!(
            "if ({cond}) {{ moec_fail(moec_status, {code}, {which}, {index}, moec_row); return; }}"
        ));
    }

    fn is_read(&self, v: VarId) -> bool {
        self.read.get(v.0 as usize).copied().unwrap_or(false)
    }

    fn var(&self, v: VarId) -> Result<(String, Ty), String> {
        let d = self
            .k
            .vars
            .get(v.0 as usize)
            .ok_or_else(|| format!("undeclared variable #{}", v.0))?;
        Ok((var_name(v, &d.name), d.ty))
    }

    fn array(&self, a: ArrayId) -> Result<(String, Ty, u32), String> {
        let d = self
            .k
            .arrays
            .get(a.0 as usize)
            .ok_or_else(|| format!("undeclared array #{}", a.0))?;
        Ok((array_name(a, &d.name), d.ty, d.len))
    }

    fn buffer(&self, p: ParamId) -> Result<(String, Elem), String> {
        let d = self
            .k
            .params
            .get(p.0 as usize)
            .ok_or_else(|| format!("undeclared parameter #{}", p.0))?;
        match d.kind {
            ParamKind::Buffer { elem, .. } => Ok((param_name(p.0 as usize, d), elem)),
            ParamKind::Scalar(_) => Err(format!("`{}` is a scalar, not a buffer", d.name)),
        }
    }

    /// An index, as a value that can be written twice (the check and the
    /// access): a literal, a temporary or a variable (nothing assigns a
    /// variable between an index's evaluation and its use), else a new
    /// temporary.
    fn index(&mut self, e: &Expr) -> Result<Val, String> {
        let is_var = matches!(e, Expr::Var(_));
        let v = self.expr(e)?;
        Ok(if v.fixed || is_var {
            v
        } else {
            self.temp(Ty::I64, &v.code)
        })
    }

    /// Checks `index` against a buffer and returns the element's lvalue.
    fn buffer_element(&mut self, p: ParamId, index: &Val) -> Result<(String, Elem), String> {
        let (name, elem) = self.buffer(p)?;
        self.fail(
            &format!("(unsigned long long){} >= {name}_len", index.code),
            STATUS_OOB_BUFFER,
            p.0,
            &index.code,
        );
        Ok((format!("{name}[{}]", index.code), elem))
    }

    /// Checks `index` against a local array (unless it is known to be in
    /// range: a literal, or a loop variable whose literal bounds fit) and
    /// returns the element's lvalue.
    fn array_element(&mut self, a: ArrayId, index: &Val) -> Result<(String, Ty), String> {
        let (name, ty, len) = self.array(a)?;
        let in_range = index
            .range
            .is_some_and(|(lo, hi)| lo >= 0 && hi <= i64::from(len));
        if !in_range {
            self.fail(
                &format!("(unsigned long long){} >= {len}ull", index.code),
                STATUS_OOB_ARRAY,
                a.0,
                &index.code,
            );
        }
        Ok((format!("{name}[{}]", index.code), ty))
    }

    fn stmts(&mut self, body: &[Stmt]) -> Result<(), String> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &Stmt) -> Result<(), String> {
        match s {
            Stmt::Set(v, e) => {
                let (name, _) = self.var(*v)?;
                let val = self.expr(e)?;
                if self.is_read(*v) {
                    self.line(&format!("{name} = {};", strip_parens(&val.code)));
                }
            }
            Stmt::Store { buf, index, value } => {
                let i = self.index(index)?;
                let val = self.expr(value)?;
                let (lvalue, elem) = self.buffer_element(*buf, &i)?;
                let stored = self.narrow(elem, &val.code);
                self.line(&format!("{lvalue} = {stored};"));
            }
            Stmt::ArrayStore {
                array,
                index,
                value,
            } => {
                let i = self.index(index)?;
                let val = self.expr(value)?;
                let (lvalue, _) = self.array_element(*array, &i)?;
                self.line(&format!("{lvalue} = {};", val.code));
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                let (name, _) = self.var(*var)?;
                let start = self.expr(start)?;
                let start = if start.fixed {
                    start
                } else {
                    self.temp(Ty::I64, &start.code)
                };
                let end = self.expr(end)?;
                let end = if end.fixed {
                    end
                } else {
                    self.temp(Ty::I64, &end.code)
                };
                let shared = self.shared.contains(&self.loops);
                let l = format!("l{}", self.loops);
                self.loops += 1;
                if shared {
                    self.line(&format!(
                        "for (long long {l} = {} + (long long)threadIdx.x; {l} < {}; {l} += (long long)blockDim.x) {{",
                        start.code, end.code
                    ));
                } else {
                    self.line(&format!(
                        "for (long long {l} = {}; {l} < {}; ++{l}) {{",
                        start.code, end.code
                    ));
                }
                self.depth += 1;
                if self.is_read(*var) {
                    self.line(&format!("{name} = {l};"));
                }
                // The variable is at least the least start and below the
                // largest end.
                let bounded = match (start.range, end.range) {
                    (Some((lo, _)), Some((_, end_hi))) => {
                        self.ranges.push((*var, lo, end_hi - 1));
                        true
                    }
                    _ => false,
                };
                self.stmts(body)?;
                if bounded {
                    self.ranges.pop();
                }
                self.depth -= 1;
                self.line("}");
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let c = self.expr(cond)?;
                self.line(&format!("if ({}) {{", strip_parens(&c.code)));
                self.depth += 1;
                self.stmts(then)?;
                self.depth -= 1;
                if otherwise.is_empty() {
                    self.line("}");
                } else {
                    self.line("} else {");
                    self.depth += 1;
                    self.stmts(otherwise)?;
                    self.depth -= 1;
                    self.line("}");
                }
            }
        }
        Ok(())
    }

    /// The value `v` (of the element's value type) as stored in `elem`.
    fn narrow(&mut self, elem: Elem, v: &str) -> String {
        match elem {
            Elem::F32 => v.to_string(),
            Elem::Bf16 => {
                self.helpers.insert(Helper::Bf16);
                format!("moec_f32_to_bf16({v})")
            }
            Elem::F16 => {
                self.helpers.insert(Helper::F16);
                format!("moec_f32_to_f16({v})")
            }
            Elem::Fp8E4m3 => {
                self.helpers.insert(Helper::Fp8);
                format!("moec_f32_to_fp8({v})")
            }
            Elem::I32 => format!("(int)(unsigned int)({v})"),
            Elem::U8 => format!("(unsigned char)({v})"),
        }
    }

    /// The element `e` (an lvalue of the C element type) as a value.
    fn widen(&mut self, elem: Elem, e: &str) -> String {
        match elem {
            Elem::F32 => e.to_string(),
            Elem::Bf16 => {
                self.helpers.insert(Helper::Bf16);
                format!("moec_bf16_to_f32({e})")
            }
            Elem::F16 => {
                self.helpers.insert(Helper::F16);
                format!("moec_f16_to_f32({e})")
            }
            Elem::Fp8E4m3 => {
                self.helpers.insert(Helper::Fp8);
                format!("moec_fp8_to_f32({e})")
            }
            Elem::I32 | Elem::U8 => format!("(long long){e}"),
        }
    }

    fn call(&mut self, h: Helper, f: &str, args: &[&str], ty: Ty) -> Val {
        self.helpers.insert(h);
        let args: Vec<&str> = args.iter().map(|a| strip_parens(a)).collect();
        Val {
            code: format!("{f}({})", args.join(", ")),
            ty,
            fixed: false,
            range: None,
        }
    }

    fn expr(&mut self, e: &Expr) -> Result<Val, String> {
        let pure = |code: String, ty: Ty| Val {
            code,
            ty,
            fixed: false,
            range: None,
        };
        Ok(match e {
            Expr::F32(v) => Val {
                code: f32_literal(*v),
                ty: Ty::F32,
                fixed: true,
                range: None,
            },
            Expr::I64(v) => Val {
                code: i64_literal(*v),
                ty: Ty::I64,
                fixed: true,
                range: v.checked_add(1).map(|hi| (*v, hi)),
            },
            Expr::Bool(b) => Val {
                code: b.to_string(),
                ty: Ty::Bool,
                fixed: true,
                range: None,
            },
            Expr::Var(v) => {
                let (name, ty) = self.var(*v)?;
                let range = self
                    .ranges
                    .iter()
                    .rev()
                    .find(|(r, _, _)| r == v)
                    .map(|&(_, lo, hi)| (lo, hi));
                Val {
                    range,
                    ..pure(name, ty)
                }
            }
            Expr::Scalar(p) => {
                let d = self
                    .k
                    .params
                    .get(p.0 as usize)
                    .ok_or_else(|| format!("undeclared parameter #{}", p.0))?;
                match d.kind {
                    ParamKind::Scalar(ty) => pure(param_name(p.0 as usize, d), ty),
                    ParamKind::Buffer { .. } => {
                        return Err(format!("`{}` is a buffer, not a scalar", d.name))
                    }
                }
            }
            Expr::Load { buf, index } => {
                let i = self.index(index)?;
                let (lvalue, elem) = self.buffer_element(*buf, &i)?;
                let v = self.widen(elem, &lvalue);
                self.temp(elem.value_ty(), &v)
            }
            Expr::ArrayLoad { array, index } => {
                let i = self.index(index)?;
                let (lvalue, ty) = self.array_element(*array, &i)?;
                self.temp(ty, &lvalue)
            }
            Expr::Unary(op, a) => {
                let a = self.expr(a)?;
                let x = a.code.as_str();
                match (op, a.ty) {
                    (UnOp::Neg, Ty::F32) => pure(format!("(-{x})"), Ty::F32),
                    (UnOp::Neg, Ty::I64) => self.call(Helper::WNeg, "moec_wneg", &[x], Ty::I64),
                    (UnOp::Abs, Ty::F32) => pure(format!("fabsf({})", strip_parens(x)), Ty::F32),
                    (UnOp::Abs, Ty::I64) => self.call(Helper::IAbs, "moec_iabs", &[x], Ty::I64),
                    (UnOp::Exp, Ty::F32) => self.call(Helper::Exp, "moec_expf", &[x], Ty::F32),
                    (UnOp::Log, Ty::F32) => self.call(Helper::Log, "moec_logf", &[x], Ty::F32),
                    (UnOp::Tanh, Ty::F32) => self.call(Helper::Tanh, "moec_tanhf", &[x], Ty::F32),
                    (UnOp::Erf, Ty::F32) => self.call(Helper::Erf, "moec_erff", &[x], Ty::F32),
                    (UnOp::Sqrt, Ty::F32) => pure(format!("sqrtf({})", strip_parens(x)), Ty::F32),
                    (UnOp::Floor, Ty::F32) => pure(format!("floorf({})", strip_parens(x)), Ty::F32),
                    (UnOp::Not, Ty::Bool) => pure(format!("(!{x})"), Ty::Bool),
                    (UnOp::ToF32, Ty::I64) => pure(format!("(float){x}"), Ty::F32),
                    (UnOp::ToI64, Ty::F32) => {
                        self.call(Helper::ToI64, "moec_f32_to_i64", &[x], Ty::I64)
                    }
                    (op, ty) => return Err(format!("{op:?} does not apply to {ty:?}")),
                }
            }
            Expr::Binary(op, a, b) => {
                let x = self.expr(a)?;
                let y = self.expr(b)?;
                if x.ty != y.ty {
                    return Err(format!("{op:?} of {:?} and {:?}", x.ty, y.ty));
                }
                self.binary(*op, x, y)?
            }
            Expr::Select(c, a, b) => {
                let c = self.expr(c)?;
                let a = self.expr(a)?;
                let b = self.expr(b)?;
                pure(format!("({} ? {} : {})", c.code, a.code, b.code), a.ty)
            }
        })
    }

    fn binary(&mut self, op: BinOp, x: Val, y: Val) -> Result<Val, String> {
        let ty = x.ty;
        let (a, b) = (x.code.as_str(), y.code.as_str());
        let infix = |sym: &str, ty: Ty| Val {
            code: format!("({a} {sym} {b})"),
            ty,
            fixed: false,
            range: None,
        };
        Ok(match (op, ty) {
            (BinOp::Add, Ty::F32) => infix("+", ty),
            (BinOp::Sub, Ty::F32) => infix("-", ty),
            (BinOp::Mul, Ty::F32) => infix("*", ty),
            (BinOp::Div, Ty::F32) => infix("/", ty),
            (BinOp::Min, Ty::F32) => self.call(Helper::FMin, "moec_fmin", &[a, b], ty),
            (BinOp::Max, Ty::F32) => self.call(Helper::FMax, "moec_fmax", &[a, b], ty),
            (BinOp::Add, Ty::I64) => self.call(Helper::WAdd, "moec_wadd", &[a, b], ty),
            (BinOp::Sub, Ty::I64) => self.call(Helper::WSub, "moec_wsub", &[a, b], ty),
            (BinOp::Mul, Ty::I64) => self.call(Helper::WMul, "moec_wmul", &[a, b], ty),
            (BinOp::Min, Ty::I64) => self.call(Helper::IMin, "moec_imin", &[a, b], ty),
            (BinOp::Max, Ty::I64) => self.call(Helper::IMax, "moec_imax", &[a, b], ty),
            (BinOp::Div | BinOp::Rem, Ty::I64) => {
                // The dividend's failing operations were emitted before the
                // divisor's; the zero check comes after both.
                let div = op == BinOp::Div;
                // A literal divisor other than 0 and -1 needs neither the
                // check nor the wrap: plain C division.
                if let Some(n) = literal_i64(b) {
                    if n != 0 && n != -1 {
                        return Ok(infix(if div { "/" } else { "%" }, ty));
                    }
                }
                let d = if y.fixed {
                    y
                } else {
                    self.temp(Ty::I64, &y.code)
                };
                self.fail(&format!("{} == 0", d.code), STATUS_DIV_ZERO, 0, "0");
                if div {
                    self.call(Helper::IDiv, "moec_idiv", &[a, &d.code], ty)
                } else {
                    self.call(Helper::IRem, "moec_irem", &[a, &d.code], ty)
                }
            }
            (BinOp::And, Ty::Bool) => infix("&&", ty),
            (BinOp::Or, Ty::Bool) => infix("||", ty),
            (cmp, Ty::F32 | Ty::I64) if cmp.is_comparison() => {
                let sym = match cmp {
                    BinOp::Lt => "<",
                    BinOp::Le => "<=",
                    BinOp::Gt => ">",
                    BinOp::Ge => ">=",
                    BinOp::Eq => "==",
                    _ => "!=",
                };
                infix(sym, Ty::Bool)
            }
            (BinOp::Eq, Ty::Bool) => infix("==", ty),
            (BinOp::Ne, Ty::Bool) => infix("!=", ty),
            (op, ty) => return Err(format!("{op:?} does not apply to {ty:?}")),
        })
    }
}

/// The value of an `i64` literal as [`i64_literal`] prints it.
fn literal_i64(code: &str) -> Option<i64> {
    if code == i64_literal(i64::MIN) {
        return Some(i64::MIN);
    }
    let inner = code
        .strip_prefix('(')
        .and_then(|c| c.strip_suffix(')'))
        .unwrap_or(code);
    inner.strip_suffix("LL")?.parse().ok()
}

/// Marks every variable `body` reads (a variable that is only assigned is
/// never declared, and its assignments are dropped).
fn mark_vars(body: &[Stmt], used: &mut [bool]) {
    crate::ir::visit_reads(body, None, &mut |v| {
        if let Some(u) = used.get_mut(v.0 as usize) {
            *u = true;
        }
    });
}

/// `s` without one pair of enclosing parentheses, when they enclose all of it.
fn strip_parens(s: &str) -> &str {
    let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) else {
        return s;
    };
    let mut depth = 0i32;
    for c in inner.chars() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return s;
                }
            }
            _ => {}
        }
    }
    if depth == 0 {
        inner
    } else {
        s
    }
}

// ---------------------------------------------------------------------------
// The helpers: device functions the kernels call, each emitted once per
// module when some kernel uses it. The order of the variants is the order in
// the source (a helper comes after those it calls).

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Helper {
    Fail,
    WAdd,
    WSub,
    WMul,
    WNeg,
    IAbs,
    IMin,
    IMax,
    IDiv,
    IRem,
    FMin,
    FMax,
    ToI64,
    Bf16,
    F16,
    Fp8,
    Scalbn,
    Exp,
    Log,
    Expm1,
    Tanh,
    Erf,
}

/// Adds `h` and the helpers it calls.
fn add_helper(set: &mut BTreeSet<Helper>, h: Helper) {
    if !set.insert(h) {
        return;
    }
    let deps: &[Helper] = match h {
        Helper::Exp => &[Helper::Scalbn],
        Helper::Tanh => &[Helper::Expm1],
        Helper::Erf => &[Helper::Exp],
        Helper::IAbs | Helper::IDiv => &[Helper::WNeg],
        _ => &[],
    };
    for d in deps {
        add_helper(set, *d);
    }
}

impl Helper {
    fn source(self) -> String {
        match self {
            Helper::Fail => FAIL.to_string(),
            Helper::WAdd => WADD.to_string(),
            Helper::WSub => WSUB.to_string(),
            Helper::WMul => WMUL.to_string(),
            Helper::WNeg => WNEG.to_string(),
            Helper::IAbs => IABS.to_string(),
            Helper::IMin => IMIN.to_string(),
            Helper::IMax => IMAX.to_string(),
            Helper::IDiv => IDIV.to_string(),
            Helper::IRem => IREM.to_string(),
            Helper::FMin => FMIN.to_string(),
            Helper::FMax => FMAX.to_string(),
            Helper::ToI64 => TO_I64.to_string(),
            Helper::Bf16 => BF16.to_string(),
            Helper::F16 => F16.to_string(),
            Helper::Fp8 => FP8.to_string(),
            Helper::Scalbn => fill(SCALBNF, &[]),
            Helper::Exp => fill(EXPF, EXPF_CONSTS),
            Helper::Log => fill(LOGF, LOGF_CONSTS),
            Helper::Expm1 => fill(EXPM1F, EXPM1F_CONSTS),
            Helper::Tanh => TANHF.to_string(),
            Helper::Erf => fill(ERFF, ERFF_CONSTS),
        }
    }
}

/// Replaces every `$NAME` of `template` with the exact literal of the named
/// constant, longest names first (so `$PA1` never eats `$PA10`'s prefix).
fn fill(template: &str, consts: &[(&str, f32)]) -> String {
    let mut sorted: Vec<&(&str, f32)> = consts.iter().collect();
    sorted.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut s = template.to_string();
    for (name, v) in sorted {
        s = s.replace(&format!("${name}"), &hex_float(*v));
    }
    s
}

const FAIL: &str = "\
// Records the first failure of a launch (see the launch contract).
static __device__ void moec_fail(long long* status, long long code, long long which,
                                 long long index, long long row)
{
    if (atomicCAS((unsigned long long*)status, 0ull, (unsigned long long)code) == 0ull) {
        status[1] = which;
        status[2] = index;
        status[3] = row;
    }
}
";

// 64-bit integer arithmetic wraps: it goes through unsigned, so the C++
// compiler never sees a signed overflow.
const WADD: &str = "\
static __device__ __forceinline__ long long moec_wadd(long long a, long long b) { return (long long)((unsigned long long)a + (unsigned long long)b); }
";
const WSUB: &str = "\
static __device__ __forceinline__ long long moec_wsub(long long a, long long b) { return (long long)((unsigned long long)a - (unsigned long long)b); }
";
const WMUL: &str = "\
static __device__ __forceinline__ long long moec_wmul(long long a, long long b) { return (long long)((unsigned long long)a * (unsigned long long)b); }
";
const WNEG: &str = "\
static __device__ __forceinline__ long long moec_wneg(long long a) { return (long long)(0ull - (unsigned long long)a); }
";
const IABS: &str = "\
static __device__ __forceinline__ long long moec_iabs(long long a) { return a < 0 ? moec_wneg(a) : a; }
";
const IMIN: &str = "\
static __device__ __forceinline__ long long moec_imin(long long a, long long b) { return b < a ? b : a; }
";
const IMAX: &str = "\
static __device__ __forceinline__ long long moec_imax(long long a, long long b) { return b > a ? b : a; }
";
const IDIV: &str = "\
// Truncating division, b != 0 checked by the caller; LLONG_MIN / -1 wraps.
static __device__ __forceinline__ long long moec_idiv(long long a, long long b) { return b == -1 ? moec_wneg(a) : a / b; }
";
const IREM: &str = "\
// Truncating remainder, b != 0 checked by the caller; LLONG_MIN % -1 is 0.
static __device__ __forceinline__ long long moec_irem(long long a, long long b) { return b == -1 ? 0 : a % b; }
";

// min/max: NaN if either operand is NaN, else the second operand only when it
// is strictly smaller (larger), so of two equal zeros the first.
const FMIN: &str = "\
static __device__ __forceinline__ float moec_fmin(float x, float y) {
    if (x != x || y != y) return __uint_as_float(0x7fc00000u);
    return y < x ? y : x;
}
";
const FMAX: &str = "\
static __device__ __forceinline__ float moec_fmax(float x, float y) {
    if (x != x || y != y) return __uint_as_float(0x7fc00000u);
    return y > x ? y : x;
}
";

const TO_I64: &str = "\
// f32 -> i64: truncates, saturates, NaN gives 0.
static __device__ __forceinline__ long long moec_f32_to_i64(float v) {
    if (v != v) return 0;
    if (v >= 9223372036854775808.0f) return 9223372036854775807LL;
    if (v <= -9223372036854775808.0f) return -9223372036854775807LL - 1LL;
    return (long long)v;
}
";

const BF16: &str = "\
// bf16 <-> f32 as the `half` crate converts: a NaN gets the quiet bit and keeps
// its top payload bits; f32 -> bf16 rounds to nearest even.
static __device__ __forceinline__ float moec_bf16_to_f32(unsigned short h) {
    unsigned int b = h;
    if ((b & 0x7fffu) > 0x7f80u) b |= 0x40u;
    return __uint_as_float(b << 16);
}
static __device__ __forceinline__ unsigned short moec_f32_to_bf16(float v) {
    unsigned int x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x40u);
    if ((x & 0x8000u) != 0u && (x & (3u * 0x8000u - 1u)) != 0u) return (unsigned short)((x >> 16) + 1u);
    return (unsigned short)(x >> 16);
}
";

const F16: &str = "\
// f16 <-> f32 as the `half` crate converts (round to nearest even; overflow
// gives infinity; a NaN gets the quiet bit and keeps its top payload bits).
static __device__ float moec_f16_to_f32(unsigned short h) {
    unsigned int i = h;
    unsigned int sign = (i & 0x8000u) << 16;
    unsigned int exp = i & 0x7c00u;
    unsigned int man = i & 0x03ffu;
    if ((i & 0x7fffu) == 0u) return __uint_as_float(i << 16);
    if (exp == 0x7c00u) {
        if (man == 0u) return __uint_as_float(sign | 0x7f800000u);
        return __uint_as_float(sign | 0x7fc00000u | (man << 13));
    }
    if (exp == 0u) {
        // A subnormal: man * 2^-24, exact.
        return __uint_as_float(__float_as_uint((float)man * 0x1p-24f) | sign);
    }
    return __uint_as_float(sign | (((exp >> 10) + 112u) << 23) | (man << 13));
}
static __device__ unsigned short moec_f32_to_f16(float v) {
    unsigned int x = __float_as_uint(v);
    unsigned int sign = x & 0x80000000u;
    unsigned int exp = x & 0x7f800000u;
    unsigned int man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        unsigned int nan_bit = man == 0u ? 0u : 0x0200u;
        return (unsigned short)((sign >> 16) | 0x7c00u | nan_bit | (man >> 13));
    }
    unsigned int half_sign = sign >> 16;
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (unsigned short)(half_sign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (unsigned short)half_sign;
        unsigned int m = man | 0x00800000u;
        unsigned int half_man = m >> (14 - half_exp);
        unsigned int round_bit = 1u << (13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) half_man += 1u;
        return (unsigned short)(half_sign | half_man);
    }
    unsigned int bits = half_sign | ((unsigned int)half_exp << 10) | (man >> 13);
    if ((man & 0x1000u) != 0u && (man & (3u * 0x1000u - 1u)) != 0u) bits += 1u;
    return (unsigned short)bits;
}
";

const FP8: &str = "\
// fp8 e4m3 (OCP \"FN\": no infinities, S.1111.111 is NaN) <-> f32. f32 -> fp8
// rounds to nearest even and saturates to +-448; a NaN becomes 0x7f.
static __device__ float moec_fp8_to_f32(unsigned char b) {
    unsigned int sign = (unsigned int)(b & 0x80u) << 24;
    unsigned int exp = (b >> 3) & 0x0fu;
    unsigned int man = b & 0x07u;
    if (exp == 0x0fu && man == 0x07u) return __uint_as_float(0x7fc00000u);
    if (exp == 0u) return __uint_as_float(__float_as_uint((float)man * 0x1p-9f) | sign);
    return __uint_as_float(sign | ((exp + 120u) << 23) | (man << 20));
}
static __device__ unsigned char moec_f32_to_fp8(float v) {
    if (v != v) return 0x7f;
    unsigned int x = __float_as_uint(v);
    unsigned char sign = (x >> 31) != 0u ? 0x80 : 0x00;
    float a = __uint_as_float(x & 0x7fffffffu);
    if (a >= 448.0f) return sign | 0x7e;
    if (a < 0x1p-6f) {
        // Subnormal: steps of 2^-9, a * 512 < 8 exactly.
        float s = a * 512.0f;
        unsigned int q = (unsigned int)s;
        float frac = s - (float)q;
        if (frac > 0.5f || (frac == 0.5f && (q & 1u) != 0u)) q += 1u;
        return sign | (unsigned char)q; // q == 8 is the smallest normal
    }
    unsigned int ax = x & 0x7fffffffu;
    int e = (int)(ax >> 23) - 127;        // -6 ..= 8
    unsigned int m = (ax & 0x7fffffu) | 0x800000u;
    unsigned int q = m >> 20;             // 8 ..= 15
    unsigned int rest = m & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (q & 1u) != 0u)) q += 1u;
    if (q == 16u) { e += 1; q = 8u; }
    unsigned int bits = ((unsigned int)(e + 7) << 3) | (q - 8u);
    if (bits >= 0x7fu) return sign | 0x7e; // 480 would be NaN: saturate
    return sign | (unsigned char)bits;
}
";

// The math functions below transcribe the `libm` crate (FreeBSD's msun, by
// way of musl), which is what the interpreter and the Cranelift backend
// call; the constants are printed from the same `f32` values.

const SCALBNF: &str = "\
// x * 2^n without intermediate overflow (libm's scalbnf).
static __device__ float moec_scalbnf(float x, int n) {
    if (n > 127) {
        x *= 0x1p+127f; n -= 127;
        if (n > 127) { x *= 0x1p+127f; n -= 127; if (n > 127) n = 127; }
    } else if (n < -126) {
        x *= 0x1p-102f; n += 102;
        if (n < -126) { x *= 0x1p-102f; n += 102; if (n < -126) n = -126; }
    }
    return x * __uint_as_float((unsigned int)(127 + n) << 23);
}
";

#[allow(clippy::excessive_precision)]
const EXPF_CONSTS: &[(&str, f32)] = &[
    ("LN2_HI", 6.9314575195e-01),
    ("LN2_LO", 1.4286067653e-06),
    ("INV_LN2", 1.4426950216e+00),
    ("P1", 1.6666625440e-1),
    ("P2", -2.7667332906e-3),
];

const EXPF: &str = "\
// libm's expf (FreeBSD e_expf.c).
static __device__ float moec_expf(float x) {
    unsigned int hx = __float_as_uint(x);
    int sign = (int)(hx >> 31);
    hx &= 0x7fffffffu;
    if (hx >= 0x42aeac50u) {
        if (hx > 0x7f800000u) return x;
        if (hx >= 0x42b17218u && sign == 0) return x * 0x1p+127f;
        if (sign != 0 && hx >= 0x42cff1b5u) return 0.0f;
    }
    int k;
    float hi, lo;
    if (hx > 0x3eb17218u) {
        if (hx > 0x3f851592u) k = (int)($INV_LN2 * x + (sign != 0 ? -0.5f : 0.5f));
        else k = 1 - sign - sign;
        float kf = (float)k;
        hi = x - kf * $LN2_HI;
        lo = kf * $LN2_LO;
        x = hi - lo;
    } else if (hx > 0x39000000u) {
        k = 0; hi = x; lo = 0.0f;
    } else {
        return 1.0f + x;
    }
    float xx = x * x;
    float c = x - xx * ($P1 + xx * $P2);
    float y = 1.0f + (x * c / (2.0f - c) - lo + hi);
    return k == 0 ? y : moec_scalbnf(y, k);
}
";

#[allow(clippy::excessive_precision)]
const LOGF_CONSTS: &[(&str, f32)] = &[
    ("LN2_HI", 6.9313812256e-01),
    ("LN2_LO", 9.0580006145e-06),
    ("LG1", 0.66666662693),
    ("LG2", 0.40000972152),
    ("LG3", 0.28498786688),
    ("LG4", 0.24279078841),
];

const LOGF: &str = "\
// libm's logf (FreeBSD e_logf.c).
static __device__ float moec_logf(float x) {
    unsigned int ix = __float_as_uint(x);
    int k = 0;
    if (ix < 0x00800000u || (ix >> 31) != 0u) {
        if ((ix << 1) == 0u) return -1.0f / (x * x);
        if ((ix >> 31) != 0u) return (x - x) / 0.0f;
        k -= 25;
        x *= 0x1p+25f;
        ix = __float_as_uint(x);
    } else if (ix >= 0x7f800000u) {
        return x;
    } else if (ix == 0x3f800000u) {
        return 0.0f;
    }
    ix += 0x3f800000u - 0x3f3504f3u;
    k += (int)(ix >> 23) - 0x7f;
    ix = (ix & 0x007fffffu) + 0x3f3504f3u;
    x = __uint_as_float(ix);
    float f = x - 1.0f;
    float s = f / (2.0f + f);
    float z = s * s;
    float w = z * z;
    float t1 = w * ($LG2 + w * $LG4);
    float t2 = z * ($LG1 + w * $LG3);
    float r = t2 + t1;
    float hfsq = 0.5f * f * f;
    float dk = (float)k;
    return s * (hfsq + r) + dk * $LN2_LO - hfsq + f + dk * $LN2_HI;
}
";

#[allow(clippy::excessive_precision)]
const EXPM1F_CONSTS: &[(&str, f32)] = &[
    ("LN2_HI", 6.9313812256e-01),
    ("LN2_LO", 9.0580006145e-06),
    ("INV_LN2", 1.4426950216e+00),
    ("Q1", -3.3333212137e-2),
    ("Q2", 1.5807170421e-3),
];

const EXPM1F: &str = "\
// libm's expm1f (FreeBSD s_expm1f.c).
static __device__ float moec_expm1f(float x) {
    unsigned int hx = __float_as_uint(x);
    bool sign = (hx >> 31) != 0u;
    hx &= 0x7fffffffu;
    if (hx >= 0x4195b844u) {
        if (hx > 0x7f800000u) return x;
        if (sign) return -1.0f;
        if (hx > 0x42b17217u) return x * 0x1p+127f;
    }
    int k;
    float hi, lo, c = 0.0f;
    if (hx > 0x3eb17218u) {
        if (hx < 0x3f851592u) {
            if (!sign) { hi = x - $LN2_HI; lo = $LN2_LO; k = 1; }
            else { hi = x + $LN2_HI; lo = -$LN2_LO; k = -1; }
        } else {
            k = (int)($INV_LN2 * x + (sign ? -0.5f : 0.5f));
            float t = (float)k;
            hi = x - t * $LN2_HI;
            lo = t * $LN2_LO;
        }
        x = hi - lo;
        c = (hi - x) - lo;
    } else if (hx < 0x33000000u) {
        return x;
    } else {
        k = 0;
    }
    float hfx = 0.5f * x;
    float hxs = x * hfx;
    float r1 = 1.0f + hxs * ($Q1 + hxs * $Q2);
    float t = 3.0f - r1 * hfx;
    float e = hxs * ((r1 - t) / (6.0f - x * t));
    if (k == 0) return x - (x * e - hxs);
    e = x * (e - c) - c;
    e -= hxs;
    if (k == -1) return 0.5f * (x - e) - 0.5f;
    if (k == 1) {
        if (x < -0.25f) return -2.0f * (e - (x + 0.5f));
        return 1.0f + 2.0f * (x - e);
    }
    float twopk = __uint_as_float((unsigned int)(0x7f + k) << 23);
    if (k < 0 || k > 56) {
        float y = x - e + 1.0f;
        if (k == 128) y = y * 2.0f * 0x1p+127f;
        else y = y * twopk;
        return y - 1.0f;
    }
    float uf = __uint_as_float((unsigned int)(0x7f - k) << 23);
    if (k < 23) return (x - e + (1.0f - uf)) * twopk;
    return (x - (e + uf) + 1.0f) * twopk;
}
";

const TANHF: &str = "\
// libm's tanhf (musl).
static __device__ float moec_tanhf(float x) {
    unsigned int ix = __float_as_uint(x);
    bool sign = (ix >> 31) != 0u;
    ix &= 0x7fffffffu;
    x = __uint_as_float(ix);
    float tt;
    if (ix > 0x3f0c9f54u) {
        if (ix > 0x41200000u) {
            tt = 1.0f + 0.0f / x;
        } else {
            float t = moec_expm1f(2.0f * x);
            tt = 1.0f - 2.0f / (t + 2.0f);
        }
    } else if (ix > 0x3e82c578u) {
        float t = moec_expm1f(2.0f * x);
        tt = t / (t + 2.0f);
    } else if (ix >= 0x00800000u) {
        float t = moec_expm1f(-2.0f * x);
        tt = -t / (t + 2.0f);
    } else {
        tt = x;
    }
    return sign ? -tt : tt;
}
";

#[allow(clippy::excessive_precision)]
const ERFF_CONSTS: &[(&str, f32)] = &[
    ("ERX", 8.4506291151e-01),
    ("EFX8", 1.0270333290e+00),
    ("PP0", 1.2837916613e-01),
    ("PP1", -3.2504209876e-01),
    ("PP2", -2.8481749818e-02),
    ("PP3", -5.7702702470e-03),
    ("PP4", -2.3763017452e-05),
    ("QQ1", 3.9791721106e-01),
    ("QQ2", 6.5022252500e-02),
    ("QQ3", 5.0813062117e-03),
    ("QQ4", 1.3249473704e-04),
    ("QQ5", -3.9602282413e-06),
    ("PA0", -2.3621185683e-03),
    ("PA1", 4.1485610604e-01),
    ("PA2", -3.7220788002e-01),
    ("PA3", 3.1834661961e-01),
    ("PA4", -1.1089469492e-01),
    ("PA5", 3.5478305072e-02),
    ("PA6", -2.1663755178e-03),
    ("QA1", 1.0642088205e-01),
    ("QA2", 5.4039794207e-01),
    ("QA3", 7.1828655899e-02),
    ("QA4", 1.2617121637e-01),
    ("QA5", 1.3637083583e-02),
    ("QA6", 1.1984500103e-02),
    ("RA0", -9.8649440333e-03),
    ("RA1", -6.9385856390e-01),
    ("RA2", -1.0558626175e+01),
    ("RA3", -6.2375331879e+01),
    ("RA4", -1.6239666748e+02),
    ("RA5", -1.8460508728e+02),
    ("RA6", -8.1287437439e+01),
    ("RA7", -9.8143291473e+00),
    ("SA1", 1.9651271820e+01),
    ("SA2", 1.3765776062e+02),
    ("SA3", 4.3456588745e+02),
    ("SA4", 6.4538726807e+02),
    ("SA5", 4.2900814819e+02),
    ("SA6", 1.0863500214e+02),
    ("SA7", 6.5702495575e+00),
    ("SA8", -6.0424413532e-02),
    ("RB0", -9.8649431020e-03),
    ("RB1", -7.9928326607e-01),
    ("RB2", -1.7757955551e+01),
    ("RB3", -1.6063638306e+02),
    ("RB4", -6.3756646729e+02),
    ("RB5", -1.0250950928e+03),
    ("RB6", -4.8351919556e+02),
    ("SB1", 3.0338060379e+01),
    ("SB2", 3.2579251099e+02),
    ("SB3", 1.5367296143e+03),
    ("SB4", 3.1998581543e+03),
    ("SB5", 2.5530502930e+03),
    ("SB6", 4.7452853394e+02),
    ("SB7", -2.2440952301e+01),
];

const ERFF: &str = "\
// libm's erff (FreeBSD s_erff.c).
static __device__ float moec_erfc1(float x) {
    float s = fabsf(x) - 1.0f;
    float p = $PA0 + s * ($PA1 + s * ($PA2 + s * ($PA3 + s * ($PA4 + s * ($PA5 + s * $PA6)))));
    float q = 1.0f + s * ($QA1 + s * ($QA2 + s * ($QA3 + s * ($QA4 + s * ($QA5 + s * $QA6)))));
    return 1.0f - $ERX - p / q;
}
static __device__ float moec_erfc2(unsigned int ix, float x) {
    if (ix < 0x3fa00000u) return moec_erfc1(x);
    x = fabsf(x);
    float s = 1.0f / (x * x);
    float r, big_s;
    if (ix < 0x4036db6du) {
        r = $RA0 + s * ($RA1 + s * ($RA2 + s * ($RA3 + s * ($RA4 + s * ($RA5 + s * ($RA6 + s * $RA7))))));
        big_s = 1.0f + s * ($SA1 + s * ($SA2 + s * ($SA3 + s * ($SA4 + s * ($SA5 + s * ($SA6 + s * ($SA7 + s * $SA8)))))));
    } else {
        r = $RB0 + s * ($RB1 + s * ($RB2 + s * ($RB3 + s * ($RB4 + s * ($RB5 + s * $RB6)))));
        big_s = 1.0f + s * ($SB1 + s * ($SB2 + s * ($SB3 + s * ($SB4 + s * ($SB5 + s * ($SB6 + s * $SB7))))));
    }
    float z = __uint_as_float(__float_as_uint(x) & 0xffffe000u);
    return moec_expf(-z * z - 0.5625f) * moec_expf((z - x) * (z + x) + r / big_s) / x;
}
static __device__ float moec_erff(float x) {
    unsigned int ix = __float_as_uint(x);
    int sign = (int)(ix >> 31);
    ix &= 0x7fffffffu;
    if (ix >= 0x7f800000u) return 1.0f - 2.0f * (float)sign + 1.0f / x;
    if (ix < 0x3f580000u) {
        if (ix < 0x31800000u) return 0.125f * (8.0f * x + $EFX8 * x);
        float z = x * x;
        float r = $PP0 + z * ($PP1 + z * ($PP2 + z * ($PP3 + z * $PP4)));
        float s = 1.0f + z * ($QQ1 + z * ($QQ2 + z * ($QQ3 + z * ($QQ4 + z * $QQ5))));
        float y = r / s;
        return x + x * y;
    }
    float y;
    if (ix < 0x40c00000u) y = 1.0f - moec_erfc2(ix, x);
    else y = 1.0f - 0x1p-120f;
    return sign != 0 ? -y : y;
}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::Builder;
    use crate::library::{describe, Kind};

    fn consts(c: &[(&str, i64)]) -> Vec<(String, i64)> {
        c.iter().map(|(n, v)| ((*n).to_string(), *v)).collect()
    }

    /// Constants that describe every kind (bf16 activations, a grouped
    /// sigmoid router with a selection bias, clamped SwiGLU).
    fn all_constants() -> Vec<(String, i64)> {
        consts(&[
            ("dtype", 1),
            ("hidden", 256),
            ("top_k", 4),
            ("block", 128),
            ("experts", 16),
            ("groups", 4),
            ("groups_kept", 2),
            ("scoring", 1),
            ("selection_bias", 1),
            ("normalize", 1),
            ("ffn", 64),
            ("clamped", 1),
        ])
    }

    fn lowered(kind: Kind, c: &[(String, i64)]) -> CudaKernel {
        lower(&describe(kind, c).unwrap()).unwrap()
    }

    #[test]
    fn every_kind_lowers_to_one_checked_global_function() {
        let c = all_constants();
        for kind in Kind::ALL {
            let desc = describe(kind, &c).unwrap();
            let k = lower(&desc).unwrap();
            let text = k.text();
            assert_eq!(k.kind(), kind.name());
            assert_eq!(
                text.matches("extern \"C\" __global__ void ").count(),
                1,
                "{kind}"
            );
            assert!(text.contains(&format!("void {}(", k.name())), "{kind}");
            // Every buffer comes with its length, every access is checked.
            for (i, p) in desc.params.iter().enumerate() {
                if let ParamKind::Buffer { .. } = p.kind {
                    assert!(
                        text.contains(&format!("unsigned long long p{i}_{}_len", p.name)),
                        "{kind}: length of `{}`",
                        p.name
                    );
                    let accessed = text.contains(&format!("p{i}_{}[", p.name));
                    let checked = text.contains(&format!(">= p{i}_{}_len) {{ moec_fail(", p.name));
                    assert_eq!(accessed, checked, "{kind}: `{}`", p.name);
                }
            }
            assert!(text.contains("long long moec_rows"), "{kind}");
            if k.block_per_row() {
                assert!(text.contains("moec_row += (long long)gridDim.x"), "{kind}");
                assert!(text.contains("+= (long long)blockDim.x)"), "{kind}");
                assert!(!text.contains("moec_step"), "{kind}");
            } else {
                assert!(text.contains("moec_row += moec_step"), "{kind}");
            }
            assert!(!text.contains("moec_scratch"), "{kind}: small arrays");
            // The description rides along as a comment.
            assert!(
                text.starts_with(&format!("// {}:\n//   kernel {}(", kind, kind)),
                "{kind}"
            );
        }
    }

    #[test]
    fn each_kind_uses_the_conversions_and_functions_it_should() {
        let c = all_constants();
        let has = |kind: Kind, c: &[(String, i64)], needles: &[&str]| {
            let k = lowered(kind, c);
            for n in needles {
                assert!(k.text().contains(n), "{kind} lacks {n}:\n{}", k.text());
            }
        };
        // bf16 activations are widened on load and rounded on store.
        has(
            Kind::Add,
            &c,
            &["moec_bf16_to_f32(p0_a[", "= moec_f32_to_bf16("],
        );
        has(
            Kind::QuantizeFp8,
            &c,
            &[
                "unsigned char* __restrict__ p1_q",
                "moec_f32_to_fp8(",
                "moec_fmax(",
            ],
        );
        has(Kind::DequantizeFp8, &c, &["moec_fp8_to_f32(p0_q["]);
        has(
            Kind::RouterFused,
            &c,
            &["moec_expf(", "float a0_scores[16];"],
        );
        has(Kind::RouterTopk, &c, &["int* __restrict__ p1_ids"]);
        has(Kind::SharedGate, &c, &["moec_expf("]);
        // Clamped SwiGLU reads the `limit` scalar; GELU calls erf, the tanh
        // approximation tanh.
        has(Kind::Activation, &c, &["float p2_limit", "moec_fmin("]);
        let unclamped: Vec<(String, i64)> =
            c.iter().filter(|(n, _)| n != "clamped").cloned().collect();
        let mut gelu = unclamped.clone();
        gelu.extend(consts(&[("act", 1)]));
        has(Kind::Activation, &gelu, &["moec_erff("]);
        let mut tanh = unclamped;
        tanh.extend(consts(&[("act", 2)]));
        has(Kind::Activation, &tanh, &["moec_tanhf("]);
        // f16 and f32.
        let mut f16 = c.clone();
        f16[0].1 = 2;
        has(
            Kind::Pack,
            &f16,
            &["moec_f16_to_f32(p0_permuted[", "= moec_f32_to_f16("],
        );
        let mut f32c = c.clone();
        f32c[0].1 = 0;
        let pack = lowered(Kind::Pack, &f32c);
        assert!(!pack.text().contains("moec_f32_to"), "{}", pack.text());
    }

    #[test]
    fn symbols_are_the_kind_and_a_hash_of_the_constants() {
        let c = all_constants();
        let a = lowered(Kind::Add, &c);
        let (kind, hash) = a.name().rsplit_once('_').unwrap();
        assert_eq!(kind, "moec_add");
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        // Deterministic, and a different constant is a different symbol.
        assert_eq!(lowered(Kind::Add, &c), a);
        let mut wider = c.clone();
        wider[1].1 = 512;
        assert_ne!(lowered(Kind::Add, &wider).name(), a.name());
        // Constants a kernel ignores do not change it.
        let mut extra = c.clone();
        extra.push(("rows".to_string(), 77));
        assert_eq!(lowered(Kind::Add, &extra).name(), a.name());
    }

    #[test]
    fn names_are_mangled_and_sanitised() {
        // Variable and array names a builder gives come out as `v<id>_<name>`,
        // sanitised to [A-Za-z0-9_]; nothing else of them reaches the source.
        let mut b = Builder::new("odd");
        let out = b.buffer("out", Elem::F32, Access::Write);
        let v = b.local("my layer/*x*/", 1.5f32);
        let arr = b.array("größe", Ty::F32, 2);
        b.array_set(arr, 1, v);
        b.store(out, b.row(), arr.at(1));
        let k = lower(&b.finish().unwrap()).unwrap();
        let code = k.text().split_once("extern").unwrap().1;
        assert!(code.contains("v1_my_layer__x__"), "{code}");
        assert!(code.contains("a0_gr__e"), "{code}");
        assert!(!code.contains("/*x*/"));
        assert!(!code.contains("größe"));
    }

    #[test]
    fn a_module_holds_each_kernel_once_in_order_with_its_helpers() {
        let c = all_constants();
        let mut m = Module::new();
        let add = describe(Kind::Add, &c).unwrap();
        let router = describe(Kind::RouterFused, &c).unwrap();
        assert_eq!(m.add(&add).unwrap(), 0);
        let h1 = m.hash();
        assert_eq!(m.add(&router).unwrap(), 1);
        assert_eq!(m.add(&add).unwrap(), 0);
        assert_eq!(m.kernels().len(), 2);
        assert_ne!(m.hash(), h1);
        assert_eq!(m.hash().len(), 32);
        let src = m.source();
        let add_at = src.find(m.kernels()[0].name()).unwrap();
        let router_at = src.find(m.kernels()[1].name()).unwrap();
        assert!(add_at < router_at);
        // Each helper once, before its first use.
        assert_eq!(src.matches("float moec_expf(float x)").count(), 1);
        assert!(src.find("float moec_scalbnf(").unwrap() < src.find("float moec_expf(").unwrap());
        assert!(src.find("float moec_expf(").unwrap() < router_at);
        // Only the helpers some kernel calls.
        let mut small = Module::new();
        small.add(&add).unwrap();
        let s = small.source();
        assert!(s.contains("moec_bf16_to_f32"));
        assert!(!s.contains("moec_expf") && !s.contains("moec_f32_to_fp8"));
        assert!(!s.contains("#include"));
    }

    #[test]
    fn huge_local_arrays_move_to_the_scratch_block() {
        let k = lowered(
            Kind::RouterTopk,
            &consts(&[("experts", 4096), ("top_k", 8)]),
        );
        // taken: 4096 i64, w: 8 f32.
        assert_eq!(k.scratch_bytes_per_thread(), 4096 * 8 + 32);
        assert!(k
            .text()
            .contains("unsigned char* __restrict__ moec_scratch"));
        assert!(k
            .text()
            .contains("long long* const a0_taken = (long long*)(moec_mine + 0);"));
    }

    #[test]
    fn literals_are_exact() {
        assert_eq!(f32_literal(1.0), "1.0f");
        assert_eq!(f32_literal(0.5), "0.5f");
        assert_eq!(f32_literal(448.0), "448.0f");
        assert_eq!(f32_literal(-0.0), "(-0.0f)");
        assert_eq!(f32_literal(-2.5), "(-2.5f)");
        assert_eq!(f32_literal(1.702), "0x1.b3b646p+0f /* 1.702 */");
        assert_eq!(
            f32_literal(f32::NEG_INFINITY),
            "__uint_as_float(0xff800000u) /* -inf */"
        );
        assert_eq!(hex_float(1.0), "0x1p+0f");
        assert_eq!(hex_float(0.75), "0x1.8p-1f");
        assert_eq!(hex_float(f32::from_bits(1)), "0x0.000002p-126f");
        assert_eq!(hex_float(-3.0), "-0x1.8p+1f");
        for v in [i64::MIN, -5, 0, 7, i64::MAX] {
            assert_eq!(literal_i64(&i64_literal(v)), Some(v));
        }
        assert_eq!(literal_i64("t12"), None);
        assert_eq!(literal_i64("v3_ALL"), None);
        assert_eq!(strip_parens("(a + b)"), "a + b");
        assert_eq!(strip_parens("(a) + (b)"), "(a) + (b)");
    }

    #[test]
    fn malformed_descriptions_are_errors() {
        let mut k = describe(Kind::Add, &all_constants()).unwrap();
        k.name = "Not A Symbol".to_string();
        let e = lower(&k).unwrap_err();
        assert_eq!(e.kernel, "Not A Symbol");
    }
}
