//! The type checker refuses malformed kernels with a message naming the
//! kernel and the offending thing.
#![allow(clippy::unwrap_used)]

use moec_kernels::build::{gt, Builder, E};
use moec_kernels::check::check;
use moec_kernels::ir::{
    Access, ArrayDecl, BinOp, Elem, Expr, Kernel, Param, ParamId, ParamKind, Stmt, Ty, UnOp,
    VarDecl, VarId, MAX_ARRAY_LEN, ROW,
};

/// `out[row] = src[row]`, well formed.
fn base() -> Kernel {
    let mut b = Builder::new("base");
    let src = b.buffer("src", Elem::F32, Access::Read);
    let out = b.buffer("out", Elem::F32, Access::Write);
    b.store(out, b.row(), src.at(b.row()));
    b.finish().unwrap()
}

fn var(k: &mut Kernel, name: &str, ty: Ty) -> VarId {
    k.vars.push(VarDecl {
        name: name.into(),
        ty,
    });
    VarId(k.vars.len() as u32 - 1)
}

/// The checker's message for `k`, which must be refused.
fn refused(k: &Kernel) -> String {
    let e = check(k).expect_err("the kernel should be refused");
    assert_eq!(e.kernel, k.name);
    let msg = e.to_string();
    assert!(msg.contains(&format!("kernel `{}`", k.name)), "{msg}");
    msg
}

#[test]
fn a_well_formed_kernel_passes() {
    check(&base()).unwrap();
}

#[test]
fn names() {
    for bad in ["", "Add", "add-2", "add kernel"] {
        let mut k = base();
        k.name = bad.into();
        assert!(refused(&k).contains("name"));
    }
    let mut k = base();
    k.params[1].name = "src".into();
    assert!(refused(&k).contains("two parameters are named `src`"));
}

#[test]
fn the_row_variable() {
    let mut k = base();
    k.body.push(Stmt::Set(ROW, Expr::I64(1)));
    assert!(refused(&k).contains("row"), "{}", refused(&k));

    let mut k = base();
    k.body.push(Stmt::For {
        var: ROW,
        start: Expr::I64(0),
        end: Expr::I64(1),
        body: vec![],
    });
    refused(&k);

    let mut k = base();
    k.vars[0].ty = Ty::F32;
    assert!(refused(&k).contains("vars[0]"));

    let mut k = base();
    k.vars.clear();
    refused(&k);
}

#[test]
fn loop_variables() {
    // Assigned in its body.
    let mut k = base();
    let i = var(&mut k, "i", Ty::I64);
    k.body.push(Stmt::For {
        var: i,
        start: Expr::I64(0),
        end: Expr::I64(4),
        body: vec![Stmt::Set(i, Expr::I64(0))],
    });
    assert!(refused(&k).contains("`i`"));

    // Reused by a nested loop.
    let mut k = base();
    let i = var(&mut k, "i", Ty::I64);
    k.body.push(Stmt::For {
        var: i,
        start: Expr::I64(0),
        end: Expr::I64(4),
        body: vec![Stmt::For {
            var: i,
            start: Expr::I64(0),
            end: Expr::I64(4),
            body: vec![],
        }],
    });
    refused(&k);

    // Not I64; bounds not I64.
    let mut k = base();
    let x = var(&mut k, "x", Ty::F32);
    k.body.push(Stmt::For {
        var: x,
        start: Expr::I64(0),
        end: Expr::I64(4),
        body: vec![],
    });
    assert!(refused(&k).contains("loop variable `x`"));
    let mut k = base();
    let i = var(&mut k, "i", Ty::I64);
    k.body.push(Stmt::For {
        var: i,
        start: Expr::I64(0),
        end: Expr::F32(4.0),
        body: vec![],
    });
    refused(&k);

    // Assigning the variable after its loop is fine.
    let mut k = base();
    let i = var(&mut k, "i", Ty::I64);
    k.body.push(Stmt::For {
        var: i,
        start: Expr::I64(0),
        end: Expr::I64(4),
        body: vec![],
    });
    k.body.push(Stmt::Set(i, Expr::I64(0)));
    check(&k).unwrap();
}

#[test]
fn buffer_access() {
    // Store to a Read buffer.
    let mut k = base();
    k.body.push(Stmt::Store {
        buf: ParamId(0),
        index: Expr::I64(0),
        value: Expr::F32(1.0),
    });
    assert!(refused(&k).contains("store to `src`, a Read buffer"));

    // Load from a Write buffer.
    let mut k = base();
    k.body.push(Stmt::Store {
        buf: ParamId(1),
        index: Expr::I64(0),
        value: Expr::Load {
            buf: ParamId(1),
            index: Box::new(Expr::I64(0)),
        },
    });
    assert!(refused(&k).contains("load from `out`"));

    // Stored value of the wrong class.
    let mut k = base();
    k.body.push(Stmt::Store {
        buf: ParamId(1),
        index: Expr::I64(0),
        value: Expr::I64(1),
    });
    assert!(refused(&k).contains("`out`"));

    // Float index.
    let mut k = base();
    k.body.push(Stmt::Store {
        buf: ParamId(1),
        index: Expr::F32(0.0),
        value: Expr::F32(1.0),
    });
    assert!(refused(&k).contains("index"));

    // A parameter id out of range, a scalar used as a buffer.
    let mut k = base();
    k.body.push(Stmt::Store {
        buf: ParamId(7),
        index: Expr::I64(0),
        value: Expr::F32(1.0),
    });
    assert!(refused(&k).contains("out of range"));
    let mut k = base();
    k.params.push(Param {
        name: "s".into(),
        kind: ParamKind::Scalar(Ty::F32),
    });
    k.body.push(Stmt::Store {
        buf: ParamId(2),
        index: Expr::I64(0),
        value: Expr::F32(1.0),
    });
    assert!(refused(&k).contains("`s` is a scalar"));
}

#[test]
fn scalar_parameters_and_arrays() {
    let mut k = base();
    k.params.push(Param {
        name: "flag".into(),
        kind: ParamKind::Scalar(Ty::Bool),
    });
    assert!(refused(&k).contains("`flag`"));

    for len in [0, MAX_ARRAY_LEN + 1] {
        let mut k = base();
        k.arrays.push(ArrayDecl {
            name: "a".into(),
            ty: Ty::F32,
            len,
        });
        assert!(refused(&k).contains("array `a`"));
    }
    let mut k = base();
    k.arrays.push(ArrayDecl {
        name: "a".into(),
        ty: Ty::F32,
        len: MAX_ARRAY_LEN,
    });
    check(&k).unwrap();
}

#[test]
fn operand_types() {
    let bad_exprs = [
        // Mixed types.
        Expr::Binary(BinOp::Add, Box::new(Expr::F32(1.0)), Box::new(Expr::I64(1))),
        // Rem of floats.
        Expr::Binary(
            BinOp::Rem,
            Box::new(Expr::F32(1.0)),
            Box::new(Expr::F32(1.0)),
        ),
        // Exp of an integer.
        Expr::Unary(UnOp::Exp, Box::new(Expr::I64(1))),
        // ToI64 of an integer.
        Expr::Unary(UnOp::ToI64, Box::new(Expr::I64(1))),
        // Arithmetic on booleans.
        Expr::Select(
            Box::new(Expr::Binary(
                BinOp::Lt,
                Box::new(Expr::Bool(true)),
                Box::new(Expr::Bool(false)),
            )),
            Box::new(Expr::F32(1.0)),
            Box::new(Expr::F32(2.0)),
        ),
        // Select with a non-bool condition, or arms of two types.
        Expr::Select(
            Box::new(Expr::I64(1)),
            Box::new(Expr::F32(1.0)),
            Box::new(Expr::F32(2.0)),
        ),
        Expr::Select(
            Box::new(Expr::Bool(true)),
            Box::new(Expr::F32(1.0)),
            Box::new(Expr::I64(2)),
        ),
        // Not of a float; And of integers.
        Expr::Select(
            Box::new(Expr::Unary(UnOp::Not, Box::new(Expr::F32(1.0)))),
            Box::new(Expr::F32(1.0)),
            Box::new(Expr::F32(2.0)),
        ),
        Expr::Select(
            Box::new(Expr::Binary(
                BinOp::And,
                Box::new(Expr::I64(1)),
                Box::new(Expr::I64(1)),
            )),
            Box::new(Expr::F32(1.0)),
            Box::new(Expr::F32(2.0)),
        ),
        // A variable id out of range.
        Expr::Var(VarId(99)),
    ];
    for e in bad_exprs {
        let mut k = base();
        let x = var(&mut k, "x", Ty::F32);
        k.body.push(Stmt::Set(x, e.clone()));
        let msg = refused(&k);
        assert!(!msg.is_empty(), "{e:?}");
    }
}

#[test]
fn if_conditions_are_bool_and_the_builder_checks_on_finish() {
    let mut k = base();
    k.body.push(Stmt::If {
        cond: Expr::I64(1),
        then: vec![],
        otherwise: vec![],
    });
    assert!(refused(&k).contains("If condition"));

    // The builder reports the first problem when it finishes.
    let mut b = Builder::new("built");
    let out = b.buffer("out", Elem::F32, Access::Write);
    b.if_(gt(1.0f32, 2i64), |b| b.store(out, 0, 1.0f32));
    let e = b.finish().unwrap_err();
    assert_eq!(e.kernel, "built");
    assert!(e.message.contains("Gt"), "{e}");

    let mut b = Builder::new("built");
    let x = b.local("x", E::from(1.0f32) + 1i64);
    let _ = x;
    let e = b.finish().unwrap_err();
    assert!(e.message.contains("`x`"), "{e}");
}
