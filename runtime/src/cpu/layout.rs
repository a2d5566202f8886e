//! Where every routed row goes: the assignment kernels and the routing table.
//!
//! The layout contract (also in the book, runtime/layouts.md), per EP group of
//! `G` ranks and per token chunk `c`:
//!
//! - A rank's **send** buffer of chunk `c` holds its kept assignments ordered by
//!   destination EP rank, then the destination's local expert index, then
//!   token, then slot. `slots[t, j]` is the row of assignment `(t, j)` in the
//!   send buffer of `t`'s chunk, or `-1` when capacity dropped it.
//! - A rank's **receive** buffer of chunk `c` holds the rows for its local
//!   experts ordered by local expert, then source rank, then the source's send
//!   order, so each local expert's rows are contiguous for the grouped GEMM.
//! - The combine is the exact reverse: expert outputs travel back into the
//!   source's `combined` buffer at the same rows as its send buffer, so
//!   `slots` also indexes the combine.
//!
//! With **dispatch by rank** (`choices.dedup_dispatch`), a token travels once
//! per destination EP rank instead of once per assignment:
//!
//! - The **by-rank send** buffer of chunk `c` holds one row per (token,
//!   destination rank), ordered by destination, then token. `rank_slots[t, g]`
//!   is the row of token `t` for rank `g`, or `-1`. Beside each row travels
//!   its metadata row (`2k` i32): the destination's local expert index of
//!   each kept pick `j` that lands there (or `-1`), then the `k` weights as
//!   f32 bits. A row exists for every destination rank one of the token's
//!   picks maps to, before capacity drops (a row whose picks were all dropped
//!   travels with `-1`s: the counts are exchanged before drops are known).
//! - The **by-rank receive** buffer holds the rows from every source, ordered
//!   by source, then the source's send order.
//! - The receiver expands the rows into the expert-side layout above (the
//!   same rows the per-assignment dispatch delivers), from the metadata and
//!   the table ([`expand_index`]); the reducing combine sums a received row's
//!   expert outputs back into one row, which returns by the reverse by-rank
//!   all-to-all and is summed over destination ranks on the source.
//!
//! Every rank of the group derives the same table from the exchanged
//! assignment metadata (per-chunk, per-expert counts; or, for `drop = probs`,
//! every assignment's expert and weight), so no host ever learns a count: the
//! table lives in rank memory beside `slots`, written by `assign_place` and
//! read by the collectives and the grouped GEMMs that the plan orders after it.

use crate::plan::arena::RowNeed;
use crate::plan::{CapacityConfig, DropPolicy, Plan};
use std::ops::Range;

/// The fixed shape of routing on one rank: who holds which expert, chunk
/// boundaries, capacity.
#[derive(Clone, Debug)]
pub struct Geometry {
    pub tokens: usize,
    pub top_k: usize,
    pub experts: usize,
    pub chunks: usize,
    pub chunk_tokens: usize,
    /// Ranks of one EP group.
    pub group: usize,
    /// `experts_of[g]`: the experts EP rank `g` holds, in local-index order.
    pub experts_of: Vec<Vec<usize>>,
    /// `copies[e]`: the EP ranks holding expert `e`, ascending.
    copies: Vec<Vec<usize>>,
    /// `local_index[g][e]`: the local index of expert `e` on EP rank `g`.
    local_index: Vec<Vec<Option<usize>>>,
    pub capacity: Option<(usize, DropPolicy)>,
    /// Tokens travel once per destination rank (`choices.dedup_dispatch`):
    /// the exchange also carries per-rank row counts.
    pub by_rank: bool,
}

impl Geometry {
    pub fn new(plan: &Plan) -> Result<Geometry, String> {
        let l = &plan.layer;
        let m = &plan.mesh;
        let to = |v: u64, what: &str| {
            usize::try_from(v).map_err(|_| format!("{what} {v} does not fit this machine"))
        };
        let tokens = to(l.tokens_per_rank, "tokens per rank")?;
        let experts = to(l.experts, "experts")?;
        let top_k = to(l.router.top_k, "top_k")?;
        let chunks = to(plan.choices.chunks.max(1), "chunks")?;
        let chunk_tokens = to(plan.choices.chunk_tokens.max(1), "chunk tokens")?;
        if chunk_tokens.checked_mul(chunks).is_none_or(|c| c < tokens) {
            return Err(format!(
                "{chunks} chunks of {chunk_tokens} tokens do not cover {tokens} tokens"
            ));
        }
        if m.etp != 1 {
            return Err(format!(
                "the CPU backend does not run expert tensor parallelism yet (etp = {})",
                m.etp
            ));
        }
        let group = to(m.ep.max(1), "ep")?;
        if m.experts_of_ep_rank.len() != group {
            return Err(format!(
                "the placement lists {} EP ranks, the mesh has ep = {group}",
                m.experts_of_ep_rank.len()
            ));
        }
        let mut copies = vec![Vec::new(); experts];
        let mut local_index = vec![vec![None; experts]; group];
        let mut experts_of = Vec::with_capacity(group);
        for (g, list) in m.experts_of_ep_rank.iter().enumerate() {
            let mut mine = Vec::with_capacity(list.len());
            for (i, &e) in list.iter().enumerate() {
                let e = to(e, "expert")?;
                if e >= experts {
                    return Err(format!("EP rank {g} holds expert {e} of {experts}"));
                }
                if local_index[g][e].is_some() {
                    return Err(format!("EP rank {g} holds expert {e} twice"));
                }
                local_index[g][e] = Some(i);
                copies[e].push(g);
                mine.push(e);
            }
            experts_of.push(mine);
        }
        if let Some(e) = copies.iter().position(Vec::is_empty) {
            return Err(format!("no EP rank holds expert {e}"));
        }
        let capacity = match l.capacity {
            CapacityConfig::Dropless => None,
            CapacityConfig::Limited { slots, drop, .. } => Some((to(slots, "capacity")?, drop)),
        };
        Ok(Geometry {
            tokens,
            top_k,
            experts,
            chunks,
            chunk_tokens,
            group,
            experts_of,
            copies,
            local_index,
            capacity,
            by_rank: plan.choices.dedup_dispatch || plan.choices.reduce_combine,
        })
    }

    /// Tokens of chunk `c`.
    pub fn chunk_range(&self, c: usize) -> Range<usize> {
        let start = (c * self.chunk_tokens).min(self.tokens);
        let end = ((c + 1) * self.chunk_tokens).min(self.tokens);
        start..end
    }

    pub fn chunk_of(&self, t: usize) -> usize {
        t / self.chunk_tokens
    }

    /// The EP rank and local index that source EP rank `src` sends expert `e`
    /// to: replicas are shared out by source rank.
    pub fn dest(&self, src: usize, e: usize) -> (usize, usize) {
        let copies = &self.copies[e];
        let g = copies[src % copies.len()];
        (g, self.local_index[g][e].unwrap_or(0))
    }

    pub fn local_experts(&self, g: usize) -> usize {
        self.experts_of[g].len()
    }

    /// Metadata elements one rank contributes to the exchange: every
    /// assignment (`drop = probs`), or the per-chunk counts per expert, then
    /// (dispatch by rank) per destination rank.
    pub fn meta_len(&self) -> usize {
        match self.capacity {
            Some((_, DropPolicy::Probs)) => self.tokens * 2 * self.top_k,
            _ => self.chunks * (self.experts + self.rank_counts()),
        }
    }

    /// Per-chunk destination-rank counts in the exchanged metadata.
    fn rank_counts(&self) -> usize {
        if self.by_rank {
            self.group
        } else {
            0
        }
    }

    /// Metadata elements of one by-rank row: `k` local expert indices, then
    /// `k` weights (f32 bits).
    pub fn rank_meta_cols(&self) -> usize {
        crate::plan::by_rank_pick_cols(self.top_k as u64) as usize
    }

    /// Calls `f(g)` once for every distinct destination EP rank `g` of token
    /// `t`'s picks (source `src`), in order of first pick.
    fn for_each_rank(&self, src: usize, ids: &[i32], t: usize, mut f: impl FnMut(usize)) {
        let k = self.top_k;
        for j in 0..k {
            let (g, _) = self.dest(src, ids[t * k + j] as usize);
            if !(0..j).any(|j2| self.dest(src, ids[t * k + j2] as usize).0 == g) {
                f(g);
            }
        }
    }
}

/// Routing of one rank's tokens: expert ids `[T, k]` and weights `[T, k]`.
pub struct Routing<'a> {
    pub ids: &'a [i32],
    pub weights: &'a [f32],
}

/// `assign_count`: this rank's (EP index `me`) metadata for the exchange.
pub fn assign_count(geo: &Geometry, me: usize, routing: &Routing<'_>) -> Result<Vec<i32>, String> {
    check_ids(geo, routing)?;
    let k = geo.top_k;
    match geo.capacity {
        Some((_, DropPolicy::Probs)) => {
            let mut meta = vec![0i32; geo.meta_len()];
            for t in 0..geo.tokens {
                for j in 0..k {
                    meta[t * 2 * k + j] = routing.ids[t * k + j];
                    meta[t * 2 * k + k + j] = routing.weights[t * k + j].to_bits() as i32;
                }
            }
            Ok(meta)
        }
        _ => {
            let mut meta = vec![0i32; geo.meta_len()];
            let per_chunk = geo.experts + geo.rank_counts();
            for t in 0..geo.tokens {
                let c = geo.chunk_of(t);
                for j in 0..k {
                    let e = routing.ids[t * k + j] as usize;
                    meta[c * per_chunk + e] += 1;
                }
                if geo.by_rank {
                    geo.for_each_rank(me, routing.ids, t, |g| {
                        meta[c * per_chunk + geo.experts + g] += 1;
                    });
                }
            }
            Ok(meta)
        }
    }
}

fn check_ids(geo: &Geometry, routing: &Routing<'_>) -> Result<(), String> {
    let n = geo.tokens * geo.top_k;
    if routing.ids.len() < n || routing.weights.len() < n {
        return Err("routing buffers are smaller than tokens x top_k".into());
    }
    if let Some(bad) = routing.ids[..n]
        .iter()
        .find(|&&e| e < 0 || e as usize >= geo.experts)
    {
        return Err(format!(
            "the router produced expert id {bad}, outside 0..{}",
            geo.experts
        ));
    }
    if let Some(w) = routing.weights[..n].iter().find(|w| !w.is_finite()) {
        return Err(format!("the router produced a non-finite weight {w}"));
    }
    Ok(())
}

/// The routing table of one chunk for the whole EP group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTable {
    /// `rows[(s * group + g) * max_local + l]`: kept rows source `s` sends to
    /// local expert `l` of EP rank `g`.
    rows: Vec<usize>,
    group: usize,
    max_local: usize,
    /// Dispatch by rank: `rank_rows[s * group + g]`, the rows (tokens) source
    /// `s` sends to EP rank `g`; empty otherwise.
    rank_rows: Vec<usize>,
}

impl ChunkTable {
    fn zeroed(group: usize, max_local: usize) -> ChunkTable {
        ChunkTable {
            rows: vec![0; group * group * max_local],
            group,
            max_local,
            rank_rows: Vec::new(),
        }
    }

    /// A table from its counts (`group * group * max_local` of them, in
    /// `(s, g, l)` order), as the device leaves them (`cuda::route`).
    pub fn new(group: usize, max_local: usize, rows: Vec<usize>) -> Result<ChunkTable, String> {
        if rows.len() != group * group * max_local {
            return Err(format!(
                "a routing table of {} entries for {group} ranks of {max_local} local experts",
                rows.len()
            ));
        }
        Ok(ChunkTable {
            rows,
            group,
            max_local,
            rank_rows: Vec::new(),
        })
    }

    /// By-rank rows source `s` sends to EP rank `g` (0 without dispatch by rank).
    pub fn rank_rows(&self, s: usize, g: usize) -> usize {
        self.rank_rows.get(s * self.group + g).copied().unwrap_or(0)
    }

    /// First by-rank send row of source `s` for EP rank `g`.
    pub fn rank_send_start(&self, s: usize, g: usize) -> usize {
        (0..g).map(|g2| self.rank_rows(s, g2)).sum()
    }

    /// First by-rank receive row on rank `g` of the rows from source `s`.
    pub fn rank_recv_start(&self, s: usize, g: usize) -> usize {
        (0..s).map(|s2| self.rank_rows(s2, g)).sum()
    }

    /// By-rank rows source `s` sends in all.
    pub fn rank_sent(&self, s: usize) -> usize {
        (0..self.group).map(|g| self.rank_rows(s, g)).sum()
    }

    /// By-rank rows rank `g` receives in all.
    pub fn rank_received(&self, g: usize) -> usize {
        (0..self.group).map(|s| self.rank_rows(s, g)).sum()
    }

    fn at(&mut self, s: usize, g: usize, l: usize) -> &mut usize {
        &mut self.rows[(s * self.group + g) * self.max_local + l]
    }

    pub fn rows(&self, s: usize, g: usize, l: usize) -> usize {
        self.rows[(s * self.group + g) * self.max_local + l]
    }

    /// Rows source `s` sends to EP rank `g` (all local experts).
    pub fn to_rank(&self, s: usize, g: usize) -> usize {
        (0..self.max_local).map(|l| self.rows(s, g, l)).sum()
    }

    /// First send row of source `s` for local expert `l` of rank `g`.
    pub fn send_start(&self, s: usize, g: usize, l: usize) -> usize {
        let before: usize = (0..g).map(|g2| self.to_rank(s, g2)).sum();
        before + (0..l).map(|l2| self.rows(s, g, l2)).sum::<usize>()
    }

    /// Rows local expert `l` of rank `g` receives from all sources.
    pub fn expert_rows(&self, g: usize, l: usize) -> usize {
        (0..self.group).map(|s| self.rows(s, g, l)).sum()
    }

    /// First receive row of local expert `l` on rank `g`.
    pub fn expert_start(&self, g: usize, l: usize) -> usize {
        (0..l).map(|l2| self.expert_rows(g, l2)).sum()
    }

    /// First receive row on rank `g` of the rows source `s` sends to local expert `l`.
    pub fn recv_start(&self, s: usize, g: usize, l: usize) -> usize {
        self.expert_start(g, l) + (0..s).map(|s2| self.rows(s2, g, l)).sum::<usize>()
    }

    /// Rows rank `g` receives in all.
    pub fn received(&self, g: usize) -> usize {
        (0..self.max_local).map(|l| self.expert_rows(g, l)).sum()
    }

    /// Rows source `s` sends in all.
    pub fn sent(&self, s: usize) -> usize {
        (0..self.group).map(|g| self.to_rank(s, g)).sum()
    }

    /// Ranks of the EP group.
    pub fn group(&self) -> usize {
        self.group
    }

    pub fn max_local(&self) -> usize {
        self.max_local
    }
}

/// What `assign_place` leaves in rank memory.
#[derive(Clone, Debug)]
pub struct Placement {
    /// `[T, k]`: send row of each assignment in its chunk, `-1` when dropped.
    pub slots: Vec<i32>,
    /// One table per chunk.
    pub tables: Vec<ChunkTable>,
    /// This rank's assignments per expert (before drops).
    pub routed_per_expert: Vec<u64>,
    /// This rank's assignments that capacity dropped.
    pub dropped: u64,
    /// Dispatch by rank: this rank's by-rank send layout.
    pub by_rank: Option<ByRank>,
}

impl Placement {
    /// The rows the group's routing needs in one rank's bounded buffers:
    /// the most expert-side rows and by-rank rows any rank receives in any
    /// chunk (every rank of the group computes the same).
    pub fn row_need(&self) -> RowNeed {
        row_need(&self.tables)
    }
}

/// The rows the routing of `tables` (one per chunk) needs in one rank's
/// bounded buffers: the most expert-side rows and by-rank rows any rank of
/// the group receives in any chunk. Both backends test it against the
/// plan's bounds before any row moves.
pub fn row_need(tables: &[ChunkTable]) -> RowNeed {
    let mut need = RowNeed::default();
    for t in tables {
        for g in 0..t.group() {
            need = need.max(RowNeed {
                expert_rows: t.received(g) as u64,
                rank_rows: t.rank_received(g) as u64,
            });
        }
    }
    need
}

/// This rank's side of a dispatch by rank.
#[derive(Clone, Debug)]
pub struct ByRank {
    /// `[T, G]`: the by-rank send row of token `t` for EP rank `g` in its
    /// chunk, `-1` when none of its picks lands there.
    pub rank_slots: Vec<i32>,
    /// Per chunk, the metadata rows beside the send rows (`[rows, 2k]`).
    pub meta: Vec<Vec<i32>>,
}

/// `assign_place`: slots for this rank (EP index `me`) and the group's routing
/// tables, from every group member's metadata (`meta_all`, EP-rank-major).
pub fn assign_place(
    geo: &Geometry,
    me: usize,
    routing: &Routing<'_>,
    meta_all: &[i32],
) -> Result<Placement, String> {
    check_ids(geo, routing)?;
    let per = geo.meta_len();
    if meta_all.len() < per * geo.group {
        return Err(format!(
            "assignment metadata holds {} values, {} ranks need {}",
            meta_all.len(),
            geo.group,
            per * geo.group
        ));
    }
    let k = geo.top_k;
    let e_count = geo.experts;
    let max_local = geo
        .experts_of
        .iter()
        .map(Vec::len)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut tables = vec![ChunkTable::zeroed(geo.group, max_local); geo.chunks];
    // kept[t * k + j] for this rank's own assignments.
    let mut kept = vec![true; geo.tokens * k];

    match geo.capacity {
        Some((cap, DropPolicy::Probs)) => {
            // Rank every assignment of the group per expert: weight descending,
            // then global order (source rank, token, slot).
            let mut per_expert: Vec<Vec<(f32, usize, usize, usize)>> = vec![Vec::new(); e_count];
            for s in 0..geo.group {
                let meta = &meta_all[s * per..(s + 1) * per];
                for t in 0..geo.tokens {
                    for j in 0..k {
                        let e = meta[t * 2 * k + j];
                        let w = f32::from_bits(meta[t * 2 * k + k + j] as u32);
                        if e < 0 || e as usize >= e_count || !w.is_finite() {
                            return Err(format!(
                                "corrupt routing metadata from EP rank {s}: expert {e}, weight {w}"
                            ));
                        }
                        per_expert[e as usize].push((w, s, t, j));
                    }
                }
            }
            for (e, list) in per_expert.iter_mut().enumerate() {
                list.sort_by(|a, b| {
                    b.0.total_cmp(&a.0)
                        .then(a.1.cmp(&b.1))
                        .then(a.2.cmp(&b.2))
                        .then(a.3.cmp(&b.3))
                });
                for (rank, &(_, s, t, j)) in list.iter().enumerate() {
                    let keep = rank < cap;
                    if s == me && !keep {
                        kept[t * k + j] = false;
                    }
                    if keep {
                        let (g, l) = geo.dest(s, e);
                        *tables[geo.chunk_of(t)].at(s, g, l) += 1;
                    }
                }
            }
        }
        capacity => {
            // Counts per (source, chunk, expert); position drops keep the first
            // `cap` assignments of each expert in (source, chunk, token) order.
            let mut before = vec![0usize; e_count];
            let per_chunk = e_count + geo.rank_counts();
            for s in 0..geo.group {
                for (c, table) in tables.iter_mut().enumerate() {
                    let base = s * per + c * per_chunk;
                    let counts = &meta_all[base..base + e_count];
                    for (e, &n) in counts.iter().enumerate() {
                        let n = usize::try_from(n).map_err(|_| {
                            format!("corrupt assignment count {n} from EP rank {s}")
                        })?;
                        let keep = match capacity {
                            Some((cap, _)) => n.min(cap.saturating_sub(before[e])),
                            None => n,
                        };
                        if s == me && keep < n {
                            // Drop this chunk's assignments to `e` after the first `keep`.
                            let mut seen = 0;
                            for t in geo.chunk_range(c) {
                                for j in 0..k {
                                    if routing.ids[t * k + j] as usize == e {
                                        if seen >= keep {
                                            kept[t * k + j] = false;
                                        }
                                        seen += 1;
                                    }
                                }
                            }
                        }
                        before[e] += n;
                        let (g, l) = geo.dest(s, e);
                        *table.at(s, g, l) += keep;
                    }
                }
            }
        }
    }

    if geo.by_rank {
        rank_counts(geo, meta_all, &mut tables)?;
    }

    // Own slots: send order (destination rank, local expert, token, slot).
    let mut slots = vec![-1i32; geo.tokens * k];
    let mut routed_per_expert = vec![0u64; e_count];
    let mut dropped = 0u64;
    for (c, table) in tables.iter().enumerate() {
        let mut cursor: Vec<usize> = Vec::with_capacity(geo.group * max_local);
        for g in 0..geo.group {
            for l in 0..max_local {
                cursor.push(table.send_start(me, g, l));
            }
        }
        for t in geo.chunk_range(c) {
            for j in 0..k {
                let e = routing.ids[t * k + j] as usize;
                routed_per_expert[e] += 1;
                if !kept[t * k + j] {
                    dropped += 1;
                    continue;
                }
                let (g, l) = geo.dest(me, e);
                let row = &mut cursor[g * max_local + l];
                slots[t * k + j] = i32::try_from(*row).map_err(|_| "send row overflows i32")?;
                *row += 1;
            }
        }
        // The metadata must agree with this rank's own routing.
        for g in 0..geo.group {
            for l in 0..max_local {
                let end = table.send_start(me, g, l) + table.rows(me, g, l);
                if cursor[g * max_local + l] != end {
                    return Err(format!(
                        "the exchanged counts disagree with this rank's routing (chunk {c}, EP rank {g}, local expert {l})"
                    ));
                }
            }
        }
    }
    let by_rank = if geo.by_rank {
        Some(rank_rows_of(geo, me, routing, &slots, &tables)?)
    } else {
        None
    };
    Ok(Placement {
        slots,
        tables,
        routed_per_expert,
        dropped,
        by_rank,
    })
}

/// Fills every table's by-rank counts: exchanged per chunk (counts), or
/// derived from every source's gathered routing (`drop = probs`).
fn rank_counts(geo: &Geometry, meta_all: &[i32], tables: &mut [ChunkTable]) -> Result<(), String> {
    let per = geo.meta_len();
    for table in tables.iter_mut() {
        table.rank_rows = vec![0; geo.group * geo.group];
    }
    for s in 0..geo.group {
        let meta = &meta_all[s * per..(s + 1) * per];
        match geo.capacity {
            Some((_, DropPolicy::Probs)) => {
                let k = geo.top_k;
                let mut ids = vec![0i32; geo.tokens * k];
                for t in 0..geo.tokens {
                    ids[t * k..(t + 1) * k].copy_from_slice(&meta[t * 2 * k..t * 2 * k + k]);
                }
                for t in 0..geo.tokens {
                    let table = &mut tables[geo.chunk_of(t)];
                    geo.for_each_rank(s, &ids, t, |g| table.rank_rows[s * geo.group + g] += 1);
                }
            }
            _ => {
                let per_chunk = geo.experts + geo.group;
                for (c, table) in tables.iter_mut().enumerate() {
                    for g in 0..geo.group {
                        let n = meta[c * per_chunk + geo.experts + g];
                        table.rank_rows[s * geo.group + g] = usize::try_from(n).map_err(|_| {
                            format!("corrupt by-rank row count {n} from EP rank {s}")
                        })?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// This rank's by-rank send layout ([`ByRank`]) from its routing, its slots
/// (`-1` marks a dropped pick) and the group's tables.
fn rank_rows_of(
    geo: &Geometry,
    me: usize,
    routing: &Routing<'_>,
    slots: &[i32],
    tables: &[ChunkTable],
) -> Result<ByRank, String> {
    let (k, group) = (geo.top_k, geo.group);
    let cols = geo.rank_meta_cols();
    if geo.chunk_tokens.saturating_mul(group) > i32::MAX as usize {
        return Err("by-rank send rows overflow i32".into());
    }
    let mut rank_slots = vec![-1i32; geo.tokens * group];
    let mut meta = Vec::with_capacity(geo.chunks);
    for (c, table) in tables.iter().enumerate() {
        let mut cursor: Vec<usize> = (0..group).map(|g| table.rank_send_start(me, g)).collect();
        let mut rows = vec![-1i32; table.rank_sent(me) * cols];
        for t in geo.chunk_range(c) {
            let mut overflow = None;
            geo.for_each_rank(me, routing.ids, t, |g| {
                let row = cursor[g];
                cursor[g] += 1;
                if row >= table.rank_send_start(me, g) + table.rank_rows(me, g) {
                    overflow = Some(g);
                    return;
                }
                rank_slots[t * group + g] = row as i32;
                let line = &mut rows[row * cols..(row + 1) * cols];
                for j in 0..k {
                    let (g2, l) = geo.dest(me, routing.ids[t * k + j] as usize);
                    let lands = g2 == g && slots[t * k + j] >= 0;
                    line[j] = if lands { l as i32 } else { -1 };
                    line[k + j] = if lands {
                        routing.weights[t * k + j].to_bits() as i32
                    } else {
                        0
                    };
                }
            });
            if let Some(g) = overflow {
                return Err(format!(
                    "the exchanged by-rank counts disagree with this rank's routing (chunk {c}, EP rank {g})"
                ));
            }
        }
        for (g, &end) in cursor.iter().enumerate() {
            if end != table.rank_send_start(me, g) + table.rank_rows(me, g) {
                return Err(format!(
                    "the exchanged by-rank counts disagree with this rank's routing (chunk {c}, EP rank {g})"
                ));
            }
        }
        meta.push(rows);
    }
    Ok(ByRank { rank_slots, meta })
}

/// Where the received by-rank rows of chunk `table` go on the expert side:
/// `(index, weights)`, each `[received rows, k]`, the expert-side row (the
/// per-assignment receive layout) and weight of every pick of every row, or
/// `-1` (and weight 0) for a pick that does not land on this rank. `meta` is
/// the received metadata (`2k` i32 per row). Checks every index against the
/// table, so corrupt metadata is an error, not a stray write.
pub fn expand_index(
    geo: &Geometry,
    table: &ChunkTable,
    me: usize,
    meta: &[i32],
) -> Result<(Vec<i32>, Vec<f32>), String> {
    let k = geo.top_k;
    let cols = geo.rank_meta_cols();
    let received = table.rank_received(me);
    if meta.len() < received * cols {
        return Err(format!(
            "the by-rank metadata holds {} values, {received} rows need {}",
            meta.len(),
            received * cols
        ));
    }
    let lmax = table.max_local();
    let mut index = vec![-1i32; received * k];
    let mut weights = vec![0f32; received * k];
    for s in 0..table.group() {
        let mut cursor = vec![0usize; lmax];
        let start = table.rank_recv_start(s, me);
        for row in start..start + table.rank_rows(s, me) {
            for j in 0..k {
                let l = meta[row * cols + j];
                if l < 0 {
                    continue;
                }
                let l = l as usize;
                if l >= lmax || cursor[l] >= table.rows(s, me, l) {
                    return Err(format!(
                        "corrupt by-rank metadata from EP rank {s}: local expert {l} beyond the routing table"
                    ));
                }
                index[row * k + j] = i32::try_from(table.recv_start(s, me, l) + cursor[l])
                    .map_err(|_| "expert rows overflow i32")?;
                weights[row * k + j] = f32::from_bits(meta[row * cols + k + j] as u32);
                cursor[l] += 1;
            }
        }
        if let Some(l) = (0..lmax).find(|&l| cursor[l] != table.rows(s, me, l)) {
            return Err(format!(
                "the by-rank metadata from EP rank {s} disagrees with the routing table (local expert {l})"
            ));
        }
    }
    Ok((index, weights))
}

#[cfg(test)]
impl Geometry {
    /// `experts / group` consecutive experts per rank, top-2, dropless.
    pub(crate) fn uniform(group: usize, experts: usize, tokens: usize, chunks: usize) -> Geometry {
        let per = experts / group;
        let experts_of: Vec<Vec<usize>> = (0..group)
            .map(|g| (g * per..(g + 1) * per).collect())
            .collect();
        let mut copies = vec![Vec::new(); experts];
        let mut local_index = vec![vec![None; experts]; group];
        for (g, list) in experts_of.iter().enumerate() {
            for (i, &e) in list.iter().enumerate() {
                copies[e].push(g);
                local_index[g][e] = Some(i);
            }
        }
        Geometry {
            tokens,
            top_k: 2,
            experts,
            chunks,
            chunk_tokens: tokens.div_ceil(chunks),
            group,
            experts_of,
            copies,
            local_index,
            capacity: None,
            by_rank: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(group: usize, experts: usize, tokens: usize, chunks: usize) -> Geometry {
        Geometry::uniform(group, experts, tokens, chunks)
    }

    #[test]
    fn slots_follow_destination_then_expert_then_token() {
        let g = geo(2, 4, 3, 1);
        // token 0 -> experts 3, 0; token 1 -> 1, 2; token 2 -> 0, 1
        let ids = [3, 0, 1, 2, 0, 1];
        let w = [0.5f32; 6];
        let r = Routing {
            ids: &ids,
            weights: &w,
        };
        let meta = assign_count(&g, 0, &r).unwrap();
        let mut all = meta.clone();
        all.extend(vec![0; meta.len()]); // rank 1 routes nothing
        let p = assign_place(&g, 0, &r, &all).unwrap();
        // Destination 0 holds experts 0,1: expert 0 rows (t0, t2), expert 1 rows (t1, t2);
        // destination 1: expert 2 (t1), expert 3 (t0).
        assert_eq!(p.slots, vec![5, 0, 2, 4, 1, 3]);
        let t = &p.tables[0];
        assert_eq!(t.rows(0, 0, 0), 2);
        assert_eq!(t.to_rank(0, 1), 2);
        assert_eq!(t.recv_start(0, 1, 1), 1);
    }

    #[test]
    fn by_rank_rows_carry_each_token_once_per_rank_and_expand_to_the_expert_rows() {
        let mut g = geo(2, 4, 3, 1);
        g.by_rank = true;
        // token 0 -> experts 3, 0; token 1 -> 0, 1 (both on rank 0); token 2 -> 2, 3.
        let ids = [3, 0, 0, 1, 2, 3];
        let w = [0.25f32, 0.75, 0.5, 0.5, 0.125, 0.875];
        let r = Routing {
            ids: &ids,
            weights: &w,
        };
        let meta = assign_count(&g, 0, &r).unwrap();
        let mut all = meta.clone();
        all.extend(vec![0; meta.len()]); // rank 1 routes nothing
        let p = assign_place(&g, 0, &r, &all).unwrap();
        let t = &p.tables[0];
        // Rank 0 gets tokens 0 and 1 (one row each), rank 1 tokens 0 and 2.
        assert_eq!((t.rank_rows(0, 0), t.rank_rows(0, 1)), (2, 2));
        assert_eq!(t.sent(0), 6);
        let by_rank = p.by_rank.as_ref().unwrap();
        assert_eq!(by_rank.rank_slots, vec![0, 2, 1, -1, -1, 3]);
        // Rank 0's rows: token 0 (pick 1 = local expert 0), token 1 (picks 0, 1).
        let cols = g.rank_meta_cols();
        let rows0 = &by_rank.meta[0][..2 * cols];
        assert_eq!(&rows0[..2], &[-1, 0]);
        assert_eq!(&rows0[cols..cols + 2], &[0, 1]);
        // Expanding on rank 0 lands every pick on its per-assignment row.
        let (index, weights) = expand_index(&g, t, 0, rows0).unwrap();
        for (row, tok) in [(0usize, 0usize), (1, 1)] {
            for j in 0..2 {
                let e = ids[tok * 2 + j] as usize;
                if e < 2 {
                    let want = t.recv_start(0, 0, e)
                        + (p.slots[tok * 2 + j] as usize - t.send_start(0, 0, e));
                    assert_eq!(index[row * 2 + j], want as i32, "token {tok} pick {j}");
                    assert_eq!(weights[row * 2 + j], w[tok * 2 + j]);
                } else {
                    assert_eq!(index[row * 2 + j], -1);
                }
            }
        }
        // Metadata that names a pick the table does not have is refused.
        let mut bad = rows0.to_vec();
        bad[0] = 1;
        assert!(expand_index(&g, t, 0, &bad).is_err());
        // So is metadata whose counts disagree with the table.
        let mut short = rows0.to_vec();
        short[cols] = -1;
        assert!(expand_index(&g, t, 0, &short).is_err());
    }

    #[test]
    fn position_capacity_drops_later_ranks_first() {
        let mut g = geo(2, 2, 2, 1);
        g.top_k = 1;
        g.capacity = Some((3, DropPolicy::Position));
        let ids = [0, 0];
        let w = [1.0f32; 2];
        let r = Routing {
            ids: &ids,
            weights: &w,
        };
        let meta = assign_count(&g, 0, &r).unwrap();
        let all: Vec<i32> = meta.iter().chain(meta.iter()).copied().collect();
        let p0 = assign_place(&g, 0, &r, &all).unwrap();
        let p1 = assign_place(&g, 1, &r, &all).unwrap();
        assert_eq!(p0.dropped, 0);
        assert_eq!(p1.dropped, 1);
        assert_eq!(p1.slots, vec![0, -1]);
        assert_eq!(p0.tables[0].expert_rows(0, 0), 3);
    }
}
