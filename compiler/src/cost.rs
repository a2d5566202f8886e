//! The cost model: an alpha-beta model per link class for collectives and a
//! roofline for kernels, both parameterised only by the mesh description
//! (device peak FLOP/s and memory bandwidth, link bandwidths and latencies).
//!
//! - Kernel: `max(flops / peak_flops, bytes / memory_bandwidth) + launch`.
//! - Collective over a link class: `latency + bytes_sent / bandwidth`; the
//!   intra- and inter-node legs of a flat all-to-all run at once, so it costs
//!   the slower leg. Messages to all peers are posted together, so the latency
//!   is paid once per collective, not once per peer.
//! - Routing volume under uniform routing: a rank sends `T · k` rows (times
//!   `etp` shards); the share `1/G` for its own rank stays home (G = ranks of
//!   the EP group), `(g-1)/G` crosses the node's links (g = the group's ranks
//!   per node) and the rest crosses nodes. The hierarchical all-to-all sends a
//!   token once per destination node ([`expected_remote_nodes`], measured on
//!   the layer's own selection rule by [`crate::destinations`]).
//!
//! The same numbers serve egg's extraction ([`OverlapCost`]) and the estimates
//! the scheduler writes into each op of the plan, which the timeline simulator
//! replays with the streams' real concurrency.

use crate::ir::{value_bytes, Meta, MetaAnalysis, Model, MoeIr};
use egg::{CostFunction, EGraph, Id, Language};
use moec_runtime::plan::{
    CapacityConfig, DType, DropPolicy, LinkConfig, HIER_ROUTING_BYTES_PER_ASSIGNMENT,
    HIER_ROUTING_BYTES_PER_TOKEN, HIER_SIZE_BYTES_PER_PEER,
};

/// Fixed cost of launching one kernel, in microseconds. A modelling constant
/// (typical CUDA launch latency), not fitted to any benchmark; it is what makes
/// fusing a chain of small kernels and cutting tokens into many chunks cost
/// something.
pub const KERNEL_LAUNCH_US: f64 = 2.0;

/// Which per-rank resource an op occupies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// Free (views, leaves).
    None,
    /// The SMs: kernels and GEMMs.
    Compute,
    /// The links: collectives.
    Network,
}

/// The estimated cost of one IR node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeCost {
    /// Time on the compute resource, us.
    pub compute_us: f64,
    /// Time on the network resource, us.
    pub network_us: f64,
    pub flops: f64,
    /// Memory traffic of its kernels, bytes.
    pub memory_bytes: f64,
    /// Bytes one rank sends over the links.
    pub wire_bytes: f64,
}

impl NodeCost {
    pub fn time_us(&self) -> f64 {
        self.compute_us + self.network_us
    }
}

/// Roofline time of one kernel, us, launch included.
pub fn kernel_us(model: &Model, flops: f64, bytes: f64) -> f64 {
    let d = &model.mesh.device;
    let t = (flops / d.peak_flops).max(bytes / d.memory_bandwidth);
    t * 1e6 + KERNEL_LAUNCH_US
}

/// Time of one GEMM `[m, k] · [n, k]ᵀ` repeated `groups` times with `m` total
/// rows, storage `dtype`, output `out_dtype`.
pub fn gemm(model: &Model, m: f64, n: u64, k: u64, groups: u64, out_dtype: DType) -> NodeCost {
    let db = model.dtype.bytes() as f64;
    let flops = 2.0 * m * n as f64 * k as f64;
    let bytes = m * k as f64 * db
        + groups as f64 * n as f64 * k as f64 * db
        + m * n as f64 * out_dtype.bytes() as f64;
    NodeCost {
        compute_us: kernel_us(model, flops, bytes),
        flops,
        memory_bytes: bytes,
        ..NodeCost::default()
    }
}

/// A memory-bound kernel moving `bytes`.
pub fn memory_kernel(model: &Model, bytes: f64) -> NodeCost {
    NodeCost {
        compute_us: kernel_us(model, 0.0, bytes),
        memory_bytes: bytes,
        ..NodeCost::default()
    }
}

/// The busiest EP rank's load over the mean, which sets the pace of every
/// step whose work follows the routing (a collective ends when its busiest
/// receiver, on the way out, or sender, on the way back, is done; the expert
/// GEMMs when the busiest rank's are): the placement's skew under uniform
/// routing, or the measured one (`moec simulate --stats`). Capacity layers
/// compute every slot and send at most the capacity, so 1 there.
pub fn busiest_rank(model: &Model) -> f64 {
    if model.capacity.is_none() {
        model.load_skew.max(1.0)
    } else {
        1.0
    }
}

/// One leg of a collective: `latency + bytes / bandwidth`, us.
fn leg_us(bytes: f64, latency: f64, bandwidth: f64) -> f64 {
    if bytes <= 0.0 {
        return 0.0;
    }
    (latency + bytes / bandwidth) * 1e6
}

/// Bytes of one row of `cols` elements of `dtype` (fp8 with its block scales).
pub fn row_bytes(cols: u64, dtype: DType) -> f64 {
    value_bytes(1, cols, dtype) as f64
}

/// Shares of a rank's rows that stay on the rank, cross the node's links, and
/// cross nodes, under uniform routing.
pub fn destination_shares(model: &Model) -> (f64, f64, f64) {
    let g = model.group_ranks as f64;
    let per_node = model.group_ranks_per_node as f64;
    let local = 1.0 / g;
    let intra = (per_node - 1.0) / g;
    let inter = (g - per_node) / g;
    (local, intra, inter)
}

/// A flat all-to-all of `rows` rows of `row_bytes` bytes each: intra- and
/// inter-node legs at once.
pub fn flat_all_to_all(model: &Model, rows: f64, row_bytes: f64) -> NodeCost {
    let (_, intra, inter) = destination_shares(model);
    let intra_bytes = rows * intra * row_bytes;
    let inter_bytes = rows * inter * row_bytes;
    let busiest = busiest_rank(model);
    let intra_link = model.mesh.intra_node;
    let intra_us = leg_us(
        intra_bytes * busiest,
        intra_link.latency,
        intra_link.bandwidth,
    );
    let inter_us = match model.mesh.inter_node {
        Some(l) => leg_us(inter_bytes * busiest, l.latency, l.bandwidth),
        // One node: everything goes over the node's links.
        None => leg_us(
            inter_bytes * busiest,
            intra_link.latency,
            intra_link.bandwidth,
        ),
    };
    NodeCost {
        network_us: intra_us.max(inter_us),
        wire_bytes: intra_bytes + inter_bytes,
        ..NodeCost::default()
    }
}

/// Expected number of nodes other than its own that a token's `k` experts live
/// on, under the layer's routing ([`crate::destinations`]: group-limited
/// routing confines the picks to the kept groups, which is what makes
/// DeepSeek-V3's hierarchical dispatch pay).
pub fn expected_remote_nodes(model: &Model) -> f64 {
    if model.group_nodes <= 1 {
        return 0.0;
    }
    model.destinations.remote_nodes
}

/// The cost of one IR node, from the metas of its children.
pub fn node_cost(model: &Model, node: &MoeIr, meta: &dyn Fn(Id) -> Meta) -> NodeCost {
    let h = model.hidden;
    let e = model.experts as f64;
    let k = model.top_k as f64;
    let db = model.dtype.bytes() as f64;
    let route_bytes = |rows: f64| rows * k * 8.0;
    match node {
        MoeIr::Input | MoeIr::Num(_) | MoeIr::Split(_) | MoeIr::Pipeline(_) => NodeCost::default(),
        MoeIr::Logits(x) => gemm(
            model,
            meta(*x).rows_expected,
            model.experts,
            h,
            1,
            DType::F32,
        ),
        MoeIr::Scores(a) | MoeIr::Bias(a) | MoeIr::Groups(a) => {
            let rows = meta(*a).rows_expected;
            memory_kernel(model, 2.0 * rows * e * 4.0)
        }
        MoeIr::Topk(a) => {
            let rows = meta(*a).rows_expected;
            memory_kernel(model, rows * e * 4.0 + route_bytes(rows))
        }
        MoeIr::Normalize(a) | MoeIr::Scale(a) => {
            let rows = meta(*a).rows_expected;
            memory_kernel(model, 2.0 * route_bytes(rows))
        }
        MoeIr::Router(a) => {
            let rows = meta(*a).rows_expected;
            memory_kernel(model, rows * e * 4.0 + e * 4.0 + route_bytes(rows))
        }
        MoeIr::Assign(r) => assign_cost(model, meta(*r).rows_expected),
        MoeIr::Permute([x, _]) | MoeIr::PermutePack([x, _]) => {
            let rows = model.routed_rows_expected(meta(*x).rows_expected);
            memory_kernel(model, 2.0 * rows * h as f64 * db)
        }
        MoeIr::Pack(p) => {
            let v = meta(*p);
            memory_kernel(model, 2.0 * v.rows_expected * row_bytes(v.cols, v.dtype))
        }
        MoeIr::Quant(p) => {
            let v = meta(*p);
            let rows = v.rows_expected;
            memory_kernel(
                model,
                rows * row_bytes(v.cols, v.dtype) + rows * row_bytes(v.cols, DType::Fp8E4m3),
            )
        }
        MoeIr::Dequant(r) => {
            let v = meta(*r);
            let rows = v.rows_expected;
            memory_kernel(
                model,
                rows * row_bytes(v.cols, v.dtype) + rows * row_bytes(v.cols, model.dtype),
            )
        }
        MoeIr::Dispatch(p) => {
            let v = meta(*p);
            flat_all_to_all(model, v.rows_expected, row_bytes(v.cols, v.dtype))
        }
        MoeIr::DispatchInter(p) => {
            let v = meta(*p);
            let tokens = v.rows_expected / model.rows_per_token().max(1) as f64;
            let staged = tokens * expected_remote_nodes(model);
            let (_, _, inter) = destination_shares(model);
            // Each staged token's routing travels beside it.
            let routing = staged * HIER_ROUTING_BYTES_PER_TOKEN as f64
                + v.rows_expected * inter * HIER_ROUTING_BYTES_PER_ASSIGNMENT as f64
                + (model.group_nodes - 1) as f64 * HIER_SIZE_BYTES_PER_PEER as f64;
            inter_leg(model, staged * row_bytes(v.cols, v.dtype) + routing)
        }
        MoeIr::DispatchIntra(s) => {
            // The forwarder hands every kept assignment of the tokens it staged
            // to the rank of its node that holds the expert: by symmetry as
            // many rows as one rank routes, not one per staged token.
            let v = meta(*s);
            let tokens = model.tokens as f64 / v.chunks.max(1) as f64;
            intra_leg(
                model,
                model.routed_rows_expected(tokens),
                row_bytes(v.cols, v.dtype),
            )
        }
        MoeIr::Combine([y, a]) => {
            let rows = model.routed_rows_expected(meta(*a).rows_expected);
            let v = meta(*y);
            flat_all_to_all(model, rows, row_bytes(v.cols, v.dtype))
        }
        MoeIr::CombineIntra([y, a]) => {
            let rows = model.routed_rows_expected(meta(*a).rows_expected);
            let v = meta(*y);
            intra_leg(model, rows, row_bytes(v.cols, v.dtype))
        }
        MoeIr::CombineInter([_, a]) => {
            // Every returning row of another node crosses nodes once: the rows
            // are not summed inside the node (that needs the routing weights on
            // the expert side, which this plan format does not carry yet).
            let (_, _, inter) = destination_shares(model);
            let rows = model.routed_rows_expected(meta(*a).rows_expected) * inter;
            inter_leg(model, rows * row_bytes(h, model.dtype))
        }
        MoeIr::Up(r) | MoeIr::UpAct(r) => {
            let v = meta(*r);
            let n = if model.gated {
                2 * model.ffn_local
            } else {
                model.ffn_local
            };
            let rows = v.rows_expected * busiest_rank(model);
            let mut c = gemm(model, rows, n, h, model.local_experts, model.dtype);
            if matches!(node, MoeIr::UpAct(_)) {
                // The epilogue writes the activated half-width result instead.
                let saved = rows * (n - model.ffn_local) as f64 * db;
                c.memory_bytes -= saved;
                c = recost(model, c);
            }
            c
        }
        MoeIr::Act(u) => {
            let v = meta(*u);
            memory_kernel(
                model,
                v.rows_expected
                    * busiest_rank(model)
                    * (v.cols as f64 + model.ffn_local as f64)
                    * db,
            )
        }
        MoeIr::Down(a) => {
            let v = meta(*a);
            gemm(
                model,
                v.rows_expected * busiest_rank(model),
                h,
                model.ffn_local,
                model.local_experts,
                model.dtype,
            )
        }
        MoeIr::Unpermute([c, _]) => {
            let v = meta(*c);
            memory_kernel(model, 2.0 * v.rows_expected * h as f64 * db)
        }
        MoeIr::Wsum([u, a]) => {
            let v = meta(*u);
            let tokens = meta(*a).rows_expected;
            memory_kernel(
                model,
                v.rows_expected * h as f64 * db + route_bytes(tokens) + tokens * h as f64 * db,
            )
        }
        MoeIr::UnpermuteWsum([c, a]) => {
            let v = meta(*c);
            let tokens = meta(*a).rows_expected;
            memory_kernel(
                model,
                v.rows_expected * h as f64 * db + route_bytes(tokens) + tokens * h as f64 * db,
            )
        }
        MoeIr::PackRank([x, _]) => {
            // `assign_rank` writes the by-rank slots and metadata rows, then
            // the rows are gathered into the send buffer.
            let tokens = meta(*x).rows_expected;
            let rows = model.rank_rows_expected(tokens);
            let route = rank_route_cost(model, tokens);
            let pack = memory_kernel(model, 2.0 * rows * h as f64 * db);
            NodeCost {
                compute_us: route.compute_us + pack.compute_us,
                memory_bytes: route.memory_bytes + pack.memory_bytes,
                ..NodeCost::default()
            }
        }
        MoeIr::DispatchRank(p) => {
            // The rows and, beside them, each row's picks (a second message).
            let v = meta(*p);
            let rows = flat_all_to_all(model, v.rows_expected, row_bytes(v.cols, v.dtype));
            let picks = rank_meta_all_to_all(model, v.rows_expected);
            NodeCost {
                network_us: rows.network_us + picks.network_us,
                wire_bytes: rows.wire_bytes + picks.wire_bytes,
                ..NodeCost::default()
            }
        }
        MoeIr::Expand([r, _]) => {
            // `assign_expand` (the expert row of every pick), then each
            // received row copied to its picks' expert rows.
            let v = meta(*r);
            let busiest = busiest_rank(model);
            let expert_rows = model.expert_rows_expected(v.chunks) * busiest;
            let rows = v.rows_expected * busiest;
            let index = expand_index_cost(model, rows);
            let copy = memory_kernel(model, (rows + expert_rows) * h as f64 * db + rows * k * 8.0);
            NodeCost {
                compute_us: index.compute_us + copy.compute_us,
                memory_bytes: index.memory_bytes + copy.memory_bytes,
                ..NodeCost::default()
            }
        }
        MoeIr::Gather([r, _]) => {
            // `assign_expand` only: the up projection reads the received rows
            // through the index, as many bytes as it reads of expert rows.
            let v = meta(*r);
            expand_index_cost(model, v.rows_expected * busiest_rank(model))
        }
        MoeIr::DownReduce([y, a]) => {
            // The down projection whose epilogue sums each received row's
            // picks (index and weights read) and writes one row per
            // received by-rank row instead of one per pick.
            let busiest = busiest_rank(model);
            let expert_rows = meta(*y).rows_expected * busiest;
            let rows = model.rank_rows_expected(meta(*a).rows_expected) * busiest;
            let mut c = gemm(
                model,
                expert_rows,
                h,
                model.ffn_local,
                model.local_experts,
                model.dtype,
            );
            c.memory_bytes += (rows - expert_rows) * h as f64 * db + rows * k * 8.0;
            recost(model, c)
        }
        MoeIr::Reduce([y, a]) => {
            let busiest = busiest_rank(model);
            let expert_rows = meta(*y).rows_expected * busiest;
            let rows = model.rank_rows_expected(meta(*a).rows_expected) * busiest;
            memory_kernel(model, (expert_rows + rows) * h as f64 * db + rows * k * 8.0)
        }
        MoeIr::CombineRank(r) => {
            let v = meta(*r);
            flat_all_to_all(model, v.rows_expected, row_bytes(v.cols, v.dtype))
        }
        MoeIr::DispatchRankInter(p) => {
            // One copy per token and remote node, with the token's routing
            // there: a count, and per destination rank its index and row.
            let v = meta(*p);
            let tokens = model.tokens as f64 / v.chunks.max(1) as f64;
            let staged = tokens * expected_remote_nodes(model);
            let (_, _, inter) = destination_shares(model);
            let routing = staged * HIER_ROUTING_BYTES_PER_TOKEN as f64
                + v.rows_expected * inter * HIER_ROUTING_BYTES_PER_ASSIGNMENT as f64
                + (model.group_nodes - 1) as f64 * HIER_SIZE_BYTES_PER_PEER as f64;
            inter_leg(model, staged * row_bytes(v.cols, v.dtype) + routing)
        }
        MoeIr::DispatchRankIntra(s) => {
            // The forwarder hands each staged token to each of its ranks on
            // the node (one row per token and rank, as the flat form), and
            // the picks travel beside, flat.
            let v = meta(*s);
            let rows = model.rank_rows_expected(model.tokens as f64 / v.chunks.max(1) as f64);
            let leg = intra_leg(model, rows, row_bytes(v.cols, v.dtype));
            let picks = rank_meta_all_to_all(model, rows);
            NodeCost {
                network_us: leg.network_us + picks.network_us,
                wire_bytes: leg.wire_bytes + picks.wire_bytes,
                ..NodeCost::default()
            }
        }
        MoeIr::CombineRankIntra(r) => forwarder_sum_leg(model, &meta(*r)),
        MoeIr::CombineRankInter(c) => {
            // One partial sum per token and remote node crosses back.
            let v = meta(*c);
            let tokens = model.tokens as f64 / v.chunks.max(1) as f64;
            inter_leg(
                model,
                tokens * expected_remote_nodes(model) * row_bytes(h, model.dtype),
            )
        }
        MoeIr::SumRank([c, a]) => {
            let rows = meta(*c).rows_expected;
            let tokens = meta(*a).rows_expected;
            let g = model.group_ranks as f64;
            memory_kernel(model, (rows + tokens) * h as f64 * db + tokens * g * 4.0)
        }
        MoeIr::SharedUp(x) | MoeIr::SharedUpAct(x) => {
            let rows = meta(*x).rows_expected;
            let (width, gated) = shared_dims(model);
            let n = if gated { 2 * width } else { width };
            let mut c = gemm(model, rows, n, h, 1, model.dtype);
            if matches!(node, MoeIr::SharedUpAct(_)) {
                c.memory_bytes -= rows * (n - width) as f64 * db;
                c = recost(model, c);
            }
            c
        }
        MoeIr::SharedAct(u) => {
            let v = meta(*u);
            let (width, _) = shared_dims(model);
            memory_kernel(model, v.rows_expected * (v.cols + width) as f64 * db)
        }
        MoeIr::SharedDown(a) => {
            let rows = meta(*a).rows_expected;
            let (width, _) = shared_dims(model);
            gemm(model, rows, h, width, 1, model.dtype)
        }
        MoeIr::SharedGate([x, _]) => {
            let rows = meta(*x).rows_expected;
            let mut c = memory_kernel(model, 3.0 * rows * h as f64 * db);
            c.flops = 2.0 * rows * h as f64;
            c
        }
        MoeIr::Add([r, _]) | MoeIr::AddPar([r, _]) => {
            let rows = meta(*r).rows_expected;
            memory_kernel(model, 3.0 * rows * h as f64 * db)
        }
    }
}

fn shared_dims(model: &Model) -> (u64, bool) {
    model
        .shared
        .as_ref()
        .map(|s| (s.width, s.gated))
        .unwrap_or((0, false))
}

fn recost(model: &Model, c: NodeCost) -> NodeCost {
    NodeCost {
        compute_us: kernel_us(model, c.flops, c.memory_bytes),
        ..c
    }
}

/// The slowest link a collective over the whole EP group crosses: the
/// inter-node link when the group spans nodes, the node's links otherwise
/// (a group inside one node never touches the network, even when `dp`
/// replicas make the mesh span several nodes).
pub fn group_link(model: &Model) -> LinkConfig {
    match model.mesh.inter_node {
        Some(inter) if model.group_nodes > 1 => inter,
        _ => model.mesh.intra_node,
    }
}

/// The inter-node leg of a hierarchical all-to-all, sending `bytes`.
fn inter_leg(model: &Model, bytes: f64) -> NodeCost {
    let link = group_link(model);
    NodeCost {
        network_us: leg_us(bytes * busiest_rank(model), link.latency, link.bandwidth),
        wire_bytes: bytes,
        ..NodeCost::default()
    }
}

/// The node-local leg of a hierarchical all-to-all: the forwarding rank hands
/// each row to the rank of its node that holds the expert; the share
/// `1/g` whose expert is on the forwarding rank itself stays put.
pub fn intra_leg(model: &Model, rows: f64, row_bytes: f64) -> NodeCost {
    let per_node = model.group_ranks_per_node.max(1) as f64;
    let bytes = rows * (per_node - 1.0) / per_node * row_bytes;
    let link = model.mesh.intra_node;
    NodeCost {
        network_us: leg_us(bytes * busiest_rank(model), link.latency, link.bandwidth),
        wire_bytes: bytes,
        ..NodeCost::default()
    }
}

/// The reducing combine's intra-node leg over the reduced rows `v`: every
/// rank returns its partial sums to the forwarders of its node, which add a
/// token's partials into one row. The sum is fused into the leg (the
/// forwarder adds as the rows arrive), so it costs its memory traffic at the
/// device's bandwidth, no launch of its own.
pub fn forwarder_sum_leg(model: &Model, v: &Meta) -> NodeCost {
    let row = row_bytes(v.cols, v.dtype);
    let mut c = intra_leg(model, v.rows_expected, row);
    let staged = model.tokens as f64 / v.chunks.max(1) as f64 * model.destinations.nodes;
    let sum_bytes = (v.rows_expected + staged) * row;
    c.network_us += sum_bytes / model.mesh.device.memory_bandwidth * 1e6;
    c
}

/// Bytes of one by-rank metadata row: each pick's local expert index and
/// weight (i32 and f32), as the runtime's layout contract says.
pub fn rank_meta_row_bytes(model: &Model) -> f64 {
    moec_runtime::plan::by_rank_pick_cols(model.top_k) as f64 * 4.0
}

/// The metadata all-to-all beside a by-rank dispatch of `rows` rows.
pub fn rank_meta_all_to_all(model: &Model, rows: f64) -> NodeCost {
    flat_all_to_all(model, rows, rank_meta_row_bytes(model))
}

/// `assign_rank` for `tokens` tokens: reads their routing, writes the by-rank
/// slots (`[T, G]` i32) and a metadata row per by-rank row.
pub fn rank_route_cost(model: &Model, tokens: f64) -> NodeCost {
    let k = model.top_k as f64;
    let g = model.group_ranks as f64;
    let rows = model.rank_rows_expected(tokens);
    memory_kernel(
        model,
        tokens * k * 12.0 + tokens * g * 4.0 + rows * rank_meta_row_bytes(model),
    )
}

/// `assign_expand` for `rows` received by-rank rows: reads their metadata,
/// writes the expert row and weight of every pick.
pub fn expand_index_cost(model: &Model, rows: f64) -> NodeCost {
    memory_kernel(
        model,
        rows * rank_meta_row_bytes(model) + rows * model.top_k as f64 * 8.0,
    )
}

/// Bytes of the metadata collective of `assign`, per rank sent.
pub fn assign_exchange_bytes(model: &Model, tokens: f64) -> f64 {
    let peers = (model.group_ranks.saturating_sub(1)) as f64;
    match model.layer.capacity {
        // Per-expert counts to every peer.
        CapacityConfig::Dropless => peers * model.experts as f64 * 4.0,
        CapacityConfig::Limited {
            drop: DropPolicy::Position,
            ..
        } => peers * model.experts as f64 * 4.0,
        // Every assignment's expert and weight, so each rank ranks them all alike.
        CapacityConfig::Limited {
            drop: DropPolicy::Probs,
            ..
        } => peers * tokens * model.top_k as f64 * 8.0,
    }
}

fn assign_cost(model: &Model, tokens: f64) -> NodeCost {
    let k = model.top_k as f64;
    // Two passes: count per expert, then place every assignment.
    let count = memory_kernel(model, tokens * k * 8.0 + model.experts as f64 * 4.0);
    let place = memory_kernel(model, tokens * k * 8.0 + tokens * k * 12.0);
    let exchange = if model.group_ranks > 1 {
        let bytes = assign_exchange_bytes(model, tokens);
        let link = group_link(model);
        leg_us(
            bytes,
            link.latency.max(model.mesh.intra_node.latency),
            link.bandwidth,
        )
    } else {
        0.0
    };
    NodeCost {
        compute_us: count.compute_us + place.compute_us,
        network_us: exchange,
        memory_bytes: count.memory_bytes + place.memory_bytes,
        wire_bytes: if model.group_ranks > 1 {
            assign_exchange_bytes(model, tokens)
        } else {
            0.0
        },
        ..NodeCost::default()
    }
}

/// Extraction cost: the time on each resource and the critical path.
/// Sequential dataflow adds everything; a pipeline of `d` chunks costs one
/// chunk's critical path plus `d - 1` times the busier resource of a chunk; a
/// concurrent shared branch costs the larger of the routed critical path and
/// the compute both need. Compared by critical path, then by total busy time.
#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    pub critical_us: f64,
    pub compute_us: f64,
    pub network_us: f64,
}

impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (self.critical_us, self.compute_us + self.network_us)
            .partial_cmp(&(other.critical_us, other.compute_us + other.network_us))
    }
}

/// How tokens travel in a candidate plan: the per-assignment forms, dispatch
/// by rank, or dispatch by rank with the reducing combine. Each form's
/// candidates are extracted apart and compared by the simulator: the
/// extraction's tree cost adds a chunk's compute and network time, so it
/// cannot see that moving bytes off a busy link onto the SMs pays when the
/// chunks overlap; the simulated timeline can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RoutingForm {
    PerAssignment,
    /// Dispatch by rank, flat.
    DedupDispatch,
    /// Dispatch by rank and the reducing combine, flat.
    DedupReduce,
    /// Dispatch by rank through the hierarchical legs (a copy per node, then
    /// per rank inside the node).
    NodeDedupDispatch,
    /// The same with the reducing combine summed again per node.
    NodeDedupReduce,
}

impl RoutingForm {
    pub const ALL: [RoutingForm; 5] = [
        RoutingForm::PerAssignment,
        RoutingForm::DedupDispatch,
        RoutingForm::DedupReduce,
        RoutingForm::NodeDedupDispatch,
        RoutingForm::NodeDedupReduce,
    ];

    /// The form dispatches by rank.
    pub fn by_rank(self) -> bool {
        self != RoutingForm::PerAssignment
    }

    /// The form reduces before the combine's return trip.
    pub fn reduces(self) -> bool {
        matches!(
            self,
            RoutingForm::DedupReduce | RoutingForm::NodeDedupReduce
        )
    }

    /// The form's by-rank legs are the hierarchical ones.
    pub fn by_node(self) -> bool {
        matches!(
            self,
            RoutingForm::NodeDedupDispatch | RoutingForm::NodeDedupReduce
        )
    }

    /// The node kinds a candidate of this form may not contain. The
    /// reducing combine's hierarchical legs sum by the routing the
    /// hierarchical dispatch staged, so the two go together.
    pub fn forbids(self, node: &MoeIr) -> bool {
        let flat_rank_dispatch = matches!(node, MoeIr::DispatchRank(_));
        let node_rank_dispatch = matches!(
            node,
            MoeIr::DispatchRankInter(_) | MoeIr::DispatchRankIntra(_)
        );
        let plain_dispatch = matches!(
            node,
            MoeIr::Dispatch(_) | MoeIr::DispatchInter(_) | MoeIr::DispatchIntra(_)
        );
        let reduce = matches!(node, MoeIr::Reduce(_) | MoeIr::DownReduce(_));
        let plain_combine = matches!(
            node,
            MoeIr::Combine(_) | MoeIr::CombineInter(_) | MoeIr::CombineIntra(_)
        );
        let flat_rank_combine = matches!(node, MoeIr::CombineRank(_));
        let node_rank_combine = matches!(
            node,
            MoeIr::CombineRankIntra(_) | MoeIr::CombineRankInter(_)
        );
        let (dispatch_ok, by_node) = (!plain_dispatch, self.by_node());
        match self {
            RoutingForm::PerAssignment => flat_rank_dispatch || node_rank_dispatch || reduce,
            _ if !dispatch_ok => true,
            _ if by_node && flat_rank_dispatch => true,
            _ if !by_node && node_rank_dispatch => true,
            RoutingForm::DedupDispatch | RoutingForm::NodeDedupDispatch => reduce,
            RoutingForm::DedupReduce => plain_combine || node_rank_combine,
            RoutingForm::NodeDedupReduce => plain_combine || flat_rank_combine,
        }
    }

    /// Whether the rewrites made this form possible: every node kind it
    /// needs is in the e-graph.
    pub fn possible(self, has: &HasNode) -> bool {
        let rank = || has(&|n| matches!(n, MoeIr::DispatchRank(_)));
        let node = || has(&|n| matches!(n, MoeIr::DispatchRankInter(_)));
        let reduce = || has(&|n| matches!(n, MoeIr::Reduce(_) | MoeIr::DownReduce(_)));
        let node_reduce = || has(&|n| matches!(n, MoeIr::CombineRankIntra(_)));
        match self {
            RoutingForm::PerAssignment => true,
            RoutingForm::DedupDispatch => rank(),
            RoutingForm::DedupReduce => rank() && reduce(),
            RoutingForm::NodeDedupDispatch => node(),
            RoutingForm::NodeDedupReduce => node() && node_reduce(),
        }
    }

    /// The form of a plan, from its choices.
    pub fn of(choices: &moec_runtime::plan::Choices) -> RoutingForm {
        let by_node = choices.dispatch == moec_runtime::plan::A2aAlgorithm::Hierarchical;
        match (choices.dedup_dispatch, choices.reduce_combine, by_node) {
            (false, _, _) => RoutingForm::PerAssignment,
            (true, false, false) => RoutingForm::DedupDispatch,
            (true, true, false) => RoutingForm::DedupReduce,
            (true, false, true) => RoutingForm::NodeDedupDispatch,
            (true, true, true) => RoutingForm::NodeDedupReduce,
        }
    }

    /// How the candidate table names the form.
    pub fn name(self) -> &'static str {
        match self {
            RoutingForm::PerAssignment => "per pick",
            RoutingForm::DedupDispatch => "by rank",
            RoutingForm::DedupReduce => "by rank+reduce",
            RoutingForm::NodeDedupDispatch => "by node+rank",
            RoutingForm::NodeDedupReduce => "by node+rank+reduce",
        }
    }
}

/// Whether the e-graph holds a node the predicate accepts.
pub type HasNode<'a> = dyn Fn(&dyn Fn(&MoeIr) -> bool) -> bool + 'a;

/// The cost of a node a [`RoutingForm`] forbids, us.
const FORBIDDEN_US: f64 = 1e30;

/// egg's cost function for the MoE IR (see [`Cost`]), extracting only the
/// forms `form` allows (a forbidden node costs [`FORBIDDEN_US`]).
pub struct OverlapCost<'a> {
    pub egraph: &'a EGraph<MoeIr, MetaAnalysis>,
    pub form: RoutingForm,
}

impl CostFunction<MoeIr> for OverlapCost<'_> {
    type Cost = Cost;

    fn cost<C>(&mut self, enode: &MoeIr, mut costs: C) -> Cost
    where
        C: FnMut(Id) -> Cost,
    {
        if self.form.forbids(enode) {
            // Finite, so `0 x cost` stays 0 (a pipeline of one chunk) and
            // every comparison is defined; far above any real plan.
            return Cost {
                critical_us: FORBIDDEN_US,
                compute_us: FORBIDDEN_US,
                network_us: FORBIDDEN_US,
            };
        }
        let model = &self.egraph.analysis.model;
        let meta = |id: Id| self.egraph[id].data.clone();
        let own = node_cost(model, enode, &meta);
        match enode {
            MoeIr::Pipeline([d, _, _, body]) => {
                let d = self.egraph[*d].data.num.unwrap_or(1).max(1) as f64;
                let b = costs(*body);
                Cost {
                    critical_us: b.critical_us + (d - 1.0) * b.compute_us.max(b.network_us),
                    compute_us: d * b.compute_us,
                    network_us: d * b.network_us,
                }
            }
            MoeIr::AddPar([r, s]) => {
                let r = costs(*r);
                let s = costs(*s);
                Cost {
                    critical_us: r.critical_us.max(r.compute_us + s.compute_us) + own.time_us(),
                    compute_us: r.compute_us + s.compute_us + own.compute_us,
                    network_us: r.network_us + s.network_us,
                }
            }
            _ => {
                let mut total = Cost {
                    critical_us: own.time_us(),
                    compute_us: own.compute_us,
                    network_us: own.network_us,
                };
                for child in enode.children() {
                    let c = costs(*child);
                    total.critical_us += c.critical_us;
                    total.compute_us += c.compute_us;
                    total.network_us += c.network_us;
                }
                total
            }
        }
    }
}
