//! `moec place`: on skewed synthetic traffic (Zipf-like load, co-activation
//! in clusters that the contiguous placement spreads over every node) the
//! chosen placement predicts a faster layer with a lower imbalance, never a
//! slower one; the placed file passes the checker; and a placed layer
//! computes what the unplaced one does (placement changes where, not what).

#![allow(clippy::unwrap_used)]

use moec::compile::{compile, Options};
use moec::place::{place, rewrite_source};

use moec_runtime::cpu::{CpuBackend, CpuOptions};
use moec_runtime::stats::{Routing, RoutingStatistics};
use moec_runtime::weights::{random_inputs, LayerWeights};

fn example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(path).unwrap()
}

/// A deterministic generator (SplitMix64), so the statistics are the same
/// on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// An index drawn with probability proportional to `weights`.
    fn pick(&mut self, weights: &[f64]) -> usize {
        let total: f64 = weights.iter().sum();
        let mut x = (self.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }
}

/// `tokens` tokens of `top_k` picks among `experts`: each token picks a
/// cluster (Zipf over `clusters`), then mostly experts of that cluster
/// (experts `c, c + clusters, ...`, Zipf inside), sometimes any expert.
fn clustered(
    experts: u64,
    top_k: u64,
    tokens: usize,
    clusters: u64,
    seed: u64,
) -> RoutingStatistics {
    let mut rng = Rng(seed);
    let cluster_w: Vec<f64> = (0..clusters)
        .map(|c| 1.0 / (c as f64 + 1.0).powf(0.8))
        .collect();
    let size = experts / clusters;
    let member_w: Vec<f64> = (0..size).map(|i| 1.0 / (i as f64 + 1.0).sqrt()).collect();
    let mut routing = Routing::default();
    for _ in 0..tokens {
        let c = rng.pick(&cluster_w) as u64;
        let mut picks: Vec<u32> = Vec::new();
        while (picks.len() as u64) < top_k {
            let e = if rng.next() % 10 < 9 {
                c + clusters * rng.pick(&member_w) as u64
            } else {
                rng.next() % experts
            };
            if !picks.contains(&(e as u32)) {
                picks.push(e as u32);
            }
        }
        routing
            .weights
            .push(vec![1.0 / top_k as f32; top_k as usize]);
        routing.dropped.push(vec![false; top_k as usize]);
        routing.experts.push(picks);
    }
    RoutingStatistics::from_routing(experts, top_k, routing).unwrap()
}

fn program_of(source: &str) -> moec_lang::Program {
    moec_lang::check_source(source).program.unwrap().0
}

/// DeepSeek-V3 (8 nodes) and Qwen3 (one node) under clustered Zipf traffic,
/// with and without replicas: the chosen placement predicts a faster layer
/// than the file's, with a lower imbalance; on several nodes, fewer copies
/// cross nodes; the placed file checks and compiles to the predicted time.
#[test]
fn place_beats_the_contiguous_placement_on_skewed_traffic() {
    for (name, clusters, replicas) in [
        ("deepseek_v3.moe", 8, 0),
        ("deepseek_v3.moe", 8, 8),
        ("qwen3_30b_a3b.moe", 4, 4),
    ] {
        let source = example(name);
        let program = program_of(&source);
        let l = &program.layer;
        let stats = clustered(l.experts.count, l.router.top_k, 2048, clusters, 7);
        let placed = place(&program, &stats, replicas).unwrap();
        for c in &placed.candidates {
            eprintln!(
                "| {name} | {replicas} | {} | {:.1} | {:.2} | {:.2} | {} |",
                c.name, c.total_us, c.imbalance, c.remote_nodes, c.cut
            );
        }
        let file = placed
            .candidates
            .iter()
            .find(|c| c.name == "the file's")
            .unwrap();
        let best = placed.best();
        assert!(
            best.total_us < file.total_us && best.imbalance < file.imbalance,
            "{name} (+{replicas}): chosen {} at {:.1} us, imbalance {:.2}; the file's {:.1} us, {:.2}",
            best.name,
            best.total_us,
            best.imbalance,
            file.total_us,
            file.imbalance
        );
        if program.mesh.nodes > 1 {
            assert!(
                best.remote_nodes < file.remote_nodes,
                "{name}: remote nodes"
            );
        }
        let copies: usize = best.layout.replicas.values().map(Vec::len).sum();
        assert_eq!(copies as u64, replicas, "{name}: replicas placed");
        // The placed file is a valid layer whose prediction is the one shown.
        let placed_source = rewrite_source(&source, &best.layout).unwrap();
        let placed_program = program_of(&placed_source);
        let options = Options {
            stats: Some(stats.clone()),
            ..Options::default()
        };
        let again = compile(&placed_program, &options).unwrap();
        assert!(
            (again.timeline.total_us - best.total_us).abs() < 1e-6,
            "{name}: the placed file predicts {} us, place said {}",
            again.timeline.total_us,
            best.total_us
        );
    }
}

/// Even traffic on an even placement: nothing to gain, and `place` keeps
/// the file's placement (a tie goes to the file).
#[test]
fn place_keeps_a_placement_nothing_beats() {
    let source = example("mixtral_8x7b.moe");
    let program = program_of(&source);
    let per_expert = vec![1000u64; 8];
    let stats = RoutingStatistics::from_json(
        &serde_json::json!({
            "format": "moec-routing-stats", "version": 1, "experts": 8, "top_k": 2,
            "tokens": 4000, "tokens_per_expert": per_expert,
            "coactivation": vec![vec![0u64; 8]; 8],
        })
        .to_string(),
    )
    .unwrap();
    let placed = place(&program, &stats, 0).unwrap();
    assert_eq!(placed.best().name, "the file's");
}

/// The tiny layer placed for skewed traffic with a replica computes the
/// unplaced layer's outputs bit for bit, on the same weights and inputs.
#[test]
fn a_placed_layer_computes_what_the_unplaced_one_does() {
    let source = example("tiny.moe");
    let program = program_of(&source);
    let stats = clustered(8, 2, 512, 2, 3);
    let loads: Vec<f64> = stats.tokens_per_expert.iter().map(|&n| n as f64).collect();
    // The packing with two replicas (on a layer this small, latency sets the
    // time and `place` itself keeps the file's placement).
    let layout = &moec::place::pack(&loads, 4, 2);
    assert_ne!(layout.primaries, program.mesh.experts_of_rank(8));
    assert_eq!(layout.replicas.values().map(Vec::len).sum::<usize>(), 2);
    let placed_program = program_of(&rewrite_source(&source, layout).unwrap());
    let mut outputs = Vec::new();
    for p in [&program, &placed_program] {
        let plan = compile(p, &Options::default()).unwrap().plan;
        let weights = LayerWeights::random(&plan.layer, 5);
        let inputs = random_inputs(&plan.layer, 4, 32, 5);
        let f = CpuBackend::new(plan, &weights, CpuOptions::default())
            .unwrap()
            .forward(&inputs)
            .unwrap();
        outputs.push(f.outputs);
    }
    assert!(outputs[0] == outputs[1], "placement changed the outputs");
}

/// `moec tune` on an example: every mesh of its GPU count that the checker
/// accepts, ranked (fitting plans first, then by predicted time); the file's
/// own mesh among them, none ranked above it slower; the best written as a
/// file that checks and compiles to its predicted time.
fn tune_ranks(name: &str) {
    let source = example(name);
    let program = program_of(&source);
    let gpus = program.mesh.nodes * program.mesh.gpus_per_node;
    let options = moec::tune::TuneOptions {
        gpus,
        ..Default::default()
    };
    let ranked = moec::tune::tune(&source, &program, &options, &mut |_, _| {}).unwrap();
    let own = ranked
        .iter()
        .position(|t| t.own)
        .unwrap_or_else(|| panic!("{name}: the file's mesh is not among the candidates"));
    let best = &ranked[0];
    assert!(
        best.total_us <= ranked[own].total_us || (best.fits && !ranked[own].fits),
        "{name}: the best predicts {} us, the file's mesh {} us",
        best.total_us,
        ranked[own].total_us
    );
    for pair in ranked.windows(2) {
        assert!(
            (pair[0].fits && !pair[1].fits)
                || (pair[0].fits == pair[1].fits && pair[0].total_us <= pair[1].total_us),
            "{name}: not ranked"
        );
    }
    let again = program_of(&best.source);
    assert_eq!(
        again.mesh.ep * again.mesh.etp * again.mesh.dp,
        gpus,
        "{name}"
    );
    let compiled = compile(&again, &Options::default()).unwrap();
    assert!(
        (compiled.timeline.total_us - best.total_us).abs() < 1e-6,
        "{name}"
    );
}

#[test]
fn tune_ranks_the_meshes_of_small_examples() {
    for name in ["tiny.moe", "mixtral_8x7b.moe", "gpt_oss_20b.moe"] {
        tune_ranks(name);
    }
}

/// Every example (minutes in a debug build:
/// `cargo test -p moec-tests --release --test place -- --ignored`).
#[test]
#[ignore]
fn tune_ranks_the_meshes_of_every_example() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".moe"))
        .collect();
    names.sort();
    for name in names {
        tune_ranks(&name);
    }
}
