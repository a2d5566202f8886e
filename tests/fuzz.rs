//! Property tests: no input makes the front end panic or hang.
//!
//! Three generators feed `check_source`, `format_source` and `render`:
//! (a) random bytes, (b) random sequences of real tokens, (c) random
//! mutations of the example files. Every call must finish within
//! [`TIME_LIMIT`]. The number of cases per property defaults to a value that
//! keeps this file well under 20 s in a debug build; set `MOEC_FUZZ_CASES`
//! for a longer run, e.g. `MOEC_FUZZ_CASES=20000 cargo test -p moec-tests --release --test fuzz`.

#![allow(clippy::unwrap_used)]

use moec_lang::{check_source, format_source, render};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The longest any one step may take on one input, in a debug build. This is
/// a guard against hangs and quadratic blow-ups (which take minutes on these
/// inputs), not a benchmark: it is generous so a loaded CI machine passes.
const TIME_LIMIT: Duration = Duration::from_secs(15);

fn cases() -> u32 {
    std::env::var("MOEC_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Failures are shrunk and printed; do not write regression files into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `f`, failing the test if it takes longer than [`TIME_LIMIT`].
fn timed<T>(what: &str, source: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = f();
    let took = start.elapsed();
    assert!(
        took < TIME_LIMIT,
        "{what} took {took:?} on an input of {} bytes: {:?}",
        source.len(),
        source.chars().take(300).collect::<String>()
    );
    value
}

/// Everything the front end does with a source text. Panics (failing the
/// property) if a step panics, is too slow, or the results disagree.
fn exercise(source: &str) {
    let checked = timed("check_source", source, || check_source(source));
    let text = timed("render", source, || {
        render("fuzz.moe", source, &checked.diagnostics, false)
    });
    assert!(
        !text.contains("location unavailable"),
        "a diagnostic points outside the file:\n{text}"
    );
    // The coloured path is separate code; a few diagnostics exercise it.
    let some = &checked.diagnostics[..checked.diagnostics.len().min(16)];
    timed("render (colour)", source, || {
        render("fuzz.moe", source, some, true)
    });
    if checked.program.is_some() {
        assert!(!checked.has_errors());
    }
    let formatted = timed("format_source", source, || format_source(source));
    if let Ok(formatted) = formatted {
        // What the formatter accepts, it accepts again, unchanged, and the
        // meaning does not change.
        let again = timed("format_source (again)", &formatted, || {
            format_source(&formatted)
        });
        assert_eq!(
            again.as_ref(),
            Ok(&formatted),
            "formatting is not idempotent on {source:?}"
        );
        let rechecked = timed("check_source (formatted)", &formatted, || {
            check_source(&formatted)
        });
        assert_eq!(
            rechecked.program, checked.program,
            "formatting changed the meaning of {source:?}\nformatted:\n{formatted}"
        );
    }
}

// ------------------------------------------------------------ generators

/// Source text made of real tokens of the language and a few near misses.
/// Field names, punctuation and numbers; [`vocabulary`] adds the checker's
/// keyword values and rule names, so the fuzzer follows the language as it grows.
const VOCABULARY: &[&str] = &[
    // Sections, keywords and structure.
    "let",
    "layer",
    "mesh",
    "schedule",
    "true",
    "false",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "=",
    ",",
    "+",
    "-",
    "*",
    "/",
    "\n",
    "\n",
    "\n",
    "// a comment\n",
    "//\n",
    "\"a string\"",
    "\"\"",
    "\"unterminated",
    "\"esc\\\"aped\"",
    "#",
    ";",
    ":",
    "$",
    "µs",
    "é",
    // Fields.
    "hidden",
    "dtype",
    "dispatch_dtype",
    "tokens_per_rank",
    "experts",
    "shared_experts",
    "router",
    "capacity",
    "count",
    "ffn",
    "intermediate",
    "bias",
    "swiglu_limit",
    "gate",
    "scoring",
    "top_k",
    "softmax_over",
    "selection_bias",
    "groups",
    "groups_kept",
    "group_score",
    "normalize",
    "scale",
    "weight_on",
    "factor",
    "slots",
    "drop",
    "nodes",
    "gpus_per_node",
    "device",
    "intra_node",
    "inter_node",
    "ep",
    "etp",
    "dp",
    "placement",
    "replicas",
    "bandwidth",
    "latency",
    "peak_flops",
    "memory_bandwidth",
    "memory",
    "nvlink",
    "overlap",
    "allow",
    "deny",
    // Numbers.
    "0",
    "1",
    "2",
    "3",
    "4",
    "7",
    "8",
    "16",
    "64",
    "128",
    "4096",
    "14_336",
    "65536",
    "65537",
    "1048576",
    "2.5",
    "0.0",
    "1e-3",
    "1e999",
    "7.0",
    "9223372036854775807",
    "9223372036854775808",
    "99999999999999999999",
    "1_",
    "0_0",
    // Units.
    "B",
    "KB",
    "MB",
    "GB",
    "TB",
    "KiB",
    "MiB",
    "GiB",
    "TiB",
    "GB/s",
    "TB/s",
    "Gb/s",
    "KiB/s",
    "ns",
    "us",
    "ms",
    "s",
    "GFLOP/s",
    "TFLOP/s",
    "PFLOP/s",
];

fn vocabulary() -> Vec<&'static str> {
    VOCABULARY
        .iter()
        .chain(moec_lang::check::KEYWORDS)
        .chain(moec_lang::spec::RULES)
        .copied()
        .collect()
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vocabulary()).prop_map(str::to_string),
        1 => "[A-Za-z_][A-Za-z0-9_]{0,10}",
        1 => "[0-9][0-9_]{0,24}",
        1 => "[0-9]{1,4}\\.[0-9]{1,4}",
    ]
}

fn token_text(max_tokens: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(token(), 0..max_tokens).prop_map(|t| t.join(" "))
}

fn bytes_text(max_bytes: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<u8>(), 0..max_bytes)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Printable ASCII and whitespace: more likely than raw bytes to get past the lexer.
fn ascii_text(max_bytes: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![4 => 0x20u8..0x7f, 1 => Just(b'\n'), 1 => Just(b' ')],
        0..max_bytes,
    )
    .prop_map(|b| String::from_utf8(b).expect("ASCII"))
}

fn examples() -> &'static [String] {
    static EXAMPLES: OnceLock<Vec<String>> = OnceLock::new();
    EXAMPLES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .expect("the examples directory exists")
            .map(|e| e.expect("a readable directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "moe"))
            .collect();
        paths.sort();
        let texts: Vec<String> = paths
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("a readable example"))
            .collect();
        assert!(!texts.is_empty(), "no examples");
        texts
    })
}

/// One edit of a source text.
#[derive(Clone, Debug)]
enum Mutation {
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    DeletePiece(Index),
    DuplicatePiece(Index),
    SwapPieces(Index, Index),
    ReplacePiece(Index, String),
    InsertToken(Index, String),
    /// Deletes a run of up to 40 characters.
    DeleteChars(Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<Index>;
    prop_oneof![
        i().prop_map(Mutation::DeleteLine),
        i().prop_map(Mutation::DuplicateLine),
        (i(), i()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        i().prop_map(Mutation::DeletePiece),
        i().prop_map(Mutation::DuplicatePiece),
        (i(), i()).prop_map(|(a, b)| Mutation::SwapPieces(a, b)),
        (i(), token()).prop_map(|(a, t)| Mutation::ReplacePiece(a, t)),
        (i(), token()).prop_map(|(a, t)| Mutation::InsertToken(a, t)),
        (i(), 1usize..40).prop_map(|(a, n)| Mutation::DeleteChars(a, n)),
    ]
}

/// Splits a text into alternating runs of non-space and space characters, so
/// that joining the pieces gives the text back.
fn pieces(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut last_space = None;
    for c in text.chars() {
        let space = c.is_whitespace();
        match out.last_mut() {
            Some(p) if last_space == Some(space) => p.push(c),
            _ => out.push(c.to_string()),
        }
        last_space = Some(space);
    }
    out
}

fn apply(text: &str, m: &Mutation) -> String {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut pieces = pieces(text);
    match m {
        Mutation::DeleteLine(i) if !lines.is_empty() => {
            let k = i.index(lines.len());
            lines
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != k)
                .map(|(_, l)| *l)
                .collect()
        }
        Mutation::DuplicateLine(i) if !lines.is_empty() => {
            let k = i.index(lines.len());
            let mut out = lines.clone();
            out.insert(k, lines[k]);
            out.concat()
        }
        Mutation::SwapLines(a, b) if !lines.is_empty() => {
            let mut out = lines.clone();
            out.swap(a.index(lines.len()), b.index(lines.len()));
            out.concat()
        }
        Mutation::DeletePiece(i) if !pieces.is_empty() => {
            pieces.remove(i.index(pieces.len()));
            pieces.concat()
        }
        Mutation::DuplicatePiece(i) if !pieces.is_empty() => {
            let k = i.index(pieces.len());
            pieces.insert(k, pieces[k].clone());
            pieces.concat()
        }
        Mutation::SwapPieces(a, b) if !pieces.is_empty() => {
            let n = pieces.len();
            pieces.swap(a.index(n), b.index(n));
            pieces.concat()
        }
        Mutation::ReplacePiece(i, t) if !pieces.is_empty() => {
            let k = i.index(pieces.len());
            pieces[k] = t.clone();
            pieces.concat()
        }
        Mutation::InsertToken(i, t) => {
            let k = i.index(pieces.len() + 1);
            pieces.insert(k, format!(" {t} "));
            pieces.concat()
        }
        Mutation::DeleteChars(i, n) => {
            let chars: Vec<char> = text.chars().collect();
            let start = i.index(chars.len() + 1);
            let end = (start + n).min(chars.len());
            chars[..start].iter().chain(&chars[end..]).collect()
        }
        _ => text.to_string(),
    }
}

fn mutated_example(max_mutations: usize) -> impl Strategy<Value = String> {
    (
        any::<Index>(),
        prop::collection::vec(mutation(), 1..max_mutations),
    )
        .prop_map(|(which, mutations)| {
            let examples = examples();
            let mut text = examples[which.index(examples.len())].clone();
            for m in &mutations {
                text = apply(&text, m);
            }
            text
        })
}

/// A number that stresses the checker: small, huge, negative, decimal, an expression.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..130).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (1u32..64).prop_map(|b| (1u128 << b).to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        (0u32..1000, 0u32..1000).prop_map(|(a, b)| format!("{a}.{b}")),
        prop::sample::select(
            &[
                "65536",
                "65537",
                "1048576",
                "1048577",
                "9223372036854775807",
                "(-9223372036854775807 + 0)",
                "4294967296",
                "0.5",
                "1e300",
                "1e-300",
                "2 * 2",
                "7 / 2",
                "1 - 2",
            ][..]
        )
        .prop_map(str::to_string),
    ]
}

/// An example with some of its integer literals replaced by [`number`]s.
fn example_with_numbers() -> impl Strategy<Value = String> {
    (
        any::<Index>(),
        prop::collection::vec((any::<Index>(), number()), 1..4),
    )
        .prop_map(|(which, edits)| {
            let examples = examples();
            let mut pieces = pieces(&examples[which.index(examples.len())]);
            let numeric: Vec<usize> = (0..pieces.len())
                .filter(|&i| pieces[i].starts_with(|c: char| c.is_ascii_digit()))
                .collect();
            for (at, n) in edits {
                if !numeric.is_empty() {
                    pieces[numeric[at.index(numeric.len())]] = n;
                }
            }
            pieces.concat()
        })
}

// ------------------------------------------------------------ properties

proptest! {
    #![proptest_config(config())]

    /// (a) Random bytes, read as lossy UTF-8.
    #[test]
    fn random_bytes_never_panic(source in bytes_text(2048)) {
        exercise(&source);
    }

    /// (a') Random printable ASCII.
    #[test]
    fn random_ascii_never_panics(source in ascii_text(2048)) {
        exercise(&source);
    }

    /// (b) Random sequences of real tokens.
    #[test]
    fn random_tokens_never_panic(source in token_text(400)) {
        exercise(&source);
    }

    /// (c) The examples with lines and tokens deleted, duplicated, swapped or replaced.
    #[test]
    fn mutated_examples_never_panic(source in mutated_example(6)) {
        exercise(&source);
    }

    /// (c'') The examples with other numbers: reaches the checker's arithmetic.
    #[test]
    fn examples_with_other_numbers_never_panic(source in example_with_numbers()) {
        exercise(&source);
    }

    /// (c') One small edit of an example: usually still parses, so this
    /// reaches the checker and the formatter's round trip.
    #[test]
    fn slightly_mutated_examples_never_panic(source in mutated_example(2)) {
        exercise(&source);
    }
}

/// Runs each generator a few times with inputs of about 10 000 bytes.
#[test]
fn large_inputs_never_panic() {
    let runs = (cases() / 64).max(4);
    let mut runner = TestRunner::new(Config {
        cases: runs,
        failure_persistence: None,
        ..Config::default()
    });
    let at_least = |n: usize| move |s: &String| s.len() >= n;
    runner
        .run(
            &bytes_text(10_001).prop_filter("large", at_least(8_000)),
            |s| {
                exercise(&s);
                Ok(())
            },
        )
        .unwrap();
    runner
        .run(
            &prop::collection::vec(token(), 2_500..3_000).prop_map(|t| t.join(" ")),
            |s| {
                exercise(&s);
                Ok(())
            },
        )
        .unwrap();
    // Several examples glued together and then mutated: about 10 KB.
    let glued = (
        prop::collection::vec(any::<Index>(), 8..10),
        prop::collection::vec(mutation(), 1..30),
    )
        .prop_map(|(which, mutations)| {
            let examples = examples();
            let mut text: String = which
                .iter()
                .map(|i| examples[i.index(examples.len())].as_str())
                .collect();
            for m in &mutations {
                text = apply(&text, m);
            }
            text
        });
    runner
        .run(&glued, |s| {
            exercise(&s);
            Ok(())
        })
        .unwrap();
}

/// Hand-written worst cases for the parser's bounds and the checker's loops.
#[test]
fn pathological_inputs_finish_quickly() {
    let base = &examples()[0];
    let mut inputs: Vec<String> = vec![
        String::new(),
        "\n".repeat(10_000),
        "{".repeat(10_000),
        "}".repeat(10_000),
        "[".repeat(10_000),
        "(".repeat(10_000),
        "-".repeat(10_000),
        format!("let a = {}1", "-".repeat(5_000)),
        format!("let a = {}", "1 + ".repeat(256) + "1"),
        format!("let a = {}", "1 + ".repeat(257) + "1"),
        format!("let a = {}1{}", "(".repeat(32), ")".repeat(32)),
        format!("let a = {}1{}", "(".repeat(33), ")".repeat(33)),
        format!("let a = [{}]", "1, ".repeat(5_000)),
        "let a = 1\n".repeat(2_000),
        (0..2_000).map(|i| format!("let a{i} = 1\n")).collect(),
        (0..1_000)
            .map(|i| format!("let a{} = a{i} * 2\n", i + 1))
            .collect(),
        "\"".repeat(10_000),
        "//".repeat(5_000),
        "µ".repeat(5_000),
        "\u{0}".repeat(10_000),
        "layer a { ".repeat(100),
        format!("{base}{base}{base}"),
        base.replace('\n', " "),
        base.replace(' ', ""),
    ];
    // An explicit placement of the largest allowed size.
    let ranks = 4096;
    let per = 16;
    let map: String = (0..ranks)
        .map(|r| {
            let experts: Vec<String> = (r * per..(r + 1) * per).map(|e| e.to_string()).collect();
            format!("        {r} = [{}]\n", experts.join(", "))
        })
        .collect();
    inputs.push(format!(
        "layer big {{\n    hidden = 64\n    tokens_per_rank = 32\n    experts {{\n        count = 65536\n        ffn = swiglu\n        intermediate = 128\n    }}\n    router {{\n        scoring = softmax\n        top_k = 2\n    }}\n}}\n\nmesh {{\n    gpus_per_node = {ranks}\n    device = H100\n    ep = {ranks}\n    placement = explicit {{\n{map}    }}\n}}\n"
    ));
    for placement in ["contiguous", "round_robin"] {
        inputs.push(format!(
            "layer big {{\n    hidden = 64\n    tokens_per_rank = 32\n    experts {{\n        count = 65536\n        ffn = swiglu\n        intermediate = 128\n    }}\n    router {{\n        scoring = softmax\n        top_k = 2\n    }}\n}}\n\nmesh {{\n    nodes = 8192\n    gpus_per_node = 128\n    device = H100\n    inter_node {{\n        bandwidth = 50 GB/s\n    }}\n    ep = 65536\n    dp = 16\n    placement = {placement}\n}}\n"
        ));
    }
    for input in &inputs {
        exercise(input);
    }
}

/// `i64::MIN / -1` overflows; it must be an error, not a panic.
#[test]
fn dividing_the_smallest_integer_by_minus_one_is_an_error() {
    let source = "let x = (-9223372036854775807 - 1) / -1\n";
    let checked = check_source(source);
    assert!(
        checked.diagnostics.iter().any(|d| d.code == "E0204"),
        "{:#?}",
        checked.diagnostics
    );
}

/// A long replica list is checked in time linear in its length.
#[test]
fn a_long_replica_list_is_checked_quickly() {
    let ranks: Vec<String> = (1..65_536).map(|r| r.to_string()).collect();
    let source = format!(
        "layer big {{\n    hidden = 64\n    tokens_per_rank = 32\n    experts {{\n        count = 65536\n        ffn = swiglu\n        intermediate = 128\n    }}\n    router {{\n        scoring = softmax\n        top_k = 2\n    }}\n}}\n\nmesh {{\n    nodes = 8192\n    gpus_per_node = 8\n    device = H100\n    inter_node {{\n        bandwidth = 50 GB/s\n    }}\n    ep = 65536\n    replicas {{\n        0 = [{}]\n    }}\n}}\n",
        ranks.join(", ")
    );
    let checked = timed("check_source", &source, || check_source(&source));
    assert!(checked.program.is_some(), "{:#?}", checked.diagnostics);
}
