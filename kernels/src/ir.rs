//! The kernel description language.
//!
//! A [`Kernel`] is a typed, structured program that a launch runs once per
//! row, `row = 0 .. rows` (the row index is [`ROW`]). Rows are independent:
//! no row reads an element another row writes, so a backend may run them in
//! any order or all at once (a CUDA block or thread per row; a plain loop on
//! the CPU).
//!
//! The language is deliberately small: scalar values of three types ([`Ty`]),
//! mutable scalar variables, small fixed-size local arrays, counted loops,
//! `if`, and loads and stores of buffer elements with the conversion between
//! the element type in memory ([`Elem`]) and the value type done by the load
//! or store. There are no pointers, no recursion and no unbounded loops, so
//! every kernel terminates and every memory access can be bounds-checked.
//!
//! # Semantics every backend implements
//!
//! - Every variable and every local array element is zero (or `false`) at the
//!   start of each row.
//! - A load or store whose index is outside `0 .. len` of its buffer makes the
//!   launch fail with [`LaunchError::OutOfBounds`]; nothing is written past
//!   the end of a buffer. (Rows already run may have written their results.)
//! - Loads widen: a float element (`f32`, `bf16`, `f16`, `fp8_e4m3`) loads as
//!   an exact [`Ty::F32`]; an integer element (`i32`, `u8`) as [`Ty::I64`]
//!   (sign-extended for `i32`, zero-extended for `u8`). fp8 loads are the
//!   unscaled e4m3 value.
//! - Stores narrow: `f32` to `bf16`, `f16` and `fp8_e4m3` rounds to nearest,
//!   ties to even; fp8 saturates to ±448 (NaN stays NaN); `I64` to `i32` or
//!   `u8` keeps the low bits.
//! - Float arithmetic is IEEE single precision. [`BinOp::Min`] and
//!   [`BinOp::Max`] return NaN when either operand is NaN. Comparisons with a
//!   NaN are false, except [`BinOp::Ne`].
//! - [`UnOp::Exp`], [`UnOp::Log`], [`UnOp::Sqrt`], [`UnOp::Tanh`] and
//!   [`UnOp::Erf`] are the correctly-rounded-as-libm single precision
//!   functions (on the CPU the very functions Rust's `f32` methods call).
//! - Integer arithmetic is 64-bit, wrapping. Integer division and remainder
//!   truncate toward zero; a zero divisor makes the launch fail with
//!   [`LaunchError::DivideByZero`].
//! - [`UnOp::ToI64`] truncates toward zero and saturates (NaN gives 0), like
//!   Rust's `as i64`; [`UnOp::ToF32`] rounds to nearest.
//! - Both arms of [`Expr::Select`] are evaluated (neither has side effects).

use std::fmt;

/// The type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    F32,
    I64,
    Bool,
}

/// The type of an element in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    Bf16,
    F16,
    Fp8E4m3,
    I32,
    U8,
}

impl Elem {
    /// Bytes of one element.
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::Bf16 | Elem::F16 => 2,
            Elem::Fp8E4m3 | Elem::U8 => 1,
        }
    }

    /// The type a load of this element produces (and a store expects).
    pub fn value_ty(self) -> Ty {
        match self {
            Elem::F32 | Elem::Bf16 | Elem::F16 | Elem::Fp8E4m3 => Ty::F32,
            Elem::I32 | Elem::U8 => Ty::I64,
        }
    }

    /// The element of a plan dtype code (`0` f32, `1` bf16, `2` f16,
    /// `3` fp8_e4m3, `4` i32, `5` u8), as the compiler writes them.
    pub fn from_code(code: i64) -> Option<Elem> {
        Some(match code {
            0 => Elem::F32,
            1 => Elem::Bf16,
            2 => Elem::F16,
            3 => Elem::Fp8E4m3,
            4 => Elem::I32,
            5 => Elem::U8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
            Elem::Fp8E4m3 => "fp8_e4m3",
            Elem::I32 => "i32",
            Elem::U8 => "u8",
        }
    }
}

/// How a kernel uses a buffer parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    /// Read and written in place (the same element of the same row).
    ReadWrite,
}

impl Access {
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// A buffer of elements; at launch, a base address and a length in elements.
    Buffer { elem: Elem, access: Access },
    /// A scalar argument of type `F32` or `I64` (not `Bool`).
    Scalar(Ty),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub name: String,
    pub kind: ParamKind,
}

/// Index into [`Kernel::params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub u32);

/// Index into [`Kernel::vars`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId(pub u32);

/// Index into [`Kernel::arrays`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArrayId(pub u32);

/// The row index: variable 0 of every kernel, of type `I64`, set by the launch
/// (a kernel must not assign it).
pub const ROW: VarId = VarId(0);

#[derive(Clone, Debug, PartialEq)]
pub struct VarDecl {
    pub name: String,
    pub ty: Ty,
}

/// A local array of `len` values (registers or stack; `len` is small, at most
/// [`MAX_ARRAY_LEN`]).
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayDecl {
    pub name: String,
    pub ty: Ty,
    pub len: u32,
}

/// Largest local array a kernel may declare (the router's per-expert scores
/// of a 65 536-expert layer fit).
pub const MAX_ARRAY_LEN: u32 = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    /// `F32` or `I64`.
    Neg,
    /// `F32` or `I64`.
    Abs,
    Exp,
    Log,
    Sqrt,
    Tanh,
    Erf,
    Floor,
    /// `Bool`.
    Not,
    /// `I64` to `F32`.
    ToF32,
    /// `F32` to `I64`, truncating and saturating.
    ToI64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// `I64` only.
    Rem,
    Min,
    Max,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    /// `Bool` only.
    And,
    /// `Bool` only.
    Or,
}

impl BinOp {
    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne
        )
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    F32(f32),
    I64(i64),
    Bool(bool),
    Var(VarId),
    /// The value of a scalar parameter.
    Scalar(ParamId),
    /// Element `index` (an `I64`) of a buffer parameter.
    Load {
        buf: ParamId,
        index: Box<Expr>,
    },
    ArrayLoad {
        array: ArrayId,
        index: Box<Expr>,
    },
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `if cond { a } else { b }`; `a` and `b` have the same type.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
}

impl Expr {
    /// Calls `f` with every variable the expression reads, depth first.
    pub fn visit_vars(&self, f: &mut impl FnMut(VarId)) {
        match self {
            Expr::Var(v) => f(*v),
            Expr::Load { index, .. } | Expr::ArrayLoad { index, .. } => index.visit_vars(f),
            Expr::Unary(_, a) => a.visit_vars(f),
            Expr::Binary(_, a, b) => {
                a.visit_vars(f);
                b.visit_vars(f);
            }
            Expr::Select(c, a, b) => {
                c.visit_vars(f);
                a.visit_vars(f);
                b.visit_vars(f);
            }
            Expr::F32(_) | Expr::I64(_) | Expr::Bool(_) | Expr::Scalar(_) => {}
        }
    }
}

/// Calls `f` with every variable the statements of `body` read (in their
/// expressions and loop bounds), depth first, leaving out the statement
/// `skip` (compared by address) and what it contains.
pub fn visit_reads(body: &[Stmt], skip: Option<&Stmt>, f: &mut impl FnMut(VarId)) {
    for s in body {
        if skip.is_some_and(|k| std::ptr::eq(s, k)) {
            continue;
        }
        match s {
            Stmt::Set(_, e) => e.visit_vars(f),
            Stmt::Store { index, value, .. } | Stmt::ArrayStore { index, value, .. } => {
                index.visit_vars(f);
                value.visit_vars(f);
            }
            Stmt::For {
                start, end, body, ..
            } => {
                start.visit_vars(f);
                end.visit_vars(f);
                visit_reads(body, skip, f);
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                cond.visit_vars(f);
                visit_reads(then, skip, f);
                visit_reads(otherwise, skip, f);
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    Set(VarId, Expr),
    Store {
        buf: ParamId,
        index: Expr,
        value: Expr,
    },
    ArrayStore {
        array: ArrayId,
        index: Expr,
        value: Expr,
    },
    /// `for var in start..end` (both `I64`, evaluated once, step 1). The loop
    /// variable must be an `I64` variable the body does not assign.
    For {
        var: VarId,
        start: Expr,
        end: Expr,
        body: Vec<Stmt>,
    },
    If {
        cond: Expr,
        then: Vec<Stmt>,
        otherwise: Vec<Stmt>,
    },
}

/// A kernel description.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// A name made of `[a-z0-9_]` only (it becomes a symbol in generated code).
    pub name: String,
    pub params: Vec<Param>,
    /// Scalar variables; `vars[0]` is the row index ([`ROW`], `I64`).
    pub vars: Vec<VarDecl>,
    pub arrays: Vec<ArrayDecl>,
    pub body: Vec<Stmt>,
}

/// Why a launch failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchError {
    /// A load or store outside its buffer; the index and the buffer's length.
    OutOfBounds {
        param: String,
        index: i64,
        len: u64,
    },
    DivideByZero,
    /// The arguments do not match the parameters (count, kind or element type).
    BadArguments(String),
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::OutOfBounds { param, index, len } => write!(
                f,
                "index {index} is outside buffer `{param}` of {len} elements"
            ),
            LaunchError::DivideByZero => write!(f, "integer division by zero"),
            LaunchError::BadArguments(why) => write!(f, "bad launch arguments: {why}"),
        }
    }
}

impl std::error::Error for LaunchError {}

/// One launch argument, in the order of [`Kernel::params`]: a buffer as its
/// bytes (whose length must be a multiple of the element size), or a scalar.
#[derive(Debug)]
pub enum Arg<'a> {
    /// A buffer the kernel only reads.
    Read(&'a [u8]),
    /// A buffer the kernel writes (or reads and writes).
    Write(&'a mut [u8]),
    F32(f32),
    I64(i64),
}

/// Prints a kernel as readable pseudo-code, for debugging and docs (not a
/// format anything parses). Variables and arrays print by name, with `#id`
/// added where two share a name.
impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = Printer { k: self };
        write!(f, "kernel {}(", self.name)?;
        for (i, param) in self.params.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            match param.kind {
                ParamKind::Buffer { elem, access } => {
                    let access = match access {
                        Access::Read => "read",
                        Access::Write => "write",
                        Access::ReadWrite => "read_write",
                    };
                    write!(f, "{}: {}[] {access}", param.name, elem.name())?;
                }
                ParamKind::Scalar(ty) => write!(f, "{}: {}", param.name, ty_name(ty))?,
            }
        }
        writeln!(f, ") {{")?;
        for (i, v) in self.vars.iter().enumerate() {
            writeln!(f, "    var {}: {}", p.var(VarId(i as u32)), ty_name(v.ty))?;
        }
        for (i, a) in self.arrays.iter().enumerate() {
            writeln!(
                f,
                "    array {}: {}[{}]",
                p.array(ArrayId(i as u32)),
                ty_name(a.ty),
                a.len
            )?;
        }
        p.block(f, &self.body, 1)?;
        writeln!(f, "}}")
    }
}

fn ty_name(t: Ty) -> &'static str {
    match t {
        Ty::F32 => "f32",
        Ty::I64 => "i64",
        Ty::Bool => "bool",
    }
}

struct Printer<'k> {
    k: &'k Kernel,
}

impl Printer<'_> {
    fn var(&self, v: VarId) -> String {
        match self.k.vars.get(v.0 as usize) {
            Some(d) if self.k.vars.iter().filter(|o| o.name == d.name).count() == 1 => {
                d.name.clone()
            }
            Some(d) => format!("{}#{}", d.name, v.0),
            None => format!("var#{}", v.0),
        }
    }

    fn array(&self, a: ArrayId) -> String {
        match self.k.arrays.get(a.0 as usize) {
            Some(d) if self.k.arrays.iter().filter(|o| o.name == d.name).count() == 1 => {
                d.name.clone()
            }
            Some(d) => format!("{}#{}", d.name, a.0),
            None => format!("array#{}", a.0),
        }
    }

    fn param(&self, p: ParamId) -> String {
        self.k
            .params
            .get(p.0 as usize)
            .map_or_else(|| format!("param#{}", p.0), |d| d.name.clone())
    }

    fn block(&self, f: &mut fmt::Formatter<'_>, body: &[Stmt], depth: usize) -> fmt::Result {
        let pad = "    ".repeat(depth);
        for s in body {
            match s {
                Stmt::Set(v, e) => writeln!(f, "{pad}{} = {}", self.var(*v), self.expr(e))?,
                Stmt::Store { buf, index, value } => writeln!(
                    f,
                    "{pad}{}[{}] = {}",
                    self.param(*buf),
                    self.expr(index),
                    self.expr(value)
                )?,
                Stmt::ArrayStore {
                    array,
                    index,
                    value,
                } => writeln!(
                    f,
                    "{pad}{}[{}] = {}",
                    self.array(*array),
                    self.expr(index),
                    self.expr(value)
                )?,
                Stmt::For {
                    var,
                    start,
                    end,
                    body,
                } => {
                    writeln!(
                        f,
                        "{pad}for {} in {} .. {} {{",
                        self.var(*var),
                        self.expr(start),
                        self.expr(end)
                    )?;
                    self.block(f, body, depth + 1)?;
                    writeln!(f, "{pad}}}")?;
                }
                Stmt::If {
                    cond,
                    then,
                    otherwise,
                } => {
                    writeln!(f, "{pad}if {} {{", self.expr(cond))?;
                    self.block(f, then, depth + 1)?;
                    if !otherwise.is_empty() {
                        writeln!(f, "{pad}}} else {{")?;
                        self.block(f, otherwise, depth + 1)?;
                    }
                    writeln!(f, "{pad}}}")?;
                }
            }
        }
        Ok(())
    }

    fn expr(&self, e: &Expr) -> String {
        match e {
            Expr::F32(v) if v.is_nan() => "nan".into(),
            Expr::F32(v) if v.is_infinite() => if *v > 0.0 { "inf" } else { "-inf" }.into(),
            Expr::F32(v) => format!("{v:?}"),
            Expr::I64(v) => v.to_string(),
            Expr::Bool(v) => v.to_string(),
            Expr::Var(v) => self.var(*v),
            Expr::Scalar(p) => self.param(*p),
            Expr::Load { buf, index } => format!("{}[{}]", self.param(*buf), self.expr(index)),
            Expr::ArrayLoad { array, index } => {
                format!("{}[{}]", self.array(*array), self.expr(index))
            }
            Expr::Unary(op, a) => {
                let a = self.expr(a);
                match op {
                    UnOp::Neg => format!("-{a}"),
                    UnOp::Not => format!("!{a}"),
                    UnOp::Abs => format!("abs({a})"),
                    UnOp::Exp => format!("exp({a})"),
                    UnOp::Log => format!("log({a})"),
                    UnOp::Sqrt => format!("sqrt({a})"),
                    UnOp::Tanh => format!("tanh({a})"),
                    UnOp::Erf => format!("erf({a})"),
                    UnOp::Floor => format!("floor({a})"),
                    UnOp::ToF32 => format!("f32({a})"),
                    UnOp::ToI64 => format!("i64({a})"),
                }
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.expr(a), self.expr(b));
                let sym = match op {
                    BinOp::Min => return format!("min({a}, {b})"),
                    BinOp::Max => return format!("max({a}, {b})"),
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                    BinOp::Rem => "%",
                    BinOp::Lt => "<",
                    BinOp::Le => "<=",
                    BinOp::Gt => ">",
                    BinOp::Ge => ">=",
                    BinOp::Eq => "==",
                    BinOp::Ne => "!=",
                    BinOp::And => "&&",
                    BinOp::Or => "||",
                };
                format!("({a} {sym} {b})")
            }
            Expr::Select(c, a, b) => format!(
                "select({}, {}, {})",
                self.expr(c),
                self.expr(a),
                self.expr(b)
            ),
        }
    }
}
