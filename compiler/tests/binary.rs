//! Runs the real `moec` binary: exit codes as a process sees them, and no
//! panic (exit 101) on any file of the examples or the broken-file corpus.

use std::path::{Path, PathBuf};
use std::process::Command;

fn moec(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_moec"))
        .args(args)
        .output()
        .expect("the moec binary runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the compiler crate sits in the repository")
        .to_path_buf()
}

fn moe_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "moe"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn examples_check_with_exit_0() {
    let files = moe_files(&repo().join("examples"));
    assert!(files.len() >= 8, "examples missing: {files:?}");
    for f in files {
        let (code, out, err) = moec(&["check", f.to_str().expect("utf-8 path")]);
        assert_eq!(code, 0, "{}: {err}", f.display());
        assert!(out.contains(": ok:"), "{out}");
    }
}

#[test]
fn broken_files_exit_1_and_never_panic() {
    let files = moe_files(&repo().join("tests/diagnostics"));
    assert!(!files.is_empty(), "the diagnostics corpus is missing");
    for f in files {
        let path = f.to_str().expect("utf-8 path");
        for cmd in [["check", path], ["build", path]] {
            let (code, _, err) = moec(&cmd);
            assert!(!err.contains("panicked"), "{}: {err}", f.display());
            let warning_only = f
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("w0"));
            let expected = if warning_only { 0 } else { 1 };
            assert_eq!(code, expected, "{} {}: {err}", cmd[0], f.display());
        }
        let (code, _, err) = moec(&["fmt", path]);
        assert!(
            code == 0 || code == 1,
            "fmt {}: exit {code}: {err}",
            f.display()
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(moec(&[]).0, 2);
    assert_eq!(moec(&["frobnicate"]).0, 2);
    assert_eq!(moec(&["check"]).0, 2);
    assert_eq!(moec(&["fmt", "--bogus", "x.moe"]).0, 2);
    let (code, _, err) = moec(&["check", "/nonexistent/layer.moe"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn help_and_version_exit_0() {
    let (code, out, _) = moec(&["--help"]);
    assert_eq!(code, 0);
    for cmd in ["check", "fmt", "import", "build"] {
        assert!(out.contains(cmd), "help lists {cmd}: {out}");
    }
    assert_eq!(moec(&["--version"]).0, 0);
}

#[test]
fn diagnostics_name_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("moec-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("broken.moe");
    std::fs::write(
        &file,
        "layer x {\n    hidden = 64\n    tokens_per_rank = 8\n    experts { count = 4 ffn = swiglu intermediate = 8 }\n    router { scoring = softmax top_k = 9 }\n}\nmesh { gpus_per_node = 2 device = H100 ep = 2 }\n",
    )
    .expect("write");
    let (code, _, err) = moec(&["check", "--color", "never", file.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(err.contains("broken.moe:5:32"), "{err}");
    assert!(err.contains("E0301"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "no colour with --color never: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
