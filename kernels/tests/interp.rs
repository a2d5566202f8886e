//! The interpreter's semantics (ir.rs) on small hand-built kernels, and its
//! argument validation.
#![allow(clippy::unwrap_used)]

mod common;

use common::{launch, Buf};
use moec_kernels::build::{ge, lt, max, min, ne, select, to_f32, to_i64, Builder, E};
use moec_kernels::interp;
use moec_kernels::ir::{Access, Arg, Elem, LaunchError, Ty};

#[test]
fn variables_and_arrays_are_zero_at_the_start_of_every_row() {
    let mut b = Builder::new("zeros");
    let out = b.buffer("out", Elem::I32, Access::Write);
    let acc = b.var("acc", Ty::I64);
    let arr = b.array("arr", Ty::I64, 2);
    // acc and arr[0] count up within a row only.
    b.set(acc, acc + 1);
    b.array_set(arr, 0, arr.at(0) + 10);
    b.store(out, b.row(), acc + arr.at(0) + arr.at(1));
    let k = b.finish().unwrap();
    let mut bufs = vec![Buf::out(Elem::I32, 3)];
    launch(&k, &mut bufs, 3).unwrap();
    assert_eq!(bufs[0].ints(Elem::I32), vec![11, 11, 11]);
}

#[test]
fn loops_ifs_and_integer_arithmetic() {
    let mut b = Builder::new("ints");
    let out = b.buffer("out", Elem::I32, Access::Write);
    let n = b.scalar("n", Ty::I64);
    let acc = b.local("acc", 0);
    b.for_range(2, &n, |b, i| {
        b.if_else(
            ge(i % 2, 1),
            |b| b.set(acc, acc + i * 100),
            |b| b.set(acc, acc - i),
        );
    });
    b.store(out, 0, acc);
    b.store(out, 1, E::from(-7) / 2); // truncates toward zero
    b.store(out, 2, E::from(-7) % 2);
    b.store(out, 3, min(acc, 5) + max(-3, -4));
    // Loops with an empty range run no iteration.
    b.for_range(5, 2, |b, _| b.store(out, 0, 0));
    let k = b.finish().unwrap();
    let mut bufs = vec![Buf::out(Elem::I32, 4), Buf::I64(6)];
    launch(&k, &mut bufs, 1).unwrap();
    // i = 2..6: -2 + 300 - 4 + 500
    assert_eq!(bufs[0].ints(Elem::I32), vec![794, -3, -1, 2]);
}

#[test]
fn integer_arithmetic_wraps_and_stores_keep_the_low_bits() {
    let mut b = Builder::new("wrap");
    let out = b.buffer("out", Elem::I32, Access::Write);
    let bytes = b.buffer("bytes", Elem::U8, Access::Write);
    b.store(out, 0, E::from(i64::MAX) + 1);
    b.store(out, 1, E::from(i64::MIN) / -1);
    b.store(out, 2, 0x1_0000_0005i64);
    b.store(bytes, 0, 300);
    b.store(bytes, 1, -1);
    let k = b.finish().unwrap();
    let mut bufs = vec![Buf::out(Elem::I32, 3), Buf::out(Elem::U8, 2)];
    launch(&k, &mut bufs, 1).unwrap();
    // i64::MIN and i64::MIN keep low bits 0; 0x1_0000_0005 keeps 5.
    assert_eq!(bufs[0].ints(Elem::I32), vec![0, 0, 5]);
    assert_eq!(bufs[1].ints(Elem::U8), vec![44, 255]);
}

#[test]
fn integer_division_by_zero_fails_the_launch() {
    for rem in [false, true] {
        let mut b = Builder::new("div");
        let out = b.buffer("out", Elem::I32, Access::Write);
        let d = b.scalar("d", Ty::I64);
        b.store(
            out,
            0,
            if rem {
                E::from(5) % &d
            } else {
                E::from(5) / &d
            },
        );
        let k = b.finish().unwrap();
        let mut bufs = vec![Buf::out(Elem::I32, 1), Buf::I64(0)];
        assert_eq!(launch(&k, &mut bufs, 1), Err(LaunchError::DivideByZero));
        let mut bufs = vec![Buf::out(Elem::I32, 1), Buf::I64(2)];
        launch(&k, &mut bufs, 1).unwrap();
        assert_eq!(bufs[0].ints(Elem::I32), vec![if rem { 1 } else { 2 }]);
    }
}

#[test]
fn float_semantics() {
    let mut b = Builder::new("floats");
    let out = b.buffer("out", Elem::F32, Access::Write);
    let ints = b.buffer("ints", Elem::I32, Access::Write);
    let nan = b.scalar("nan", Ty::F32);
    b.store(out, 0, min(&nan, 1.0f32));
    b.store(out, 1, max(1.0f32, &nan));
    b.store(out, 2, select(lt(&nan, 1.0f32), 1.0f32, 2.0f32)); // false
    b.store(out, 3, select(ne(&nan, &nan), 1.0f32, 2.0f32)); // true
    b.store(out, 4, to_f32(16_777_217i64)); // rounds to nearest (even)
    b.store(ints, 0, to_i64(-2.7f32)); // truncates
    b.store(ints, 1, to_i64(&nan)); // NaN gives 0
    b.store(ints, 2, to_i64(1e30f32) / 4_294_967_296i64); // saturates
    let k = b.finish().unwrap();
    let mut bufs = vec![
        Buf::out(Elem::F32, 5),
        Buf::out(Elem::I32, 3),
        Buf::F32(f32::NAN),
    ];
    launch(&k, &mut bufs, 1).unwrap();
    let f = bufs[0].floats(Elem::F32);
    assert!(f[0].is_nan() && f[1].is_nan());
    assert_eq!(&f[2..], &[2.0, 1.0, 16_777_216.0]);
    assert_eq!(
        bufs[1].ints(Elem::I32),
        vec![-2, 0, (i64::MAX / 4_294_967_296) as i32 as i64]
    );
}

#[test]
fn stores_round_to_nearest_even_and_fp8_saturates() {
    let mut b = Builder::new("narrow");
    let bf = b.buffer("bf", Elem::Bf16, Access::Write);
    let fp8 = b.buffer("fp8", Elem::Fp8E4m3, Access::Write);
    let h = b.buffer("h", Elem::F16, Access::Write);
    b.store(bf, 0, E::from(1.0f32) + 1.0f32 / 256.0); // tie: to even (1.0)
    b.store(bf, 1, E::from(1.0f32) + 3.0f32 / 256.0); // tie: to even (1 + 4/256)
    b.store(fp8, 0, 1000.0f32);
    b.store(fp8, 1, -1000.0f32);
    b.store(h, 0, 70_000.0f32); // overflows to inf
    let k = b.finish().unwrap();
    let mut bufs = vec![
        Buf::out(Elem::Bf16, 2),
        Buf::out(Elem::Fp8E4m3, 2),
        Buf::out(Elem::F16, 1),
    ];
    launch(&k, &mut bufs, 1).unwrap();
    assert_eq!(bufs[0].floats(Elem::Bf16), vec![1.0, 1.0 + 4.0 / 256.0]);
    assert_eq!(bufs[1].floats(Elem::Fp8E4m3), vec![448.0, -448.0]);
    assert_eq!(bufs[2].floats(Elem::F16), vec![f32::INFINITY]);
}

#[test]
fn loads_widen_signed_and_unsigned() {
    let mut b = Builder::new("widen");
    let i = b.buffer("i", Elem::I32, Access::Read);
    let u = b.buffer("u", Elem::U8, Access::Read);
    let out = b.buffer("out", Elem::F32, Access::Write);
    b.store(out, 0, to_f32(i.at(0)));
    b.store(out, 1, to_f32(u.at(0)));
    let k = b.finish().unwrap();
    let mut bufs = vec![Buf::i(&[-5]), Buf::In(vec![200]), Buf::out(Elem::F32, 2)];
    launch(&k, &mut bufs, 1).unwrap();
    assert_eq!(bufs[2].floats(Elem::F32), vec![-5.0, 200.0]);
}

#[test]
fn out_of_bounds_names_the_buffer_and_both_select_arms_are_evaluated() {
    let mut b = Builder::new("oob");
    let src = b.buffer("src", Elem::F32, Access::Read);
    let dst = b.buffer("dst", Elem::F32, Access::Write);
    // The condition is true, but the other arm's load is still evaluated.
    b.store(dst, b.row(), select(true, 1.0f32, src.at(b.row() - 1)));
    let k = b.finish().unwrap();
    let mut bufs = vec![Buf::f(Elem::F32, &[1.0; 4]), Buf::out(Elem::F32, 4)];
    assert_eq!(
        launch(&k, &mut bufs, 1),
        Err(LaunchError::OutOfBounds {
            param: "src".into(),
            index: -1,
            len: 4
        })
    );

    let mut b = Builder::new("oob_store");
    let dst = b.buffer("dst", Elem::Bf16, Access::Write);
    b.store(dst, b.row() * 2, 1.0f32);
    let k = b.finish().unwrap();
    let mut bufs = vec![Buf::out(Elem::Bf16, 5)];
    let err = launch(&k, &mut bufs, 4).unwrap_err();
    assert_eq!(
        err,
        LaunchError::OutOfBounds {
            param: "dst".into(),
            index: 6,
            len: 5
        }
    );
    // Rows 0..3 ran; nothing was written past the end.
    assert_eq!(bufs[0].floats(Elem::Bf16), vec![1.0, 0.0, 1.0, 0.0, 1.0]);

    // A local array index out of range reports the array.
    let mut b = Builder::new("oob_array");
    let a = b.array("scratch", Ty::F32, 3);
    b.array_set(a, b.row(), 1.0f32);
    let k = b.finish().unwrap();
    let err = launch(&k, &mut [], 4).unwrap_err();
    assert!(
        matches!(&err, LaunchError::OutOfBounds { param, index: 3, len: 3 } if param == "scratch"),
        "{err:?}"
    );
}

fn copy_kernel() -> moec_kernels::ir::Kernel {
    let mut b = Builder::new("copy");
    let src = b.buffer("src", Elem::Bf16, Access::Read);
    let dst = b.buffer("dst", Elem::Bf16, Access::ReadWrite);
    let s = b.scalar("s", Ty::F32);
    b.store(dst, b.row(), src.at(b.row()) * s + dst.at(b.row()));
    b.finish().unwrap()
}

#[test]
fn bad_arguments_are_refused_before_any_row_runs() {
    let k = copy_kernel();
    let src = vec![0u8; 8];
    let mut dst = vec![0u8; 8];
    let mut odd = vec![0u8; 7];
    let bad = |args: &mut [Arg<'_>]| match interp::run(&k, args, 4) {
        Err(LaunchError::BadArguments(why)) => why,
        other => panic!("expected bad arguments, got {other:?}"),
    };
    // Count.
    let why = bad(&mut [Arg::Read(&src), Arg::Write(&mut dst)]);
    assert!(why.contains("3 arguments, got 2"), "{why}");
    // A written buffer passed read-only.
    let why = bad(&mut [Arg::Read(&src), Arg::Read(&src), Arg::F32(1.0)]);
    assert!(why.contains("`dst`") && why.contains("writable"), "{why}");
    // A scalar where a buffer goes.
    let why = bad(&mut [Arg::F32(1.0), Arg::Write(&mut dst), Arg::F32(1.0)]);
    assert!(why.contains("`src`"), "{why}");
    // A byte length that is not whole elements.
    let why = bad(&mut [Arg::Read(&src), Arg::Write(&mut odd), Arg::F32(1.0)]);
    assert!(why.contains("`dst`") && why.contains("7 bytes"), "{why}");
    // A scalar of the wrong type.
    let why = bad(&mut [Arg::Read(&src), Arg::Write(&mut dst), Arg::I64(1)]);
    assert!(why.contains("`s`") && why.contains("f32"), "{why}");
    // Nothing ran.
    assert!(dst.iter().all(|&b| b == 0));

    // A Read parameter accepts a writable buffer.
    let mut src_w = interp::encode_f32(Elem::Bf16, &[1.0, 2.0, 3.0, 4.0]);
    interp::run(
        &k,
        &mut [Arg::Write(&mut src_w), Arg::Write(&mut dst), Arg::F32(2.0)],
        4,
    )
    .unwrap();
    assert_eq!(
        interp::decode_f32(Elem::Bf16, &dst),
        vec![2.0, 4.0, 6.0, 8.0]
    );
}

#[test]
fn a_malformed_kernel_is_refused() {
    let mut k = copy_kernel();
    k.name = "Copy".into();
    let mut dst = vec![0u8; 8];
    let err = interp::run(
        &k,
        &mut [Arg::Read(&[0; 8]), Arg::Write(&mut dst), Arg::F32(1.0)],
        1,
    )
    .unwrap_err();
    assert!(
        matches!(err, LaunchError::BadArguments(ref why) if why.contains("malformed")),
        "{err}"
    );
}

#[test]
fn encode_decode_round_trip() {
    for elem in [Elem::F32, Elem::Bf16, Elem::F16, Elem::Fp8E4m3] {
        let v = [0.0f32, -1.5, 2.0, 448.0];
        assert_eq!(interp::decode_f32(elem, &interp::encode_f32(elem, &v)), v);
    }
    for elem in [Elem::I32, Elem::U8] {
        let v = [0i64, 1, 200];
        assert_eq!(interp::decode_i64(elem, &interp::encode_i64(elem, &v)), v);
    }
    assert_eq!(
        interp::decode_i64(Elem::I32, &interp::encode_i64(Elem::I32, &[-3])),
        vec![-3]
    );
}
