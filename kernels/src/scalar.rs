//! The scalar semantics of the language, as plain functions.
//!
//! The interpreter calls these, and the Cranelift backend calls the very same
//! functions from generated code, so the two agree bit for bit. The CUDA
//! backend implements the same rounding with CUDA's intrinsics.

/// `bf16` bits to `f32` (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

/// `f32` to `bf16` bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// `f16` bits to `f32` (exact).
pub fn f16_to_f32(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

/// `f32` to `f16` bits, round to nearest even (overflow gives ±inf, NaN stays NaN).
pub fn f32_to_f16(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}

/// Largest finite fp8 e4m3 value.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// fp8 e4m3 (OCP "FN" variant: no infinities, `S.1111.111` is NaN) to `f32`.
pub fn fp8_e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let exp = (bits >> 3) & 0x0f;
    let man = bits & 0x07;
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: man/8 * 2^-6.
        f32::from(man) * (1.0 / 512.0)
    } else {
        (1.0 + f32::from(man) / 8.0) * pow2(i32::from(exp) - 7)
    };
    sign * magnitude
}

/// `f32` to fp8 e4m3, round to nearest even, saturating to ±448 (NaN stays NaN).
pub fn f32_to_fp8_e4m3(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7f;
    }
    let sign: u8 = if v.is_sign_negative() { 0x80 } else { 0 };
    let a = v.abs();
    if a >= FP8_E4M3_MAX {
        return sign | 0x7e;
    }
    // Below 2^-6 the format is subnormal with a fixed step of 2^-9.
    if a < pow2(-6) {
        let steps = round_half_even(a * 512.0);
        // steps can round up to 8, which is exactly the smallest normal (exp 1, man 0).
        return sign | steps as u8;
    }
    let e = a.log2().floor() as i32;
    // Guard against log2 rounding at exact powers of two.
    let e = if pow2(e) > a {
        e - 1
    } else if pow2(e + 1) <= a {
        e + 1
    } else {
        e
    };
    let step = pow2(e - 3);
    let q = round_half_even(a / step); // 8..=16
    let (e, q) = if q >= 16.0 { (e + 1, 8.0) } else { (e, q) };
    let exp_bits = (e + 7) as u8;
    let man_bits = (q as u8) - 8;
    let bits = (exp_bits << 3) | man_bits;
    // Rounding may reach 480 (S.1111.111 is NaN): saturate.
    if bits >= 0x7f {
        sign | 0x7e
    } else {
        sign | bits
    }
}

fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

fn round_half_even(v: f32) -> f32 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}

/// `min` that returns NaN when either operand is NaN.
pub fn fmin(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.min(b)
    }
}

/// `max` that returns NaN when either operand is NaN.
pub fn fmax(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

pub fn exp(v: f32) -> f32 {
    libm::expf(v)
}

pub fn log(v: f32) -> f32 {
    libm::logf(v)
}

pub fn sqrt(v: f32) -> f32 {
    v.sqrt()
}

pub fn tanh(v: f32) -> f32 {
    libm::tanhf(v)
}

pub fn erf(v: f32) -> f32 {
    libm::erff(v)
}

pub fn floor(v: f32) -> f32 {
    v.floor()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_round_trips_every_code() {
        for bits in 0u8..=255 {
            let v = fp8_e4m3_to_f32(bits);
            if v.is_nan() {
                assert_eq!(bits & 0x7f, 0x7f);
                continue;
            }
            let back = f32_to_fp8_e4m3(v);
            // +0 and -0 are distinct codes that round-trip.
            assert_eq!(back, bits, "code {bits:#04x} = {v}");
        }
    }

    #[test]
    fn fp8_rounds_to_nearest_even_and_saturates() {
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0625)), 1.0); // tie, even mantissa
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.1875)), 1.25); // tie, rounds up to even
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1000.0)), 448.0);
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(-1000.0)), -448.0);
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(470.0)), 448.0);
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(1.0 / 1024.0)), 0.0); // half the smallest step: even
        assert_eq!(fp8_e4m3_to_f32(f32_to_fp8_e4m3(3.0 / 1024.0)), 2.0 / 512.0);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(bf16_to_f32(f32_to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(
            bf16_to_f32(f32_to_bf16(1.0 + 3.0 / 256.0)),
            1.0 + 4.0 / 256.0
        );
    }

    #[test]
    fn min_max_propagate_nan() {
        assert!(fmin(f32::NAN, 1.0).is_nan());
        assert!(fmax(1.0, f32::NAN).is_nan());
        assert_eq!(fmin(1.0, 2.0), 1.0);
    }
}
