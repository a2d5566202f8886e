//! The `moec` command line, driven in-process through `moec::cli::run`:
//! exit codes (0 ok, 1 rejected, 2 usage), what goes to stdout and stderr,
//! and the effect of each subcommand on files.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The outcome of one CLI run.
struct Run {
    code: i32,
    out: String,
    err: String,
}

fn moec_tty(args: &[&str], stderr_is_tty: bool) -> Run {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let argv: Vec<&str> = std::iter::once("moec")
        .chain(args.iter().copied())
        .collect();
    let code = moec::cli::run(argv, &mut out, &mut err, stderr_is_tty);
    Run {
        code,
        out: String::from_utf8(out).expect("stdout is UTF-8"),
        err: String::from_utf8(err).expect("stderr is UTF-8"),
    }
}

fn moec(args: &[&str]) -> Run {
    moec_tty(args, false)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

fn example(name: &str) -> String {
    path_str(&repo().join("examples").join(name))
}

fn corpus(name: &str) -> String {
    path_str(&repo().join("tests/diagnostics").join(name))
}

fn config(name: &str) -> String {
    path_str(&repo().join("tests/configs").join(name))
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("a UTF-8 path").to_string()
}

/// A fresh path in the system temp directory; the file is removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str, ext: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("moec-cli-test-{}-{n}-{tag}.{ext}", std::process::id());
        let path = std::env::temp_dir().join(name);
        let _ = std::fs::remove_file(&path);
        TempFile(path)
    }

    fn with(tag: &str, ext: &str, contents: &str) -> TempFile {
        let f = TempFile::new(tag, ext);
        std::fs::write(&f.0, contents).expect("the temp directory is writable");
        f
    }

    fn path(&self) -> String {
        path_str(&self.0)
    }

    fn read(&self) -> String {
        std::fs::read_to_string(&self.0).expect("the temp file is readable")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn has_ansi(s: &str) -> bool {
    s.contains('\u{1b}')
}

// ------------------------------------------------------------------ check

#[test]
fn check_example_is_ok() {
    let path = example("mixtral_8x7b.moe");
    let r = moec(&["check", &path]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains(&path), "{}", r.out);
    assert!(r.out.contains("ok"), "{}", r.out);
    assert!(r.out.contains("mixtral_8x7b"), "{}", r.out);
    assert!(r.err.is_empty(), "{}", r.err);
}

#[test]
fn check_every_example_is_ok() {
    let dir = repo().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "moe") {
            n += 1;
            let r = moec(&["check", &path_str(&path)]);
            assert_eq!(r.code, 0, "{}: {}", path.display(), r.err);
            assert!(r.err.is_empty(), "{}: {}", path.display(), r.err);
        }
    }
    assert!(n >= 8, "only {n} examples");
}

/// A layer that does not fit its device: `check`, `build` and `explain`
/// refuse it (exit 1) with the figures and the flag that goes on anyway;
/// with `--allow-oversize` they succeed and warn. `check` shows a fitting
/// layer's footprint on its ok line.
#[test]
fn a_plan_that_does_not_fit_the_device_is_refused_unless_allowed() {
    let tiny = std::fs::read_to_string(repo().join("examples/tiny.moe")).unwrap();
    let ok = moec(&["check", &example("tiny.moe")]);
    assert!(
        ok.out.contains("per rank of the H100's 80 GB"),
        "{}",
        ok.out
    );
    let small = TempFile::with(
        "oversize",
        "moe",
        &tiny.replace("device = H100", "device = H100 { memory = 100 KB }"),
    );
    for cmd in ["check", "build", "explain"] {
        let r = moec(&[cmd, &small.path()]);
        assert_eq!(r.code, 1, "{cmd}: {}", r.err);
        for part in ["per rank", "more than the", "--allow-oversize"] {
            assert!(r.err.contains(part), "{cmd}: `{part}` is not in: {}", r.err);
        }
        let r = moec(&[cmd, "--allow-oversize", &small.path()]);
        assert_eq!(r.code, 0, "{cmd} --allow-oversize: {}", r.err);
        assert!(r.err.contains("warning"), "{cmd}: {}", r.err);
    }
}

/// `moec run --stats-out` writes the pass's routing as a statistics file
/// that `moec simulate --stats` reads: the file's tokens per expert are the
/// run's, perfectly even loads (without the per-token routing) predict
/// exactly what uniform routing does, a skewed load predicts a slower layer
/// and says how skewed, and a file of another layer is refused.
#[test]
fn routing_statistics_from_a_run_drive_the_simulator() {
    let stats = TempFile::new("stats", "json");
    let r = moec(&["run", &example("tiny.moe"), "--stats-out", &stats.path()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(
        r.out.contains("stats: 128 tokens' routing written"),
        "{}",
        r.out
    );
    let file = moec_runtime::stats::RoutingStatistics::load(&stats.0).unwrap();
    assert_eq!(file.tokens, 128);
    assert_eq!(file.tokens_per_expert.iter().sum::<u64>(), 256);
    let line = r
        .out
        .lines()
        .find(|l| l.starts_with("tokens per expert:"))
        .unwrap();
    for (e, n) in file.tokens_per_expert.iter().enumerate() {
        assert!(line.contains(&format!(" {e}:{n}")), "{line}");
    }

    let predicted = |args: &[&str]| -> f64 {
        let r = moec(args);
        assert_eq!(r.code, 0, "{}", r.err);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        v["total_us"].as_f64().unwrap()
    };
    let mixtral = example("mixtral_8x7b.moe");
    let uniform = predicted(&["simulate", "--json", &mixtral]);
    let stats_of = |per: [u64; 8]| {
        let tokens = per.iter().sum::<u64>() / 2;
        let text = serde_json::json!({
            "format": "moec-routing-stats", "version": 1, "experts": 8, "top_k": 2,
            "tokens": tokens, "tokens_per_expert": per,
            "coactivation": vec![vec![0u64; 8]; 8],
        });
        TempFile::with("stats", "json", &text.to_string())
    };
    let even = stats_of([1000; 8]);
    assert_eq!(
        predicted(&["simulate", "--json", "--stats", &even.path(), &mixtral]),
        uniform
    );
    let skewed = stats_of([4000, 1000, 1000, 500, 500, 500, 300, 200]);
    let slow = predicted(&["simulate", "--json", "--stats", &skewed.path(), &mixtral]);
    assert!(
        slow > 1.5 * uniform,
        "{slow} us skewed against {uniform} us uniform"
    );
    let r = moec(&["simulate", "--stats", &skewed.path(), &mixtral]);
    assert!(
        r.out
            .contains("the busiest EP rank gets 4.00x the mean load"),
        "{}",
        r.out
    );
    let r = moec(&[
        "simulate",
        "--stats",
        &stats.path(),
        &example("qwen3_30b_a3b.moe"),
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.err
            .contains("of 8 experts, top-2; the layer has 128 experts, top-8"),
        "{}",
        r.err
    );
}

/// `schedule { headroom = ... }`: a factor below 1 and an unknown word are
/// errors with the field's name; `worst_case` and a factor check.
#[test]
fn headroom_is_checked() {
    let tiny = std::fs::read_to_string(repo().join("examples/tiny.moe")).unwrap();
    for (value, code, part) in [
        ("0.5", 1, "`headroom` must be at least 1"),
        (
            "fast",
            1,
            "`headroom` must be `auto`, `worst_case` or a number",
        ),
        ("\"2\"", 1, "`headroom` must be a number"),
        ("worst_case", 0, ""),
        ("1.5", 0, ""),
    ] {
        let f = TempFile::with(
            "headroom",
            "moe",
            &format!("{tiny}\nschedule {{\n    headroom = {value}\n}}\n"),
        );
        let r = moec(&["check", &f.path()]);
        assert_eq!(r.code, code, "headroom = {value}: {}", r.err);
        assert!(r.err.contains(part), "headroom = {value}: {}", r.err);
    }
}

#[test]
fn check_broken_file_reports_with_location() {
    let path = corpus("e0301_top_k_larger_than_experts.moe");
    let r = moec(&["check", &path]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains(&format!("{path}:15:9")), "{}", r.err);
    assert!(r.err.contains("error[E0301]"), "{}", r.err);
    assert!(r.err.contains("1 error(s)"), "{}", r.err);
    assert!(!has_ansi(&r.err), "no colour when stderr is not a terminal");
    assert!(!r.out.contains("ok"), "{}", r.out);
}

#[test]
fn check_warning_only_file_passes_and_shows_the_warning() {
    let path = corpus("w0001_inter_node_on_one_node.moe");
    let r = moec(&["check", &path]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("warning[W0001]"), "{}", r.err);
    assert!(r.out.contains("ok"), "{}", r.out);
}

#[test]
fn check_reports_every_error_of_a_file() {
    let path = corpus("many_semantic_errors.moe");
    let r = moec(&["check", &path]);
    assert_eq!(r.code, 1);
    let reported = r.err.matches("error[E").count();
    assert!(reported >= 10, "{}", r.err);
    assert!(r.err.contains(&format!("{reported} error(s)")), "{}", r.err);
}

#[test]
fn check_missing_file_is_a_usage_error() {
    let missing = path_str(&std::env::temp_dir().join("moec-cli-test-no-such-file.moe"));
    let r = moec(&["check", &missing]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("cannot read"), "{}", r.err);
    assert!(r.err.contains(&missing), "{}", r.err);
}

#[test]
fn check_several_files_reports_all_and_fails_if_any_fails() {
    let good = example("tiny.moe");
    let bad1 = corpus("e0402_ep_does_not_divide_experts.moe");
    let good2 = example("deepseek_v3.moe");
    let bad2 = corpus("e0101_unknown_device.moe");
    let r = moec(&["check", &good, &bad1, &good2, &bad2]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.out.contains(&format!("{good}: ok")), "{}", r.out);
    assert!(r.out.contains(&format!("{good2}: ok")), "{}", r.out);
    assert!(r.err.contains("error[E0402]"), "{}", r.err);
    assert!(r.err.contains("error[E0101]"), "{}", r.err);
    assert!(r.err.contains(&format!("{bad1}: 1 error(s)")), "{}", r.err);
    assert!(r.err.contains(&format!("{bad2}: 1 error(s)")), "{}", r.err);
}

#[test]
fn check_all_good_files_exit_0() {
    let r = moec(&[
        "check",
        &example("tiny.moe"),
        &example("mixtral_8x7b.moe"),
        &example("switch_base_128.moe"),
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out.lines().count(), 3, "{}", r.out);
}

#[test]
fn check_unreadable_file_among_others_is_exit_2_and_still_checks_the_rest() {
    let missing = path_str(&std::env::temp_dir().join("moec-cli-test-missing-among.moe"));
    let bad = corpus("e0301_top_k_larger_than_experts.moe");
    let good = example("tiny.moe");
    let r = moec(&["check", &missing, &bad, &good]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("cannot read"), "{}", r.err);
    assert!(r.err.contains("E0301"), "{}", r.err);
    assert!(r.out.contains(&format!("{good}: ok")), "{}", r.out);
}

#[test]
fn colour_follows_the_terminal_and_the_flag() {
    let bad = corpus("e0301_top_k_larger_than_experts.moe");
    assert!(has_ansi(&moec_tty(&["check", &bad], true).err));
    assert!(!has_ansi(&moec_tty(&["check", &bad], false).err));
    assert!(!has_ansi(
        &moec_tty(&["--color", "never", "check", &bad], true).err
    ));
    assert!(has_ansi(
        &moec_tty(&["check", "--color", "always", &bad], false).err
    ));
}

// ------------------------------------------------------------------ usage

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["frobnicate"][..],
        &["check"][..],
        &["check", "--bogus", "x.moe"][..],
        &["fmt"][..],
        &["fmt", "-w", "--check", "x.moe"][..],
        &["build"][..],
        &["import"][..],
        &["import", "x.json", "--nodes", "many"][..],
        &["--color", "purple", "check", "x.moe"][..],
    ] {
        let r = moec(args);
        assert_eq!(r.code, 2, "moec {args:?}: {}{}", r.out, r.err);
        assert!(!r.err.is_empty(), "moec {args:?} says nothing");
    }
}

#[test]
fn help_and_version_exit_0() {
    let r = moec(&["--help"]);
    assert_eq!(r.code, 0, "{}", r.err);
    for cmd in ["check", "fmt", "import", "build"] {
        assert!(
            r.out.contains(cmd),
            "--help does not mention {cmd}: {}",
            r.out
        );
    }
    let r = moec(&["check", "--help"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("Usage"), "{}", r.out);
    let r = moec(&["--version"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.contains("moec"), "{}", r.out);
}

// ------------------------------------------------------------------ build

#[test]
fn build_emit_layer_prints_the_validated_layer() {
    let path = example("deepseek_v3.moe");
    let r = moec(&["build", &path, "--emit", "layer"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let source = std::fs::read_to_string(&path).unwrap();
    let (program, derived) = moec_lang::check_source(&source).program.unwrap();
    assert_eq!(r.out, format!("{program}{derived}"));
    assert!(r.out.contains("deepseek_v3"), "{}", r.out);
    assert!(r.err.is_empty(), "{}", r.err);
}

#[test]
fn build_prints_the_plan() {
    let path = example("deepseek_v3.moe");
    let r = moec(&["build", &path]);
    assert_eq!(r.code, 0, "{}", r.err);
    let source = std::fs::read_to_string(&path).unwrap();
    let (program, _) = moec_lang::check_source(&source).program.unwrap();
    let compiled = moec::compile::compile(&program, &Default::default()).unwrap();
    assert_eq!(r.out, compiled.plan.to_string());
    assert!(r.out.contains("deepseek_v3"), "{}", r.out);
    assert!(r.err.is_empty(), "{}", r.err);
}

#[test]
fn build_emits_json_that_loads() {
    let r = moec(&["build", &example("mixtral_8x7b.moe"), "--emit", "json"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let plan = moec_runtime::Plan::from_json(&r.out).unwrap();
    assert_eq!(plan.layer.name, "mixtral_8x7b");
}

#[test]
fn build_emits_a_trace_and_a_gantt_chart() {
    let r = moec(&["build", &example("deepseek_v3.moe"), "--emit", "trace"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let trace: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["ph"] == "X" && e["cat"] == "dispatch"));
    let dir = std::env::temp_dir().join(format!("moec-cli-svg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("plan.svg");
    let r = moec(&[
        "build",
        &example("deepseek_v3.moe"),
        "--emit",
        "svg",
        "-o",
        &path_str(&out),
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.is_empty(), "{}", r.out);
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..100]
    );
    assert!(svg.contains("no-overlap baseline"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn explain_says_which_rules_fired_and_compares_with_the_baseline() {
    let r = moec(&["explain", &example("deepseek_v3.moe")]);
    assert_eq!(r.code, 0, "{}", r.err);
    for needle in [
        "hierarchical_a2a",
        "fp8_dispatch",
        "baseline",
        "<- chosen",
        "e-graph of",
        "exposed",
    ] {
        assert!(r.out.contains(needle), "missing {needle}:\n{}", r.out);
    }
}

#[test]
fn simulate_json_has_total_and_phases() {
    let r = moec(&[
        "simulate",
        &example("qwen3_30b_a3b.moe"),
        "--json",
        "--tokens",
        "1024",
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert!(v["total_us"].as_f64().unwrap() > 0.0);
    assert_eq!(v["tokens_per_rank"], 1024);
    assert!(v["baseline_total_us"].as_f64().unwrap() >= v["total_us"].as_f64().unwrap());
    let phases = v["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for name in ["router", "dispatch", "experts", "combine"] {
        assert!(names.contains(&name), "{names:?}");
    }
    for p in phases {
        assert!(p["time_us"].as_f64().unwrap() >= p["exposed_us"].as_f64().unwrap() - 1e-6);
        assert!(p["bytes"].as_u64().is_some());
    }
}

#[test]
fn simulate_rejects_zero_tokens() {
    let r = moec(&["simulate", &example("tiny.moe"), "--tokens", "0"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("--tokens"), "{}", r.err);
}

#[test]
fn build_rejects_a_broken_file() {
    let path = corpus("e0406_etp_does_not_divide_intermediate.moe");
    let r = moec(&["build", &path]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.out.is_empty(), "{}", r.out);
    assert!(r.err.contains("error[E0406]"), "{}", r.err);
    assert!(r.err.contains(&format!("{path}:")), "{}", r.err);
}

#[test]
fn build_missing_file_is_a_usage_error() {
    let missing = path_str(&std::env::temp_dir().join("moec-cli-test-no-build.moe"));
    assert_eq!(moec(&["build", &missing]).code, 2);
}

// -------------------------------------------------------------------- fmt

/// Valid, but not in canonical form: odd indentation, spacing and blank lines.
const MESSY: &str = "// A valid layer, badly laid out.\nlet  E=8\nlayer   messy{\nhidden=64 tokens_per_rank = 32\n\n\n\n   experts {count=E,ffn=swiglu\n intermediate=2*64}\n      router{scoring=softmax top_k=2}\n}\nmesh{gpus_per_node=4 device=H100 ep=4}\n";

#[test]
fn fmt_check_accepts_an_example() {
    let r = moec(&["fmt", "--check", &example("mixtral_8x7b.moe")]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.is_empty(), "{}", r.out);
}

#[test]
fn fmt_prints_an_example_unchanged() {
    let path = example("gpt_oss_20b.moe");
    let r = moec(&["fmt", &path]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, std::fs::read_to_string(&path).unwrap());
}

#[test]
fn fmt_check_rejects_a_messy_file() {
    let f = TempFile::with("messy-check", "moe", MESSY);
    let r = moec(&["fmt", "--check", &f.path()]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.err.contains("canonical"), "{}", r.err);
    assert_eq!(f.read(), MESSY, "--check never writes");
}

#[test]
fn fmt_write_then_check_passes() {
    let f = TempFile::with("messy-write", "moe", MESSY);
    let before = moec_lang::check_source(MESSY).program.unwrap();
    let r = moec(&["fmt", "-w", &f.path()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.is_empty(), "-w prints nothing: {}", r.out);
    let written = f.read();
    assert_ne!(written, MESSY);
    assert!(
        written.contains("// A valid layer, badly laid out."),
        "{written}"
    );
    let r = moec(&["fmt", "--check", &f.path()]);
    assert_eq!(r.code, 0, "{}\n{written}", r.err);
    let after = moec_lang::check_source(&written).program.unwrap();
    assert_eq!(before, after, "formatting changed the layer");
    // --write is the long form of -w.
    let r = moec(&["fmt", "--write", &f.path()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(f.read(), written);
}

#[test]
fn fmt_refuses_a_file_with_syntax_errors() {
    let path = corpus("many_syntax_errors.moe");
    let r = moec(&["fmt", &path]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert!(r.out.is_empty(), "{}", r.out);
    assert!(r.err.contains("error[E0002]"), "{}", r.err);
    let f = TempFile::with("syntax", "moe", "layer x {\n hidden = = 3\n}\n");
    let r = moec(&["fmt", "-w", &f.path()]);
    assert_eq!(r.code, 1, "{}", r.err);
    assert_eq!(
        f.read(),
        "layer x {\n hidden = = 3\n}\n",
        "a broken file is left alone"
    );
}

#[test]
fn fmt_missing_file_is_a_usage_error() {
    let missing = path_str(&std::env::temp_dir().join("moec-cli-test-no-fmt.moe"));
    assert_eq!(moec(&["fmt", "--check", &missing]).code, 2);
}

// ----------------------------------------------------------------- import

#[test]
fn import_mixtral_gives_a_valid_layer() {
    let r = moec(&["import", &config("mixtral_8x7b.json")]);
    assert_eq!(r.code, 0, "{}", r.err);
    let checked = moec_lang::check_source(&r.out);
    assert!(
        !checked.has_errors(),
        "{}\n{}",
        r.out,
        moec_lang::render("imported.moe", &r.out, &checked.diagnostics, false)
    );
    let (program, _) = checked.program.unwrap();
    assert_eq!(program.layer.experts.count, 8);
    assert_eq!(program.layer.router.top_k, 2);
    assert_eq!(program.layer.hidden, 4096);
    assert_eq!(program.layer.experts.intermediate, 14336);
}

#[test]
fn import_output_is_in_canonical_form() {
    let r = moec(&["import", &config("mixtral_8x7b.json")]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(moec_lang::format_source(&r.out).unwrap(), r.out);
}

#[test]
fn import_mesh_options_reach_the_layer() {
    let r = moec(&[
        "import",
        &config("mixtral_8x7b.json"),
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--device",
        "H200",
        "--ep",
        "8",
        "--tokens-per-rank",
        "1024",
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    let checked = moec_lang::check_source(&r.out);
    let (program, derived) = checked.program.unwrap();
    assert_eq!(program.mesh.nodes, 2);
    assert_eq!(program.mesh.gpus_per_node, 4);
    assert_eq!(program.mesh.ep, 8);
    assert_eq!(program.mesh.device.name, "H200");
    assert_eq!(program.layer.tokens_per_rank, 1024);
    assert_eq!(derived.world_size, 8);
}

#[test]
fn import_dense_model_is_rejected() {
    let r = moec(&["import", &config("llama_dense.json")]);
    assert_eq!(r.code, 1, "{}{}", r.out, r.err);
    assert!(r.out.is_empty(), "{}", r.out);
    let err = r.err.to_lowercase();
    assert!(
        err.contains("not a mixture-of-experts") || err.contains("not an moe"),
        "{}",
        r.err
    );
}

#[test]
fn import_to_a_file() {
    let f = TempFile::new("import", "moe");
    let r = moec(&["import", &config("mixtral_8x7b.json"), "-o", &f.path()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.out.is_empty(), "-o writes nothing to stdout: {}", r.out);
    assert!(r.err.contains(&f.path()), "{}", r.err);
    let written = f.read();
    let direct = moec(&["import", &config("mixtral_8x7b.json")]);
    assert_eq!(written, direct.out);
    let r = moec(&["check", &f.path()]);
    assert_eq!(r.code, 0, "{}", r.err);
    // --output is the long form.
    let g = TempFile::new("import-long", "moe");
    let r = moec(&[
        "import",
        &config("mixtral_8x7b.json"),
        "--output",
        &g.path(),
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(g.read(), written);
}

#[test]
fn import_of_bad_input_is_rejected_not_a_panic() {
    for (tag, json) in [
        ("not-json", "this is not json"),
        ("empty-object", "{}"),
        ("array", "[1, 2, 3]"),
        (
            "wrong-types",
            r#"{"model_type": "mixtral", "num_local_experts": "eight"}"#,
        ),
    ] {
        let f = TempFile::with(tag, "json", json);
        let r = moec(&["import", &f.path()]);
        assert_eq!(r.code, 1, "{tag}: {}{}", r.out, r.err);
        assert!(r.err.contains("error"), "{tag}: {}", r.err);
    }
}

#[test]
fn import_missing_config_is_a_usage_error() {
    let missing = path_str(&std::env::temp_dir().join("moec-cli-test-no-config.json"));
    let r = moec(&["import", &missing]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("cannot read"), "{}", r.err);
}

#[test]
fn run_tiny_prints_phases_routing_and_survives_shuffles() {
    let r = moec(&["run", &example("tiny.moe"), "--shuffle", "3"]);
    assert_eq!(r.code, 0, "{}", r.err);
    for part in [
        "layer tiny on 4 rank(s)",
        "router",
        "dispatch",
        "experts",
        "combine",
        "tokens per expert: 0:",
        "dropped: 0 of 256 assignments",
        "load imbalance (max/mean):",
        "shuffle: 3 random interleavings gave identical outputs",
    ] {
        assert!(r.out.contains(part), "`{part}` missing from:\n{}", r.out);
    }
}

#[test]
fn run_save_writes_safetensors_and_config_with_the_listed_keys() {
    let dir = TempFile::new("run-save", "d");
    let r = moec(&[
        "run",
        &example("gpt_oss_20b.moe"),
        "--hidden",
        "32",
        "--ffn",
        "16",
        "--tokens",
        "8",
        "--ranks",
        "2",
        "--save",
        &dir.path(),
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("config.json")).unwrap()).unwrap();
    for key in [
        "hidden_size",
        "moe_intermediate_size",
        "num_experts",
        "num_experts_per_tok",
        "scoring_func",
        "softmax_over",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "routed_scaling_factor",
        "router_weight_on",
        "expert_act",
        "swiglu_limit",
        "n_shared_experts",
        "shared_expert_intermediate_size",
        "capacity_factor",
        "drop_policy",
        "ranks",
        "tokens_per_rank",
    ] {
        assert!(config.get(key).is_some(), "config.json lacks `{key}`");
    }
    assert_eq!(config["hidden_size"], 32);
    assert_eq!(config["ranks"], 2);
    assert_eq!(config["swiglu_limit"], 7.0);
    let stats =
        moec_runtime::stats::RoutingStatistics::load(&dir.0.join("routing-stats.json")).unwrap();
    assert_eq!((stats.tokens, stats.top_k), (16, 4));
    let run = moec_runtime::weights::load_run(&dir.0).unwrap();
    assert_eq!(run.inputs.len(), 2);
    assert_eq!(run.outputs[1].len(), 8 * 32);
    assert!(run.weights.experts[0].gate_bias.is_some());
    let _ = std::fs::remove_dir_all(&dir.0);
}

#[test]
fn run_rejects_a_missing_weights_file_and_bad_ranks() {
    let r = moec(&[
        "run",
        &example("tiny.moe"),
        "--weights",
        "/nonexistent.safetensors",
    ]);
    // An unreadable file is a usage error, as the README says.
    assert_eq!(r.code, 2, "{}", r.out);
    assert!(r.err.contains("nonexistent.safetensors"), "{}", r.err);
    let r = moec(&["run", &example("tiny.moe"), "--ranks", "3"]);
    assert_eq!(r.code, 2);
    assert!(r.err.contains("does not divide the 8 experts"), "{}", r.err);
}

/// `moec run` sizes weights and activations before it allocates either: a
/// layer whose weights alone exceed the limit is refused with the figures.
#[test]
fn run_refuses_weights_too_large_for_the_process_before_allocating() {
    let r = moec(&["run", &example("tiny.moe"), "--hidden", "1000000"]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("of weights"), "{}", r.err);
    assert!(r.err.contains("--hidden"), "{}", r.err);
}

/// `--allow-non-finite` downgrades the CPU backend's non-finite output error
/// to a warning; the CUDA backend does not take it (a usage error).
#[test]
fn allow_non_finite_is_the_cpu_backends() {
    let r = moec(&["run", &example("tiny.moe"), "--allow-non-finite"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(!r.err.contains("warning"), "{}", r.err);
    let r = moec(&[
        "run",
        &example("tiny.moe"),
        "--backend",
        "cuda",
        "--allow-non-finite",
    ]);
    assert_eq!(r.code, 2, "{}", r.err);
    assert!(r.err.contains("--allow-non-finite"), "{}", r.err);
}
