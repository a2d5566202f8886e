//! `moec place`: which experts go on which EP rank, and which experts get
//! extra copies, for the traffic of a routing statistics file.
//!
//! The search has two parts, and the simulator decides between them:
//! 1. **Balanced packing** (the greedy start, as DeepSeek's EPLB packs):
//!    the hottest experts get the `--replicas` extra copies one at a time
//!    (each to the expert whose copies carry the most load each), then every
//!    copy, heaviest first, goes to the least loaded EP rank that has a free
//!    slot and does not hold that expert yet. Ranks keep the experts per rank
//!    of an even placement (plus the replicas), so the weights per rank stay
//!    what they were.
//! 2. **Co-activation refinement** (meshes of several nodes): swaps of two
//!    experts between ranks of different nodes that lower the co-activation
//!    cut (tokens whose picks span two nodes, counted pair by pair) without
//!    raising the busiest rank's load above the packing's, until no swap
//!    helps: co-activated experts end up on one node, so the hierarchical
//!    dispatch sends fewer copies across nodes.
//!
//! Every candidate (the file's own placement, the packing, the refinement)
//! is compiled and simulated under the statistics (`Options::stats`), and
//! the fastest wins (the file's own on a tie). Deterministic: no randomness,
//! ties broken by index.

use crate::compile::{compile, Options};
use moec_lang::spec::{Placement, Program};
use moec_runtime::stats::RoutingStatistics;
use std::collections::BTreeMap;

/// Most swap rounds of the refinement (each round tries every pair once).
const MAX_ROUNDS: usize = 16;

/// One placement: the experts each EP rank holds (primaries) and the extra
/// copies (expert -> EP ranks).
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub primaries: Vec<Vec<u64>>,
    pub replicas: BTreeMap<u64, Vec<u64>>,
}

impl Layout {
    /// Every copy each rank holds (primaries, then replicas).
    pub fn holdings(&self) -> Vec<Vec<u64>> {
        let mut out = self.primaries.clone();
        for (&e, ranks) in &self.replicas {
            for &r in ranks {
                if let Some(list) = out.get_mut(r as usize) {
                    list.push(e);
                }
            }
        }
        out
    }

    /// The `.moe` text of this placement (the `placement` and `replicas`
    /// entries of a mesh section).
    pub fn moe_entries(&self) -> String {
        let ranks: Vec<String> = self
            .primaries
            .iter()
            .enumerate()
            .map(|(r, list)| format!("{r} = {}", list_text(list)))
            .collect();
        let mut text = format!("placement = explicit {{ {} }}\n", ranks.join(", "));
        if !self.replicas.is_empty() {
            text.push_str("replicas {\n");
            for (e, ranks) in &self.replicas {
                text.push_str(&format!("{e} = {}\n", list_text(ranks)));
            }
            text.push_str("}\n");
        }
        text
    }
}

fn list_text(items: &[u64]) -> String {
    let items: Vec<String> = items.iter().map(u64::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// One scored candidate.
#[derive(Clone, Debug)]
pub struct Scored {
    pub name: &'static str,
    pub layout: Layout,
    pub total_us: f64,
    /// The busiest EP rank's load over the mean.
    pub imbalance: f64,
    /// Expected nodes other than its own a token's picks reach.
    pub remote_nodes: f64,
    /// Tokens' picks that span two nodes, counted pair by pair.
    pub cut: u64,
}

/// What `moec place` found: every candidate, the chosen one first.
#[derive(Clone, Debug)]
pub struct Placed {
    pub candidates: Vec<Scored>,
}

impl Placed {
    pub fn best(&self) -> &Scored {
        &self.candidates[0]
    }
}

/// EP ranks of the group on one node (the unit the co-activation cut
/// counts by).
fn ranks_per_node(program: &Program) -> u64 {
    let m = &program.mesh;
    (m.gpus_per_node.min(m.ep.saturating_mul(m.etp)) / m.etp.max(1)).max(1)
}

/// Chooses a placement for `program` under `stats`, with `replicas` extra
/// copies of hot experts.
pub fn place(
    program: &Program,
    stats: &RoutingStatistics,
    replicas: u64,
) -> Result<Placed, String> {
    let l = &program.layer;
    let experts = l.experts.count;
    if stats.experts != experts || stats.top_k != l.router.top_k {
        return Err(format!(
            "the statistics are of {} experts, top-{}; the layer has {experts} experts, top-{}",
            stats.experts, stats.top_k, l.router.top_k
        ));
    }
    let ep = program.mesh.ep;
    if ep < 2 {
        return Err("one EP rank holds every expert: there is nothing to place".into());
    }
    let loads: Vec<f64> = stats.tokens_per_expert.iter().map(|&n| n as f64).collect();
    let per_node = ranks_per_node(program);
    let original = Layout {
        primaries: program
            .mesh
            .experts_of_rank(experts)
            .into_iter()
            .take(ep as usize)
            .collect(),
        replicas: program.mesh.replicas.clone(),
    };
    // The primaries alone (experts_of_rank appends the replicas).
    let original = Layout {
        primaries: original
            .primaries
            .iter()
            .enumerate()
            .map(|(r, list)| {
                list.iter()
                    .copied()
                    .filter(|e| {
                        !original
                            .replicas
                            .get(e)
                            .is_some_and(|ranks| ranks.contains(&(r as u64)))
                    })
                    .collect()
            })
            .collect(),
        replicas: original.replicas,
    };
    let packed = pack(&loads, ep, replicas);
    let refined = refine(&packed, &loads, &stats.coactivation, per_node);
    let mut candidates = Vec::new();
    for (name, layout) in [
        ("the file's", original),
        ("balanced packing", packed),
        ("packing + co-activation", refined),
    ] {
        if candidates.iter().any(|c: &Scored| c.layout == layout) {
            continue;
        }
        candidates.push(score(program, stats, name, layout, &loads, per_node)?);
    }
    // Fastest first; the file's own placement (first in) wins a tie.
    candidates.sort_by(|a, b| a.total_us.total_cmp(&b.total_us));
    Ok(Placed { candidates })
}

/// Compiles and simulates `program` with `layout` under `stats`.
fn score(
    program: &Program,
    stats: &RoutingStatistics,
    name: &'static str,
    layout: Layout,
    loads: &[f64],
    per_node: u64,
) -> Result<Scored, String> {
    let mut p = program.clone();
    p.mesh.placement = Placement::Explicit(layout.primaries.clone());
    p.mesh.replicas = layout.replicas.clone();
    let options = Options {
        stats: Some(stats.clone()),
        ..Options::default()
    };
    let compiled = compile(&p, &options).map_err(|e| format!("{name} placement: {e}"))?;
    let cut = cut(
        &holdings_primary(&layout, loads.len()),
        &stats.coactivation,
        per_node,
    );
    Ok(Scored {
        name,
        total_us: compiled.timeline.total_us,
        imbalance: compiled.report.load_skew,
        remote_nodes: compiled.report.remote_nodes,
        cut,
        layout,
    })
}

/// The node of each expert's primary copy.
fn holdings_primary(layout: &Layout, experts: usize) -> Vec<u64> {
    let mut rank_of = vec![0u64; experts];
    for (r, list) in layout.primaries.iter().enumerate() {
        for &e in list {
            if let Some(slot) = rank_of.get_mut(e as usize) {
                *slot = r as u64;
            }
        }
    }
    rank_of
}

/// Co-activated pairs whose primaries sit on different nodes.
fn cut(rank_of: &[u64], coactivation: &[Vec<u64>], per_node: u64) -> u64 {
    let mut total = 0;
    for (i, row) in coactivation.iter().enumerate() {
        for (j, &n) in row.iter().enumerate().skip(i + 1) {
            if rank_of[i] / per_node != rank_of[j] / per_node {
                total += n;
            }
        }
    }
    total
}

/// Balanced packing: `replicas` extra copies for the experts whose copies
/// carry the most load each, then every copy, heaviest first, onto the least
/// loaded rank with a free slot that does not hold the expert yet.
pub fn pack(loads: &[f64], ep: u64, replicas: u64) -> Layout {
    let experts = loads.len();
    let ep = ep as usize;
    let mut copies = vec![1u64; experts];
    for _ in 0..replicas {
        // Ties go to the lower index (deterministic).
        let hottest = (0..experts).fold(0, |best, e| {
            let per = |x: usize| loads[x] / copies[x] as f64;
            if per(e) > per(best) {
                e
            } else {
                best
            }
        });
        if copies[hottest] as usize >= ep {
            break;
        }
        copies[hottest] += 1;
    }
    let mut items: Vec<(usize, f64)> = (0..experts)
        .flat_map(|e| (0..copies[e]).map(move |_| e))
        .map(|e| (e, loads[e] / copies[e] as f64))
        .collect();
    // Heaviest first; ties by expert index.
    items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let slots = items.len().div_ceil(ep);
    let mut rank_load = vec![0.0f64; ep];
    let mut held: Vec<Vec<u64>> = vec![Vec::new(); ep];
    let mut primaries: Vec<Vec<u64>> = vec![Vec::new(); ep];
    let mut extra: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for (e, w) in items {
        let rank = (0..ep)
            .filter(|&r| held[r].len() < slots && !held[r].contains(&(e as u64)))
            .min_by(|&a, &b| rank_load[a].total_cmp(&rank_load[b]).then(a.cmp(&b)));
        let Some(r) = rank else { continue };
        rank_load[r] += w;
        held[r].push(e as u64);
        if primaries.iter().any(|p| p.contains(&(e as u64))) {
            extra.entry(e as u64).or_default().push(r as u64);
        } else {
            primaries[r].push(e as u64);
        }
    }
    for list in primaries.iter_mut() {
        list.sort_unstable();
    }
    for ranks in extra.values_mut() {
        ranks.sort_unstable();
    }
    Layout {
        primaries,
        replicas: extra,
    }
}

/// Swaps of two primaries between ranks of different nodes that lower the
/// co-activation cut without raising the busiest rank's load above the
/// packing's, round after round, until none helps (or [`MAX_ROUNDS`]).
/// Replicas stay where the packing put them.
///
/// A swap's change of the cut comes from each expert's affinity to each node
/// (its co-activation with the experts there), kept up to date as swaps are
/// made: moving `x` from node `A` to `B` and `y` back changes the cut by
/// `aff[x][A] - aff[x][B] + aff[y][B] - aff[y][A] + 2 coact[x][y]`.
pub fn refine(layout: &Layout, loads: &[f64], coactivation: &[Vec<u64>], per_node: u64) -> Layout {
    let ep = layout.primaries.len();
    let nodes = (ep as u64).div_ceil(per_node) as usize;
    if nodes < 2 {
        return layout.clone();
    }
    let experts = loads.len();
    let share = |e: u64| loads[e as usize] / (1 + out_replicas(layout, e)) as f64;
    let mut out = layout.clone();
    let mut rank_load: Vec<f64> = out
        .holdings()
        .iter()
        .map(|list| list.iter().map(|&e| share(e)).sum())
        .collect();
    let bound = rank_load.iter().copied().fold(0.0, f64::max);
    let node_of_rank = |r: usize| r / per_node as usize;
    let mut node_of: Vec<usize> = vec![0; experts];
    for (r, list) in out.primaries.iter().enumerate() {
        for &e in list {
            node_of[e as usize] = node_of_rank(r);
        }
    }
    let coact = |a: usize, b: usize| coactivation[a][b] as i64;
    let mut aff = vec![vec![0i64; nodes]; experts];
    for (x, row) in aff.iter_mut().enumerate() {
        for (z, &node) in node_of.iter().enumerate() {
            row[node] += coact(x, z);
        }
    }
    for _ in 0..MAX_ROUNDS {
        let mut improved = false;
        for a in 0..ep {
            for b in a + 1..ep {
                let (na, nb) = (node_of_rank(a), node_of_rank(b));
                if na == nb {
                    continue;
                }
                for i in 0..out.primaries[a].len() {
                    for j in 0..out.primaries[b].len() {
                        let (x, y) = (out.primaries[a][i], out.primaries[b][j]);
                        // A replicated expert may not land on a rank holding its copy.
                        if out
                            .replicas
                            .get(&x)
                            .is_some_and(|r| r.contains(&(b as u64)))
                            || out
                                .replicas
                                .get(&y)
                                .is_some_and(|r| r.contains(&(a as u64)))
                        {
                            continue;
                        }
                        let (xu, yu) = (x as usize, y as usize);
                        let delta = aff[xu][na] - aff[xu][nb] + aff[yu][nb] - aff[yu][na]
                            + 2 * coact(xu, yu);
                        let load_a = rank_load[a] - share(x) + share(y);
                        let load_b = rank_load[b] - share(y) + share(x);
                        if delta >= 0 || load_a.max(load_b) > bound + 1e-9 {
                            continue;
                        }
                        out.primaries[a][i] = y;
                        out.primaries[b][j] = x;
                        rank_load[a] = load_a;
                        rank_load[b] = load_b;
                        node_of[xu] = nb;
                        node_of[yu] = na;
                        for (z, row) in aff.iter_mut().enumerate() {
                            let moved = coact(z, xu) - coact(z, yu);
                            row[na] -= moved;
                            row[nb] += moved;
                        }
                        improved = true;
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
    for list in out.primaries.iter_mut() {
        list.sort_unstable();
    }
    out
}

fn out_replicas(layout: &Layout, e: u64) -> usize {
    layout.replicas.get(&e).map_or(0, Vec::len)
}

/// `source` (a `.moe` file) with its mesh's `placement` and `replicas`
/// replaced by `layout`'s, in canonical form; checked again, so a file it
/// returns is one `moec check` accepts. Comments elsewhere stay.
pub fn rewrite_source(source: &str, layout: &Layout) -> Result<String, String> {
    let text = crate::source_edit::replace_entries(
        source,
        "mesh",
        &["placement", "replicas"],
        &layout.moe_entries(),
    )?;
    crate::source_edit::checked(&text)
}
