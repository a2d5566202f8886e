//! A plain reference implementation of one MoE layer's forward pass.
//!
//! This is written from the book (`book/src/reference/router.md`,
//! `experts.md`, `capacity.md`) and the formulas in the project's model notes,
//! independently of the runtime: it shares only the configuration type
//! [`LayerConfig`]. It is meant to be obviously correct, not fast: every token
//! is routed on its own, every expert FFN is a naive matrix-vector product,
//! and everything is computed in `f64` (inputs and weights are widened from
//! `f32`); only the final outputs are narrowed back to `f32`.
//!
//! The layer runs on `R` ranks that form expert-parallel (EP) groups of `ep`
//! consecutive ranks (rank `r` is in group `r / ep`). Capacity limits and the
//! global token order (rank-major within the group, then token order, then
//! slot order `j = 0..k-1`) are per EP group.
//!
//! Weights are looked up by their Hugging Face names in PyTorch `Linear`
//! layout `[out, in]`; see [`forward`].

use moec_runtime::plan::{
    Activation, CapacityConfig, DropPolicy, GroupScore, LayerConfig, RouterConfig, Scoring,
    SoftmaxOver, WeightOn,
};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// A named weight: a row-major `f32` array of the given shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor { shape, data }
    }
}

/// What the reference computes for all ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct RefOutput {
    /// Per rank, the layer output `[tokens, hidden]`, row-major.
    pub outputs: Vec<Vec<f32>>,
    /// Assignments each expert received (before drops), summed over all ranks.
    pub tokens_per_expert: Vec<u64>,
    /// Assignments dropped by capacity, summed over all ranks.
    pub dropped: u64,
}

/// The forward pass of `layer` on `inputs.len()` ranks in EP groups of `ep`.
///
/// `inputs[r]` is rank `r`'s tokens `[T, H]`, row-major; every rank has the
/// same `T`. `layer.tokens_per_rank` is not used: `T` comes from the inputs.
///
/// Weights (`E` experts, hidden `H`, expert intermediate `F`, shared width
/// `S = shared.count · shared.intermediate`):
///
/// | name | shape | when |
/// | --- | --- | --- |
/// | `mlp.gate.weight` | `[E, H]` | always |
/// | `mlp.gate.bias` | `[E]` | `logit_bias` (added to the logits) |
/// | `mlp.gate.e_score_correction_bias` | `[E]` | `selection_bias` |
/// | `mlp.experts.{e}.gate_proj.weight` | `[F, H]` | SwiGLU experts |
/// | `mlp.experts.{e}.up_proj.weight` | `[F, H]` | always |
/// | `mlp.experts.{e}.down_proj.weight` | `[H, F]` | always |
/// | `mlp.experts.{e}.{gate,up,down}_proj.bias` | `[F]`, `[F]`, `[H]` | `expert_bias` (gate only for SwiGLU) |
/// | `mlp.shared_experts.{gate,up,down}_proj.weight` | `[S, H]`, `[S, H]`, `[H, S]` | shared experts (gate only for SwiGLU) |
/// | `mlp.shared_experts.{gate,up,down}_proj.bias` | `[S]`, `[S]`, `[H]` | shared `bias` |
/// | `mlp.shared_expert_gate.weight` | `[1, H]` | shared `sigmoid_gate` |
///
/// Tensors not in this table are ignored. A missing tensor, a wrong shape, a
/// non-finite value in an input or a used weight, or an inconsistent
/// configuration is an `Err` that says which.
pub fn forward(
    layer: &LayerConfig,
    ep: usize,
    inputs: &[Vec<f32>],
    weights: &BTreeMap<String, Tensor>,
) -> Result<RefOutput, String> {
    let dims = Dims::of(layer)?;
    let h = dims.hidden;
    let e_count = dims.experts;
    let k = dims.top_k;

    // ---- inputs
    if ep == 0 {
        return Err("ep must be at least 1".to_string());
    }
    if inputs.is_empty() {
        return Err("no ranks: inputs is empty".to_string());
    }
    if inputs.len() % ep != 0 {
        return Err(format!(
            "{} ranks do not form EP groups of {ep} (not a multiple)",
            inputs.len()
        ));
    }
    let len = inputs[0].len();
    for (r, x) in inputs.iter().enumerate() {
        if x.len() != len {
            return Err(format!(
                "input of rank {r} has {} values, rank 0 has {len}",
                x.len()
            ));
        }
        if x.len() % h != 0 {
            return Err(format!(
                "input of rank {r} has {} values, not a multiple of hidden {h}",
                x.len()
            ));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "input of rank {r} holds a non-finite value {} at index {i}",
                x[i]
            ));
        }
    }
    let tokens = len / h;

    // ---- weights
    // The router is a `Linear` `[E, H]`, with a bias (`mlp.gate.bias`, part
    // of the logits) exactly with `logit_bias`.
    let router_w = Linear::load(weights, "mlp.gate", e_count, h, layer.router.logit_bias)?;
    let selection_bias = if layer.router.selection_bias {
        Some(load(
            weights,
            "mlp.gate.e_score_correction_bias",
            &[e_count],
        )?)
    } else {
        None
    };
    let mut experts = Vec::with_capacity(e_count);
    for e in 0..e_count {
        experts.push(Ffn::load(
            weights,
            &format!("mlp.experts.{e}."),
            layer.ffn,
            dims.intermediate,
            h,
            layer.expert_bias,
        )?);
    }
    let shared = match &layer.shared {
        None => None,
        Some(sc) => {
            let width = to_usize(sc.count, "shared_experts count")?
                .checked_mul(to_usize(sc.intermediate, "shared_experts intermediate")?)
                .ok_or("shared_experts count * intermediate overflows")?;
            let ffn = Ffn::load(weights, "mlp.shared_experts.", sc.ffn, width, h, sc.bias)?;
            let gate = if sc.sigmoid_gate {
                Some(load_matrix(weights, "mlp.shared_expert_gate.weight", 1, h)?)
            } else {
                None
            };
            Some((ffn, gate))
        }
    };

    // ---- routing: every token of every rank on its own
    let inputs64: Vec<Vec<f64>> = inputs
        .iter()
        .map(|x| x.iter().map(|&v| f64::from(v)).collect())
        .collect();
    // routes[r][t] = the k (expert, weight) pairs in slot order.
    let mut routes: Vec<Vec<Vec<(usize, f64)>>> = Vec::with_capacity(inputs.len());
    for x in &inputs64 {
        let mut per_token = Vec::with_capacity(tokens);
        for t in 0..tokens {
            let row = &x[t * h..(t + 1) * h];
            per_token.push(route(
                &layer.router,
                &dims,
                &router_w,
                selection_bias.as_deref(),
                row,
            )?);
        }
        routes.push(per_token);
    }

    // ---- capacity: per EP group, in the global order
    // kept[r][t][j]: whether slot j of token t of rank r survives.
    let mut kept: Vec<Vec<Vec<bool>>> = vec![vec![vec![true; k]; tokens]; inputs.len()];
    let mut tokens_per_expert = vec![0u64; e_count];
    let mut dropped = 0u64;
    for group in 0..inputs.len() / ep {
        // The assignments of each expert in global order: (rank, token, slot, weight).
        let mut per_expert: Vec<Vec<(usize, usize, usize, f64)>> = vec![Vec::new(); e_count];
        // Ranks group * ep .. (group + 1) * ep, in rank order.
        for (r, rank_routes) in routes.iter().enumerate().skip(group * ep).take(ep) {
            for (t, slots) in rank_routes.iter().enumerate() {
                for (j, &(e, w)) in slots.iter().enumerate() {
                    per_expert[e].push((r, t, j, w));
                }
            }
        }
        for (e, list) in per_expert.iter_mut().enumerate() {
            tokens_per_expert[e] += list.len() as u64;
            let CapacityConfig::Limited { slots, drop, .. } = layer.capacity else {
                continue;
            };
            let cap = usize::try_from(slots).unwrap_or(usize::MAX);
            if list.len() <= cap {
                continue;
            }
            if drop == DropPolicy::Probs {
                // A stable sort: equal weights keep the global order.
                list.sort_by(|a, b| descending(a.3, b.3));
            }
            for &(r, t, j, _) in &list[cap..] {
                kept[r][t][j] = false;
                dropped += 1;
            }
        }
    }

    // ---- expert FFNs, combine, shared experts
    let mut outputs = Vec::with_capacity(inputs.len());
    for (r, x) in inputs64.iter().enumerate() {
        let mut out = Vec::with_capacity(tokens * h);
        for t in 0..tokens {
            let row = &x[t * h..(t + 1) * h];
            let mut y = vec![0.0f64; h];
            for (j, &(e, w)) in routes[r][t].iter().enumerate() {
                if !kept[r][t][j] {
                    continue;
                }
                let contribution = match layer.router.weight_on {
                    WeightOn::Output => scaled(w, &experts[e].apply(row)),
                    WeightOn::Input => experts[e].apply(&scaled(w, row)),
                };
                add_into(&mut y, &contribution);
            }
            if let Some((ffn, gate)) = &shared {
                let s = ffn.apply(row);
                let s = match gate {
                    None => s,
                    Some(g) => scaled(sigmoid(g.apply(row)[0]), &s),
                };
                add_into(&mut y, &s);
            }
            out.extend(y.iter().map(|&v| v as f32));
        }
        outputs.push(out);
    }

    Ok(RefOutput {
        outputs,
        tokens_per_expert,
        dropped,
    })
}

// ------------------------------------------------------------ configuration

/// The layer's sizes as `usize`, checked for consistency.
struct Dims {
    hidden: usize,
    experts: usize,
    intermediate: usize,
    top_k: usize,
    /// `(groups, kept, score)`.
    groups: Option<(usize, usize, GroupScore)>,
}

impl Dims {
    fn of(layer: &LayerConfig) -> Result<Dims, String> {
        let hidden = to_usize(layer.hidden, "hidden")?;
        let experts = to_usize(layer.experts, "experts count")?;
        let intermediate = to_usize(layer.intermediate, "experts intermediate")?;
        let top_k = to_usize(layer.router.top_k, "top_k")?;
        if hidden == 0 || experts == 0 || intermediate == 0 {
            return Err(format!(
                "hidden {hidden}, experts {experts} and intermediate {intermediate} must be at least 1"
            ));
        }
        if top_k == 0 || top_k > experts {
            return Err(format!("top_k {top_k} must be in 1..={experts}"));
        }
        let router = &layer.router;
        if router.scoring == Scoring::Sigmoid && router.softmax_over == SoftmaxOver::Topk {
            return Err("softmax_over = topk needs scoring = softmax".to_string());
        }
        if !(router.scale.is_finite() && router.scale > 0.0) {
            return Err(format!(
                "router scale {} must be finite and positive",
                router.scale
            ));
        }
        for (what, act) in std::iter::once(("experts", layer.ffn))
            .chain(layer.shared.iter().map(|s| ("shared_experts", s.ffn)))
        {
            if let Activation::Swiglu { limit: Some(l) } = act {
                if !(l.is_finite() && l > 0.0) {
                    return Err(format!(
                        "{what} swiglu_limit {l} must be finite and positive"
                    ));
                }
            }
        }
        let groups = match &router.groups {
            None => None,
            Some(g) => {
                let count = to_usize(g.count, "groups")?;
                let kept = to_usize(g.kept, "groups_kept")?;
                if count == 0 || experts % count != 0 {
                    return Err(format!("groups {count} must divide experts {experts}"));
                }
                if kept == 0 || kept > count {
                    return Err(format!("groups_kept {kept} must be in 1..={count}"));
                }
                let size = experts / count;
                if g.score == GroupScore::Top2Sum && size < 2 {
                    return Err(format!(
                        "group_score = top2_sum needs two experts per group, groups have {size}"
                    ));
                }
                if kept * size < top_k {
                    return Err(format!(
                        "the {kept} kept groups hold {} experts, fewer than top_k {top_k}",
                        kept * size
                    ));
                }
                Some((count, kept, g.score))
            }
        };
        Ok(Dims {
            hidden,
            experts,
            intermediate,
            top_k,
            groups,
        })
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in usize"))
}

// ------------------------------------------------------------ weights

/// A weight matrix `[rows, cols]`, row-major, widened to `f64`.
struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f64>,
}

impl Matrix {
    /// `W · x`, one dot product per row, summed in index order.
    fn apply(&self, x: &[f64]) -> Vec<f64> {
        debug_assert_eq!(x.len(), self.cols);
        (0..self.rows)
            .map(|i| {
                let row = &self.data[i * self.cols..(i + 1) * self.cols];
                row.iter().zip(x).map(|(w, v)| w * v).sum()
            })
            .collect()
    }
}

fn shape_text(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// The tensor `name`, checked to have exactly `shape` and finite values.
fn load(
    weights: &BTreeMap<String, Tensor>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f64>, String> {
    let t = weights.get(name).ok_or_else(|| {
        format!(
            "missing weight `{name}` (expected shape {})",
            shape_text(shape)
        )
    })?;
    if t.shape != shape {
        return Err(format!(
            "weight `{name}` has shape {}, expected {}",
            shape_text(&t.shape),
            shape_text(shape)
        ));
    }
    let count: usize = shape.iter().product();
    if t.data.len() != count {
        return Err(format!(
            "weight `{name}` has shape {} ({count} values) but holds {} values",
            shape_text(&t.shape),
            t.data.len()
        ));
    }
    if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "weight `{name}` holds a non-finite value {} at index {i}",
            t.data[i]
        ));
    }
    Ok(t.data.iter().map(|&v| f64::from(v)).collect())
}

fn load_matrix(
    weights: &BTreeMap<String, Tensor>,
    name: &str,
    rows: usize,
    cols: usize,
) -> Result<Matrix, String> {
    Ok(Matrix {
        rows,
        cols,
        data: load(weights, name, &[rows, cols])?,
    })
}

/// One linear projection `W · x (+ b)`.
struct Linear {
    weight: Matrix,
    bias: Option<Vec<f64>>,
}

impl Linear {
    fn load(
        weights: &BTreeMap<String, Tensor>,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, String> {
        let weight = load_matrix(weights, &format!("{prefix}.weight"), out, inp)?;
        let bias = if bias {
            Some(load(weights, &format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let mut y = self.weight.apply(x);
        if let Some(b) = &self.bias {
            add_into(&mut y, b);
        }
        y
    }
}

/// One expert FFN (or the fused shared experts).
struct Ffn {
    kind: FfnKind,
    up: Linear,
    down: Linear,
}

/// What happens between `up` and `down`.
enum FfnKind {
    /// `silu(gate(x)) * up(x)`, or gpt-oss's clamped form with `limit`.
    Swiglu {
        gate: Linear,
        limit: Option<f64>,
    },
    Gelu,
    GeluTanh,
    Relu,
}

impl Ffn {
    /// Loads `{prefix}gate_proj` (SwiGLU only), `{prefix}up_proj` and `{prefix}down_proj`.
    fn load(
        weights: &BTreeMap<String, Tensor>,
        prefix: &str,
        act: Activation,
        width: usize,
        hidden: usize,
        bias: bool,
    ) -> Result<Ffn, String> {
        let kind = match act {
            Activation::Swiglu { limit } => FfnKind::Swiglu {
                gate: Linear::load(weights, &format!("{prefix}gate_proj"), width, hidden, bias)?,
                limit,
            },
            Activation::Gelu => FfnKind::Gelu,
            Activation::GeluTanh => FfnKind::GeluTanh,
            Activation::Relu => FfnKind::Relu,
        };
        let up = Linear::load(weights, &format!("{prefix}up_proj"), width, hidden, bias)?;
        let down = Linear::load(weights, &format!("{prefix}down_proj"), hidden, width, bias)?;
        Ok(Ffn { kind, up, down })
    }

    fn apply(&self, x: &[f64]) -> Vec<f64> {
        let u = self.up.apply(x);
        let hidden: Vec<f64> = match &self.kind {
            FfnKind::Swiglu { gate, limit: None } => {
                let g = gate.apply(x);
                g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect()
            }
            FfnKind::Swiglu {
                gate,
                limit: Some(l),
            } => {
                let l = *l;
                let g = gate.apply(x);
                g.iter()
                    .zip(&u)
                    .map(|(&g, &u)| {
                        let g = g.min(l);
                        let u = u.clamp(-l, l);
                        (u + 1.0) * g * sigmoid(1.702 * g)
                    })
                    .collect()
            }
            FfnKind::Gelu => u.iter().map(|&v| gelu(v)).collect(),
            FfnKind::GeluTanh => u.iter().map(|&v| gelu_tanh(v)).collect(),
            FfnKind::Relu => u.iter().map(|&v| if v > 0.0 { v } else { 0.0 }).collect(),
        };
        self.down.apply(&hidden)
    }
}

// ------------------------------------------------------------ router

/// `a` before `b` when `a` is larger (for sorting from the largest down).
/// Values here are always finite; equal values (also `-0.0` and `0.0`) tie.
fn descending(a: f64, b: f64) -> Ordering {
    b.partial_cmp(&a).unwrap_or(Ordering::Equal)
}

fn softmax(v: &[f64]) -> Vec<f64> {
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = v.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|&x| x / sum).collect()
}

/// The router for one token: the `top_k` (expert, weight) pairs in slot
/// order, from the highest selection score down (ties: lower expert first).
fn route(
    router: &RouterConfig,
    dims: &Dims,
    gate: &Linear,
    selection_bias: Option<&[f64]>,
    x: &[f64],
) -> Result<Vec<(usize, f64)>, String> {
    let e_count = dims.experts;
    // 1. logits, with the logit bias when the router has one
    let logits = gate.apply(x);
    // 2. scores
    let scores: Vec<f64> = match (router.scoring, router.softmax_over) {
        (Scoring::Softmax, SoftmaxOver::All) => softmax(&logits),
        (Scoring::Sigmoid, _) => logits.iter().map(|&l| sigmoid(l)).collect(),
        (Scoring::Softmax, SoftmaxOver::Topk) => logits.clone(),
    };
    // 3. selection scores
    let sel: Vec<f64> = match selection_bias {
        None => scores.clone(),
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
    };
    // 4. selection, first narrowed to the kept groups
    let mut allowed = vec![true; e_count];
    if let Some((count, kept, score)) = dims.groups {
        let size = e_count / count;
        let group_scores: Vec<f64> = (0..count)
            .map(|g| {
                let mut members = sel[g * size..(g + 1) * size].to_vec();
                members.sort_by(|a, b| descending(*a, *b));
                match score {
                    GroupScore::Top2Sum => members[0] + members[1],
                    GroupScore::Max => members[0],
                }
            })
            .collect();
        let mut order: Vec<usize> = (0..count).collect();
        order.sort_by(|&a, &b| descending(group_scores[a], group_scores[b]).then(a.cmp(&b)));
        allowed = vec![false; e_count];
        for &g in &order[..kept] {
            for a in &mut allowed[g * size..(g + 1) * size] {
                *a = true;
            }
        }
    }
    let mut candidates: Vec<usize> = (0..e_count).filter(|&e| allowed[e]).collect();
    candidates.sort_by(|&a, &b| descending(sel[a], sel[b]).then(a.cmp(&b)));
    let chosen = &candidates[..dims.top_k];
    // 5. weights from the unbiased scores
    let mut weights: Vec<f64> = match (router.scoring, router.softmax_over) {
        (Scoring::Softmax, SoftmaxOver::Topk) => {
            softmax(&chosen.iter().map(|&e| logits[e]).collect::<Vec<f64>>())
        }
        _ => chosen.iter().map(|&e| scores[e]).collect(),
    };
    // 6. normalisation
    if router.normalize {
        let sum: f64 = weights.iter().sum();
        // Softmax and sigmoid scores are never negative, so only 0 (all
        // chosen sigmoid scores underflowed) is a problem.
        if sum <= 0.0 {
            return Err(format!(
                "the chosen routing weights sum to {sum}; cannot normalise"
            ));
        }
        for w in &mut weights {
            *w /= sum;
        }
    }
    // 7. scaling
    for w in &mut weights {
        *w *= router.scale;
    }
    Ok(chosen.iter().copied().zip(weights).collect())
}

// ------------------------------------------------------------ element-wise math

fn scaled(a: f64, v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| a * x).collect()
}

fn add_into(acc: &mut [f64], v: &[f64]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// `σ(v) = 1 / (1 + exp(−v))`.
pub fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// `silu(v) = v · σ(v)`.
pub fn silu(v: f64) -> f64 {
    v * sigmoid(v)
}

/// Exact GELU, `v · Φ(v) = 0.5 · v · (1 + erf(v / √2))`.
///
/// For negative `v` this is computed as `0.5 · v · erfc(−v / √2)`, which is
/// the same number without the cancellation in `1 + erf`.
pub fn gelu(v: f64) -> f64 {
    let z = v / std::f64::consts::SQRT_2;
    if z >= 0.0 {
        0.5 * v * (1.0 + erf(z))
    } else {
        0.5 * v * erfc(-z)
    }
}

/// `0.5 · v · (1 + tanh(√(2/π) · (v + 0.044715 · v³)))`.
pub fn gelu_tanh(v: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
}

/// `2 / √π`.
const TWO_OVER_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;

/// `erf(x)` for `0 ≤ x`, from the series
/// `erf(x) = 2/√π · exp(−x²) · Σ_{n≥0} 2ⁿ x^{2n+1} / (1·3·…·(2n+1))`,
/// whose terms are all positive (no cancellation).
fn erf_series(x: f64) -> f64 {
    let x2 = x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0f64;
    // Terms grow while 2x²/(2n+3) > 1 and then fall geometrically; for x < 6
    // a few hundred terms are far more than enough.
    for _ in 0..1000 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
        if term <= sum * 1e-17 {
            break;
        }
    }
    TWO_OVER_SQRT_PI * (-x2).exp() * sum
}

/// `erfc(x)` for `x ≥ 2`, from the continued fraction
/// `erfc(x) = exp(−x²)/√π · 1 / (x + (1/2) / (x + (2/2) / (x + (3/2) / (x + …))))`,
/// evaluated bottom-up from 200 levels deep (in f64 it has converged
/// after about 50 levels at `x = 2`, fewer for larger `x`).
fn erfc_continued_fraction(x: f64) -> f64 {
    let mut t = x;
    for n in (1..=200).rev() {
        t = x + (f64::from(n) / 2.0) / t;
    }
    0.5 * TWO_OVER_SQRT_PI * (-x * x).exp() / t
}

/// The error function, accurate to about 1e-15 relative.
pub fn erf(x: f64) -> f64 {
    if x < 0.0 {
        -erf(-x)
    } else if x < 2.0 {
        erf_series(x)
    } else if x < 6.0 {
        1.0 - erfc_continued_fraction(x)
    } else {
        // erfc(6) ≈ 2.2e-17, below half an ulp of 1.
        1.0
    }
}

/// The complementary error function `1 − erf(x)`, accurate also where it is
/// tiny (large `x`).
pub fn erfc(x: f64) -> f64 {
    if x < 2.0 {
        1.0 - erf(x)
    } else {
        erfc_continued_fraction(x)
    }
}
