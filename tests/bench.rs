//! `moec bench`, driven in-process through `moec::cli::run` on a shrunk copy
//! of the benchmark layer: the table has its three rows and its ratios, and
//! the loop-over-experts baseline computed the backend's output.
//!
//! This checks the command, not the figures: timing belongs in the benchmark
//! itself, never in a test.

#![allow(clippy::unwrap_used)]

use std::path::Path;

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn moec(args: &[&str]) -> Run {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let argv: Vec<&str> = std::iter::once("moec")
        .chain(args.iter().copied())
        .collect();
    let code = moec::cli::run(argv, &mut out, &mut err, false);
    Run {
        code,
        out: String::from_utf8(out).expect("stdout is UTF-8"),
        err: String::from_utf8(err).expect("stderr is UTF-8"),
    }
}

fn layer() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../compiler/benches/cpu_layer.moe")
        .to_str()
        .expect("a UTF-8 path")
        .to_string()
}

const SHRUNK: [&str; 10] = [
    "--hidden", "64", "--ffn", "32", "--tokens", "64", "--iters", "1", "--warmup", "0",
];

#[test]
fn bench_prints_the_three_rows_and_the_baseline_agrees() {
    let file = layer();
    let mut args = vec!["bench", file.as_str()];
    args.extend(SHRUNK);
    let r = moec(&args);
    assert_eq!(r.code, 0, "stdout:\n{}\nstderr:\n{}", r.out, r.err);
    for row in ["moec cpu backend", "loop over experts", "GEMMs alone"] {
        let line = r
            .out
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no `{row}` row in:\n{}", r.out));
        // name, median ms, min ms, GFLOP/s: three positive numbers.
        let numbers: Vec<f64> = line[row.len()..]
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(numbers.len(), 3, "{line}");
        assert!(numbers.iter().all(|&v| v > 0.0), "{line}");
    }
    assert!(r.out.contains("loop / moec:"), "{}", r.out);
    assert!(r.out.contains("moec / GEMMs:"), "{}", r.out);
    assert!(
        r.out
            .contains("loop over experts agrees with the backend: max relative error"),
        "{}",
        r.out
    );
    assert!(r
        .out
        .contains("4 rank(s) x 64 tokens, hidden 64, 16 experts x swiglu(32), top-2, f32"));
    // Progress goes to stderr.
    assert!(r.err.contains("iter 1/1: moec "), "{}", r.err);
    assert!(r.err.contains("GEMMs alone "), "{}", r.err);
}

#[test]
fn bench_json_is_one_object_with_the_rows_and_the_check() {
    let file = layer();
    let mut args = vec!["bench", file.as_str(), "--json", "--gemm-threads", "2"];
    args.extend(SHRUNK);
    let r = moec(&args);
    assert_eq!(r.code, 0, "{}", r.err);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["moec cpu backend", "loop over experts", "GEMMs alone"]
    );
    for row in rows {
        assert!(row["median_ms"].as_f64().unwrap() > 0.0);
        assert!(row["min_ms"].as_f64().unwrap() <= row["median_ms"].as_f64().unwrap());
    }
    assert!(v["max_relative_error"].as_f64().unwrap() < 1e-4);
    assert_eq!(v["gemm_threads"], 2);
    assert_eq!(v["ranks"], 4);
    let routed: u64 = v["routed_per_expert"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(routed, 4 * 64 * 2);
    assert!(v["goal_loop_over_moec_at_least_3"].is_boolean());
    assert!(v["moec_phases_ms"]["experts"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_rejects_bad_counts_and_capacity_layers() {
    let file = layer();
    let r = moec(&["bench", file.as_str(), "--iters", "0"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("--iters must be at least 1"), "{}", r.err);
    let r = moec(&["bench", file.as_str(), "--gemm-threads", "0"]);
    assert_eq!(r.code, 2);
    let r = moec(&["bench", "no/such/file.moe"]);
    assert_eq!(r.code, 2);
    let switch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/switch_base_128.moe");
    let r = moec(&[
        "bench",
        switch.to_str().unwrap(),
        "--ranks",
        "4",
        "--hidden",
        "32",
        "--ffn",
        "16",
        "--tokens",
        "16",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("dropless layers only"), "{}", r.err);
}

/// The baseline follows every router and FFN option of the examples
/// (group-limited sigmoid routing with a selection bias and shared experts,
/// clamped SwiGLU with biases, the weight on the input, a gated shared
/// expert), in f32 and in bf16.
#[test]
fn bench_baseline_agrees_on_every_dropless_example() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for name in [
        "deepseek_v3",
        "gpt_oss_20b",
        "llama4_maverick",
        "mixtral_8x7b",
        "qwen2_57b_a14b",
        "qwen3_30b_a3b",
        "tiny",
    ] {
        let file = dir.join(format!("{name}.moe"));
        for dtype in ["f32", "bf16"] {
            let r = moec(&[
                "bench",
                file.to_str().unwrap(),
                "--ranks",
                "4",
                "--hidden",
                "64",
                "--ffn",
                "32",
                "--tokens",
                "32",
                "--dtype",
                dtype,
                "--iters",
                "1",
                "--warmup",
                "0",
                "--json",
            ]);
            assert_eq!(r.code, 0, "{name} {dtype}: {}", r.err);
            let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
            let err = v["max_relative_error"].as_f64().unwrap();
            let tol = v["tolerance"].as_f64().unwrap();
            assert!(err < tol, "{name} {dtype}: {err} >= {tol}");
            if dtype == "f32" {
                assert_eq!(tol, 1e-4, "{name}");
            }
        }
    }
}
