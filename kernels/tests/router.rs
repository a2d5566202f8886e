//! The router kernels against a direct Rust transcription of the book's
//! router reference (sorting instead of repeated selection).
#![allow(clippy::unwrap_used)]

mod common;

use common::{assert_same, consts, kernel, launch, sigmoid, Buf, Rng};
use moec_kernels::ir::{Elem, LaunchError};
use moec_kernels::library::{describe, DescribeError, Kind};

#[derive(Clone, Debug)]
struct Cfg {
    experts: usize,
    top_k: usize,
    groups: usize,
    kept: usize,
    sigmoid: bool,
    over_topk: bool,
    bias: Option<Vec<f32>>,
    group_max: bool,
    normalize: bool,
    scale: f32,
}

impl Cfg {
    fn softmax(experts: usize, top_k: usize) -> Cfg {
        Cfg {
            experts,
            top_k,
            groups: 1,
            kept: 1,
            sigmoid: false,
            over_topk: false,
            bias: None,
            group_max: false,
            normalize: false,
            scale: 1.0,
        }
    }

    fn constants(&self) -> Vec<(&'static str, i64)> {
        vec![
            ("hidden", 64),
            ("dtype", 1),
            ("experts", self.experts as i64),
            ("top_k", self.top_k as i64),
            ("groups", self.groups as i64),
            ("groups_kept", self.kept as i64),
            ("scoring", i64::from(self.sigmoid)),
            ("softmax_over", i64::from(self.over_topk)),
            ("selection_bias", i64::from(self.bias.is_some())),
            ("group_score", i64::from(self.group_max)),
            ("normalize", i64::from(self.normalize)),
        ]
    }

    fn bias_or_zeros(&self) -> Vec<f32> {
        self.bias.clone().unwrap_or_else(|| vec![0.0; self.experts])
    }
}

/// Softmax with max subtraction, sequential sum.
fn softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum = l.iter().fold(0.0f32, |s, &x| s + libm::expf(x - m));
    l.iter().map(|&x| libm::expf(x - m) / sum).collect()
}

/// Indices sorted by value descending, ties to the lower index.
fn order(values: &[f32], allowed: &[bool]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).filter(|&i| allowed[i]).collect();
    idx.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap().then(a.cmp(&b)));
    idx
}

/// Scores, selection scores and the allowed (kept-group) experts of one row.
fn select(cfg: &Cfg, l: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<bool>) {
    let s: Vec<f32> = if cfg.over_topk {
        l.to_vec()
    } else if cfg.sigmoid {
        l.iter().map(|&x| sigmoid(x)).collect()
    } else {
        softmax(l)
    };
    let c: Vec<f32> = match &cfg.bias {
        Some(b) => s.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => s.clone(),
    };
    let n = cfg.experts / cfg.groups;
    let mut allowed = vec![true; cfg.experts];
    if cfg.kept < cfg.groups {
        let scores: Vec<f32> = (0..cfg.groups)
            .map(|g| {
                let group = &c[g * n..(g + 1) * n];
                let best = order(group, &vec![true; n]);
                if cfg.group_max || n == 1 {
                    group[best[0]]
                } else {
                    group[best[0]] + group[best[1]]
                }
            })
            .collect();
        let kept = &order(&scores, &vec![true; cfg.groups])[..cfg.kept];
        for (e, a) in allowed.iter_mut().enumerate() {
            *a = kept.contains(&(e / n));
        }
    }
    (s, c, allowed)
}

fn reference(cfg: &Cfg, logits: &[f32]) -> (Vec<i64>, Vec<f32>) {
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for l in logits.chunks(cfg.experts) {
        let (s, c, allowed) = select(cfg, l);
        let chosen = &order(&c, &allowed)[..cfg.top_k];
        let mut w: Vec<f32> = chosen.iter().map(|&e| s[e]).collect();
        if cfg.over_topk {
            w = softmax(&w);
        }
        if cfg.normalize {
            let sum = w.iter().fold(0.0f32, |a, &x| a + x);
            w.iter_mut().for_each(|x| *x /= sum);
        }
        ids.extend(chosen.iter().map(|&e| e as i64));
        weights.extend(w.iter().map(|&x| x * cfg.scale));
    }
    (ids, weights)
}

fn run_fused(cfg: &Cfg, logits: &[f32], rows: usize) -> (Vec<i64>, Vec<f32>) {
    let k = kernel(Kind::RouterFused, &cfg.constants());
    let mut bufs = vec![
        Buf::f(Elem::F32, logits),
        Buf::out(Elem::I32, rows * cfg.top_k),
        Buf::out(Elem::F32, rows * cfg.top_k),
        Buf::f(Elem::F32, &cfg.bias_or_zeros()),
        Buf::F32(cfg.scale),
    ];
    launch(&k, &mut bufs, rows as u64).unwrap();
    (bufs[1].ints(Elem::I32), bufs[2].floats(Elem::F32))
}

fn check_fused(cfg: &Cfg, logits: &[f32]) {
    let rows = logits.len() / cfg.experts;
    let (ids, weights) = run_fused(cfg, logits, rows);
    let (want_ids, want_w) = reference(cfg, logits);
    assert_eq!(ids, want_ids, "{cfg:?}");
    assert_same("weights", &weights, &want_w);
}

fn logits(rng: &mut Rng, rows: usize, experts: usize) -> Vec<f32> {
    rng.vec(rows * experts, -4.0, 4.0)
}

#[test]
fn softmax_over_all_with_normalize() {
    let mut rng = Rng::new(1);
    for (e, k) in [(8, 2), (16, 4), (5, 5), (64, 8), (1, 1)] {
        let mut cfg = Cfg::softmax(e, k);
        cfg.normalize = true;
        check_fused(&cfg, &logits(&mut rng, 7, e));
        cfg.normalize = false; // Qwen2 / Switch: raw probabilities
        check_fused(&cfg, &logits(&mut rng, 3, e));
    }
}

#[test]
fn deepseek_v3_sigmoid_bias_groups_top2_sum() {
    let mut rng = Rng::new(2);
    for (e, k, g, kept) in [(16, 4, 4, 2), (32, 8, 8, 4), (8, 2, 8, 4), (12, 3, 3, 1)] {
        let cfg = Cfg {
            experts: e,
            top_k: k,
            groups: g,
            kept,
            sigmoid: true,
            over_topk: false,
            bias: Some(rng.vec(e, -0.5, 0.5)),
            group_max: false,
            normalize: true,
            scale: 2.5,
        };
        check_fused(&cfg, &logits(&mut rng, 9, e));
    }
}

#[test]
fn softmax_over_topk_like_gpt_oss() {
    let mut rng = Rng::new(3);
    for (e, k) in [(32, 4), (8, 2), (4, 4)] {
        let mut cfg = Cfg::softmax(e, k);
        cfg.over_topk = true;
        check_fused(&cfg, &logits(&mut rng, 6, e));
    }
}

#[test]
fn max_group_score_like_deepseek_v2() {
    let mut rng = Rng::new(4);
    let cfg = Cfg {
        experts: 24,
        top_k: 6,
        groups: 6,
        kept: 3,
        sigmoid: false,
        over_topk: false,
        bias: None,
        group_max: true,
        normalize: false,
        scale: 16.0,
    };
    check_fused(&cfg, &logits(&mut rng, 8, 24));
}

#[test]
fn sigmoid_top1_like_llama4() {
    let mut rng = Rng::new(5);
    let mut cfg = Cfg::softmax(16, 1);
    cfg.sigmoid = true;
    check_fused(&cfg, &logits(&mut rng, 5, 16));
}

#[test]
fn exact_ties_choose_the_lower_index() {
    // All equal: the first k experts, in index order.
    let cfg = Cfg::softmax(8, 3);
    let (ids, weights) = run_fused(&cfg, &[0.5; 8], 1);
    assert_eq!(ids, vec![0, 1, 2]);
    assert_same("weights", &weights, &[0.125; 3]);

    // Ties between the second and third best go to the lower index, and the
    // output is ordered from the highest score down.
    let l = [1.0, 3.0, 2.0, 3.0, 2.0, 0.0];
    let cfg = Cfg::softmax(6, 4);
    let (ids, _) = run_fused(&cfg, &l, 1);
    assert_eq!(ids, vec![1, 3, 2, 4]);

    // Group ties: groups {0,1}, {2,3}, {4,5} all score 2; keep two: groups 0
    // and 1, so experts 4 and 5 are out although they tie with the others.
    let cfg = Cfg {
        groups: 3,
        kept: 2,
        ..Cfg::softmax(6, 4)
    };
    let (ids, _) = run_fused(&cfg, &[1.0; 6], 1);
    assert_eq!(ids, vec![0, 1, 2, 3]);
    let (ids, _) = run_fused(&cfg, &[1.0, 1.0, 1.0, 1.0, 1.0, 1.5], 1);
    assert_eq!(
        ids,
        vec![5, 0, 1, 4],
        "group 2 scores highest, then group 0"
    );
}

#[test]
fn group_limit_excludes_better_experts_of_dropped_groups() {
    // Group 0 = {9, 0}, group 1 = {5, 5}: top2_sum keeps group 1 (10 > 9)
    // although expert 0 has the best single score; max keeps group 0.
    let l = [9.0, 0.0, 5.0, 5.0];
    let mut cfg = Cfg {
        groups: 2,
        kept: 1,
        over_topk: true,
        ..Cfg::softmax(4, 1)
    };
    assert_eq!(run_fused(&cfg, &l, 1).0, vec![2]);
    cfg.group_max = true;
    assert_eq!(run_fused(&cfg, &l, 1).0, vec![0]);
}

#[test]
fn without_selection_bias_the_bias_buffer_may_be_empty() {
    let cfg = Cfg {
        normalize: true,
        ..Cfg::softmax(8, 2)
    };
    let k = kernel(Kind::RouterFused, &cfg.constants());
    let l = logits(&mut Rng::new(6), 2, 8);
    let mut bufs = vec![
        Buf::f(Elem::F32, &l),
        Buf::out(Elem::I32, 4),
        Buf::out(Elem::F32, 4),
        Buf::f(Elem::F32, &[]),
        Buf::F32(1.0),
    ];
    launch(&k, &mut bufs, 2).unwrap();
    assert_eq!(bufs[1].ints(Elem::I32), reference(&cfg, &l).0);

    // With selection_bias it is read, and a short one fails naming it.
    let cfg = Cfg {
        bias: Some(vec![0.0; 8]),
        ..cfg
    };
    let k = kernel(Kind::RouterFused, &cfg.constants());
    let err = launch(&k, &mut bufs, 2).unwrap_err();
    assert!(
        matches!(&err, LaunchError::OutOfBounds { param, len: 0, .. } if param == "bias"),
        "{err}"
    );
}

/// The split stages, chained, against the reference and the fused kernel.
fn run_split(cfg: &Cfg, logits: &[f32]) -> (Vec<i64>, Vec<f32>) {
    let (e, k) = (cfg.experts, cfg.top_k);
    let rows = logits.len() / e;
    let c = cfg.constants();
    let bias = cfg.bias_or_zeros();
    let run = |kind: Kind, mut bufs: Vec<Buf>| {
        launch(&kernel(kind, &c), &mut bufs, rows as u64).unwrap();
        bufs
    };
    let scores = run(
        Kind::RouterScores,
        vec![Buf::f(Elem::F32, logits), Buf::out(Elem::F32, rows * e)],
    )[1]
    .floats(Elem::F32);
    let selection = if cfg.bias.is_some() {
        run(
            Kind::RouterBias,
            vec![
                Buf::f(Elem::F32, &scores),
                Buf::out(Elem::F32, rows * e),
                Buf::f(Elem::F32, &bias),
            ],
        )[1]
        .floats(Elem::F32)
    } else {
        scores
    };
    let masked = run(
        Kind::RouterGroupSelect,
        vec![Buf::f(Elem::F32, &selection), Buf::out(Elem::F32, rows * e)],
    )[1]
    .floats(Elem::F32);
    let out = run(
        Kind::RouterTopk,
        vec![
            Buf::f(Elem::F32, &masked),
            Buf::out(Elem::I32, rows * k),
            Buf::out(Elem::F32, rows * k),
            Buf::f(Elem::F32, &bias),
        ],
    );
    let ids = out[1].ints(Elem::I32);
    let mut weights = out[2].floats(Elem::F32);
    if cfg.normalize {
        weights = run(
            Kind::RouterNormalize,
            vec![Buf::out_with(Elem::F32, &weights)],
        )[0]
        .floats(Elem::F32);
    }
    weights = run(
        Kind::RouterScale,
        vec![Buf::out_with(Elem::F32, &weights), Buf::F32(cfg.scale)],
    )[0]
    .floats(Elem::F32);
    (ids, weights)
}

#[test]
fn split_stages_match_the_fused_router() {
    let mut rng = Rng::new(7);
    let mut cfgs = vec![
        Cfg {
            normalize: true,
            ..Cfg::softmax(8, 2)
        },
        Cfg {
            over_topk: true,
            ..Cfg::softmax(16, 4)
        },
        Cfg {
            groups: 4,
            kept: 2,
            group_max: true,
            scale: 3.0,
            ..Cfg::softmax(16, 3)
        },
    ];
    cfgs.push(Cfg {
        experts: 16,
        top_k: 4,
        groups: 4,
        kept: 2,
        sigmoid: true,
        over_topk: false,
        bias: Some(rng.vec(16, -0.5, 0.5)),
        group_max: false,
        normalize: true,
        scale: 2.5,
    });
    for cfg in &cfgs {
        let l = logits(&mut rng, 10, cfg.experts);
        let (ids, w) = run_split(cfg, &l);
        let (fused_ids, fused_w) = run_fused(cfg, &l, 10);
        assert_eq!(ids, fused_ids, "{cfg:?}");
        assert_eq!(ids, reference(cfg, &l).0, "{cfg:?}");
        if cfg.bias.is_none() {
            // The same operations in the same order: the same bits.
            assert_same("split weights", &w, &fused_w);
        } else {
            // router_topk recovers s as (s + b) - b: within an ulp or two.
            for (a, b) in w.iter().zip(&fused_w) {
                assert!((a - b).abs() <= 4.0 * f32::EPSILON * b.abs(), "{a} vs {b}");
            }
        }
    }
}

#[test]
fn router_groups_masks_dropped_groups_to_minus_infinity() {
    let c = [
        ("experts", 6),
        ("top_k", 2),
        ("groups", 3),
        ("groups_kept", 1),
    ];
    let k = kernel(Kind::RouterGroupSelect, &c);
    let sel = [0.1, 0.2, 0.9, 0.0, 0.3, 0.3];
    let mut bufs = vec![Buf::f(Elem::F32, &sel), Buf::out(Elem::F32, 6)];
    launch(&k, &mut bufs, 1).unwrap();
    let ninf = f32::NEG_INFINITY;
    // Scores: 0.3, 0.9, 0.6 → group 1 kept.
    assert_same(
        "masked",
        &bufs[1].floats(Elem::F32),
        &[ninf, ninf, 0.9, 0.0, ninf, ninf],
    );
}

#[test]
fn normalize_and_scale_in_place() {
    let w = [0.5f32, 0.25, 0.125, 0.0625, 1.0, 3.0, 0.0, 4.0];
    let c = [("top_k", 4)];
    let mut bufs = vec![Buf::out_with(Elem::F32, &w)];
    launch(&kernel(Kind::RouterNormalize, &c), &mut bufs, 2).unwrap();
    let sum0 = 0.5f32 + 0.25 + 0.125 + 0.0625;
    let want: Vec<f32> = w[..4]
        .iter()
        .map(|x| x / sum0)
        .chain(w[4..].iter().map(|x| x / 8.0))
        .collect();
    assert_same("normalized", &bufs[0].floats(Elem::F32), &want);
    let mut bufs = vec![Buf::out_with(Elem::F32, &w), Buf::F32(2.5)];
    launch(&kernel(Kind::RouterScale, &c), &mut bufs, 2).unwrap();
    let want: Vec<f32> = w.iter().map(|x| x * 2.5).collect();
    assert_same("scaled", &bufs[0].floats(Elem::F32), &want);
}

#[test]
fn router_scores_kinds() {
    let mut rng = Rng::new(8);
    let l = logits(&mut rng, 3, 5);
    for (scoring, over) in [(0, 0), (1, 0), (0, 1)] {
        let k = kernel(
            Kind::RouterScores,
            &[("experts", 5), ("scoring", scoring), ("softmax_over", over)],
        );
        let mut bufs = vec![Buf::f(Elem::F32, &l), Buf::out(Elem::F32, 15)];
        launch(&k, &mut bufs, 3).unwrap();
        let want: Vec<f32> = match (scoring, over) {
            (0, 0) => l.chunks(5).flat_map(softmax).collect(),
            (1, _) => l.iter().map(|&x| sigmoid(x)).collect(),
            _ => l.clone(),
        };
        assert_same("scores", &bufs[1].floats(Elem::F32), &want);
    }
}

#[test]
fn router_constants_are_validated() {
    let base = [
        ("experts", 16),
        ("top_k", 4),
        ("groups", 4),
        ("groups_kept", 2),
    ];
    let with = |extra: &[(&str, i64)]| {
        let mut c: Vec<(&str, i64)> = base
            .iter()
            .filter(|(n, _)| !extra.iter().any(|(m, _)| m == n))
            .copied()
            .collect();
        c.extend(extra.iter().copied().filter(|(_, v)| *v != i64::MIN));
        describe(Kind::RouterFused, &consts(&c))
    };
    let invalid = |r: Result<_, DescribeError>, name: &str| match r {
        Err(DescribeError::Invalid {
            kernel, constant, ..
        }) => {
            assert_eq!(kernel, "router_fused");
            assert_eq!(constant, name);
        }
        other => panic!("expected `{name}` invalid, got {other:?}"),
    };
    assert!(with(&[]).is_ok());
    invalid(with(&[("top_k", 17)]), "top_k");
    invalid(with(&[("top_k", 0)]), "top_k");
    invalid(with(&[("groups", 3)]), "groups");
    invalid(with(&[("groups_kept", 5)]), "groups_kept");
    invalid(with(&[("groups_kept", 1), ("top_k", 5)]), "top_k");
    invalid(with(&[("scoring", 2)]), "scoring");
    invalid(with(&[("scoring", 1), ("softmax_over", 1)]), "softmax_over");
    invalid(with(&[("normalize", 2)]), "normalize");
    invalid(with(&[("experts", 0)]), "experts");
    assert_eq!(
        with(&[("groups_kept", i64::MIN)]).unwrap_err(),
        DescribeError::Missing {
            kernel: "router_fused",
            constant: "groups_kept"
        }
    );
    assert_eq!(
        with(&[("experts", i64::MIN)]).unwrap_err(),
        DescribeError::Missing {
            kernel: "router_fused",
            constant: "experts"
        }
    );
    let msg = with(&[("top_k", i64::MIN)]).unwrap_err().to_string();
    assert!(
        msg.contains("router_fused") && msg.contains("top_k"),
        "{msg}"
    );
    // Only what a stage needs is required.
    assert!(describe(Kind::RouterNormalize, &consts(&[("top_k", 2)])).is_ok());
    assert!(describe(Kind::RouterBias, &consts(&[("experts", 2)])).is_ok());
}

#[test]
fn random_router_configurations() {
    let mut rng = Rng::new(9);
    for _ in 0..60 {
        let groups = 1 + rng.below(4) as usize;
        let per_group = 1 + rng.below(5) as usize;
        let experts = groups * per_group;
        let kept = 1 + rng.below(groups as u64) as usize;
        let top_k = 1 + rng.below((kept * per_group) as u64) as usize;
        let sigmoid = rng.below(2) == 1;
        let cfg = Cfg {
            experts,
            top_k,
            groups,
            kept,
            sigmoid,
            over_topk: !sigmoid && rng.below(3) == 0,
            bias: (rng.below(2) == 1).then(|| rng.vec(experts, -0.3, 0.3)),
            group_max: rng.below(2) == 1,
            normalize: rng.below(2) == 1,
            scale: rng.f32(0.5, 3.0),
        };
        // Coarse logits make exact ties common.
        let l: Vec<f32> = (0..4 * experts)
            .map(|_| (rng.below(5) as f32) - 2.0)
            .collect();
        check_fused(&cfg, &l);
    }
}
