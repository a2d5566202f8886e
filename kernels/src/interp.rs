//! The reference interpreter: runs a kernel description directly.
//!
//! This is the oracle the Cranelift and CUDA backends are tested against, so
//! it favours being obviously right over being fast: it implements the
//! semantics of [`crate::ir`] statement by statement, with every element
//! conversion and every float function taken from [`crate::scalar`] (the
//! functions the Cranelift backend calls too), so the two agree bit for bit.
//!
//! It is still quick enough for tests on small shapes: before the first row
//! the kernel is lowered once into a typed tree (`F32`, `I64` and `Bool`
//! expressions apart, scalar parameters folded into constants, variables
//! split by type), so evaluating an expression never inspects a type tag or
//! looks a parameter up.
//!
//! Beyond what [`crate::ir`] specifies, the interpreter:
//!
//! - runs [`check`] first and refuses a malformed kernel with
//!   [`LaunchError::BadArguments`];
//! - reports an out-of-range local array index as
//!   [`LaunchError::OutOfBounds`] with the array's name in `param`;
//! - leaves a loop variable, after its loop, at the last value the loop gave
//!   it (unchanged when the loop ran no iteration). The library never reads a
//!   loop variable after its loop.
//!
//! [`encode_f32`], [`decode_f32`], [`encode_i64`] and [`decode_i64`] convert
//! between values and buffer bytes with the same conversions as stores and
//! loads; tests and the runtime use them to prepare arguments and read
//! results.

use crate::check::check;
use crate::ir::{
    Access, Arg, BinOp, Elem, Expr, Kernel, LaunchError, ParamKind, Stmt, Ty, UnOp, ROW,
};
use crate::scalar;

/// Runs `kernel` on rows `0 .. rows` with `args` in the order of its
/// parameters.
///
/// The arguments are validated before any row runs: one per parameter; a
/// buffer that the kernel writes (`Write` or `ReadWrite`) must be
/// [`Arg::Write`], a `Read` buffer may be either [`Arg::Read`] or
/// [`Arg::Write`]; a buffer's byte length is a multiple of its element size;
/// scalars match their parameter's type. Rows then run in order; the first
/// out-of-bounds access or zero integer divisor stops the launch (rows already
/// run keep what they wrote, as on every backend).
pub fn run(kernel: &Kernel, args: &mut [Arg<'_>], rows: u64) -> Result<(), LaunchError> {
    check(kernel).map_err(|e| LaunchError::BadArguments(format!("malformed kernel: {e}")))?;
    if args.len() != kernel.params.len() {
        return Err(LaunchError::BadArguments(format!(
            "kernel `{}` takes {} arguments, got {}",
            kernel.name,
            kernel.params.len(),
            args.len()
        )));
    }
    let mut bufs: Vec<Option<BufRef<'_>>> = Vec::with_capacity(args.len());
    let mut scalars: Vec<Option<Scalar>> = Vec::with_capacity(args.len());
    for (param, arg) in kernel.params.iter().zip(args.iter_mut()) {
        let bad = |why: String| {
            LaunchError::BadArguments(format!(
                "kernel `{}`, parameter `{}`: {why}",
                kernel.name, param.name
            ))
        };
        match param.kind {
            ParamKind::Buffer { elem, access } => {
                let data = match (access, arg) {
                    (Access::Read, Arg::Read(d)) => Data::Read(d),
                    (_, Arg::Write(d)) => Data::Write(d),
                    (Access::Read, _) => return Err(bad("expected a buffer".into())),
                    (_, _) => return Err(bad("expected a writable buffer (Arg::Write)".into())),
                };
                let bytes = data.bytes().len();
                if bytes % elem.bytes() != 0 {
                    return Err(bad(format!(
                        "{bytes} bytes is not a whole number of {} elements",
                        elem.name()
                    )));
                }
                bufs.push(Some(BufRef {
                    name: param.name.clone(),
                    elem,
                    len: (bytes / elem.bytes()) as u64,
                    data,
                }));
                scalars.push(None);
            }
            ParamKind::Scalar(ty) => {
                let value = match (ty, arg) {
                    (Ty::F32, Arg::F32(v)) => Scalar::F32(*v),
                    (Ty::I64, Arg::I64(v)) => Scalar::I64(*v),
                    (Ty::F32, _) => return Err(bad("expected an f32 scalar".into())),
                    (_, _) => return Err(bad("expected an i64 scalar".into())),
                };
                bufs.push(None);
                scalars.push(Some(value));
            }
        }
    }
    let prog = Lower::new(kernel, &scalars).program()?;
    let mut m = Machine {
        bufs,
        f: vec![0.0; prog.slots.f],
        i: vec![0; prog.slots.i],
        b: vec![false; prog.slots.b],
        fa: prog.arrays_f.iter().map(|a| vec![0.0; a.1]).collect(),
        ia: prog.arrays_i.iter().map(|a| vec![0; a.1]).collect(),
        ba: prog.arrays_b.iter().map(|a| vec![false; a.1]).collect(),
        prog: &prog,
    };
    for row in 0..rows {
        m.f.fill(0.0);
        m.i.fill(0);
        m.b.fill(false);
        m.fa.iter_mut().for_each(|a| a.fill(0.0));
        m.ia.iter_mut().for_each(|a| a.fill(0));
        m.ba.iter_mut().for_each(|a| a.fill(false));
        m.i[prog.row] = row as i64;
        m.block(&prog.body)?;
    }
    Ok(())
}

/// Buffer bytes holding `values` as `elem` elements, rounded as a store
/// rounds (an integer element takes the value truncated toward zero, as
/// [`UnOp::ToI64`] and a store would).
pub fn encode_f32(elem: Elem, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * elem.bytes()];
    for (i, &v) in values.iter().enumerate() {
        match elem.value_ty() {
            Ty::F32 => put_f32(&mut out, elem, i, v),
            _ => put_i64(&mut out, elem, i, v as i64),
        }
    }
    out
}

/// The values of `elem` elements in `bytes`, widened as a load widens (a
/// trailing partial element is ignored).
pub fn decode_f32(elem: Elem, bytes: &[u8]) -> Vec<f32> {
    (0..bytes.len() / elem.bytes())
        .map(|i| match elem.value_ty() {
            Ty::F32 => get_f32(bytes, elem, i),
            _ => get_i64(bytes, elem, i) as f32,
        })
        .collect()
}

/// Buffer bytes holding `values` as `elem` elements (an integer element keeps
/// the low bits; a float element takes the value converted to `f32` and
/// rounded).
pub fn encode_i64(elem: Elem, values: &[i64]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * elem.bytes()];
    for (i, &v) in values.iter().enumerate() {
        match elem.value_ty() {
            Ty::I64 => put_i64(&mut out, elem, i, v),
            _ => put_f32(&mut out, elem, i, v as f32),
        }
    }
    out
}

/// The values of `elem` elements in `bytes` as integers (a float element is
/// truncated toward zero, saturating).
pub fn decode_i64(elem: Elem, bytes: &[u8]) -> Vec<i64> {
    (0..bytes.len() / elem.bytes())
        .map(|i| match elem.value_ty() {
            Ty::I64 => get_i64(bytes, elem, i),
            _ => get_f32(bytes, elem, i) as i64,
        })
        .collect()
}

fn get_f32(d: &[u8], elem: Elem, i: usize) -> f32 {
    match elem {
        Elem::F32 => f32::from_le_bytes([d[4 * i], d[4 * i + 1], d[4 * i + 2], d[4 * i + 3]]),
        Elem::Bf16 => scalar::bf16_to_f32(u16::from_le_bytes([d[2 * i], d[2 * i + 1]])),
        Elem::F16 => scalar::f16_to_f32(u16::from_le_bytes([d[2 * i], d[2 * i + 1]])),
        Elem::Fp8E4m3 => scalar::fp8_e4m3_to_f32(d[i]),
        Elem::I32 | Elem::U8 => get_i64(d, elem, i) as f32,
    }
}

fn get_i64(d: &[u8], elem: Elem, i: usize) -> i64 {
    match elem {
        Elem::I32 => i64::from(i32::from_le_bytes([
            d[4 * i],
            d[4 * i + 1],
            d[4 * i + 2],
            d[4 * i + 3],
        ])),
        Elem::U8 => i64::from(d[i]),
        _ => get_f32(d, elem, i) as i64,
    }
}

fn put_f32(d: &mut [u8], elem: Elem, i: usize, v: f32) {
    match elem {
        Elem::F32 => d[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        Elem::Bf16 => d[2 * i..2 * i + 2].copy_from_slice(&scalar::f32_to_bf16(v).to_le_bytes()),
        Elem::F16 => d[2 * i..2 * i + 2].copy_from_slice(&scalar::f32_to_f16(v).to_le_bytes()),
        Elem::Fp8E4m3 => d[i] = scalar::f32_to_fp8_e4m3(v),
        Elem::I32 | Elem::U8 => put_i64(d, elem, i, v as i64),
    }
}

fn put_i64(d: &mut [u8], elem: Elem, i: usize, v: i64) {
    match elem {
        Elem::I32 => d[4 * i..4 * i + 4].copy_from_slice(&(v as i32).to_le_bytes()),
        Elem::U8 => d[i] = v as u8,
        _ => put_f32(d, elem, i, v as f32),
    }
}

#[derive(Clone, Copy)]
enum Scalar {
    F32(f32),
    I64(i64),
}

enum Data<'a> {
    Read(&'a [u8]),
    Write(&'a mut [u8]),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Read(d) => d,
            Data::Write(d) => d,
        }
    }
}

struct BufRef<'a> {
    name: String,
    elem: Elem,
    len: u64,
    data: Data<'a>,
}

// ---------------------------------------------------------------------------
// The lowered, typed program.

/// Index of a variable in the store of its type.
type Slot = usize;

enum FE {
    Lit(f32),
    Var(Slot),
    Load(usize, Box<IE>),
    Arr(usize, Box<IE>),
    Un(UnOp, Box<FE>),
    Bin(BinOp, Box<FE>, Box<FE>),
    FromI(Box<IE>),
    Sel(Box<BE>, Box<FE>, Box<FE>),
}

enum IE {
    Lit(i64),
    Var(Slot),
    Load(usize, Box<IE>),
    Arr(usize, Box<IE>),
    Un(UnOp, Box<IE>),
    Bin(BinOp, Box<IE>, Box<IE>),
    FromF(Box<FE>),
    Sel(Box<BE>, Box<IE>, Box<IE>),
}

enum BE {
    Lit(bool),
    Var(Slot),
    Arr(usize, Box<IE>),
    Not(Box<BE>),
    And(Box<BE>, Box<BE>),
    Or(Box<BE>, Box<BE>),
    CmpF(BinOp, Box<FE>, Box<FE>),
    CmpI(BinOp, Box<IE>, Box<IE>),
    Sel(Box<BE>, Box<BE>, Box<BE>),
}

enum St {
    SetF(Slot, FE),
    SetI(Slot, IE),
    SetB(Slot, BE),
    StoreF(usize, IE, FE),
    StoreI(usize, IE, IE),
    ArrF(usize, IE, FE),
    ArrI(usize, IE, IE),
    ArrB(usize, IE, BE),
    For(Slot, IE, IE, Vec<St>),
    If(BE, Vec<St>, Vec<St>),
}

/// Any typed expression.
enum TE {
    F(FE),
    I(IE),
    B(BE),
}

#[derive(Default)]
struct Slots {
    f: usize,
    i: usize,
    b: usize,
}

struct Program {
    body: Vec<St>,
    slots: Slots,
    row: Slot,
    /// (name, len) of the arrays of each type.
    arrays_f: Vec<(String, usize)>,
    arrays_i: Vec<(String, usize)>,
    arrays_b: Vec<(String, usize)>,
}

struct Lower<'a> {
    k: &'a Kernel,
    scalars: &'a [Option<Scalar>],
    /// Slot of each variable in the store of its type.
    var_slot: Vec<Slot>,
    array_slot: Vec<usize>,
}

fn internal(what: &str) -> LaunchError {
    LaunchError::BadArguments(format!("internal: {what} after a successful check"))
}

impl<'a> Lower<'a> {
    fn new(k: &'a Kernel, scalars: &'a [Option<Scalar>]) -> Lower<'a> {
        Lower {
            k,
            scalars,
            var_slot: Vec::new(),
            array_slot: Vec::new(),
        }
    }

    fn program(mut self) -> Result<Program, LaunchError> {
        let mut slots = Slots::default();
        for v in &self.k.vars {
            let n = match v.ty {
                Ty::F32 => &mut slots.f,
                Ty::I64 => &mut slots.i,
                Ty::Bool => &mut slots.b,
            };
            self.var_slot.push(*n);
            *n += 1;
        }
        let (mut af, mut ai, mut ab) = (Vec::new(), Vec::new(), Vec::new());
        for a in &self.k.arrays {
            let list = match a.ty {
                Ty::F32 => &mut af,
                Ty::I64 => &mut ai,
                Ty::Bool => &mut ab,
            };
            self.array_slot.push(list.len());
            list.push((a.name.clone(), a.len as usize));
        }
        let body = self.block(&self.k.body)?;
        Ok(Program {
            body,
            slots,
            row: self.var_slot[ROW.0 as usize],
            arrays_f: af,
            arrays_i: ai,
            arrays_b: ab,
        })
    }

    fn block(&self, body: &[Stmt]) -> Result<Vec<St>, LaunchError> {
        body.iter().map(|s| self.stmt(s)).collect()
    }

    fn stmt(&self, s: &Stmt) -> Result<St, LaunchError> {
        Ok(match s {
            Stmt::Set(v, e) => {
                let slot = self.var_slot[v.0 as usize];
                match self.expr(e)? {
                    TE::F(e) => St::SetF(slot, e),
                    TE::I(e) => St::SetI(slot, e),
                    TE::B(e) => St::SetB(slot, e),
                }
            }
            Stmt::Store { buf, index, value } => {
                let idx = self.int(index)?;
                match self.expr(value)? {
                    TE::F(v) => St::StoreF(buf.0 as usize, idx, v),
                    TE::I(v) => St::StoreI(buf.0 as usize, idx, v),
                    TE::B(_) => return Err(internal("a bool store")),
                }
            }
            Stmt::ArrayStore {
                array,
                index,
                value,
            } => {
                let slot = self.array_slot[array.0 as usize];
                let idx = self.int(index)?;
                match self.expr(value)? {
                    TE::F(v) => St::ArrF(slot, idx, v),
                    TE::I(v) => St::ArrI(slot, idx, v),
                    TE::B(v) => St::ArrB(slot, idx, v),
                }
            }
            Stmt::For {
                var,
                start,
                end,
                body,
            } => St::For(
                self.var_slot[var.0 as usize],
                self.int(start)?,
                self.int(end)?,
                self.block(body)?,
            ),
            Stmt::If {
                cond,
                then,
                otherwise,
            } => St::If(
                self.boolean(cond)?,
                self.block(then)?,
                self.block(otherwise)?,
            ),
        })
    }

    fn int(&self, e: &Expr) -> Result<IE, LaunchError> {
        match self.expr(e)? {
            TE::I(e) => Ok(e),
            _ => Err(internal("a non-i64 operand")),
        }
    }

    fn boolean(&self, e: &Expr) -> Result<BE, LaunchError> {
        match self.expr(e)? {
            TE::B(e) => Ok(e),
            _ => Err(internal("a non-bool operand")),
        }
    }

    fn expr(&self, e: &Expr) -> Result<TE, LaunchError> {
        Ok(match e {
            Expr::F32(v) => TE::F(FE::Lit(*v)),
            Expr::I64(v) => TE::I(IE::Lit(*v)),
            Expr::Bool(v) => TE::B(BE::Lit(*v)),
            Expr::Var(v) => {
                let slot = self.var_slot[v.0 as usize];
                match self.k.vars[v.0 as usize].ty {
                    Ty::F32 => TE::F(FE::Var(slot)),
                    Ty::I64 => TE::I(IE::Var(slot)),
                    Ty::Bool => TE::B(BE::Var(slot)),
                }
            }
            Expr::Scalar(p) => match self.scalars.get(p.0 as usize).copied().flatten() {
                Some(Scalar::F32(v)) => TE::F(FE::Lit(v)),
                Some(Scalar::I64(v)) => TE::I(IE::Lit(v)),
                None => return Err(internal("a scalar without a value")),
            },
            Expr::Load { buf, index } => {
                let b = buf.0 as usize;
                let idx = Box::new(self.int(index)?);
                match self.k.params[b].kind {
                    ParamKind::Buffer { elem, .. } if elem.value_ty() == Ty::F32 => {
                        TE::F(FE::Load(b, idx))
                    }
                    _ => TE::I(IE::Load(b, idx)),
                }
            }
            Expr::ArrayLoad { array, index } => {
                let slot = self.array_slot[array.0 as usize];
                let idx = Box::new(self.int(index)?);
                match self.k.arrays[array.0 as usize].ty {
                    Ty::F32 => TE::F(FE::Arr(slot, idx)),
                    Ty::I64 => TE::I(IE::Arr(slot, idx)),
                    Ty::Bool => TE::B(BE::Arr(slot, idx)),
                }
            }
            Expr::Unary(op, a) => match (op, self.expr(a)?) {
                (UnOp::ToF32, TE::I(a)) => TE::F(FE::FromI(Box::new(a))),
                (UnOp::ToI64, TE::F(a)) => TE::I(IE::FromF(Box::new(a))),
                (UnOp::Not, TE::B(a)) => TE::B(BE::Not(Box::new(a))),
                (_, TE::F(a)) => TE::F(FE::Un(*op, Box::new(a))),
                (UnOp::Neg | UnOp::Abs, TE::I(a)) => TE::I(IE::Un(*op, Box::new(a))),
                _ => return Err(internal("an ill-typed unary operation")),
            },
            Expr::Binary(op, a, b) => match (op, self.expr(a)?, self.expr(b)?) {
                (BinOp::And, TE::B(a), TE::B(b)) => TE::B(BE::And(Box::new(a), Box::new(b))),
                (BinOp::Or, TE::B(a), TE::B(b)) => TE::B(BE::Or(Box::new(a), Box::new(b))),
                (op, TE::F(a), TE::F(b)) if op.is_comparison() => {
                    TE::B(BE::CmpF(*op, Box::new(a), Box::new(b)))
                }
                (op, TE::I(a), TE::I(b)) if op.is_comparison() => {
                    TE::B(BE::CmpI(*op, Box::new(a), Box::new(b)))
                }
                (op, TE::F(a), TE::F(b)) => TE::F(FE::Bin(*op, Box::new(a), Box::new(b))),
                (op, TE::I(a), TE::I(b)) => TE::I(IE::Bin(*op, Box::new(a), Box::new(b))),
                _ => return Err(internal("an ill-typed binary operation")),
            },
            Expr::Select(c, a, b) => {
                let c = Box::new(self.boolean(c)?);
                match (self.expr(a)?, self.expr(b)?) {
                    (TE::F(a), TE::F(b)) => TE::F(FE::Sel(c, Box::new(a), Box::new(b))),
                    (TE::I(a), TE::I(b)) => TE::I(IE::Sel(c, Box::new(a), Box::new(b))),
                    (TE::B(a), TE::B(b)) => TE::B(BE::Sel(c, Box::new(a), Box::new(b))),
                    _ => return Err(internal("a Select with arms of two types")),
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------
// Evaluation.

struct Machine<'p, 'a> {
    prog: &'p Program,
    bufs: Vec<Option<BufRef<'a>>>,
    f: Vec<f32>,
    i: Vec<i64>,
    b: Vec<bool>,
    fa: Vec<Vec<f32>>,
    ia: Vec<Vec<i64>>,
    ba: Vec<Vec<bool>>,
}

type Res<T> = Result<T, LaunchError>;

fn oob(name: &str, index: i64, len: usize) -> LaunchError {
    LaunchError::OutOfBounds {
        param: name.to_string(),
        index,
        len: len as u64,
    }
}

/// `index` as a position in `0 .. len`, or `None`.
fn position(index: i64, len: u64) -> Option<usize> {
    if index >= 0 && (index as u64) < len {
        Some(index as usize)
    } else {
        None
    }
}

impl Machine<'_, '_> {
    fn buf(&self, b: usize) -> Res<&BufRef<'_>> {
        self.bufs
            .get(b)
            .and_then(Option::as_ref)
            .ok_or_else(|| internal("a load from a non-buffer"))
    }

    /// The buffer and the checked element position of `buf[index]`.
    fn locate(&self, b: usize, index: i64) -> Res<(&BufRef<'_>, usize)> {
        let buf = self.buf(b)?;
        let pos = position(index, buf.len).ok_or_else(|| LaunchError::OutOfBounds {
            param: buf.name.clone(),
            index,
            len: buf.len,
        })?;
        Ok((buf, pos))
    }

    fn load_f(&self, b: usize, index: i64) -> Res<f32> {
        let (buf, pos) = self.locate(b, index)?;
        Ok(get_f32(buf.data.bytes(), buf.elem, pos))
    }

    fn load_i(&self, b: usize, index: i64) -> Res<i64> {
        let (buf, pos) = self.locate(b, index)?;
        Ok(get_i64(buf.data.bytes(), buf.elem, pos))
    }

    /// The writable bytes, element type and checked position of `buf[index]`.
    fn locate_mut(&mut self, b: usize, index: i64) -> Res<(&mut [u8], Elem, usize)> {
        let buf = self
            .bufs
            .get_mut(b)
            .and_then(Option::as_mut)
            .ok_or_else(|| internal("a store to a non-buffer"))?;
        let pos = position(index, buf.len).ok_or_else(|| LaunchError::OutOfBounds {
            param: buf.name.clone(),
            index,
            len: buf.len,
        })?;
        match &mut buf.data {
            Data::Write(d) => Ok((d, buf.elem, pos)),
            Data::Read(_) => Err(internal("a store to a read-only argument")),
        }
    }

    fn block(&mut self, body: &[St]) -> Res<()> {
        for s in body {
            self.stmt(s)?;
        }
        Ok(())
    }

    fn stmt(&mut self, s: &St) -> Res<()> {
        match s {
            St::SetF(v, e) => self.f[*v] = self.fe(e)?,
            St::SetI(v, e) => self.i[*v] = self.ie(e)?,
            St::SetB(v, e) => self.b[*v] = self.be(e)?,
            St::StoreF(b, idx, val) => {
                let index = self.ie(idx)?;
                let value = self.fe(val)?;
                let (d, elem, pos) = self.locate_mut(*b, index)?;
                put_f32(d, elem, pos, value);
            }
            St::StoreI(b, idx, val) => {
                let index = self.ie(idx)?;
                let value = self.ie(val)?;
                let (d, elem, pos) = self.locate_mut(*b, index)?;
                put_i64(d, elem, pos, value);
            }
            St::ArrF(a, idx, val) => {
                let index = self.ie(idx)?;
                let value = self.fe(val)?;
                let (name, len) = &self.prog.arrays_f[*a];
                let pos = position(index, *len as u64).ok_or_else(|| oob(name, index, *len))?;
                self.fa[*a][pos] = value;
            }
            St::ArrI(a, idx, val) => {
                let index = self.ie(idx)?;
                let value = self.ie(val)?;
                let (name, len) = &self.prog.arrays_i[*a];
                let pos = position(index, *len as u64).ok_or_else(|| oob(name, index, *len))?;
                self.ia[*a][pos] = value;
            }
            St::ArrB(a, idx, val) => {
                let index = self.ie(idx)?;
                let value = self.be(val)?;
                let (name, len) = &self.prog.arrays_b[*a];
                let pos = position(index, *len as u64).ok_or_else(|| oob(name, index, *len))?;
                self.ba[*a][pos] = value;
            }
            St::For(v, start, end, body) => {
                let (start, end) = (self.ie(start)?, self.ie(end)?);
                for i in start..end {
                    self.i[*v] = i;
                    self.block(body)?;
                }
            }
            St::If(c, then, otherwise) => {
                if self.be(c)? {
                    self.block(then)?;
                } else {
                    self.block(otherwise)?;
                }
            }
        }
        Ok(())
    }

    fn fe(&self, e: &FE) -> Res<f32> {
        Ok(match e {
            FE::Lit(v) => *v,
            FE::Var(s) => self.f[*s],
            FE::Load(b, idx) => self.load_f(*b, self.ie(idx)?)?,
            FE::Arr(a, idx) => {
                let index = self.ie(idx)?;
                let (name, len) = &self.prog.arrays_f[*a];
                let pos = position(index, *len as u64).ok_or_else(|| oob(name, index, *len))?;
                self.fa[*a][pos]
            }
            FE::Un(op, a) => {
                let a = self.fe(a)?;
                match op {
                    UnOp::Neg => -a,
                    UnOp::Abs => a.abs(),
                    UnOp::Exp => scalar::exp(a),
                    UnOp::Log => scalar::log(a),
                    UnOp::Sqrt => scalar::sqrt(a),
                    UnOp::Tanh => scalar::tanh(a),
                    UnOp::Erf => scalar::erf(a),
                    UnOp::Floor => scalar::floor(a),
                    UnOp::Not | UnOp::ToF32 | UnOp::ToI64 => {
                        return Err(internal("an ill-typed f32 unary operation"))
                    }
                }
            }
            FE::Bin(op, a, b) => {
                let (a, b) = (self.fe(a)?, self.fe(b)?);
                match op {
                    BinOp::Add => a + b,
                    BinOp::Sub => a - b,
                    BinOp::Mul => a * b,
                    BinOp::Div => a / b,
                    BinOp::Min => scalar::fmin(a, b),
                    BinOp::Max => scalar::fmax(a, b),
                    _ => return Err(internal("an ill-typed f32 binary operation")),
                }
            }
            FE::FromI(a) => self.ie(a)? as f32,
            FE::Sel(c, a, b) => {
                let c = self.be(c)?;
                let (a, b) = (self.fe(a)?, self.fe(b)?);
                if c {
                    a
                } else {
                    b
                }
            }
        })
    }

    fn ie(&self, e: &IE) -> Res<i64> {
        Ok(match e {
            IE::Lit(v) => *v,
            IE::Var(s) => self.i[*s],
            IE::Load(b, idx) => self.load_i(*b, self.ie(idx)?)?,
            IE::Arr(a, idx) => {
                let index = self.ie(idx)?;
                let (name, len) = &self.prog.arrays_i[*a];
                let pos = position(index, *len as u64).ok_or_else(|| oob(name, index, *len))?;
                self.ia[*a][pos]
            }
            IE::Un(op, a) => {
                let a = self.ie(a)?;
                match op {
                    UnOp::Neg => a.wrapping_neg(),
                    UnOp::Abs => a.wrapping_abs(),
                    _ => return Err(internal("an ill-typed i64 unary operation")),
                }
            }
            IE::Bin(op, a, b) => {
                let (a, b) = (self.ie(a)?, self.ie(b)?);
                match op {
                    BinOp::Add => a.wrapping_add(b),
                    BinOp::Sub => a.wrapping_sub(b),
                    BinOp::Mul => a.wrapping_mul(b),
                    BinOp::Div if b == 0 => return Err(LaunchError::DivideByZero),
                    BinOp::Div => a.wrapping_div(b),
                    BinOp::Rem if b == 0 => return Err(LaunchError::DivideByZero),
                    BinOp::Rem => a.wrapping_rem(b),
                    BinOp::Min => a.min(b),
                    BinOp::Max => a.max(b),
                    _ => return Err(internal("an ill-typed i64 binary operation")),
                }
            }
            IE::FromF(a) => self.fe(a)? as i64,
            IE::Sel(c, a, b) => {
                let c = self.be(c)?;
                let (a, b) = (self.ie(a)?, self.ie(b)?);
                if c {
                    a
                } else {
                    b
                }
            }
        })
    }

    fn be(&self, e: &BE) -> Res<bool> {
        Ok(match e {
            BE::Lit(v) => *v,
            BE::Var(s) => self.b[*s],
            BE::Arr(a, idx) => {
                let index = self.ie(idx)?;
                let (name, len) = &self.prog.arrays_b[*a];
                let pos = position(index, *len as u64).ok_or_else(|| oob(name, index, *len))?;
                self.ba[*a][pos]
            }
            BE::Not(a) => !self.be(a)?,
            BE::And(a, b) => {
                let (a, b) = (self.be(a)?, self.be(b)?);
                a && b
            }
            BE::Or(a, b) => {
                let (a, b) = (self.be(a)?, self.be(b)?);
                a || b
            }
            BE::CmpF(op, a, b) => {
                let (a, b) = (self.fe(a)?, self.fe(b)?);
                match op {
                    BinOp::Lt => a < b,
                    BinOp::Le => a <= b,
                    BinOp::Gt => a > b,
                    BinOp::Ge => a >= b,
                    BinOp::Eq => a == b,
                    BinOp::Ne => a != b,
                    _ => return Err(internal("a non-comparison")),
                }
            }
            BE::CmpI(op, a, b) => {
                let (a, b) = (self.ie(a)?, self.ie(b)?);
                match op {
                    BinOp::Lt => a < b,
                    BinOp::Le => a <= b,
                    BinOp::Gt => a > b,
                    BinOp::Ge => a >= b,
                    BinOp::Eq => a == b,
                    BinOp::Ne => a != b,
                    _ => return Err(internal("a non-comparison")),
                }
            }
            BE::Sel(c, a, b) => {
                let c = self.be(c)?;
                let (a, b) = (self.be(a)?, self.be(b)?);
                if c {
                    a
                } else {
                    b
                }
            }
        })
    }
}
