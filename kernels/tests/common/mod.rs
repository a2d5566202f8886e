//! Helpers shared by the integration tests: a small deterministic generator,
//! buffer encoding, and a launch helper over owned buffers.
#![allow(dead_code, clippy::unwrap_used)]

use moec_kernels::interp;
use moec_kernels::ir::{Arg, Elem, Kernel, LaunchError};
use moec_kernels::library::{describe, Kind};

/// xorshift64*: deterministic, dependency-free test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[lo, hi)`.
    pub fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(lo, hi)).collect()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The value `v` becomes when stored as `elem` and loaded back.
pub fn round(elem: Elem, v: f32) -> f32 {
    interp::decode_f32(elem, &interp::encode_f32(elem, &[v]))[0]
}

/// Rounds every value to `elem` (inputs are generated representable).
pub fn rounded(elem: Elem, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round(elem, x)).collect()
}

/// An owned launch argument.
pub enum Buf {
    In(Vec<u8>),
    Out(Vec<u8>),
    F32(f32),
    I64(i64),
}

impl Buf {
    pub fn f(elem: Elem, v: &[f32]) -> Buf {
        Buf::In(interp::encode_f32(elem, v))
    }
    pub fn i(v: &[i64]) -> Buf {
        Buf::In(interp::encode_i64(Elem::I32, v))
    }
    pub fn out(elem: Elem, n: usize) -> Buf {
        Buf::Out(vec![0; n * elem.bytes()])
    }
    pub fn out_with(elem: Elem, v: &[f32]) -> Buf {
        Buf::Out(interp::encode_f32(elem, v))
    }
    pub fn bytes(&self) -> &[u8] {
        match self {
            Buf::In(b) | Buf::Out(b) => b,
            _ => panic!("not a buffer"),
        }
    }
    pub fn floats(&self, elem: Elem) -> Vec<f32> {
        interp::decode_f32(elem, self.bytes())
    }
    pub fn ints(&self, elem: Elem) -> Vec<i64> {
        interp::decode_i64(elem, self.bytes())
    }
}

/// Runs `kernel` over `rows` rows with the owned arguments.
pub fn launch(kernel: &Kernel, bufs: &mut [Buf], rows: u64) -> Result<(), LaunchError> {
    let mut args: Vec<Arg<'_>> = bufs
        .iter_mut()
        .map(|b| match b {
            Buf::In(v) => Arg::Read(v.as_slice()),
            Buf::Out(v) => Arg::Write(v.as_mut_slice()),
            Buf::F32(v) => Arg::F32(*v),
            Buf::I64(v) => Arg::I64(*v),
        })
        .collect();
    interp::run(kernel, &mut args, rows)
}

/// `describe` with constants written as `&str` pairs.
pub fn kernel(kind: Kind, constants: &[(&str, i64)]) -> Kernel {
    describe(kind, &consts(constants)).unwrap_or_else(|e| panic!("{e}"))
}

pub fn consts(constants: &[(&str, i64)]) -> Vec<(String, i64)> {
    constants
        .iter()
        .map(|(n, v)| ((*n).to_string(), *v))
        .collect()
}

/// The dtype code of an activation element.
pub fn code(elem: Elem) -> i64 {
    match elem {
        Elem::F32 => 0,
        Elem::Bf16 => 1,
        Elem::F16 => 2,
        _ => panic!("not an activation dtype"),
    }
}

/// `1 / (1 + exp(-v))`, as the kernels compute it.
pub fn sigmoid(v: f32) -> f32 {
    1.0 / (libm::expf(-v) + 1.0)
}

/// Bitwise equality of two float slices (NaN equal to NaN), with the first
/// difference in the panic message.
pub fn assert_same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: got {g:?}, want {w:?}"
        );
    }
}
