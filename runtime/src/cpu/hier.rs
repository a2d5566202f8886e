//! The hierarchical all-to-all (DeepEP's scheme) on top of the routing table.
//!
//! An EP group of `G = nodes × R` ranks: EP rank `q` sits on node `q / R` at
//! local index `q % R`. The receive buffer that the experts read, and the
//! `combined` buffer that the un-permute reads, are exactly those of the flat
//! all-to-all (the layout contract in `layout.rs`); only the path differs.
//!
//! Dispatch:
//! - **inter-node leg** (`send` → `node_stage`): rank `(m, i)` sends one copy
//!   of each token of the chunk to rank `(n, i)` of every node `n` that one
//!   of the token's kept assignments goes to (its own node included: that
//!   copy stays on the rank), together with the token's routing on that node:
//!   for each assignment, the destination's local index and its row in the
//!   destination's receive buffer. This routing travels beside the rows, as
//!   DeepEP sends `topk_idx` with the tokens, because the forwarder cannot
//!   derive it from the exchanged counts. `node_stage` holds the copies by
//!   source node, then token.
//! - **intra-node leg** (`node_stage` → `recv`): the forwarder sends each
//!   staged row to every rank of its node that one of the token's assignments
//!   goes to, at the receive row the routing names.
//!
//! Combine (nothing is summed on the way, as the cost model assumes):
//! - **intra-node leg** (`expert_out` → `node_sum`): each expert rank sends
//!   every output row back to the rank of its node at the source's local
//!   index. `node_sum` there holds, for each source node `m`, the source's
//!   send-order rows for the ranks of this node.
//! - **inter-node leg** (`node_sum` → `combined`): the forwarder sends each
//!   block back to its source, where it lands on the source's send rows for
//!   that node (contiguous, since send order starts with the destination).

use super::layout::ChunkTable;
use std::ops::Range;

/// The row blocks a leg routes by: per pick (the routing table itself: a
/// block per source, destination rank and local expert) or by rank
/// ([`ByRankBlocks`]: one block per source and destination rank).
pub trait Blocks {
    /// Blocks per (source, destination rank).
    fn max_local(&self) -> usize;
    /// Rows source `s` sends to block `l` of rank `g`.
    fn rows(&self, s: usize, g: usize, l: usize) -> usize;
    /// First send row of that block on the source.
    fn send_start(&self, s: usize, g: usize, l: usize) -> usize;
    /// First receive row of that block on rank `g`.
    fn recv_start(&self, s: usize, g: usize, l: usize) -> usize;
    /// Rows source `s` sends to rank `g`.
    fn to_rank(&self, s: usize, g: usize) -> usize {
        (0..self.max_local()).map(|l| self.rows(s, g, l)).sum()
    }
}

impl Blocks for ChunkTable {
    fn max_local(&self) -> usize {
        ChunkTable::max_local(self)
    }
    fn rows(&self, s: usize, g: usize, l: usize) -> usize {
        ChunkTable::rows(self, s, g, l)
    }
    fn send_start(&self, s: usize, g: usize, l: usize) -> usize {
        ChunkTable::send_start(self, s, g, l)
    }
    fn recv_start(&self, s: usize, g: usize, l: usize) -> usize {
        ChunkTable::recv_start(self, s, g, l)
    }
}

/// The by-rank layout of a table as [`Blocks`]: one block per (source,
/// destination rank), a row per token.
pub struct ByRankBlocks<'a>(pub &'a ChunkTable);

impl Blocks for ByRankBlocks<'_> {
    fn max_local(&self) -> usize {
        1
    }
    fn rows(&self, s: usize, g: usize, _: usize) -> usize {
        self.0.rank_rows(s, g)
    }
    fn send_start(&self, s: usize, g: usize, _: usize) -> usize {
        self.0.rank_send_start(s, g)
    }
    fn recv_start(&self, s: usize, g: usize, _: usize) -> usize {
        self.0.rank_recv_start(s, g)
    }
}

/// Nodes and ranks per node of one EP group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    pub per_node: usize,
    pub nodes: usize,
}

impl Topology {
    pub fn new(group: usize, gpus_per_node: usize) -> Result<Topology, String> {
        let per_node = group.min(gpus_per_node).max(1);
        if group % per_node != 0 {
            return Err(format!(
                "the hierarchical all-to-all needs whole nodes: an EP group of {group} ranks on nodes of {per_node}"
            ));
        }
        Ok(Topology {
            per_node,
            nodes: group / per_node,
        })
    }

    pub fn node(&self, q: usize) -> usize {
        q / self.per_node
    }

    pub fn index(&self, q: usize) -> usize {
        q % self.per_node
    }

    pub fn rank(&self, node: usize, index: usize) -> usize {
        node * self.per_node + index
    }

    /// The inter-node group of `q`: the ranks at its local index, in node order.
    pub fn across(&self, q: usize) -> Vec<usize> {
        (0..self.nodes)
            .map(|n| self.rank(n, self.index(q)))
            .collect()
    }

    /// The intra-node group of `q`: the ranks of its node, in index order.
    pub fn within(&self, q: usize) -> Vec<usize> {
        let n = self.node(q);
        (0..self.per_node).map(|j| self.rank(n, j)).collect()
    }

    /// Send rows of source `s` for the ranks of node `n` (contiguous).
    pub fn node_block(&self, table: &impl Blocks, s: usize, n: usize) -> Range<usize> {
        let start = table.send_start(s, self.rank(n, 0), 0);
        let len: usize = (0..self.per_node)
            .map(|j| table.to_rank(s, self.rank(n, j)))
            .sum();
        start..start + len
    }

    /// Row ranges of `node_sum` on forwarder `f`: one block per source node.
    fn combine_blocks(&self, table: &impl Blocks, f: usize) -> Vec<Range<usize>> {
        let (n, i) = (self.node(f), self.index(f));
        let mut at = 0;
        (0..self.nodes)
            .map(|m| {
                let len = self.node_block(table, self.rank(m, i), n).len();
                at += len;
                at - len..at
            })
            .collect()
    }
}

/// What a source sends over the inter-node leg, per destination node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterSend {
    /// Per node: one send row per token that goes there, in token order.
    pub rows: Vec<Vec<usize>>,
    /// Per node: each such token's routing there, `[count, (index, recv row) × count]`.
    pub routing: Vec<Vec<u32>>,
}

/// The inter-node leg of the dispatch, on source `me`: which rows go to which
/// node, deduplicated per token, with their routing. `slots` is the source's
/// `[T, k]` table of send rows; `tokens` the chunk's tokens.
pub fn dispatch_inter_send(
    topo: &Topology,
    table: &impl Blocks,
    me: usize,
    slots: &[i32],
    top_k: usize,
    tokens: Range<usize>,
) -> Result<InterSend, String> {
    let group = topo.nodes * topo.per_node;
    let lmax = table.max_local();
    // Send-order blocks (destination, local expert) of this source.
    let mut starts = Vec::with_capacity(group * lmax);
    let mut recv_starts = Vec::with_capacity(group * lmax);
    let mut total = 0;
    for p in 0..group {
        for l in 0..lmax {
            starts.push(total);
            recv_starts.push(table.recv_start(me, p, l));
            total += table.rows(me, p, l);
        }
    }
    let mut out = InterSend {
        rows: vec![Vec::new(); topo.nodes],
        routing: vec![Vec::new(); topo.nodes],
    };
    let mut assignments: Vec<(usize, usize, usize, u32, u32)> = Vec::with_capacity(top_k);
    for t in tokens {
        assignments.clear();
        for j in 0..top_k {
            let Some(&slot) = slots.get(t * top_k + j) else {
                return Err(format!("the slots table has no entry for token {t}"));
            };
            let Ok(row) = usize::try_from(slot) else {
                continue; // dropped by capacity
            };
            if row >= total {
                return Err(format!(
                    "slot {row} of token {t} lies beyond the {total} rows this rank sends"
                ));
            }
            let b = starts.partition_point(|&s| s <= row) - 1;
            let p = b / lmax;
            let recv = recv_starts[b] + (row - starts[b]);
            let recv = u32::try_from(recv).map_err(|_| "a receive row overflows u32")?;
            let index = u32::try_from(topo.index(p)).map_err(|_| "too many ranks per node")?;
            assignments.push((topo.node(p), j, row, index, recv));
        }
        // Stable: within a node, slot order.
        assignments.sort_by_key(|a| (a.0, a.1));
        let mut at = 0;
        while at < assignments.len() {
            let node = assignments[at].0;
            let end = at + assignments[at..].partition_point(|a| a.0 == node);
            out.rows[node].push(assignments[at].2);
            let routing = &mut out.routing[node];
            routing.push((end - at) as u32);
            for a in &assignments[at..end] {
                routing.push(a.3);
                routing.push(a.4);
            }
            at = end;
        }
    }
    Ok(out)
}

/// The routing of the rows staged on a forwarder: for each `node_stage` row,
/// the ranks of this node (local index) and receive rows it goes to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Staged {
    start: Vec<usize>,
    dests: Vec<(usize, usize)>,
    /// Staged rows per source node (they are stored by source node).
    counts: Vec<usize>,
}

impl Staged {
    /// Decodes the routing received from each source node (`counts[m]` rows
    /// and their encoded routing, concatenated in node order).
    pub fn decode(counts: &[usize], routing: &[u32], per_node: usize) -> Result<Staged, String> {
        let mut staged = Staged {
            start: vec![0],
            dests: Vec::new(),
            counts: counts.to_vec(),
        };
        let mut values = routing.iter().copied();
        let mut next = || {
            values
                .next()
                .ok_or_else(|| "the staged routing ends early".to_string())
        };
        for _ in 0..counts.iter().sum::<usize>() {
            let n = next()? as usize;
            if n == 0 {
                return Err("a staged token goes nowhere".into());
            }
            for _ in 0..n {
                let index = next()? as usize;
                let row = next()? as usize;
                if index >= per_node {
                    return Err(format!(
                        "a staged token goes to local index {index} of a {per_node}-rank node"
                    ));
                }
                staged.dests.push((index, row));
            }
            staged.start.push(staged.dests.len());
        }
        let left = values.count();
        if left != 0 {
            return Err(format!("{left} values of staged routing are left over"));
        }
        Ok(staged)
    }

    pub fn rows(&self) -> usize {
        self.start.len() - 1
    }

    /// The staged rows of each source node, in node order.
    pub fn node_rows(&self) -> Vec<Range<usize>> {
        let mut at = 0;
        self.counts
            .iter()
            .map(|&n| {
                at += n;
                at - n..at
            })
            .collect()
    }

    /// Per rank of the node: the staged rows to send, in the order of their
    /// receive rows there (as ranges of consecutive staged rows).
    pub fn sends(&self, per_node: usize) -> PeerRows {
        let mut per: Vec<Vec<(usize, usize)>> = vec![Vec::new(); per_node];
        for k in 0..self.rows() {
            for &(index, row) in &self.dests[self.start[k]..self.start[k + 1]] {
                per[index].push((row, k));
            }
        }
        per.into_iter()
            .map(|mut list| {
                list.sort_unstable();
                merge(list.into_iter().map(|(_, k)| k..k + 1))
            })
            .collect()
    }
}

/// Row ranges per peer of a group.
pub type PeerRows = Vec<Vec<Range<usize>>>;

/// Joins ranges that continue one another, keeping their order.
fn merge(ranges: impl IntoIterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges.into_iter().filter(|r| !r.is_empty()) {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

/// The intra-node leg of the dispatch on receiving rank `me`: per rank of its
/// node (a forwarder), the receive rows its rows fill, ascending.
pub fn dispatch_intra_recv(
    topo: &Topology,
    table: &impl Blocks,
    me: usize,
) -> Vec<Vec<Range<usize>>> {
    (0..topo.per_node)
        .map(|i| {
            let mut rows = Vec::new();
            for l in 0..table.max_local() {
                for m in 0..topo.nodes {
                    let s = topo.rank(m, i);
                    let start = table.recv_start(s, me, l);
                    rows.push(start..start + table.rows(s, me, l));
                }
            }
            merge(rows)
        })
        .collect()
}

/// The intra-node leg of the combine: per rank of the node, the rows expert
/// rank `me` sends it (from its expert output) and the rows forwarder `me`
/// receives from it (into `node_sum`), in matching order.
pub fn combine_intra(topo: &Topology, table: &impl Blocks, me: usize) -> (PeerRows, PeerRows) {
    let n = topo.node(me);
    let lmax = table.max_local();
    let to = (0..topo.per_node)
        .map(|i| {
            let mut rows = Vec::new();
            for m in 0..topo.nodes {
                let s = topo.rank(m, i);
                for l in 0..lmax {
                    let start = table.recv_start(s, me, l);
                    rows.push(start..start + table.rows(s, me, l));
                }
            }
            merge(rows)
        })
        .collect();
    let blocks = topo.combine_blocks(table, me);
    let i = topo.index(me);
    let from = (0..topo.per_node)
        .map(|j| {
            let p = topo.rank(n, j);
            let mut rows = Vec::new();
            for (m, block) in blocks.iter().enumerate() {
                let s = topo.rank(m, i);
                let first = topo.node_block(table, s, n).start;
                for l in 0..lmax {
                    let start = block.start + table.send_start(s, p, l) - first;
                    rows.push(start..start + table.rows(s, p, l));
                }
            }
            merge(rows)
        })
        .collect();
    (to, from)
}

/// The reducing combine's sum on forwarder `me`: for every staged row (by
/// source node, then token, as the dispatch staged them), the `node_sum` rows
/// holding the partial sums its destination ranks returned, in destination
/// order (`node_sum` as [`combine_intra`] lays it out over by-rank blocks).
pub fn forwarder_parts(
    topo: &Topology,
    table: &ChunkTable,
    me: usize,
    staged: &Staged,
) -> Result<Vec<Vec<usize>>, String> {
    let blocks = ByRankBlocks(table);
    let node_blocks = topo.combine_blocks(&blocks, me);
    let (n, i) = (topo.node(me), topo.index(me));
    let mut parts = Vec::with_capacity(staged.rows());
    let mut k = 0;
    for (m, &count) in staged.counts.iter().enumerate() {
        let s = topo.rank(m, i);
        let first = topo.node_block(&blocks, s, n).start;
        let block = node_blocks
            .get(m)
            .ok_or("the staged routing names more nodes than the group has")?;
        for _ in 0..count {
            let dests = &staged.dests[staged.start[k]..staged.start[k + 1]];
            let mut rows = Vec::with_capacity(dests.len());
            for &(j, r) in dests {
                let p = topo.rank(n, j);
                let pos = r
                    .checked_sub(table.rank_recv_start(s, p))
                    .filter(|&pos| pos < table.rank_rows(s, p))
                    .ok_or_else(|| {
                        format!("staged row {k} names row {r} of rank {p}, outside its block")
                    })?;
                rows.push(block.start + table.rank_send_start(s, p) - first + pos);
            }
            parts.push(rows);
            k += 1;
        }
    }
    Ok(parts)
}

/// Where the per-node partial sums land on source `me` after the reducing
/// combine's inter-node leg, in its by-rank `combined` buffer: per node, for
/// each token that went there (token order, as the node returns them), the
/// row that takes the node's sum (its first destination rank there) and the
/// rows of its other destination ranks there, which must read zero so that
/// the sum over ranks adds each node once. `rank_slots` holds the chunk's
/// tokens, `[tokens, G]`.
pub fn node_sums_on_source(topo: &Topology, rank_slots: &[i32]) -> Vec<Vec<(usize, Vec<usize>)>> {
    let group = topo.nodes * topo.per_node;
    let mut out = vec![Vec::new(); topo.nodes];
    for token in rank_slots.chunks_exact(group.max(1)) {
        for (n, list) in out.iter_mut().enumerate() {
            let rows: Vec<usize> = (0..topo.per_node)
                .filter_map(|j| usize::try_from(token[topo.rank(n, j)]).ok())
                .collect();
            if let Some((&first, rest)) = rows.split_first() {
                list.push((first, rest.to_vec()));
            }
        }
    }
    out
}

/// The inter-node leg of the combine: per node, the `node_sum` rows forwarder
/// `me` sends back, and the `combined` rows source `me` receives.
pub fn combine_inter(
    topo: &Topology,
    table: &impl Blocks,
    me: usize,
) -> (Vec<Range<usize>>, Vec<Range<usize>>) {
    let to = topo.combine_blocks(table, me);
    let from = (0..topo.nodes)
        .map(|n| topo.node_block(table, me, n))
        .collect();
    (to, from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::layout::{assign_count, assign_place, Geometry, Placement, Routing};

    /// Sends the rows of `src` named by `out` (a sequence of row ranges) into
    /// the rows of `dst` named by `inc`, one row after the other.
    fn pour<T: Copy>(src: &[T], out: &[Range<usize>], dst: &mut [T], inc: &[Range<usize>]) {
        let sent: Vec<T> = out.iter().flat_map(|r| src[r.clone()].to_vec()).collect();
        let slots: Vec<usize> = inc.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(sent.len(), slots.len(), "rows sent and expected differ");
        for (v, at) in sent.into_iter().zip(slots) {
            dst[at] = v;
        }
    }

    /// Two nodes of four ranks, 16 experts, top-2, random routing: both
    /// hierarchical legs of the dispatch and of the combine move every row
    /// exactly where the flat all-to-all puts it.
    #[test]
    #[allow(clippy::needless_range_loop)] // ranks index several tables at once
    fn hierarchical_legs_reproduce_the_flat_all_to_all() {
        let (group, experts, tokens, k) = (8, 16, 10, 2);
        let geo = Geometry::uniform(group, experts, tokens, 1);
        let topo = Topology::new(group, 4).unwrap();
        let mut seed = 12345u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        let ids: Vec<Vec<i32>> = (0..group)
            .map(|_| {
                (0..tokens)
                    .flat_map(|_| {
                        let a = next() % experts;
                        let b = (a + 1 + next() % (experts - 1)) % experts;
                        [a as i32, b as i32]
                    })
                    .collect()
            })
            .collect();
        let weights = vec![0.5f32; tokens * k];
        let metas: Vec<i32> = ids
            .iter()
            .flat_map(|ids| {
                let r = Routing {
                    ids,
                    weights: &weights,
                };
                assign_count(&geo, 0, &r).unwrap()
            })
            .collect();
        let places: Vec<Placement> = (0..group)
            .map(|q| {
                let r = Routing {
                    ids: &ids[q],
                    weights: &weights,
                };
                assign_place(&geo, q, &r, &metas).unwrap()
            })
            .collect();
        let table = &places[0].tables[0];
        // Send buffers: row r of source s holds (s, token of r).
        let send: Vec<Vec<(usize, usize)>> = (0..group)
            .map(|s| {
                let mut rows = vec![(usize::MAX, usize::MAX); table.sent(s)];
                for (a, &slot) in places[s].slots.iter().enumerate() {
                    rows[slot as usize] = (s, a / k);
                }
                rows
            })
            .collect();
        // The flat dispatch.
        let lmax = table.max_local();
        let mut flat: Vec<Vec<(usize, usize)>> = (0..group)
            .map(|p| vec![(9, 9); table.received(p)])
            .collect();
        for s in 0..group {
            for p in 0..group {
                for l in 0..lmax {
                    let (a, b) = (table.send_start(s, p, l), table.recv_start(s, p, l));
                    for r in 0..table.rows(s, p, l) {
                        flat[p][b + r] = send[s][a + r];
                    }
                }
            }
        }
        // The hierarchical dispatch: inter-node leg, then intra-node leg.
        let sends: Vec<InterSend> = (0..group)
            .map(|s| dispatch_inter_send(&topo, table, s, &places[s].slots, k, 0..tokens).unwrap())
            .collect();
        let mut hier: Vec<Vec<(usize, usize)>> = (0..group)
            .map(|p| vec![(7, 7); table.received(p)])
            .collect();
        for f in 0..group {
            let (n, i) = (topo.node(f), topo.index(f));
            let sources: Vec<usize> = (0..topo.nodes).map(|m| topo.rank(m, i)).collect();
            let counts: Vec<usize> = sources.iter().map(|&s| sends[s].rows[n].len()).collect();
            let routing: Vec<u32> = sources
                .iter()
                .flat_map(|&s| sends[s].routing[n].clone())
                .collect();
            let stage: Vec<(usize, usize)> = sources
                .iter()
                .flat_map(|&s| {
                    sends[s].rows[n]
                        .iter()
                        .map(|&r| send[s][r])
                        .collect::<Vec<_>>()
                })
                .collect();
            let staged = Staged::decode(&counts, &routing, topo.per_node).unwrap();
            assert_eq!(staged.rows(), stage.len());
            for (j, out) in staged.sends(topo.per_node).iter().enumerate() {
                let p = topo.rank(n, j);
                let inc = &dispatch_intra_recv(&topo, table, p)[i];
                pour(&stage, out, &mut hier[p], inc);
            }
        }
        assert_eq!(hier, flat, "hierarchical dispatch");
        // The combine: expert row r of rank p holds (p, r).
        let expert_out: Vec<Vec<(usize, usize)>> = (0..group)
            .map(|p| (0..table.received(p)).map(|r| (p, r)).collect())
            .collect();
        let mut flat_back: Vec<Vec<(usize, usize)>> =
            (0..group).map(|s| vec![(9, 9); table.sent(s)]).collect();
        for s in 0..group {
            for p in 0..group {
                for l in 0..lmax {
                    let (a, b) = (table.send_start(s, p, l), table.recv_start(s, p, l));
                    for r in 0..table.rows(s, p, l) {
                        flat_back[s][a + r] = expert_out[p][b + r];
                    }
                }
            }
        }
        let mut node_sum: Vec<Vec<(usize, usize)>> = (0..group)
            .map(|_| vec![(7, 7); tokens * k * topo.nodes])
            .collect();
        for p in 0..group {
            let (to, _) = combine_intra(&topo, table, p);
            for (i, out) in to.iter().enumerate() {
                let f = topo.rank(topo.node(p), i);
                let (_, from) = combine_intra(&topo, table, f);
                pour(&expert_out[p], out, &mut node_sum[f], &from[topo.index(p)]);
            }
        }
        let mut back: Vec<Vec<(usize, usize)>> =
            (0..group).map(|s| vec![(7, 7); table.sent(s)]).collect();
        for f in 0..group {
            let (to, _) = combine_inter(&topo, table, f);
            for (m, out) in to.iter().enumerate() {
                let s = topo.rank(m, topo.index(f));
                let (_, from) = combine_inter(&topo, table, s);
                let inc = &from[topo.node(f)];
                pour(
                    &node_sum[f],
                    std::slice::from_ref(out),
                    &mut back[s],
                    std::slice::from_ref(inc),
                );
            }
        }
        assert_eq!(back, flat_back, "hierarchical combine");
    }

    #[test]
    fn topology_of_two_nodes() {
        let t = Topology::new(8, 4).unwrap();
        assert_eq!((t.nodes, t.per_node), (2, 4));
        assert_eq!(t.across(5), vec![1, 5]);
        assert_eq!(t.within(5), vec![4, 5, 6, 7]);
        assert!(Topology::new(6, 4).is_err());
    }

    #[test]
    fn staged_routing_round_trips_and_rejects_garbage() {
        // Two tokens from node 0, one from node 1.
        let routing = [2, 1, 7, 3, 2, 1, 0, 0, 1, 2, 5];
        let s = Staged::decode(&[2, 1], &routing, 4).unwrap();
        assert_eq!(s.rows(), 3);
        let sends = s.sends(4);
        assert_eq!(sends[0], vec![1..2]);
        assert_eq!(sends[1], vec![0..1]);
        assert_eq!(sends[2], vec![2..3]);
        assert_eq!(sends[3], vec![0..1]);
        assert!(Staged::decode(&[4], &routing, 4).is_err());
        assert!(Staged::decode(&[2], &routing, 4).is_err());
        assert!(Staged::decode(&[2, 1], &routing[..10], 4).is_err());
        assert!(Staged::decode(&[1], &[1, 9, 0], 4).is_err());
    }
}
