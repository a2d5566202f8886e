//! Compiled plans end to end: snapshots of the text plan of every example and
//! of a few meshes, determinism (also across threads), the invariants every
//! plan keeps (validates, JSON round-trips, never slower than the no-overlap
//! baseline), a bound on the e-graph and the plan for a 1024-rank mesh, and
//! property tests over random valid layers and meshes.
//!
//! The number of proptest cases defaults to a value that keeps this file fast
//! in a debug build; set `MOEC_PROP_CASES` for a longer run.

#![allow(clippy::unwrap_used)]

use moec::compile::{compile, Compiled, Options, NODE_LIMIT};
use moec::schedule::op_buffers;
use moec_lang::{check_source, render, Program};
use moec_runtime::plan::order::HappensBefore;
use moec_runtime::plan::{
    A2aAlgorithm, BufferRole, CapacityConfig, CollectiveKind, CollectiveScope, DType, OpKind,
    Phase, Plan,
};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ------------------------------------------------------------ helpers

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("the examples directory exists")
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "examples missing: {files:?}");
    files
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("the example is readable")
}

/// The checked program of a source text; panics with the rendered diagnostics.
fn program(name: &str, source: &str) -> Program {
    let checked = check_source(source);
    match checked.program {
        Some((program, _)) => program,
        None => panic!(
            "{name} does not check:\n{}",
            render(name, source, &checked.diagnostics, false)
        ),
    }
}

fn compiled(name: &str, source: &str) -> Compiled {
    let program = program(name, source);
    compile(&program, &Options::default())
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

/// Every example, compiled, by stem.
fn compiled_examples() -> Vec<(String, String, Compiled)> {
    examples()
        .iter()
        .map(|p| {
            let source = read(p);
            let name = stem(p);
            let c = compiled(&name, &source);
            (name, source, c)
        })
        .collect()
}

/// The invariants every compiled plan keeps, whatever the input.
fn check_invariants(name: &str, c: &Compiled, overlap_auto: bool) {
    c.plan
        .validate()
        .unwrap_or_else(|e| panic!("{name}: the plan does not validate: {e}"));
    c.baseline
        .validate()
        .unwrap_or_else(|e| panic!("{name}: the baseline does not validate: {e}"));
    let back = Plan::from_json(&c.plan.to_json())
        .unwrap_or_else(|e| panic!("{name}: the plan's JSON does not read back: {e}"));
    assert_eq!(back, c.plan, "{name}: JSON round trip changed the plan");
    assert_eq!(c.baseline.choices.chunks, 1, "{name}: baseline chunks");
    assert!(
        !c.baseline.choices.shared_concurrent,
        "{name}: the baseline runs the shared experts concurrently"
    );
    let (chosen, baseline) = (c.timeline.total_us, c.baseline_timeline.total_us);
    assert!(
        chosen.is_finite() && chosen > 0.0,
        "{name}: chosen total {chosen}"
    );
    assert!(
        baseline.is_finite() && baseline > 0.0,
        "{name}: baseline total {baseline}"
    );
    let baseline_fits = (c.baseline.memory.peak_activation_bytes + c.baseline.memory.weight_bytes)
        as f64
        <= c.baseline.mesh.device.memory;
    // Memory comes first: a baseline that does not fit may lose to a slower plan that does.
    if overlap_auto && baseline_fits {
        assert!(
            chosen <= baseline + 1e-6,
            "{name}: chosen {chosen} us is slower than the baseline {baseline} us"
        );
    }
    for p in c.timeline.phases.iter().chain(&c.baseline_timeline.phases) {
        assert!(
            p.time_us.is_finite() && p.exposed_us.is_finite(),
            "{name}: phase {:?} is not finite",
            p.phase
        );
        assert!(
            p.exposed_us >= -1e-6 && p.exposed_us <= p.time_us + 1e-6,
            "{name}: phase {:?} exposed {} us of {} us",
            p.phase,
            p.exposed_us,
            p.time_us
        );
    }
    // The chosen plan is one of the candidates, with the time the simulator gave.
    assert!(
        c.report
            .candidates
            .iter()
            .any(|k| k.chunks == c.plan.choices.chunks
                && k.shared_concurrent == c.plan.choices.shared_concurrent
                && (k.total_us - chosen).abs() <= 1e-6),
        "{name}: the chosen plan is not among the candidates {:?}",
        c.report.candidates
    );
    match c.plan.layer.capacity {
        CapacityConfig::Dropless => {
            assert!(
                c.plan.choices.overflow_flag,
                "{name}: dropless without flag"
            );
            assert!(
                c.plan.buffers.iter().any(|b| b.name == "overflow_flag"),
                "{name}: dropless plan without an overflow_flag buffer"
            );
        }
        CapacityConfig::Limited { .. } => {
            assert!(!c.plan.choices.overflow_flag, "{name}: capacity with flag");
            let exchanges = collectives(&c.plan, CollectiveKind::CountExchange);
            assert_eq!(exchanges, 0, "{name}: capacity plan exchanges counts");
        }
    }
}

fn collectives(plan: &Plan, kind: CollectiveKind) -> usize {
    plan.ops()
        .filter(|(_, op)| matches!(&op.kind, OpKind::Collective { kind: k, .. } if *k == kind))
        .count()
}

/// Buffers that share bytes of the arena must be used one after the other on
/// every legal execution: every op touching one happens before every op
/// touching the other. (`validate` compares live ranges by op id, which is one
/// sequential order; this checks the streams' real order.)
fn arena_reuse_respects_happens_before(name: &str, plan: &Plan) {
    let order = HappensBefore::new(&plan.streams, plan.events);
    let mut users: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (_, op) in plan.ops() {
        for b in op_buffers(&op.kind) {
            users.entry(b).or_default().push(op.id);
        }
    }
    let empty = Vec::new();
    for (i, a) in plan.buffers.iter().enumerate() {
        for (j, b) in plan.buffers.iter().enumerate().skip(i + 1) {
            let overlap = a.bytes > 0
                && b.bytes > 0
                && a.offset < b.offset + b.bytes
                && b.offset < a.offset + a.bytes;
            if !overlap || a.role == BufferRole::Input || b.role == BufferRole::Input {
                continue;
            }
            let ua = users.get(&(i as u32)).unwrap_or(&empty);
            let ub = users.get(&(j as u32)).unwrap_or(&empty);
            let a_first = ua.iter().all(|&x| ub.iter().all(|&y| order.before(x, y)));
            let b_first = ua.iter().all(|&x| ub.iter().all(|&y| order.before(y, x)));
            assert!(
                a_first || b_first,
                "{name}: buffers {} (ops {ua:?}) and {} (ops {ub:?}) share arena bytes \
                 but are not ordered",
                a.name,
                b.name
            );
        }
    }
}

/// Shapes and byte counts agree with the buffers they refer to.
fn ops_agree_with_buffers(name: &str, plan: &Plan) {
    let buf = |i: u32| &plan.buffers[i as usize];
    for (_, op) in plan.ops() {
        match &op.kind {
            OpKind::Gemm {
                weight,
                a,
                c,
                m,
                k,
                by_rank,
                ..
            } => {
                let (a, c) = (buf(*a), buf(*c));
                assert_eq!(
                    a.shape.last(),
                    Some(k),
                    "{name}: {} k vs {}",
                    op.name,
                    a.name
                );
                // Through the expansion index, the by-rank side (the up
                // projection's input, the down projection's output) holds
                // one row per received by-rank row, not `m`; the index
                // covers every one of them.
                let by_rank_side = match (by_rank, weight) {
                    (Some(_), moec_runtime::plan::GemmWeight::ExpertUp) => Some(a),
                    (Some(_), _) => Some(c),
                    (None, _) => None,
                };
                for b in [a, c] {
                    if Some(b) != by_rank_side {
                        assert!(b.shape[0] >= *m, "{name}: {} m vs {}", op.name, b.name);
                    }
                }
                if let (Some(r), Some(side)) = (by_rank, by_rank_side) {
                    let index = buf(r.index);
                    assert_eq!(index.shape[0], side.shape[0], "{name}: {}", op.name);
                    assert_eq!(side.bound, index.bound, "{name}: {}", op.name);
                }
            }
            OpKind::Collective {
                kind,
                scope,
                send,
                recv,
                peers,
                bytes_per_peer,
                bytes_sent,
                ..
            } => {
                assert!(*peers >= 1, "{name}: {} has no peer", op.name);
                assert!(
                    bytes_per_peer * peers <= *bytes_sent
                        && *bytes_sent < (bytes_per_peer + 1) * peers,
                    "{name}: {}: {bytes_per_peer} B x {peers} peers vs {bytes_sent} B sent",
                    op.name
                );
                // The intra-node leg of the hierarchical dispatch fans a staged
                // row out once per assignment, so it may send more bytes than
                // its send buffer holds; no leg receives more than fits.
                let fan_out = *scope == CollectiveScope::IntraNode && op.phase == Phase::Dispatch;
                if matches!(kind, CollectiveKind::AllToAll | CollectiveKind::AllToAllV) {
                    // Expected bytes never exceed the worst-case buffers.
                    assert!(
                        (fan_out || *bytes_sent <= buf(*send).bytes)
                            && *bytes_sent <= buf(*recv).bytes,
                        "{name}: {} sends {bytes_sent} B from {} ({} B) into {} ({} B)",
                        op.name,
                        buf(*send).name,
                        buf(*send).bytes,
                        buf(*recv).name,
                        buf(*recv).bytes
                    );
                }
            }
            _ => {}
        }
        assert!(
            op.estimate_us.is_finite() && op.estimate_us >= 0.0,
            "{name}: {} estimate {}",
            op.name,
            op.estimate_us
        );
    }
}

// ------------------------------------------------------------ mesh variants

/// `examples/tiny.moe` with another expert count and mesh.
fn tiny_on(experts: u64, mesh: &str) -> String {
    format!(
        "// A tiny layer for quick runs and tests.

layer tiny {{
    hidden = 64
    dtype = f32
    tokens_per_rank = 32

    experts {{
        count = {experts}
        ffn = swiglu
        intermediate = 128
    }}

    router {{
        scoring = softmax
        top_k = 2
        normalize = true
    }}

    capacity = dropless
}}

mesh {{
{mesh}
}}
"
    )
}

fn mesh_variants() -> Vec<(&'static str, String)> {
    vec![
        (
            "tiny_1_rank",
            tiny_on(
                8,
                "    nodes = 1
    gpus_per_node = 1
    device = H100
    ep = 1",
            ),
        ),
        (
            "tiny_1x8",
            tiny_on(
                8,
                "    gpus_per_node = 8
    device = H100
    ep = 8",
            ),
        ),
        (
            "tiny_2x8",
            tiny_on(
                16,
                "    nodes = 2
    gpus_per_node = 8
    device = H100
    inter_node {
        bandwidth = 400 Gb/s
        latency = 10 us
    }
    ep = 16",
            ),
        ),
        (
            "tiny_2x8_dp2",
            tiny_on(
                8,
                "    nodes = 2
    gpus_per_node = 8
    device = H100
    inter_node {
        bandwidth = 400 Gb/s
        latency = 10 us
    }
    ep = 8
    dp = 2",
            ),
        ),
        (
            "tiny_4x8",
            tiny_on(
                32,
                "    nodes = 4
    gpus_per_node = 8
    device = H100
    inter_node {
        bandwidth = 400 Gb/s
        latency = 10 us
    }
    ep = 32",
            ),
        ),
    ]
}

// ------------------------------------------------------------ snapshots

#[test]
fn example_plans() {
    for (name, _, c) in compiled_examples() {
        insta::assert_snapshot!(format!("plan_{name}"), c.plan.to_string());
    }
}

#[test]
fn mesh_variant_plans() {
    for (name, source) in mesh_variants() {
        let c = compiled(name, &source);
        check_invariants(name, &c, true);
        insta::assert_snapshot!(format!("plan_{name}"), c.plan.to_string());
    }
}

#[test]
fn mesh_variants_communicate_as_the_mesh_says() {
    for (name, source) in mesh_variants() {
        let c = compiled(name, &source);
        let comm = plan_collectives(&c.plan);
        if name == "tiny_1_rank" {
            assert_eq!(comm, 0, "{name}: one rank needs no collective");
            assert_eq!(c.plan.choices.chunks, 1, "{name}: nothing to overlap");
        } else {
            assert!(comm > 0, "{name}: no collective on a multi-rank mesh");
        }
        assert_eq!(
            c.plan.mesh.world_size(),
            c.plan.mesh.ep * c.plan.mesh.etp * c.plan.mesh.dp,
            "{name}"
        );
    }
}

fn plan_collectives(plan: &Plan) -> usize {
    plan.ops()
        .filter(|(_, op)| matches!(op.kind, OpKind::Collective { .. }))
        .count()
}

// ------------------------------------------------------------ determinism

#[test]
fn compiling_twice_gives_the_same_bytes() {
    for path in examples() {
        let name = stem(&path);
        let source = read(&path);
        let a = compiled(&name, &source);
        let b = compiled(&name, &source);
        assert_eq!(
            a.plan.to_string(),
            b.plan.to_string(),
            "{name}: text differs"
        );
        assert_eq!(a.plan.to_json(), b.plan.to_json(), "{name}: JSON differs");
        assert_eq!(a.report, b.report, "{name}: report differs");
        assert_eq!(
            a.timeline.to_json(),
            b.timeline.to_json(),
            "{name}: timeline differs"
        );
    }
}

#[test]
fn compiling_from_four_threads_gives_the_same_bytes() {
    let sources: Vec<(String, String)> = examples()
        .iter()
        .map(|p| (stem(p), read(p)))
        .chain(mesh_variants().into_iter().map(|(n, s)| (n.to_string(), s)))
        .collect();
    let results: Vec<Vec<(String, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    sources
                        .iter()
                        .map(|(name, source)| {
                            let c = compiled(name, source);
                            (c.plan.to_string(), c.plan.to_json())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a compiling thread panicked"))
            .collect()
    });
    for (t, result) in results.iter().enumerate().skip(1) {
        for ((name, _), (first, this)) in sources.iter().zip(results[0].iter().zip(result)) {
            assert_eq!(first.0, this.0, "{name}: text differs in thread {t}");
            assert_eq!(first.1, this.1, "{name}: JSON differs in thread {t}");
        }
    }
}

// ------------------------------------------------------------ invariants

#[test]
fn example_plans_keep_the_invariants() {
    for (name, source, c) in compiled_examples() {
        let auto = program(&name, &source).schedule.overlap == moec_lang::spec::Overlap::Auto;
        check_invariants(&name, &c, auto);
        ops_agree_with_buffers(&name, &c.plan);
        ops_agree_with_buffers(&name, &c.baseline);
    }
}

#[test]
fn example_plans_reuse_arena_bytes_only_in_order() {
    for (name, _, c) in compiled_examples() {
        arena_reuse_respects_happens_before(&name, &c.plan);
        arena_reuse_respects_happens_before(&format!("{name} (baseline)"), &c.baseline);
    }
}

/// The device overflow flag is written by the assign kernel and read by the
/// caller after the layer, so no other buffer may reuse its bytes later.
#[test]
fn overflow_flag_survives_the_layer() {
    for (name, _, c) in compiled_examples() {
        let plan = &c.plan;
        let Some(flag) = plan.buffers.iter().find(|b| b.name == "overflow_flag") else {
            continue;
        };
        for b in &plan.buffers {
            if std::ptr::eq(b, flag) {
                continue;
            }
            let overlap = b.offset < flag.offset + flag.bytes && flag.offset < b.offset + b.bytes;
            assert!(
                !(overlap && b.live.0 > flag.live.1),
                "{name}: {} (live {:?}) reuses the bytes of overflow_flag (live {:?}) \
                 before the caller can read the flag",
                b.name,
                b.live,
                flag.live
            );
        }
    }
}

#[test]
fn simulate_json_has_the_documented_shape() {
    for (name, _, c) in compiled_examples() {
        for (which, timeline) in [("chosen", &c.timeline), ("baseline", &c.baseline_timeline)] {
            let json = timeline.to_json();
            let total = json["total_us"]
                .as_f64()
                .unwrap_or_else(|| panic!("{name} {which}: no total_us in {json}"));
            assert!(total > 0.0, "{name} {which}: total_us {total}");
            let phases = json["phases"]
                .as_array()
                .unwrap_or_else(|| panic!("{name} {which}: no phases in {json}"));
            assert!(!phases.is_empty(), "{name} {which}: no phase");
            for p in phases {
                assert!(p["name"].is_string(), "{name} {which}: phase {p}");
                assert!(
                    p["time_us"].is_f64() || p["time_us"].is_u64(),
                    "{name}: {p}"
                );
                assert!(p["bytes"].is_u64(), "{name} {which}: phase {p}");
                assert!(p["exposed_us"].is_number(), "{name} {which}: phase {p}");
            }
        }
    }
}

#[test]
fn capacity_and_dropless_plans() {
    let mut seen = (false, false);
    for (name, _, c) in compiled_examples() {
        let plan = &c.plan;
        match plan.layer.capacity {
            CapacityConfig::Dropless => {
                seen.0 = true;
                assert!(plan.choices.overflow_flag, "{name}");
                let flag = plan
                    .buffers
                    .iter()
                    .find(|b| b.name == "overflow_flag")
                    .unwrap_or_else(|| panic!("{name}: no overflow_flag buffer"));
                assert_eq!(flag.dtype, DType::U8, "{name}");
                assert!(
                    collectives(plan, CollectiveKind::CountExchange) > 0,
                    "{name}"
                );
            }
            CapacityConfig::Limited { .. } => {
                seen.1 = true;
                assert!(!plan.choices.overflow_flag, "{name}");
                assert_eq!(
                    collectives(plan, CollectiveKind::CountExchange),
                    0,
                    "{name}"
                );
                assert!(
                    !plan.buffers.iter().any(|b| b.name == "overflow_flag"),
                    "{name}: capacity plan with an overflow flag buffer"
                );
            }
        }
    }
    assert!(seen.0 && seen.1, "the examples cover both modes");
}

// ------------------------------------------------------------ a large mesh

fn large_mesh(experts: u64) -> String {
    format!(
        "layer big {{
    hidden = 7168
    dtype = bf16
    dispatch_dtype = fp8_e4m3
    tokens_per_rank = 4096

    experts {{
        count = {experts}
        ffn = swiglu
        intermediate = 2048
    }}

    shared_experts {{
        intermediate = 2048
    }}

    router {{
        scoring = sigmoid
        top_k = 8
        selection_bias = true
        groups = 8
        groups_kept = 4
        normalize = true
        scale = 2.5
    }}

    capacity = dropless
}}

mesh {{
    nodes = 128
    gpus_per_node = 8
    device = H800
    inter_node {{
        bandwidth = 400 Gb/s
        latency = 10 us
    }}
    ep = 1024
}}
"
    )
}

#[test]
fn a_1024_rank_mesh_stays_small() {
    const EGRAPH_BOUND: usize = 5000;
    const PLAN_JSON_BOUND: usize = 4 << 20;
    const { assert!(EGRAPH_BOUND <= NODE_LIMIT) };
    for experts in [1024, 2048] {
        let name = format!("1024 ranks, {experts} experts");
        let c = compiled(&name, &large_mesh(experts));
        check_invariants(&name, &c, true);
        assert!(
            c.report.egraph_nodes < EGRAPH_BOUND,
            "{name}: e-graph of {} nodes",
            c.report.egraph_nodes
        );
        assert_eq!(c.report.stop_reason, "saturated", "{name}");
        let json = c.plan.to_json();
        assert!(
            json.len() < PLAN_JSON_BOUND,
            "{name}: plan JSON of {} bytes",
            json.len()
        );
        assert!(
            c.plan.to_string().len() < PLAN_JSON_BOUND,
            "{name}: plan text"
        );
        assert_eq!(c.plan.mesh.experts_of_ep_rank.len(), 1024, "{name}");
    }
}

// ------------------------------------------------------------ properties

fn cases() -> u32 {
    std::env::var("MOEC_PROP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

const FAMILIES: &[&str] = moec_lang::spec::RULES;

#[derive(Clone, Debug)]
struct Layer {
    hidden: u64,
    dtype: &'static str,
    fp8: bool,
    tokens: u64,
    experts: u64,
    top_k: u64,
    ffn: &'static str,
    intermediate: u64,
    shared: Option<(u64, bool)>,
    scoring: &'static str,
    normalize: bool,
    /// `None`: dropless; else the factor in hundredths and the drop policy.
    capacity: Option<(u64, &'static str)>,
    nodes: u64,
    gpus: u64,
    /// `true`: allow the listed families, `false`: deny them.
    allow: bool,
    families: Vec<&'static str>,
}

impl Layer {
    fn source(&self) -> String {
        let world = self.nodes * self.gpus;
        let (ep, dp) = if self.experts % world == 0 {
            (world, 1)
        } else {
            (1, world)
        };
        let mut s = format!(
            "layer prop {{\n    hidden = {}\n    dtype = {}\n",
            self.hidden, self.dtype
        );
        if self.fp8 {
            s.push_str("    dispatch_dtype = fp8_e4m3\n");
        }
        s.push_str(&format!(
            "    tokens_per_rank = {}\n\n    experts {{\n        count = {}\n        ffn = {}\n        intermediate = {}\n    }}\n",
            self.tokens, self.experts, self.ffn, self.intermediate
        ));
        if let Some((intermediate, gated)) = self.shared {
            s.push_str(&format!(
                "\n    shared_experts {{\n        intermediate = {intermediate}\n"
            ));
            if gated {
                s.push_str("        gate = sigmoid\n");
            }
            s.push_str("    }\n");
        }
        s.push_str(&format!(
            "\n    router {{\n        scoring = {}\n        top_k = {}\n        normalize = {}\n    }}\n\n",
            self.scoring, self.top_k, self.normalize
        ));
        match self.capacity {
            None => s.push_str("    capacity = dropless\n"),
            Some((f, drop)) => s.push_str(&format!(
                "    capacity {{\n        factor = {}.{:02}\n        drop = {drop}\n    }}\n",
                f / 100,
                f % 100
            )),
        }
        s.push_str(&format!(
            "}}\n\nmesh {{\n    nodes = {}\n    gpus_per_node = {}\n    device = H100\n",
            self.nodes, self.gpus
        ));
        if self.nodes > 1 {
            s.push_str(
                "    inter_node {\n        bandwidth = 400 Gb/s\n        latency = 10 us\n    }\n",
            );
        }
        s.push_str(&format!("    ep = {ep}\n"));
        if dp > 1 {
            s.push_str(&format!("    dp = {dp}\n"));
        }
        let list = self.families.join(", ");
        let key = if self.allow { "allow" } else { "deny" };
        s.push_str(&format!(
            "}}\n\nschedule {{\n    overlap = auto\n    {key} = [{list}]\n}}\n"
        ));
        s
    }
}

fn layer() -> impl Strategy<Value = Layer> {
    let shape = (
        1u64..=64,
        prop::sample::select(vec!["bf16", "f16", "f32"]),
        any::<bool>(),
        prop::sample::select(vec![16u64, 64, 128, 256, 512, 1024, 2048, 4096]),
        prop::sample::select(vec![8u64, 16, 64, 128, 256]),
        1u64..=8,
        prop::sample::select(vec!["swiglu", "gelu", "relu"]),
        1u64..=64,
    );
    let rest = (
        prop::option::of((1u64..=32, any::<bool>())),
        prop::sample::select(vec!["softmax", "sigmoid"]),
        any::<bool>(),
        prop::option::of((
            100u64..=200,
            prop::sample::select(vec!["position", "probs"]),
        )),
        1u64..=4,
        prop::sample::select(vec![1u64, 2, 4, 8]),
        any::<bool>(),
        prop::sample::subsequence(FAMILIES.to_vec(), 0..=FAMILIES.len()),
    );
    (shape, rest).prop_map(
        |(
            (hidden, dtype, fp8, tokens, experts, top_k, ffn, intermediate),
            (shared, scoring, normalize, capacity, nodes, gpus, allow, families),
        )| Layer {
            hidden: hidden * 128,
            dtype,
            fp8,
            tokens,
            experts,
            top_k: top_k.min(experts),
            ffn,
            intermediate: intermediate * 128,
            shared: shared.map(|(i, g)| (i * 128, g)),
            scoring,
            normalize,
            capacity,
            nodes,
            gpus,
            allow,
            families,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_layers_compile_to_valid_plans(layer in layer()) {
        let source = layer.source();
        let checked = check_source(&source);
        prop_assert!(
            checked.program.is_some(),
            "the generated source does not check:\n{source}\n{}",
            render("prop.moe", &source, &checked.diagnostics, false)
        );
        let (program, _) = checked.program.unwrap();
        let c = compile(&program, &Options::default())
            .map_err(|e| TestCaseError::fail(format!("{e}\n{source}")))?;
        let name = format!("generated source\n{source}\n");
        check_invariants(&name, &c, true);
        ops_agree_with_buffers(&name, &c.plan);
        arena_reuse_respects_happens_before(&name, &c.plan);
        // Denied families never show up as fired.
        for (family, n) in &c.report.fired {
            prop_assert!(
                program.schedule.rules.contains(&family.as_str()) || *n == 0,
                "{family} fired {n}x though the schedule forbids it\n{source}"
            );
        }
        if !program.schedule.rules.contains(&"overlap_chunks") {
            prop_assert_eq!(c.plan.choices.chunks, 1);
        }
        if !program.schedule.rules.contains(&"overlap_shared") {
            prop_assert!(!c.plan.choices.shared_concurrent);
        }
    }
}

// ------------------------------------------------------------ known oddities

/// `--tokens` (`Options::tokens`) changes the tokens per rank; a capacity given
/// as a factor is a share of the tokens, so the slots must follow.
#[test]
fn token_override_rescales_a_capacity_factor() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/switch_base_128.moe");
    let program = program("switch_base_128", &read(&path));
    let c = compile(
        &program,
        &Options {
            tokens: Some(4096),
            ..Options::default()
        },
    )
    .expect("compiles");
    check_invariants("switch_base_128 --tokens 4096", &c, true);
    let CapacityConfig::Limited {
        slots,
        factor: Some(f),
        ..
    } = c.plan.layer.capacity
    else {
        panic!("switch_base_128 has a capacity factor");
    };
    let m = &c.plan.mesh;
    let expected = (f * (4096 * m.ep * c.plan.layer.router.top_k) as f64
        / c.plan.layer.experts as f64)
        .ceil() as u64;
    assert_eq!(c.plan.layer.tokens_per_rank, 4096);
    assert_eq!(slots, expected, "capacity slots for 4096 tokens per rank");
}

/// With one GPU per node there is nothing to forward inside a node: the
/// two-level all-to-all would add an intra-node collective without peers.
#[test]
fn hierarchical_a2a_needs_two_gpus_per_node() {
    let source = tiny_on(
        8,
        "    nodes = 2
    gpus_per_node = 1
    device = H100
    inter_node {
        bandwidth = 400 Gb/s
        latency = 10 us
    }
    ep = 2",
    );
    let c = compiled("tiny_2x1", &source);
    check_invariants("tiny_2x1", &c, true);
    assert_eq!(c.plan.choices.dispatch, A2aAlgorithm::Flat);
    for (_, op) in c.plan.ops() {
        if let OpKind::Collective { peers, .. } = op.kind {
            assert!(peers >= 1, "tiny_2x1: {} has no peer", op.name);
        }
    }
    assert!(c
        .report
        .fired
        .iter()
        .all(|(f, n)| f != "hierarchical_a2a" || *n == 0));
}

/// `examples/tiny.moe` on four ranks with a capacity block instead of dropless.
fn tiny_capacity(capacity: &str) -> String {
    tiny_on(
        8,
        "    gpus_per_node = 4
    device = H100
    ep = 4",
    )
    .replace("capacity = dropless", capacity)
}

/// A collective cannot move more bytes than its buffers hold: when the capacity
/// is below the expected load, the dropped rows do not travel.
#[test]
fn capacity_bounds_the_bytes_on_the_wire() {
    let source = tiny_capacity("capacity {\n        slots = 1\n        drop = position\n    }");
    let c = compiled("tiny, 1 slot per expert", &source);
    check_invariants("tiny, 1 slot per expert", &c, true);
    ops_agree_with_buffers("tiny, 1 slot per expert", &c.plan);
}

/// Capacity-mode buffers hold every slot, but an expert can never receive
/// more assignments than the EP group has: a huge `slots` must not size the
/// buffers beyond the dropless worst case.
#[test]
fn capacity_buffers_are_bounded_by_the_assignments() {
    let big = compiled(
        "tiny, 100000 slots",
        &tiny_capacity("capacity {\n        slots = 100000\n        drop = position\n    }"),
    );
    // Against the dropless worst case (the default dropless plan holds only
    // twice the expected load, fewer rows than every slot).
    let dropless = compiled(
        "tiny",
        &format!(
            "{}\nschedule {{\n    headroom = worst_case\n}}\n",
            tiny_capacity("capacity = dropless")
        ),
    );
    assert!(
        big.plan.choices.expert_rows <= dropless.plan.choices.expert_rows,
        "capacity mode sizes {} expert rows, dropless needs {}",
        big.plan.choices.expert_rows,
        dropless.plan.choices.expert_rows
    );
    assert!(big.plan.memory.peak_activation_bytes <= dropless.plan.memory.peak_activation_bytes);
}

/// An EP group inside one node exchanges its counts over the node's links,
/// even when the mesh (through `dp`) spans several nodes.
#[test]
fn count_exchange_inside_a_node_uses_the_node_link() {
    let two_nodes = compiled("tiny_2x8_dp2", &mesh_variants()[3].1);
    let one_node = compiled(
        "tiny_1x16_dp2",
        &tiny_on(
            8,
            "    gpus_per_node = 16
    device = H100
    ep = 8
    dp = 2",
        ),
    );
    let estimates = |p: &Plan| -> Vec<(String, String)> {
        p.ops()
            .filter(|(_, op)| matches!(op.kind, OpKind::Collective { .. }))
            .map(|(_, op)| (op.name.clone(), format!("{:.3}", op.estimate_us)))
            .collect()
    };
    assert_eq!(estimates(&two_nodes.plan), estimates(&one_node.plan));
}

/// A plan must fit the device it was compiled for: activations and weights of
/// one rank within the device memory the mesh names. The compiler prefers
/// candidates that fit (the 1024-rank dropless mesh would take 95.57 GiB per
/// rank with 6 chunks, each with its own worst-case receive buffer).
#[test]
fn plans_fit_in_device_memory() {
    let mut fitted = vec![(
        "1024 ranks".to_string(),
        compiled("1024 ranks", &large_mesh(2048)),
    )];
    fitted.extend(compiled_examples().into_iter().map(|(n, _, c)| (n, c)));
    for (name, c) in fitted {
        let need = c.plan.memory.peak_activation_bytes + c.plan.memory.weight_bytes;
        assert!(
            need as f64 <= c.plan.mesh.device.memory,
            "{name}: {need} B per rank on a device of {} B",
            c.plan.mesh.device.memory
        );
        assert!(
            c.report.warnings.is_empty(),
            "{name}: {:?}",
            c.report.warnings
        );
    }
}

/// When no candidate fits the device, the compiler lowers the dropless
/// headroom (2x, 1.5x, then 1.25x the expected load), and when even that
/// does not fit, says so and takes the smallest.
#[test]
fn a_plan_too_large_for_the_device_is_reported() {
    let fits_at_1_25 = large_mesh(2048).replace("device = H800", "device = H800 { memory = 1 GB }");
    let c = compiled("1024 ranks on 1 GB", &fits_at_1_25);
    assert_eq!(c.plan.choices.headroom, Some(1.25));
    assert!(c.report.warnings.is_empty(), "{:?}", c.report.warnings);
    let source = large_mesh(2048).replace("device = H800", "device = H800 { memory = 0.5 GB }");
    let c = compiled("1024 ranks on 4 GB", &source);
    let need = c.plan.memory.peak_activation_bytes + c.plan.memory.weight_bytes;
    assert!(need as f64 > c.plan.mesh.device.memory);
    assert!(
        c.report
            .warnings
            .iter()
            .any(|w| w.contains("GiB per rank") && w.contains("1.25x the expected load")),
        "no memory warning for {need} B per rank: {:?}",
        c.report.warnings
    );
    let smallest = c.report.candidates.iter().map(|k| k.memory_bytes).min();
    assert_eq!(Some(need), smallest, "the smallest candidate is chosen");
}

/// The layers of DeepEP's published normal-kernel benchmark (BENCHMARKS.md
/// compares their predicted dispatch and combine with DeepEP's figures)
/// compile, fit their devices and, when they span several nodes, send a
/// token once per node (hierarchically) or once per rank.
#[test]
fn the_deepep_benchmark_layers_compile() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../compiler/benches/deepep");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "moe"))
        .collect();
    paths.sort();
    assert_eq!(paths.len(), 4, "{paths:?}");
    for path in paths {
        let name = stem(&path);
        let c = compiled(&name, &read(&path));
        check_invariants(&name, &c, false);
        assert!(
            c.report.warnings.is_empty(),
            "{name}: {:?}",
            c.report.warnings
        );
        let multi_node = c.plan.mesh.nodes > 1;
        let hierarchical = c.plan.choices.dispatch == A2aAlgorithm::Hierarchical;
        assert!(
            !hierarchical || multi_node,
            "{name}: hierarchical on one node"
        );
        assert!(
            !multi_node || hierarchical || c.plan.choices.dedup_dispatch,
            "{name}: one row per pick across nodes"
        );
    }
}

/// The GEMMs fused with the expansion index (gpt-oss picks dispatch by rank
/// with the reducing combine): the load checks refuse what the runtime
/// could not run as the plan says.
#[test]
fn gemms_through_the_expansion_index_are_checked_at_load() {
    use moec_runtime::plan::{GemmWeight, RankIndex, WeightOn};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gpt_oss_20b.moe");
    let plan = compiled("gpt_oss_20b", &read(&path)).plan;
    let fused = |p: &Plan, w: GemmWeight| {
        p.ops()
            .filter_map(|(_, op)| match op.kind {
                OpKind::Gemm {
                    weight,
                    by_rank: Some(r),
                    ..
                } if weight == w => Some((op.id, r)),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let ups = fused(&plan, GemmWeight::ExpertUp);
    let downs = fused(&plan, GemmWeight::ExpertDown);
    assert!(
        !ups.is_empty() && ups.len() == downs.len(),
        "{ups:?} {downs:?}"
    );
    plan.validate().unwrap();
    let edit = |f: &dyn Fn(&mut Plan)| {
        let mut p = plan.clone();
        f(&mut p);
        p.validate().unwrap_err().to_string()
    };
    let set = |p: &mut Plan, id: u32, to: Option<RankIndex>| {
        for s in &mut p.streams {
            for op in &mut s.ops {
                if let (true, OpKind::Gemm { by_rank, .. }) = (op.id == id, &mut op.kind) {
                    *by_rank = to;
                }
            }
        }
    };
    let (up, index) = ups[0];
    // The index and weights swapped: an f32 index.
    let swapped = RankIndex {
        index: index.weights,
        weights: index.index,
    };
    let e = edit(&|p| set(p, up, Some(swapped)));
    assert!(e.contains("expansion index"), "{e}");
    // Weighing the inputs: the expansion scales each copy.
    let e = edit(&|p| p.layer.router.weight_on = WeightOn::Input);
    assert!(e.contains("weighs the inputs"), "{e}");
    // Not a plan that dispatches by rank.
    let e = edit(&|p| p.choices.reduce_combine = false);
    assert!(e.contains("expansion index"), "{e}");
    // A buffer that does not exist.
    let gone = RankIndex {
        index: 100_000,
        weights: index.weights,
    };
    let e = edit(&|p| set(p, up, Some(gone)));
    assert!(e.contains("100000"), "{e}");
    // A collective whose phase says the other direction (the plan fuzz
    // found that this ran to a wrong output before the direction check).
    for (from, to) in [
        (Phase::Dispatch, Phase::Combine),
        (Phase::Combine, Phase::Dispatch),
    ] {
        let e = edit(&|p| {
            let op = p
                .streams
                .iter_mut()
                .flat_map(|s| s.ops.iter_mut())
                .find(|op| op.phase == from && matches!(op.kind, OpKind::Collective { .. }))
                .unwrap();
            op.phase = to;
        });
        assert!(e.contains("sends rows written in the"), "{e}");
    }
}
