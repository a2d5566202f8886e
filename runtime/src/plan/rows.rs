//! The row structure of a plan buffer, as every backend lays it out: a
//! `[rows, cols]` buffer holds its rows one after the other; an fp8 buffer
//! holds its data rows first, then each row's block scales (one f32 per 128
//! elements), so a run of rows is two byte runs.

use super::{Buffer, DType};

/// Rows of a 2-D buffer (a 1-D buffer is a column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowLayout {
    pub rows: u64,
    /// Bytes of one row's data.
    pub row_bytes: u64,
    /// Byte offset of the scales area and bytes of one row's scales (fp8).
    pub scales: Option<(u64, u64)>,
}

impl RowLayout {
    pub fn of(b: &Buffer) -> Result<RowLayout, String> {
        let (rows, cols) = match b.shape.as_slice() {
            [r, c] => (*r, *c),
            [n] => (*n, 1),
            _ => return Err(format!("`{}` is not a matrix", b.name)),
        };
        let row_bytes = cols.saturating_mul(b.dtype.bytes());
        let scales = (b.dtype == DType::Fp8E4m3)
            .then(|| (rows.saturating_mul(cols), cols.div_ceil(128) * 4));
        Ok(RowLayout {
            rows,
            row_bytes,
            scales,
        })
    }

    /// Bytes one row occupies in all (fp8: its data and its scales).
    pub fn bytes_per_row(&self) -> u64 {
        self.row_bytes + self.scales.map_or(0, |(_, per_row)| per_row)
    }
}
