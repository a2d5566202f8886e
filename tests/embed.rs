//! The embedding API's test fixture (`runtime/tests/fixtures/tiny.plan.json`,
//! which the runtime's doctests and tests load because they cannot run the
//! compiler) is exactly what the current compiler writes for
//! `examples/tiny.moe`, and a layer loaded from it computes what a layer
//! built from a freshly compiled plan computes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use moec_runtime::{CpuOptions, Layer, Plan, Weights};

const REGENERATE: &str = "cargo run -p moec -- build examples/tiny.moe --emit json -o runtime/tests/fixtures/tiny.plan.json";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

/// `moec build examples/tiny.moe --emit json`, in-process.
fn compiled_json() -> String {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let file = repo().join("examples/tiny.moe");
    let argv = ["moec", "build", file.to_str().unwrap(), "--emit", "json"];
    let code = moec::cli::run(argv, &mut out, &mut err, false);
    assert_eq!(
        code,
        0,
        "moec build failed: {}",
        String::from_utf8_lossy(&err)
    );
    String::from_utf8(out).unwrap()
}

#[test]
fn the_fixture_is_what_the_compiler_writes() {
    let path = repo().join("runtime/tests/fixtures/tiny.plan.json");
    let fixture = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; regenerate it with `{REGENERATE}`", path.display()));
    let fresh = compiled_json();
    if fixture != fresh {
        let line = fixture
            .lines()
            .zip(fresh.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "one is a prefix of the other".to_string(),
                |i| {
                    format!(
                        "first difference at line {}:\n  fixture:  {}\n  compiler: {}",
                        i + 1,
                        fixture.lines().nth(i).unwrap_or_default(),
                        fresh.lines().nth(i).unwrap_or_default()
                    )
                },
            );
        panic!(
            "{} is not what the current compiler writes for examples/tiny.moe; {line}\n\
             Regenerate it from the repository root with:\n    {REGENERATE}",
            path.display()
        );
    }
}

#[test]
fn a_layer_from_the_fixture_equals_one_from_the_compiled_plan() {
    let plan = Plan::from_json(&compiled_json()).unwrap();
    let fresh = Layer::from_plan(plan, Weights::Random { seed: 9 }, CpuOptions::default()).unwrap();
    let path = repo().join("runtime/tests/fixtures/tiny.plan.json");
    let fixture = Layer::from_plan_file(path, Weights::Random { seed: 9 }, CpuOptions::default())
        .unwrap_or_else(|e| panic!("{e}; regenerate the fixture with `{REGENERATE}`"));
    let inputs = fresh.random_inputs(9);
    let a = fresh.forward(&inputs).unwrap();
    let b = fixture.forward(&inputs).unwrap();
    assert_eq!(a.outputs, b.outputs);
    assert_eq!(a.stats, b.stats);
}

/// The full-size DeepSeek-V3 plan loaded through the embedding API is sized
/// before anything is allocated and refused with the figures, under an
/// explicit budget and under the machine's available memory alike, instead
/// of growing until the operating system kills the process.
#[test]
fn a_layer_too_large_for_its_budget_is_refused_before_allocating() {
    let file = repo().join("examples/deepseek_v3.moe");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let argv = ["moec", "build", file.to_str().unwrap(), "--emit", "json"];
    assert_eq!(moec::cli::run(argv, &mut out, &mut err, false), 0);
    let json = String::from_utf8(out).unwrap();
    let budget = CpuOptions {
        memory_budget: Some(8 << 30),
        ..CpuOptions::default()
    };
    let e = Layer::from_plan_json(&json, Weights::Random { seed: 0 }, budget).unwrap_err();
    assert!(matches!(e, moec_runtime::Error::Memory(_)), "{e}");
    let text = e.to_string();
    eprintln!("{text}");
    for part in [
        "64 ranks",
        "of activations",
        "of weights",
        "memory budget of 8.00 GiB",
        "shrink the layer",
    ] {
        assert!(text.contains(part), "`{part}` is not in: {text}");
    }
    if moec_runtime::footprint::mem_available().is_some() {
        let e = Layer::from_plan_json(&json, Weights::Random { seed: 0 }, CpuOptions::default())
            .unwrap_err();
        assert!(e.to_string().contains("this machine has available"), "{e}");
    }
    // The same plan's footprint, as `moec run` and the CPU backend count it.
    let plan = Plan::from_json(&json).unwrap();
    let need = moec_runtime::footprint::Footprint::of(&plan);
    assert!(need.total() > 8 << 30 && need.activations > 0 && need.weights > 0);
}
