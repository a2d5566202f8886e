//! The validated, typed description of a layer and its mesh: what the checker
//! produces and the compiler consumes. Every value here has passed the checks
//! of [`crate::check`]; quantities are in SI base units (bytes, seconds,
//! bytes per second, FLOP per second).

use std::collections::BTreeMap;
use std::fmt;

/// A checked `.moe` file.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub layer: Layer,
    pub mesh: Mesh,
    pub schedule: Schedule,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    F16,
    /// fp8 e4m3 with per-128-element block scales; only for dispatch.
    Fp8E4m3,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::Fp8E4m3 => 1,
        }
    }

    pub fn keyword(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::Fp8E4m3 => "fp8_e4m3",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Layer {
    pub name: String,
    pub hidden: u64,
    /// Storage type of activations and weights (accumulation is always f32).
    pub dtype: DType,
    /// Type of the tokens the dispatch all-to-all moves.
    pub dispatch_dtype: DType,
    pub tokens_per_rank: u64,
    pub experts: Experts,
    pub shared: Option<SharedExperts>,
    pub router: Router,
    pub capacity: Capacity,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ffn {
    /// `down(silu(gate(x)) * up(x))`; with a limit, the gpt-oss clamped form.
    SwiGlu {
        limit: Option<f64>,
    },
    /// `down(gelu(up(x)))`, exact (erf) or tanh approximation.
    Gelu {
        tanh: bool,
    },
    Relu,
}

impl Ffn {
    pub fn keyword(self) -> &'static str {
        match self {
            Ffn::SwiGlu { .. } => "swiglu",
            Ffn::Gelu { tanh: false } => "gelu",
            Ffn::Gelu { tanh: true } => "gelu_tanh",
            Ffn::Relu => "relu",
        }
    }

    /// Number of weight matrices: gate, up and down for gated FFNs, up and down otherwise.
    pub fn matrices(self) -> u64 {
        match self {
            Ffn::SwiGlu { .. } => 3,
            _ => 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Experts {
    pub count: u64,
    pub ffn: Ffn,
    pub intermediate: u64,
    pub bias: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SharedExperts {
    pub count: u64,
    /// Intermediate size of one shared expert; they run fused as one FFN of
    /// `count * intermediate`.
    pub intermediate: u64,
    pub ffn: Ffn,
    pub bias: bool,
    /// Qwen2-MoE: output multiplied by `sigmoid(x · w_gate)`.
    pub sigmoid_gate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scoring {
    Softmax,
    Sigmoid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxOver {
    /// Softmax over all expert logits, then pick the top k (Mixtral, Qwen, DeepSeek-V2).
    All,
    /// Pick the top k logits, then softmax over them (gpt-oss).
    TopK,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupScore {
    /// Sum of the two best (biased) scores in the group (DeepSeek-V3).
    Top2Sum,
    /// The best score in the group (DeepSeek-V2).
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Groups {
    pub count: u64,
    pub kept: u64,
    pub score: GroupScore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightOn {
    Output,
    /// Llama-4: the routing weight scales the expert's input.
    Input,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Router {
    pub scoring: Scoring,
    pub top_k: u64,
    /// A learned bias added to the logits before scoring (gpt-oss's router
    /// `Linear` bias): it changes both the choice and the weights.
    pub logit_bias: bool,
    /// Only meaningful for softmax scoring.
    pub softmax_over: SoftmaxOver,
    /// Aux-loss-free selection bias: changes which experts are picked, not their weights.
    pub selection_bias: bool,
    pub groups: Option<Groups>,
    pub normalize: bool,
    pub scale: f64,
    pub weight_on: WeightOn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPolicy {
    /// Keep assignments in global token order (rank-major, slot order within a token).
    Position,
    /// Keep the highest routing weights; ties by global token order.
    Probs,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CapacityLimit {
    /// `C = ceil(factor * T_global * top_k / E)`.
    Factor(f64),
    /// A fixed number of token slots per expert (Switch's `expert_capacity`).
    Slots(u64),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Capacity {
    Dropless,
    Limited {
        limit: CapacityLimit,
        drop: DropPolicy,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Device {
    pub name: String,
    /// Dense peak of the compute dtype, FLOP/s.
    pub peak_flops: f64,
    /// HBM bandwidth, bytes/s.
    pub memory_bandwidth: f64,
    /// HBM capacity, bytes.
    pub memory: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bytes per second per GPU, each way.
    pub bandwidth: f64,
    /// Seconds per message.
    pub latency: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Placement {
    /// Experts `[r*E/ep, (r+1)*E/ep)` on EP rank `r`.
    Contiguous,
    /// Expert `e` on EP rank `e % ep`.
    RoundRobin,
    /// `ranks[r]` lists the experts of EP rank `r`.
    Explicit(Vec<Vec<u64>>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mesh {
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub device: Device,
    pub intra_node: Link,
    /// Present whenever `nodes > 1`.
    pub inter_node: Option<Link>,
    pub ep: u64,
    pub etp: u64,
    pub dp: u64,
    pub placement: Placement,
    /// Extra copies of hot experts: expert -> EP ranks that also hold it.
    pub replicas: BTreeMap<u64, Vec<u64>>,
}

impl Mesh {
    pub fn world_size(&self) -> u64 {
        self.nodes * self.gpus_per_node
    }

    /// The experts each EP rank owns (primary copies first, then replicas), by placement.
    pub fn experts_of_rank(&self, experts: u64) -> Vec<Vec<u64>> {
        let ep = self.ep.max(1);
        let mut ranks: Vec<Vec<u64>> = match &self.placement {
            Placement::Contiguous => {
                let per = experts / ep;
                (0..ep)
                    .map(|r| (r * per..(r + 1) * per).collect())
                    .collect()
            }
            Placement::RoundRobin => {
                let mut ranks = vec![Vec::new(); usize::try_from(ep).unwrap_or(0)];
                for e in 0..experts {
                    if let Some(list) = usize::try_from(e % ep).ok().and_then(|r| ranks.get_mut(r))
                    {
                        list.push(e);
                    }
                }
                ranks
            }
            Placement::Explicit(map) => map.clone(),
        };
        for (expert, extra) in &self.replicas {
            for &rank in extra {
                if let Some(list) = usize::try_from(rank).ok().and_then(|r| ranks.get_mut(r)) {
                    list.push(*expert);
                }
            }
        }
        ranks
    }
}

/// Names of the compiler's rewrite families that a schedule may allow or deny.
pub const RULES: &[&str] = &[
    "fuse_router",
    "fuse_permute",
    "fuse_combine",
    "fuse_activation",
    "overlap_chunks",
    "overlap_shared",
    "hierarchical_a2a",
    "fp8_dispatch",
    "dedup_dispatch",
    "reduce_combine",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlap {
    /// The compiler picks the overlap degree by cost.
    Auto,
    /// Exactly this many token chunks.
    Degree(u64),
}

/// How many rows a dropless layer's expert-side buffers hold.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Headroom {
    /// The compiler's choice: twice the expected load, less when the plan
    /// would not fit the device's memory.
    Auto,
    /// This factor of the expected load (at least 1).
    Factor(f64),
    /// Every row the routing could send (never overflows, never re-runs).
    WorstCase,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub overlap: Overlap,
    /// The allowed rewrite families, a subset of [`RULES`], in [`RULES`] order.
    pub rules: Vec<&'static str>,
    /// Rows of a dropless layer's bounded buffers, as a factor of the
    /// expected load.
    pub headroom: Headroom,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            overlap: Overlap::Auto,
            rules: RULES.to_vec(),
            headroom: Headroom::Auto,
        }
    }
}

/// Sizes that follow from a layer and mesh; all computed with checked arithmetic
/// by the checker, so reading them here cannot overflow.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    pub world_size: u64,
    pub experts_per_rank_max: u64,
    /// Tokens routed by one EP group: `tokens_per_rank * ep`.
    pub tokens_per_ep_group: u64,
    /// Token slots per expert in capacity mode.
    pub capacity_per_expert: Option<u64>,
    pub activation_bytes_per_rank: u64,
    /// Worst-case bytes one rank sends in the dispatch all-to-all.
    pub dispatch_bytes_per_rank: u64,
    pub expert_weight_bytes_per_rank: u64,
    pub expert_weight_bytes_total: u64,
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

fn human_rate(v: f64, unit: &str) -> String {
    let (scaled, prefix) = if v >= 1e15 {
        (v / 1e15, "P")
    } else if v >= 1e12 {
        (v / 1e12, "T")
    } else if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else {
        (v, "")
    };
    format!("{} {prefix}{unit}", trim_float(scaled))
}

fn human_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{} s", trim_float(s))
    } else if s >= 1e-3 {
        format!("{} ms", trim_float(s * 1e3))
    } else if s >= 1e-6 {
        format!("{} us", trim_float(s * 1e6))
    } else {
        format!("{} ns", trim_float(s * 1e9))
    }
}

/// Prints a float with up to three decimals and no trailing zeros.
pub fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_string()
}

impl fmt::Display for Program {
    /// The validated form: every default filled in, every derived size shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.layer;
        let m = &self.mesh;
        writeln!(f, "layer {}", l.name)?;
        writeln!(f, "  hidden           {}", l.hidden)?;
        writeln!(f, "  dtype            {}", l.dtype.keyword())?;
        writeln!(f, "  dispatch_dtype   {}", l.dispatch_dtype.keyword())?;
        writeln!(f, "  tokens_per_rank  {}", l.tokens_per_rank)?;
        let e = &l.experts;
        write!(
            f,
            "  experts          {} x {} intermediate {}",
            e.count,
            e.ffn.keyword(),
            e.intermediate
        )?;
        if let Ffn::SwiGlu { limit: Some(lim) } = e.ffn {
            write!(f, " limit {}", trim_float(lim))?;
        }
        writeln!(f, "{}", if e.bias { " with biases" } else { "" })?;
        match &l.shared {
            None => writeln!(f, "  shared_experts   none")?,
            Some(s) => writeln!(
                f,
                "  shared_experts   {} x {} intermediate {}{}{}",
                s.count,
                s.ffn.keyword(),
                s.intermediate,
                if s.bias { " with biases" } else { "" },
                if s.sigmoid_gate { ", sigmoid gate" } else { "" }
            )?,
        }
        let r = &l.router;
        write!(
            f,
            "  router           {} top_{}",
            match r.scoring {
                Scoring::Softmax => "softmax",
                Scoring::Sigmoid => "sigmoid",
            },
            r.top_k
        )?;
        if r.logit_bias {
            write!(f, ", logit bias")?;
        }
        if r.scoring == Scoring::Softmax {
            write!(
                f,
                ", softmax over {}",
                match r.softmax_over {
                    SoftmaxOver::All => "all experts",
                    SoftmaxOver::TopK => "the top k",
                }
            )?;
        }
        if r.selection_bias {
            write!(f, ", selection bias")?;
        }
        if let Some(g) = r.groups {
            write!(
                f,
                ", groups {} keep {} by {}",
                g.count,
                g.kept,
                match g.score {
                    GroupScore::Top2Sum => "top2_sum",
                    GroupScore::Max => "max",
                }
            )?;
        }
        write!(
            f,
            ", normalize {}, scale {}, weight on {}",
            r.normalize,
            trim_float(r.scale),
            match r.weight_on {
                WeightOn::Output => "output",
                WeightOn::Input => "input",
            }
        )?;
        writeln!(f)?;
        match l.capacity {
            Capacity::Dropless => writeln!(f, "  capacity         dropless")?,
            Capacity::Limited { limit, drop } => writeln!(
                f,
                "  capacity         {}, drop by {}",
                match limit {
                    CapacityLimit::Factor(x) => format!("factor {}", trim_float(x)),
                    CapacityLimit::Slots(n) => format!("{n} slots per expert"),
                },
                match drop {
                    DropPolicy::Position => "position",
                    DropPolicy::Probs => "probs",
                }
            )?,
        }
        writeln!(
            f,
            "mesh {} node(s) x {} GPU(s) = {} ranks",
            m.nodes,
            m.gpus_per_node,
            m.world_size()
        )?;
        writeln!(
            f,
            "  device           {}: {}, memory {}, {}",
            m.device.name,
            human_rate(m.device.peak_flops, "FLOP/s"),
            human_rate(m.device.memory, "B"),
            human_rate(m.device.memory_bandwidth, "B/s")
        )?;
        writeln!(
            f,
            "  intra_node       {} each way, latency {}",
            human_rate(m.intra_node.bandwidth, "B/s"),
            human_time(m.intra_node.latency)
        )?;
        match m.inter_node {
            Some(link) => writeln!(
                f,
                "  inter_node       {} each way, latency {}",
                human_rate(link.bandwidth, "B/s"),
                human_time(link.latency)
            )?,
            None => writeln!(f, "  inter_node       none")?,
        }
        writeln!(
            f,
            "  parallelism      ep {} x etp {} x dp {}",
            m.ep, m.etp, m.dp
        )?;
        let placement = match &m.placement {
            Placement::Contiguous => "contiguous",
            Placement::RoundRobin => "round_robin",
            Placement::Explicit(_) => "explicit",
        };
        writeln!(f, "  placement        {placement}")?;
        let ranks = m.experts_of_rank(l.experts.count);
        // Long regular placements show their start and end; irregular ones show every rank.
        let regular = m.replicas.is_empty() && !matches!(m.placement, Placement::Explicit(_));
        for (rank, experts) in ranks.iter().enumerate() {
            if regular && ranks.len() > 8 && (4..ranks.len() - 2).contains(&rank) {
                if rank == 4 {
                    writeln!(f, "    ...")?;
                }
                continue;
            }
            writeln!(f, "    ep rank {rank:<4} experts {}", ranges(experts))?;
        }
        for (expert, ranks) in &m.replicas {
            writeln!(
                f,
                "  replica          expert {expert} also on ep ranks {ranks:?}"
            )?;
        }
        write!(f, "schedule overlap ")?;
        match self.schedule.overlap {
            Overlap::Auto => write!(f, "auto")?,
            Overlap::Degree(d) => write!(f, "{d}")?,
        }
        write!(f, ", rules [{}]", self.schedule.rules.join(", "))?;
        match self.schedule.headroom {
            Headroom::Auto => writeln!(f)?,
            Headroom::Factor(h) => writeln!(f, ", headroom {h}")?,
            Headroom::WorstCase => writeln!(f, ", headroom worst_case")?,
        }
        Ok(())
    }
}

/// `[0, 1, 2, 5, 7, 8]` -> `0-2, 5, 7-8`: short even for 256 experts.
fn ranges(items: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let start = items[i];
        let mut j = i;
        while j + 1 < items.len() && items[j + 1] == items[j] + 1 {
            j += 1;
        }
        if j == i {
            out.push(start.to_string());
        } else {
            out.push(format!("{start}-{}", items[j]));
        }
        i = j + 1;
    }
    out.join(", ")
}

impl fmt::Display for Derived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "derived")?;
        writeln!(f, "  world_size                 {}", self.world_size)?;
        writeln!(
            f,
            "  experts per rank (max)     {}",
            self.experts_per_rank_max
        )?;
        writeln!(
            f,
            "  tokens per ep group        {}",
            self.tokens_per_ep_group
        )?;
        match self.capacity_per_expert {
            Some(c) => writeln!(f, "  capacity per expert        {c} slots")?,
            None => writeln!(f, "  capacity per expert        unbounded (dropless)")?,
        }
        writeln!(
            f,
            "  activations per rank       {}",
            human_bytes(self.activation_bytes_per_rank as f64)
        )?;
        writeln!(
            f,
            "  dispatch bytes per rank    {} (worst case)",
            human_bytes(self.dispatch_bytes_per_rank as f64)
        )?;
        writeln!(
            f,
            "  expert weights per rank    {}",
            human_bytes(self.expert_weight_bytes_per_rank as f64)
        )?;
        writeln!(
            f,
            "  expert weights in total    {}",
            human_bytes(self.expert_weight_bytes_total as f64)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn trim_float_drops_zeros() {
        assert_eq!(trim_float(2.5), "2.5");
        assert_eq!(trim_float(7.0), "7");
        assert_eq!(trim_float(1.25), "1.25");
    }
}
