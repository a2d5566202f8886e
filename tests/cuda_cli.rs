//! `moec run --backend cuda` from the command line.
//!
//! On a machine without a CUDA driver (CI, most laptops) the command must
//! say `no CUDA driver found; use --backend cpu` and exit with 1, never
//! panic. Where a driver and a GPU exist, the same command runs a small
//! layer and exits with 0; the test adapts to the machine it runs on. The
//! CLI runs in-process (`moec::cli::run`), as in `cli.rs`.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use moec_runtime::cuda::device::{self, DeviceError, NO_DRIVER};

/// Exit code, stdout and stderr of `moec ARGS`, run in-process.
fn moec(args: &[&str]) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let argv = std::iter::once("moec").chain(args.iter().copied());
    let code = moec::cli::run(argv, &mut out, &mut err, false);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

/// On a machine without a usable GPU, checks that a `--backend cuda`
/// command said why and exited with 1 (never a panic) and returns true;
/// returns false where a GPU is present.
fn refused_without_a_gpu(code: i32, stdout: &str, stderr: &str) -> bool {
    assert!(!stderr.contains("panicked"), "{stderr}");
    match device::probe() {
        Err(DeviceError::NoDriver) => {
            assert_eq!(Some(code), Some(1), "{stdout}{stderr}");
            assert_eq!(stderr.trim(), format!("error: {NO_DRIVER}"));
            assert!(stdout.is_empty(), "{stdout}");
            true
        }
        Err(e) => {
            // A driver without a GPU, or a build without the CUDA backend.
            assert_eq!(Some(code), Some(1), "{stdout}{stderr}");
            assert!(stderr.contains(&e.to_string()), "{stderr}");
            true
        }
        Ok(_) => false,
    }
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.moe"))
        .display()
        .to_string()
}

#[test]
fn run_on_cuda_without_a_driver_says_so_and_exits_1() {
    let (code, stdout, stderr) = moec(&[
        "run",
        &example("tiny"),
        "--backend",
        "cuda",
        "--tokens",
        "16",
    ]);
    if refused_without_a_gpu(code, &stdout, &stderr) {
        return;
    }
    if let Ok(info) = device::probe() {
        eprintln!(
            "a GPU is present ({}, {}): checking that the run succeeds instead",
            info.name,
            info.arch()
        );
    }
    assert_eq!(Some(code), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("cuda backend"), "{stdout}");
}

#[test]
fn the_backend_is_checked_before_the_file() {
    if device::probe().is_ok() {
        eprintln!("a GPU is present: nothing to check");
        return;
    }
    // No driver: the missing file is not even read.
    let (code, _, stderr) = moec(&["run", "no/such/file.moe", "--backend", "cuda"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("--backend cpu"), "{stderr}");
}

#[test]
fn shuffle_is_a_cpu_check() {
    let (code, _, stderr) = moec(&[
        "run",
        &example("tiny"),
        "--backend",
        "cuda",
        "--shuffle",
        "2",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--shuffle"), "{stderr}");
}

#[test]
fn unknown_backends_are_usage_errors() {
    let (code, _, _) = moec(&["run", &example("tiny"), "--backend", "tpu"]);
    assert_eq!(code, 2);
}

#[test]
fn bench_on_cuda_without_a_driver_says_so_and_exits_1() {
    let (code, stdout, stderr) = moec(&[
        "bench",
        &example("tiny"),
        "--backend",
        "cuda",
        "--tokens",
        "64",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--json",
    ]);
    if refused_without_a_gpu(code, &stdout, &stderr) {
        return;
    }
    // On a GPU: the JSON report has every figure, each measured.
    assert_eq!(Some(code), Some(0), "{stdout}{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(v["total_ms"]["median"].as_f64().unwrap() > 0.0, "{stdout}");
    assert!(
        v["expert_gemm"]["tflops"].as_f64().unwrap() > 0.0,
        "{stdout}"
    );
    assert!(v["expert_gemm"]["calls"].as_u64().unwrap() > 0, "{stdout}");
    let phases = v["phases"].as_array().unwrap();
    assert!(phases.iter().any(|p| p["phase"] == "experts"), "{stdout}");
    for m in v["memory_bound"].as_array().unwrap() {
        assert!(m["rate"].as_f64().unwrap() > 0.0, "{stdout}");
    }
}

#[test]
fn graph_needs_the_cuda_backend() {
    for cmd in ["run", "bench"] {
        let (code, _, stderr) = moec(&[cmd, &example("tiny"), "--graph"]);
        assert_eq!(code, 2, "{cmd}: {stderr}");
        assert!(stderr.contains("--backend cuda"), "{cmd}: {stderr}");
    }
}
