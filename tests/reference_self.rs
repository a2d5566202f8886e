//! Tests of the reference MoE layer (`moec_tests::reference`) on tiny cases
//! whose expected numbers are worked out by hand (H = 2, F = 2, 1-4 experts,
//! identity-like weights), so that the reference the runtime is held against
//! is itself held against the book.

#![allow(clippy::unwrap_used)]

use moec_runtime::plan::{
    Activation, CapacityConfig, DType, DropPolicy, GroupConfig, GroupScore, LayerConfig,
    RouterConfig, Scoring, SharedConfig, SoftmaxOver, WeightOn,
};
use moec_tests::reference::{erf, erfc, forward, gelu, gelu_tanh, RefOutput, Tensor};
use std::collections::BTreeMap;

// ------------------------------------------------------------ helpers

type Weights = BTreeMap<String, Tensor>;

/// A layer with H = 2, F = 2, softmax top-k over all experts, no
/// normalisation, scale 1, weights on the output, dropless, no shared experts.
fn layer(experts: u64, top_k: u64, ffn: Activation) -> LayerConfig {
    LayerConfig {
        name: "reference-test".to_string(),
        hidden: 2,
        dtype: DType::F32,
        dispatch_dtype: DType::F32,
        tokens_per_rank: 1,
        experts,
        intermediate: 2,
        ffn,
        expert_bias: false,
        shared: None,
        router: RouterConfig {
            scoring: Scoring::Softmax,
            top_k,
            logit_bias: false,
            softmax_over: SoftmaxOver::All,
            selection_bias: false,
            groups: None,
            normalize: false,
            scale: 1.0,
            weight_on: WeightOn::Output,
        },
        capacity: CapacityConfig::Dropless,
    }
}

fn put(w: &mut Weights, name: &str, shape: &[usize], data: &[f32]) {
    w.insert(name.to_string(), Tensor::new(shape.to_vec(), data.to_vec()));
}

/// `mlp.gate.weight` from its rows (one per expert).
fn router(w: &mut Weights, rows: &[[f32; 2]]) {
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    put(w, "mlp.gate.weight", &[rows.len(), 2], &data);
}

/// ReLU experts with `up = I` and `down = (e + 1) I`: `FFN_e(x) = (e + 1) relu(x)`.
fn relu_experts(w: &mut Weights, experts: usize) {
    for e in 0..experts {
        let s = (e + 1) as f32;
        put(
            w,
            &format!("mlp.experts.{e}.up_proj.weight"),
            &[2, 2],
            &[1.0, 0.0, 0.0, 1.0],
        );
        put(
            w,
            &format!("mlp.experts.{e}.down_proj.weight"),
            &[2, 2],
            &[s, 0.0, 0.0, s],
        );
    }
}

/// Router rows and ReLU experts for `logits = [l_0, ..., l_{E-1}]` on the token `[1, 0]`.
fn relu_layer_weights(logits: &[f32]) -> Weights {
    let mut w = Weights::new();
    let rows: Vec<[f32; 2]> = logits.iter().map(|&l| [l, 0.0]).collect();
    router(&mut w, &rows);
    relu_experts(&mut w, logits.len());
    w
}

fn run(layer: &LayerConfig, ep: usize, inputs: &[&[f32]], w: &Weights) -> RefOutput {
    let inputs: Vec<Vec<f32>> = inputs.iter().map(|x| x.to_vec()).collect();
    forward(layer, ep, &inputs, w).unwrap()
}

fn assert_close(actual: &[f32], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let tol = 1e-6 * e.abs().max(1.0);
        assert!(
            (f64::from(a) - e).abs() <= tol,
            "element {i}: {a} vs expected {e} (all: {actual:?} vs {expected:?})"
        );
    }
}

fn sigma(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

fn silu(v: f64) -> f64 {
    v * sigma(v)
}

const E: f64 = std::f64::consts::E;

// ------------------------------------------------------------ router

#[test]
fn softmax_top1_keeps_the_raw_probability() {
    // logits [1, 0]: p_0 = e / (e + 1); FFN_0 = relu.
    let mut l = layer(2, 1, Activation::Relu);
    let mut w = Weights::new();
    router(&mut w, &[[1.0, 0.0], [0.0, 0.0]]);
    relu_experts(&mut w, 2);
    let out = run(&l, 1, &[&[1.0, 1.0]], &w);
    let p = E / (E + 1.0);
    assert!((p - 0.731_058_578_630_004_9).abs() < 1e-15);
    assert_close(&out.outputs[0], &[p, p]);
    assert_eq!(out.tokens_per_expert, vec![1, 0]);
    assert_eq!(out.dropped, 0);

    // Normalising a single weight makes it 1.
    l.router.normalize = true;
    let out = run(&l, 1, &[&[1.0, 1.0]], &w);
    assert_close(&out.outputs[0], &[1.0, 1.0]);
}

#[test]
fn normalize_and_scale() {
    // logits [ln 4, ln 2, 0] -> softmax [4, 2, 1] / 7; top-2 = experts 0, 1.
    let w = relu_layer_weights(&[4f32.ln(), 2f32.ln(), 0.0]);
    let mut l = layer(3, 2, Activation::Relu);
    let x: &[f32] = &[1.0, 0.0];

    // Raw: 4/7 * 1 + 2/7 * 2 = 8/7.
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[8.0 / 7.0, 0.0]);
    assert_eq!(out.tokens_per_expert, vec![1, 1, 0]);

    // Normalised: 2/3 * 1 + 1/3 * 2 = 4/3.
    l.router.normalize = true;
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[4.0 / 3.0, 0.0]);

    // Scaled after normalising: 2.5 * 4/3.
    l.router.scale = 2.5;
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[10.0 / 3.0, 0.0]);
}

#[test]
fn sigmoid_selection_bias_changes_selection_not_weights() {
    // logits [1, 0]: s = [σ(1), 0.5].
    let mut l = layer(2, 1, Activation::Relu);
    l.router.scoring = Scoring::Sigmoid;
    let mut w = Weights::new();
    router(&mut w, &[[1.0, 0.0], [0.0, 0.0]]);
    relu_experts(&mut w, 2);
    let x: &[f32] = &[1.0, 1.0];

    // Without bias: expert 0 with weight σ(1).
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[sigma(1.0), sigma(1.0)]);
    assert_eq!(out.tokens_per_expert, vec![1, 0]);

    // c = s + [0, 0.5] = [0.73, 1.0]: expert 1 wins, with its unbiased weight 0.5.
    l.router.selection_bias = true;
    put(
        &mut w,
        "mlp.gate.e_score_correction_bias",
        &[2],
        &[0.0, 0.5],
    );
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[0.5 * 2.0, 0.5 * 2.0]);
    assert_eq!(out.tokens_per_expert, vec![0, 1]);

    // c = [0.73, 0.7]: a bias of 0.2 is not enough; expert 0 keeps weight σ(1).
    put(
        &mut w,
        "mlp.gate.e_score_correction_bias",
        &[2],
        &[0.0, 0.2],
    );
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[sigma(1.0), sigma(1.0)]);
    assert_eq!(out.tokens_per_expert, vec![1, 0]);

    // The bias is required once selection_bias is on.
    w.remove("mlp.gate.e_score_correction_bias");
    let err = forward(&l, 1, &[x.to_vec()], &w).unwrap_err();
    assert!(err.contains("mlp.gate.e_score_correction_bias"), "{err}");
}

#[test]
fn group_limited_selection() {
    // logits [2, 2, 2.5, 0], softmax, top-2, normalised; groups {0, 1} and {2, 3}.
    // top2_sum: group 0 has e² + e² = 14.8, group 1 has e^2.5 + 1 = 13.2 -> group 0.
    // max: group 0 has e², group 1 has e^2.5 -> group 1.
    let w = relu_layer_weights(&[2.0, 2.0, 2.5, 0.0]);
    let mut l = layer(4, 2, Activation::Relu);
    l.router.normalize = true;
    let x: &[f32] = &[1.0, 0.0];
    let (e2, e25) = (2f64.exp(), 2.5f64.exp());

    // No groups: experts 2 and 0 (0 and 1 tie; the lower index wins).
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[(3.0 * e25 + e2) / (e25 + e2), 0.0]);
    assert_eq!(out.tokens_per_expert, vec![1, 0, 1, 0]);

    // top2_sum keeps group 0: experts 0 and 1 with weight 1/2 each.
    l.router.groups = Some(GroupConfig {
        count: 2,
        kept: 1,
        score: GroupScore::Top2Sum,
    });
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[0.5 * 1.0 + 0.5 * 2.0, 0.0]);
    assert_eq!(out.tokens_per_expert, vec![1, 1, 0, 0]);

    // max keeps group 1: experts 2 and 3.
    l.router.groups = Some(GroupConfig {
        count: 2,
        kept: 1,
        score: GroupScore::Max,
    });
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[(3.0 * e25 + 4.0) / (e25 + 1.0), 0.0]);
    assert_eq!(out.tokens_per_expert, vec![0, 0, 1, 1]);

    // Keeping both groups is the same as no groups.
    l.router.groups = Some(GroupConfig {
        count: 2,
        kept: 2,
        score: GroupScore::Top2Sum,
    });
    let out = run(&l, 1, &[x], &w);
    assert_eq!(out.tokens_per_expert, vec![1, 0, 1, 0]);
}

#[test]
fn group_ties_go_to_the_lower_group() {
    // logits [1, 0, 0, 1]: both groups score e / Z under max -> group 0 kept.
    let w = relu_layer_weights(&[1.0, 0.0, 0.0, 1.0]);
    let mut l = layer(4, 2, Activation::Relu);
    let x: &[f32] = &[1.0, 0.0];
    let out = run(&l, 1, &[x], &w);
    assert_eq!(out.tokens_per_expert, vec![1, 0, 0, 1]);

    l.router.groups = Some(GroupConfig {
        count: 2,
        kept: 1,
        score: GroupScore::Max,
    });
    let out = run(&l, 1, &[x], &w);
    assert_eq!(out.tokens_per_expert, vec![1, 1, 0, 0]);
    let z = 2.0 * E + 2.0;
    assert_close(&out.outputs[0], &[E / z * 1.0 + 1.0 / z * 2.0, 0.0]);
}

#[test]
fn the_logit_bias_changes_the_choice_and_the_weights() {
    // logits [1, 0, -1] plus the router bias [0, 0, 1.5] = [1, 0, 0.5]:
    // top-2 = experts 0 and 2, weighted by a softmax over 1 and 0.5.
    let mut w = relu_layer_weights(&[1.0, 0.0, -1.0]);
    put(&mut w, "mlp.gate.bias", &[3], &[0.0, 0.0, 1.5]);
    let mut l = layer(3, 2, Activation::Relu);
    l.router.softmax_over = SoftmaxOver::Topk;
    l.router.logit_bias = true;
    let x: &[f32] = &[1.0, 0.0];
    let out = run(&l, 1, &[x], &w);
    assert_eq!(out.tokens_per_expert, vec![1, 0, 1]);
    // FFN_e(x) = (e + 1) x: weights e^1, e^0.5 over their sum, times 1 and 3.
    let (a, b) = (E, E.sqrt());
    assert_close(&out.outputs[0], &[(a + 3.0 * b) / (a + b), 0.0]);
    // Without `logit_bias` the bias tensor is not read: experts 0 and 1.
    l.router.logit_bias = false;
    assert_eq!(run(&l, 1, &[x], &w).tokens_per_expert, vec![1, 1, 0]);
}

#[test]
fn softmax_over_topk() {
    // logits [1, 0, -1], top-2 = experts 0, 1.
    let w = relu_layer_weights(&[1.0, 0.0, -1.0]);
    let mut l = layer(3, 2, Activation::Relu);
    let x: &[f32] = &[1.0, 0.0];

    // Softmax over the two chosen logits: [e, 1] / (e + 1).
    l.router.softmax_over = SoftmaxOver::Topk;
    let topk = run(&l, 1, &[x], &w);
    assert_close(&topk.outputs[0], &[(E + 2.0) / (E + 1.0), 0.0]);
    assert_eq!(topk.tokens_per_expert, vec![1, 1, 0]);

    // Mixtral's equivalence: softmax over all, renormalised.
    l.router.softmax_over = SoftmaxOver::All;
    l.router.normalize = true;
    let all = run(&l, 1, &[x], &w);
    assert_close(&all.outputs[0], &[(E + 2.0) / (E + 1.0), 0.0]);

    // Softmax over all without renormalising is different: [e, 1] / (e + 1 + 1/e).
    l.router.normalize = false;
    let raw = run(&l, 1, &[x], &w);
    assert_close(&raw.outputs[0], &[(E + 2.0) / (E + 1.0 + 1.0 / E), 0.0]);
}

#[test]
fn ties_go_to_the_lower_expert() {
    // All logits 0: softmax 1/3 each; top-2 = experts 0 and 1.
    let w = relu_layer_weights(&[0.0, 0.0, 0.0]);
    let l = layer(3, 2, Activation::Relu);
    let out = run(&l, 1, &[&[1.0, 1.0]], &w);
    assert_eq!(out.tokens_per_expert, vec![1, 1, 0]);
    assert_close(&out.outputs[0], &[1.0, 1.0]); // 1/3 * 1 + 1/3 * 2

    // logits [0, 1, 1], top-1: experts 1 and 2 tie -> 1.
    let w = relu_layer_weights(&[0.0, 1.0, 1.0]);
    let l = layer(3, 1, Activation::Relu);
    let out = run(&l, 1, &[&[1.0, 0.0]], &w);
    assert_eq!(out.tokens_per_expert, vec![0, 1, 0]);
    assert_close(&out.outputs[0], &[2.0 * E / (1.0 + 2.0 * E), 0.0]);
}

// ------------------------------------------------------------ capacity

/// E = 2, top-1, FFN_e = (e + 1) relu; the router's logits are `[x_0, 0]`, so
/// `A = [1, 1]` goes to expert 0 with weight σ(1) and `B = [2, 1]` goes to
/// expert 0 with the higher weight σ(2).
fn capacity_case(drop: Option<DropPolicy>) -> (LayerConfig, Weights) {
    let mut l = layer(2, 1, Activation::Relu);
    l.capacity = match drop {
        None => CapacityConfig::Dropless,
        Some(drop) => CapacityConfig::Limited {
            slots: 1,
            factor: None,
            drop,
        },
    };
    let mut w = Weights::new();
    router(&mut w, &[[1.0, 0.0], [0.0, 0.0]]);
    relu_experts(&mut w, 2);
    (l, w)
}

const A: &[f32] = &[1.0, 1.0];
const B: &[f32] = &[2.0, 1.0];

#[test]
fn capacity_position_vs_probs_across_ranks() {
    let (a, b) = (sigma(1.0), sigma(2.0));

    // Dropless: both kept.
    let (l, w) = capacity_case(None);
    let out = run(&l, 2, &[A, B], &w);
    assert_close(&out.outputs[0], &[a, a]);
    assert_close(&out.outputs[1], &[2.0 * b, b]);
    assert_eq!(
        (out.tokens_per_expert.clone(), out.dropped),
        (vec![2, 0], 0)
    );

    // position, C = 1: rank 0's token comes first in the group; rank 1's is dropped.
    let (l, w) = capacity_case(Some(DropPolicy::Position));
    let out = run(&l, 2, &[A, B], &w);
    assert_close(&out.outputs[0], &[a, a]);
    assert_close(&out.outputs[1], &[0.0, 0.0]);
    assert_eq!(
        (out.tokens_per_expert.clone(), out.dropped),
        (vec![2, 0], 1)
    );

    // probs, C = 1: rank 1's token has the higher weight; rank 0's is dropped.
    let (l, w) = capacity_case(Some(DropPolicy::Probs));
    let out = run(&l, 2, &[A, B], &w);
    assert_close(&out.outputs[0], &[0.0, 0.0]);
    assert_close(&out.outputs[1], &[2.0 * b, b]);
    assert_eq!(
        (out.tokens_per_expert.clone(), out.dropped),
        (vec![2, 0], 1)
    );

    // probs with equal weights falls back to the global order: rank 0 kept.
    let out = run(&l, 2, &[A, A], &w);
    assert_close(&out.outputs[0], &[a, a]);
    assert_close(&out.outputs[1], &[0.0, 0.0]);
}

#[test]
fn capacity_within_a_rank_follows_token_order() {
    // One rank, tokens A then B: position keeps A (first), probs keeps B (higher).
    let (a, b) = (sigma(1.0), sigma(2.0));
    let (lp, w) = capacity_case(Some(DropPolicy::Position));
    let (lq, _) = capacity_case(Some(DropPolicy::Probs));
    let ab: Vec<f32> = [A, B].concat();

    let out = run(&lp, 1, &[&ab], &w);
    assert_close(&out.outputs[0], &[a, a, 0.0, 0.0]);
    let out = run(&lq, 1, &[&ab], &w);
    assert_close(&out.outputs[0], &[0.0, 0.0, 2.0 * b, b]);
    assert_eq!(out.dropped, 1);
}

#[test]
fn ep_groups_are_independent() {
    let (a, b) = (sigma(1.0), sigma(2.0));
    let (l, w) = capacity_case(Some(DropPolicy::Position));

    // ep = 2: groups {0, 1} and {2, 3}, each keeps its first token.
    let out = run(&l, 2, &[A, B, A, B], &w);
    assert_close(&out.outputs[0], &[a, a]);
    assert_close(&out.outputs[1], &[0.0, 0.0]);
    assert_close(&out.outputs[2], &[a, a]);
    assert_close(&out.outputs[3], &[0.0, 0.0]);
    assert_eq!(
        (out.tokens_per_expert.clone(), out.dropped),
        (vec![4, 0], 2)
    );

    // ep = 4: one group, one slot in all.
    let out = run(&l, 4, &[A, B, A, B], &w);
    assert_close(&out.outputs[0], &[a, a]);
    for r in 1..4 {
        assert_close(&out.outputs[r], &[0.0, 0.0]);
    }
    assert_eq!(out.dropped, 3);

    // ep = 1: every rank is its own group and keeps its one token.
    let out = run(&l, 1, &[A, B, A, B], &w);
    assert_close(&out.outputs[1], &[2.0 * b, b]);
    assert_close(&out.outputs[3], &[2.0 * b, b]);
    assert_eq!(out.dropped, 0);

    // probs, ep = 2: each group keeps its higher-weight token (rank 1, rank 3).
    let (l, w) = capacity_case(Some(DropPolicy::Probs));
    let out = run(&l, 2, &[A, B, A, B], &w);
    assert_close(&out.outputs[0], &[0.0, 0.0]);
    assert_close(&out.outputs[1], &[2.0 * b, b]);
    assert_close(&out.outputs[2], &[0.0, 0.0]);
    assert_close(&out.outputs[3], &[2.0 * b, b]);
    assert_eq!(out.dropped, 2);
}

#[test]
fn capacity_counts_every_slot() {
    // E = 2, top-2: every token sends one assignment to each expert. C = 1:
    // the second token loses both of its slots and passes through as zero.
    let mut l = layer(2, 2, Activation::Relu);
    l.capacity = CapacityConfig::Limited {
        slots: 1,
        factor: Some(0.5),
        drop: DropPolicy::Position,
    };
    let w = relu_layer_weights(&[0.0, 0.0]);
    let out = run(&l, 1, &[&[1.0, 0.0, 1.0, 0.0]], &w);
    // Token 0: 0.5 * 1 + 0.5 * 2.
    assert_close(&out.outputs[0], &[1.5, 0.0, 0.0, 0.0]);
    assert_eq!(
        (out.tokens_per_expert.clone(), out.dropped),
        (vec![2, 2], 2)
    );
}

// ------------------------------------------------------------ experts

/// One expert, top-1: the routing weight is softmax([l]) = 1 unless the
/// router says otherwise; the expert is `ffn` with the given matrices.
fn single_expert(
    ffn: Activation,
    gate: Option<[f32; 4]>,
    up: [f32; 4],
    down: [f32; 4],
) -> (LayerConfig, Weights) {
    let l = layer(1, 1, ffn);
    let mut w = Weights::new();
    router(&mut w, &[[0.0, 0.0]]);
    if let Some(g) = gate {
        put(&mut w, "mlp.experts.0.gate_proj.weight", &[2, 2], &g);
    }
    put(&mut w, "mlp.experts.0.up_proj.weight", &[2, 2], &up);
    put(&mut w, "mlp.experts.0.down_proj.weight", &[2, 2], &down);
    (l, w)
}

const I: [f32; 4] = [1.0, 0.0, 0.0, 1.0];

#[test]
fn weight_on_input_vs_output() {
    // One SwiGLU expert with gate = up = down = I: FFN(x) = silu(x) * x.
    // Sigmoid of the logit 0: w = 0.5.
    let (mut l, w) = single_expert(Activation::Swiglu { limit: None }, Some(I), I, I);
    l.router.scoring = Scoring::Sigmoid;
    let x: &[f32] = &[1.0, 2.0];

    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[0.5 * silu(1.0), 0.5 * silu(2.0) * 2.0]);

    l.router.weight_on = WeightOn::Input;
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[silu(0.5) * 0.5, silu(1.0)]);
}

#[test]
fn clamped_swiglu_clamps() {
    // L = 1, gate = 10 I, up = down = I.
    let ten = [10.0, 0.0, 0.0, 10.0];
    let (l, w) = single_expert(Activation::Swiglu { limit: Some(1.0) }, Some(ten), I, I);
    let h = |g: f64, u: f64| (u + 1.0) * g * sigma(1.702 * g);

    // gate [-5, 2] -> g = [-5, 1] (no lower clamp); up [-0.5, 0.2] inside the limit.
    // gate [0.5, 30] -> g = [0.5, 1]; up [0.05, 3] -> u = [0.05, 1].
    let x: &[f32] = &[-0.5, 0.2, 0.05, 3.0];
    let out = run(&l, 1, &[x], &w);
    assert_close(
        &out.outputs[0],
        &[h(-5.0, -0.5), h(1.0, 0.2), h(0.5, 0.05), h(1.0, 1.0)],
    );

    // Without the limit it is plain SwiGLU: silu(30) * 3 = 90.
    let (l, w) = single_expert(Activation::Swiglu { limit: None }, Some(ten), I, I);
    let out = run(&l, 1, &[&[0.05, 3.0]], &w);
    assert_close(&out.outputs[0], &[silu(0.5) * 0.05, silu(30.0) * 3.0]);
}

#[test]
fn expert_biases() {
    // SwiGLU, identity weights, b_gate = [1, 0], b_up = [0, 1], b_down = [0.5, 0].
    let (mut l, mut w) = single_expert(Activation::Swiglu { limit: None }, Some(I), I, I);
    l.expert_bias = true;
    put(&mut w, "mlp.experts.0.gate_proj.bias", &[2], &[1.0, 0.0]);
    put(&mut w, "mlp.experts.0.up_proj.bias", &[2], &[0.0, 1.0]);
    put(&mut w, "mlp.experts.0.down_proj.bias", &[2], &[0.5, 0.0]);
    // x = [1, 1]: g = [2, 1], u = [1, 2].
    let out = run(&l, 1, &[&[1.0, 1.0]], &w);
    assert_close(&out.outputs[0], &[silu(2.0) * 1.0 + 0.5, silu(1.0) * 2.0]);

    // ReLU: up bias [-0.5, 0], down bias [1, 1]; x = [1, 1] -> relu([0.5, 1]) + 1.
    let (mut l, mut w) = single_expert(Activation::Relu, None, I, I);
    l.expert_bias = true;
    put(&mut w, "mlp.experts.0.up_proj.bias", &[2], &[-0.5, 0.0]);
    put(&mut w, "mlp.experts.0.down_proj.bias", &[2], &[1.0, 1.0]);
    let out = run(&l, 1, &[&[1.0, 1.0]], &w);
    assert_close(&out.outputs[0], &[1.5, 2.0]);
}

#[test]
fn gelu_exact_and_tanh() {
    let x: &[f32] = &[1.0, -1.0];
    let (l, w) = single_expert(Activation::Gelu, None, I, I);
    let out = run(&l, 1, &[x], &w);
    assert_close(
        &out.outputs[0],
        &[0.841_344_746_068_542_9, -0.158_655_253_931_457_07],
    );

    let (l, w) = single_expert(Activation::GeluTanh, None, I, I);
    let out = run(&l, 1, &[x], &w);
    assert_close(
        &out.outputs[0],
        &[0.841_191_990_608_276_8, -0.158_808_009_391_723_2],
    );

    // ReLU for comparison.
    let (l, w) = single_expert(Activation::Relu, None, I, I);
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[1.0, 0.0]);
}

#[test]
fn erf_and_gelu_values() {
    // Reference values (C library erf/erfc).
    let cases = [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ];
    for (x, v) in cases {
        assert!((erf(x) - v).abs() <= 2e-16, "erf({x}) = {} vs {v}", erf(x));
        assert!((erf(-x) + v).abs() <= 2e-16);
    }
    assert_eq!(erf(0.0), 0.0);
    assert_eq!(erf(7.0), 1.0);
    for (x, v) in [
        (3.0, 2.209_049_699_858_543_8e-5),
        (5.0, 1.537_459_794_428_035_1e-12),
        (10.0, 2.088_487_583_762_545e-45),
    ] {
        assert!(
            ((erfc(x) - v) / v).abs() <= 1e-14,
            "erfc({x}) = {} vs {v}",
            erfc(x)
        );
    }
    // Continuity where the methods change (x = 2 and x = 6).
    for x in [2.0f64, 6.0] {
        let below = erf(x - 1e-12);
        let above = erf(x + 1e-12);
        assert!((above - below).abs() < 1e-13, "erf jumps at {x}");
    }
    // gelu(−10) is tiny but accurate (no 1 + erf cancellation).
    let g = gelu(-10.0);
    assert!(((g + 7.619_853_024_160_593e-23) / g).abs() < 1e-13, "{g}");
    assert!((gelu_tanh(1.0) - 0.841_191_990_608_276_8).abs() < 1e-15);
}

// ------------------------------------------------------------ shared experts

#[test]
fn shared_experts_with_and_without_gate() {
    // Routed: one ReLU expert with identity weights, weight 1 -> relu(x).
    // Shared: count 2 of intermediate 1 -> one ReLU FFN of width 2,
    // up = I, down = diag(2, 3): S(x) = [2 relu(x_0), 3 relu(x_1)].
    let (mut l, mut w) = single_expert(Activation::Relu, None, I, I);
    l.shared = Some(SharedConfig {
        count: 2,
        intermediate: 1,
        ffn: Activation::Relu,
        bias: false,
        sigmoid_gate: false,
    });
    put(&mut w, "mlp.shared_experts.up_proj.weight", &[2, 2], &I);
    put(
        &mut w,
        "mlp.shared_experts.down_proj.weight",
        &[2, 2],
        &[2.0, 0.0, 0.0, 3.0],
    );
    let x: &[f32] = &[1.0, 1.0];
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[3.0, 4.0]);

    // With the gate w_g = [1, 0]: S(x) times σ(1).
    if let Some(s) = &mut l.shared {
        s.sigmoid_gate = true;
    }
    let err = forward(&l, 1, &[x.to_vec()], &w).unwrap_err();
    assert!(err.contains("mlp.shared_expert_gate.weight"), "{err}");
    put(
        &mut w,
        "mlp.shared_expert_gate.weight",
        &[1, 2],
        &[1.0, 0.0],
    );
    let out = run(&l, 1, &[x], &w);
    assert_close(
        &out.outputs[0],
        &[1.0 + 2.0 * sigma(1.0), 1.0 + 3.0 * sigma(1.0)],
    );

    // Shared experts are never dropped: with every routed slot dropped, S(x) remains.
    l.capacity = CapacityConfig::Limited {
        slots: 0,
        factor: None,
        drop: DropPolicy::Position,
    };
    let out = run(&l, 1, &[x], &w);
    assert_close(&out.outputs[0], &[2.0 * sigma(1.0), 3.0 * sigma(1.0)]);
    assert_eq!(out.dropped, 1);
}

#[test]
fn shared_swiglu_needs_its_gate_projection() {
    let (mut l, mut w) = single_expert(Activation::Relu, None, I, I);
    l.shared = Some(SharedConfig {
        count: 1,
        intermediate: 2,
        ffn: Activation::Swiglu { limit: None },
        bias: false,
        sigmoid_gate: false,
    });
    put(&mut w, "mlp.shared_experts.up_proj.weight", &[2, 2], &I);
    put(&mut w, "mlp.shared_experts.down_proj.weight", &[2, 2], &I);
    let err = forward(&l, 1, &[vec![1.0, 1.0]], &w).unwrap_err();
    assert!(err.contains("mlp.shared_experts.gate_proj.weight"), "{err}");

    // With it: relu(x) + silu(x) * x.
    put(&mut w, "mlp.shared_experts.gate_proj.weight", &[2, 2], &I);
    let out = run(&l, 1, &[&[1.0, 2.0]], &w);
    assert_close(&out.outputs[0], &[1.0 + silu(1.0), 2.0 + silu(2.0) * 2.0]);
}

// ------------------------------------------------------------ errors

#[test]
fn missing_tensor_is_an_error() {
    let mut w = relu_layer_weights(&[0.0, 0.0]);
    w.remove("mlp.experts.1.down_proj.weight");
    let l = layer(2, 1, Activation::Relu);
    let err = forward(&l, 1, &[vec![1.0, 1.0]], &w).unwrap_err();
    assert!(err.contains("mlp.experts.1.down_proj.weight"), "{err}");
    assert!(err.contains("[2, 2]"), "{err}");

    // SwiGLU experts need gate_proj, which the ReLU weights lack.
    let l = layer(2, 1, Activation::Swiglu { limit: None });
    let w = relu_layer_weights(&[0.0, 0.0]);
    let err = forward(&l, 1, &[vec![1.0, 1.0]], &w).unwrap_err();
    assert!(err.contains("mlp.experts.0.gate_proj.weight"), "{err}");
}

#[test]
fn wrong_shape_is_an_error() {
    // Router of 3 experts for a layer of 2.
    let mut w = relu_layer_weights(&[0.0, 0.0]);
    router(&mut w, &[[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]);
    let l = layer(2, 1, Activation::Relu);
    let err = forward(&l, 1, &[vec![1.0, 1.0]], &w).unwrap_err();
    assert!(err.contains("mlp.gate.weight"), "{err}");
    assert!(err.contains("[3, 2]") && err.contains("[2, 2]"), "{err}");

    // A transposed down projection ([F, H] instead of [H, F]) with F != H.
    let mut l = layer(1, 1, Activation::Relu);
    l.intermediate = 3;
    let mut w = Weights::new();
    router(&mut w, &[[0.0, 0.0]]);
    put(&mut w, "mlp.experts.0.up_proj.weight", &[3, 2], &[0.0; 6]);
    put(&mut w, "mlp.experts.0.down_proj.weight", &[3, 2], &[0.0; 6]);
    let err = forward(&l, 1, &[vec![1.0, 1.0]], &w).unwrap_err();
    assert!(err.contains("mlp.experts.0.down_proj.weight"), "{err}");
    assert!(err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");

    // A shape that does not match the data.
    let mut w = relu_layer_weights(&[0.0, 0.0]);
    put(&mut w, "mlp.gate.weight", &[2, 2], &[0.0; 3]);
    let l = layer(2, 1, Activation::Relu);
    assert!(forward(&l, 1, &[vec![1.0, 1.0]], &w).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let w = relu_layer_weights(&[0.0, 0.0]);
    let l = layer(2, 1, Activation::Relu);
    let ok = vec![1.0f32, 1.0];

    assert!(forward(&l, 1, &[], &w).is_err());
    // Not a multiple of H.
    assert!(forward(&l, 1, &[vec![1.0, 1.0, 1.0]], &w).is_err());
    // Ranks of different lengths.
    assert!(forward(&l, 1, &[ok.clone(), vec![1.0; 4]], &w).is_err());
    // Three ranks do not form groups of two; ep = 0.
    assert!(forward(&l, 2, &[ok.clone(), ok.clone(), ok.clone()], &w).is_err());
    assert!(forward(&l, 0, std::slice::from_ref(&ok), &w).is_err());

    // Non-finite input and weight values.
    let err = forward(&l, 1, &[ok.clone(), vec![1.0, f32::NAN]], &w).unwrap_err();
    assert!(err.contains("rank 1"), "{err}");
    let mut bad = w.clone();
    put(
        &mut bad,
        "mlp.experts.0.up_proj.weight",
        &[2, 2],
        &[1.0, f32::INFINITY, 0.0, 1.0],
    );
    let err = forward(&l, 1, std::slice::from_ref(&ok), &bad).unwrap_err();
    assert!(err.contains("mlp.experts.0.up_proj.weight"), "{err}");

    // An inconsistent router: top_k above the expert count.
    let l3 = layer(2, 3, Activation::Relu);
    assert!(forward(&l3, 1, &[ok], &w).is_err());
}

#[test]
fn tokens_and_ranks_are_independent_when_dropless() {
    // Each token's output does not depend on the other tokens or ranks.
    let w = relu_layer_weights(&[0.3, -0.7, 1.1]);
    let mut l = layer(3, 2, Activation::Relu);
    l.router.normalize = true;
    let t0: &[f32] = &[0.5, -1.0];
    let t1: &[f32] = &[-2.0, 3.0];
    let both: Vec<f32> = [t0, t1].concat();
    let joint = run(&l, 2, &[&both, &both], &w);
    let s0 = run(&l, 1, &[t0], &w);
    let s1 = run(&l, 1, &[t1], &w);
    let expected: Vec<f32> = [s0.outputs[0].clone(), s1.outputs[0].clone()].concat();
    assert_eq!(joint.outputs[0], expected);
    assert_eq!(joint.outputs[1], expected);
}
