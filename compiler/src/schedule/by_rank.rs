//! The by-rank routing of a chunk, emitted once per chunk on demand: the
//! source's by-rank slots and picks (`assign_rank`), the picks' all-to-all
//! beside the rows, and the expert row and weight of every received pick
//! (`assign_expand`); the by-rank collectives.

use super::{Builder, PendingOp, Stage};
use crate::cost::{self, NodeCost};
use moec_runtime::plan::{
    by_rank_pick_cols, BufferRole, CollectiveKind, CollectiveScope, DType, KernelKind, OpKind,
    Phase, RowBound,
};

impl Builder<'_> {
    /// Marks a by-rank receive-side buffer of `rows` rows (dropless plans:
    /// it grows with `choices.rank_rows`).
    fn mark_rank_rows(&mut self, b: u32, rows: u64) {
        if self.model.capacity.is_none() {
            self.mark_bounded(b, rows, RowBound::RankRows);
        }
    }

    /// The constants of the native assignment kernels, for `pass`.
    pub(super) fn assign_constants(&self, pass: i64) -> Vec<(String, i64)> {
        let m = self.model;
        self.constants(&[
            ("experts", m.experts as i64),
            ("top_k", m.top_k as i64),
            ("ep_ranks", m.group_ranks as i64),
            ("capacity", m.capacity.map(|c| c as i64).unwrap_or(0)),
            ("pass", pass),
        ])
    }

    /// `assign_rank` of `chunk` (once): the by-rank slots of its tokens and
    /// its metadata rows, from what `assign place` decided.
    pub(super) fn rank_source(&mut self, chunk: u64) -> Result<u32, String> {
        let route = self.rank_routes.get(&chunk).copied().unwrap_or_default();
        if let Some(b) = route.send_meta {
            return Ok(b);
        }
        let m = self.model;
        let (routing, rank_slots) = match (self.routing, self.rank_slots) {
            (Some(r), Some(s)) => (r, s),
            _ => return Err("internal: by-rank routing before the assignment".into()),
        };
        let tokens = m.chunk_tokens(self.chunks);
        let meta = self.buffer(
            &format!("send_picks{}", self.suffix(chunk)),
            DType::I32,
            vec![
                tokens.saturating_mul(m.rank_rows_per_token()),
                by_rank_pick_cols(m.top_k),
            ],
            BufferRole::Comm,
        );
        let kernel = self.kernel(KernelKind::Assign, "assign_rank", self.assign_constants(2));
        let cost = cost::rank_route_cost(m, m.tokens as f64 / self.chunks as f64);
        let op = self.op_launch(
            "assign by rank",
            Phase::Permute,
            self.chunk_field(chunk),
            kernel,
            vec![routing.slots],
            vec![rank_slots, meta],
            tokens,
            cost.compute_us,
        );
        self.push_stage(chunk, op, Stage::Pre);
        self.rank_routes.entry(chunk).or_default().send_meta = Some(meta);
        Ok(meta)
    }

    /// The picks' metadata of `chunk` sent beside the by-rank rows (once).
    pub(super) fn rank_picks_received(&mut self, chunk: u64) -> Result<u32, String> {
        if let Some(b) = self.rank_routes.get(&chunk).and_then(|r| r.recv_meta) {
            return Ok(b);
        }
        let send = self.rank_source(chunk)?;
        let m = self.model;
        let rows = m.rank_rows_received_max(self.chunks);
        let recv = self.buffer(
            &format!("recv_picks{}", self.suffix(chunk)),
            DType::I32,
            vec![rows, by_rank_pick_cols(m.top_k)],
            BufferRole::Comm,
        );
        self.mark_rank_rows(recv, rows);
        let expected = m.rank_rows_expected(m.tokens as f64 / self.chunks as f64);
        let cost = cost::rank_meta_all_to_all(m, expected);
        let op = self.rank_collective(
            "dispatch picks",
            Phase::Dispatch,
            self.chunk_field(chunk),
            CollectiveScope::EpGroup,
            send,
            recv,
            &cost,
        );
        self.push_stage(chunk, op, Stage::Dispatch);
        self.rank_routes.entry(chunk).or_default().recv_meta = Some(recv);
        Ok(recv)
    }

    /// `assign_expand` of `chunk` (once): the expert row and weight of every
    /// received pick.
    pub(super) fn rank_expand_index(&mut self, chunk: u64) -> Result<(u32, u32), String> {
        if let Some(b) = self.rank_routes.get(&chunk).and_then(|r| r.expand) {
            return Ok(b);
        }
        let meta = self.rank_picks_received(chunk)?;
        let m = self.model;
        let rows = m.rank_rows_received_max(self.chunks);
        let suffix = self.suffix(chunk);
        let index = self.buffer(
            &format!("expand_index{suffix}"),
            DType::I32,
            vec![rows, m.top_k],
            BufferRole::Scratch,
        );
        let weights = self.buffer(
            &format!("expand_weights{suffix}"),
            DType::F32,
            vec![rows, m.top_k],
            BufferRole::Scratch,
        );
        self.mark_rank_rows(index, rows);
        self.mark_rank_rows(weights, rows);
        let kernel = self.kernel(
            KernelKind::Assign,
            "assign_expand",
            self.assign_constants(3),
        );
        let expected = m.rank_rows_expected(m.tokens as f64 / self.chunks as f64);
        let cost = cost::expand_index_cost(m, expected);
        let op = self.op_launch(
            "assign expand",
            Phase::Experts,
            self.chunk_field(chunk),
            kernel,
            vec![meta],
            vec![index, weights],
            rows,
            cost.compute_us,
        );
        self.push_stage(chunk, op, Stage::Experts);
        self.rank_routes.entry(chunk).or_default().expand = Some((index, weights));
        Ok((index, weights))
    }

    /// Buffer name suffix of `chunk` (none when the layer is one chunk).
    pub(super) fn suffix(&self, chunk: u64) -> String {
        if self.chunks > 1 {
            format!(".c{chunk}")
        } else {
            String::new()
        }
    }

    /// The `chunk` field of an op of `chunk`.
    pub(super) fn chunk_field(&self, chunk: u64) -> Option<u64> {
        (self.chunks > 1).then_some(chunk)
    }

    /// A by-rank all-to-all (one row per token and destination rank).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rank_collective(
        &self,
        name: &str,
        phase: Phase,
        chunk: Option<u64>,
        scope: CollectiveScope,
        send: u32,
        recv: u32,
        cost: &NodeCost,
    ) -> PendingOp {
        let mut op = self.op_collective(name, phase, chunk, scope, send, recv, cost);
        if let OpKind::Collective { kind, .. } = &mut op.kind {
            *kind = CollectiveKind::AllToAllRank;
        }
        op
    }
}
