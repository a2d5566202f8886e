//! The type checker of the kernel description language.
//!
//! Every backend assumes a kernel is well formed: that ids are in range, that
//! the operands of an operation have the types [`UnOp`] and [`BinOp`] say,
//! that a load reads a buffer the kernel declared as read, and so on. Checking
//! once, here, lets the interpreter and the code generators trust the
//! description instead of each re-validating (or, worse, each silently
//! doing something different with a malformed one). [`crate::build::Builder`]
//! runs [`check`] when it finishes a kernel, and [`crate::interp::run`] runs
//! it before a launch.
//!
//! The rules (beyond "every id is in range"):
//!
//! - the kernel name is `[a-z0-9_]+` (it becomes a symbol); parameter names
//!   are `[a-z0-9_]+` and distinct (they name buffers in launch errors and in
//!   generated code);
//! - scalar parameters are `F32` or `I64`;
//! - `vars[0]` is the `I64` row variable ([`ROW`]) and is never assigned,
//!   neither by `Set` nor as a loop variable;
//! - a loop variable is `I64` and is not assigned in its loop's body (which
//!   includes being the variable of a nested loop);
//! - a local array has `1 ..= MAX_ARRAY_LEN` elements;
//! - `Neg`, `Abs`: `F32` or `I64`; `Exp`, `Log`, `Sqrt`, `Tanh`, `Erf`,
//!   `Floor`: `F32`; `Not`: `Bool`; `ToF32`: `I64 -> F32`; `ToI64`:
//!   `F32 -> I64`;
//! - `Add`, `Sub`, `Mul`, `Div`, `Min`, `Max`: both `F32` or both `I64`;
//!   `Rem`: `I64`; comparisons: both `F32` or both `I64`, giving `Bool`
//!   (booleans are compared with `And`, `Or`, `Not`); `And`, `Or`: `Bool`;
//! - indices are `I64`; `If` and `Select` conditions are `Bool`; the arms of a
//!   `Select` have the same type;
//! - a load's buffer is readable (`Read` or `ReadWrite`), a store's buffer is
//!   writable (`Write` or `ReadWrite`), and the stored value has the type a
//!   load of the element gives ([`Elem::value_ty`]).

use std::fmt;

use crate::ir::{
    Access, ArrayId, BinOp, Elem, Expr, Kernel, ParamId, ParamKind, Stmt, Ty, UnOp, VarId,
    MAX_ARRAY_LEN, ROW,
};

/// Why a kernel description is malformed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckError {
    /// The kernel's name (as written, even when the name is what is wrong).
    pub kernel: String,
    /// What is wrong, naming the offending parameter, variable, array or
    /// operation.
    pub message: String,
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel `{}`: {}", self.kernel, self.message)
    }
}

impl std::error::Error for CheckError {}

/// Type-checks a kernel description (see the module docs for the rules).
pub fn check(k: &Kernel) -> Result<(), CheckError> {
    Checker {
        k,
        loop_vars: Vec::new(),
    }
    .kernel()
    .map_err(|message| CheckError {
        kernel: k.name.clone(),
        message,
    })
}

/// The type of an expression in a kernel, or why it has none (the builder
/// uses this to declare a variable of its initial value's type).
pub(crate) fn type_of(k: &Kernel, e: &Expr) -> Result<Ty, String> {
    Checker {
        k,
        loop_vars: Vec::new(),
    }
    .expr(e)
}

/// `[a-z0-9_]+`.
pub(crate) fn is_symbol(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn ty_name(t: Ty) -> &'static str {
    match t {
        Ty::F32 => "f32",
        Ty::I64 => "i64",
        Ty::Bool => "bool",
    }
}

type R<T> = Result<T, String>;

struct Checker<'k> {
    k: &'k Kernel,
    /// Variables of the loops enclosing the statement being checked.
    loop_vars: Vec<VarId>,
}

impl Checker<'_> {
    fn kernel(&mut self) -> R<()> {
        let k = self.k;
        if !is_symbol(&k.name) {
            return Err("the kernel name must be non-empty and made of [a-z0-9_] only".into());
        }
        for (i, p) in k.params.iter().enumerate() {
            if !is_symbol(&p.name) {
                return Err(format!(
                    "parameter {i} `{}`: a parameter name must be non-empty and made of [a-z0-9_] only",
                    p.name
                ));
            }
            if k.params[..i].iter().any(|q| q.name == p.name) {
                return Err(format!("two parameters are named `{}`", p.name));
            }
            if let ParamKind::Scalar(Ty::Bool) = p.kind {
                return Err(format!(
                    "scalar parameter `{}` is bool; scalar parameters are f32 or i64",
                    p.name
                ));
            }
        }
        match k.vars.first() {
            None => return Err("the kernel has no variables; vars[0] must be the i64 row".into()),
            Some(v) if v.ty != Ty::I64 => {
                return Err(format!(
                    "vars[0] `{}` is {}; it must be the i64 row index",
                    v.name,
                    ty_name(v.ty)
                ))
            }
            Some(_) => {}
        }
        for a in &k.arrays {
            if a.len == 0 || a.len > MAX_ARRAY_LEN {
                return Err(format!(
                    "local array `{}` has {} elements; it must have 1 to {MAX_ARRAY_LEN}",
                    a.name, a.len
                ));
            }
        }
        self.block(&k.body)
    }

    fn var(&self, v: VarId) -> R<Ty> {
        self.k.vars.get(v.0 as usize).map(|d| d.ty).ok_or_else(|| {
            format!(
                "variable id {} is out of range ({} variables)",
                v.0,
                self.k.vars.len()
            )
        })
    }

    fn var_name(&self, v: VarId) -> &str {
        self.k
            .vars
            .get(v.0 as usize)
            .map_or("?", |d| d.name.as_str())
    }

    fn array(&self, a: ArrayId) -> R<(Ty, &str)> {
        self.k
            .arrays
            .get(a.0 as usize)
            .map(|d| (d.ty, d.name.as_str()))
            .ok_or_else(|| {
                format!(
                    "array id {} is out of range ({} arrays)",
                    a.0,
                    self.k.arrays.len()
                )
            })
    }

    fn buffer(&self, p: ParamId) -> R<(Elem, Access, &str)> {
        let param = self.k.params.get(p.0 as usize).ok_or_else(|| {
            format!(
                "parameter id {} is out of range ({} parameters)",
                p.0,
                self.k.params.len()
            )
        })?;
        match param.kind {
            ParamKind::Buffer { elem, access } => Ok((elem, access, param.name.as_str())),
            ParamKind::Scalar(_) => Err(format!(
                "parameter `{}` is a scalar, used as a buffer",
                param.name
            )),
        }
    }

    /// A variable that a statement assigns: not the row, not an enclosing
    /// loop's variable.
    fn assignable(&self, v: VarId, how: &str) -> R<Ty> {
        let ty = self.var(v)?;
        if v == ROW {
            return Err(format!(
                "{how} assigns the row variable `{}` (vars[0])",
                self.var_name(v)
            ));
        }
        if self.loop_vars.contains(&v) {
            return Err(format!(
                "{how} assigns `{}`, the variable of an enclosing loop",
                self.var_name(v)
            ));
        }
        Ok(ty)
    }

    fn block(&mut self, body: &[Stmt]) -> R<()> {
        body.iter().try_for_each(|s| self.stmt(s))
    }

    fn stmt(&mut self, s: &Stmt) -> R<()> {
        match s {
            Stmt::Set(v, e) => {
                let ty = self.assignable(*v, "a Set")?;
                let et = self.expr(e)?;
                if et != ty {
                    return Err(format!(
                        "Set of {} variable `{}` to a {} value",
                        ty_name(ty),
                        self.var_name(*v),
                        ty_name(et)
                    ));
                }
            }
            Stmt::Store { buf, index, value } => {
                let (elem, access, name) = self.buffer(*buf)?;
                if !access.writes() {
                    return Err(format!("store to `{name}`, a Read buffer"));
                }
                self.index(index, &format!("a store to `{name}`"))?;
                let vt = self.expr(value)?;
                if vt != elem.value_ty() {
                    return Err(format!(
                        "store of a {} value to `{name}` of {} elements (which store {} values)",
                        ty_name(vt),
                        elem.name(),
                        ty_name(elem.value_ty())
                    ));
                }
            }
            Stmt::ArrayStore {
                array,
                index,
                value,
            } => {
                let (ty, name) = self.array(*array)?;
                self.index(index, &format!("a store to array `{name}`"))?;
                let vt = self.expr(value)?;
                if vt != ty {
                    return Err(format!(
                        "store of a {} value to {} array `{name}`",
                        ty_name(vt),
                        ty_name(ty)
                    ));
                }
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => {
                let ty = self.assignable(*var, "a For loop")?;
                if ty != Ty::I64 {
                    return Err(format!(
                        "loop variable `{}` is {}; it must be i64",
                        self.var_name(*var),
                        ty_name(ty)
                    ));
                }
                for (what, e) in [("start", start), ("end", end)] {
                    let t = self.expr(e)?;
                    if t != Ty::I64 {
                        return Err(format!(
                            "the {what} of the loop over `{}` is {}; it must be i64",
                            self.var_name(*var),
                            ty_name(t)
                        ));
                    }
                }
                self.loop_vars.push(*var);
                let r = self.block(body);
                self.loop_vars.pop();
                r?;
            }
            Stmt::If {
                cond,
                then,
                otherwise,
            } => {
                let t = self.expr(cond)?;
                if t != Ty::Bool {
                    return Err(format!(
                        "an If condition is {}; it must be bool",
                        ty_name(t)
                    ));
                }
                self.block(then)?;
                self.block(otherwise)?;
            }
        }
        Ok(())
    }

    fn index(&self, e: &Expr, what: &str) -> R<()> {
        let t = self.expr(e)?;
        if t != Ty::I64 {
            return Err(format!(
                "the index of {what} is {}; it must be i64",
                ty_name(t)
            ));
        }
        Ok(())
    }

    fn expr(&self, e: &Expr) -> R<Ty> {
        Ok(match e {
            Expr::F32(_) => Ty::F32,
            Expr::I64(_) => Ty::I64,
            Expr::Bool(_) => Ty::Bool,
            Expr::Var(v) => self.var(*v)?,
            Expr::Scalar(p) => {
                let param = self.k.params.get(p.0 as usize).ok_or_else(|| {
                    format!(
                        "parameter id {} is out of range ({} parameters)",
                        p.0,
                        self.k.params.len()
                    )
                })?;
                match param.kind {
                    ParamKind::Scalar(t) => t,
                    ParamKind::Buffer { .. } => {
                        return Err(format!(
                            "parameter `{}` is a buffer, used as a scalar",
                            param.name
                        ))
                    }
                }
            }
            Expr::Load { buf, index } => {
                let (elem, access, name) = self.buffer(*buf)?;
                if !access.reads() {
                    return Err(format!("load from `{name}`, a Write-only buffer"));
                }
                self.index(index, &format!("a load from `{name}`"))?;
                elem.value_ty()
            }
            Expr::ArrayLoad { array, index } => {
                let (ty, name) = self.array(*array)?;
                self.index(index, &format!("a load from array `{name}`"))?;
                ty
            }
            Expr::Unary(op, a) => {
                let t = self.expr(a)?;
                let (ok, out) = match op {
                    UnOp::Neg | UnOp::Abs => (t == Ty::F32 || t == Ty::I64, t),
                    UnOp::Exp | UnOp::Log | UnOp::Sqrt | UnOp::Tanh | UnOp::Erf | UnOp::Floor => {
                        (t == Ty::F32, Ty::F32)
                    }
                    UnOp::Not => (t == Ty::Bool, Ty::Bool),
                    UnOp::ToF32 => (t == Ty::I64, Ty::F32),
                    UnOp::ToI64 => (t == Ty::F32, Ty::I64),
                };
                if !ok {
                    return Err(format!("{op:?} of a {} operand", ty_name(t)));
                }
                out
            }
            Expr::Binary(op, a, b) => {
                let ta = self.expr(a)?;
                let tb = self.expr(b)?;
                if ta != tb {
                    return Err(format!(
                        "{op:?} of a {} and a {} operand (operands must have the same type)",
                        ty_name(ta),
                        ty_name(tb)
                    ));
                }
                let numeric = ta == Ty::F32 || ta == Ty::I64;
                let (ok, out) = match op {
                    BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Min | BinOp::Max => {
                        (numeric, ta)
                    }
                    BinOp::Rem => (ta == Ty::I64, Ty::I64),
                    BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne => {
                        (numeric, Ty::Bool)
                    }
                    BinOp::And | BinOp::Or => (ta == Ty::Bool, Ty::Bool),
                };
                if !ok {
                    return Err(format!("{op:?} of {} operands", ty_name(ta)));
                }
                out
            }
            Expr::Select(c, a, b) => {
                let tc = self.expr(c)?;
                if tc != Ty::Bool {
                    return Err(format!(
                        "a Select condition is {}; it must be bool",
                        ty_name(tc)
                    ));
                }
                let ta = self.expr(a)?;
                let tb = self.expr(b)?;
                if ta != tb {
                    return Err(format!(
                        "the arms of a Select are {} and {}; they must have the same type",
                        ty_name(ta),
                        ty_name(tb)
                    ));
                }
                ta
            }
        })
    }
}
