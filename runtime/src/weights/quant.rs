//! Quantised checkpoints, dequantised exactly on the CPU as they are read.
//!
//! Two formats are shipped on the hub for the models moec runs:
//!
//! - **fp8 e4m3 with block scales** (DeepSeek-V3, Kimi-K2): a `Linear`'s
//!   `weight` is `F8_E4M3` `[out, in]` and a sibling `weight_scale_inv` (F32,
//!   or BF16) is `[ceil(out / 128), ceil(in / 128)]`, one scale per 128 x 128
//!   block (`quantization_config.weight_block_size = [128, 128]`). The value
//!   is `w[i][j] = fp8(q[i][j]) * s[i / 128][j / 128]`, computed in f32, as
//!   DeepSeek-V3's `inference/kernel.py` (`weight_dequant`) and transformers'
//!   `integrations/finegrained_fp8.py` compute it. fp8 e4m3 is OCP's "FN"
//!   variant (no infinities; `S.1111.111` is NaN), decoded by
//!   [`moec_kernels::scalar::fp8_e4m3_to_f32`].
//! - **MXFP4** (gpt-oss): a fused expert tensor `X` is stored as `X_blocks`
//!   (U8 `[E, out, in / 32, 16]`: 32 e2m1 values per block, two per byte, the
//!   low nibble first) and `X_scales` (U8 `[E, out, in / 32]`: one e8m0 scale
//!   per block, the exponent biased by 127). The value is
//!   `FP4[nibble] * 2^(scale - 127)` with `FP4` the sixteen e2m1 values
//!   below, as transformers' `integrations/mxfp4.py`
//!   (`convert_moe_packed_tensors`) and the OCP Microscaling Formats (MX)
//!   v1.0 specification define it. Note the layout: blocks run along the
//!   input dimension, so a dequantised expert is `[out, in]`, where the bf16
//!   fused tensor is stored input-major `[in, out]` (transformers transposes
//!   after dequantising). The e8m0 code 0xFF is NaN and is refused.
//!
//! Every product here is exact or rounded once in f32 (a power of two times
//! an e2m1 value is exact unless it underflows below f32's subnormals; an fp8
//! value times an f32 scale is one f32 multiplication), so the values equal
//! what the reference implementations produce in f32 before they round to
//! the model's dtype.

use moec_kernels::scalar::fp8_e4m3_to_f32;

/// The side of a square block of fp8 weights that shares one scale.
pub(crate) const FP8_BLOCK: usize = 128;

/// Values per MXFP4 block, which share one e8m0 scale.
pub(crate) const MXFP4_BLOCK: usize = 32;

/// Bytes per MXFP4 block: 32 four-bit values.
pub(crate) const MXFP4_BLOCK_BYTES: usize = MXFP4_BLOCK / 2;

/// The e2m1 values by their 4-bit code: sign bit, two exponent bits, one
/// mantissa bit (OCP MX v1.0, table of FP4 E2M1).
const FP4_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The e8m0 bias: a scale byte `s` means `2^(s - 127)`.
const E8M0_BIAS: i32 = 127;

/// The e8m0 code that means NaN.
const E8M0_NAN: u8 = 0xff;

/// The scale grid of an fp8 weight `[rows, cols]`: `[ceil(rows/128), ceil(cols/128)]`.
pub(crate) fn fp8_scale_shape(rows: usize, cols: usize) -> [usize; 2] {
    [rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)]
}

/// Dequantises fp8 e4m3 bytes `[rows, cols]` with their block scales
/// `[ceil(rows/128), ceil(cols/128)]` (already checked to have that shape).
/// Returns the flat index of the first NaN code instead, if there is one.
pub(crate) fn dequant_fp8_blocks(
    codes: &[u8],
    scales: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, usize> {
    let scale_cols = cols.div_ceil(FP8_BLOCK);
    let mut out = Vec::with_capacity(codes.len());
    for (index, &code) in codes.iter().enumerate() {
        let (i, j) = (index / cols.max(1), index % cols.max(1));
        let q = fp8_e4m3_to_f32(code);
        if q.is_nan() {
            return Err(index);
        }
        let s = scales[(i / FP8_BLOCK) * scale_cols + j / FP8_BLOCK];
        out.push(q * s);
    }
    debug_assert_eq!(out.len(), rows * cols);
    Ok(out)
}

/// `2^e` as an `f32`, exact for every e8m0 exponent (`-127..=127`),
/// including the subnormal `2^-127`.
fn pow2(e: i32) -> f32 {
    if e >= -126 {
        f32::from_bits(((e + 127) as u32) << 23)
    } else {
        // 2^-127 is the subnormal with mantissa bit 22.
        f32::from_bits(1u32 << (e + 149))
    }
}

/// Dequantises MXFP4 `blocks` (16 bytes per block) with one e8m0 `scales`
/// byte per block, in order: block `b`'s 32 values are the low then high
/// nibble of each of its bytes, times `2^(scales[b] - 127)`. Returns the
/// index of the first NaN scale instead, if there is one.
pub(crate) fn dequant_mxfp4(blocks: &[u8], scales: &[u8]) -> Result<Vec<f32>, usize> {
    let mut out = Vec::with_capacity(blocks.len() * 2);
    for (b, (block, &scale)) in blocks
        .chunks_exact(MXFP4_BLOCK_BYTES)
        .zip(scales)
        .enumerate()
    {
        if scale == E8M0_NAN {
            return Err(b);
        }
        let factor = pow2(i32::from(scale) - E8M0_BIAS);
        for &byte in block {
            out.push(FP4_VALUES[usize::from(byte & 0x0f)] * factor);
            out.push(FP4_VALUES[usize::from(byte >> 4)] * factor);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_is_exact_over_the_e8m0_range() {
        for e in -127..=127 {
            assert_eq!(f64::from(pow2(e)), 2f64.powi(e), "2^{e}");
        }
    }

    #[test]
    fn mxfp4_decodes_low_nibble_first_with_the_block_scale() {
        // 0x21: low nibble 1 (0.5), high nibble 2 (1.0); scale 128 = 2^1.
        let mut block = vec![0u8; MXFP4_BLOCK_BYTES];
        block[0] = 0x21;
        block[1] = 0xf9; // low 9 (-0.5), high 15 (-6.0)
        let values = dequant_mxfp4(&block, &[128]).unwrap_or_default();
        assert_eq!(&values[..4], &[1.0, 2.0, -1.0, -12.0]);
        assert_eq!(values.len(), MXFP4_BLOCK);
        assert_eq!(dequant_mxfp4(&block, &[E8M0_NAN]), Err(0));
    }

    #[test]
    fn fp8_blocks_scale_by_their_block() {
        // 130 x 2: rows 0..128 use scale row 0, rows 128..130 scale row 1.
        let codes = vec![0x38u8; 260]; // 1.0 in e4m3
        let values = dequant_fp8_blocks(&codes, &[2.0, 3.0], 130, 2).unwrap_or_default();
        assert_eq!(values[0], 2.0);
        assert_eq!(values[2 * 127 + 1], 2.0);
        assert_eq!(values[2 * 128], 3.0);
        assert_eq!(fp8_scale_shape(130, 2), [2, 1]);
        let mut nan = codes.clone();
        nan[5] = 0x7f;
        assert_eq!(dequant_fp8_blocks(&nan, &[2.0, 3.0], 130, 2), Err(5));
    }
}
