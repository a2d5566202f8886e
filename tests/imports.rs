//! The config corpus: `configs/` holds one real `config.json` per
//! architecture (values as the models' hub configs give them), including a
//! dense model and two that must be refused (Phi-3.5-MoE's sparsemixer, and
//! MiniMax-M2, a model moec does not know whose routing fields a generic
//! import would ignore). Each is
//! imported with the default mesh (one node of eight H100s, bf16) and the
//! result, the `.moe` text with its warnings or the refusal, is snapshotted
//! in `snapshots/`. The field-by-field checks of each imported layer are in
//! `lang/src/import/tests.rs`.
//!
//! To add a config: drop it in `configs/`, run
//! `INSTA_UPDATE=always cargo test -p moec-tests --test imports`, and read
//! the new snapshot before committing it.

#![allow(clippy::unwrap_used)]

use moec_lang::import::{import, ImportOptions};

fn options(source_name: &str) -> ImportOptions {
    ImportOptions {
        nodes: 1,
        gpus_per_node: 8,
        device: "H100".to_string(),
        ep: None,
        tokens_per_rank: 4096,
        dtype: "bf16".to_string(),
        source_name: source_name.to_string(),
        generic: false,
    }
}

/// The configs that must be refused, with the words the refusal must use.
const REFUSED: [(&str, &str); 3] = [
    ("llama_dense.json", "is not a Mixture-of-Experts model"),
    ("minimax_m2.json", "--generic"),
    ("phi_3_5_moe.json", "sparsemixer"),
];

#[test]
fn every_config_imports_or_is_refused_for_its_reason() {
    insta::glob!("configs/*.json", |path| {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let json = std::fs::read_to_string(path).unwrap();
        let shown = format!("configs/{name}");
        let result = import(&json, &options(&shown));
        let refused = REFUSED.iter().find(|(n, _)| *n == name);
        let text = match (result, refused) {
            (Ok(imported), None) => {
                let checked = moec_lang::check_source(&imported.text);
                assert!(
                    checked.diagnostics.is_empty(),
                    "{name}: the imported layer has diagnostics"
                );
                let mut text = String::new();
                for w in &imported.warnings {
                    text.push_str(&format!("warning: {w}\n"));
                }
                text.push_str(&imported.text);
                text
            }
            (Err(e), Some((_, reason))) => {
                assert!(e.contains(reason), "{name}: {e}");
                format!("error: {e}\n")
            }
            (Ok(_), Some(_)) => panic!("{name} imported, but it must be refused"),
            (Err(e), None) => panic!("{name}: {e}"),
        };
        insta::assert_snapshot!(text);
    });
}

/// Runs the CLI in-process: (exit code, stdout, stderr).
fn moec(args: &[&str]) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let argv: Vec<&str> = std::iter::once("moec")
        .chain(args.iter().copied())
        .collect();
    let code = moec::cli::run(argv, &mut out, &mut err, false);
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

#[test]
fn moec_import_refuses_an_unknown_model_that_it_would_misread_unless_generic() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("imports");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("minimax_m2.json");
    std::fs::write(
        &path,
        r#"{"model_type": "minimax_m2", "hidden_size": 3072, "intermediate_size": 1536,
            "num_local_experts": 256, "num_experts_per_tok": 8, "scoring_func": "sigmoid",
            "use_routing_bias": true}"#,
    )
    .unwrap();
    let path = path.display().to_string();
    let (code, out, err) = moec(&["import", &path]);
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("`scoring_func`, `use_routing_bias`") && err.contains("--generic"),
        "{err}"
    );
    let (code, out, err) = moec(&["import", &path, "--generic"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.starts_with(&format!(
            "warning: {path}: `minimax_m2` is not a model moec knows: imported generically"
        )) && err.contains("ignored: `scoring_func`, `use_routing_bias`"),
        "{err}"
    );
    assert!(
        out.contains("// Not imported: scoring_func, use_routing_bias."),
        "{out}"
    );

    let phi = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/phi_3_5_moe.json");
    let (code, _, err) = moec(&["import", phi]);
    assert_eq!(code, 1);
    assert!(err.contains("sparsemixer"), "{err}");
}
