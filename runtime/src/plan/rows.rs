//! The row structure of a plan buffer, as every backend lays it out: a
//! `[rows, cols]` buffer holds its rows one after the other; an fp8 buffer
//! holds its data rows first, then each row's block scales (one f32 per 128
//! elements), so a run of rows is two byte runs.

use super::{Buffer, DType};
use crate::cpu::comm::Run;
use std::ops::Range;

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

    /// The byte runs of row ranges of the buffer `name` (fp8: the rows'
    /// scales after them), as both backends' collectives move them.
    pub fn runs(&self, rows: &[Range<usize>], name: &str) -> Result<Vec<Run>, String> {
        let size =
            |v: u64| usize::try_from(v).map_err(|_| format!("`{name}` does not fit this machine"));
        let row_bytes = size(self.row_bytes)?;
        let mut out = Vec::new();
        for r in rows {
            if r.end as u64 > self.rows {
                return Err(format!(
                    "routing needs rows {}..{} of `{name}`, which holds {} (buffer overflow)",
                    r.start, r.end, self.rows
                ));
            }
            if !r.is_empty() {
                out.push(Run {
                    offset: r.start * row_bytes,
                    len: r.len() * row_bytes,
                });
            }
        }
        if let Some((base, per_row)) = self.scales {
            let (base, per_row) = (size(base)?, size(per_row)?);
            for r in rows.iter().filter(|r| !r.is_empty()) {
                out.push(Run {
                    offset: base + r.start * per_row,
                    len: r.len() * per_row,
                });
            }
        }
        Ok(out)
    }
}
