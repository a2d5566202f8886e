//! The legs of the hierarchical all-to-all (DeepEP's scheme, `cpu::hier`)
//! on the device.
//!
//! Each leg's rows are those of the CPU backend (`cpu::hier`, on the routing
//! read back). The members of an EP group that this process holds move them
//! either as device-to-device copies between virtual ranks (the whole group
//! is here) or as NCCL sends and receives (a part of it is).
//!
//! Every leg but one needs only the rank's own routing. The exception is the
//! dispatch's inter-node leg: a forwarder stages what the ranks at its local
//! index on the other nodes send it, and needs their count and their routing
//! inside its node before it can lay out the intra-node leg. Between virtual
//! ranks the host has them; over NCCL each source first tells each forwarder
//! how many rows and routing values it sends (a count exchange, read back),
//! then sends the routing beside the rows (read back after the rows are
//! queued), as DeepEP sends `topk_idx` with the tokens.
//!
//! Over NCCL a leg is one message per peer and direction, packed and
//! unpacked by the native `copy_runs` kernel where a side's rows are
//! scattered ([`Issuer::nccl_leg`]), in rounds when the stream's bounded
//! workspace is smaller than the leg.

use super::{
    err, parts_index, spread, Addr, Arg, Command, ExecError, Issuer, KernelRef, NativeKernel,
    ParamKind, PeerRuns, Program, RouteTable, Run, STATUS_BYTES,
};
use crate::cpu::hier::{self, ByRankBlocks, InterSend, PeerRows, Staged, Topology};
use crate::cuda::program::{CollectiveStep, ForwarderSum, Span};
use crate::cuda::route::ExpertSide;
use crate::plan::rows::RowLayout;
use crate::plan::{CollectiveKind, CollectiveScope};
use std::ops::Range;

/// The members of one EP group that this process holds.
pub(super) struct Members {
    /// Local rank index and EP index of each, ascending.
    list: Vec<(usize, usize)>,
    /// The group's first global rank.
    base: usize,
    /// The whole group is here (virtual ranks, in EP order).
    whole: bool,
}

impl Members {
    /// The local ranks `at` (ascending, one EP group's).
    pub(super) fn new(p: &Program, local: &[usize], at: Range<usize>) -> Members {
        let base = local[at.start] - p.me(local[at.start]);
        let whole = at.len() == p.group;
        let list = at.map(|i| (i, p.me(local[i]))).collect();
        Members { list, base, whole }
    }
}

/// What a forwarder stages from each source node in the inter-node leg, in
/// node order: the rows, and their routing (for the nodes whose routing
/// comes over NCCL, read back once the rows are queued).
struct Heard {
    rows: Vec<usize>,
    routing: Vec<Vec<u32>>,
    /// Routing values per node still on the device (received by NCCL).
    on_device: Vec<usize>,
}

impl Heard {
    /// What forwarder `f` hears when every source's sends (`sends`, by EP
    /// index) are on this host.
    fn on_host(topo: &Topology, f: usize, sends: &[InterSend]) -> Heard {
        let n = topo.node(f);
        let across = topo.across(f);
        Heard {
            rows: across.iter().map(|&s| sends[s].rows[n].len()).collect(),
            routing: across
                .iter()
                .map(|&s| sends[s].routing[n].clone())
                .collect(),
            on_device: vec![0; topo.nodes],
        }
    }
}

impl Issuer<'_> {
    /// One leg of the hierarchical all-to-all for the members `m` of one
    /// EP group.
    pub(super) fn hierarchical(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        m: &Members,
        ordinal: u32,
    ) -> Result<(), ExecError> {
        let p = self.p;
        let group = p.group;
        let r0 = self.local[m.list[0].0];
        let topo = Topology::new(group, p.gpus_per_node).map_err(|e| err(r0, None, e))?;
        let tables = m
            .list
            .iter()
            .map(|&(i, _)| self.table(i, c.chunk))
            .collect::<Result<Vec<_>, _>>()?;
        let by_rank = c.kind == CollectiveKind::AllToAllRank;
        let rows: Vec<(PeerRows, PeerRows)> = match (c.dispatch, c.scope) {
            (true, CollectiveScope::InterNode) => {
                return self.dispatch_inter(stream, c, (m, ordinal), &topo, &tables);
            }
            (false, CollectiveScope::IntraNode) if by_rank => {
                return self.combine_intra_reduce(stream, c, (m, ordinal), &topo, &tables);
            }
            (false, _) if by_rank => {
                return self.combine_inter_by_rank(stream, c, (m, ordinal), &topo);
            }
            (true, _) => m
                .list
                .iter()
                .zip(&tables)
                .map(|(&(i, q), table)| {
                    let key = (i, c.send.offset);
                    let staged = self.staged.get(&key).ok_or_else(|| {
                        err(
                            self.local[i],
                            None,
                            "the intra-node leg runs before the inter-node leg staged its rows",
                        )
                    })?;
                    let within = topo.within(q);
                    let recv = if by_rank {
                        hier::dispatch_intra_recv(&topo, &ByRankBlocks(table), q)
                    } else {
                        hier::dispatch_intra_recv(&topo, &self.expert_side(table), q)
                    };
                    Ok((
                        spread(group, &within, staged.sends(topo.per_node)),
                        spread(group, &within, recv),
                    ))
                })
                .collect::<Result<_, ExecError>>()?,
            (false, CollectiveScope::IntraNode) => m
                .list
                .iter()
                .zip(&tables)
                .map(|(&(_, q), table)| {
                    let (to, from) = hier::combine_intra(&topo, &self.expert_side(table), q);
                    let within = topo.within(q);
                    (spread(group, &within, to), spread(group, &within, from))
                })
                .collect(),
            (false, _) => m
                .list
                .iter()
                .zip(&tables)
                .map(|(&(_, q), table)| {
                    let (to, from) = hier::combine_inter(&topo, &self.expert_side(table), q);
                    let across = topo.across(q);
                    let one = |v: Vec<Range<usize>>| v.into_iter().map(|r| vec![r]).collect();
                    (
                        spread(group, &across, one(to)),
                        spread(group, &across, one(from)),
                    )
                })
                .collect(),
        };
        self.move_rows(stream, c, (m, ordinal), rows)
    }

    /// A table's per-pick blocks with this plan's expert side (padded slots
    /// in capacity plans).
    fn expert_side<'t>(&self, table: &'t RouteTable) -> ExpertSide<'t> {
        ExpertSide {
            table,
            padded: usize::try_from(self.p.padded).unwrap_or(usize::MAX),
        }
    }

    /// Moves each member's rows of `c` (per member, per peer: the rows it
    /// sends and the rows it receives): copies between virtual ranks, or
    /// one NCCL message per peer and direction ([`Issuer::nccl_leg`]).
    fn move_rows(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        (m, ordinal): (&Members, u32),
        rows: Vec<(PeerRows, PeerRows)>,
    ) -> Result<(), ExecError> {
        let members = self.members(c, m, rows)?;
        if m.whole {
            return self.virtual_exchange(stream, c, &members, ordinal);
        }
        for member in members {
            self.nccl_leg(stream, c, m.base, member)?;
        }
        Ok(())
    }

    /// One member's share of a leg over NCCL. The two sides of a pair must
    /// agree on every message's size, and neither knows how the other's
    /// rows lie (a source's rows for a node are scattered over its send
    /// buffer, the forwarder's are contiguous), so each pair exchanges one
    /// message per direction: the concatenation of the sender's runs, in
    /// order, which is what the receiver's runs take in order. A side whose
    /// runs are one run sends or receives in place; otherwise `copy_runs`
    /// packs the message into the stream's `pack` workspace before the NCCL
    /// group, or unpacks it from `unpack` after. The rank's own share is one
    /// `copy_runs` too. When the stream's workspace is smaller than a leg's
    /// worst case, every message goes in rounds of `piece` bytes (the same
    /// cut on both sides: `piece` is the program's), one NCCL group each.
    fn nccl_leg(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        base: usize,
        (r, to, from): (usize, PeerRuns, PeerRuns),
    ) -> Result<(), ExecError> {
        let p = self.p;
        let me = p.me(r);
        let work = self.stream_work(r, stream)?;
        let local: Vec<RunCopy> = to
            .get(me)
            .zip(from.get(me))
            .map(|(out, inc)| super::pair_runs(out, inc))
            .transpose()
            .map_err(|e| err(r, None, e))?
            .unwrap_or_default();
        let piece = work.piece.max(1);
        let rounds = rounds(&to, me, piece).max(rounds(&from, me, piece)).max(1);
        for round in 0..rounds {
            let bytes = round * piece..(round + 1).saturating_mul(piece);
            let (sends, pack) = messages(
                &to,
                (me, base),
                (Addr::of(r, c.send), Addr::of(r, work.pack)),
                bytes.clone(),
            );
            let (recvs, unpack) = messages(
                &from,
                (me, base),
                (Addr::of(r, c.recv), Addr::of(r, work.unpack)),
                bytes,
            );
            let packed: u64 = pack.iter().map(|run| run.2).sum();
            let unpacked: u64 = unpack.iter().map(|run| run.2).sum();
            if packed > work.pack.bytes || unpacked > work.unpack.bytes {
                return Err(err(
                    r,
                    None,
                    format!(
                        "`{}`: {packed} bytes to pack and {unpacked} to unpack in a round exceed the stream's {} and {}",
                        c.send_name, work.pack.bytes, work.unpack.bytes
                    ),
                ));
            }
            let local = if round == 0 { &local[..] } else { &[] };
            let table = run_table(&[local, &pack, &unpack]).map_err(|e| err(r, None, e))?;
            if table.len() as u64 * 4 > work.runs.bytes {
                return Err(err(
                    r,
                    None,
                    format!(
                        "`{}`: {} runs exceed the stream's run table",
                        c.send_name,
                        table.len() / 3
                    ),
                ));
            }
            self.upload(
                r,
                stream,
                work.runs,
                words_le(&table),
                "the leg's run table",
            )?;
            let mut at = 0u64;
            let mut copy = |issuer: &mut Self, (src, dst): (Span, Span), runs: &[RunCopy]| {
                let first = at;
                at += runs.len() as u64;
                if runs.is_empty() {
                    return Ok(());
                }
                let table = (work.runs, first, runs.len() as u64);
                issuer.copy_runs(r, stream, c, (src, dst), table)
            };
            copy(self, (c.send, c.recv), local)?;
            copy(self, (c.send, work.pack), &pack)?;
            if !sends.is_empty() || !recvs.is_empty() {
                self.submit(r, stream, Command::Nccl { sends, recvs })?;
            }
            copy(self, (work.unpack, c.recv), &unpack)?;
        }
        Ok(())
    }

    /// A `copy_runs` launch of rank `r` from `src` to `dst` over entries
    /// `first..first + count` of the run table `runs`.
    fn copy_runs(
        &mut self,
        r: usize,
        stream: usize,
        c: &CollectiveStep,
        (src, dst): (Span, Span),
        (runs, first, count): (Span, u64, u64),
    ) -> Result<(), ExecError> {
        let status = c.status.ok_or_else(|| {
            err(
                r,
                None,
                "a hierarchical leg without its copy kernel's status",
            )
        })?;
        let buf = |span: Span| Arg::Buf {
            addr: Addr::of(r, span),
            len: span.bytes,
        };
        let table = Arg::Buf {
            addr: Addr::of(r, runs).plus(first * 12),
            len: count * 3,
        };
        let kernel = KernelRef::Native(NativeKernel::CopyRuns);
        let cmd = Command::Launch {
            kernel,
            args: vec![buf(src), buf(dst), table],
            rows: count,
            grid: u32::try_from(count.clamp(1, COPY_RUNS_GRID)).unwrap_or(1),
            block: COPY_RUNS_BLOCK,
            status: Addr::of(r, self.p.work.status).plus(status as u64 * STATUS_BYTES),
            scratch: None,
        };
        self.submit(r, stream, cmd)
    }

    /// The rows each member sends and receives in `c`, per peer, as byte
    /// runs of its buffers.
    fn members(
        &self,
        c: &CollectiveStep,
        m: &Members,
        rows: Vec<(PeerRows, PeerRows)>,
    ) -> Result<Vec<(usize, PeerRuns, PeerRuns)>, ExecError> {
        let mut members = Vec::with_capacity(rows.len());
        for (&(i, _), (to, from)) in m.list.iter().zip(rows) {
            let r = self.local[i];
            let bytes = |layout: &RowLayout, name: &str, peers: PeerRows| {
                peers
                    .iter()
                    .map(|rows| layout.runs(rows, name))
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| err(r, None, e))
            };
            let to = bytes(&c.send_rows, &c.send_name, to)?;
            let from = bytes(&c.recv_rows, &c.recv_name, from)?;
            members.push((r, to, from));
        }
        Ok(members)
    }

    /// The reducing combine's intra-node leg (`cpu::hier::combine_intra`
    /// over by-rank blocks, then `forwarder_parts`): every expert rank's
    /// partial rows go to the forwarder at the token's source index, into
    /// the stream's `forward_parts`; the forwarder's sum kernel then adds
    /// each staged token's parts, in destination order, into one row of the
    /// leg's receive buffer (by source node, then token, as staged).
    fn combine_intra_reduce(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        (m, ordinal): (&Members, u32),
        topo: &Topology,
        tables: &[RouteTable],
    ) -> Result<(), ExecError> {
        let p = self.p;
        let r0 = self.local[m.list[0].0];
        let sum = c
            .forwarder_sum
            .ok_or_else(|| err(r0, None, "a reducing combine leg without its sum"))?;
        let work = self.stream_work(r0, stream)?;
        let row_bytes = c.send_rows.row_bytes;
        let parts_rows = RowLayout {
            rows: work.forward_parts.bytes / row_bytes.max(1),
            row_bytes,
            scales: None,
        };
        let staging = CollectiveStep {
            recv: work.forward_parts,
            recv_rows: parts_rows,
            recv_name: "the forwarder's partial rows".into(),
            ..c.clone()
        };
        let rows = m
            .list
            .iter()
            .zip(tables)
            .map(|(&(_, q), table)| {
                let (to, from) = hier::combine_intra(topo, &ByRankBlocks(table), q);
                let within = topo.within(q);
                (spread(p.group, &within, to), spread(p.group, &within, from))
            })
            .collect();
        self.move_rows(stream, &staging, (m, ordinal), rows)?;
        let kernel = KernelRef::Generated(sum.kernel);
        let elem = match p.params(kernel).first().map(|param| param.kind) {
            Some(ParamKind::Buffer { elem, .. }) => elem.bytes() as u64,
            _ => return Err(err(r0, None, "the forwarder's sum has no row parameter")),
        };
        for (&(i, q), table) in m.list.iter().zip(tables) {
            let r = self.local[i];
            let staged = self.combine_staged(i, c.chunk)?;
            let sums =
                hier::forwarder_parts(topo, table, q, staged).map_err(|e| err(r, None, e))?;
            if !sums.is_empty() {
                self.forwarder_sum((r, stream), c, (sum, kernel, elem), &sums, parts_rows)?;
            }
        }
        Ok(())
    }

    /// The forwarder's sum kernel of rank `r` over its staged tokens: each
    /// adds its parts (`sums`, rows of the stream's `forward_parts`) into
    /// one row of the leg's receive buffer.
    fn forwarder_sum(
        &mut self,
        (r, stream): (usize, usize),
        c: &CollectiveStep,
        (sum, kernel, elem): (ForwarderSum, KernelRef, u64),
        sums: &[Vec<usize>],
        parts_rows: RowLayout,
    ) -> Result<(), ExecError> {
        let work = self.stream_work(r, stream)?;
        let index = parts_index(sums, sum.width, parts_rows.rows).map_err(|e| err(r, None, e))?;
        if sums.len() as u64 > c.recv_rows.rows {
            return Err(err(
                r,
                None,
                format!(
                    "`{}` is too small for the {} rows this rank forwards",
                    c.recv_name,
                    sums.len()
                ),
            ));
        }
        self.upload(
            r,
            stream,
            work.forward_index,
            super::ints_le(&index),
            "the forwarder's parts",
        )?;
        let buf = |span: Span, elem: u64| Arg::Buf {
            addr: Addr::of(r, span),
            len: span.bytes / elem,
        };
        // The weights are not read (`weight_on_input = 1`).
        let args = vec![
            buf(work.forward_parts, elem),
            buf(work.forward_index, 4),
            buf(work.forward_index, 4),
            buf(c.recv, elem),
        ];
        let cmd = self.launch_cmd(r, stream, kernel, args, sums.len() as u64, sum.status)?;
        self.submit(r, stream, cmd)
    }

    /// The routing local rank index `i` staged as a forwarder in the
    /// dispatch of `chunk`, which the reducing combine sums and returns by.
    fn combine_staged(&self, i: usize, chunk: usize) -> Result<&Staged, ExecError> {
        self.rank_staged.get(&(i, chunk)).ok_or_else(|| {
            err(
                self.local[i],
                None,
                "the reducing combine runs before the dispatch staged its rows",
            )
        })
    }

    /// The reducing combine's inter-node leg: each forwarder returns a
    /// source's per-node sums (one row per token that went to its node);
    /// they land on the by-rank row of the token's first rank on that node
    /// (`cpu::hier::node_sums_on_source`), and its other ranks' rows there
    /// are zeroed, so that `sum over ranks` adds every node once.
    fn combine_inter_by_rank(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        (m, ordinal): (&Members, u32),
        topo: &Topology,
    ) -> Result<(), ExecError> {
        let p = self.p;
        let group = p.group;
        let row = c.recv_rows.row_bytes;
        let tokens = p.geometry.chunk_range(c.chunk);
        let mut rows = Vec::with_capacity(m.list.len());
        for &(i, q) in &m.list {
            let r = self.local[i];
            let staged = self.combine_staged(i, c.chunk)?;
            let to: PeerRows = staged.node_rows().into_iter().map(|r| vec![r]).collect();
            let rank_slots = self.by_rank[i]
                .as_ref()
                .and_then(|b| b.rank_slots.get(tokens.start * group..tokens.end * group))
                .ok_or_else(|| err(r, None, "the by-rank slots do not cover this chunk"))?;
            let landing = hier::node_sums_on_source(topo, rank_slots);
            let from: PeerRows = landing
                .iter()
                .map(|list| list.iter().map(|(f, _)| *f..*f + 1).collect())
                .collect();
            let mut zero: Vec<usize> = landing
                .iter()
                .flatten()
                .flat_map(|(_, others)| others.iter().copied())
                .collect();
            zero.sort_unstable();
            for range in super::merged(&zero) {
                if range.end as u64 > c.recv_rows.rows {
                    return Err(err(
                        r,
                        None,
                        format!(
                            "`{}` is too small for this rank's by-rank rows",
                            c.recv_name
                        ),
                    ));
                }
                let dst = Addr::of(r, c.recv).plus(range.start as u64 * row);
                let bytes = range.len() as u64 * row;
                self.submit(
                    r,
                    stream,
                    Command::Memset {
                        dst,
                        bytes,
                        value: 0,
                    },
                )?;
            }
            let across = topo.across(q);
            rows.push((spread(group, &across, to), spread(group, &across, from)));
        }
        self.move_rows(stream, c, (m, ordinal), rows)
    }

    /// The inter-node leg of the hierarchical dispatch: each source sends one
    /// row per token and destination node to the rank of its local index
    /// there, and each forwarder keeps the tokens' routing in its node for
    /// the intra-node leg.
    fn dispatch_inter(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        (m, ordinal): (&Members, u32),
        topo: &Topology,
        tables: &[RouteTable],
    ) -> Result<(), ExecError> {
        let group = self.p.group;
        let sends = self.inter_sends(c, m, topo, tables)?;
        let heard = if m.whole {
            // Virtual ranks: every source's sends are on the host.
            m.list
                .iter()
                .map(|&(_, f)| Heard::on_host(topo, f, &sends))
                .collect()
        } else {
            self.exchange_staged(stream, m, topo, &sends)?
        };
        let mut rows = Vec::with_capacity(m.list.len());
        for (&(_, f), (send, heard)) in m.list.iter().zip(sends.iter().zip(&heard)) {
            let across = topo.across(f);
            // What f sends: its rows for each node, to that node's rank at its index.
            let to: PeerRows = send
                .rows
                .iter()
                .map(|rows_to_m| rows_to_m.iter().map(|&row| row..row + 1).collect())
                .collect();
            // What f receives as a forwarder: from the rank at its index on
            // every node, in node order, staged one after the other.
            let mut at = 0;
            let from: PeerRows = heard
                .rows
                .iter()
                .map(|&count| {
                    at += count;
                    std::iter::once(at - count..at).collect()
                })
                .collect();
            rows.push((spread(group, &across, to), spread(group, &across, from)));
        }
        self.move_rows(stream, c, (m, ordinal), rows)?;
        self.stage(c, m, topo, heard)
    }

    /// Each member's sends of the inter-node leg (`cpu::hier::dispatch_inter_send`),
    /// indexed by EP index when the whole group is here, else by member.
    fn inter_sends(
        &mut self,
        c: &CollectiveStep,
        m: &Members,
        topo: &Topology,
        tables: &[RouteTable],
    ) -> Result<Vec<InterSend>, ExecError> {
        let p = self.p;
        let tokens = p.geometry.chunk_range(c.chunk);
        let by_rank = c.kind == CollectiveKind::AllToAllRank;
        let mut sends = Vec::with_capacity(m.list.len());
        for (&(i, q), table) in m.list.iter().zip(tables) {
            let r = self.local[i];
            let out = if by_rank {
                // One row per token and destination rank, by rank blocks.
                let rank_slots = &self.by_rank[i]
                    .as_ref()
                    .ok_or_else(|| err(r, None, "a by-rank leg without by-rank routing"))?
                    .rank_slots;
                let blocks = ByRankBlocks(table);
                hier::dispatch_inter_send(topo, &blocks, q, rank_slots, p.group, tokens.clone())
            } else {
                let slots = self.slots(i)?;
                let blocks = self.expert_side(table);
                hier::dispatch_inter_send(
                    topo,
                    &blocks,
                    q,
                    &slots,
                    p.geometry.top_k,
                    tokens.clone(),
                )
            }
            .map_err(|e| err(r, None, e))?;
            sends.push(out);
        }
        Ok(sends)
    }

    /// Over NCCL, what each member hears as a forwarder: every member tells
    /// the rank at its local index on each other node how many rows and
    /// routing values it sends there (one exchange, read back), then sends
    /// the routing (read back in [`Issuer::stage`], after the rows). The
    /// member's own node's share stays on the host. Every member's counts go
    /// out before any read-back is waited for: a member's peers may be
    /// members too, whose sends must be queued first.
    fn exchange_staged(
        &mut self,
        stream: usize,
        m: &Members,
        topo: &Topology,
        sends: &[InterSend],
    ) -> Result<Vec<Heard>, ExecError> {
        for (&(i, f), send) in m.list.iter().zip(sends) {
            self.send_staged_counts((self.local[i], stream), m.base, topo, f, send)?;
        }
        let mut heard = Vec::with_capacity(m.list.len());
        for (&(i, f), send) in m.list.iter().zip(sends) {
            let h = self.read_staged_counts(self.local[i], topo, f, send)?;
            self.send_staged_routing((self.local[i], stream), m.base, topo, (f, send), &h)?;
            heard.push(h);
        }
        Ok(heard)
    }

    /// Rank `r` (EP index `f`) tells each other node's forwarder at its
    /// index the rows and routing values it sends there, and hears theirs.
    fn send_staged_counts(
        &mut self,
        (r, stream): (usize, usize),
        base: usize,
        topo: &Topology,
        f: usize,
        send: &InterSend,
    ) -> Result<(), ExecError> {
        let (counts_out, counts_in) = self.p.work.staged.counts_halves();
        if counts_in.bytes < topo.nodes as u64 * 8 {
            return Err(err(
                r,
                None,
                "the plan has no workspace for the staged counts",
            ));
        }
        let words: Vec<u32> = (0..topo.nodes)
            .flat_map(|n| [send.rows[n].len(), send.routing[n].len()])
            .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
            .collect();
        self.upload(r, stream, counts_out, words_le(&words), "the staged counts")?;
        let at = |span: Span, n: usize| Addr::of(r, span).plus(n as u64 * 8);
        let sends = remote_peers(topo, f)
            .map(|(n, peer)| (base + peer, at(counts_out, n), 8))
            .collect();
        let recvs = remote_peers(topo, f)
            .map(|(n, peer)| (base + peer, at(counts_in, n), 8))
            .collect();
        self.exchange_and_read((r, stream), sends, recvs, counts_in)
    }

    /// The counts rank `r` (EP index `f`) heard, read back (its own node's
    /// share from `send`, on the host).
    fn read_staged_counts(
        &mut self,
        r: usize,
        topo: &Topology,
        f: usize,
        send: &InterSend,
    ) -> Result<Heard, ExecError> {
        let words = read_words(&self.t.fetch(r).map_err(|e| err(r, None, e))?);
        let own = topo.node(f);
        let mut h = Heard {
            rows: vec![0; topo.nodes],
            routing: vec![Vec::new(); topo.nodes],
            on_device: vec![0; topo.nodes],
        };
        h.rows[own] = send.rows[own].len();
        h.routing[own] = send.routing[own].clone();
        for (n, _) in remote_peers(topo, f) {
            let (rows, values) = match (words.get(2 * n), words.get(2 * n + 1)) {
                (Some(&rows), Some(&values)) => (rows as usize, values as usize),
                _ => return Err(err(r, None, "the staged counts read back are short")),
            };
            if rows > self.p.geometry.chunk_tokens || values < rows {
                return Err(err(
                    r,
                    None,
                    format!(
                        "corrupt staged counts from node {n}: {rows} rows, {values} routing values"
                    ),
                ));
            }
            h.rows[n] = rows;
            h.on_device[n] = values;
        }
        Ok(h)
    }

    /// Rank `r` (EP index `f`) sends each other node's forwarder the
    /// routing of the rows it sends there, and receives what it heard of.
    fn send_staged_routing(
        &mut self,
        (r, stream): (usize, usize),
        base: usize,
        topo: &Topology,
        (f, send): (usize, &InterSend),
        h: &Heard,
    ) -> Result<(), ExecError> {
        let x = self.p.work.staged;
        let (routing_out, routing_in) = x.routing_halves();
        let out: Vec<u32> = remote_peers(topo, f)
            .flat_map(|(n, _)| send.routing[n].iter().copied())
            .collect();
        let received: usize = h.on_device.iter().sum();
        if out.len() as u64 > x.routing_sent || received as u64 > x.routing_received {
            return Err(err(
                r,
                None,
                format!(
                    "the staged routing ({} values sent, {received} received) exceeds its workspace ({} and {})",
                    out.len(),
                    x.routing_sent,
                    x.routing_received
                ),
            ));
        }
        self.upload(r, stream, routing_out, words_le(&out), "the staged routing")?;
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        let (mut sent, mut got) = (0u64, 0u64);
        for (n, peer) in remote_peers(topo, f) {
            let len = send.routing[n].len() as u64 * 4;
            if len > 0 {
                sends.push((base + peer, Addr::of(r, routing_out).plus(sent), len));
            }
            sent += len;
            let len = h.on_device[n] as u64 * 4;
            if len > 0 {
                recvs.push((base + peer, Addr::of(r, routing_in).plus(got), len));
            }
            got += len;
        }
        let routing_in = Span {
            bytes: got,
            ..routing_in
        };
        self.exchange_and_read((r, stream), sends, recvs, routing_in)
    }

    /// An NCCL group of rank `r`, then a copy of `span` to the host (none
    /// when it is empty) that [`Target::fetch`](super::Target::fetch) waits for.
    #[allow(clippy::type_complexity)] // the two lists of `Command::Nccl`
    fn exchange_and_read(
        &mut self,
        (r, stream): (usize, usize),
        sends: Vec<(usize, Addr, u64)>,
        recvs: Vec<(usize, Addr, u64)>,
        span: Span,
    ) -> Result<(), ExecError> {
        self.submit(r, stream, Command::Nccl { sends, recvs })?;
        if span.bytes == 0 {
            return Ok(());
        }
        let src = Addr::of(r, span);
        self.submit(
            r,
            stream,
            Command::ReadBack {
                src,
                bytes: span.bytes,
            },
        )
    }

    /// The forwarders' staged routing decoded and kept for the intra-node
    /// leg (and, by rank, for the reducing combine of the chunk): the
    /// routing that came over NCCL read back first.
    fn stage(
        &mut self,
        c: &CollectiveStep,
        m: &Members,
        topo: &Topology,
        heard: Vec<Heard>,
    ) -> Result<(), ExecError> {
        for (&(i, _), mut h) in m.list.iter().zip(heard) {
            let r = self.local[i];
            if h.on_device.iter().any(|&v| v > 0) {
                let words = read_words(&self.t.fetch(r).map_err(|e| err(r, None, e))?);
                let mut at = 0;
                for (n, &len) in h.on_device.iter().enumerate() {
                    if len == 0 {
                        continue; // the own node's routing, or nothing from n
                    }
                    let part = words
                        .get(at..at + len)
                        .ok_or_else(|| err(r, None, "the staged routing read back is short"))?;
                    h.routing[n] = part.to_vec();
                    at += len;
                }
            }
            let routing: Vec<u32> = h.routing.concat();
            let staged =
                Staged::decode(&h.rows, &routing, topo.per_node).map_err(|e| err(r, None, e))?;
            if c.kind == CollectiveKind::AllToAllRank {
                // The reducing combine of this chunk sums by the same routing.
                self.rank_staged.insert((i, c.chunk), staged.clone());
            }
            self.staged.insert((i, c.recv.offset), staged);
        }
        Ok(())
    }

    /// The `slots` table of local rank index `i`, read back once per pass,
    /// after its routing (the read-back it waited for follows `assign_place`
    /// on the same stream, so the table is complete).
    fn slots(&mut self, i: usize) -> Result<Vec<i32>, ExecError> {
        let r = self.local[i];
        self.routes(i)?;
        if self.slots[i].is_none() {
            let span = self
                .p
                .slots
                .ok_or_else(|| err(r, None, "the plan has no `slots` table"))?;
            let bytes = self
                .t
                .read(Addr::of(r, span), span.bytes)
                .map_err(|e| err(r, None, e))?;
            self.slots[i] = Some(crate::cpu::memory::read_i32s(&bytes));
        }
        self.slots[i]
            .clone()
            .ok_or_else(|| err(r, None, "the slots table is missing"))
    }
}

/// The forwarders of EP index `f` on the other nodes: (node, EP index).
fn remote_peers(topo: &Topology, f: usize) -> impl Iterator<Item = (usize, usize)> {
    let own = topo.node(f);
    topo.across(f)
        .into_iter()
        .enumerate()
        .filter(move |&(n, _)| n != own)
}

/// One run of a `copy_runs` table: source and destination byte offsets,
/// bytes.
type RunCopy = (u64, u64, u64);

/// Blocks and threads per block of a `copy_runs` launch: one block per run
/// at a time, its threads over the run's bytes.
const COPY_RUNS_GRID: u64 = 4096;
const COPY_RUNS_BLOCK: u32 = 128;

/// The rounds of `piece` bytes the longest message to or from a peer of
/// `me` takes.
fn rounds(peers: &PeerRuns, me: usize, piece: u64) -> u64 {
    peers
        .iter()
        .enumerate()
        .filter(|&(q, _)| q != me)
        .map(|(_, runs)| {
            runs.iter()
                .map(|run| run.len as u64)
                .sum::<u64>()
                .div_ceil(piece)
        })
        .max()
        .unwrap_or(0)
}

/// The NCCL operations of one side of a leg in one round (`(peer's global
/// rank, address, bytes)`, one per peer whose message has bytes in `bytes`,
/// the own EP index `me` left out; `base` the group's first global rank) and
/// the runs that pack or unpack them: a peer's message that is one run goes
/// in place (`at.0`, the leg's buffer), any other through the workspace
/// (`at.1`), the round's pieces one after the other.
fn messages(
    peers: &[Vec<Run>],
    (me, base): (usize, usize),
    at: (Addr, Addr),
    bytes: Range<u64>,
) -> (Vec<(usize, Addr, u64)>, Vec<RunCopy>) {
    let (mut ops, mut runs) = (Vec::new(), Vec::new());
    let mut packed = 0u64;
    for (p, list) in peers.iter().enumerate() {
        let cut = cut_runs(list, bytes.clone());
        let total: u64 = cut.iter().map(|run| run.1).sum();
        if p == me || total == 0 {
            continue;
        }
        match (list.as_slice(), cut.as_slice()) {
            ([_], [(offset, len)]) => ops.push((base + p, at.0.plus(*offset), *len)),
            _ => {
                ops.push((base + p, at.1.plus(packed), total));
                for (offset, len) in cut {
                    runs.push((offset, packed, len));
                    packed += len;
                }
            }
        }
    }
    (ops, runs)
}

/// Bytes `bytes` of the concatenation of `runs`, as (offset, length) runs
/// of the buffer, in order.
fn cut_runs(runs: &[Run], bytes: Range<u64>) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = 0u64;
    for run in runs {
        let (start, len) = (run.offset as u64, run.len as u64);
        let (lo, hi) = (bytes.start.max(at), bytes.end.min(at + len));
        if lo < hi {
            out.push((start + lo - at, hi - lo));
        }
        at += len;
        if at >= bytes.end {
            break;
        }
    }
    out
}

/// The `copy_runs` table of `parts`, one after the other: `i32` (source,
/// destination, bytes) per run. A pack's runs are (buffer, workspace)
/// offsets and an unpack's (workspace, buffer): `messages` gives both as
/// (leg buffer offset, workspace offset, bytes), so the unpack's are
/// swapped here.
fn run_table(parts: &[&[RunCopy]; 3]) -> Result<Vec<u32>, String> {
    let mut table = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        for &(buffer, work, bytes) in part.iter() {
            let (src, dst) = if i == 2 {
                (work, buffer)
            } else {
                (buffer, work)
            };
            for v in [src, dst, bytes] {
                let v = i32::try_from(v).map_err(|_| {
                    format!("a run at byte {v} is beyond what `copy_runs` addresses (2 GiB)")
                })?;
                table.push(v as u32);
            }
        }
    }
    Ok(table)
}

/// `u32` values as little-endian bytes.
fn words_le(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian `u32` values of `bytes` (a trailing partial word dropped).
fn read_words(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::program::Space;

    fn run(offset: usize, len: usize) -> Run {
        Run { offset, len }
    }

    /// A message's bytes cut into rounds: every byte once, in order, each
    /// piece inside its run.
    #[test]
    fn cut_runs_covers_each_byte_once() {
        let runs = [run(100, 30), run(0, 5), run(500, 70)];
        let mut seen = Vec::new();
        for round in 0..7u64 {
            for (offset, len) in cut_runs(&runs, round * 16..(round + 1) * 16) {
                assert!(len <= 16);
                seen.extend(offset..offset + len);
            }
        }
        let want: Vec<u64> = (100..130).chain(0..5).chain(500..570).collect();
        assert_eq!(seen, want);
        assert_eq!(cut_runs(&runs, 30..35), vec![(0, 5)]);
        assert_eq!(cut_runs(&runs, 28..40), vec![(128, 2), (0, 5), (500, 5)]);
        assert!(cut_runs(&runs, 105..1000).is_empty());
    }

    /// One run goes in place; several are packed one after the other; the
    /// own rank is left out.
    #[test]
    fn messages_pack_only_what_is_scattered() {
        let addr = |space, offset| Addr {
            rank: 3,
            space,
            offset,
        };
        let at = (addr(Space::Arena, 0), addr(Space::Work, 0));
        let peers = vec![
            vec![run(40, 8)],
            vec![run(0, 4), run(16, 4)],
            vec![run(0, 9)],
        ];
        let (ops, runs) = messages(&peers, (2, 10), at, 0..u64::MAX);
        assert_eq!(
            ops,
            vec![
                (10, addr(Space::Arena, 40), 8),
                (11, addr(Space::Work, 0), 8)
            ]
        );
        assert_eq!(runs, vec![(0, 0, 4), (16, 4, 4)]);
        assert_eq!(rounds(&peers, 2, 3), 3);
        assert_eq!(rounds(&peers, 0, 3), 3);
    }
}
