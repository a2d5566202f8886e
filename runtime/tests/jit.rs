//! The Cranelift JIT backend: every operation, conversion, control-flow form
//! and failure of the kernel description language, against plain Rust and
//! the functions of `moec_kernels::scalar`.

use moec_kernels::ir::*;
use moec_kernels::scalar;
use moec_runtime::cpu::jit::{JitKernel, RawArg};

// ---------------------------------------------------------------------------
// A tiny kernel builder (the kernels crate has none yet).

struct KB {
    k: Kernel,
}

impl KB {
    fn new(name: &str) -> Self {
        KB {
            k: Kernel {
                name: name.to_string(),
                params: Vec::new(),
                vars: vec![VarDecl {
                    name: "row".to_string(),
                    ty: Ty::I64,
                }],
                arrays: Vec::new(),
                body: Vec::new(),
            },
        }
    }

    fn buf(&mut self, name: &str, elem: Elem, access: Access) -> ParamId {
        self.k.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::Buffer { elem, access },
        });
        ParamId(self.k.params.len() as u32 - 1)
    }

    fn input(&mut self, name: &str, elem: Elem) -> ParamId {
        self.buf(name, elem, Access::Read)
    }

    fn output(&mut self, name: &str, elem: Elem) -> ParamId {
        self.buf(name, elem, Access::Write)
    }

    fn scalar(&mut self, name: &str, ty: Ty) -> ParamId {
        self.k.params.push(Param {
            name: name.to_string(),
            kind: ParamKind::Scalar(ty),
        });
        ParamId(self.k.params.len() as u32 - 1)
    }

    fn var(&mut self, name: &str, ty: Ty) -> VarId {
        self.k.vars.push(VarDecl {
            name: name.to_string(),
            ty,
        });
        VarId(self.k.vars.len() as u32 - 1)
    }

    fn array(&mut self, name: &str, ty: Ty, len: u32) -> ArrayId {
        self.k.arrays.push(ArrayDecl {
            name: name.to_string(),
            ty,
            len,
        });
        ArrayId(self.k.arrays.len() as u32 - 1)
    }

    fn kernel(mut self, body: Vec<Stmt>) -> Kernel {
        self.k.body = body;
        self.k
    }

    fn compile(self, body: Vec<Stmt>) -> JitKernel {
        let k = self.kernel(body);
        match JitKernel::compile(&k) {
            Ok(j) => j,
            Err(e) => panic!("{e}"),
        }
    }
}

fn f(v: f32) -> Expr {
    Expr::F32(v)
}
fn i(v: i64) -> Expr {
    Expr::I64(v)
}
fn bool_(v: bool) -> Expr {
    Expr::Bool(v)
}
fn v(id: VarId) -> Expr {
    Expr::Var(id)
}
fn row() -> Expr {
    Expr::Var(ROW)
}
fn sc(p: ParamId) -> Expr {
    Expr::Scalar(p)
}
fn load(p: ParamId, index: Expr) -> Expr {
    Expr::Load {
        buf: p,
        index: Box::new(index),
    }
}
fn aload(a: ArrayId, index: Expr) -> Expr {
    Expr::ArrayLoad {
        array: a,
        index: Box::new(index),
    }
}
fn un(op: UnOp, a: Expr) -> Expr {
    Expr::Unary(op, Box::new(a))
}
fn bin(op: BinOp, a: Expr, b: Expr) -> Expr {
    Expr::Binary(op, Box::new(a), Box::new(b))
}
fn add(a: Expr, b: Expr) -> Expr {
    bin(BinOp::Add, a, b)
}
fn mul(a: Expr, b: Expr) -> Expr {
    bin(BinOp::Mul, a, b)
}
fn select(c: Expr, a: Expr, b: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(b))
}
/// A `Bool` as an `I64` 0 or 1.
fn as_int(c: Expr) -> Expr {
    select(c, i(1), i(0))
}
fn set(var: VarId, e: Expr) -> Stmt {
    Stmt::Set(var, e)
}
fn store(p: ParamId, index: Expr, value: Expr) -> Stmt {
    Stmt::Store {
        buf: p,
        index,
        value,
    }
}
fn astore(a: ArrayId, index: Expr, value: Expr) -> Stmt {
    Stmt::ArrayStore {
        array: a,
        index,
        value,
    }
}
fn for_(var: VarId, start: Expr, end: Expr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        var,
        start,
        end,
        body,
    }
}
fn if_(cond: Expr, then: Vec<Stmt>, otherwise: Vec<Stmt>) -> Stmt {
    Stmt::If {
        cond,
        then,
        otherwise,
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn u16_bytes(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
fn to_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
fn to_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Equal bits, or both NaN (NaN payloads are not part of the contract).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            same(*g, *w),
            "{what}[{k}]: got {g} ({:#010x}), want {w} ({:#010x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

/// Interesting `f32` inputs: signed zeros, infinities, NaN, subnormals,
/// halves, large and small magnitudes.
fn special_f32() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        -0.5,
        1.5,
        -1.5,
        2.5,
        -2.5,
        3.7,
        -3.7,
        1e-3,
        -1e-3,
        88.0,
        89.0,
        -104.0,
        1e30,
        -1e30,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        std::f32::consts::PI,
        0.1,
        9.223372e18,
        -9.223373e18,
    ];
    // A sweep of ordinary values.
    let mut x = -20.0f32;
    while x < 20.0 {
        v.push(x);
        x += 0.37;
    }
    v
}

// ---------------------------------------------------------------------------
// Runs `out[row] = expr(x[row])` (f32 in, f32 out) over `xs`.
fn map_f32(name: &str, op: impl Fn(Expr) -> Expr, xs: &[f32]) -> Vec<f32> {
    let mut kb = KB::new(name);
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::F32);
    let j = kb.compile(vec![store(out, row(), op(load(x, row())))]);
    let input = f32_bytes(xs);
    let mut output = vec![0u8; input.len()];
    j.launch(
        &mut [Arg::Read(&input), Arg::Write(&mut output)],
        xs.len() as u64,
    )
    .expect("launch");
    to_f32(&output)
}

#[test]
fn unary_f32_ops_match_scalar() {
    let xs = special_f32();
    type Case = (&'static str, UnOp, fn(f32) -> f32);
    let cases: [Case; 8] = [
        ("neg", UnOp::Neg, |x| -x),
        ("abs", UnOp::Abs, |x| x.abs()),
        ("exp", UnOp::Exp, scalar::exp),
        ("log", UnOp::Log, scalar::log),
        ("sqrt", UnOp::Sqrt, scalar::sqrt),
        ("tanh", UnOp::Tanh, scalar::tanh),
        ("erf", UnOp::Erf, scalar::erf),
        ("floor", UnOp::Floor, scalar::floor),
    ];
    for (name, op, want) in cases {
        let got = map_f32(name, |e| un(op, e), &xs);
        for (x, (g, w)) in xs.iter().zip(got.iter().zip(xs.iter().map(|x| want(*x)))) {
            // Bit for bit, NaN payloads included.
            assert_eq!(g.to_bits(), w.to_bits(), "{name}({x}): {g} vs {w}");
        }
    }
}

#[test]
fn f32_arithmetic_and_nan_propagating_min_max() {
    let xs = special_f32();
    let ys: Vec<f32> = xs.iter().rev().copied().collect();
    let mut kb = KB::new("binary_f32");
    let a = kb.input("a", Elem::F32);
    let b = kb.input("b", Elem::F32);
    let out = kb.output("out", Elem::F32);
    let ops = [
        BinOp::Add,
        BinOp::Sub,
        BinOp::Mul,
        BinOp::Div,
        BinOp::Min,
        BinOp::Max,
    ];
    let n = ops.len() as i64;
    let body = ops
        .iter()
        .enumerate()
        .map(|(k, op)| {
            store(
                out,
                add(mul(row(), i(n)), i(k as i64)),
                bin(*op, load(a, row()), load(b, row())),
            )
        })
        .collect();
    let j = kb.compile(body);
    let (ab, bb) = (f32_bytes(&xs), f32_bytes(&ys));
    let mut ob = vec![0u8; ab.len() * ops.len()];
    j.launch(
        &mut [Arg::Read(&ab), Arg::Read(&bb), Arg::Write(&mut ob)],
        xs.len() as u64,
    )
    .unwrap();
    let got = to_f32(&ob);
    for (r, (x, y)) in xs.iter().zip(&ys).enumerate() {
        let g = &got[r * ops.len()..(r + 1) * ops.len()];
        assert_same(&g[..4], &[x + y, x - y, x * y, x / y], "arith");
        // Bit for bit, NaN and signed zeros included.
        let (min, max) = (scalar::fmin(*x, *y), scalar::fmax(*x, *y));
        assert_eq!(g[4].to_bits(), min.to_bits(), "min({x}, {y})");
        assert_eq!(g[5].to_bits(), max.to_bits(), "max({x}, {y})");
    }
    // NaN on either side wins (any NaN: signalling, negative); of two equal
    // zeros, the first.
    for (x, y) in [
        (f32::NAN, 1.0),
        (1.0, f32::NAN),
        (f32::NAN, f32::NEG_INFINITY),
        (-f32::NAN, 1.0),
        (f32::from_bits(0x7f80_0001), 1.0),
        (0.0, -0.0),
        (-0.0, 0.0),
    ] {
        let got = {
            let (ab, bb) = (f32_bytes(&[x]), f32_bytes(&[y]));
            let mut ob = vec![0u8; 4 * ops.len()];
            j.launch(
                &mut [Arg::Read(&ab), Arg::Read(&bb), Arg::Write(&mut ob)],
                1,
            )
            .unwrap();
            to_f32(&ob)
        };
        assert_eq!(
            got[4].to_bits(),
            scalar::fmin(x, y).to_bits(),
            "min({x}, {y})"
        );
        assert_eq!(
            got[5].to_bits(),
            scalar::fmax(x, y).to_bits(),
            "max({x}, {y})"
        );
        if x.is_nan() || y.is_nan() {
            assert!(got[4].is_nan() && got[5].is_nan());
        } else {
            assert_eq!(got[4].to_bits(), x.to_bits(), "min({x}, {y})");
        }
    }
}

#[test]
fn comparisons_with_nan_are_false_except_ne() {
    let vals = [f32::NAN, -1.0, 0.0, -0.0, 1.0, f32::INFINITY];
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for x in vals {
        for y in vals {
            xs.push(x);
            ys.push(y);
        }
    }
    let ops = [
        BinOp::Lt,
        BinOp::Le,
        BinOp::Gt,
        BinOp::Ge,
        BinOp::Eq,
        BinOp::Ne,
    ];
    let mut kb = KB::new("compare_f32");
    let a = kb.input("a", Elem::F32);
    let b = kb.input("b", Elem::F32);
    let out = kb.output("out", Elem::U8);
    let n = ops.len() as i64;
    let body = ops
        .iter()
        .enumerate()
        .map(|(k, op)| {
            store(
                out,
                add(mul(row(), i(n)), i(k as i64)),
                as_int(bin(*op, load(a, row()), load(b, row()))),
            )
        })
        .collect();
    let j = kb.compile(body);
    let (ab, bb) = (f32_bytes(&xs), f32_bytes(&ys));
    let mut ob = vec![0u8; xs.len() * ops.len()];
    j.launch(
        &mut [Arg::Read(&ab), Arg::Read(&bb), Arg::Write(&mut ob)],
        xs.len() as u64,
    )
    .unwrap();
    for (r, (x, y)) in xs.iter().zip(&ys).enumerate() {
        let want = [x < y, x <= y, x > y, x >= y, x == y, x != y].map(u8::from);
        assert_eq!(&ob[r * 6..r * 6 + 6], &want, "{x} vs {y}");
    }
}

/// Stores an `i64` expression exactly, as four `i32` base-65536 digits
/// (truncating division, so every digit has the value's sign and fits).
fn store_i64(out: ParamId, tmp: [VarId; 4], base: Expr, e: Expr) -> Vec<Stmt> {
    let d = i(65536);
    let at = |k: i64| add(mul(base.clone(), i(4)), i(k));
    let div = |x: Expr| bin(BinOp::Div, x, d.clone());
    let rem = |x: Expr| bin(BinOp::Sub, x.clone(), mul(div(x), d.clone()));
    vec![
        set(tmp[0], e),
        store(out, at(0), rem(v(tmp[0]))),
        set(tmp[1], div(v(tmp[0]))),
        store(out, at(1), rem(v(tmp[1]))),
        set(tmp[2], div(v(tmp[1]))),
        store(out, at(2), rem(v(tmp[2]))),
        set(tmp[3], div(v(tmp[2]))),
        store(out, at(3), v(tmp[3])),
    ]
}

fn read_i64s(out: &[u8]) -> Vec<i64> {
    to_i32(out)
        .chunks_exact(4)
        .map(|d| {
            let d = d.iter().map(|x| i64::from(*x)).collect::<Vec<_>>();
            d[3].wrapping_mul(65536)
                .wrapping_add(d[2])
                .wrapping_mul(65536)
                .wrapping_add(d[1])
                .wrapping_mul(65536)
                .wrapping_add(d[0])
        })
        .collect()
}

/// Evaluates `ops(a, b)` for each pair of `i64` scalars, exactly.
fn eval_i64(name: &str, ops: &[fn(Expr, Expr) -> Expr], pairs: &[(i64, i64)]) -> Vec<Vec<i64>> {
    let mut kb = KB::new(name);
    let a = kb.scalar("a", Ty::I64);
    let b = kb.scalar("b", Ty::I64);
    let out = kb.output("out", Elem::I32);
    let tmp = [
        kb.var("t0", Ty::I64),
        kb.var("t1", Ty::I64),
        kb.var("t2", Ty::I64),
        kb.var("t3", Ty::I64),
    ];
    let body = ops
        .iter()
        .enumerate()
        .flat_map(|(k, op)| store_i64(out, tmp, i(k as i64), op(sc(a), sc(b))))
        .collect();
    let j = kb.compile(body);
    pairs
        .iter()
        .map(|(x, y)| {
            let mut ob = vec![0u8; 16 * ops.len()];
            j.launch(&mut [Arg::I64(*x), Arg::I64(*y), Arg::Write(&mut ob)], 1)
                .expect("launch");
            read_i64s(&ob)
        })
        .collect()
}

#[test]
fn i64_arithmetic_wraps_and_truncates() {
    let pairs = [
        (7, 2),
        (-7, 2),
        (7, -2),
        (-7, -2),
        (i64::MAX, 1),
        (i64::MIN, -1),
        (i64::MIN, 1),
        (i64::MIN, i64::MAX),
        (123_456_789_012, -987_654),
        (0, 5),
        (1 << 40, 1 << 30),
    ];
    let ops: [fn(Expr, Expr) -> Expr; 7] = [
        |a, b| bin(BinOp::Add, a, b),
        |a, b| bin(BinOp::Sub, a, b),
        |a, b| bin(BinOp::Mul, a, b),
        |a, b| bin(BinOp::Div, a, b),
        |a, b| bin(BinOp::Rem, a, b),
        |a, b| bin(BinOp::Min, a, b),
        |a, b| bin(BinOp::Max, a, b),
    ];
    let got = eval_i64("binary_i64", &ops, &pairs);
    for ((x, y), g) in pairs.iter().zip(got) {
        let want = vec![
            x.wrapping_add(*y),
            x.wrapping_sub(*y),
            x.wrapping_mul(*y),
            x.wrapping_div(*y),
            x.wrapping_rem(*y),
            *x.min(y),
            *x.max(y),
        ];
        assert_eq!(g, want, "{x} op {y}");
    }
}

#[test]
fn i64_unary_ops_and_conversions() {
    let pairs: Vec<(i64, i64)> = [
        0,
        1,
        -1,
        42,
        -42,
        i64::MAX,
        i64::MIN,
        (1 << 53) + 1,
        -(1 << 24) - 1,
    ]
    .iter()
    .map(|x| (*x, 0))
    .collect();
    let ops: [fn(Expr, Expr) -> Expr; 3] = [
        |a, _| un(UnOp::Neg, a),
        |a, _| un(UnOp::Abs, a),
        // ToF32 then back: exercises rounding to nearest.
        |a, _| un(UnOp::ToI64, un(UnOp::ToF32, a)),
    ];
    let got = eval_i64("unary_i64", &ops, &pairs);
    for ((x, _), g) in pairs.iter().zip(got) {
        assert_eq!(
            g,
            vec![x.wrapping_neg(), x.wrapping_abs(), (*x as f32) as i64],
            "{x}"
        );
    }

    // ToF32 on its own, bit for bit.
    let mut kb = KB::new("to_f32");
    let a = kb.scalar("a", Ty::I64);
    let out = kb.output("out", Elem::F32);
    let j = kb.compile(vec![store(out, i(0), un(UnOp::ToF32, sc(a)))]);
    for x in [
        0,
        -3,
        16_777_217,
        16_777_219,
        i64::MAX,
        i64::MIN,
        -(1 << 40) - 12345,
    ] {
        let mut ob = vec![0u8; 4];
        j.launch(&mut [Arg::I64(x), Arg::Write(&mut ob)], 1)
            .unwrap();
        assert_eq!(to_f32(&ob)[0].to_bits(), (x as f32).to_bits(), "{x}");
    }

    // ToI64 truncates and saturates; NaN gives 0 (like `as i64`).
    let mut kb = KB::new("to_i64");
    let x = kb.scalar("x", Ty::F32);
    let out = kb.output("out", Elem::I32);
    let tmp = [
        kb.var("t0", Ty::I64),
        kb.var("t1", Ty::I64),
        kb.var("t2", Ty::I64),
        kb.var("t3", Ty::I64),
    ];
    let j = kb.compile(store_i64(out, tmp, i(0), un(UnOp::ToI64, sc(x))));
    for x in special_f32() {
        let mut ob = vec![0u8; 16];
        j.launch(&mut [Arg::F32(x), Arg::Write(&mut ob)], 1)
            .unwrap();
        assert_eq!(read_i64s(&ob)[0], x as i64, "{x}");
    }
}

#[test]
fn i64_comparisons_and_bool_ops() {
    let mut kb = KB::new("logic");
    let a = kb.scalar("a", Ty::I64);
    let b = kb.scalar("b", Ty::I64);
    let out = kb.output("out", Elem::U8);
    let lt = || bin(BinOp::Lt, sc(a), sc(b));
    let eq = || bin(BinOp::Eq, sc(a), sc(b));
    let results = [
        lt(),
        bin(BinOp::Le, sc(a), sc(b)),
        bin(BinOp::Gt, sc(a), sc(b)),
        bin(BinOp::Ge, sc(a), sc(b)),
        eq(),
        bin(BinOp::Ne, sc(a), sc(b)),
        bin(BinOp::And, lt(), un(UnOp::Not, eq())),
        bin(BinOp::Or, lt(), eq()),
        un(UnOp::Not, lt()),
        bin(BinOp::Eq, lt(), bool_(true)),
        bin(BinOp::Ne, lt(), bool_(true)),
        bin(BinOp::And, bool_(true), bool_(false)),
    ];
    let body = results
        .into_iter()
        .enumerate()
        .map(|(k, e)| store(out, i(k as i64), as_int(e)))
        .collect();
    let j = kb.compile(body);
    for (x, y) in [(1i64, 2i64), (2, 1), (3, 3), (i64::MIN, i64::MAX), (-1, 0)] {
        let mut ob = vec![0u8; 12];
        j.launch(&mut [Arg::I64(x), Arg::I64(y), Arg::Write(&mut ob)], 1)
            .unwrap();
        let want = [
            x < y,
            x <= y,
            x > y,
            x >= y,
            x == y,
            x != y,
            x < y && x != y,
            x <= y,
            x >= y,
            x < y,
            x >= y,
            false,
        ]
        .map(u8::from);
        assert_eq!(ob, want, "{x} vs {y}");
    }
}

#[test]
fn select_picks_by_condition() {
    let mut kb = KB::new("select");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::F32);
    let idx = kb.output("idx", Elem::I32);
    let xr = || load(x, row());
    let j = kb.compile(vec![
        // ReLU, and the sign as an integer.
        store(
            out,
            row(),
            select(bin(BinOp::Gt, xr(), f(0.0)), xr(), f(0.0)),
        ),
        store(
            idx,
            row(),
            select(
                bin(BinOp::Lt, xr(), f(0.0)),
                i(-1),
                select(bin(BinOp::Gt, xr(), f(0.0)), i(1), i(0)),
            ),
        ),
    ]);
    let xs = [-2.0f32, 0.0, 3.5, f32::NAN, -0.0];
    let xb = f32_bytes(&xs);
    let mut ob = vec![0u8; 20];
    let mut ib = vec![0u8; 20];
    j.launch(
        &mut [Arg::Read(&xb), Arg::Write(&mut ob), Arg::Write(&mut ib)],
        5,
    )
    .unwrap();
    assert_same(&to_f32(&ob), &[0.0, 0.0, 3.5, 0.0, 0.0], "relu");
    assert_eq!(to_i32(&ib), vec![-1, 0, 1, 0, 0]);
}

#[test]
fn nested_loops_and_the_loop_variable_afterwards() {
    let (rows, cols) = (3i64, 5i64);
    let mut kb = KB::new("nested");
    let out = kb.output("out", Elem::I32);
    let last = kb.output("last", Elem::I32);
    let r = kb.var("r", Ty::I64);
    let c = kb.var("c", Ty::I64);
    let n = kb.var("n", Ty::I64);
    let e = kb.var("e", Ty::I64);
    let base = || mul(row(), i(rows * cols));
    let j = kb.compile(vec![
        for_(
            r,
            i(0),
            i(rows),
            vec![for_(
                c,
                i(0),
                i(cols),
                vec![
                    store(
                        out,
                        add(base(), add(mul(v(r), i(cols)), v(c))),
                        add(mul(row(), i(100)), add(mul(v(r), i(10)), v(c))),
                    ),
                    set(n, add(v(n), i(1))),
                ],
            )],
        ),
        // A loop that does not run leaves its variable alone; a loop with
        // negative bounds runs; `end` is evaluated once.
        set(e, i(7)),
        for_(e, i(5), i(5), vec![]),
        for_(c, i(-3), i(-1), vec![set(n, add(v(n), i(100)))]),
        store(last, mul(row(), i(4)), v(r)),
        store(last, add(mul(row(), i(4)), i(1)), v(c)),
        store(last, add(mul(row(), i(4)), i(2)), v(n)),
        store(last, add(mul(row(), i(4)), i(3)), v(e)),
    ]);
    let mut ob = vec![0u8; 4 * 2 * (rows * cols) as usize];
    let mut lb = vec![0u8; 4 * 2 * 4];
    j.launch(&mut [Arg::Write(&mut ob), Arg::Write(&mut lb)], 2)
        .unwrap();
    let got = to_i32(&ob);
    for t in 0..2 {
        for rr in 0..rows {
            for cc in 0..cols {
                let k = (t * rows * cols + rr * cols + cc) as usize;
                assert_eq!(got[k] as i64, t * 100 + rr * 10 + cc);
            }
        }
    }
    // r and c hold their last iteration's values; n was zeroed per row.
    assert_eq!(to_i32(&lb), vec![2, -2, 215, 7, 2, -2, 215, 7]);
}

#[test]
fn if_else_and_nested_ifs() {
    let mut kb = KB::new("branches");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::I32);
    let xr = || load(x, row());
    let j = kb.compile(vec![if_(
        bin(BinOp::Lt, xr(), f(0.0)),
        vec![store(out, row(), i(-1))],
        vec![if_(
            bin(BinOp::Eq, xr(), f(0.0)),
            vec![store(out, row(), i(0))],
            vec![if_(
                bin(BinOp::Gt, xr(), f(0.0)),
                vec![store(out, row(), i(1))],
                vec![store(out, row(), i(99))], // NaN
            )],
        )],
    )]);
    let xs = [-3.0f32, 0.0, -0.0, 2.0, f32::NAN, f32::INFINITY];
    let xb = f32_bytes(&xs);
    let mut ob = vec![0u8; 4 * xs.len()];
    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], xs.len() as u64)
        .unwrap();
    assert_eq!(to_i32(&ob), vec![-1, 0, 0, 1, 99, 1]);
}

#[test]
fn local_arrays_of_every_type_are_zeroed_per_row() {
    let n = 6i64;
    let mut kb = KB::new("arrays");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::F32);
    let seen = kb.output("seen", Elem::I32);
    let fa = kb.array("fa", Ty::F32, n as u32);
    let ia = kb.array("ia", Ty::I64, 4);
    let ba = kb.array("ba", Ty::Bool, 3);
    let k = kb.var("k", Ty::I64);
    let acc = kb.var("acc", Ty::I64);
    let at = |k: Expr| add(mul(row(), i(n)), k);
    let j = kb.compile(vec![
        // What the previous row left must be gone.
        set(
            acc,
            add(
                add(aload(ia, i(2)), as_int(aload(ba, i(1)))),
                un(UnOp::ToI64, aload(fa, i(3))),
            ),
        ),
        store(seen, row(), v(acc)),
        astore(ia, i(2), add(row(), i(10))),
        astore(ba, i(1), bool_(true)),
        // Reverse the row through the array.
        for_(k, i(0), i(n), vec![astore(fa, v(k), load(x, at(v(k))))]),
        for_(
            k,
            i(0),
            i(n),
            vec![store(
                out,
                at(v(k)),
                aload(fa, bin(BinOp::Sub, i(n - 1), v(k))),
            )],
        ),
    ]);
    let xs: Vec<f32> = (0..3 * n).map(|k| k as f32 * 1.5 - 4.0).collect();
    let xb = f32_bytes(&xs);
    let mut ob = vec![0u8; xb.len()];
    let mut sb = vec![0u8; 12];
    j.launch(
        &mut [Arg::Read(&xb), Arg::Write(&mut ob), Arg::Write(&mut sb)],
        3,
    )
    .unwrap();
    let got = to_f32(&ob);
    for t in 0..3 {
        for k in 0..n as usize {
            assert_eq!(
                got[t * n as usize + k],
                xs[t * n as usize + n as usize - 1 - k]
            );
        }
    }
    assert_eq!(to_i32(&sb), vec![0, 0, 0]);
}

#[test]
fn large_local_arrays_on_the_heap_and_medium_ones_on_the_stack() {
    for (name, len) in [("medium", 1000u32), ("large", MAX_ARRAY_LEN)] {
        let mut kb = KB::new(name);
        let out = kb.output("out", Elem::I32);
        let a = kb.array("a", Ty::I64, len);
        let b = kb.array("b", Ty::F32, len);
        let k = kb.var("k", Ty::I64);
        let s = kb.var("s", Ty::I64);
        let len = i64::from(len);
        let j = kb.compile(vec![
            // Sum of what the previous row left (must be 0) ...
            for_(
                k,
                i(0),
                i(len),
                vec![set(
                    s,
                    add(v(s), add(aload(a, v(k)), un(UnOp::ToI64, aload(b, v(k))))),
                )],
            ),
            store(out, mul(row(), i(2)), v(s)),
            // ... then fill, and sum again.
            for_(
                k,
                i(0),
                i(len),
                vec![astore(a, v(k), add(v(k), row())), astore(b, v(k), f(1.0))],
            ),
            set(s, i(0)),
            for_(
                k,
                i(0),
                i(len),
                vec![set(
                    s,
                    add(v(s), add(aload(a, v(k)), un(UnOp::ToI64, aload(b, v(k))))),
                )],
            ),
            store(
                out,
                add(mul(row(), i(2)), i(1)),
                bin(BinOp::Rem, v(s), i(1 << 30)),
            ),
        ]);
        let mut ob = vec![0u8; 4 * 2 * 3];
        j.launch(&mut [Arg::Write(&mut ob)], 3).unwrap();
        let got = to_i32(&ob);
        for t in 0..3i64 {
            let want = (len * (len - 1) / 2 + t * len + len) % (1 << 30);
            assert_eq!(got[2 * t as usize], 0, "{name}: row {t} saw old values");
            assert_eq!(i64::from(got[2 * t as usize + 1]), want, "{name}: row {t}");
        }
    }
}

#[test]
fn bf16_loads_exactly_and_stores_round_to_nearest_even() {
    // Loads: every code.
    let codes: Vec<u16> = (0..=u16::MAX).collect();
    let got = {
        let mut kb = KB::new("bf16_load");
        let x = kb.input("x", Elem::Bf16);
        let out = kb.output("out", Elem::F32);
        let j = kb.compile(vec![store(out, row(), load(x, row()))]);
        let xb = u16_bytes(&codes);
        let mut ob = vec![0u8; 4 * codes.len()];
        j.launch(
            &mut [Arg::Read(&xb), Arg::Write(&mut ob)],
            codes.len() as u64,
        )
        .unwrap();
        to_f32(&ob)
    };
    for (c, g) in codes.iter().zip(&got) {
        assert_eq!(g.to_bits(), scalar::bf16_to_f32(*c).to_bits(), "{c:#06x}");
    }

    // Stores: every high half with low halves around the rounding point.
    let mut xs = Vec::new();
    for high in 0..=u16::MAX {
        for low in [0u32, 1, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff] {
            xs.push(f32::from_bits((u32::from(high) << 16) | low));
        }
    }
    let mut kb = KB::new("bf16_store");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::Bf16);
    let j = kb.compile(vec![store(out, row(), load(x, row()))]);
    let xb = f32_bytes(&xs);
    let mut ob = vec![0u8; 2 * xs.len()];
    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], xs.len() as u64)
        .unwrap();
    for (x, g) in xs.iter().zip(to_u16(&ob)) {
        assert_eq!(g, scalar::f32_to_bf16(*x), "{x} ({:#010x})", x.to_bits());
    }
}

#[test]
fn f16_loads_and_stores_match_scalar() {
    let codes: Vec<u16> = (0..=u16::MAX).collect();
    let mut kb = KB::new("f16_load");
    let x = kb.input("x", Elem::F16);
    let out = kb.output("out", Elem::F32);
    let j = kb.compile(vec![store(out, row(), load(x, row()))]);
    let xb = u16_bytes(&codes);
    let mut ob = vec![0u8; 4 * codes.len()];
    j.launch(
        &mut [Arg::Read(&xb), Arg::Write(&mut ob)],
        codes.len() as u64,
    )
    .unwrap();
    for (c, g) in codes.iter().zip(to_f32(&ob)) {
        assert!(same(g, scalar::f16_to_f32(*c)), "{c:#06x}");
    }

    let mut xs = special_f32();
    for high in (0..=u16::MAX).step_by(3) {
        for low in [0u32, 0x0fff, 0x1000, 0x1001, 0x3000, 0xffff] {
            xs.push(f32::from_bits((u32::from(high) << 16) | low));
        }
    }
    let mut kb = KB::new("f16_store");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::F16);
    let j = kb.compile(vec![store(out, row(), load(x, row()))]);
    let xb = f32_bytes(&xs);
    let mut ob = vec![0u8; 2 * xs.len()];
    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], xs.len() as u64)
        .unwrap();
    for (x, g) in xs.iter().zip(to_u16(&ob)) {
        assert_eq!(g, scalar::f32_to_f16(*x), "{x}");
    }
}

#[test]
fn fp8_loads_and_stores_match_scalar() {
    let codes: Vec<u8> = (0..=u8::MAX).collect();
    let mut kb = KB::new("fp8_load");
    let x = kb.input("x", Elem::Fp8E4m3);
    let out = kb.output("out", Elem::F32);
    let j = kb.compile(vec![store(out, row(), load(x, row()))]);
    let mut ob = vec![0u8; 4 * codes.len()];
    j.launch(&mut [Arg::Read(&codes), Arg::Write(&mut ob)], 256)
        .unwrap();
    for (c, g) in codes.iter().zip(to_f32(&ob)) {
        assert!(same(g, scalar::fp8_e4m3_to_f32(*c)), "{c:#04x}");
    }

    let mut xs = special_f32();
    xs.extend([
        448.0, 449.0, 464.0, 470.0, 480.0, 1000.0, -1000.0, 1.0625, 1.1875,
    ]);
    xs.extend((0..4000).map(|k| (k as f32 - 2000.0) * 0.173));
    xs.extend((0..200).map(|k| k as f32 / 4096.0));
    let mut kb = KB::new("fp8_store");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::Fp8E4m3);
    let j = kb.compile(vec![store(out, row(), load(x, row()))]);
    let xb = f32_bytes(&xs);
    let mut ob = vec![0u8; xs.len()];
    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], xs.len() as u64)
        .unwrap();
    for (x, g) in xs.iter().zip(&ob) {
        assert_eq!(*g, scalar::f32_to_fp8_e4m3(*x), "{x}");
    }
}

#[test]
fn integer_elements_extend_and_truncate() {
    let mut kb = KB::new("ints");
    let a = kb.input("a", Elem::I32);
    let b = kb.input("b", Elem::U8);
    let wide = kb.output("wide", Elem::I32);
    let narrow = kb.output("narrow", Elem::U8);
    let j = kb.compile(vec![
        // i32 sign-extends, u8 zero-extends: the sum is exact in i64.
        store(wide, row(), add(load(a, row()), load(b, row()))),
        // Storing an i64 keeps the low bits.
        store(narrow, row(), mul(load(a, row()), i(3))),
    ]);
    let avals = [-5i32, 7, i32::MIN, i32::MAX, 0];
    let bvals = [200u8, 255, 1, 0, 128];
    let ab = i32_bytes(&avals);
    let mut wb = vec![0u8; 20];
    let mut nb = vec![0u8; 5];
    j.launch(
        &mut [
            Arg::Read(&ab),
            Arg::Read(&bvals),
            Arg::Write(&mut wb),
            Arg::Write(&mut nb),
        ],
        5,
    )
    .unwrap();
    let want_wide: Vec<i32> = avals
        .iter()
        .zip(&bvals)
        .map(|(a, b)| (i64::from(*a) + i64::from(*b)) as i32)
        .collect();
    let want_narrow: Vec<u8> = avals.iter().map(|a| (i64::from(*a) * 3) as u8).collect();
    assert_eq!(to_i32(&wb), want_wide);
    assert_eq!(nb, want_narrow);
}

#[test]
fn f32_elements_round_trip_and_read_write_in_place() {
    let mut kb = KB::new("scale_in_place");
    let y = kb.buf("y", Elem::F32, Access::ReadWrite);
    let s = kb.scalar("s", Ty::F32);
    let off = kb.scalar("off", Ty::I64);
    let j = kb.compile(vec![store(
        y,
        row(),
        add(mul(load(y, row()), sc(s)), un(UnOp::ToF32, sc(off))),
    )]);
    let ys = [1.0f32, -2.5, 0.1, f32::NAN];
    let mut yb = f32_bytes(&ys);
    j.launch(&mut [Arg::Write(&mut yb), Arg::F32(0.3), Arg::I64(-2)], 4)
        .unwrap();
    let want: Vec<f32> = ys.iter().map(|y| y * 0.3 + -2.0).collect();
    assert_same(&to_f32(&yb), &want, "y");
}

#[test]
fn out_of_bounds_loads_fail_and_name_the_buffer() {
    let mut kb = KB::new("shifted");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::F32);
    let shift = kb.scalar("shift", Ty::I64);
    let j = kb.compile(vec![store(out, row(), load(x, add(row(), sc(shift))))]);
    let xb = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    for (sh, bad) in [(1i64, 4i64), (-1, -1), (i64::MIN, i64::MIN)] {
        let mut ob = f32_bytes(&[9.0; 4]);
        let err = j
            .launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob), Arg::I64(sh)], 4)
            .unwrap_err();
        assert_eq!(
            err,
            LaunchError::OutOfBounds {
                param: "x".to_string(),
                index: bad,
                len: 4
            }
        );
        if sh == 1 {
            // Rows before the failing one ran.
            assert_eq!(to_f32(&ob), vec![2.0, 3.0, 4.0, 9.0]);
        }
    }
    let mut ob = vec![0u8; 16];
    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob), Arg::I64(0)], 4)
        .unwrap();
}

#[test]
fn out_of_bounds_stores_fail_and_write_nothing_past_the_end() {
    let mut kb = KB::new("spill");
    let out = kb.output("out", Elem::Bf16);
    let j = kb.compile(vec![store(out, row(), f(1.0))]);
    let mut memory = [0xabu8; 16];
    let (inside, past) = memory.split_at_mut(8); // 4 bf16 elements
    let err = j.launch(&mut [Arg::Write(inside)], 6).unwrap_err();
    assert_eq!(
        err,
        LaunchError::OutOfBounds {
            param: "out".to_string(),
            index: 4,
            len: 4
        }
    );
    assert!(past.iter().all(|b| *b == 0xab));
    assert_eq!(to_u16(inside), vec![0x3f80; 4]);
    // The error reads like one.
    assert_eq!(
        err.to_string(),
        "index 4 is outside buffer `out` of 4 elements"
    );
}

#[test]
fn out_of_bounds_array_access_names_the_array() {
    let mut kb = KB::new("array_oob");
    let out = kb.output("out", Elem::F32);
    let k = kb.scalar("k", Ty::I64);
    let a = kb.array("scores", Ty::F32, 8);
    let j = kb.compile(vec![
        astore(a, i(0), f(1.0)),
        store(out, row(), aload(a, sc(k))),
    ]);
    for bad in [8i64, -1, 1 << 40] {
        let mut ob = vec![0u8; 4];
        let err = j
            .launch(&mut [Arg::Write(&mut ob), Arg::I64(bad)], 1)
            .unwrap_err();
        assert_eq!(
            err,
            LaunchError::OutOfBounds {
                param: "scores".to_string(),
                index: bad,
                len: 8
            }
        );
    }
    let mut kb = KB::new("array_store_oob");
    let k = kb.scalar("k", Ty::I64);
    let a = kb.array("tmp", Ty::Bool, 3);
    let j = kb.compile(vec![astore(a, sc(k), bool_(true))]);
    let err = j.launch(&mut [Arg::I64(3)], 1).unwrap_err();
    assert!(
        matches!(err, LaunchError::OutOfBounds { ref param, index: 3, len: 3 } if param == "tmp")
    );
}

#[test]
fn integer_division_by_zero_fails() {
    let mut kb = KB::new("divide");
    let d = kb.input("d", Elem::I32);
    let out = kb.output("out", Elem::I32);
    let j = kb.compile(vec![
        store(
            out,
            mul(row(), i(2)),
            bin(BinOp::Div, i(100), load(d, row())),
        ),
        store(
            out,
            add(mul(row(), i(2)), i(1)),
            bin(BinOp::Rem, i(100), load(d, row())),
        ),
    ]);
    let db = i32_bytes(&[7, -3, 0, 5]);
    let mut ob = vec![0u8; 32];
    let err = j
        .launch(&mut [Arg::Read(&db), Arg::Write(&mut ob)], 4)
        .unwrap_err();
    assert_eq!(err, LaunchError::DivideByZero);
    assert_eq!(to_i32(&ob)[..4], [14, 2, -33, 1]);

    let mut kb = KB::new("remainder");
    let out = kb.output("out", Elem::I32);
    let j = kb.compile(vec![store(out, i(0), bin(BinOp::Rem, i(5), i(0)))]);
    let mut ob = vec![0u8; 4];
    assert_eq!(
        j.launch(&mut [Arg::Write(&mut ob)], 1),
        Err(LaunchError::DivideByZero)
    );
    // Float division by zero is IEEE, not an error.
    let got = map_f32("fdiv", |e| bin(BinOp::Div, f(1.0), e), &[0.0, -0.0]);
    assert_eq!(got, vec![f32::INFINITY, f32::NEG_INFINITY]);
}

#[test]
fn bad_arguments_are_rejected_before_running() {
    let mut kb = KB::new("checked");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::Bf16);
    let s = kb.scalar("s", Ty::F32);
    let n = kb.scalar("n", Ty::I64);
    let j = kb.compile(vec![store(
        out,
        row(),
        mul(load(x, row()), add(sc(s), un(UnOp::ToF32, sc(n)))),
    )]);
    let xb = f32_bytes(&[1.0, 2.0]);
    let mut ob = vec![0u8; 4];
    let bad = |r: Result<(), LaunchError>| match r {
        Err(LaunchError::BadArguments(why)) => why,
        other => panic!("expected BadArguments, got {other:?}"),
    };
    // Count.
    let why = bad(j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], 2));
    assert!(why.contains("2 arguments for 4 parameters"), "{why}");
    // A written buffer passed read-only.
    let ro = vec![0u8; 4];
    let why = bad(j.launch(
        &mut [Arg::Read(&xb), Arg::Read(&ro), Arg::F32(1.0), Arg::I64(0)],
        2,
    ));
    assert!(why.contains("`out`"), "{why}");
    // A length that is not a whole number of elements.
    let mut odd = vec![0u8; 3];
    let why = bad(j.launch(
        &mut [
            Arg::Read(&xb),
            Arg::Write(&mut odd),
            Arg::F32(1.0),
            Arg::I64(0),
        ],
        1,
    ));
    assert!(why.contains("not a multiple of 2"), "{why}");
    let why = bad(j.launch(
        &mut [
            Arg::Read(&xb[..6]),
            Arg::Write(&mut ob),
            Arg::F32(1.0),
            Arg::I64(0),
        ],
        1,
    ));
    assert!(why.contains("`x`"), "{why}");
    // Scalar types.
    let why = bad(j.launch(
        &mut [
            Arg::Read(&xb),
            Arg::Write(&mut ob),
            Arg::I64(1),
            Arg::I64(0),
        ],
        2,
    ));
    assert!(why.contains("`s`") && why.contains("an i64"), "{why}");
    let why = bad(j.launch(
        &mut [
            Arg::Read(&xb),
            Arg::Write(&mut ob),
            Arg::F32(1.0),
            Arg::F32(0.0),
        ],
        2,
    ));
    assert!(why.contains("`n`"), "{why}");
    // A scalar where a buffer goes.
    let why = bad(j.launch(
        &mut [
            Arg::F32(0.0),
            Arg::Write(&mut ob),
            Arg::F32(1.0),
            Arg::I64(0),
        ],
        2,
    ));
    assert!(why.contains("`x`"), "{why}");
    // A writable buffer may be passed for a read-only parameter.
    let mut xw = xb.clone();
    j.launch(
        &mut [
            Arg::Write(&mut xw),
            Arg::Write(&mut ob),
            Arg::F32(1.5),
            Arg::I64(1),
        ],
        2,
    )
    .unwrap();
    assert_eq!(
        to_u16(&ob),
        vec![scalar::f32_to_bf16(2.5), scalar::f32_to_bf16(5.0)]
    );
    // Raw launches check kinds too.
    let why = bad(unsafe {
        j.launch_raw(
            &[
                RawArg::F32(0.0),
                RawArg::F32(0.0),
                RawArg::F32(0.0),
                RawArg::I64(0),
            ],
            0..1,
        )
    });
    assert!(why.contains("`x`"), "{why}");
}

#[test]
fn ill_formed_kernels_do_not_compile() {
    let cases: Vec<(Kernel, &str)> = vec![
        {
            let mut kb = KB::new("mixed_types");
            let out = kb.output("out", Elem::F32);
            (
                kb.kernel(vec![store(out, row(), add(f(1.0), i(1)))]),
                "Add of F32 and I64",
            )
        },
        {
            let mut kb = KB::new("store_to_input");
            let x = kb.input("x", Elem::F32);
            (
                kb.kernel(vec![store(x, row(), f(1.0))]),
                "read-only buffer `x`",
            )
        },
        {
            let kb = KB::new("assign_row");
            (kb.kernel(vec![set(ROW, i(3))]), "row index")
        },
        {
            let mut kb = KB::new("wrong_store_type");
            let out = kb.output("out", Elem::Bf16);
            (kb.kernel(vec![store(out, row(), i(1))]), "store of I64")
        },
        {
            let mut kb = KB::new("float_index");
            let out = kb.output("out", Elem::F32);
            (
                kb.kernel(vec![store(out, f(0.0), f(1.0))]),
                "index into `out`",
            )
        },
        {
            let mut kb = KB::new("assign_loop_var");
            let k = kb.var("k", Ty::I64);
            (
                kb.kernel(vec![for_(k, i(0), i(3), vec![set(k, i(0))])]),
                "loop variable `k`",
            )
        },
        {
            let kb = KB::new("undeclared");
            (kb.kernel(vec![set(VarId(7), i(0))]), "variable 7")
        },
        {
            let mut kb = KB::new("float_rem");
            let out = kb.output("out", Elem::F32);
            (
                kb.kernel(vec![store(out, row(), bin(BinOp::Rem, f(1.0), f(2.0)))]),
                "Rem does not apply to F32",
            )
        },
        {
            let mut kb = KB::new("if_on_int");
            let out = kb.output("out", Elem::F32);
            (
                kb.kernel(vec![if_(i(1), vec![store(out, row(), f(1.0))], vec![])]),
                "condition",
            )
        },
        (KB::new("Bad-Name").kernel(vec![]), "[a-z0-9_]"),
    ];
    for (k, want) in cases {
        let err = JitKernel::compile(&k).unwrap_err();
        assert_eq!(err.kernel, k.name);
        let text = err.to_string();
        assert!(
            text.contains(&format!("kernel `{}`", k.name)) && text.contains(want),
            "{text}"
        );
    }
}

#[test]
fn raw_launches_run_a_row_range() {
    let mut kb = KB::new("ranged");
    let out = kb.output("out", Elem::I32);
    let j = kb.compile(vec![store(out, row(), mul(row(), row()))]);
    let mut memory = vec![-1i32; 10];
    let args = [RawArg::Buf {
        ptr: memory.as_mut_ptr().cast::<u8>(),
        len: 10,
    }];
    // SAFETY: `memory` holds 10 live, writable i32 elements for both calls.
    unsafe {
        j.launch_raw(&args, 3..7).unwrap();
        j.launch_raw(&args, 5..5).unwrap();
        #[allow(clippy::reversed_empty_ranges)]
        j.launch_raw(&args, 9..2).unwrap();
    }
    assert_eq!(memory, vec![-1, -1, -1, 9, 16, 25, 36, -1, -1, -1]);
    // SAFETY: as above.
    let err = unsafe { j.launch_raw(&args, 8..12) }.unwrap_err();
    assert_eq!(
        err,
        LaunchError::OutOfBounds {
            param: "out".to_string(),
            index: 10,
            len: 10
        }
    );
    // SAFETY: as above; the range is rejected before anything runs.
    let err = unsafe { j.launch_raw(&args, 0..u64::MAX) }.unwrap_err();
    assert!(matches!(err, LaunchError::BadArguments(_)));
}

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn concurrent_launches_are_independent() {
    assert_send_sync::<JitKernel>();
    // Per-row state in variables and an array: threads must not share it.
    let n = 64i64;
    let mut kb = KB::new("prefix_sum");
    let x = kb.input("x", Elem::F32);
    let out = kb.output("out", Elem::F32);
    let tmp = kb.array("tmp", Ty::F32, n as u32);
    let acc = kb.var("acc", Ty::F32);
    let k = kb.var("k", Ty::I64);
    let at = |e: Expr| add(mul(row(), i(n)), e);
    let j = kb.compile(vec![
        for_(
            k,
            i(0),
            i(n),
            vec![
                set(acc, add(v(acc), load(x, at(v(k))))),
                astore(tmp, v(k), v(acc)),
            ],
        ),
        for_(k, i(0), i(n), vec![store(out, at(v(k)), aload(tmp, v(k)))]),
    ]);
    let rows = 200usize;
    let want = |seed: usize| -> (Vec<f32>, Vec<f32>) {
        let xs: Vec<f32> = (0..rows * n as usize)
            .map(|e| ((e * 7 + seed * 13) % 17) as f32 - 8.0)
            .collect();
        let mut ys = Vec::with_capacity(xs.len());
        for r in xs.chunks(n as usize) {
            let mut acc = 0.0f32;
            for x in r {
                acc += x;
                ys.push(acc);
            }
        }
        (xs, ys)
    };
    // Eight threads, each its own buffers, several launches each.
    std::thread::scope(|s| {
        for seed in 0..8 {
            let j = &j;
            s.spawn(move || {
                let (xs, ys) = want(seed);
                let xb = f32_bytes(&xs);
                for _ in 0..5 {
                    let mut ob = vec![0u8; xb.len()];
                    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], rows as u64)
                        .unwrap();
                    assert_eq!(to_f32(&ob), ys);
                }
            });
        }
    });
    // Eight threads on disjoint row ranges of one shared output.
    let (xs, ys) = want(99);
    let mut outv = vec![0f32; xs.len()];
    let x_ptr = xs.as_ptr() as usize;
    let out_ptr = outv.as_mut_ptr() as usize;
    let len = xs.len() as u64;
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let j = &j;
            s.spawn(move || {
                let args = [
                    RawArg::Buf {
                        ptr: x_ptr as *mut u8,
                        len,
                    },
                    RawArg::Buf {
                        ptr: out_ptr as *mut u8,
                        len,
                    },
                ];
                let per = rows as u64 / 8;
                // SAFETY: both vectors outlive the scope; `x` is only read;
                // each thread writes only its own rows' elements of `out`.
                unsafe { j.launch_raw(&args, t * per..(t + 1) * per) }.unwrap();
            });
        }
    });
    assert_eq!(outv, ys);
}

#[test]
fn softmax_over_a_row_matches_rust_exactly() {
    const N: i64 = 8;
    let mut kb = KB::new("softmax8");
    let x = kb.input("x", Elem::Bf16);
    let out = kb.output("out", Elem::F32);
    let e = kb.array("e", Ty::F32, N as u32);
    let m = kb.var("m", Ty::F32);
    let sum = kb.var("sum", Ty::F32);
    let k = kb.var("k", Ty::I64);
    let at = |e: Expr| add(mul(row(), i(N)), e);
    let j = kb.compile(vec![
        set(m, f(f32::NEG_INFINITY)),
        for_(
            k,
            i(0),
            i(N),
            vec![set(m, bin(BinOp::Max, v(m), load(x, at(v(k)))))],
        ),
        for_(
            k,
            i(0),
            i(N),
            vec![
                astore(
                    e,
                    v(k),
                    un(UnOp::Exp, bin(BinOp::Sub, load(x, at(v(k))), v(m))),
                ),
                set(sum, add(v(sum), aload(e, v(k)))),
            ],
        ),
        for_(
            k,
            i(0),
            i(N),
            vec![store(
                out,
                at(v(k)),
                bin(BinOp::Div, aload(e, v(k)), v(sum)),
            )],
        ),
    ]);
    let rows = 50usize;
    let xs: Vec<u16> = (0..rows * N as usize)
        .map(|t| scalar::f32_to_bf16(((t * 37) % 101) as f32 * 0.173 - 9.0))
        .collect();
    let xb = u16_bytes(&xs);
    let mut ob = vec![0u8; 4 * xs.len()];
    j.launch(&mut [Arg::Read(&xb), Arg::Write(&mut ob)], rows as u64)
        .unwrap();
    let got = to_f32(&ob);
    for (r, chunk) in xs.chunks(N as usize).enumerate() {
        let vals: Vec<f32> = chunk.iter().map(|b| scalar::bf16_to_f32(*b)).collect();
        let m = vals
            .iter()
            .fold(f32::NEG_INFINITY, |m, v| scalar::fmax(m, *v));
        let e: Vec<f32> = vals.iter().map(|v| scalar::exp(v - m)).collect();
        let sum = e.iter().fold(0.0f32, |s, v| s + v);
        for (c, ev) in e.iter().enumerate() {
            let want = ev / sum;
            let g = got[r * N as usize + c];
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "row {r} col {c}: {g} vs {want}"
            );
        }
    }
}

#[test]
fn compiling_many_kernels_and_dropping_them() {
    for n in 0..40 {
        let mut kb = KB::new(&format!("k{n}"));
        let out = kb.output("out", Elem::I32);
        let j = kb.compile(vec![store(out, row(), add(row(), i(n)))]);
        let mut ob = vec![0u8; 8];
        j.launch(&mut [Arg::Write(&mut ob)], 2).unwrap();
        assert_eq!(to_i32(&ob), vec![n as i32, n as i32 + 1]);
    }
    let mut kb = KB::new("shown");
    let out = kb.output("out", Elem::F32);
    let k = kb.kernel(vec![store(out, row(), f(1.0))]);
    let text = JitKernel::clif(&k).unwrap();
    assert!(text.contains("function"), "{text}");
    let code = JitKernel::disassembly(&k).unwrap();
    assert!(!code.is_empty());
}
