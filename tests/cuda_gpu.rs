//! The CUDA backend on a real GPU against the CPU backend.
//!
//! These tests are `#[ignore]`d: `cargo test` never runs them, so the suite
//! passes on machines without a GPU (CI). Where a GPU exists, run them with
//!
//! ```sh
//! cargo test --release -p moec-tests --test cuda_gpu -- --ignored --nocapture
//! ```
//!
//! or with `runtime/gpu/check.sh`, which runs a binary built elsewhere. Each
//! test prints a notice and passes when no CUDA driver is found, so running
//! the ignored group on a machine without a GPU is harmless too.
//!
//! Every example, shrunk (hidden 64, ffn 32, 128 tokens per rank, on its own
//! mesh as virtual ranks of GPU 0), runs on both backends with the same seed:
//! the outputs must agree within a relative error of 1e-2 in bf16 (the
//! issue's bound) and 1e-4 in f32 (cuBLAS sums in another order than the
//! `gemm` crate), and the routing statistics exactly.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use moec::compile::{compile, Options};
use moec::run::{apply, Overrides};
use moec_runtime::cpu::{CpuBackend, CpuOptions};
use moec_runtime::cuda::device::{self, DeviceError};
use moec_runtime::cuda::{CommChoice, CudaBackend, CudaOptions};
use moec_runtime::plan::Plan;
use moec_runtime::weights::{random_inputs, LayerWeights};

/// Whether a GPU is there; prints why not otherwise.
fn gpu(test: &str) -> bool {
    match device::probe() {
        Ok(info) => {
            eprintln!("{test}: on {} ({})", info.name, info.arch());
            true
        }
        Err(DeviceError::NoDriver) => {
            eprintln!("{test}: skipped: {}", device::NO_DRIVER);
            false
        }
        Err(e) => {
            eprintln!("{test}: skipped: {e}");
            false
        }
    }
}

/// The examples folder: `MOEC_EXAMPLES` (a binary built on one machine and
/// run on another, by `runtime/gpu/check.sh`), else the repository's.
fn examples_dir() -> PathBuf {
    match std::env::var_os("MOEC_EXAMPLES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
    }
}

fn examples() -> Vec<PathBuf> {
    let dir = examples_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "examples missing in {}", dir.display());
    files
}

fn plan_of(source: &str, overrides: &Overrides) -> Plan {
    let (program, _) = moec_lang::check_source(source).program.unwrap();
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    compile(&program, &Options::cuda()).unwrap().plan
}

fn options() -> CudaOptions {
    CudaOptions {
        comm: CommChoice::Virtual,
        ..CudaOptions::default()
    }
}

/// Runs `plan` on both backends; returns the relative error.
fn both(name: &str, plan: &Plan, seed: u64) -> f64 {
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let weights = LayerWeights::random(&layer, seed);
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, seed);
    let want = CpuBackend::new(plan.clone(), &weights, CpuOptions::default())
        .unwrap()
        .forward(&inputs)
        .unwrap();
    let mut gpu = CudaBackend::new(plan.clone(), &weights, options())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let got = gpu
        .forward(&inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    // A second pass reuses every allocation and must give the same bits.
    let again = gpu
        .forward(&inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        again.outputs == got.outputs,
        "{name}: a second pass differs"
    );
    // A profiled pass (timing events around every step) gives the same bits
    // and a device time for every phase it ran.
    let (profiled, timings) = gpu
        .forward_profiled(&inputs)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(
        profiled.outputs == got.outputs,
        "{name}: the profiled pass differs"
    );
    assert!(!timings.is_empty(), "{name}: no timings");
    assert!(
        timings
            .iter()
            .all(|t| t.seconds.is_finite() && t.seconds >= 0.0),
        "{name}: {timings:?}"
    );
    assert!(
        profiled
            .phase_seconds
            .contains_key(&moec_runtime::plan::Phase::Experts),
        "{name}: {:?}",
        profiled.phase_seconds
    );
    // Capacity plans also run as a CUDA graph: captured, then replayed,
    // each with the eager pass's bits and statistics.
    if gpu.graph_capable() {
        for what in ["captured", "replayed"] {
            let g = gpu
                .forward_graph(&inputs)
                .unwrap_or_else(|e| panic!("{name}: graph {what}: {e}"));
            assert!(g.outputs == got.outputs, "{name}: the {what} graph differs");
            assert_eq!(
                g.stats.routed_per_expert, got.stats.routed_per_expert,
                "{name}"
            );
            assert_eq!(g.stats.dropped, got.stats.dropped, "{name}");
        }
        eprintln!("{name}: the CUDA graph matches the eager pass");
    }
    assert_eq!(
        got.stats.routed_per_expert, want.stats.routed_per_expert,
        "{name}: assignments per expert"
    );
    assert_eq!(got.stats.dropped, want.stats.dropped, "{name}: dropped");
    let (mut diff, mut max) = (0.0f64, 0.0f64);
    for (g, w) in got
        .outputs
        .iter()
        .flatten()
        .zip(want.outputs.iter().flatten())
    {
        diff = diff.max(f64::from((g - w).abs()));
        max = max.max(f64::from(w.abs()));
    }
    assert!(max > 1e-3, "{name}: the outputs are all (nearly) zero");
    eprintln!(
        "{name}: {} (relative error {:.2e}, {:.3} ms)",
        gpu.describe(),
        diff / max,
        got.wall_seconds * 1e3
    );
    diff / max
}

#[test]
#[ignore = "needs a GPU: cargo test -p moec-tests --test cuda_gpu -- --ignored"]
fn every_example_shrunk_matches_the_cpu_in_bf16() {
    if !gpu("every_example_shrunk_matches_the_cpu_in_bf16") {
        return;
    }
    for path in examples() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(&path).unwrap();
        let plan = plan_of(
            &source,
            &Overrides {
                ranks: None,
                tokens: Some(128),
                dtype: Some(moec_lang::spec::DType::Bf16),
                hidden: Some(64),
                ffn: Some(32),
            },
        );
        let err = both(&name, &plan, 3);
        assert!(err < 1e-2, "{name}: relative error {err:e}");
    }
}

#[test]
#[ignore = "needs a GPU: cargo test -p moec-tests --test cuda_gpu -- --ignored"]
fn every_example_shrunk_matches_the_cpu_in_f32() {
    if !gpu("every_example_shrunk_matches_the_cpu_in_f32") {
        return;
    }
    for path in examples() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let source = std::fs::read_to_string(&path).unwrap();
        let plan = plan_of(
            &source,
            &Overrides {
                ranks: None,
                tokens: Some(128),
                dtype: Some(moec_lang::spec::DType::F32),
                hidden: Some(64),
                ffn: Some(32),
            },
        );
        let err = both(&name, &plan, 4);
        assert!(err < 1e-4, "{name}: relative error {err:e}");
    }
}

/// Capacity with both drop policies, a chunked plan and replicas: the
/// parts of the assignment kernels the examples do not reach.
#[test]
#[ignore = "needs a GPU: cargo test -p moec-tests --test cuda_gpu -- --ignored"]
fn capacity_chunks_and_replicas_match_the_cpu() {
    if !gpu("capacity_chunks_and_replicas_match_the_cpu") {
        return;
    }
    let layer = |router: &str, extra: &str, mesh: &str, schedule: &str| {
        format!(
            "layer t {{\n hidden = 64\n dtype = bf16\n tokens_per_rank = 96\n experts {{\n count = 16\n ffn = swiglu\n intermediate = 32\n }}\n router {{\n {router}\n }}\n {extra}\n}}\n\nmesh {{\n gpus_per_node = 4\n device = H100\n ep = 4\n {mesh}\n}}\n{schedule}\n"
        )
    };
    let cases = [
        (
            "drop = position",
            layer(
                "scoring = softmax\n top_k = 2",
                "capacity {\n factor = 0.5\n drop = position\n }",
                "",
                "",
            ),
        ),
        (
            "drop = probs",
            layer(
                "scoring = softmax\n top_k = 2",
                "capacity {\n factor = 0.5\n drop = probs\n }",
                "",
                "",
            ),
        ),
        (
            "overlap = 3",
            layer(
                "scoring = softmax\n top_k = 2",
                "shared_experts {\n intermediate = 32\n }",
                "",
                "schedule {\n overlap = 3\n }",
            ),
        ),
        (
            "replicas",
            layer(
                "scoring = sigmoid\n top_k = 2",
                "",
                "replicas {\n 0 = [2, 3]\n 9 = [0]\n }",
                "",
            ),
        ),
    ];
    for (name, source) in cases {
        let plan = plan_of(&source, &Overrides::default());
        let err = both(name, &plan, 5);
        assert!(err < 1e-2, "{name}: relative error {err:e}");
    }
}

/// A plan the GPU cannot run yet is an error, not a crash.
#[test]
#[ignore = "needs a GPU: cargo test -p moec-tests --test cuda_gpu -- --ignored"]
fn unsupported_plans_are_errors() {
    if !gpu("unsupported_plans_are_errors") {
        return;
    }
    let path = examples_dir().join("deepseek_v3.moe");
    let plan = plan_of(
        &std::fs::read_to_string(path).unwrap(),
        &Overrides {
            ranks: Some(16),
            tokens: Some(256),
            dtype: Some(moec_lang::spec::DType::F32),
            hidden: Some(64),
            ffn: Some(32),
        },
    );
    let weights = LayerWeights::random(&plan.layer, 1);
    match CudaBackend::new(plan, &weights, options()) {
        Ok(_) => panic!("the hierarchical all-to-all ran"),
        Err(e) => assert!(e.to_string().contains("hierarchical"), "{e}"),
    }
}
