//! Property tests for plan files: a corrupted plan never makes the runtime
//! panic, and a corrupted plan that loads runs to the right answer or fails
//! with an error, never to a wrong answer.
//!
//! Every example's plan is compiled (full size, load only) and every example
//! is compiled shrunk (4 ranks, 32 tokens, hidden 64, f32) and run once on
//! the CPU for its reference output. Each case takes one plan's JSON and
//! applies one to three mutations (numbers set to 0, 1, huge, `u64::MAX`,
//! negative or off by one; fields deleted; booleans flipped; strings swapped
//! for other names the format uses; ops, waits and kernel constants deleted,
//! redirected or changed; buffer references, offsets and chunks changed;
//! shared experts added or removed), then:
//! - `Plan::from_json` must return (a panic fails the test);
//! - a small plan that loads is built into a [`Layer`] under a memory budget
//!   and run on the CPU; it must fail with an error or give exactly the
//!   unmutated output when the mutant's layer and mesh are the original's,
//!   or the independent reference's output for the mutant's own layer when
//!   they changed (a plan may be a different, consistent layer; it may not
//!   compute something its layer does not say).
//!
//! The counts are printed. The number of cases defaults to a value that
//! keeps this file to a few seconds in a debug build; set `MOEC_FUZZ_CASES`
//! for a longer run, e.g.
//! `MOEC_FUZZ_CASES=3000 cargo test -p moec-tests --release --test plan_fuzz -- --nocapture`.
//! Besides the random cases: systematic corruptions of every small example
//! (run always), and, on request (`-- --include-ignored`, minutes in a
//! release build), every buffer reference redirected to every buffer and
//! every single field of every small example changed.

#![allow(clippy::unwrap_used)]

use moec::compile::{compile, Options};
use moec::run::{apply, Overrides};
use moec_runtime::plan::OpKind;
use moec_runtime::weights::LayerWeights;
use moec_runtime::{CpuOptions, Layer, Plan, Weights};
use moec_tests::reference::{self, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

fn cases() -> u32 {
    std::env::var("MOEC_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(96)
}

const SEED: u64 = 7;

/// Most memory a mutant may hold when it runs.
const BUDGET: u64 = 2 << 30;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "examples missing: {files:?}");
    files
}

fn plan_of(path: &Path, overrides: &Overrides) -> Plan {
    plan_in(path, overrides, &Options::default())
}

fn plan_in(path: &Path, overrides: &Overrides, options: &Options) -> Plan {
    let source = std::fs::read_to_string(path).unwrap();
    let checked = moec_lang::check_source(&source);
    let (program, _) = checked.program.unwrap();
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    compile(&program, options).unwrap().plan
}

fn options() -> CpuOptions {
    CpuOptions {
        timeout: Duration::from_secs(20),
        memory_budget: Some(BUDGET),
        ..CpuOptions::default()
    }
}

/// A plan to mutate: its JSON, and for small plans the output it runs to.
struct Base {
    name: String,
    json: Value,
    plan: Plan,
    output: Option<Vec<Vec<f32>>>,
}

/// The plans every test here mutates, built once per process.
fn bases() -> &'static [Base] {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(build_bases)
}

fn build_bases() -> Vec<Base> {
    let mut out = Vec::new();
    for path in examples() {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let full = plan_of(&path, &Overrides::default());
        out.push(Base {
            name: name.clone(),
            json: serde_json::from_str(&full.to_json()).unwrap(),
            plan: full,
            output: None,
        });
        let shrunk = Overrides {
            ranks: Some(4),
            tokens: Some(32),
            dtype: Some(moec_lang::spec::DType::F32),
            hidden: Some(64),
            ffn: Some(32),
        };
        out.push(runnable(format!("{name} (small)"), plan_of(&path, &shrunk)));
        // gpt-oss dispatched by rank with the reducing combine: its GEMMs
        // go through the expansion index (`Gemm::by_rank`).
        if name == "gpt_oss_20b" {
            let options = Options {
                routing: Some(moec::cost::RoutingForm::DedupReduce),
                ..Options::default()
            };
            let plan = plan_in(&path, &shrunk, &options);
            let fused = plan
                .ops()
                .filter(|(_, op)| {
                    matches!(
                        op.kind,
                        OpKind::Gemm {
                            by_rank: Some(_),
                            ..
                        }
                    )
                })
                .count();
            assert!(
                fused >= 2,
                "{name}: {fused} GEMMs through the expansion index"
            );
            out.push(runnable(format!("{name} (small, by rank+reduce)"), plan));
        }
    }
    out
}

/// A small plan with the output it runs to.
fn runnable(name: String, plan: Plan) -> Base {
    let layer = Layer::from_plan(plan.clone(), Weights::Random { seed: SEED }, options())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let inputs = layer.random_inputs(SEED);
    let output = layer.forward(&inputs).unwrap().outputs;
    Base {
        name,
        json: serde_json::from_str(&plan.to_json()).unwrap(),
        plan,
        output: Some(output),
    }
}

// ------------------------------------------------------------ mutations

/// A path to a value in the JSON.
#[derive(Clone, Debug)]
enum Key {
    Field(String),
    Index(usize),
}

fn leaves(v: &Value, path: &mut Vec<Key>, out: &mut Vec<Vec<Key>>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                path.push(Key::Field(k.clone()));
                out.push(path.clone());
                leaves(child, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push(Key::Index(i));
                out.push(path.clone());
                leaves(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'v>(v: &'v mut Value, path: &[Key]) -> Option<&'v mut Value> {
    let mut cur = v;
    for k in path {
        cur = match (k, cur) {
            (Key::Field(f), Value::Object(m)) => m.get_mut(f)?,
            (Key::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Names the format uses, for string swaps.
const NAMES: &[&str] = &[
    "f32",
    "bf16",
    "f16",
    "fp8_e4m3",
    "i32",
    "u8",
    "softmax",
    "sigmoid",
    "all",
    "topk",
    "position",
    "probs",
    "input",
    "output",
    "scratch",
    "comm",
    "router",
    "permute",
    "dispatch",
    "experts",
    "combine",
    "unpermute",
    "shared",
    "compute",
    "flat",
    "hierarchical",
    "none",
    "activation",
    "router_gate",
    "expert_up",
    "expert_down",
    "shared_up",
    "shared_down",
    "all_to_all",
    "all_to_all_v",
    "count_exchange",
    "all_gather",
    "ep_group",
    "intra_node",
    "inter_node",
    "relu",
    "gelu",
    "router_fused",
    "permute_pack",
    "assign",
    "add",
];

/// A small deterministic generator (xorshift), seeded by the case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Every op of the plan JSON as (stream index, op index).
fn op_slots(plan: &Value) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    if let Some(streams) = plan["streams"].as_array() {
        for (s, stream) in streams.iter().enumerate() {
            let n = stream["ops"].as_array().map_or(0, Vec::len);
            out.extend((0..n).map(|i| (s, i)));
        }
    }
    out
}

fn op_mut(plan: &mut Value, (s, i): (usize, usize)) -> Option<&mut Value> {
    plan["streams"][s]["ops"].get_mut(i)
}

/// The kind object of an op (`{"launch": {...}}` -> the inner object).
fn op_kind(op: &mut Value) -> Option<(&str, &mut serde_json::Map<String, Value>)> {
    let (name, inner) = op.get_mut("kind")?.as_object_mut()?.iter_mut().next()?;
    Some((name.as_str(), inner.as_object_mut()?))
}

/// Applies one mutation chosen by `seed`; a description of it.
fn mutate(plan: &mut Value, seed: u64) -> String {
    let mut rng = Rng(seed | 1);
    let mut paths = Vec::new();
    leaves(plan, &mut Vec::new(), &mut paths);
    let ops = op_slots(plan);
    let buffers = plan["buffers"].as_array().map_or(0, Vec::len) as u64;
    let events = plan["events"].as_u64().unwrap_or(0);
    let path_text = |p: &[Key]| {
        p.iter()
            .map(|k| match k {
                Key::Field(f) => f.clone(),
                Key::Index(i) => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join(".")
    };
    match rng.below(14) {
        0 => {
            let numbers: Vec<&Vec<Key>> = paths
                .iter()
                .filter(|p| plan.pointer(&pointer(p)).is_some_and(Value::is_number))
                .collect();
            let Some(p) = numbers.get(rng.below(numbers.len())).cloned().cloned() else {
                return "nothing".into();
            };
            let old = plan
                .pointer(&pointer(&p))
                .and_then(Value::as_u64)
                .unwrap_or(1);
            let new: Value = match rng.below(10) {
                0 => 0.into(),
                1 => 1.into(),
                2 => 2.into(),
                3 => (-1).into(),
                4 => 1_000_000_000_000u64.into(),
                5 => u64::MAX.into(),
                6 => (1u64 << 40).into(),
                7 => old.saturating_add(1).into(),
                8 => old.saturating_sub(1).into(),
                _ => old.saturating_mul(2).into(),
            };
            let text = format!("{} = {new}", path_text(&p));
            if let Some(v) = at(plan, &p) {
                *v = new;
            }
            text
        }
        1 => {
            let Some(p) = paths.get(rng.below(paths.len())).cloned() else {
                return "nothing".into();
            };
            let Some((Key::Field(f), parent)) = p.split_last() else {
                return "nothing".into();
            };
            if let Some(Value::Object(m)) = at(plan, parent) {
                m.remove(f);
            }
            format!("delete {}", path_text(&p))
        }
        2 => {
            let bools: Vec<&Vec<Key>> = paths
                .iter()
                .filter(|p| plan.pointer(&pointer(p)).is_some_and(Value::is_boolean))
                .collect();
            let Some(p) = bools.get(rng.below(bools.len())).cloned().cloned() else {
                return "nothing".into();
            };
            if let Some(v) = at(plan, &p) {
                *v = Value::Bool(!v.as_bool().unwrap_or(false));
            }
            format!("flip {}", path_text(&p))
        }
        3 => {
            let strings: Vec<&Vec<Key>> = paths
                .iter()
                .filter(|p| plan.pointer(&pointer(p)).is_some_and(Value::is_string))
                .collect();
            let Some(p) = strings.get(rng.below(strings.len())).cloned().cloned() else {
                return "nothing".into();
            };
            let name = NAMES[rng.below(NAMES.len())];
            if let Some(v) = at(plan, &p) {
                *v = name.into();
            }
            format!("{} = {name:?}", path_text(&p))
        }
        4 => {
            let Some(&(s, i)) = ops.get(rng.below(ops.len())) else {
                return "nothing".into();
            };
            if let Some(list) = plan["streams"][s]["ops"].as_array_mut() {
                list.remove(i);
            }
            format!("delete op {i} of stream {s}")
        }
        5 | 6 => {
            let waits: Vec<(usize, usize)> = ops
                .iter()
                .copied()
                .filter(|&o| {
                    op_mut(plan, o)
                        .and_then(|op| op_kind(op).map(|(n, _)| n == "wait"))
                        .unwrap_or(false)
                })
                .collect();
            let Some(&w) = waits.get(rng.below(waits.len())) else {
                return "nothing".into();
            };
            if rng.below(2) == 0 {
                if let Some(list) = plan["streams"][w.0]["ops"].as_array_mut() {
                    list.remove(w.1);
                }
                format!("delete the wait at op {} of stream {}", w.1, w.0)
            } else {
                let e = rng.below(events.max(1) as usize);
                if let Some((_, k)) = op_mut(plan, w).and_then(op_kind) {
                    k.insert("event".into(), e.into());
                }
                format!("redirect the wait at op {} of stream {} to e{e}", w.1, w.0)
            }
        }
        7 => {
            let Some(&o) = ops.get(rng.below(ops.len())) else {
                return "nothing".into();
            };
            let b = if rng.below(8) == 0 {
                buffers + 1
            } else {
                rng.below(buffers as usize) as u64
            };
            let Some((name, k)) = op_mut(plan, o).and_then(op_kind) else {
                return "nothing".into();
            };
            let fields: Vec<&str> = match name {
                "launch" => vec!["inputs", "outputs"],
                "gemm" => vec!["a", "c"],
                "collective" => vec!["send", "recv"],
                _ => return "nothing".into(),
            };
            let f = fields[rng.below(fields.len())];
            match k.get_mut(f) {
                Some(Value::Array(list)) if !list.is_empty() => {
                    let i = rng.below(list.len());
                    list[i] = b.into();
                }
                Some(v @ Value::Number(_)) => *v = b.into(),
                _ => return "nothing".into(),
            }
            format!("op {} of stream {}: {f} -> b{b}", o.1, o.0)
        }
        8 => {
            let Some(&(s, i)) = ops.get(rng.below(ops.len())) else {
                return "nothing".into();
            };
            if let Some(list) = plan["streams"][s]["ops"].as_array_mut() {
                let j = rng.below(list.len());
                list.swap(i, j);
                return format!("swap ops {i} and {j} of stream {s}");
            }
            "nothing".into()
        }
        9 => {
            let kernels = plan["kernels"].as_array().map_or(0, Vec::len);
            if kernels == 0 {
                return "nothing".into();
            }
            let k = rng.below(kernels);
            let Some(list) = plan["kernels"][k]["constants"].as_array_mut() else {
                return "nothing".into();
            };
            if list.is_empty() {
                return "nothing".into();
            }
            let c = rng.below(list.len());
            let old = list[c][1].as_i64().unwrap_or(0);
            let new = match rng.below(4) {
                0 => old + 1,
                1 => old - 1,
                2 => 0,
                _ => 1,
            };
            list[c][1] = new.into();
            format!("kernel {k} constant {} = {new}", list[c][0])
        }
        10 => {
            if plan["layer"]["shared"].is_null() {
                plan["layer"]["shared"] = serde_json::json!({
                    "count": 1, "intermediate": 32, "ffn": "relu", "bias": false, "sigmoid_gate": false
                });
                "add shared experts".into()
            } else {
                plan["layer"]["shared"] = Value::Null;
                "remove shared experts".into()
            }
        }
        11 => {
            if buffers == 0 {
                return "nothing".into();
            }
            let (a, b) = (rng.below(buffers as usize), rng.below(buffers as usize));
            let offset = plan["buffers"][b]["offset"].clone();
            plan["buffers"][a]["offset"] = offset;
            format!("buffer {a} at buffer {b}'s offset")
        }
        12 => {
            let Some(&(s, i)) = ops.get(rng.below(ops.len())) else {
                return "nothing".into();
            };
            if let Some(list) = plan["streams"][s]["ops"].as_array_mut() {
                let op = list[i].clone();
                let j = rng.below(list.len() + 1);
                list.insert(j, op);
                return format!("copy op {i} of stream {s} to {j}");
            }
            "nothing".into()
        }
        _ => {
            let Some(&o) = ops.get(rng.below(ops.len())) else {
                return "nothing".into();
            };
            let chunk: Value = match rng.below(3) {
                0 => Value::Null,
                n => (n as u64 - 1).into(),
            };
            if let Some(op) = op_mut(plan, o) {
                op["chunk"] = chunk.clone();
            }
            format!("op {} of stream {}: chunk = {chunk}", o.1, o.0)
        }
    }
}

fn pointer(path: &[Key]) -> String {
    path.iter()
        .map(|k| match k {
            Key::Field(f) => format!("/{}", f.replace('~', "~0").replace('/', "~1")),
            Key::Index(i) => format!("/{i}"),
        })
        .collect()
}

// ------------------------------------------------------------- oracle

#[derive(Debug, Default)]
struct Counts {
    cases: u64,
    refused: u64,
    loaded: u64,
    ran_equal: u64,
    ran_error: u64,
    ran_different: u64,
    panicked: u64,
    failures: Vec<String>,
}

/// Largest difference relative to the largest reference value (absolute
/// when the reference is all zeros).
fn relative_error(got: &[Vec<f32>], want: &[Vec<f32>]) -> f64 {
    let mut diff = 0.0f64;
    let mut top = 0.0f64;
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        diff = diff.max(f64::from((g - w).abs()));
        top = top.max(f64::from(w.abs()));
    }
    if got.iter().map(Vec::len).sum::<usize>() != want.iter().map(Vec::len).sum::<usize>() {
        return f64::INFINITY;
    }
    diff / top.max(1e-6)
}

/// The reference output of `plan`'s own layer, on the inputs the run used.
fn reference_of(plan: &Plan, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, String> {
    let weights = LayerWeights::random(&plan.layer, SEED);
    let tensors: BTreeMap<String, Tensor> = weights
        .tensors()
        .into_iter()
        .map(|(n, shape, data)| (n, Tensor::new(shape, data.to_vec())))
        .collect();
    let ep = usize::try_from(plan.mesh.ep).map_err(|e| e.to_string())?;
    reference::forward(&plan.layer, ep, inputs, &tensors).map(|r| r.outputs)
}

/// Runs a mutant that loaded; `Err` describes a wrong answer.
fn run_mutant(base: &Base, plan: Plan, counts: &mut Counts) -> Result<(), String> {
    let Some(expected) = &base.output else {
        return Ok(());
    };
    let same_layer = plan.layer == base.plan.layer && plan.mesh == base.plan.mesh;
    let fp8 = plan.choices.dispatch_dtype == moec_runtime::plan::DType::Fp8E4m3;
    let layer = match Layer::from_plan(plan.clone(), Weights::Random { seed: SEED }, options()) {
        Ok(l) => l,
        Err(_) => {
            counts.ran_error += 1;
            return Ok(());
        }
    };
    let inputs = layer.random_inputs(SEED);
    let got = match layer.forward(&inputs) {
        Ok(f) => f.outputs,
        Err(_) => {
            counts.ran_error += 1;
            return Ok(());
        }
    };
    if same_layer {
        if &got == expected {
            counts.ran_equal += 1;
            return Ok(());
        }
        let err = relative_error(&got, expected);
        return Err(format!(
            "ran to a different output (relative error {err:e})"
        ));
    }
    let want = reference_of(&plan, &inputs)?;
    let err = relative_error(&got, &want);
    let bound = if fp8 { 0.08 } else { 1e-4 };
    if err < bound {
        counts.ran_equal += 1;
        Ok(())
    } else {
        Err(format!(
            "its layer changed and it ran to an output the reference does not give (relative error {err:e})"
        ))
    }
}

fn one_case(base: &Base, seeds: &[u64], counts: &Mutex<Counts>) {
    let mut json = base.json.clone();
    let what: Vec<String> = seeds.iter().map(|&s| mutate(&mut json, s)).collect();
    let what = format!("[{}] (seeds {seeds:?})", what.join("; "));
    check_mutant(base, &json, &what, counts);
}

/// Loads (and, for a small plan, runs) one mutant of `base`, counting the
/// outcome and recording a failure.
fn check_mutant(base: &Base, json: &Value, what: &str, counts: &Mutex<Counts>) {
    let text = json.to_string();
    let mut c = Counts::default();
    let outcome = catch_unwind(AssertUnwindSafe(|| match Plan::from_json(&text) {
        Err(_) => {
            c.refused += 1;
            Ok(())
        }
        Ok(plan) => {
            c.loaded += 1;
            run_mutant(base, plan, &mut c)
        }
    }));
    let mut all = counts.lock().unwrap_or_else(|p| p.into_inner());
    all.cases += 1;
    all.refused += c.refused;
    all.loaded += c.loaded;
    all.ran_equal += c.ran_equal;
    all.ran_error += c.ran_error;
    let problem = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            all.ran_different += 1;
            Some(e)
        }
        Err(p) => {
            all.panicked += 1;
            Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("?")
            ))
        }
    };
    if let Some(problem) = problem {
        all.failures
            .push(format!("{} with {what}: {problem}", base.name));
    }
}

#[test]
fn corrupted_plans_load_or_fail_cleanly_and_never_run_to_a_wrong_answer() {
    let bases = bases();
    let counts = Mutex::new(Counts::default());
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (0..bases.len(), prop::collection::vec(any::<u64>(), 1..4));
    runner
        .run(&strategy, |(b, seeds)| {
            one_case(&bases[b], &seeds, &counts);
            Ok(())
        })
        .unwrap();
    let c = counts.into_inner().unwrap();
    eprintln!(
        "plan fuzz: {} cases: {} refused, {} loaded ({} ran to the right output, {} failed with an error, {} ran to a different output), {} panicked",
        c.cases, c.refused, c.loaded, c.ran_equal, c.ran_error, c.ran_different, c.panicked
    );
    assert!(
        c.failures.is_empty(),
        "{} failing cases:\n{}",
        c.failures.len(),
        c.failures.join("\n")
    );
}

/// The kinds of corruption this fuzz target found running to a wrong answer
/// with the consistency and race checks switched off (a validator that
/// checks events and references, not what they order), applied to every
/// small example systematically: every wait deleted, every wait pointed at
/// the next event, every launch's first output pointed at the input, every
/// kernel constant off by one, shared experts added to or removed from the
/// layer alone, every router switch of the layer flipped. Each mutant must
/// be refused or run to the right answer; most are refused.
#[test]
fn corruptions_that_ran_to_wrong_answers_are_caught_in_every_example() {
    let counts = Mutex::new(Counts::default());
    for base in bases().iter().filter(|b| b.output.is_some()) {
        let ops = op_slots(&base.json);
        let events = base.json["events"].as_u64().unwrap_or(0);
        let mut mutants: Vec<(String, Value)> = Vec::new();
        for &o in &ops {
            let mut json = base.json.clone();
            let Some((kind, inner)) = op_mut(&mut json, o).and_then(op_kind) else {
                continue;
            };
            match kind {
                "wait" => {
                    let e = inner["event"].as_u64().unwrap_or(0);
                    inner.insert("event".into(), ((e + 1) % events.max(1)).into());
                    mutants.push((format!("wait at {o:?} pointed at the next event"), json));
                    let mut json = base.json.clone();
                    if let Some(list) = json["streams"][o.0]["ops"].as_array_mut() {
                        list.remove(o.1);
                    }
                    mutants.push((format!("wait at {o:?} deleted"), json));
                }
                "launch" => {
                    if let Some(Value::Array(out)) = inner.get_mut("outputs") {
                        if let Some(first) = out.first_mut() {
                            *first = 0.into();
                            mutants.push((format!("launch at {o:?} writes b0"), json));
                        }
                    }
                }
                _ => {}
            }
        }
        let kernels = base.json["kernels"].as_array().map_or(0, Vec::len);
        for k in 0..kernels {
            let n = base.json["kernels"][k]["constants"]
                .as_array()
                .map_or(0, Vec::len);
            for c in 0..n {
                let mut json = base.json.clone();
                let v = json["kernels"][k]["constants"][c][1].as_i64().unwrap_or(0);
                json["kernels"][k]["constants"][c][1] = (v + 1).into();
                mutants.push((format!("kernel {k} constant {c} + 1"), json));
            }
        }
        let mut json = base.json.clone();
        json["layer"]["shared"] = if json["layer"]["shared"].is_null() {
            serde_json::json!({
                "count": 1, "intermediate": 32, "ffn": "relu", "bias": false, "sigmoid_gate": false
            })
        } else {
            Value::Null
        };
        mutants.push((
            "shared experts added or removed in the layer alone".into(),
            json,
        ));
        for switch in ["selection_bias", "normalize"] {
            let mut json = base.json.clone();
            let v = json["layer"]["router"][switch].as_bool().unwrap_or(false);
            json["layer"]["router"][switch] = (!v).into();
            mutants.push((format!("layer.router.{switch} flipped"), json));
        }
        let mut json = base.json.clone();
        let scoring = if json["layer"]["router"]["scoring"] == "softmax" {
            "sigmoid"
        } else {
            "softmax"
        };
        json["layer"]["router"]["scoring"] = scoring.into();
        mutants.push(("layer.router.scoring flipped".into(), json));
        for (what, json) in &mutants {
            check_mutant(base, json, what, &counts);
        }
    }
    let c = counts.into_inner().unwrap();
    eprintln!(
        "systematic corruptions: {} mutants: {} refused, {} loaded ({} ran to the right output, {} failed with an error)",
        c.cases, c.refused, c.loaded, c.ran_equal, c.ran_error
    );
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
    assert!(
        c.refused * 10 >= c.cases * 9,
        "most should be refused: {c:?}"
    );
}

/// Every buffer reference of every op of every small example pointed at
/// every other buffer, each mutant loaded and run like the others: slow in
/// a debug build, so it runs on request
/// (`cargo test -p moec-tests --release --test plan_fuzz -- --ignored --nocapture`).
#[test]
#[ignore]
fn every_buffer_reference_redirected_anywhere() {
    let counts = Mutex::new(Counts::default());
    for base in bases().iter().filter(|b| b.output.is_some()) {
        let buffers = base.json["buffers"].as_array().map_or(0, Vec::len);
        for o in op_slots(&base.json) {
            let mut probe = base.json.clone();
            let Some((_, inner)) = op_mut(&mut probe, o).and_then(op_kind) else {
                continue;
            };
            let mut refs: Vec<(String, Option<usize>)> = Vec::new();
            for (field, v) in inner.iter() {
                match v {
                    Value::Array(list) if field == "inputs" || field == "outputs" => {
                        refs.extend((0..list.len()).map(|i| (field.clone(), Some(i))));
                    }
                    Value::Number(_) if ["a", "c", "send", "recv"].contains(&field.as_str()) => {
                        refs.push((field.clone(), None));
                    }
                    _ => {}
                }
            }
            for (field, index) in refs {
                for b in 0..buffers {
                    let mut json = base.json.clone();
                    let Some((_, inner)) = op_mut(&mut json, o).and_then(op_kind) else {
                        continue;
                    };
                    let slot = match (inner.get_mut(&field), index) {
                        (Some(Value::Array(list)), Some(i)) => &mut list[i],
                        (Some(v), None) => v,
                        _ => continue,
                    };
                    if slot.as_u64() == Some(b as u64) {
                        continue;
                    }
                    *slot = b.into();
                    let what = format!("op {o:?} {field}{index:?} -> b{b}");
                    check_mutant(base, &json, &what, &counts);
                }
            }
        }
    }
    let c = counts.into_inner().unwrap();
    eprintln!(
        "buffer redirects: {} mutants: {} refused, {} loaded ({} ran to the right output, {} failed with an error, {} ran to a different output), {} panicked",
        c.cases, c.refused, c.loaded, c.ran_equal, c.ran_error, c.ran_different, c.panicked
    );
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
}

/// Every single-field change of every small example: each number set to 0,
/// 1, one less, one more and twice itself; each boolean flipped; each string
/// replaced by every name the format uses; each op deleted; each op swapped
/// with the next on its stream. On request, like the test above.
#[test]
#[ignore]
fn every_single_field_changed() {
    let counts = Mutex::new(Counts::default());
    for base in bases().iter().filter(|b| b.output.is_some()) {
        let mut paths = Vec::new();
        leaves(&base.json, &mut Vec::new(), &mut paths);
        for p in &paths {
            let old = base
                .json
                .pointer(&pointer(p))
                .cloned()
                .unwrap_or(Value::Null);
            let news: Vec<Value> = match &old {
                Value::Number(n) => {
                    let v = n.as_u64().unwrap_or(1);
                    vec![
                        0.into(),
                        1.into(),
                        v.saturating_sub(1).into(),
                        v.saturating_add(1).into(),
                        v.saturating_mul(2).into(),
                    ]
                }
                Value::Bool(b) => vec![(!b).into()],
                Value::String(_) => NAMES.iter().map(|&n| n.into()).collect(),
                _ => Vec::new(),
            };
            for new in news {
                if new == old {
                    continue;
                }
                let mut json = base.json.clone();
                if let Some(v) = at(&mut json, p) {
                    *v = new.clone();
                }
                let what = format!("{} = {new}", pointer(p));
                check_mutant(base, &json, &what, &counts);
            }
        }
        for (s, i) in op_slots(&base.json) {
            let mut json = base.json.clone();
            if let Some(list) = json["streams"][s]["ops"].as_array_mut() {
                list.remove(i);
            }
            check_mutant(
                base,
                &json,
                &format!("op {i} of stream {s} deleted"),
                &counts,
            );
            let mut json = base.json.clone();
            if let Some(list) = json["streams"][s]["ops"].as_array_mut() {
                if i + 1 < list.len() {
                    list.swap(i, i + 1);
                    check_mutant(
                        base,
                        &json,
                        &format!("ops {i}, {} of stream {s} swapped", i + 1),
                        &counts,
                    );
                }
            }
        }
    }
    let c = counts.into_inner().unwrap();
    eprintln!(
        "single-field changes: {} mutants: {} refused, {} loaded ({} ran to the right output, {} failed with an error, {} ran to a different output), {} panicked",
        c.cases, c.refused, c.loaded, c.ran_equal, c.ran_error, c.ran_different, c.panicked
    );
    assert!(c.failures.is_empty(), "{}", c.failures.join("\n"));
}
