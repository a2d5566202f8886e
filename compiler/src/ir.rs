//! The per-rank dataflow IR of an MoE layer, as an egg [`Language`], and the
//! [`Meta`] analysis that gives every e-class its shape, dtype, bytes and FLOPs.
//!
//! Every rank runs the same program (SPMD), so the IR describes one rank: its
//! `T` tokens in, its `T` outputs out. The numbers that are the same for every
//! node (hidden size, experts, top-k, the mesh) live in [`Model`], which the
//! analysis holds; nodes carry only structure. That keeps the e-graph the same
//! size for 8 ranks and for 1024.
//!
//! Node glossary (children in brackets):
//! - `input`: the rank's tokens `x[T, H]`.
//! - router chain: `logits[x]` (the gate GEMM), `scores`, `bias`, `groups`,
//!   `topk`, `normalize`, `scale` (each over the previous stage), or the fused
//!   `router[logits]`. Only the stages the layer has appear.
//! - `assign[r]`: destination rank, expert and slot of each of the `T × k`
//!   assignments, after exchanging counts (dropless) or the drop metadata
//!   (capacity mode).
//! - `pipeline[d, x, a, body]`: the routed part run over `d` token chunks;
//!   `body` is one chunk's dataflow over `split[d, x]` and `split[d, a]`.
//!   The lowering emits `pipeline 1`; the `overlap_chunks` rule adds more.
//! - dispatch side: `permute[x, a]` then `pack`, or `permute_pack[x, a]`;
//!   `quant`/`dequant` around the wire for fp8; `dispatch` (flat all-to-all) or
//!   `dispatch_intra[dispatch_inter[..]]` (hierarchical).
//! - experts: `up`, `act`, `down`, or `up_act` (activation in the GEMM epilogue).
//! - combine side: `combine` or `combine_inter[combine_intra[..]]`, then
//!   `unpermute` + `wsum`, or `unpermute_wsum`.
//! - dispatch by rank (`dedup_dispatch`): `pack_rank[x, a]` (one row per
//!   token and destination rank), `dispatch_rank` (its all-to-all, the picks'
//!   metadata beside), `expand[r, a]` (each received row copied to the expert
//!   rows of its picks: the same expert input as `dispatch`).
//! - reducing combine (`reduce_combine`): `reduce[y, a]` (a received row's
//!   expert outputs summed, weighted), `combine_rank` (its return trip, one
//!   row per token and rank), `sum_rank[c, a]` (the source sums a token's
//!   rows over the ranks).
//! - their hierarchical forms: `dispatch_rank_intra[dispatch_rank_inter[..]]`
//!   (one copy per token and node, then one per token and rank inside the
//!   node) and `combine_rank_inter[combine_rank_intra[..]]` (the node's
//!   forwarder sums a token's rows: one per token and node crosses back).
//! - shared experts: `shared_up`, `shared_act`, `shared_up_act`, `shared_down`,
//!   `shared_gate[x, y]`.
//! - `add[routed, shared]` (shared runs after the routed part, one stream) or
//!   `add_par[routed, shared]` (shared on its own stream while tokens travel).

use egg::{define_language, Analysis, DidMerge, EGraph, Id, Language, RecExpr};
use moec_lang::spec::{self, Capacity, CapacityLimit, Ffn, Program};
use moec_runtime::plan::{self as rt, DType};

define_language! {
    /// The node kinds of the per-rank dataflow; see the module documentation.
    pub enum MoeIr {
        "input" = Input,
        "logits" = Logits(Id),
        "scores" = Scores(Id),
        "bias" = Bias(Id),
        "groups" = Groups(Id),
        "topk" = Topk(Id),
        "normalize" = Normalize(Id),
        "scale" = Scale(Id),
        "router" = Router(Id),
        "assign" = Assign(Id),
        "pipeline" = Pipeline([Id; 4]),
        "split" = Split([Id; 2]),
        "permute" = Permute([Id; 2]),
        "pack" = Pack(Id),
        "permute_pack" = PermutePack([Id; 2]),
        "quant" = Quant(Id),
        "dequant" = Dequant(Id),
        "dispatch" = Dispatch(Id),
        "dispatch_inter" = DispatchInter(Id),
        "dispatch_intra" = DispatchIntra(Id),
        "up" = Up(Id),
        "act" = Act(Id),
        "up_act" = UpAct(Id),
        "down" = Down(Id),
        "combine" = Combine([Id; 2]),
        "combine_intra" = CombineIntra([Id; 2]),
        "combine_inter" = CombineInter([Id; 2]),
        "unpermute" = Unpermute([Id; 2]),
        "wsum" = Wsum([Id; 2]),
        "unpermute_wsum" = UnpermuteWsum([Id; 2]),
        "pack_rank" = PackRank([Id; 2]),
        "dispatch_rank" = DispatchRank(Id),
        "expand" = Expand([Id; 2]),
        "gather" = Gather([Id; 2]),
        "reduce" = Reduce([Id; 2]),
        "down_reduce" = DownReduce([Id; 2]),
        "combine_rank" = CombineRank(Id),
        "dispatch_rank_inter" = DispatchRankInter(Id),
        "dispatch_rank_intra" = DispatchRankIntra(Id),
        "combine_rank_intra" = CombineRankIntra(Id),
        "combine_rank_inter" = CombineRankInter(Id),
        "sum_rank" = SumRank([Id; 2]),
        "shared_up" = SharedUp(Id),
        "shared_act" = SharedAct(Id),
        "shared_up_act" = SharedUpAct(Id),
        "shared_down" = SharedDown(Id),
        "shared_gate" = SharedGate([Id; 2]),
        "add" = Add([Id; 2]),
        "add_par" = AddPar([Id; 2]),
        Num(u64),
    }
}

/// A router stage, in the order the layer applies them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterStage {
    Scores,
    Bias,
    Groups,
    Topk,
    Normalize,
    Scale,
}

impl RouterStage {
    pub fn node_name(self) -> &'static str {
        match self {
            RouterStage::Scores => "scores",
            RouterStage::Bias => "bias",
            RouterStage::Groups => "groups",
            RouterStage::Topk => "topk",
            RouterStage::Normalize => "normalize",
            RouterStage::Scale => "scale",
        }
    }
}

/// Shared experts as the IR sees them: one fused FFN of `width` columns.
#[derive(Clone, Debug, PartialEq)]
pub struct SharedModel {
    pub width: u64,
    pub gated: bool,
    pub sigmoid_gate: bool,
}

/// Everything about the layer and mesh that the IR, the cost model and the
/// scheduler need, in one place, with the per-rank sizes worked out.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// The layer and mesh as the runtime sees them (copied into the plan).
    pub layer: rt::LayerConfig,
    pub mesh: rt::MeshConfig,
    /// Tokens per rank.
    pub tokens: u64,
    pub hidden: u64,
    pub experts: u64,
    pub top_k: u64,
    /// Intermediate width of one expert shard on one rank (`intermediate / etp`).
    pub ffn_local: u64,
    pub gated: bool,
    pub dtype: DType,
    /// The layer allows fp8 on the dispatch wire.
    pub fp8_dispatch_allowed: bool,
    /// Most experts (primaries and replicas) any EP rank holds.
    pub local_experts: u64,
    pub ep: u64,
    pub etp: u64,
    /// Ranks of one EP group (`ep * etp`).
    pub group_ranks: u64,
    /// Nodes one EP group spans.
    pub group_nodes: u64,
    /// Ranks of one EP group on one node.
    pub group_ranks_per_node: u64,
    /// Capacity per expert (slots per EP group), or `None` when dropless.
    pub capacity: Option<u64>,
    pub router_stages: Vec<RouterStage>,
    pub shared: Option<SharedModel>,
    /// Where one token's picks land under uniform routing (distinct ranks
    /// and nodes), measured once per model on the layer's selection rule.
    pub destinations: crate::destinations::Destinations,
    /// Dropless layers: the factor of the expected load the expert-side
    /// buffers hold (`None`: the worst case; capacity layers: `None`).
    pub headroom: Option<f64>,
    /// The busiest EP rank's expected load over the mean, under uniform
    /// routing (1 with one copy of every expert and as many on every rank;
    /// replicas and uneven placements raise it).
    pub load_skew: f64,
}

/// The headroom `headroom = auto` starts from: twice the expected load, so
/// uniform routing (whose per-rank fluctuation is a few standard deviations
/// of a binomial, far below the mean for chunks of tens of tokens) never
/// overflows, while the buffers stay a small fraction of the worst case,
/// which is `ep` times (or `top_k` times, per rank) the expected load.
pub const AUTO_HEADROOM: f64 = 2.0;
/// What `auto` lowers the headroom to, in turn, when the plan would not fit
/// the device: more passes re-run, but the layer runs.
pub const AUTO_HEADROOM_FALLBACKS: &[f64] = &[1.5, 1.25];

impl Model {
    /// Works out the per-rank model of a checked program.
    pub fn new(program: &Program) -> Result<Model, String> {
        let l = &program.layer;
        let m = &program.mesh;
        let layer = layer_config(program);
        let experts_of_ep_rank = m.experts_of_rank(l.experts.count);
        let mesh = rt::MeshConfig {
            nodes: m.nodes,
            gpus_per_node: m.gpus_per_node,
            ep: m.ep,
            etp: m.etp,
            dp: m.dp,
            device: rt::DeviceConfig {
                name: m.device.name.clone(),
                peak_flops: m.device.peak_flops,
                memory_bandwidth: m.device.memory_bandwidth,
                memory: m.device.memory,
            },
            intra_node: link(m.intra_node),
            inter_node: m.inter_node.map(link),
            experts_of_ep_rank,
        };
        let local_experts = mesh
            .experts_of_ep_rank
            .iter()
            .map(|e| e.len() as u64)
            .max()
            .unwrap_or(0)
            .max(1);
        let group_ranks = m.ep.checked_mul(m.etp).ok_or("ep × etp overflows")?.max(1);
        let gpn = m.gpus_per_node.max(1);
        let group_nodes = group_ranks.div_ceil(gpn).max(1);
        let group_ranks_per_node = group_ranks.min(gpn);
        let capacity = match l.capacity {
            Capacity::Dropless => None,
            Capacity::Limited { limit, .. } => Some(capacity_slots(program, limit)?),
        };
        let mut router_stages = vec![RouterStage::Scores];
        if l.router.selection_bias {
            router_stages.push(RouterStage::Bias);
        }
        if l.router.groups.is_some() {
            router_stages.push(RouterStage::Groups);
        }
        router_stages.push(RouterStage::Topk);
        if l.router.normalize {
            router_stages.push(RouterStage::Normalize);
        }
        if l.router.scale != 1.0 {
            router_stages.push(RouterStage::Scale);
        }
        let shared = l.shared.as_ref().map(|s| SharedModel {
            width: s.count.saturating_mul(s.intermediate),
            gated: matches!(s.ffn, Ffn::SwiGlu { .. }),
            sigmoid_gate: s.sigmoid_gate,
        });
        let destinations = crate::destinations::expected(
            l.experts.count,
            &layer.router,
            &crate::destinations::Mesh {
                experts_of_ep_rank: &mesh.experts_of_ep_rank,
                ranks_per_node: (group_ranks_per_node / m.etp.max(1)).max(1),
            },
        );
        let headroom = match (&capacity, program.schedule.headroom) {
            (Some(_), _) | (None, spec::Headroom::WorstCase) => None,
            (None, spec::Headroom::Auto) => Some(AUTO_HEADROOM),
            (None, spec::Headroom::Factor(h)) => Some(h),
        };
        // Uniform routing: every expert the same share of the picks.
        let uniform = vec![1.0; l.experts.count as usize];
        let load_skew = rank_load_skew(&uniform, &mesh.experts_of_ep_rank);
        Ok(Model {
            headroom,
            load_skew,
            destinations,
            tokens: l.tokens_per_rank,
            hidden: l.hidden,
            experts: l.experts.count,
            top_k: l.router.top_k,
            ffn_local: (l.experts.intermediate / m.etp.max(1)).max(1),
            gated: matches!(l.experts.ffn, Ffn::SwiGlu { .. }),
            dtype: layer.dtype,
            fp8_dispatch_allowed: l.dispatch_dtype == spec::DType::Fp8E4m3,
            local_experts,
            ep: m.ep.max(1),
            etp: m.etp.max(1),
            group_ranks,
            group_nodes,
            group_ranks_per_node,
            capacity,
            router_stages,
            shared,
            layer,
            mesh,
        })
    }

    /// The same model with another token count per rank (`moec simulate --tokens`).
    pub fn with_tokens(&self, tokens: u64) -> Model {
        let mut m = self.clone();
        m.tokens = tokens;
        m.layer.tokens_per_rank = tokens;
        // A capacity factor scales with the tokens; a fixed slot count does not.
        if let rt::CapacityConfig::Limited {
            slots,
            factor: Some(f),
            ..
        } = &mut m.layer.capacity
        {
            let c = (*f * (tokens * self.ep * self.top_k) as f64 / self.experts.max(1) as f64)
                .ceil()
                .max(1.0);
            *slots = c as u64;
            m.capacity = Some(c as u64);
        }
        m
    }

    /// Token rows that one rank sends per token (one per slot and expert shard).
    pub fn rows_per_token(&self) -> u64 {
        self.top_k.saturating_mul(self.etp)
    }

    /// The expected share of assignments that capacity keeps, under uniform
    /// routing: an expert expects `T · ep · k / E` assignments of its EP group
    /// and keeps at most `C` of them. Dropped assignments never travel, so the
    /// wire and the permute carry only this share of `T · k` rows.
    pub fn kept_fraction(&self) -> f64 {
        match self.capacity {
            None => 1.0,
            Some(c) => {
                let load = self.tokens as f64 * self.ep as f64 * self.top_k as f64
                    / self.experts.max(1) as f64;
                if load <= 0.0 {
                    1.0
                } else {
                    (c as f64 / load).min(1.0)
                }
            }
        }
    }

    /// Expected routed rows (kept assignments × expert shards) of `tokens` tokens.
    pub fn routed_rows_expected(&self, tokens: f64) -> f64 {
        tokens * self.rows_per_token() as f64 * self.kept_fraction()
    }

    /// Most by-rank rows one token sends (one per destination rank).
    pub fn rank_rows_per_token(&self) -> u64 {
        self.top_k.min(self.group_ranks)
    }

    /// Expected by-rank rows of `tokens` tokens: one per distinct destination
    /// rank of each token, before capacity drops (the counts are exchanged
    /// before drops are known, see the runtime's layout contract).
    pub fn rank_rows_expected(&self, tokens: f64) -> f64 {
        tokens * self.destinations.ranks
    }

    /// Worst-case by-rank rows one rank receives in one of `chunks` chunks:
    /// a row from every token of the EP group's chunk.
    pub fn rank_rows_received_worst(&self, chunks: u64) -> u64 {
        self.chunk_tokens(chunks).saturating_mul(self.group_ranks)
    }

    /// Rows of one rank's by-rank receive buffers for one of `chunks`
    /// chunks: the worst case, or for a dropless layer the busiest rank's
    /// expected rows of a full chunk times the headroom.
    pub fn rank_rows_received_max(&self, chunks: u64) -> u64 {
        let expected = self.rank_rows_expected(self.chunk_tokens(chunks) as f64) * self.load_skew;
        self.bounded(self.rank_rows_received_worst(chunks), expected)
    }

    /// `worst`, or for a dropless layer with a headroom `h` the rows
    /// `h x expected` (at least one row, at most `worst`).
    fn bounded(&self, worst: u64, expected: f64) -> u64 {
        match (self.capacity, self.headroom) {
            (None, Some(h)) => {
                let rows = (h * expected).ceil();
                if rows.is_finite() && rows < worst as f64 {
                    (rows as u64).max(1)
                } else {
                    worst
                }
            }
            _ => worst,
        }
    }

    /// The same model under measured routing (`moec simulate --stats`): the
    /// busiest rank's share of the picks from the file's tokens per expert
    /// under this placement, and, when the file keeps the per-token routing,
    /// the distinct ranks and nodes its tokens reach.
    pub fn with_stats(
        &self,
        stats: &moec_runtime::stats::RoutingStatistics,
    ) -> Result<Model, String> {
        if stats.experts != self.experts || stats.top_k != self.top_k {
            return Err(format!(
                "the statistics are of {} experts, top-{}; the layer has {} experts, top-{}",
                stats.experts, stats.top_k, self.experts, self.top_k
            ));
        }
        let mut m = self.clone();
        m.load_skew = rank_load_skew(&stats.load_shares(), &self.mesh.experts_of_ep_rank);
        if let Some(routing) = &stats.routing {
            let mesh = crate::destinations::Mesh {
                experts_of_ep_rank: &self.mesh.experts_of_ep_rank,
                ranks_per_node: (self.group_ranks_per_node / self.etp.max(1)).max(1),
            };
            if let Some(d) = crate::destinations::measured(&routing.experts, &mesh) {
                m.destinations = d;
            }
        }
        Ok(m)
    }

    /// The same model with another headroom (`auto` trying its fallbacks).
    pub fn with_headroom(&self, headroom: Option<f64>) -> Model {
        let mut m = self.clone();
        if m.capacity.is_none() {
            m.headroom = headroom;
        }
        m
    }

    /// Tokens of one chunk when the rank's tokens are cut into `chunks`.
    pub fn chunk_tokens(&self, chunks: u64) -> u64 {
        self.tokens.div_ceil(chunks.max(1))
    }

    /// Worst-case rows of one rank's expert input for one of `chunks` token
    /// chunks: each local expert (shard) can receive a row from every token of
    /// the EP group's chunk, and in capacity mode at most `C` rows in all.
    /// Capacity mode computes every slot (static shapes, no host sync), so
    /// chunking pays there only when `C` is small against a chunk.
    pub fn expert_rows_worst(&self, chunks: u64) -> u64 {
        let group_chunk = self.chunk_tokens(chunks).saturating_mul(self.ep);
        match self.capacity {
            Some(c) => c
                .min(group_chunk)
                .saturating_mul(self.local_experts)
                .saturating_mul(self.etp),
            None => group_chunk
                .saturating_mul(self.top_k.min(self.local_experts))
                .saturating_mul(self.etp),
        }
    }

    /// Rows of one rank's expert-side buffers for one of `chunks` chunks:
    /// the worst case (every capacity slot), or for a dropless layer the
    /// busiest rank's expected rows of a full chunk times the headroom.
    pub fn expert_rows_max(&self, chunks: u64) -> u64 {
        let expected =
            self.chunk_tokens(chunks) as f64 * self.rows_per_token() as f64 * self.load_skew;
        self.bounded(self.expert_rows_worst(chunks), expected)
    }

    /// Rows the expert GEMMs compute for one of `chunks` chunks: expected rows
    /// under uniform routing (dropless, grouped GEMM on the real counts), or
    /// every slot (capacity mode, batched GEMM over fixed slots).
    pub fn expert_rows_expected(&self, chunks: u64) -> f64 {
        match self.capacity {
            Some(_) => self.expert_rows_max(chunks) as f64,
            None => self.tokens as f64 * self.rows_per_token() as f64 / chunks.max(1) as f64,
        }
    }
}

/// The busiest EP rank's share of the picks over the mean share: every
/// expert's share of the picks (`shares`) is split evenly between its copies
/// (primaries and replicas).
pub fn rank_load_skew(shares: &[f64], experts_of_rank: &[Vec<u64>]) -> f64 {
    let mut copies = vec![0u64; shares.len()];
    for e in experts_of_rank.iter().flatten() {
        if let Some(c) = copies.get_mut(*e as usize) {
            *c += 1;
        }
    }
    let load = |rank: &Vec<u64>| -> f64 {
        rank.iter()
            .filter_map(|&e| {
                Some(shares.get(e as usize)? / *copies.get(e as usize)?.max(&1) as f64)
            })
            .sum()
    };
    let ranks = experts_of_rank.len().max(1) as f64;
    let mean = experts_of_rank.iter().map(load).sum::<f64>() / ranks;
    let max = experts_of_rank.iter().map(load).fold(0.0, f64::max);
    if mean > 0.0 {
        (max / mean).max(1.0)
    } else {
        1.0
    }
}

fn link(l: spec::Link) -> rt::LinkConfig {
    rt::LinkConfig {
        bandwidth: l.bandwidth,
        latency: l.latency,
    }
}

fn capacity_slots(program: &Program, limit: CapacityLimit) -> Result<u64, String> {
    let l = &program.layer;
    match limit {
        CapacityLimit::Slots(s) => Ok(s),
        CapacityLimit::Factor(f) => {
            let group_tokens = l
                .tokens_per_rank
                .checked_mul(program.mesh.ep.max(1))
                .and_then(|t| t.checked_mul(l.router.top_k))
                .ok_or("tokens × ep × top_k overflows")?;
            let c = (f * group_tokens as f64 / l.experts.count.max(1) as f64).ceil();
            if c.is_finite() && c >= 1.0 && c < u64::MAX as f64 {
                Ok(c as u64)
            } else {
                Err(format!("capacity factor {f} gives {c} slots per expert"))
            }
        }
    }
}

pub fn dtype(d: spec::DType) -> DType {
    match d {
        spec::DType::F32 => DType::F32,
        spec::DType::Bf16 => DType::Bf16,
        spec::DType::F16 => DType::F16,
        spec::DType::Fp8E4m3 => DType::Fp8E4m3,
    }
}

fn activation(f: Ffn) -> rt::Activation {
    match f {
        Ffn::SwiGlu { limit } => rt::Activation::Swiglu { limit },
        Ffn::Gelu { tanh: false } => rt::Activation::Gelu,
        Ffn::Gelu { tanh: true } => rt::Activation::GeluTanh,
        Ffn::Relu => rt::Activation::Relu,
    }
}

/// The runtime's copy of the layer's numerics.
pub fn layer_config(program: &Program) -> rt::LayerConfig {
    let l = &program.layer;
    let r = &l.router;
    rt::LayerConfig {
        name: l.name.clone(),
        hidden: l.hidden,
        dtype: dtype(l.dtype),
        dispatch_dtype: dtype(l.dispatch_dtype),
        tokens_per_rank: l.tokens_per_rank,
        experts: l.experts.count,
        intermediate: l.experts.intermediate,
        ffn: activation(l.experts.ffn),
        expert_bias: l.experts.bias,
        shared: l.shared.as_ref().map(|s| rt::SharedConfig {
            count: s.count,
            intermediate: s.intermediate,
            ffn: activation(s.ffn),
            bias: s.bias,
            sigmoid_gate: s.sigmoid_gate,
        }),
        router: rt::RouterConfig {
            scoring: match r.scoring {
                spec::Scoring::Softmax => rt::Scoring::Softmax,
                spec::Scoring::Sigmoid => rt::Scoring::Sigmoid,
            },
            top_k: r.top_k,
            logit_bias: r.logit_bias,
            softmax_over: match r.softmax_over {
                spec::SoftmaxOver::All => rt::SoftmaxOver::All,
                spec::SoftmaxOver::TopK => rt::SoftmaxOver::Topk,
            },
            selection_bias: r.selection_bias,
            groups: r.groups.as_ref().map(|g| rt::GroupConfig {
                count: g.count,
                kept: g.kept,
                score: match g.score {
                    spec::GroupScore::Top2Sum => rt::GroupScore::Top2Sum,
                    spec::GroupScore::Max => rt::GroupScore::Max,
                },
            }),
            normalize: r.normalize,
            scale: r.scale,
            weight_on: match r.weight_on {
                spec::WeightOn::Output => rt::WeightOn::Output,
                spec::WeightOn::Input => rt::WeightOn::Input,
            },
        },
        capacity: match l.capacity {
            Capacity::Dropless => rt::CapacityConfig::Dropless,
            Capacity::Limited { limit, drop } => rt::CapacityConfig::Limited {
                slots: capacity_slots(program, limit).unwrap_or(1),
                factor: match limit {
                    CapacityLimit::Factor(f) => Some(f),
                    CapacityLimit::Slots(_) => None,
                },
                drop: match drop {
                    spec::DropPolicy::Position => rt::DropPolicy::Position,
                    spec::DropPolicy::Probs => rt::DropPolicy::Probs,
                },
            },
        },
    }
}

/// What the analysis knows about an e-class: the value's shape and type, and
/// the arithmetic needed to compute it from the input. Equivalent nodes compute
/// the same value, so they agree on all of it (fp8 on the wire is the one
/// declared exception: `dequant(dispatch(quant p))` stands for `dispatch p`).
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// Worst-case rows (buffer size).
    pub rows: u64,
    /// Expected rows under uniform routing (cost).
    pub rows_expected: f64,
    pub cols: u64,
    pub dtype: DType,
    /// Worst-case bytes of the value.
    pub bytes: u64,
    /// Arithmetic (FLOPs) from the input to this value, expected.
    pub flops: f64,
    /// For `Num` leaves: the number.
    pub num: Option<u64>,
    /// Token chunks the value is split into (1 outside a chunked pipeline body).
    pub chunks: u64,
    /// Dropless plans: the expected-load bound `rows` is, for a value on the
    /// expert side (its buffer grows with the bound when a pass overflows).
    pub bound: Option<rt::RowBound>,
}

impl Meta {
    fn value(rows: u64, rows_expected: f64, cols: u64, dtype: DType, flops: f64) -> Meta {
        Meta {
            rows,
            rows_expected,
            cols,
            dtype,
            bytes: value_bytes(rows, cols, dtype),
            flops,
            num: None,
            chunks: 1,
            bound: None,
        }
    }

    fn in_chunks(mut self, chunks: u64) -> Meta {
        self.chunks = chunks;
        self
    }

    /// The value's rows are `bound` (dropless plans only).
    fn bounded(mut self, m: &Model, bound: rt::RowBound) -> Meta {
        self.bound = m.capacity.is_none().then_some(bound);
        self
    }

    /// The value has as many rows as `a`, and so its bound.
    fn rows_of(mut self, a: &Meta) -> Meta {
        self.bound = a.bound;
        self
    }
}

/// Bytes of a `rows × cols` tensor; fp8 carries one f32 scale per block of
/// 128 elements of a row (a row's last block may be partial).
pub fn value_bytes(rows: u64, cols: u64, dtype: DType) -> u64 {
    let elements = rows.saturating_mul(cols);
    match dtype {
        DType::Fp8E4m3 => {
            elements.saturating_add(rows.saturating_mul(cols.div_ceil(128)).saturating_mul(4))
        }
        d => elements.saturating_mul(d.bytes()),
    }
}

/// The egg analysis: computes [`Meta`] from the [`Model`].
#[derive(Clone, Debug)]
pub struct MetaAnalysis {
    pub model: Model,
}

/// Columns of the routing result: ids and weights of the k picks.
pub const ROUTE_COLS_PER_PICK: u64 = 2;

impl Analysis<MoeIr> for MetaAnalysis {
    type Data = Meta;

    fn make(egraph: &mut EGraph<MoeIr, Self>, enode: &MoeIr, _id: Id) -> Meta {
        let m = &egraph.analysis.model;
        let x = |i: &Id| egraph[*i].data.clone();
        let h = m.hidden;
        let k = m.top_k;
        let act_cols = m.ffn_local;
        let up_cols = if m.gated { 2 * act_cols } else { act_cols };
        let flops_of = |ids: &[Id]| ids.iter().map(|i| egraph[*i].data.flops).sum::<f64>();
        match enode {
            MoeIr::Num(n) => Meta {
                rows: 0,
                rows_expected: 0.0,
                cols: 0,
                dtype: DType::I32,
                bytes: 0,
                flops: 0.0,
                num: Some(*n),
                chunks: 1,
                bound: None,
            },
            MoeIr::Input => Meta::value(m.tokens, m.tokens as f64, h, m.dtype, 0.0),
            MoeIr::Logits(a) => {
                let a = x(a);
                let flops = a.flops + 2.0 * a.rows_expected * h as f64 * m.experts as f64;
                Meta::value(a.rows, a.rows_expected, m.experts, DType::F32, flops)
            }
            MoeIr::Scores(a) | MoeIr::Bias(a) | MoeIr::Groups(a) => {
                let a = x(a);
                let flops = a.flops + 4.0 * a.rows_expected * m.experts as f64;
                Meta::value(a.rows, a.rows_expected, m.experts, DType::F32, flops)
            }
            MoeIr::Topk(a) | MoeIr::Router(a) => {
                let a = x(a);
                // The whole chain's arithmetic, so fused and unfused agree.
                let stages = m.router_stages.len() as f64;
                let flops = a.flops
                    + if matches!(enode, MoeIr::Router(_)) {
                        4.0 * a.rows_expected * m.experts as f64 * stages
                    } else {
                        4.0 * a.rows_expected * m.experts as f64
                    };
                let cols = k * ROUTE_COLS_PER_PICK;
                Meta::value(a.rows, a.rows_expected, cols, DType::F32, flops)
            }
            MoeIr::Normalize(a) | MoeIr::Scale(a) => {
                let a = x(a);
                Meta::value(a.rows, a.rows_expected, a.cols, DType::F32, a.flops)
            }
            MoeIr::Assign(a) => {
                let a = x(a);
                Meta::value(a.rows, a.rows_expected, k * 3, DType::I32, a.flops)
            }
            MoeIr::Split([d, v]) => {
                let d = x(d).num.unwrap_or(1).max(1);
                let v = x(v);
                let rows = v.rows.div_ceil(d);
                let mut out = v.clone();
                out.rows = rows;
                out.rows_expected = v.rows_expected / d as f64;
                out.bytes = value_bytes(rows, v.cols, v.dtype);
                out.flops = v.flops / d as f64;
                out.chunks = d;
                out
            }
            MoeIr::Permute([xi, a]) | MoeIr::PermutePack([xi, a]) => {
                let xv = x(xi);
                let rows = xv.rows.saturating_mul(m.rows_per_token());
                let exp = m.routed_rows_expected(xv.rows_expected);
                Meta::value(rows, exp, h, xv.dtype, flops_of(&[*xi, *a])).in_chunks(xv.chunks)
            }
            MoeIr::Pack(a) | MoeIr::Dequant(a) => {
                let a = x(a);
                let dt = if matches!(enode, MoeIr::Dequant(_)) {
                    m.dtype
                } else {
                    a.dtype
                };
                Meta::value(a.rows, a.rows_expected, a.cols, dt, a.flops)
                    .in_chunks(a.chunks)
                    .rows_of(&a)
            }
            MoeIr::Quant(a) => {
                let a = x(a);
                Meta::value(a.rows, a.rows_expected, a.cols, DType::Fp8E4m3, a.flops)
                    .in_chunks(a.chunks)
                    .rows_of(&a)
            }
            MoeIr::Dispatch(a) | MoeIr::DispatchIntra(a) => {
                let a = x(a);
                // The expert input of this rank: by symmetry it receives as many
                // rows as it sends; dropless buffers hold the expected load
                // times the headroom.
                let rows = m.expert_rows_max(a.chunks);
                let exp = m.expert_rows_expected(a.chunks);
                Meta::value(rows, exp, a.cols, a.dtype, a.flops)
                    .in_chunks(a.chunks)
                    .bounded(m, rt::RowBound::ExpertRows)
            }
            MoeIr::DispatchInter(a) => {
                // Rows staged on the forwarding rank: at most one per token of
                // every node of the group (its own node's come straight).
                let a = x(a);
                let tokens = a.rows / m.rows_per_token().max(1);
                let rows = tokens.saturating_mul(m.group_nodes);
                let exp = a.rows_expected / m.rows_per_token().max(1) as f64
                    * crate::cost::expected_remote_nodes(m);
                Meta::value(rows, exp, a.cols, a.dtype, a.flops).in_chunks(a.chunks)
            }
            MoeIr::Up(a) => {
                let a = x(a);
                let flops = a.flops + 2.0 * a.rows_expected * h as f64 * up_cols as f64;
                Meta::value(a.rows, a.rows_expected, up_cols, m.dtype, flops)
                    .in_chunks(a.chunks)
                    .rows_of(&a)
            }
            MoeIr::Act(a) => {
                let a = x(a);
                Meta::value(a.rows, a.rows_expected, act_cols, m.dtype, a.flops)
                    .in_chunks(a.chunks)
                    .rows_of(&a)
            }
            MoeIr::UpAct(a) => {
                let a = x(a);
                let flops = a.flops + 2.0 * a.rows_expected * h as f64 * up_cols as f64;
                Meta::value(a.rows, a.rows_expected, act_cols, m.dtype, flops)
                    .in_chunks(a.chunks)
                    .rows_of(&a)
            }
            MoeIr::Down(a) => {
                let a = x(a);
                let flops = a.flops + 2.0 * a.rows_expected * h as f64 * act_cols as f64;
                Meta::value(a.rows, a.rows_expected, h, m.dtype, flops)
                    .in_chunks(a.chunks)
                    .rows_of(&a)
            }
            MoeIr::Combine([y, a]) | MoeIr::CombineInter([y, a]) | MoeIr::CombineIntra([y, a]) => {
                // Back to the senders: one row per assignment of this rank's tokens.
                // The intra-node leg gathers on the forwarding rank the rows of
                // the same-index rank of every node (nothing is summed yet).
                let av = x(a);
                let forwarded = if matches!(enode, MoeIr::CombineIntra(_)) {
                    m.group_nodes
                } else {
                    1
                };
                let rows = av
                    .rows
                    .saturating_mul(m.rows_per_token())
                    .saturating_mul(forwarded);
                let exp = m.routed_rows_expected(av.rows_expected);
                Meta::value(rows, exp, h, m.dtype, x(y).flops).in_chunks(av.chunks)
            }
            MoeIr::Unpermute([c, a]) => {
                let av = x(a);
                let rows = av.rows.saturating_mul(m.rows_per_token());
                let exp = m.routed_rows_expected(av.rows_expected);
                Meta::value(rows, exp, h, m.dtype, flops_of(&[*c])).in_chunks(av.chunks)
            }
            MoeIr::Wsum([u, a]) | MoeIr::UnpermuteWsum([u, a]) => {
                let av = x(a);
                Meta::value(av.rows, av.rows_expected, h, m.dtype, flops_of(&[*u]))
                    .in_chunks(av.chunks)
            }
            MoeIr::PackRank([xi, a]) => {
                let xv = x(xi);
                let rows = xv.rows.saturating_mul(m.rank_rows_per_token());
                let exp = m.rank_rows_expected(xv.rows_expected);
                Meta::value(rows, exp, h, xv.dtype, flops_of(&[*xi, *a])).in_chunks(xv.chunks)
            }
            MoeIr::DispatchRank(p) | MoeIr::DispatchRankIntra(p) => {
                // By symmetry a rank receives as many rows as it sends (the
                // intra-node leg delivers what the flat one would).
                let p = x(p);
                let rows = m.rank_rows_received_max(p.chunks);
                let exp = m.rank_rows_expected(m.tokens as f64 / p.chunks.max(1) as f64);
                Meta::value(rows, exp, p.cols, p.dtype, p.flops)
                    .in_chunks(p.chunks)
                    .bounded(m, rt::RowBound::RankRows)
            }
            MoeIr::DispatchRankInter(p) => {
                // Staged on the forwarder: at most one row per token of every
                // node of the group, expected one per token and node.
                let p = x(p);
                let tokens = m.chunk_tokens(p.chunks);
                let rows = tokens.saturating_mul(m.group_nodes);
                let exp = m.tokens as f64 / p.chunks.max(1) as f64 * m.destinations.nodes;
                Meta::value(rows, exp, p.cols, p.dtype, p.flops).in_chunks(p.chunks)
            }
            MoeIr::CombineRankIntra(r) => {
                // Summed on the forwarder: one row per staged token.
                let r = x(r);
                let tokens = m.chunk_tokens(r.chunks);
                let rows = tokens.saturating_mul(m.group_nodes);
                let exp = m.tokens as f64 / r.chunks.max(1) as f64 * m.destinations.nodes;
                Meta::value(rows, exp, h, m.dtype, r.flops).in_chunks(r.chunks)
            }
            MoeIr::Expand([r, _]) | MoeIr::Gather([r, _]) => {
                // The expert input, as `dispatch` delivers it (`gather`: read
                // in place by the up projection through the index).
                let r = x(r);
                let rows = m.expert_rows_max(r.chunks);
                let exp = m.expert_rows_expected(r.chunks);
                Meta::value(rows, exp, h, m.dtype, r.flops)
                    .in_chunks(r.chunks)
                    .bounded(m, rt::RowBound::ExpertRows)
            }
            MoeIr::Reduce([y, a]) | MoeIr::DownReduce([y, a]) => {
                let av = x(a);
                let rows = m.rank_rows_received_max(av.chunks);
                let exp = m.rank_rows_expected(av.rows_expected);
                let yv = x(y);
                let flops = if matches!(enode, MoeIr::DownReduce(_)) {
                    yv.flops + 2.0 * yv.rows_expected * h as f64 * act_cols as f64
                } else {
                    yv.flops
                };
                Meta::value(rows, exp, h, m.dtype, flops)
                    .in_chunks(av.chunks)
                    .bounded(m, rt::RowBound::RankRows)
            }
            MoeIr::CombineRank(r) | MoeIr::CombineRankInter(r) => {
                // Back on the source: its by-rank rows.
                let r = x(r);
                let tokens = m.chunk_tokens(r.chunks);
                let rows = tokens.saturating_mul(m.rank_rows_per_token());
                let exp = m.rank_rows_expected(m.tokens as f64 / r.chunks.max(1) as f64);
                Meta::value(rows, exp, h, m.dtype, r.flops).in_chunks(r.chunks)
            }
            MoeIr::SumRank([c, a]) => {
                let av = x(a);
                Meta::value(av.rows, av.rows_expected, h, m.dtype, flops_of(&[*c]))
                    .in_chunks(av.chunks)
            }
            MoeIr::Pipeline([d, xi, _, body]) => {
                let d = x(d).num.unwrap_or(1).max(1);
                let xv = x(xi);
                let b = x(body);
                Meta::value(xv.rows, xv.rows_expected, h, m.dtype, b.flops * d as f64)
            }
            MoeIr::SharedUp(a) | MoeIr::SharedUpAct(a) => {
                let a = x(a);
                let (width, gated) = m
                    .shared
                    .as_ref()
                    .map(|s| (s.width, s.gated))
                    .unwrap_or((0, false));
                let up = if gated { 2 * width } else { width };
                let cols = if matches!(enode, MoeIr::SharedUpAct(_)) {
                    width
                } else {
                    up
                };
                let flops = a.flops + 2.0 * a.rows_expected * h as f64 * up as f64;
                Meta::value(a.rows, a.rows_expected, cols, m.dtype, flops)
            }
            MoeIr::SharedAct(a) => {
                let a = x(a);
                let width = m.shared.as_ref().map(|s| s.width).unwrap_or(0);
                Meta::value(a.rows, a.rows_expected, width, m.dtype, a.flops)
            }
            MoeIr::SharedDown(a) => {
                let a = x(a);
                let width = m.shared.as_ref().map(|s| s.width).unwrap_or(0);
                let flops = a.flops + 2.0 * a.rows_expected * h as f64 * width as f64;
                Meta::value(a.rows, a.rows_expected, h, m.dtype, flops)
            }
            MoeIr::SharedGate([xi, y]) => {
                let xv = x(xi);
                let flops = x(y).flops + 2.0 * xv.rows_expected * h as f64;
                Meta::value(xv.rows, xv.rows_expected, h, m.dtype, flops)
            }
            MoeIr::Add([r, s]) | MoeIr::AddPar([r, s]) => {
                let rv = x(r);
                Meta::value(rv.rows, rv.rows_expected, h, m.dtype, flops_of(&[*r, *s]))
            }
        }
    }

    fn merge(&mut self, to: &mut Meta, from: Meta) -> DidMerge {
        // Equivalent forms agree on shape and type; keep the smaller FLOP count
        // (fusion never adds arithmetic) so the result is independent of merge order.
        if from.flops < to.flops {
            to.flops = from.flops;
            DidMerge(true, false)
        } else {
            DidMerge(false, from.flops > to.flops)
        }
    }
}

/// Lowers a model into the unfused, unchunked, flat dataflow: the starting
/// point of the rewrites. Returns the expression; its root is the layer output.
pub fn lower(model: &Model) -> RecExpr<MoeIr> {
    let mut e = RecExpr::default();
    let x = e.add(MoeIr::Input);
    let logits = e.add(MoeIr::Logits(x));
    let mut r = logits;
    for stage in &model.router_stages {
        r = e.add(match stage {
            RouterStage::Scores => MoeIr::Scores(r),
            RouterStage::Bias => MoeIr::Bias(r),
            RouterStage::Groups => MoeIr::Groups(r),
            RouterStage::Topk => MoeIr::Topk(r),
            RouterStage::Normalize => MoeIr::Normalize(r),
            RouterStage::Scale => MoeIr::Scale(r),
        });
    }
    let a = e.add(MoeIr::Assign(r));
    let one = e.add(MoeIr::Num(1));
    let body = lower_body(&mut e, model, x, a);
    let routed = e.add(MoeIr::Pipeline([one, x, a, body]));
    if model.shared.is_some() {
        let s = lower_shared(&mut e, model, x);
        e.add(MoeIr::Add([routed, s]));
    }
    e
}

/// Something nodes can be added to: a [`RecExpr`] while lowering, the e-graph
/// inside a rewrite.
pub trait NodeSink {
    fn add_node(&mut self, node: MoeIr) -> Id;
}

impl NodeSink for RecExpr<MoeIr> {
    fn add_node(&mut self, node: MoeIr) -> Id {
        self.add(node)
    }
}

impl NodeSink for EGraph<MoeIr, MetaAnalysis> {
    fn add_node(&mut self, node: MoeIr) -> Id {
        self.add(node)
    }
}

/// One chunk's routed dataflow over tokens `x` and assignments `a`, unfused and flat.
pub fn lower_body(e: &mut impl NodeSink, model: &Model, x: Id, a: Id) -> Id {
    let permuted = e.add_node(MoeIr::Permute([x, a]));
    let packed = e.add_node(MoeIr::Pack(permuted));
    let expert_in = if model.ep > 1 || model.etp > 1 {
        e.add_node(MoeIr::Dispatch(packed))
    } else {
        packed
    };
    let up = e.add_node(MoeIr::Up(expert_in));
    let act = e.add_node(MoeIr::Act(up));
    let down = e.add_node(MoeIr::Down(act));
    let back = if model.ep > 1 || model.etp > 1 {
        e.add_node(MoeIr::Combine([down, a]))
    } else {
        down
    };
    let unpermuted = e.add_node(MoeIr::Unpermute([back, a]));
    e.add_node(MoeIr::Wsum([unpermuted, a]))
}

fn lower_shared(e: &mut RecExpr<MoeIr>, model: &Model, x: Id) -> Id {
    let up = e.add(MoeIr::SharedUp(x));
    let act = e.add(MoeIr::SharedAct(up));
    let down = e.add(MoeIr::SharedDown(act));
    match &model.shared {
        Some(s) if s.sigmoid_gate => e.add(MoeIr::SharedGate([x, down])),
        _ => down,
    }
}

/// The analysis data of every node of an expression, in expression order.
pub fn metas(model: &Model, expr: &RecExpr<MoeIr>) -> Vec<Meta> {
    let mut egraph: EGraph<MoeIr, MetaAnalysis> = EGraph::new(MetaAnalysis {
        model: model.clone(),
    });
    let mut ids: Vec<Id> = Vec::with_capacity(expr.as_ref().len());
    for node in expr.as_ref() {
        let mapped = node.clone().map_children(|c| ids[usize::from(c)]);
        ids.push(egraph.add(mapped));
    }
    ids.iter().map(|id| egraph[*id].data.clone()).collect()
}
