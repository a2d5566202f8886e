//! The router kernels: `router_fused` and the stages it fuses.
//!
//! One row is one token's `E` logits. The building blocks are shared by the
//! fused kernel and the split stages, so that both compute every value with
//! the same operations in the same order:
//!
//! - softmax: `m = max_e l_e` (a running `max` from `-∞`), then
//!   `Σ = Σ_e exp(l_e - m)` (sequential from `0`), then
//!   `s_e = exp(l_e - m) / Σ`;
//! - sigmoid: `s_e = 1 / (1 + exp(-l_e))`;
//! - selection (of `count` out of `n` values, top-k of experts and the kept
//!   groups alike): `count` passes, each taking the first not-yet-taken index
//!   with the strictly largest value, so ties go to the lower index and the
//!   picks come out from the largest value down. A pass always picks some
//!   index, even when the values are `-∞` or NaN, so the ids are always
//!   distinct and in range;
//! - a group's score: its largest selection score (`group_score = 1`, or a
//!   group of one expert), or the sum `first + second` of its two largest
//!   (`group_score = 0`), both found with strict `>` from `-∞`;
//! - normalisation: `Σ = Σ_j w_j` (sequential from `0`), `w_j = w_j / Σ`;
//! - scaling: `w_j = w_j · scale`.

use crate::build::{and, eq, exp, gt, lt, max, or, sigmoid, Arr, Buf, Builder, Var, E};
use crate::ir::{Access, Elem, Kernel, Ty, MAX_ARRAY_LEN};

use super::{neg_inf, Consts, DescribeError, Kind, Res};

/// The router constants of one kernel.
struct Router {
    experts: i64,
    top_k: i64,
    groups: i64,
    kept: i64,
    sigmoid: bool,
    over_topk: bool,
    selection_bias: bool,
    group_max: bool,
    normalize: bool,
}

impl Router {
    /// Experts per group.
    fn per_group(&self) -> i64 {
        self.experts / self.groups
    }

    /// Whether group-limited selection drops any group.
    fn limits_groups(&self) -> bool {
        self.kept < self.groups
    }
}

/// Reads and validates the router constants `kind` needs (those it does not
/// need are validated when given, so a plan's inconsistent table is caught
/// whichever kernel is described first).
fn parse(kind: Kind, c: &Consts<'_>) -> Res<Router> {
    let needs_experts = !matches!(kind, Kind::RouterNormalize | Kind::RouterScale);
    let needs_top_k = matches!(
        kind,
        Kind::RouterFused | Kind::RouterTopk | Kind::RouterNormalize | Kind::RouterScale
    );
    let max_experts = i64::from(MAX_ARRAY_LEN);
    let experts = match c.get("experts")? {
        Some(_) => Some(c.range("experts", 1, max_experts)?),
        None if needs_experts => Some(c.required("experts")?),
        None => None,
    };
    let top_k = match c.get("top_k")? {
        Some(k) => {
            let hi = experts.unwrap_or(max_experts);
            if k < 1 || k > hi {
                return Err(c.invalid(
                    "top_k",
                    k,
                    match experts {
                        Some(e) => format!("it must be in 1 ..= experts ({e})"),
                        None => format!("it must be in 1 ..= {max_experts}"),
                    },
                ));
            }
            Some(k)
        }
        None if needs_top_k => Some(c.required("top_k")?),
        None => None,
    };
    let groups = c.get("groups")?.unwrap_or(1);
    let kept = match c.get("groups_kept")? {
        Some(k) => k,
        None if groups == 1 => 1,
        None => {
            return Err(DescribeError::Missing {
                kernel: c.kernel,
                constant: "groups_kept",
            })
        }
    };
    if let Some(e) = experts {
        if groups < 1 || groups > e || e % groups != 0 {
            return Err(c.invalid("groups", groups, format!("it must divide experts ({e})")));
        }
        if kept < 1 || kept > groups {
            return Err(c.invalid(
                "groups_kept",
                kept,
                format!("it must be in 1 ..= groups ({groups})"),
            ));
        }
        if let Some(k) = top_k {
            if k > kept * (e / groups) {
                return Err(c.invalid(
                    "top_k",
                    k,
                    format!(
                        "the {kept} kept groups of {} experts hold fewer than top_k experts",
                        e / groups
                    ),
                ));
            }
        }
    }
    let sigmoid = match c.get("scoring")? {
        None | Some(0) => false,
        Some(1) => true,
        Some(v) => return Err(c.invalid("scoring", v, "it must be 0 (softmax) or 1 (sigmoid)")),
    };
    let over_topk = c.switch("softmax_over")?;
    if over_topk && sigmoid {
        return Err(c.invalid(
            "softmax_over",
            1,
            "a softmax over the top-k logits needs scoring = 0 (softmax)",
        ));
    }
    Ok(Router {
        experts: experts.unwrap_or(1),
        top_k: top_k.unwrap_or(1),
        groups,
        kept,
        sigmoid,
        over_topk,
        selection_bias: c.switch("selection_bias")?,
        group_max: c.switch("group_score")?,
        normalize: c.switch("normalize")?,
    })
}

pub(super) fn describe(kind: Kind, c: &Consts<'_>) -> Res<Kernel> {
    let r = parse(kind, c)?;
    let mut b = Builder::new(kind.name());
    match kind {
        Kind::RouterFused => fused(&mut b, &r),
        Kind::RouterScores => scores(&mut b, &r),
        Kind::RouterBias => bias(&mut b, &r),
        Kind::RouterGroupSelect => groups(&mut b, &r),
        Kind::RouterTopk => topk(&mut b, &r),
        Kind::RouterNormalize => normalize_kernel(&mut b, &r),
        _ => scale_kernel(&mut b, &r),
    }
    Ok(b.finish()?)
}

/// `sink(i, exp(src(i) - m) / Σ)` for `i = 0 .. n`: a numerically stable
/// softmax (see the module docs for the exact order).
fn softmax(
    b: &mut Builder,
    n: i64,
    src: &dyn Fn(Var) -> E,
    sink: &mut dyn FnMut(&mut Builder, Var, E),
) {
    let m = b.local("max", neg_inf());
    b.for_range(0, n, |b, i| b.set(m, max(m, src(i))));
    let sum = b.local("sum", 0.0f32);
    b.for_range(0, n, |b, i| b.set(sum, sum + exp(src(i) - m)));
    b.for_range(0, n, |b, i| sink(b, i, exp(src(i) - m) / sum));
}

/// Picks `count` of the `n` values `val(i)` whose `taken[i]` is `0`, largest
/// first, ties to the lower index; marks each pick taken and calls
/// `pick(j, index)` for the `j`-th.
fn select_top(
    b: &mut Builder,
    n: i64,
    count: i64,
    val: &dyn Fn(E) -> E,
    taken: Arr,
    pick: &mut dyn FnMut(&mut Builder, Var, Var),
) {
    let best = b.var("best", Ty::I64);
    let best_value = b.var("best_value", Ty::F32);
    b.for_range(0, count, |b, j| {
        b.set(best, -1);
        b.set(best_value, 0.0f32);
        b.for_range(0, n, |b, i| {
            let better = or(lt(best, 0), gt(val(i.e()), best_value));
            b.if_(and(eq(taken.at(i), 0), better), |b| {
                b.set(best, i);
                b.set(best_value, val(i.e()));
            });
        });
        b.array_set(taken, best, 1);
        pick(b, j, best);
    });
}

/// Scores the groups by the selection scores `sel(e)` and returns an `I64`
/// array of `groups` flags, `1` for the `groups_kept` kept groups.
fn kept_groups(b: &mut Builder, r: &Router, sel: &dyn Fn(E) -> E) -> Arr {
    let n = r.per_group();
    let score = b.array("group_score", Ty::F32, r.groups as u32);
    let kept = b.array("group_kept", Ty::I64, r.groups as u32);
    let first = b.var("first", Ty::F32);
    let second = b.var("second", Ty::F32);
    let v = b.var("v", Ty::F32);
    let best_only = r.group_max || n == 1;
    b.for_range(0, r.groups, |b, g| {
        b.set(first, neg_inf());
        b.set(second, neg_inf());
        b.for_range(0, n, |b, i| {
            b.set(v, sel(g * n + i));
            if best_only {
                b.if_(gt(v, first), |b| b.set(first, v));
            } else {
                b.if_else(
                    gt(v, first),
                    |b| {
                        b.set(second, first);
                        b.set(first, v);
                    },
                    |b| b.if_(gt(v, second), |b| b.set(second, v)),
                );
            }
        });
        if best_only {
            b.array_set(score, g, first);
        } else {
            b.array_set(score, g, first + second);
        }
    });
    select_top(
        b,
        r.groups,
        r.kept,
        &|g| score.at(g),
        kept,
        &mut |_, _, _| {},
    );
    kept
}

/// `w_j ← w_j / Σ_j w_j` over a `k`-element array.
fn normalize(b: &mut Builder, w: Arr, k: i64) {
    let sum = b.local("wsum", 0.0f32);
    b.for_range(0, k, |b, j| b.set(sum, sum + w.at(j)));
    b.for_range(0, k, |b, j| b.array_set(w, j, w.at(j) / sum));
}

/// A softmax over the `k` values of `w`, in place.
fn softmax_in_place(b: &mut Builder, w: Arr, k: i64) {
    softmax(b, k, &|j| w.at(j), &mut |b, j, v| b.array_set(w, j, v));
}

fn fused(b: &mut Builder, r: &Router) {
    let (e, k) = (r.experts, r.top_k);
    let logits = b.buffer("logits", Elem::F32, Access::Read);
    let ids = b.buffer("ids", Elem::I32, Access::Write);
    let weights = b.buffer("weights", Elem::F32, Access::Write);
    let bias = b.buffer("bias", Elem::F32, Access::Read);
    let scale = b.scalar("scale", Ty::F32);
    let t = b.row();
    let lrow = b.local("logit_row", &t * e);
    let logit = move |i: E| logits.at(lrow + i);

    // Scores s_e: an array, except for a softmax over the top-k logits, whose
    // scores are the logits themselves.
    let s: Box<dyn Fn(E) -> E> = if r.over_topk {
        Box::new(logit)
    } else {
        let s = b.array("scores", Ty::F32, e as u32);
        if r.sigmoid {
            b.for_range(0, e, |b, i| b.array_set(s, i, sigmoid(logit(i.e()))));
        } else {
            softmax(b, e, &|i| logit(i.e()), &mut |b, i, v| b.array_set(s, i, v));
        }
        Box::new(move |i: E| s.at(i))
    };
    // Selection scores c_e.
    let c = |i: E| {
        if r.selection_bias {
            s(i.clone()) + bias.at(i)
        } else {
            s(i)
        }
    };
    // Experts outside the kept groups start out taken, so the top-k never
    // sees them.
    let taken = b.array("taken", Ty::I64, e as u32);
    if r.limits_groups() {
        let kept = kept_groups(b, r, &c);
        let n = r.per_group();
        b.for_range(0, e, |b, i| {
            b.array_set(taken, i, E::from(1) - kept.at(i / n));
        });
    }
    let w = b.array("w", Ty::F32, k as u32);
    select_top(b, e, k, &c, taken, &mut |b, j, best| {
        b.store(ids, &t * k + j, best);
        b.array_set(w, j, s(best.e()));
    });
    if r.over_topk {
        softmax_in_place(b, w, k);
    }
    if r.normalize {
        normalize(b, w, k);
    }
    b.for_range(0, k, |b, j| {
        b.store(weights, &t * k + j, w.at(j) * &scale);
    });
}

fn scores(b: &mut Builder, r: &Router) {
    let e = r.experts;
    let logits = b.buffer("logits", Elem::F32, Access::Read);
    let out = b.buffer("scores", Elem::F32, Access::Write);
    let row = b.local("row_base", b.row() * e);
    if r.over_topk {
        b.for_range(0, e, |b, i| b.store(out, row + i, logits.at(row + i)));
    } else if r.sigmoid {
        b.for_range(0, e, |b, i| {
            b.store(out, row + i, sigmoid(logits.at(row + i)));
        });
    } else {
        softmax(b, e, &|i| logits.at(row + i), &mut |b, i, v| {
            b.store(out, row + i, v)
        });
    }
}

fn bias(b: &mut Builder, r: &Router) {
    let e = r.experts;
    let scores = b.buffer("scores", Elem::F32, Access::Read);
    let selection = b.buffer("selection", Elem::F32, Access::Write);
    let bias = b.buffer("bias", Elem::F32, Access::Read);
    let row = b.local("row_base", b.row() * e);
    b.for_range(0, e, |b, i| {
        b.store(selection, row + i, scores.at(row + i) + bias.at(i));
    });
}

fn groups(b: &mut Builder, r: &Router) {
    let e = r.experts;
    let selection = b.buffer("selection", Elem::F32, Access::Read);
    let masked = b.buffer("masked", Elem::F32, Access::Write);
    let row = b.local("row_base", b.row() * e);
    let sel = move |i: E| selection.at(row + i);
    if r.limits_groups() {
        let kept = kept_groups(b, r, &sel);
        let n = r.per_group();
        b.for_range(0, e, |b, i| {
            let v = crate::build::select(eq(kept.at(i / n), 1), sel(i.e()), neg_inf());
            b.store(masked, row + i, v);
        });
    } else {
        b.for_range(0, e, |b, i| b.store(masked, row + i, sel(i.e())));
    }
}

fn topk(b: &mut Builder, r: &Router) {
    let (e, k) = (r.experts, r.top_k);
    let selection = b.buffer("selection", Elem::F32, Access::Read);
    let ids = b.buffer("ids", Elem::I32, Access::Write);
    let weights = b.buffer("weights", Elem::F32, Access::Write);
    let bias = b.buffer("bias", Elem::F32, Access::Read);
    let t = b.row();
    let row = b.local("row_base", &t * e);
    let sel = move |i: E| selection.at(row + i);
    let taken = b.array("taken", Ty::I64, e as u32);
    let w = b.array("w", Ty::F32, k as u32);
    select_top(b, e, k, &sel, taken, &mut |b, j, best| {
        b.store(ids, &t * k + j, best);
        let c = sel(best.e());
        let s = if r.selection_bias {
            c - bias.at(best)
        } else {
            c
        };
        b.array_set(w, j, s);
    });
    if r.over_topk {
        softmax_in_place(b, w, k);
    }
    b.for_range(0, k, |b, j| b.store(weights, &t * k + j, w.at(j)));
}

/// The `k` routing weights of the row, in place.
fn weights_row(b: &mut Builder, k: i64) -> (Buf, Var) {
    let weights = b.buffer("weights", Elem::F32, Access::ReadWrite);
    let row = b.local("row_base", b.row() * k);
    (weights, row)
}

fn normalize_kernel(b: &mut Builder, r: &Router) {
    let k = r.top_k;
    let (weights, row) = weights_row(b, k);
    let sum = b.local("wsum", 0.0f32);
    b.for_range(0, k, |b, j| b.set(sum, sum + weights.at(row + j)));
    b.for_range(0, k, |b, j| {
        b.store(weights, row + j, weights.at(row + j) / sum);
    });
}

fn scale_kernel(b: &mut Builder, r: &Router) {
    let k = r.top_k;
    let (weights, row) = weights_row(b, k);
    let scale = b.scalar("scale", Ty::F32);
    b.for_range(0, k, |b, j| {
        b.store(weights, row + j, weights.at(row + j) * &scale);
    });
}
