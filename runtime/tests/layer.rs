//! The embedding API ([`Layer`]) on the checked-in plan of `examples/tiny.moe`
//! (`tests/fixtures/tiny.plan.json`; the `moec-tests` crate checks that it is
//! what the current compiler writes): outputs, determinism, the global
//! layout, and the error for each way loading or running can fail.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use moec_runtime::plan::PLAN_FORMAT_VERSION;
use moec_runtime::weights::{LayerWeights, WeightsError};
use moec_runtime::{CpuOptions, Error, Layer, Plan, PlanError, Weights};

const TINY: &str = include_str!("fixtures/tiny.plan.json");

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.plan.json")
}

fn tiny(weights: Weights) -> Layer {
    Layer::from_plan_json(TINY, weights, CpuOptions::default()).unwrap()
}

/// A fresh, empty directory for this test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moec-layer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "`{text}` does not mention `{p}`");
    }
}

#[test]
fn forward_gives_finite_outputs_of_the_right_shape() {
    let layer = tiny(Weights::Random { seed: 0 });
    assert_eq!(layer.ranks(), 4);
    assert_eq!(layer.tokens_per_rank(), 32);
    assert_eq!(layer.hidden(), 64);
    assert_eq!(layer.plan().layer.name, "tiny");
    let inputs = layer.random_inputs(1);
    assert_eq!(inputs.len(), 4);
    let forward = layer.forward(&inputs).unwrap();
    assert_eq!(forward.outputs.len(), 4);
    for y in &forward.outputs {
        assert_eq!(y.len(), 32 * 64);
        assert!(y.iter().all(|v| v.is_finite()));
        assert!(y.iter().any(|v| *v != 0.0), "an output is all zeros");
    }
    // Dropless top-2 over 8 experts: every assignment is routed.
    let stats = &forward.stats;
    assert_eq!(stats.routed_per_expert.len(), 8);
    assert_eq!(stats.assignments, 4 * 32 * 2);
    assert_eq!(
        stats.routed_per_expert.iter().sum::<u64>(),
        stats.assignments
    );
    assert_eq!(stats.dropped, 0);
    assert!(stats.imbalance() >= 1.0);
    assert!(forward.wall_seconds > 0.0);
}

#[test]
fn forward_is_deterministic() {
    let layer = tiny(Weights::Random { seed: 3 });
    let inputs = layer.random_inputs(4);
    let a = layer.forward(&inputs).unwrap();
    let b = layer.forward(&inputs).unwrap();
    assert_eq!(a.outputs, b.outputs);
    assert_eq!(a.stats, b.stats);
    // A second layer from the same plan and seed computes the same.
    let c = tiny(Weights::Random { seed: 3 }).forward(&inputs).unwrap();
    assert_eq!(a.outputs, c.outputs);
    // Other weights, other outputs.
    let d = tiny(Weights::Random { seed: 5 }).forward(&inputs).unwrap();
    assert_ne!(a.outputs, d.outputs);
}

#[test]
fn forward_global_is_forward_concatenated() {
    let layer = tiny(Weights::Random { seed: 0 });
    let inputs = layer.random_inputs(2);
    let per_rank = layer.forward(&inputs).unwrap();
    let global = layer.forward_global(&inputs.concat()).unwrap();
    assert_eq!(global, per_rank.outputs.concat());
}

#[test]
fn from_plan_file_and_from_plan_agree_with_from_plan_json() {
    let inputs = tiny(Weights::Random { seed: 0 }).random_inputs(0);
    let expected = tiny(Weights::Random { seed: 0 }).forward(&inputs).unwrap();
    let from_file = Layer::from_plan_file(
        fixture_path(),
        Weights::Random { seed: 0 },
        CpuOptions::default(),
    )
    .unwrap();
    assert_eq!(
        from_file.forward(&inputs).unwrap().outputs,
        expected.outputs
    );
    let plan = Plan::from_json(TINY).unwrap();
    let weights = LayerWeights::random(&plan.layer, 0);
    let given = Layer::from_plan(plan, Weights::Given(weights), CpuOptions::default()).unwrap();
    assert_eq!(given.forward(&inputs).unwrap().outputs, expected.outputs);
}

#[test]
fn wrong_input_shapes_are_errors() {
    let layer = tiny(Weights::Random { seed: 0 });
    let mut inputs = layer.random_inputs(0);
    inputs.pop();
    let err = layer.forward(&inputs).unwrap_err();
    assert!(matches!(err, Error::Exec(_)), "{err:?}");
    assert_mentions(&err.to_string(), &["3 input tensors for 4 ranks"]);

    let mut inputs = layer.random_inputs(0);
    inputs[2].truncate(100);
    let err = layer.forward(&inputs).unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["rank 2's input holds 100 values", "[32, 64] needs 2048"],
    );

    let err = layer.forward_global(&[0.0; 7]).unwrap_err();
    assert!(matches!(err, Error::Exec(_)), "{err:?}");
    assert_mentions(
        &err.to_string(),
        &[
            "global input holds 7 values",
            "[4 ranks x 32 tokens, 64] needs 8192",
        ],
    );
    let err = layer.forward_global(&[]).unwrap_err();
    assert_mentions(&err.to_string(), &["holds 0 values"]);
}

#[test]
fn non_finite_inputs_are_errors() {
    let layer = tiny(Weights::Random { seed: 0 });
    let mut inputs = layer.random_inputs(0);
    inputs[1][64 * 5 + 7] = f32::NAN;
    let err = layer.forward(&inputs).unwrap_err();
    assert!(matches!(err, Error::Exec(_)), "{err:?}");
    assert_mentions(
        &err.to_string(),
        &[
            "rank 1's input",
            "non-finite value NaN",
            "token 5, column 7",
        ],
    );
    let mut x = inputs.concat();
    x[1] = f32::INFINITY;
    x[2048 + 64 * 5 + 7] = 0.0;
    let err = layer.forward_global(&x).unwrap_err();
    assert_mentions(
        &err.to_string(),
        &["rank 0's input", "inf", "token 0, column 1"],
    );
}

#[test]
fn a_missing_plan_file_names_the_path() {
    let path = scratch("missing").join("no-such.plan.json");
    let err = Layer::from_plan_file(&path, Weights::Random { seed: 0 }, CpuOptions::default())
        .unwrap_err();
    match &err {
        Error::Io { path: p, source } => {
            assert_eq!(p, &path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert_mentions(&err.to_string(), &["no-such.plan.json"]);
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn a_file_that_is_not_a_plan_is_rejected_with_its_path() {
    let dir = scratch("corrupt");
    let other = format!("{{\"version\": {PLAN_FORMAT_VERSION}, \"weights\": []}}");
    for (name, text, parts) in [
        (
            "garbage.json",
            "this is not json",
            &["not a moec plan", "line 1"][..],
        ),
        ("empty.json", "", &["not a moec plan"][..]),
        (
            "other.json",
            other.as_str(),
            &["not a moec plan", "unknown field `weights`"][..],
        ),
        (
            "cut.json",
            &TINY[..TINY.len() / 2],
            &["not a moec plan", "EOF"][..],
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let err = Layer::from_plan_file(&path, Weights::Random { seed: 0 }, CpuOptions::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::Plan { path: Some(p), source } if p == &path && matches!(**source, PlanError::Json(_))),
            "{name}: {err:?}"
        );
        let text = err.to_string();
        assert_mentions(&text, &[name]);
        assert_mentions(&text, parts);
    }
    // Not UTF-8: an I/O error naming the file.
    let path = dir.join("binary.json");
    std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
    let err = Layer::from_plan_file(&path, Weights::Random { seed: 0 }, CpuOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_mentions(&err.to_string(), &["binary.json", "UTF-8"]);
}

#[test]
fn a_plan_of_another_format_version_says_to_rebuild() {
    let v = PLAN_FORMAT_VERSION;
    let newer = TINY.replacen(
        &format!("\"version\": {v},"),
        &format!("\"version\": {},", v + 1),
        1,
    );
    assert_ne!(newer, TINY, "the fixture's version field moved");
    // A newer format may also have fields this runtime does not know.
    let newer = newer.replacen("\"version\"", "\"future_field\": true, \"version\"", 1);
    let path = scratch("version").join("newer.plan.json");
    std::fs::write(&path, &newer).unwrap();
    let err = Layer::from_plan_file(&path, Weights::Random { seed: 0 }, CpuOptions::default())
        .unwrap_err();
    match &err {
        Error::Plan { source, .. } => assert_eq!(
            **source,
            PlanError::Version {
                found: v + 1,
                expected: v
            }
        ),
        other => panic!("expected a plan error, got {other:?}"),
    }
    let (found, reads) = (format!("version {}", v + 1), format!("reads version {v}"));
    assert_mentions(
        &err.to_string(),
        &["newer.plan.json", &found, &reads, "rebuild the plan"],
    );
}

#[test]
fn an_invalid_plan_value_is_rejected() {
    let mut plan = Plan::from_json(TINY).unwrap();
    plan.streams.clear();
    let err =
        Layer::from_plan(plan, Weights::Random { seed: 0 }, CpuOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Plan { path: None, source } if **source == PlanError::NoStreams),
        "{err:?}"
    );
    assert_mentions(&err.to_string(), &["invalid plan"]);
}

#[test]
fn weights_that_do_not_fit_are_rejected() {
    let plan = Plan::from_json(TINY).unwrap();
    let mut weights = LayerWeights::random(&plan.layer, 0);
    weights.experts.pop();
    let err =
        Layer::from_plan(plan.clone(), Weights::Given(weights), CpuOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Weights(WeightsError::Mismatch { .. })),
        "{err:?}"
    );
    assert_mentions(&err.to_string(), &["weights of layer `tiny`"]);

    let mut weights = LayerWeights::random(&plan.layer, 0);
    weights.router.truncate(10);
    let err = Layer::from_plan(plan, Weights::Given(weights), CpuOptions::default()).unwrap_err();
    assert_mentions(
        &err.to_string(),
        &[
            "weights of layer `tiny`",
            "mlp.gate.weight",
            "found 10 values",
        ],
    );
}

#[test]
fn weights_files_that_are_missing_or_corrupt_are_named() {
    let dir = scratch("weights");
    let missing = dir.join("absent.safetensors");
    let weights = Weights::File {
        path: missing.clone(),
        prefix: String::new(),
    };
    let err = Layer::from_plan_json(TINY, weights, CpuOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Weights(_)), "{err:?}");
    assert_mentions(&err.to_string(), &["absent.safetensors"]);

    let corrupt = dir.join("corrupt.safetensors");
    std::fs::write(&corrupt, b"not a safetensors file").unwrap();
    let weights = Weights::File {
        path: corrupt,
        prefix: "model.layers.0.".into(),
    };
    let err = Layer::from_plan_json(TINY, weights, CpuOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Weights(_)), "{err:?}");
    assert_mentions(&err.to_string(), &["corrupt.safetensors"]);
}

#[test]
fn errors_convert_with_the_question_mark() {
    fn load(json: &str) -> Result<Layer, Box<dyn std::error::Error>> {
        Ok(Layer::from_plan_json(
            json,
            Weights::Random { seed: 0 },
            CpuOptions::default(),
        )?)
    }
    fn parse(json: &str) -> Result<Plan, Error> {
        Ok(Plan::from_json(json)?)
    }
    assert!(load("{}").is_err());
    assert!(matches!(parse("[]"), Err(Error::Plan { path: None, .. })));
    let layer = load(TINY).unwrap();
    assert_mentions(&format!("{layer:?}"), &["tiny", "ranks: 4"]);
}

#[test]
fn error_is_small_enough_for_clippy() {
    // Applications return `Result<_, Error>`; clippy's `result_large_err`
    // fires from 128 bytes on, which would push every embedder to box it.
    assert!(
        std::mem::size_of::<Error>() < 128,
        "{}",
        std::mem::size_of::<Error>()
    );
}
