//! The routing table as the GPU leaves it, read back by the host.
//!
//! `assign_place` on the device writes, per token chunk, the group's routing
//! table `rows[c][s][g][l]` (the rows source `s` sends to local expert `l` of
//! EP rank `g`, as `i32`) and this rank's routing statistics into its
//! workspace; the executor copies them to the host once per pass, after
//! `assign_place` (see the book's CUDA chapter for what that host
//! synchronisation costs). [`RouteTable`] is the CPU backend's `ChunkTable`
//! (`cpu::layout`), so the collectives and grouped GEMMs of both backends
//! follow one layout contract, computed by one set of formulas.

use std::ops::Range;

/// The routing table of one chunk for the whole EP group: the CPU backend's
/// table (one set of formulas for both backends), with the questions only
/// the device's padded expert side asks added below.
pub use crate::cpu::layout::ChunkTable as RouteTable;

impl RouteTable {
    /// Send rows of source `s` for local expert `l` of rank `g` (token side).
    pub fn send_rows(&self, s: usize, g: usize, l: usize) -> Range<usize> {
        let start = self.send_start(s, g, l);
        start..start + self.rows(s, g, l)
    }

    /// Receive rows on rank `g` of the rows source `s` sends to local expert `l` (expert side).
    pub fn recv_rows(&self, s: usize, g: usize, l: usize) -> Range<usize> {
        let start = self.recv_start(s, g, l);
        start..start + self.rows(s, g, l)
    }

    /// By-rank send rows of source `s` for EP rank `g` (token side).
    pub fn rank_send_rows(&self, s: usize, g: usize) -> Range<usize> {
        let start = self.rank_send_start(s, g);
        start..start + self.rank_rows(s, g)
    }

    /// By-rank receive rows on rank `g` of the rows from source `s` (rank side).
    pub fn rank_recv_rows(&self, s: usize, g: usize) -> Range<usize> {
        let start = self.rank_recv_start(s, g);
        start..start + self.rank_rows(s, g)
    }

    /// First row of local expert `l` on rank `g` on the expert side: packed
    /// (`padded` 0), or its slot of `padded` rows.
    pub fn slot_start(&self, g: usize, l: usize, padded: usize) -> usize {
        if padded == 0 {
            self.expert_start(g, l)
        } else {
            l * padded
        }
    }

    /// [`RouteTable::recv_rows`] in the expert-side layout of `padded`.
    pub fn expert_side_rows(&self, s: usize, g: usize, l: usize, padded: usize) -> Range<usize> {
        let start =
            self.slot_start(g, l, padded) + (0..s).map(|s2| self.rows(s2, g, l)).sum::<usize>();
        start..start + self.rows(s, g, l)
    }
}

/// A chunk's per-pick blocks as the device lays its expert side out, for
/// the hierarchical legs (`cpu::hier`): local expert `l` of a rank starts at
/// its slot of `padded` rows in a capacity plan (graph-capturable: the
/// expert GEMMs' sizes do not depend on the routing), packed when `padded`
/// is 0, as on the CPU.
pub struct ExpertSide<'a> {
    pub table: &'a RouteTable,
    pub padded: usize,
}

impl crate::cpu::hier::Blocks for ExpertSide<'_> {
    fn max_local(&self) -> usize {
        self.table.max_local()
    }
    fn rows(&self, s: usize, g: usize, l: usize) -> usize {
        self.table.rows(s, g, l)
    }
    fn send_start(&self, s: usize, g: usize, l: usize) -> usize {
        self.table.send_start(s, g, l)
    }
    fn recv_start(&self, s: usize, g: usize, l: usize) -> usize {
        self.table.expert_side_rows(s, g, l, self.padded).start
    }
}

/// `i32` entries of one chunk's [`RouteTable::expand_frame`] for a group of
/// `group` ranks of `max_local` local experts.
pub fn expand_frame_len(group: usize, max_local: usize) -> usize {
    2 * group + 2 * group * max_local
}

impl RouteTable {
    /// What the device's `assign_expand` (`assign.cu`) needs of the table to
    /// lay out the by-rank rows rank `g` received: per source `s`, the first
    /// received row of its rows and their count
    /// ([`RouteTable::rank_recv_rows`]); then per (source `s`, local expert
    /// `l`), the first expert-side row and the count of the picks `s` sent
    /// to `l` ([`RouteTable::recv_rows`], packed). The formulas stay here,
    /// on the host, in one place; the kernel only walks the picks.
    pub fn expand_frame(&self, g: usize) -> Result<Vec<i32>, String> {
        let (group, lmax) = (self.group(), self.max_local());
        let mut frame = Vec::with_capacity(expand_frame_len(group, lmax));
        let mut push = |range: Range<usize>| -> Result<(), String> {
            for v in [range.start, range.len()] {
                frame.push(i32::try_from(v).map_err(|_| "by-rank rows overflow i32")?);
            }
            Ok(())
        };
        for s in 0..group {
            push(self.rank_recv_rows(s, g))?;
        }
        for s in 0..group {
            for l in 0..lmax {
                push(self.recv_rows(s, g, l))?;
            }
        }
        Ok(frame)
    }
}

/// What one rank's `assign_place` left: a table per chunk and its statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes {
    pub tables: Vec<RouteTable>,
    /// This rank's assignments per expert (before drops).
    pub routed_per_expert: Vec<u64>,
    /// This rank's assignments that capacity dropped.
    pub dropped: u64,
}

/// The shape of the routing data in a rank's workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteShape {
    pub chunks: usize,
    pub group: usize,
    pub max_local: usize,
    pub experts: usize,
}

impl RouteShape {
    /// `i32` entries of the tables (`chunks * group * group * max_local`).
    pub fn table_len(&self) -> usize {
        self.chunks * self.group * self.group * self.max_local
    }

    /// `i32` entries of the statistics (`experts` routed counts, then the dropped count).
    pub fn stats_len(&self) -> usize {
        self.experts + 1
    }

    /// Parses the tables and the statistics (`i32`, little-endian) as the
    /// device wrote them.
    pub fn parse(&self, table: &[u8], stats: &[u8]) -> Result<Routes, String> {
        let ints = |b: &[u8], n: usize, what: &str| -> Result<Vec<usize>, String> {
            if b.len() < n * 4 {
                return Err(format!("{what}: {} bytes, {n} values expected", b.len()));
            }
            b.chunks_exact(4)
                .take(n)
                .map(|c| {
                    let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    usize::try_from(v).map_err(|_| format!("{what}: a negative count {v}"))
                })
                .collect()
        };
        let counts = ints(table, self.table_len(), "the routing table")?;
        let stats = ints(stats, self.stats_len(), "the routing statistics")?;
        let per = self.group * self.group * self.max_local;
        let tables = (0..self.chunks)
            .map(|c| {
                RouteTable::new(
                    self.group,
                    self.max_local,
                    counts[c * per..(c + 1) * per].to_vec(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Routes {
            tables,
            routed_per_expert: stats[..self.experts].iter().map(|&v| v as u64).collect(),
            dropped: stats[self.experts] as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_follow_the_layout_contract() {
        // Two ranks, two local experts each; source-major counts.
        // s0 -> (g0: 1, 2), (g1: 0, 3); s1 -> (g0: 4, 0), (g1: 1, 1)
        let t = RouteTable::new(2, 2, vec![1, 2, 0, 3, 4, 0, 1, 1]).unwrap();
        assert_eq!(t.sent(0), 6);
        assert_eq!(t.send_start(0, 1, 1), 3);
        assert_eq!(t.received(0), 7);
        assert_eq!(t.expert_rows(0, 0), 5);
        assert_eq!(t.recv_start(1, 0, 0), 1);
        assert_eq!(t.recv_start(0, 0, 1), 5);
        assert_eq!(t.recv_rows(1, 1, 1), 4..5);
        assert_eq!(t.expert_side_rows(1, 1, 1, 0), 4..5);
        // Padded slots of 8 rows: local expert 1 of rank 1 starts at row 8.
        assert_eq!(t.expert_side_rows(1, 1, 1, 8), 11..12);
        assert_eq!(t.expert_side_rows(1, 0, 0, 8), 1..5);
        assert!(RouteTable::new(2, 2, vec![0; 7]).is_err());
    }

    #[test]
    fn the_expansion_frame_holds_the_receive_side_of_the_table() {
        // Per-pick counts as in the test above; no by-rank counts, so every
        // source's received by-rank rows are empty.
        let t = RouteTable::new(2, 2, vec![1, 2, 0, 3, 4, 0, 1, 1]).unwrap();
        let frame = t.expand_frame(1).unwrap();
        assert_eq!(frame.len(), expand_frame_len(2, 2));
        assert_eq!(&frame[..4], &[0, 0, 0, 0]);
        // (s, l) on rank 1: recv_rows(s, 1, l).
        let cells: Vec<(i32, i32)> = frame[4..].chunks(2).map(|c| (c[0], c[1])).collect();
        assert_eq!(cells, vec![(0, 0), (1, 3), (0, 1), (4, 1)]);
    }

    #[test]
    fn parsing_rejects_negative_counts_and_short_input() {
        let shape = RouteShape {
            chunks: 1,
            group: 1,
            max_local: 1,
            experts: 2,
        };
        let le = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let r = shape.parse(&le(&[3]), &le(&[2, 1, 0])).unwrap();
        assert_eq!(r.routed_per_expert, vec![2, 1]);
        assert_eq!(r.dropped, 0);
        assert!(shape.parse(&le(&[-1]), &le(&[0, 0, 0])).is_err());
        assert!(shape.parse(&le(&[1]), &le(&[0, 0])).is_err());
    }
}
