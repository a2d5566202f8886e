//! Where a token's picks land under uniform routing: the expected number of
//! distinct EP ranks and nodes one token is sent to.
//!
//! "Uniform routing" is the cost model's assumption that no expert is
//! preferred: every expert's logit has the same distribution, independently
//! of the others (the router's own structure, group-limited selection above
//! all, still shapes the picks). A closed form exists for plain top-k
//! (`C(n - m, k) / C(n, k)` misses), but not for group-limited routing, where
//! the groups are ranked by the sum of their two best scores (DeepSeek-V3) or
//! their best score, and the top-k then spreads over the kept groups more
//! evenly than k independent picks would. So the expectation is measured on
//! the layer's own selection rule: [`SAMPLED_TOKENS`] tokens with standard
//! normal logits from a fixed-seed generator, each routed by the layer's
//! scoring, groups and top-k, its picks mapped to ranks and nodes by the
//! mesh's placement (replicas shared out by source rank, as the runtime
//! does). The generator is fixed, so the figure, and every plan built on it,
//! is deterministic; with a few thousand tokens its sampling error is well
//! under one percent. A router logit bias (gpt-oss) is left out like the
//! selection bias: under uniform routing no expert is preferred.

use moec_runtime::plan::{GroupScore, RouterConfig, Scoring};

/// Tokens sampled per estimate (fewer for very many experts, to bound the
/// work at about four million logits).
pub const SAMPLED_TOKENS: usize = 4096;
const MAX_LOGITS: usize = 1 << 22;
const MIN_SAMPLED_TOKENS: usize = 512;

/// Expected distinct destinations of one token, its own rank and node included.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Destinations {
    /// Distinct EP ranks holding one of the token's picks.
    pub ranks: f64,
    /// Distinct nodes holding one of the token's picks.
    pub nodes: f64,
    /// Distinct nodes other than the source's own.
    pub remote_nodes: f64,
}

/// The placement as the estimate needs it.
pub struct Mesh<'a> {
    /// `experts_of_ep_rank[g]`: the experts EP rank `g` holds.
    pub experts_of_ep_rank: &'a [Vec<u64>],
    /// EP ranks of the group on one node.
    pub ranks_per_node: u64,
}

/// Estimates the expected destinations of a token of a layer with `experts`
/// experts, routed by `router`, placed by `mesh`.
pub fn expected(experts: u64, router: &RouterConfig, mesh: &Mesh<'_>) -> Destinations {
    let e = experts.max(1) as usize;
    let group = mesh.experts_of_ep_rank.len().max(1);
    let per_node = mesh.ranks_per_node.max(1) as usize;
    // copies[e]: the EP ranks holding expert e, ascending (the runtime's order).
    let mut copies: Vec<Vec<usize>> = vec![Vec::new(); e];
    for (g, list) in mesh.experts_of_ep_rank.iter().enumerate() {
        for &x in list {
            if let Some(c) = copies.get_mut(x as usize) {
                c.push(g);
            }
        }
    }
    if copies.iter().any(Vec::is_empty) {
        // A placement that leaves an expert out is refused elsewhere; say
        // "every pick on another rank" rather than divide by nothing.
        return Destinations {
            ranks: router.top_k as f64,
            nodes: 1.0,
            remote_nodes: 0.0,
        };
    }
    let tokens = (MAX_LOGITS / e).clamp(MIN_SAMPLED_TOKENS, SAMPLED_TOKENS);
    let mut rng = SplitMix64(0x6d6f_6563_2d64_6573); // "moec-des"
    let mut scores = vec![0.0f64; e];
    let mut picks = Vec::with_capacity(router.top_k as usize);
    let mut tally = Tally::new(copies, group, per_node);
    for _ in 0..tokens {
        for s in scores.iter_mut() {
            *s = score(router.scoring, rng.normal());
        }
        select(router, &scores, &mut picks);
        tally.token(&picks);
    }
    tally.destinations()
}

/// Where the tokens of a measured routing (`moec simulate --stats`) land
/// under `mesh`'s placement: the same counts as [`expected`], over the
/// file's tokens instead of sampled ones. `None` when a pick names an
/// expert the placement does not hold.
pub fn measured(tokens: &[Vec<u32>], mesh: &Mesh<'_>) -> Option<Destinations> {
    let group = mesh.experts_of_ep_rank.len().max(1);
    let per_node = mesh.ranks_per_node.max(1) as usize;
    let experts = mesh
        .experts_of_ep_rank
        .iter()
        .flatten()
        .max()
        .map_or(0, |&m| m as usize + 1);
    let mut copies: Vec<Vec<usize>> = vec![Vec::new(); experts];
    for (g, list) in mesh.experts_of_ep_rank.iter().enumerate() {
        for &x in list {
            copies[x as usize].push(g);
        }
    }
    let mut tally = Tally::new(copies, group, per_node);
    let mut picks = Vec::new();
    for t in tokens {
        picks.clear();
        for &x in t {
            let x = x as usize;
            if tally.copies.get(x).is_none_or(Vec::is_empty) {
                return None;
            }
            picks.push(x);
        }
        tally.token(&picks);
    }
    Some(tally.destinations())
}

/// Distinct ranks and nodes per token, summed token by token. Source ranks
/// take turns, so replicas are shared out as in the runtime.
struct Tally {
    /// `copies[e]`: the EP ranks holding expert `e`, ascending.
    copies: Vec<Vec<usize>>,
    group: usize,
    per_node: usize,
    tokens: usize,
    seen_rank: Vec<usize>,
    seen_node: Vec<usize>,
    ranks: usize,
    nodes: usize,
    remote: usize,
}

impl Tally {
    fn new(copies: Vec<Vec<usize>>, group: usize, per_node: usize) -> Tally {
        Tally {
            copies,
            group,
            per_node,
            tokens: 0,
            seen_rank: vec![usize::MAX; group],
            seen_node: vec![usize::MAX; group.div_ceil(per_node)],
            ranks: 0,
            nodes: 0,
            remote: 0,
        }
    }

    fn token(&mut self, picks: &[usize]) {
        let t = self.tokens;
        let src = t % self.group;
        for &x in picks {
            let holders = &self.copies[x];
            let g = holders[src % holders.len()];
            if self.seen_rank[g] != t {
                self.seen_rank[g] = t;
                self.ranks += 1;
            }
            let n = g / self.per_node;
            if self.seen_node[n] != t {
                self.seen_node[n] = t;
                self.nodes += 1;
                if n != src / self.per_node {
                    self.remote += 1;
                }
            }
        }
        self.tokens += 1;
    }

    fn destinations(&self) -> Destinations {
        let tokens = self.tokens.max(1) as f64;
        Destinations {
            ranks: self.ranks as f64 / tokens,
            nodes: self.nodes as f64 / tokens,
            remote_nodes: self.remote as f64 / tokens,
        }
    }
}

/// The score the selection compares (softmax keeps the logits' order, so the
/// logit itself serves; sigmoid changes the group sums).
fn score(scoring: Scoring, logit: f64) -> f64 {
    match scoring {
        Scoring::Softmax => logit,
        Scoring::Sigmoid => 1.0 / (1.0 + (-logit).exp()),
    }
}

/// The layer's selection: the kept groups (when the router limits them),
/// then the top-k scores among their experts. Ties cannot occur with
/// continuous samples; the lower index wins anyway, as in the kernels.
fn select(router: &RouterConfig, scores: &[f64], picks: &mut Vec<usize>) {
    let e = scores.len();
    let k = (router.top_k as usize).min(e);
    let mut allowed: Vec<bool> = vec![true; e];
    if let Some(g) = router.groups {
        let count = (g.count as usize).max(1);
        let size = e / count;
        if size > 0 {
            let group_score = |i: usize| -> f64 {
                let members = &scores[i * size..(i + 1) * size];
                match g.score {
                    GroupScore::Max => members.iter().copied().fold(f64::MIN, f64::max),
                    GroupScore::Top2Sum => {
                        let (mut a, mut b) = (f64::MIN, f64::MIN);
                        for &v in members {
                            if v > a {
                                b = a;
                                a = v;
                            } else if v > b {
                                b = v;
                            }
                        }
                        if size < 2 {
                            a
                        } else {
                            a + b
                        }
                    }
                }
            };
            let group_scores: Vec<f64> = (0..count).map(group_score).collect();
            let mut order: Vec<usize> = (0..count).collect();
            order.sort_by(|&a, &b| group_scores[b].total_cmp(&group_scores[a]).then(a.cmp(&b)));
            allowed = vec![false; e];
            for &grp in order.iter().take(g.kept as usize) {
                for a in allowed[grp * size..(grp + 1) * size].iter_mut() {
                    *a = true;
                }
            }
        }
    }
    picks.clear();
    let mut candidates: Vec<usize> = (0..e).filter(|&i| allowed[i]).collect();
    candidates.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    picks.extend(candidates.into_iter().take(k));
}

/// A small, fixed generator: SplitMix64 (Steele, Lea and Flood, 2014), with
/// the Box-Muller transform for normal samples. Not cryptographic; chosen
/// because its output is fixed by its seed on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moec_runtime::plan::{GroupConfig, SoftmaxOver, WeightOn};

    fn router(top_k: u64, groups: Option<GroupConfig>) -> RouterConfig {
        RouterConfig {
            scoring: Scoring::Softmax,
            top_k,
            softmax_over: SoftmaxOver::All,
            selection_bias: false,
            groups,
            normalize: false,
            scale: 1.0,
            weight_on: WeightOn::Output,
            logit_bias: false,
        }
    }

    fn contiguous(experts: u64, ranks: u64) -> Vec<Vec<u64>> {
        let per = experts / ranks;
        (0..ranks)
            .map(|g| (g * per..(g + 1) * per).collect())
            .collect()
    }

    /// Plain top-k has a closed form: a rank holding `m` of `n` experts is
    /// missed with probability `C(n - m, k) / C(n, k)`.
    #[test]
    fn plain_top_k_matches_the_closed_form() {
        let placement = contiguous(256, 8);
        let mesh = Mesh {
            experts_of_ep_rank: &placement,
            ranks_per_node: 8,
        };
        let d = expected(256, &router(8, None), &mesh);
        let miss: f64 = (0..8)
            .map(|i| (224.0 - i as f64) / (256.0 - i as f64))
            .product();
        let want = 8.0 * (1.0 - miss);
        assert!(
            (d.ranks - want).abs() / want < 0.01,
            "{} vs {want}",
            d.ranks
        );
        assert_eq!(d.nodes, 1.0);
        assert_eq!(d.remote_nodes, 0.0);
    }

    /// DeepSeek-V3's routing on two nodes keeps four of eight groups: a token
    /// reaches both nodes unless all four kept groups sit on one of them.
    #[test]
    fn group_limited_routing_confines_the_nodes() {
        let placement = contiguous(256, 16);
        let mesh = Mesh {
            experts_of_ep_rank: &placement,
            ranks_per_node: 8,
        };
        let groups = GroupConfig {
            count: 8,
            kept: 4,
            score: GroupScore::Top2Sum,
        };
        let d = expected(256, &router(8, Some(groups)), &mesh);
        // All four kept groups on one node: 2 of C(8, 4) = 70 choices.
        let both = 1.0 - 2.0 / 70.0;
        assert!(d.nodes <= 2.0 && d.nodes > 1.0 + both - 0.03, "{}", d.nodes);
        assert!((d.remote_nodes - d.nodes / 2.0).abs() < 0.05);
    }

    #[test]
    fn the_estimate_is_deterministic() {
        let placement = contiguous(64, 8);
        let mesh = Mesh {
            experts_of_ep_rank: &placement,
            ranks_per_node: 4,
        };
        let a = expected(64, &router(6, None), &mesh);
        let b = expected(64, &router(6, None), &mesh);
        assert_eq!(a, b);
    }
}
