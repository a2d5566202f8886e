//! The non-router kernels of the library against straightforward Rust
//! computations, in f32 and bf16 (and f16 where it is cheap), on several
//! shapes. Computations follow the kernels' documented order, so results are
//! compared bit for bit.
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_same, code, consts, kernel, launch, round, rounded, sigmoid, Buf, Rng};
use moec_kernels::check::check;
use moec_kernels::ir::{Elem, LaunchError};
use moec_kernels::library::{describe, DescribeError, Kind};

const DTYPES: [Elem; 3] = [Elem::F32, Elem::Bf16, Elem::F16];

/// Slots of `t` tokens with `k` choices: a permutation of `0 .. t*k` with
/// every `drop_every`-th pair dropped (-1).
fn slots(rng: &mut Rng, t: usize, k: usize, drop_every: usize) -> Vec<i64> {
    let mut perm: Vec<i64> = (0..(t * k) as i64).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, rng.below(i as u64 + 1) as usize);
    }
    perm.iter()
        .enumerate()
        .map(|(i, &s)| if (i + 1) % drop_every == 0 { -1 } else { s })
        .collect()
}

#[test]
fn permute_and_permute_pack() {
    let mut rng = Rng::new(10);
    for kind in [Kind::Permute, Kind::PermutePack] {
        for dt in DTYPES {
            for (t, h, k) in [(3, 5, 2), (4, 16, 3), (1, 7, 1)] {
                for on_input in [false, true] {
                    let x = rounded(dt, &rng.vec(t * h, -2.0, 2.0));
                    let s = slots(&mut rng, t, k, 4);
                    let w = rng.vec(t * k, 0.0, 1.0);
                    let rows = t * k;
                    let sentinel = vec![7.0f32; rows * h];
                    let kern = kernel(
                        kind,
                        &[
                            ("dtype", code(dt)),
                            ("hidden", h as i64),
                            ("top_k", k as i64),
                            ("rows", rows as i64),
                            ("weight_on_input", i64::from(on_input)),
                        ],
                    );
                    let mut bufs = vec![
                        Buf::f(dt, &x),
                        Buf::i(&s),
                        Buf::f(Elem::F32, &w),
                        Buf::out_with(dt, &sentinel),
                    ];
                    launch(&kern, &mut bufs, t as u64).unwrap();
                    let mut want = sentinel.clone();
                    for tok in 0..t {
                        for j in 0..k {
                            let slot = s[tok * k + j];
                            if slot < 0 {
                                continue;
                            }
                            for i in 0..h {
                                let v = x[tok * h + i];
                                let v = if on_input { v * w[tok * k + j] } else { v };
                                want[slot as usize * h + i] = round(dt, v);
                            }
                        }
                    }
                    assert_same("permuted", &bufs[3].floats(dt), &want);
                }
            }
        }
    }
}

#[test]
fn permute_to_a_slot_past_the_end_names_the_buffer() {
    let kern = kernel(
        Kind::PermutePack,
        &[("dtype", 1), ("hidden", 4), ("top_k", 2)],
    );
    let mut bufs = vec![
        Buf::f(Elem::Bf16, &[1.0; 8]),
        Buf::i(&[0, 1, 2, 5]),
        Buf::f(Elem::F32, &[1.0; 4]),
        Buf::out(Elem::Bf16, 4 * 4),
    ];
    let err = launch(&kern, &mut bufs, 2).unwrap_err();
    assert_eq!(
        err,
        LaunchError::OutOfBounds {
            param: "send".into(),
            index: 20,
            len: 16
        }
    );
    assert!(err.to_string().contains("`send`"), "{err}");
    // Row 0 and the first slot of row 1 were written before the failure.
    assert_same("send", &bufs[3].floats(Elem::Bf16)[..12], &[1.0; 12]);
}

#[test]
fn pack_copies_rows() {
    let mut rng = Rng::new(11);
    for dt in DTYPES {
        let x = rounded(dt, &rng.vec(5 * 9, -3.0, 3.0));
        let kern = kernel(Kind::Pack, &[("dtype", code(dt)), ("hidden", 9)]);
        let mut bufs = vec![Buf::f(dt, &x), Buf::out(dt, 45)];
        launch(&kern, &mut bufs, 5).unwrap();
        assert_same("send", &bufs[1].floats(dt), &x);
    }
}

fn quantize_ref(x: &[f32], h: usize, block: usize) -> (Vec<f32>, Vec<f32>) {
    let (mut q, mut scales) = (Vec::new(), Vec::new());
    for row in x.chunks(h) {
        for blk in row.chunks(block) {
            let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if amax == 0.0 { 1.0 } else { amax / 448.0 };
            scales.push(scale);
            q.extend(blk.iter().map(|v| round(Elem::Fp8E4m3, v / scale)));
        }
    }
    (q, scales)
}

#[test]
fn quantize_dequantize_fp8() {
    let mut rng = Rng::new(12);
    for dt in DTYPES {
        for (t, h) in [(3usize, 300usize), (2, 128), (4, 5), (1, 257)] {
            let nb = h.div_ceil(128);
            let mut x = rounded(dt, &rng.vec(t * h, -10.0, 10.0));
            // An all-zero block (scale 1) and a block with one large value.
            if h >= 256 {
                x[128..256].fill(0.0);
            }
            x[0] = round(dt, 1000.0);
            let c = [("dtype", code(dt)), ("hidden", h as i64), ("block", 128)];
            let quant = kernel(Kind::QuantizeFp8, &c);
            let mut bufs = vec![
                Buf::f(dt, &x),
                Buf::out(Elem::Fp8E4m3, t * h),
                Buf::out(Elem::F32, t * nb),
            ];
            launch(&quant, &mut bufs, t as u64).unwrap();
            let (want_q, want_s) = quantize_ref(&x, h, 128);
            assert_same("q", &bufs[1].floats(Elem::Fp8E4m3), &want_q);
            assert_same("scales", &bufs[2].floats(Elem::F32), &want_s);
            if h >= 256 {
                assert_eq!(bufs[2].floats(Elem::F32)[1], 1.0);
            }

            let dequant = kernel(Kind::DequantizeFp8, &c);
            let mut back = vec![
                Buf::In(bufs[1].bytes().to_vec()),
                Buf::In(bufs[2].bytes().to_vec()),
                Buf::out(dt, t * h),
            ];
            launch(&dequant, &mut back, t as u64).unwrap();
            let y = back[2].floats(dt);
            let want_y: Vec<f32> = want_q
                .iter()
                .enumerate()
                .map(|(i, q)| round(dt, q * want_s[(i / h) * nb + (i % h) / 128]))
                .collect();
            assert_same("dequantized", &y, &want_y);
            // Round-trip error per block is at most 2^-4 of the block's amax.
            for (r, (xr, yr)) in x.chunks(h).zip(y.chunks(h)).enumerate() {
                for (b, (xb, yb)) in xr.chunks(128).zip(yr.chunks(128)).enumerate() {
                    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (a, b2) in xb.iter().zip(yb) {
                        assert!(
                            (a - b2).abs() <= amax / 16.0,
                            "row {r} block {b}: {a} -> {b2} (amax {amax})"
                        );
                    }
                }
            }
        }
    }
}

fn act_ref(act: i64, clamped: bool, limit: f32, gate: f32, up: f32) -> f32 {
    match act {
        0 if clamped => {
            let g = gate.min(limit);
            let u = up.min(limit).max(-limit);
            (u + 1.0) * g * sigmoid(g * 1.702)
        }
        0 => gate * sigmoid(gate) * up,
        1 => up * 0.5 * (libm::erff(up / std::f32::consts::SQRT_2) + 1.0),
        2 => {
            let c = (2.0f64 / std::f64::consts::PI).sqrt() as f32;
            let inner = (up * up * up * 0.044715 + up) * c;
            up * 0.5 * (libm::tanhf(inner) + 1.0)
        }
        _ => {
            if up < 0.0 {
                0.0
            } else {
                up
            }
        }
    }
}

#[test]
fn every_activation() {
    let mut rng = Rng::new(13);
    let cases = [(0, false), (0, true), (1, false), (2, false), (3, false)];
    for (act, clamped) in cases {
        for (in_dt, dt) in [
            (Elem::F32, Elem::F32),
            (Elem::Bf16, Elem::Bf16),
            (Elem::F16, Elem::F16),
            (Elem::F32, Elem::Bf16),
        ] {
            for (t, f) in [(3, 6), (2, 17)] {
                let gated = act == 0;
                let width = if gated { 2 * f } else { f };
                let mut x = rounded(in_dt, &rng.vec(t * width, -12.0, 12.0));
                x[0] = -0.0;
                let limit = 7.0f32;
                let mut c = vec![
                    ("dtype", code(dt)),
                    ("in_dtype", code(in_dt)),
                    ("ffn", f as i64),
                    ("gated", i64::from(gated)),
                    ("act", act),
                ];
                if clamped {
                    c.push(("clamped", 1));
                }
                let kern = kernel(Kind::Activation, &c);
                let mut bufs = vec![Buf::f(in_dt, &x), Buf::out(dt, t * f), Buf::F32(limit)];
                launch(&kern, &mut bufs, t as u64).unwrap();
                let mut want = Vec::new();
                for row in x.chunks(width) {
                    for i in 0..f {
                        let (gate, up) = if gated {
                            (row[i], row[f + i])
                        } else {
                            (0.0, row[i])
                        };
                        want.push(round(dt, act_ref(act, clamped, limit, gate, up)));
                    }
                }
                assert_same(
                    &format!("act {act} clamped {clamped} {in_dt:?}->{dt:?}"),
                    &bufs[1].floats(dt),
                    &want,
                );
            }
        }
    }
}

#[test]
fn clamped_swiglu_clamps_at_the_limit() {
    let kern = kernel(
        Kind::Activation,
        &[("dtype", 0), ("ffn", 3), ("clamped", 1)],
    );
    // gate | up
    let x = [20.0, -20.0, 1.0, 20.0, -20.0, 0.5];
    let mut bufs = vec![Buf::f(Elem::F32, &x), Buf::out(Elem::F32, 3), Buf::F32(7.0)];
    launch(&kern, &mut bufs, 1).unwrap();
    let want = [
        (7.0f32 + 1.0) * 7.0 * sigmoid(7.0 * 1.702),
        (-7.0f32 + 1.0) * -20.0 * sigmoid(-20.0 * 1.702),
        (0.5f32 + 1.0) * 1.0 * sigmoid(1.702),
    ];
    assert_same("clamped", &bufs[1].floats(Elem::F32), &want);
}

#[test]
fn relu_keeps_nan_and_negative_zero() {
    let kern = kernel(
        Kind::Activation,
        &[("dtype", 0), ("ffn", 4), ("act", 3), ("gated", 0)],
    );
    let mut bufs = vec![
        Buf::f(Elem::F32, &[f32::NAN, -0.0, -1.0, 2.0]),
        Buf::out(Elem::F32, 4),
        Buf::F32(0.0),
    ];
    launch(&kern, &mut bufs, 1).unwrap();
    let y = bufs[1].floats(Elem::F32);
    assert!(y[0].is_nan());
    assert_eq!(y[1].to_bits(), (-0.0f32).to_bits());
    assert_eq!(&y[2..], &[0.0, 2.0]);
}

#[test]
fn unpermute_gives_zero_rows_for_dropped_slots() {
    let mut rng = Rng::new(14);
    for dt in DTYPES {
        for (t, h, k) in [(3, 5, 2), (2, 8, 4)] {
            let rows = t * k + 2;
            let combined = rounded(dt, &rng.vec(rows * h, -2.0, 2.0));
            let s = slots(&mut rng, t, k, 3);
            let kern = kernel(
                Kind::Unpermute,
                &[
                    ("dtype", code(dt)),
                    ("hidden", h as i64),
                    ("top_k", k as i64),
                ],
            );
            let mut bufs = vec![
                Buf::f(dt, &combined),
                Buf::i(&s),
                Buf::out_with(dt, &vec![9.0; t * k * h]),
            ];
            launch(&kern, &mut bufs, t as u64).unwrap();
            let want: Vec<f32> = s
                .iter()
                .flat_map(|&slot| {
                    let combined = &combined;
                    (0..h).map(move |i| {
                        if slot < 0 {
                            0.0
                        } else {
                            combined[slot as usize * h + i]
                        }
                    })
                })
                .collect();
            assert_same("unpermuted", &bufs[2].floats(dt), &want);
        }
    }
}

#[test]
fn weighted_sum_and_the_fused_unpermute_weighted_sum_agree() {
    let mut rng = Rng::new(15);
    for dt in DTYPES {
        for (t, h, k) in [(3, 5, 2), (4, 8, 4), (2, 3, 1)] {
            for on_input in [false, true] {
                let rows = t * k;
                let combined = rounded(dt, &rng.vec(rows * h, -2.0, 2.0));
                let s = slots(&mut rng, t, k, 3);
                let w = rng.vec(t * k, 0.0, 1.0);
                let c = [
                    ("dtype", code(dt)),
                    ("hidden", h as i64),
                    ("top_k", k as i64),
                    ("rows", rows as i64),
                    ("weight_on_input", i64::from(on_input)),
                ];
                // Reference: f32 accumulation from 0 in slot order.
                let mut want = Vec::new();
                for tok in 0..t {
                    for i in 0..h {
                        let mut acc = 0.0f32;
                        for j in 0..k {
                            let slot = s[tok * k + j];
                            if slot < 0 {
                                continue;
                            }
                            let v = combined[slot as usize * h + i];
                            acc += if on_input { v } else { w[tok * k + j] * v };
                        }
                        want.push(round(dt, acc));
                    }
                }
                let fused = kernel(Kind::UnpermuteWeightedSum, &c);
                let mut bufs = vec![
                    Buf::f(dt, &combined),
                    Buf::i(&s),
                    Buf::f(Elem::F32, &w),
                    Buf::out(dt, t * h),
                ];
                launch(&fused, &mut bufs, t as u64).unwrap();
                assert_same("unpermute_weighted_sum", &bufs[3].floats(dt), &want);

                // unpermute then weighted_sum: the dropped rows are zeros and
                // add nothing (0 + w * 0 keeps every partial sum).
                let mut un = vec![Buf::f(dt, &combined), Buf::i(&s), Buf::out(dt, t * k * h)];
                launch(&kernel(Kind::Unpermute, &c), &mut un, t as u64).unwrap();
                let mut ws = vec![
                    Buf::In(un[2].bytes().to_vec()),
                    Buf::f(Elem::F32, &w),
                    Buf::out(dt, t * h),
                ];
                launch(&kernel(Kind::WeightedSum, &c), &mut ws, t as u64).unwrap();
                assert_same("weighted_sum", &ws[2].floats(dt), &want);
            }
        }
    }
}

#[test]
fn shared_gate_scales_y_by_the_sigmoid_of_a_dot() {
    let mut rng = Rng::new(16);
    for dt in DTYPES {
        for (t, h) in [(3, 7), (2, 64)] {
            let x = rounded(dt, &rng.vec(t * h, -1.0, 1.0));
            let y = rounded(dt, &rng.vec(t * h, -3.0, 3.0));
            let w = rng.vec(h, -0.5, 0.5);
            let kern = kernel(
                Kind::SharedGate,
                &[("dtype", code(dt)), ("hidden", h as i64)],
            );
            let mut bufs = vec![Buf::f(dt, &x), Buf::out_with(dt, &y), Buf::f(Elem::F32, &w)];
            launch(&kern, &mut bufs, t as u64).unwrap();
            let mut want = Vec::new();
            for (xr, yr) in x.chunks(h).zip(y.chunks(h)) {
                let dot = xr.iter().zip(&w).fold(0.0f32, |a, (x, w)| a + x * w);
                let g = sigmoid(dot);
                want.extend(yr.iter().map(|v| round(dt, v * g)));
            }
            assert_same("y", &bufs[1].floats(dt), &want);
        }
    }
}

#[test]
fn add_rounds_the_f32_sum_once() {
    let mut rng = Rng::new(17);
    for dt in DTYPES {
        for (t, h) in [(1, 1), (3, 10), (5, 33)] {
            let a = rounded(dt, &rng.vec(t * h, -5.0, 5.0));
            let b = rounded(dt, &rng.vec(t * h, -5.0, 5.0));
            let kern = kernel(Kind::Add, &[("dtype", code(dt)), ("hidden", h as i64)]);
            let mut bufs = vec![Buf::f(dt, &a), Buf::f(dt, &b), Buf::out(dt, t * h)];
            launch(&kern, &mut bufs, t as u64).unwrap();
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| round(dt, x + y)).collect();
            assert_same("out", &bufs[2].floats(dt), &want);
        }
    }
}

#[test]
fn gemm_store_adds_the_bias_in_f32_and_rounds_once() {
    let mut rng = Rng::new(23);
    for dt in DTYPES {
        for (t, h) in [(1, 1), (4, 9), (3, 40)] {
            let acc = rng.vec(t * h, -5.0, 5.0);
            let bias = rng.vec(h, -1.0, 1.0);
            for with_bias in [0, 1] {
                let kern = kernel(
                    Kind::GemmStore,
                    &[
                        ("dtype", code(dt)),
                        ("hidden", h as i64),
                        ("bias", with_bias),
                    ],
                );
                let b = if with_bias == 1 {
                    bias.clone()
                } else {
                    Vec::new()
                };
                let mut bufs = vec![
                    Buf::f(Elem::F32, &acc),
                    Buf::f(Elem::F32, &b),
                    Buf::out(dt, t * h),
                ];
                launch(&kern, &mut bufs, t as u64).unwrap();
                let want: Vec<f32> = acc
                    .iter()
                    .enumerate()
                    .map(|(i, x)| round(dt, if with_bias == 1 { x + bias[i % h] } else { *x }))
                    .collect();
                assert_same("out", &bufs[2].floats(dt), &want);
            }
        }
    }
}

#[test]
fn every_kind_describes_a_checked_kernel_named_after_it() {
    let all = [
        ("dtype", 1),
        ("hidden", 64),
        ("experts", 16),
        ("top_k", 4),
        ("groups", 4),
        ("groups_kept", 2),
        ("scoring", 1),
        ("selection_bias", 1),
        ("normalize", 1),
        ("ffn", 32),
        ("gated", 1),
        ("block", 128),
        ("rows", 64),
    ];
    for kind in Kind::ALL {
        let k = describe(kind, &consts(&all)).unwrap();
        check(&k).unwrap();
        assert_eq!(k.name, kind.name());
        assert_eq!(Kind::from_name(kind.name()), Some(kind));
        // Printing covers every statement of the description.
        assert!(k
            .to_string()
            .starts_with(&format!("kernel {}(", kind.name())));
    }
}

#[test]
fn missing_and_invalid_constants_are_named() {
    let missing = |kind: Kind, c: &[(&str, i64)], name: &str| match describe(kind, &consts(c)) {
        Err(e @ DescribeError::Missing { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains(kind.name()) && msg.contains(&format!("`{name}`")),
                "{msg}"
            );
        }
        other => panic!("{kind}: expected `{name}` missing, got {other:?}"),
    };
    missing(Kind::Add, &[("dtype", 1)], "hidden");
    missing(Kind::Add, &[("hidden", 8)], "dtype");
    missing(Kind::Permute, &[("dtype", 1), ("hidden", 8)], "top_k");
    missing(Kind::QuantizeFp8, &[("dtype", 1), ("hidden", 8)], "block");
    missing(Kind::Activation, &[("dtype", 1)], "ffn");
    missing(
        Kind::Activation,
        &[("dtype", 1), ("ffn", 8), ("gated", 0)],
        "act",
    );
    missing(Kind::RouterFused, &[("top_k", 2)], "experts");
    missing(Kind::RouterTopk, &[("experts", 8)], "top_k");
    missing(
        Kind::RouterGroupSelect,
        &[("experts", 8), ("groups", 4)],
        "groups_kept",
    );

    let invalid = |kind: Kind, c: &[(&str, i64)], name: &str| match describe(kind, &consts(c)) {
        Err(DescribeError::Invalid { constant, .. }) if constant == name => {}
        other => panic!("{kind}: expected `{name}` invalid, got {other:?}"),
    };
    invalid(Kind::Add, &[("dtype", 3), ("hidden", 8)], "dtype");
    invalid(Kind::Add, &[("dtype", 1), ("hidden", 0)], "hidden");
    invalid(
        Kind::Add,
        &[("dtype", 1), ("hidden", 8), ("hidden", 9)],
        "hidden",
    );
    invalid(
        Kind::Activation,
        &[("dtype", 1), ("ffn", 8), ("in_dtype", 4)],
        "in_dtype",
    );
    invalid(
        Kind::Activation,
        &[
            ("dtype", 1),
            ("ffn", 8),
            ("act", 1),
            ("clamped", 1),
            ("gated", 0),
        ],
        "clamped",
    );
    invalid(
        Kind::Activation,
        &[("dtype", 1), ("ffn", 8), ("act", 1), ("gated", 1)],
        "gated",
    );
    invalid(
        Kind::Activation,
        &[("dtype", 1), ("ffn", 8), ("act", 4)],
        "act",
    );
    invalid(
        Kind::Permute,
        &[
            ("dtype", 1),
            ("hidden", 8),
            ("top_k", 2),
            ("weight_on_input", 2),
        ],
        "weight_on_input",
    );
    // The same value twice is fine.
    assert!(describe(
        Kind::Add,
        &consts(&[("dtype", 1), ("hidden", 8), ("hidden", 8)])
    )
    .is_ok());
    // A non-gated activation with an explicit act needs no `gated`.
    assert!(describe(
        Kind::Activation,
        &consts(&[("dtype", 1), ("ffn", 8), ("act", 2)])
    )
    .is_ok());
}
