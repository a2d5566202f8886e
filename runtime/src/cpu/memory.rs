//! Rank memory: one arena per rank, laid out exactly as the plan says.
//!
//! The executor honours the plan's arena offsets instead of giving every buffer
//! its own allocation: buffers whose lifetimes do not overlap share bytes, as
//! they will on a GPU, so a plan whose events do not order two users of the
//! same bytes produces wrong numbers here too, and the `--shuffle` race check
//! catches it.
//!
//! Several streams of one rank (threads) use the arena at once, each through
//! the buffers its current op names. That is the device memory model: the
//! plan's events, not Rust's borrow checker, keep two ops from touching the
//! same bytes concurrently. This module is the one place that turns arena
//! ranges into slices; its `unsafe` carries that contract.

use crate::plan::{Buffer, DType};
use std::cell::UnsafeCell;

/// A contiguous range of a rank's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: usize,
    pub bytes: usize,
}

/// One rank's activation memory.
pub struct Arena {
    /// `u64` words so every buffer offset that is a multiple of 8 is aligned
    /// for any element type.
    words: Box<[UnsafeCell<u64>]>,
}

// SAFETY: the arena is shared by the threads of one rank's streams; the plan's
// events order every pair of ops whose regions overlap (checked when the plan
// is loaded), so no two threads access the same bytes without a
// happens-before edge between them (events are mutex/condvar based).
unsafe impl Sync for Arena {}

impl Arena {
    pub fn new(bytes: usize) -> Arena {
        let words = bytes.div_ceil(8).max(1);
        Arena {
            words: (0..words).map(|_| UnsafeCell::new(0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.words.len() * 8
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn base(&self) -> *mut u8 {
        // UnsafeCell<u64> has the layout of u64; the boxed slice is contiguous.
        UnsafeCell::raw_get(self.words.as_ptr()).cast::<u8>()
    }

    /// The bytes of a region, for reading.
    ///
    /// # Safety
    /// No other thread may write these bytes while the slice lives (the plan's
    /// events guarantee it for the buffers an op names).
    pub unsafe fn bytes(&self, r: Region) -> &[u8] {
        debug_assert!(r.offset + r.bytes <= self.len());
        // SAFETY: the region lies inside the arena (checked when the buffer
        // table was built); the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.base().add(r.offset), r.bytes) }
    }

    /// The bytes of a region, for writing.
    ///
    /// # Safety
    /// No other thread may read or write these bytes while the slice lives, and
    /// the caller holds no other slice overlapping it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, r: Region) -> &mut [u8] {
        debug_assert!(r.offset + r.bytes <= self.len());
        // SAFETY: as for `bytes`, plus exclusivity guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(r.offset), r.bytes) }
    }

    /// A raw pointer to a region, for JIT kernels and the GEMM library.
    pub fn ptr(&self, r: Region) -> *mut u8 {
        // Pointer arithmetic inside the allocation: the region was bounds-checked.
        self.base().wrapping_add(r.offset)
    }
}

/// Where each plan buffer lives in the arena, checked once at load.
pub fn regions(buffers: &[Buffer], arena_bytes: u64) -> Result<Vec<Region>, String> {
    buffers
        .iter()
        .map(|b| {
            let end = b
                .offset
                .checked_add(b.bytes)
                .filter(|&e| e <= arena_bytes)
                .ok_or_else(|| {
                    format!(
                        "buffer `{}` ({} bytes at offset {}) lies outside the {}-byte arena",
                        b.name, b.bytes, b.offset, arena_bytes
                    )
                })?;
            let align = b.dtype.bytes().min(8);
            if b.offset % align != 0 {
                return Err(format!(
                    "buffer `{}` at offset {} is not aligned for {}",
                    b.name,
                    b.offset,
                    b.dtype.name()
                ));
            }
            let offset = usize::try_from(b.offset).map_err(|_| "arena too large".to_string())?;
            let bytes = usize::try_from(end - b.offset).map_err(|_| "buffer too large")?;
            Ok(Region { offset, bytes })
        })
        .collect()
}

/// Reads `count` elements of `dtype` from `bytes` as f32 (exact widening).
pub fn read_f32(bytes: &[u8], dtype: DType, out: &mut [f32]) {
    use moec_kernels::scalar;
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::Bf16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = scalar::bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = scalar::f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        DType::Fp8E4m3 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = scalar::fp8_e4m3_to_f32(b);
            }
        }
        DType::I32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        DType::U8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = f32::from(b);
            }
        }
    }
}

/// Writes f32 values into `bytes` as `dtype` (round to nearest even).
pub fn write_f32(values: &[f32], dtype: DType, bytes: &mut [u8]) {
    use moec_kernels::scalar;
    match dtype {
        DType::F32 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(4)) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        DType::Bf16 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(2)) {
                c.copy_from_slice(&scalar::f32_to_bf16(*v).to_le_bytes());
            }
        }
        DType::F16 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(2)) {
                c.copy_from_slice(&scalar::f32_to_f16(*v).to_le_bytes());
            }
        }
        DType::Fp8E4m3 => {
            for (v, b) in values.iter().zip(bytes.iter_mut()) {
                *b = scalar::f32_to_fp8_e4m3(*v);
            }
        }
        DType::I32 => {
            for (v, c) in values.iter().zip(bytes.chunks_exact_mut(4)) {
                c.copy_from_slice(&(*v as i32).to_le_bytes());
            }
        }
        DType::U8 => {
            for (v, b) in values.iter().zip(bytes.iter_mut()) {
                *b = *v as u8;
            }
        }
    }
}

pub fn read_i32s(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn write_i32s(values: &[i32], bytes: &mut [u8]) {
    for (v, c) in values.iter().zip(bytes.chunks_exact_mut(4)) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

pub fn write_f32s(values: &[f32], bytes: &mut [u8]) {
    for (v, c) in values.iter().zip(bytes.chunks_exact_mut(4)) {
        c.copy_from_slice(&v.to_le_bytes());
    }
}

pub fn read_f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// `bytes` seen as f32 values, when aligned (f32 storage read in place, with
/// no copy; little-endian hosts only, as every supported target is).
pub fn as_f32s(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: every bit pattern is a valid f32; `align_to` puts only
    // correctly aligned, in-bounds elements in the middle slice.
    let (head, mid, tail) = unsafe { bytes.align_to::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}

/// `bytes` seen as mutable f32 values, when aligned (see [`as_f32s`]).
pub fn as_f32s_mut(bytes: &mut [u8]) -> Option<&mut [f32]> {
    if cfg!(target_endian = "big") {
        return None;
    }
    // SAFETY: as for `as_f32s`; any f32 written is a valid byte pattern.
    let (head, mid, tail) = unsafe { bytes.align_to_mut::<f32>() };
    (head.is_empty() && tail.is_empty()).then_some(mid)
}
