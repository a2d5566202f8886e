//! The reducing combine's hierarchical legs (`cpu/hier.rs` has the routing):
//! the forwarder sums the partial rows of a token that its node's ranks
//! return before one row per (token, node) crosses the network, and the
//! source lays the per-node sums out so that `sum over ranks` adds each node
//! once.

use super::{is_by_rank, ExecError, StreamRun};
use crate::cpu::comm::{Comm, Run};
use crate::cpu::hier::{self, ByRankBlocks, PeerRows, Topology};
use crate::cpu::memory;
use crate::plan::{DType, Op};
use std::ops::Range;
use std::sync::Arc;

/// Byte runs of whole rows of `row_bytes` bytes.
fn row_runs(rows: &[Range<usize>], row_bytes: usize) -> Vec<Run> {
    rows.iter()
        .filter(|r| !r.is_empty())
        .map(|r| Run {
            offset: r.start * row_bytes,
            len: r.len() * row_bytes,
        })
        .collect()
}

/// Rows of `width` elements of `dtype`, read and written as f32.
struct Rows {
    dtype: DType,
    width: usize,
    row_bytes: usize,
}

impl Rows {
    fn sum_into(&self, src: &[u8], parts: &[usize], dst: &mut [u8], scratch: &mut Vec<f32>) {
        let mut acc = vec![0f32; self.width];
        scratch.resize(self.width, 0.0);
        for &p in parts {
            let row = &src[p * self.row_bytes..(p + 1) * self.row_bytes];
            memory::read_f32(row, self.dtype, scratch);
            for (a, v) in acc.iter_mut().zip(scratch.iter()) {
                *a += *v;
            }
        }
        memory::write_f32(&acc, self.dtype, dst);
    }
}

impl StreamRun<'_> {
    fn rows_of(&self, buffer: u32) -> Result<Rows, ExecError> {
        let buf = &self.backend.plan.buffers[buffer as usize];
        let width = buf.shape.get(1).copied().unwrap_or(0) as usize;
        if buf.dtype == DType::Fp8E4m3 || matches!(buf.dtype, DType::I32 | DType::U8) {
            return Err(ExecError::new(format!(
                "`{}`: the reducing combine sums rows of the layer's float dtype",
                buf.name
            )));
        }
        Ok(Rows {
            dtype: buf.dtype,
            width,
            row_bytes: width * buf.dtype.bytes() as usize,
        })
    }

    /// Exchanges whole rows of `send` with `group` into a host buffer of
    /// `len` rows (the legs sum or scatter them before they reach `recv`).
    #[allow(clippy::too_many_arguments)] // one exchange, spelled out
    fn exchange_rows(
        &self,
        comm: &dyn Comm,
        op: &Op,
        rows: &Rows,
        group: &[usize],
        send: u32,
        (to, from): (PeerRows, PeerRows),
        len: usize,
    ) -> Result<Vec<u8>, ExecError> {
        let mut got = vec![0u8; len * rows.row_bytes];
        let to = to.iter().map(|r| row_runs(r, rows.row_bytes)).collect();
        let from = from.iter().map(|r| row_runs(r, rows.row_bytes)).collect();
        // SAFETY: the plan's events give this op its send buffer to read.
        let data = unsafe { self.ctx.arena.bytes(self.backend.regions[send as usize]) };
        self.exchange(
            comm,
            op,
            (0, Some(rows.row_bytes)),
            group,
            (data, to),
            (&mut got, from),
        )?;
        Ok(got)
    }

    /// The staged routing the dispatch of this op's chunk left on this rank.
    fn staged_of(&self, op: &Op) -> Result<Arc<hier::Staged>, ExecError> {
        self.ctx
            .rank_staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&op.chunk.unwrap_or(0))
            .cloned()
            .ok_or_else(|| {
                ExecError::new("the reducing combine runs before the dispatch staged its rows")
            })
    }

    /// Intra-node leg: every expert rank sends its partial sums (one row per
    /// received token) to the forwarder at the token's source index; the
    /// forwarder adds a staged token's partials, in destination order, into
    /// one row of `recv` (by source node, then token, as staged).
    pub(super) fn combine_intra_reduce(
        &self,
        op: &Op,
        comm: &dyn Comm,
        topo: Topology,
        send: u32,
        recv: u32,
    ) -> Result<(), ExecError> {
        debug_assert!(is_by_rank(op));
        let b = self.backend;
        let me = self.me();
        let table = self.chunk_table(op.chunk)?;
        let table = table.get();
        let rows = self.rows_of(send)?;
        let legs = hier::combine_intra(&topo, &ByRankBlocks(table), me);
        let parts_len: usize = legs.1.iter().flatten().map(|r| r.end).max().unwrap_or(0);
        let parts = self.exchange_rows(comm, op, &rows, &topo.within(me), send, legs, parts_len)?;
        let staged = self.staged_of(op)?;
        let sums = hier::forwarder_parts(&topo, table, me, &staged).map_err(ExecError::new)?;
        // SAFETY: this op owns its receive buffer (plan events).
        let dst = unsafe { self.ctx.arena.bytes_mut(b.regions[recv as usize]) };
        if dst.len() < sums.len() * rows.row_bytes || sums.iter().flatten().any(|&p| p >= parts_len)
        {
            return Err(ExecError::new(format!(
                "`{}` is too small for the {} rows this rank forwards",
                b.plan.buffers[recv as usize].name,
                sums.len()
            )));
        }
        let mut scratch = Vec::new();
        for (k, list) in sums.iter().enumerate() {
            let out = &mut dst[k * rows.row_bytes..(k + 1) * rows.row_bytes];
            rows.sum_into(&parts, list, out, &mut scratch);
        }
        Ok(())
    }

    /// Inter-node leg: each forwarder returns a source's per-node sums (one
    /// row per token that went to its node); the source writes each into the
    /// by-rank row of the token's first rank on that node and zeroes its
    /// other ranks' rows there, so `sum over ranks` adds every node once.
    pub(super) fn combine_inter_by_rank(
        &self,
        op: &Op,
        comm: &dyn Comm,
        topo: Topology,
        send: u32,
        recv: u32,
    ) -> Result<(), ExecError> {
        let b = self.backend;
        let me = self.me();
        let rows = self.rows_of(send)?;
        let staged = self.staged_of(op)?;
        let placement = self.ctx.placement()?;
        let by_rank = placement
            .by_rank
            .as_ref()
            .ok_or_else(|| ExecError::new("a by-rank leg without by-rank routing"))?;
        let g = b.geo.group;
        let tokens = b.geo.chunk_range(op.chunk.unwrap_or(0) as usize);
        let rank_slots = by_rank
            .rank_slots
            .get(tokens.start * g..tokens.end * g)
            .ok_or_else(|| ExecError::new("the by-rank slots do not cover this chunk"))?;
        let landing = hier::node_sums_on_source(&topo, rank_slots);
        let to = staged.node_rows().into_iter().map(|r| vec![r]).collect();
        let mut at = 0;
        let from = landing
            .iter()
            .map(|list| {
                at += list.len();
                std::iter::once(at - list.len()..at).collect()
            })
            .collect();
        let sums = self.exchange_rows(comm, op, &rows, &topo.across(me), send, (to, from), at)?;
        // SAFETY: this op owns its receive buffer (plan events).
        let dst = unsafe { self.ctx.arena.bytes_mut(b.regions[recv as usize]) };
        let row = |r: usize| r * rows.row_bytes..(r + 1) * rows.row_bytes;
        let too_small = || {
            ExecError::new(format!(
                "`{}` is too small for this rank's by-rank rows",
                b.plan.buffers[recv as usize].name
            ))
        };
        let mut next = 0;
        for list in &landing {
            for (first, others) in list {
                dst.get_mut(row(*first))
                    .ok_or_else(too_small)?
                    .copy_from_slice(&sums[row(next)]);
                next += 1;
                for &o in others {
                    dst.get_mut(row(o)).ok_or_else(too_small)?.fill(0);
                }
            }
        }
        Ok(())
    }
}
