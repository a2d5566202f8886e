//! A builder that makes kernel descriptions read like the code they describe.
//!
//! Writing [`Kernel`]s as nested `Expr`/`Stmt` values is exact but
//! unreadable; the library's kernels are written with this builder instead:
//!
//! ```
//! use moec_kernels::build::{Builder, E};
//! use moec_kernels::ir::{Access, Elem};
//!
//! // out[t, :] = a[t, :] + b[t, :] for rows of 4 elements.
//! let mut b = Builder::new("add4");
//! let a = b.buffer("a", Elem::Bf16, Access::Read);
//! let c = b.buffer("b", Elem::Bf16, Access::Read);
//! let out = b.buffer("out", Elem::Bf16, Access::Write);
//! let base = b.local("base", b.row() * 4);
//! b.for_range(0, 4, |b, h| {
//!     let i = base + h;
//!     b.store(out, &i, a.at(&i) + c.at(&i));
//! });
//! let kernel = b.finish().unwrap();
//! assert_eq!(kernel.params.len(), 3);
//! ```
//!
//! Expressions are [`E`] values (a thin wrapper of [`Expr`]) combined with the
//! usual operators (`+ - * / %`, unary `-`) and with the free functions of
//! this module ([`exp`], [`max`], [`lt`], [`select`], ...). Variables
//! ([`Var`]), buffers ([`Buf`]) and local arrays ([`Arr`]) are small `Copy`
//! handles. Integer literals (`i32`, `i64`) become `I64` constants and `f32`
//! literals `F32` constants; there is deliberately no conversion from `f64`,
//! so that a constant is never rounded twice.
//!
//! The builder does not type-check as it goes: [`Builder::finish`] runs
//! [`check`] on the whole kernel, so a mistake is reported once, with the
//! kernel's name and the offending variable or buffer.

use std::ops;

use crate::check::{check, type_of, CheckError};
use crate::ir::{
    Access, ArrayDecl, ArrayId, BinOp, Elem, Expr, Kernel, Param, ParamId, ParamKind, Stmt, Ty,
    UnOp, VarDecl, VarId, ROW,
};

/// An expression under construction.
#[derive(Clone, Debug, PartialEq)]
pub struct E(pub Expr);

/// A scalar variable of the kernel being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(pub VarId);

/// A buffer parameter of the kernel being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf(pub ParamId);

/// A local array of the kernel being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arr(pub ArrayId);

impl Var {
    /// The variable's value.
    pub fn e(self) -> E {
        E(Expr::Var(self.0))
    }
}

impl Buf {
    /// Element `index` of the buffer (a load).
    pub fn at(self, index: impl Into<E>) -> E {
        E(Expr::Load {
            buf: self.0,
            index: Box::new(index.into().0),
        })
    }
}

impl Arr {
    /// Element `index` of the array.
    pub fn at(self, index: impl Into<E>) -> E {
        E(Expr::ArrayLoad {
            array: self.0,
            index: Box::new(index.into().0),
        })
    }
}

impl From<Expr> for E {
    fn from(e: Expr) -> E {
        E(e)
    }
}
impl From<&E> for E {
    fn from(e: &E) -> E {
        e.clone()
    }
}
impl From<Var> for E {
    fn from(v: Var) -> E {
        v.e()
    }
}
impl From<f32> for E {
    fn from(v: f32) -> E {
        E(Expr::F32(v))
    }
}
impl From<i64> for E {
    fn from(v: i64) -> E {
        E(Expr::I64(v))
    }
}
impl From<i32> for E {
    fn from(v: i32) -> E {
        E(Expr::I64(i64::from(v)))
    }
}
impl From<bool> for E {
    fn from(v: bool) -> E {
        E(Expr::Bool(v))
    }
}

fn un(op: UnOp, a: impl Into<E>) -> E {
    E(Expr::Unary(op, Box::new(a.into().0)))
}

fn bin(op: BinOp, a: impl Into<E>, b: impl Into<E>) -> E {
    E(Expr::Binary(op, Box::new(a.into().0), Box::new(b.into().0)))
}

macro_rules! arith {
    ($($lhs:ty),*) => {$(
        impl<T: Into<E>> ops::Add<T> for $lhs {
            type Output = E;
            fn add(self, rhs: T) -> E { bin(BinOp::Add, self, rhs) }
        }
        impl<T: Into<E>> ops::Sub<T> for $lhs {
            type Output = E;
            fn sub(self, rhs: T) -> E { bin(BinOp::Sub, self, rhs) }
        }
        impl<T: Into<E>> ops::Mul<T> for $lhs {
            type Output = E;
            fn mul(self, rhs: T) -> E { bin(BinOp::Mul, self, rhs) }
        }
        impl<T: Into<E>> ops::Div<T> for $lhs {
            type Output = E;
            fn div(self, rhs: T) -> E { bin(BinOp::Div, self, rhs) }
        }
        impl<T: Into<E>> ops::Rem<T> for $lhs {
            type Output = E;
            fn rem(self, rhs: T) -> E { bin(BinOp::Rem, self, rhs) }
        }
        impl ops::Neg for $lhs {
            type Output = E;
            fn neg(self) -> E { un(UnOp::Neg, self) }
        }
    )*};
}
arith!(E, &E, Var);

/// `a < b`.
pub fn lt(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Lt, a, b)
}
/// `a <= b`.
pub fn le(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Le, a, b)
}
/// `a > b`.
pub fn gt(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Gt, a, b)
}
/// `a >= b`.
pub fn ge(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Ge, a, b)
}
/// `a == b`.
pub fn eq(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Eq, a, b)
}
/// `a != b` (true when either is NaN).
pub fn ne(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Ne, a, b)
}
/// `a && b` (both evaluated).
pub fn and(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::And, a, b)
}
/// `a || b` (both evaluated).
pub fn or(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Or, a, b)
}
/// `!a`.
pub fn not(a: impl Into<E>) -> E {
    un(UnOp::Not, a)
}
/// The smaller of `a` and `b`; NaN when either is NaN.
pub fn min(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Min, a, b)
}
/// The larger of `a` and `b`; NaN when either is NaN.
pub fn max(a: impl Into<E>, b: impl Into<E>) -> E {
    bin(BinOp::Max, a, b)
}
/// `|a|`.
pub fn abs(a: impl Into<E>) -> E {
    un(UnOp::Abs, a)
}
pub fn exp(a: impl Into<E>) -> E {
    un(UnOp::Exp, a)
}
pub fn log(a: impl Into<E>) -> E {
    un(UnOp::Log, a)
}
pub fn sqrt(a: impl Into<E>) -> E {
    un(UnOp::Sqrt, a)
}
pub fn tanh(a: impl Into<E>) -> E {
    un(UnOp::Tanh, a)
}
pub fn erf(a: impl Into<E>) -> E {
    un(UnOp::Erf, a)
}
pub fn floor(a: impl Into<E>) -> E {
    un(UnOp::Floor, a)
}
/// `I64` to `F32`, rounding to nearest.
pub fn to_f32(a: impl Into<E>) -> E {
    un(UnOp::ToF32, a)
}
/// `F32` to `I64`, truncating toward zero and saturating (NaN gives 0).
pub fn to_i64(a: impl Into<E>) -> E {
    un(UnOp::ToI64, a)
}
/// `if cond { a } else { b }` (both arms evaluated).
pub fn select(cond: impl Into<E>, a: impl Into<E>, b: impl Into<E>) -> E {
    E(Expr::Select(
        Box::new(cond.into().0),
        Box::new(a.into().0),
        Box::new(b.into().0),
    ))
}
/// The logistic function `1 / (1 + exp(-v))`, in exactly this order of
/// operations (every kernel that needs a sigmoid uses this one, so they all
/// round alike).
pub fn sigmoid(v: impl Into<E>) -> E {
    E::from(1.0f32) / (exp(-v.into()) + 1.0f32)
}

/// `name`, or `name_2`, `name_3`, ... : the first that is not `taken`.
fn unique(name: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(name) {
        return name.to_string();
    }
    (2..)
        .map(|n| format!("{name}_{n}"))
        .find(|n| !taken(n))
        .unwrap_or_else(|| name.to_string())
}

/// Builds one [`Kernel`]. See the module docs.
#[derive(Debug)]
pub struct Builder {
    kernel: Kernel,
    /// The statement lists being filled: the body, then one per open loop or
    /// branch.
    blocks: Vec<Vec<Stmt>>,
    loops: u32,
    /// The first problem found while building (reported by `finish`).
    error: Option<String>,
}

impl Builder {
    /// A kernel with no parameters; `vars[0]` is the row variable `row`.
    pub fn new(name: &str) -> Builder {
        Builder {
            kernel: Kernel {
                name: name.to_string(),
                params: Vec::new(),
                vars: vec![VarDecl {
                    name: "row".into(),
                    ty: Ty::I64,
                }],
                arrays: Vec::new(),
                body: Vec::new(),
            },
            blocks: vec![Vec::new()],
            loops: 0,
            error: None,
        }
    }

    /// The row index (`I64`).
    pub fn row(&self) -> E {
        E(Expr::Var(ROW))
    }

    /// Declares the next buffer parameter.
    pub fn buffer(&mut self, name: &str, elem: Elem, access: Access) -> Buf {
        self.kernel.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::Buffer { elem, access },
        });
        Buf(ParamId(self.kernel.params.len() as u32 - 1))
    }

    /// Declares the next scalar parameter (`F32` or `I64`) and gives its value.
    pub fn scalar(&mut self, name: &str, ty: Ty) -> E {
        self.kernel.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::Scalar(ty),
        });
        E(Expr::Scalar(ParamId(self.kernel.params.len() as u32 - 1)))
    }

    /// Declares a variable (zero at the start of each row). A name already
    /// taken gets a `_2`, `_3`, ... suffix, so that every variable of a built
    /// kernel has a distinct name.
    pub fn var(&mut self, name: &str, ty: Ty) -> Var {
        let name = unique(name, |n| self.kernel.vars.iter().any(|v| v.name == n));
        self.kernel.vars.push(VarDecl { name, ty });
        Var(VarId(self.kernel.vars.len() as u32 - 1))
    }

    /// Declares a variable of `init`'s type and assigns `init` to it here.
    pub fn local(&mut self, name: &str, init: impl Into<E>) -> Var {
        let init = init.into();
        let ty = match type_of(&self.kernel, &init.0) {
            Ok(t) => t,
            Err(why) => {
                self.error
                    .get_or_insert(format!("the initial value of `{name}`: {why}"));
                Ty::F32
            }
        };
        let v = self.var(name, ty);
        self.set(v, init);
        v
    }

    /// Declares a local array of `len` elements (zero at the start of each
    /// row), renamed like [`Builder::var`] when the name is taken.
    pub fn array(&mut self, name: &str, ty: Ty, len: u32) -> Arr {
        let name = unique(name, |n| self.kernel.arrays.iter().any(|a| a.name == n));
        self.kernel.arrays.push(ArrayDecl { name, ty, len });
        Arr(ArrayId(self.kernel.arrays.len() as u32 - 1))
    }

    fn emit(&mut self, s: Stmt) {
        if let Some(block) = self.blocks.last_mut() {
            block.push(s);
        }
    }

    fn nested(&mut self, f: impl FnOnce(&mut Builder)) -> Vec<Stmt> {
        self.blocks.push(Vec::new());
        f(self);
        self.blocks.pop().unwrap_or_default()
    }

    /// `v = value`.
    pub fn set(&mut self, v: Var, value: impl Into<E>) {
        self.emit(Stmt::Set(v.0, value.into().0));
    }

    /// `buf[index] = value`.
    pub fn store(&mut self, buf: Buf, index: impl Into<E>, value: impl Into<E>) {
        self.emit(Stmt::Store {
            buf: buf.0,
            index: index.into().0,
            value: value.into().0,
        });
    }

    /// `array[index] = value`.
    pub fn array_set(&mut self, array: Arr, index: impl Into<E>, value: impl Into<E>) {
        self.emit(Stmt::ArrayStore {
            array: array.0,
            index: index.into().0,
            value: value.into().0,
        });
    }

    /// `for i in start..end { body(i) }` with a fresh `I64` loop variable.
    pub fn for_range(
        &mut self,
        start: impl Into<E>,
        end: impl Into<E>,
        body: impl FnOnce(&mut Builder, Var),
    ) {
        let var = self.var(&format!("i{}", self.loops), Ty::I64);
        self.loops += 1;
        let (start, end) = (start.into().0, end.into().0);
        let body = self.nested(|b| body(b, var));
        self.emit(Stmt::For {
            var: var.0,
            start,
            end,
            body,
        });
    }

    /// `if cond { then }`.
    pub fn if_(&mut self, cond: impl Into<E>, then: impl FnOnce(&mut Builder)) {
        let cond = cond.into().0;
        let then = self.nested(then);
        self.emit(Stmt::If {
            cond,
            then,
            otherwise: Vec::new(),
        });
    }

    /// `if cond { then } else { otherwise }`.
    pub fn if_else(
        &mut self,
        cond: impl Into<E>,
        then: impl FnOnce(&mut Builder),
        otherwise: impl FnOnce(&mut Builder),
    ) {
        let cond = cond.into().0;
        let then = self.nested(then);
        let otherwise = self.nested(otherwise);
        self.emit(Stmt::If {
            cond,
            then,
            otherwise,
        });
    }

    /// The kernel, type-checked.
    pub fn finish(mut self) -> Result<Kernel, CheckError> {
        if let Some(message) = self.error {
            return Err(CheckError {
                kernel: self.kernel.name,
                message,
            });
        }
        self.kernel.body = self.blocks.pop().unwrap_or_default();
        check(&self.kernel)?;
        Ok(self.kernel)
    }
}
