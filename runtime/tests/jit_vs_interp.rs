//! Every kernel of the library, JIT-compiled with Cranelift, against the
//! reference interpreter: the same bytes out for the same bytes in.

#![allow(clippy::unwrap_used)]

use moec_kernels::interp;
use moec_kernels::ir::{Access, Arg, ParamKind, Ty};
use moec_kernels::library::{describe, Kind};
use moec_runtime::cpu::jit::JitKernel;

fn constants(kind: Kind, dtype: i64) -> Vec<(String, i64)> {
    let mut c: Vec<(&str, i64)> = vec![
        ("dtype", dtype),
        ("hidden", 40),
        ("top_k", 3),
        ("block", 128),
    ];
    match kind {
        Kind::RouterFused
        | Kind::RouterScores
        | Kind::RouterBias
        | Kind::RouterGroupSelect
        | Kind::RouterTopk
        | Kind::RouterNormalize
        | Kind::RouterScale => c.extend([
            ("experts", 12),
            ("groups", 4),
            ("groups_kept", 2),
            ("scoring", 1),
            ("selection_bias", 1),
            ("normalize", 1),
        ]),
        Kind::Activation => c.extend([("ffn", 24), ("act", 0), ("clamped", 1), ("gated", 1)]),
        _ => {}
    }
    c.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Deterministic pseudo-random bytes that decode to modest values.
fn fill(params: &[moec_kernels::ir::Param], rows: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    params
        .iter()
        .map(|p| match p.kind {
            ParamKind::Buffer { elem, .. } => {
                let n = rows * 256;
                if elem.value_ty() == Ty::I64 {
                    // Slots and ids: small non-negative indices, some -1 (dropped).
                    let v: Vec<i64> = (0..n).map(|i| ((i * 7) % 13) as i64 - 1).collect();
                    interp::encode_i64(elem, &v)
                } else {
                    let v: Vec<f32> = (0..n).map(|_| next() * 3.0).collect();
                    interp::encode_f32(elem, &v)
                }
            }
            ParamKind::Scalar(_) => Vec::new(),
        })
        .collect()
}

#[test]
fn jit_matches_the_interpreter_on_every_library_kernel() {
    for dtype in [0, 1] {
        for kind in Kind::ALL {
            let desc = describe(kind, &constants(kind, dtype)).unwrap();
            let jit = JitKernel::compile(&desc).unwrap();
            let rows = 5u64;
            let mut a = fill(&desc.params, rows as usize, 7);
            let mut b = a.clone();
            let ra = interp::run(&desc, &mut args(&desc.params, &mut a), rows);
            let rb = jit.launch(&mut args(&desc.params, &mut b), rows);
            assert!(ra.is_ok() && rb.is_ok(), "{kind:?}: {ra:?} vs {rb:?}");
            assert!(
                a == b,
                "{kind:?} (dtype {dtype}): JIT and interpreter disagree"
            );
        }
    }
}

fn args<'a>(params: &[moec_kernels::ir::Param], bufs: &'a mut [Vec<u8>]) -> Vec<Arg<'a>> {
    bufs.iter_mut()
        .zip(params)
        .map(|(bytes, p)| match p.kind {
            ParamKind::Buffer {
                access: Access::Read,
                ..
            } => Arg::Read(bytes),
            ParamKind::Buffer { .. } => Arg::Write(bytes),
            ParamKind::Scalar(Ty::F32) => Arg::F32(2.5),
            ParamKind::Scalar(_) => Arg::I64(3),
        })
        .collect()
}
