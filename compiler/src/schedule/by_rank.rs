//! Dispatch by rank and the reducing combine in a chunk: the by-rank nodes
//! (the send rows, the collectives, the expansion or its fusion into the up
//! projection, the reduction, the sum over ranks), and the by-rank routing
//! they share, emitted once per chunk on demand: the source's by-rank slots
//! and picks (`assign_rank`), the picks' all-to-all beside the rows, and the
//! expert row and weight of every received pick (`assign_expand`).

use super::{Builder, NodeAt, PendingOp, Stage, Value};
use crate::cost::{self, NodeCost};
use crate::ir::MoeIr;
use moec_runtime::plan::{
    by_rank_pick_cols, BufferRole, CollectiveKind, CollectiveScope, DType, KernelKind, OpKind,
    Phase, RowBound,
};

impl Builder<'_> {
    /// The by-rank nodes of a chunk: the by-rank send rows, the by-rank
    /// collectives, the expansion (copied, or left to the up projection to
    /// read through the index), the reduction and the sum over ranks.
    pub(super) fn emit_by_rank(&mut self, node: &MoeIr, at: &NodeAt) -> Result<Value, String> {
        let NodeAt {
            chunk,
            c,
            ref suffix,
            ref meta,
            ref cost,
            stage,
            routing,
            routed_out,
        } = *at;
        let m = self.model;
        let h = m.hidden;
        Ok(match node {
            MoeIr::PackRank([x, _]) => {
                let xb = self.buf_in(*x, chunk, routed_out)?;
                self.rank_source(chunk)?;
                let rank_slots = self
                    .rank_slots
                    .ok_or("internal: by-rank rows without their slots")?;
                let out = self.buffer(
                    &format!("send{suffix}"),
                    m.dtype,
                    vec![meta.rows, h],
                    BufferRole::Comm,
                );
                // `permute_pack` over the destination ranks: a token's row
                // goes to each of its by-rank slots, unscaled (the expert
                // side applies each pick's weight).
                let consts = self.constants(&[
                    ("top_k", m.group_ranks as i64),
                    ("rows", meta.rows as i64),
                    ("weight_on_input", 0),
                ]);
                let kernel = self.kernel(KernelKind::PackRank, "pack_rank", consts);
                let pack =
                    cost::memory_kernel(m, 2.0 * meta.rows_expected * (h * m.dtype.bytes()) as f64);
                let op = self.op_launch(
                    "pack by rank",
                    Phase::Permute,
                    c,
                    kernel,
                    vec![xb, rank_slots, routing.weights],
                    vec![out],
                    meta.rows,
                    pack.compute_us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(out)
            }
            MoeIr::DispatchRank(p) | MoeIr::DispatchRankInter(p) | MoeIr::DispatchRankIntra(p) => {
                let send = self.buf_in(*p, chunk, routed_out)?;
                let (scope, bname, name) = match node {
                    MoeIr::DispatchRank(_) => {
                        (CollectiveScope::EpGroup, "recv", "dispatch by rank")
                    }
                    MoeIr::DispatchRankInter(_) => (
                        CollectiveScope::InterNode,
                        "node_stage",
                        "dispatch by rank inter-node",
                    ),
                    _ => (
                        CollectiveScope::IntraNode,
                        "recv",
                        "dispatch by rank intra-node",
                    ),
                };
                let recv = self.buffer(
                    &format!("{bname}{suffix}"),
                    meta.dtype,
                    vec![meta.rows, meta.cols],
                    BufferRole::Comm,
                );
                // The rows only: the picks are their own collective.
                let row = cost::row_bytes(meta.cols, meta.dtype);
                let rows = match scope {
                    CollectiveScope::EpGroup => cost::flat_all_to_all(m, meta.rows_expected, row),
                    CollectiveScope::IntraNode => cost::intra_leg(m, meta.rows_expected, row),
                    CollectiveScope::InterNode => cost.clone(),
                };
                if scope != CollectiveScope::EpGroup {
                    self.hierarchical = true;
                }
                let op = self.rank_collective(name, Phase::Dispatch, c, scope, send, recv, &rows);
                self.push_stage(chunk, op, stage);
                if scope != CollectiveScope::InterNode {
                    self.rank_picks_received(chunk)?;
                }
                Value::Buf(recv)
            }
            MoeIr::Gather([r, _]) => {
                let rows = self.buf_in(*r, chunk, routed_out)?;
                let (index, weights) = self.rank_expand_index(chunk)?;
                self.expert_rows = self.expert_rows.max(meta.rows);
                Value::Gathered {
                    rows,
                    index,
                    weights,
                }
            }
            MoeIr::Expand([r, _]) | MoeIr::Reduce([r, _]) => {
                let input = self.buf_in(*r, chunk, routed_out)?;
                let (index, weights) = self.rank_expand_index(chunk)?;
                let expand = matches!(node, MoeIr::Expand(_));
                let (kind, base, bname, role, phase, name) = if expand {
                    (
                        KernelKind::Expand,
                        "expand",
                        "expert_in",
                        BufferRole::Scratch,
                        Phase::Experts,
                        "expand to experts",
                    )
                } else {
                    (
                        KernelKind::Reduce,
                        "reduce",
                        "reduced",
                        BufferRole::Comm,
                        Phase::Unpermute,
                        "reduce per rank",
                    )
                };
                if expand {
                    self.expert_rows = self.expert_rows.max(meta.rows);
                }
                let out = self.buffer(
                    &format!("{bname}{suffix}"),
                    m.dtype,
                    vec![meta.rows, h],
                    role,
                );
                let consts = self.pick_constants(meta.rows);
                let kernel = self.kernel(kind, base, consts);
                // The index is `assign expand`'s op; the copy or sum is this one.
                let index_us =
                    cost::expand_index_cost(m, meta.rows_expected.min(self.meta(*r).rows_expected))
                        .compute_us;
                let us = if expand {
                    (cost.compute_us - index_us).max(0.0)
                } else {
                    cost.compute_us
                };
                let op = self.op_launch(
                    name,
                    phase,
                    c,
                    kernel,
                    vec![input, index, weights],
                    vec![out],
                    meta.rows,
                    us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(out)
            }
            MoeIr::CombineRank(r) | MoeIr::CombineRankIntra(r) | MoeIr::CombineRankInter(r) => {
                let send = self.buf_in(*r, chunk, routed_out)?;
                let (scope, bname, name) = match node {
                    MoeIr::CombineRank(_) => {
                        (CollectiveScope::EpGroup, "combined", "combine by rank")
                    }
                    MoeIr::CombineRankIntra(_) => (
                        CollectiveScope::IntraNode,
                        "node_sum",
                        "combine by rank intra-node",
                    ),
                    _ => (
                        CollectiveScope::InterNode,
                        "combined",
                        "combine by rank inter-node",
                    ),
                };
                let recv = self.buffer(
                    &format!("{bname}{suffix}"),
                    m.dtype,
                    vec![meta.rows, h],
                    BufferRole::Comm,
                );
                let op = self.rank_collective(name, Phase::Combine, c, scope, send, recv, cost);
                self.push_stage(chunk, op, stage);
                Value::Buf(recv)
            }
            MoeIr::SumRank([cb, _]) => {
                let input = self.buf_in(*cb, chunk, routed_out)?;
                self.rank_source(chunk)?;
                let rank_slots = self
                    .rank_slots
                    .ok_or("internal: by-rank rows without their slots")?;
                // `unpermute_weighted_sum` over the destination ranks,
                // unweighted: the expert side applied the weights.
                let consts = self.constants(&[
                    ("top_k", m.group_ranks as i64),
                    ("rows", meta.rows as i64),
                    ("weight_on_input", 1),
                ]);
                let kernel = self.kernel(KernelKind::SumRank, "sum_rank", consts);
                let op = self.op_launch(
                    "sum over ranks",
                    Phase::Unpermute,
                    c,
                    kernel,
                    vec![input, rank_slots, routing.weights],
                    vec![routed_out],
                    meta.rows,
                    cost.compute_us,
                );
                self.push_stage(chunk, op, stage);
                Value::Buf(routed_out)
            }
            other => return Err(format!("internal: `{other}` is not a by-rank node")),
        })
    }

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
