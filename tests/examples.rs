//! The examples in `examples/`: each checks clean, its validated form is
//! snapshotted, and it is kept in canonical form (`moec fmt` leaves it alone
//! and formatting never changes what a file means).

#![allow(clippy::unwrap_used)]

use moec_lang::{check_source, format_source, render};
use std::path::{Path, PathBuf};

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

fn name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("the example is readable")
}

#[test]
fn examples_check_clean() {
    for path in examples() {
        let source = read(&path);
        let checked = check_source(&source);
        let shown = format!("examples/{}", name(&path));
        assert!(
            checked.diagnostics.is_empty(),
            "{shown} has diagnostics:\n{}",
            render(&shown, &source, &checked.diagnostics, false)
        );
        assert!(checked.program.is_some(), "{shown}: no program");
    }
}

#[test]
fn validated_form() {
    insta::glob!("../examples", "*.moe", |path| {
        let source = read(path);
        let (program, derived) = check_source(&source)
            .program
            .unwrap_or_else(|| panic!("{} does not check", path.display()));
        insta::assert_snapshot!(format!("{program}{derived}"));
    });
}

#[test]
fn formatting_keeps_the_program() {
    for path in examples() {
        let source = read(&path);
        let formatted = format_source(&source)
            .unwrap_or_else(|d| panic!("{} does not format: {d:?}", path.display()));
        let before = check_source(&source).program.unwrap();
        let after = check_source(&formatted);
        assert!(
            after.diagnostics.is_empty(),
            "{}: the formatted text has diagnostics:\n{}",
            path.display(),
            render("formatted.moe", &formatted, &after.diagnostics, false)
        );
        assert_eq!(
            before,
            after.program.unwrap(),
            "{}: formatting changed the layer",
            path.display()
        );
    }
}

#[test]
fn formatting_is_idempotent() {
    for path in examples() {
        let once = format_source(&read(&path)).unwrap();
        let twice = format_source(&once).unwrap();
        assert_eq!(once, twice, "{}: formatting twice differs", path.display());
    }
}

#[test]
fn examples_are_in_canonical_form() {
    for path in examples() {
        let source = read(&path);
        let formatted = format_source(&source).unwrap();
        assert_eq!(
            formatted,
            source,
            "{} is not in canonical form (run `moec fmt -w` on it)",
            path.display()
        );
    }
}

#[test]
fn formatting_keeps_every_comment() {
    for path in examples() {
        let source = read(&path);
        let formatted = format_source(&source).unwrap();
        for line in source.lines() {
            if let Some(at) = line.find("//") {
                let comment = line[at..].trim_end();
                assert!(
                    formatted.contains(comment),
                    "{}: lost the comment {comment:?}",
                    path.display()
                );
            }
        }
    }
}
