//! The plans' kernels as CUDA C: insta snapshots of the generated module of
//! two examples, no identifier of a `.moe` file in any module, `moec
//! kernels`, and NVRTC on every example.
//!
//! The NVRTC tests run when `libnvrtc` is found (`MOEC_NVRTC_LIB`,
//! `MOEC_CUDA_HOME`, ...: see `moec_runtime::cuda::nvrtc`) and otherwise
//! print a notice and pass, so `cargo test` passes without CUDA; CI installs
//! the `nvidia-cuda-nvrtc` wheel and points `MOEC_CUDA_HOME` at it.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use moec::compile::{compile, Compiled, Options};
use moec_lang::{check_source, render};
use moec_runtime::cuda::nvrtc::{entry_sizes, Nvrtc, NvrtcError};
use moec_runtime::cuda::{cache::Source, plan_kernels, PtxCache};

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

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(format!("{name}.moe"))
}

fn compiled(name: &str, source: &str) -> Compiled {
    let checked = check_source(source);
    let Some((program, _)) = checked.program else {
        panic!(
            "{name} does not check:\n{}",
            render(name, source, &checked.diagnostics, false)
        )
    };
    compile(&program, &Options::cuda()).unwrap()
}

fn compiled_file(path: &Path) -> Compiled {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    compiled(&name, &std::fs::read_to_string(path).unwrap())
}

/// NVRTC, or `None` with a notice when it is not installed.
fn nvrtc(test: &str) -> Option<Nvrtc> {
    match Nvrtc::load() {
        Ok(n) => Some(n),
        Err(NvrtcError::NotFound { .. }) => {
            eprintln!(
                "{test}: skipped: libnvrtc not found (set MOEC_CUDA_HOME to a folder with the \
                 nvidia-cuda-nvrtc wheel, or MOEC_NVRTC_LIB)"
            );
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

#[test]
fn cuda_source_snapshots() {
    for name in ["tiny", "deepseek_v3"] {
        let c = compiled_file(&example(name));
        let pk = plan_kernels(&c.plan).unwrap();
        insta::assert_snapshot!(format!("cuda_{name}"), pk.module.source());
    }
}

#[test]
fn every_example_has_kernels_and_no_moe_identifier_in_its_source() {
    for path in examples() {
        let c = compiled_file(&path);
        let pk = plan_kernels(&c.plan).unwrap();
        let src = pk.module.source();
        assert!(!pk.kernels.is_empty(), "{}", path.display());
        assert!(
            !src.contains(&c.plan.layer.name),
            "{}: the layer name reaches the source",
            path.display()
        );
        for k in pk.module.kernels() {
            assert!(k.name().starts_with(&format!("moec_{}_", k.kind())));
        }
        // Every table kernel is generated or native, each once.
        assert_eq!(
            pk.kernels
                .iter()
                .filter(|k| k.table_index.is_some())
                .count()
                + pk.native.len(),
            c.plan.kernels.len()
        );
    }
}

#[test]
fn identifiers_of_the_file_never_reach_the_source() {
    // The layer name and a constant's name, distinctive enough that any
    // occurrence would be theirs.
    let source = std::fs::read_to_string(example("tiny"))
        .unwrap()
        .replace(
            "layer tiny {",
            "let zz_user_width = 64\n\nlayer zz_user_layer {",
        )
        .replace("hidden = 64", "hidden = zz_user_width");
    let c = compiled("renamed", &source);
    assert_eq!(c.plan.layer.name, "zz_user_layer");
    let src = plan_kernels(&c.plan).unwrap().module.source();
    assert!(
        !src.contains("zz_user"),
        "a .moe identifier reaches the source"
    );
    // The module is the same as the original's: names never change it.
    let tiny = compiled_file(&example("tiny"));
    assert_eq!(src, plan_kernels(&tiny.plan).unwrap().module.source());
}

#[test]
fn nvrtc_compiles_every_example() {
    let Some(nvrtc) = nvrtc("nvrtc_compiles_every_example") else {
        return;
    };
    for path in examples() {
        let c = compiled_file(&path);
        let pk = plan_kernels(&c.plan).unwrap();
        let name = format!("{}.cu", pk.module.hash());
        let ptx = nvrtc
            .compile(&pk.module.source(), &name, "sm_90", &[])
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let sizes = entry_sizes(&ptx.text);
        assert_eq!(sizes.len(), pk.module.kernels().len(), "{}", path.display());
        // The cubin the executor loads: an ELF image for sm_90.
        assert!(ptx.cubin.starts_with(b"\x7fELF"), "{}", path.display());
        for k in pk.module.kernels() {
            let size = sizes.iter().find(|(n, _)| n == k.name()).map(|(_, s)| *s);
            assert!(
                size.is_some_and(|s| s > 100),
                "{}: {}",
                path.display(),
                k.name()
            );
        }
        eprintln!(
            "{}: {} kernels, {} B of PTX",
            path.display(),
            sizes.len(),
            ptx.text.len()
        );
    }
}

/// The hand-written assignment kernels compile for sm_90, every symbol is
/// in the PTX, and NVRTC has nothing to warn about.
#[test]
fn nvrtc_compiles_the_native_kernels() {
    let Some(nvrtc) = nvrtc("nvrtc_compiles_the_native_kernels") else {
        return;
    };
    use moec_kernels::native::{NativeKernel, SOURCE};
    let ptx = nvrtc
        .compile(SOURCE, "assign.cu", "sm_90", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ptx.log.trim().is_empty(), "{}", ptx.log);
    assert!(ptx.cubin.starts_with(b"\x7fELF"));
    // A virtual architecture has PTX only.
    let virtual_arch = nvrtc
        .compile(SOURCE, "assign.cu", "compute_90", &[])
        .unwrap();
    assert!(virtual_arch.cubin.is_empty());
    assert!(!virtual_arch.text.is_empty());
    let sizes = entry_sizes(&ptx.text);
    for k in NativeKernel::ALL {
        let size = sizes.iter().find(|(n, _)| n == k.symbol()).map(|(_, s)| *s);
        assert!(size.is_some_and(|s| s > 100), "{}", k.symbol());
    }
    assert_eq!(sizes.len(), NativeKernel::ALL.len());
}

#[test]
fn nvrtc_reports_the_log_of_a_broken_source() {
    let Some(nvrtc) = nvrtc("nvrtc_reports_the_log_of_a_broken_source") else {
        return;
    };
    let e = nvrtc
        .compile(
            "extern \"C\" __global__ void k() { not_declared_anywhere(); }\n",
            "broken.cu",
            "sm_90",
            &[],
        )
        .unwrap_err();
    let NvrtcError::Compile { log, .. } = &e else {
        panic!("{e:?}")
    };
    assert!(log.contains("broken.cu"), "{log}");
    assert!(log.contains("not_declared_anywhere"), "{log}");
    assert!(e.to_string().contains("not_declared_anywhere"));
    // A bad architecture never reaches NVRTC.
    assert!(matches!(
        nvrtc.compile("", "x.cu", "sm90", &[]),
        Err(NvrtcError::BadArch(_))
    ));
}

#[test]
fn ptx_is_cached_per_plan() {
    let Some(nvrtc) = nvrtc("ptx_is_cached_per_plan") else {
        return;
    };
    let c = compiled_file(&example("tiny"));
    let module = plan_kernels(&c.plan).unwrap().module;
    let dir = std::env::temp_dir().join(format!("moec-ptx-cache-{}", std::process::id()));
    let cache = PtxCache::new(Some(dir.clone()));
    let (a, s1) = cache.get_or_compile(&nvrtc, &module, "sm_90").unwrap();
    let (b, s2) = cache.get_or_compile(&nvrtc, &module, "sm_90").unwrap();
    assert_eq!((s1, s2), (Source::Compiled, Source::Memory));
    assert_eq!(a, b);
    let key = PtxCache::key(&module, "sm_90", nvrtc.version());
    assert!(dir.join(format!("{key}.ptx")).is_file());
    assert!(dir.join(format!("{key}.cubin")).is_file());
    let (d, s3) = PtxCache::new(Some(dir.clone()))
        .get_or_compile(&nvrtc, &module, "sm_90")
        .unwrap();
    assert_eq!(s3, Source::Disk);
    assert_eq!(d.text, a.text);
    assert_eq!(d.cubin, a.cubin);
    // An entry without its cubin is compiled again.
    std::fs::remove_file(dir.join(format!("{key}.cubin"))).unwrap();
    let (e, s5) = PtxCache::new(Some(dir.clone()))
        .get_or_compile(&nvrtc, &module, "sm_90")
        .unwrap();
    assert_eq!((s5, &e.cubin), (Source::Compiled, &a.cubin));
    // Another architecture is another entry.
    let (_, s4) = cache.get_or_compile(&nvrtc, &module, "sm_80").unwrap();
    assert_eq!(s4, Source::Compiled);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ------------------------------------------------------------ moec kernels

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
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

#[test]
fn moec_kernels_prints_and_writes_the_source() {
    let tiny = example("tiny");
    let tiny = tiny.to_str().unwrap();
    let r = moec(&["kernels", tiny]);
    assert_eq!(r.code, 0, "{}", r.err);
    let c = compiled_file(&example("tiny"));
    let module = plan_kernels(&c.plan).unwrap().module;
    assert_eq!(r.out, module.source());

    let dir = std::env::temp_dir().join(format!("moec-kernels-emit-{}", std::process::id()));
    let r = moec(&["kernels", tiny, "--emit-dir", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(r.out, "");
    let file = dir.join(format!("{}.cu", module.hash()));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), module.source());
    assert!(r.err.contains("wrote"), "{}", r.err);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn moec_kernels_rejects_bad_input() {
    let tiny = example("tiny");
    let r = moec(&[
        "kernels",
        tiny.to_str().unwrap(),
        "--check",
        "--arch",
        "gfx90a",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.err.contains("`gfx90a` is not a GPU architecture"),
        "{}",
        r.err
    );
    let r = moec(&["kernels", "/no/such/file.moe"]);
    assert_eq!(r.code, 2);
    let broken = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("diagnostics/e0301_top_k_larger_than_experts.moe");
    let r = moec(&["kernels", broken.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.err.contains("E0301"), "{}", r.err);
}

#[test]
fn moec_kernels_check() {
    let r = moec(&[
        "kernels",
        example("deepseek_v3").to_str().unwrap(),
        "--check",
    ]);
    if nvrtc("moec_kernels_check").is_none() {
        assert_eq!(r.code, 1);
        assert!(
            r.err
                .contains("libnvrtc not found; set MOEC_NVRTC_LIB or install nvidia-cuda-nvrtc"),
            "{}",
            r.err
        );
        return;
    }
    assert_eq!(r.code, 0, "{}", r.err);
    // One line per kernel (12: the table's ten less the four assignment
    // passes, the shared down projection's store, two epilogues sharing one
    // activation kernel, the expert GEMMs' gather and reduction through the
    // expansion index, and the forwarder's sum of the reducing hierarchical
    // combine), then the summary.
    let lines: Vec<&str> = r.out.lines().collect();
    assert_eq!(lines.len(), 13, "{}", r.out);
    for l in &lines[..12] {
        assert!(l.ends_with(" B PTX"), "{l}");
        assert!(l.contains(" moec_"), "{l}");
    }
    assert!(lines[0].starts_with("k0   router_fused "), "{}", lines[0]);
    // The router keeps a thread per row; the streaming kernels a block.
    assert!(lines[0].contains(" thread/row "), "{}", lines[0]);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" pack_rank ") && l.contains(" block/row ")),
        "{}",
        r.out
    );
    for (at, label) in [
        (9, "expert_gather"),
        (10, "expert_reduce"),
        (11, "forwarder_sum"),
    ] {
        assert!(
            lines[at].starts_with(&format!("--   {label} ")),
            "{}",
            lines[at]
        );
    }
    assert!(
        lines[12].starts_with("12 kernels (11 distinct) in "),
        "{}",
        lines[12]
    );
    assert!(lines[12].contains("for sm_90 with NVRTC"), "{}", lines[12]);
    assert!(lines[12].ends_with(
        "native, not generated: assign_count, assign_place_1, assign_rank_2, assign_expand_3"
    ));
}
