//! Golden diagnostics: every file in `diagnostics/` is a small broken `.moe`
//! file named after the code it should trigger (`e0301_top_k_larger_than_experts.moe`).
//! The rendered diagnostics of each are snapshotted in `snapshots/`, and the
//! corpus must hold at least one file for every code the front end can emit.
//!
//! To add a case: drop a file in `diagnostics/`, run
//! `INSTA_UPDATE=always cargo test -p moec-tests --test diagnostics`, and read
//! the new snapshot before committing it.

#![allow(clippy::unwrap_used)]

use moec_lang::diag::CODES;
use moec_lang::{check_source, render, Severity};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("diagnostics")
}

/// Every `.moe` file of the corpus, sorted by name.
fn corpus() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("the diagnostics corpus directory exists")
        .map(|e| e.expect("a readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    files.sort();
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// The code a corpus file is named after (`e0301_...` -> `E0301`), if any.
fn named_code(name: &str) -> Option<String> {
    let prefix = name.split('_').next()?;
    let bytes = prefix.as_bytes();
    let well_formed = bytes.len() == 5
        && matches!(bytes[0], b'e' | b'w')
        && bytes[1..].iter().all(u8::is_ascii_digit);
    well_formed.then(|| prefix.to_ascii_uppercase())
}

#[test]
fn golden_diagnostics() {
    insta::glob!("diagnostics/*.moe", |path| {
        let source = std::fs::read_to_string(path).unwrap();
        let name = file_name(path);
        let shown = format!("diagnostics/{name}");
        let checked = check_source(&source);
        let text = render(&shown, &source, &checked.diagnostics, false);

        assert!(
            source.starts_with("// "),
            "{name}: a corpus file starts with a `// ` comment saying what is wrong"
        );
        assert_eq!(
            name,
            name.to_lowercase(),
            "{name}: corpus file names are lowercase"
        );
        let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
        let warnings = checked
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .count();
        if name.starts_with("w0") {
            assert_eq!(
                errors, 0,
                "{name}: a warning-only file has no error\n{text}"
            );
            assert!(warnings > 0, "{name}: no warning\n{text}");
            assert!(
                checked.program.is_some(),
                "{name}: a file with only warnings still yields a program"
            );
        } else {
            assert!(errors > 0, "{name}: the file was accepted\n{text}");
            assert!(
                checked.program.is_none(),
                "{name}: a rejected file yields no program"
            );
        }
        if let Some(code) = named_code(&name) {
            let codes: BTreeSet<&str> = checked.diagnostics.iter().map(|d| d.code).collect();
            assert!(
                codes.contains(code.as_str()),
                "{name}: expected {code} among {codes:?}\n{text}"
            );
        }
        // Every span lies in the file: the renderer falls back to this text otherwise.
        assert!(
            !text.contains("location unavailable"),
            "{name}: a diagnostic points outside the file\n{text}"
        );
        // Checking is deterministic.
        assert_eq!(
            check_source(&source).diagnostics,
            checked.diagnostics,
            "{name}: two runs disagree"
        );

        insta::with_settings!({
            description => source.as_str(),
            omit_expression => true,
        }, {
            insta::assert_snapshot!(text);
        });
    });
}

#[test]
fn corpus_names_are_known_codes() {
    let known: BTreeSet<&str> = CODES.iter().map(|c| c.code).collect();
    let bad: Vec<String> = corpus()
        .iter()
        .map(|p| file_name(p))
        .filter(|n| named_code(n).is_some_and(|c| !known.contains(c.as_str())))
        .collect();
    assert!(
        bad.is_empty(),
        "corpus files named after codes that do not exist: {bad:?}"
    );
}

#[test]
fn every_code_has_a_corpus_file() {
    let covered: BTreeSet<String> = corpus()
        .iter()
        .filter_map(|p| named_code(&file_name(p)))
        .collect();
    let uncovered: Vec<String> = CODES
        .iter()
        .filter(|c| !covered.contains(c.code))
        .map(|c| format!("{} ({})", c.code, c.summary))
        .collect();
    assert!(
        uncovered.is_empty(),
        "no file in tests/diagnostics/ for: {}",
        uncovered.join("; ")
    );
}

fn check_file(name: &str) -> moec_lang::Checked {
    let source = std::fs::read_to_string(corpus_dir().join(name)).unwrap();
    check_source(&source)
}

#[test]
fn many_semantic_errors_are_reported_in_one_run() {
    let checked = check_file("many_semantic_errors.moe");
    let codes: BTreeSet<&str> = checked.diagnostics.iter().map(|d| d.code).collect();
    for code in [
        "E0101", "E0102", "E0202", "E0203", "E0301", "E0303", "E0304", "E0305", "E0401", "E0601",
    ] {
        assert!(codes.contains(code), "{code} missing from {codes:?}");
    }
    // One unknown device, one duplicate constant, ...: no diagnostic twice.
    let mut seen = BTreeSet::new();
    for d in &checked.diagnostics {
        assert!(
            seen.insert((d.code, d.span.start, d.span.end)),
            "reported twice: {d:?}"
        );
    }
}

#[test]
fn many_syntax_errors_are_reported_in_one_run() {
    let checked = check_file("many_syntax_errors.moe");
    let syntax = checked
        .diagnostics
        .iter()
        .filter(|d| d.code == "E0002")
        .count();
    assert!(syntax >= 4, "{:#?}", checked.diagnostics);
}

#[test]
fn diagnostics_come_in_source_order() {
    for path in corpus() {
        let checked = check_source(&std::fs::read_to_string(&path).unwrap());
        let starts: Vec<usize> = checked.diagnostics.iter().map(|d| d.span.start).collect();
        let mut sorted = starts.clone();
        sorted.sort_unstable();
        assert_eq!(starts, sorted, "{}", path.display());
    }
}

/// A constant is defined before its first use, in sections as in other `let`s.
#[test]
fn constant_used_in_a_section_before_its_let_is_rejected() {
    let source = "layer t {\n    hidden = 64\n    tokens_per_rank = 32\n    experts {\n        count = n_experts\n        ffn = swiglu\n        intermediate = 128\n    }\n    router {\n        scoring = softmax\n        top_k = 2\n    }\n}\n\nmesh {\n    gpus_per_node = 4\n    device = H100\n    ep = 4\n}\n\nlet n_experts = 8\n";
    let checked = check_source(source);
    assert!(
        checked.diagnostics.iter().any(|d| d.code == "E0105"),
        "{:#?}",
        checked.diagnostics
    );
}
