//! `moec kernels FILE [--check] [--emit-dir DIR] [--arch ARCH]`: the plan's
//! memory-bound kernels as CUDA C, and a compile check with NVRTC.
//!
//! Without `--check` it prints the plan's CUDA module (or writes
//! `DIR/<module-hash>.cu`). With `--check` it compiles the module for `ARCH`
//! (`sm_90` by default) with NVRTC, loaded at run time, and prints one line
//! per kernel: the plan's name for it, its symbol, its launch shape (a
//! thread or a block per row) and its PTX size. No GPU is
//! needed, only `libnvrtc` (see `moec_runtime::cuda::nvrtc` for where it is
//! looked for). Exit codes: 0 success; 1 the module does not compile (NVRTC's
//! log is printed) or NVRTC is missing; 2 usage (a bad `--arch`, an
//! unwritable folder).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use moec_runtime::cuda::nvrtc::{check_arch, entry_sizes, Nvrtc, NvrtcError};
use moec_runtime::cuda::plan_kernels;
use moec_runtime::Plan;

use crate::cli::{EXIT_OK, EXIT_REJECTED, EXIT_USAGE};

#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// The .moe file describing the layer and its mesh.
    pub file: PathBuf,
    /// Compile every kernel with NVRTC and print each one's PTX size
    /// (needs libnvrtc, not a GPU).
    #[arg(long)]
    pub check: bool,
    /// Write the source to DIR/<module-hash>.cu (and, with --check, the PTX
    /// to DIR/<module-hash>.ptx) instead of printing it.
    #[arg(long, value_name = "DIR")]
    pub emit_dir: Option<PathBuf>,
    /// GPU architecture NVRTC compiles for.
    #[arg(long, default_value = "sm_90")]
    pub arch: String,
}

/// An exit code and its message.
pub type Failure = (i32, String);

fn io(e: std::io::Error) -> Failure {
    (EXIT_USAGE, format!("cannot write output: {e}"))
}

fn write_file(path: &Path, text: &str) -> Result<(), Failure> {
    std::fs::write(path, text).map_err(|e| {
        (
            EXIT_USAGE,
            format!("cannot write `{}`: {e}", path.display()),
        )
    })
}

/// Runs `moec kernels` on a compiled plan.
pub fn kernels(
    args: &KernelsArgs,
    plan: &Plan,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    check_arch(&args.arch).map_err(|e| (EXIT_USAGE, e.to_string()))?;
    let pk =
        plan_kernels(plan).map_err(|e| (EXIT_REJECTED, format!("{}: {e}", args.file.display())))?;
    let hash = pk.module.hash();
    let source = pk.module.source();
    if let Some(dir) = &args.emit_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            (
                EXIT_USAGE,
                format!("cannot create `{}`: {e}", dir.display()),
            )
        })?;
        let path = dir.join(format!("{hash}.cu"));
        write_file(&path, &source)?;
        writeln!(
            err,
            "wrote {} ({} kernels)",
            path.display(),
            pk.module.kernels().len()
        )
        .map_err(io)?;
    }
    if !args.check {
        if args.emit_dir.is_none() {
            out.write_all(source.as_bytes()).map_err(io)?;
        }
        return Ok(EXIT_OK);
    }

    // A missing library says so ("libnvrtc not found; set MOEC_NVRTC_LIB or
    // install nvidia-cuda-nvrtc"): the input is fine, the check cannot run.
    let nvrtc = Nvrtc::load().map_err(|e| (EXIT_REJECTED, e.to_string()))?;
    let name = format!("{hash}.cu");
    let ptx = match nvrtc.compile(&source, &name, &args.arch, &[]) {
        Ok(p) => p,
        Err(NvrtcError::Compile { message, log }) => {
            err.write_all(log.as_bytes()).map_err(io)?;
            if !log.ends_with('\n') {
                writeln!(err).map_err(io)?;
            }
            return Err((
                EXIT_REJECTED,
                format!(
                    "{}: the kernels do not compile for {} ({message})",
                    args.file.display(),
                    args.arch
                ),
            ));
        }
        Err(e) => return Err((EXIT_REJECTED, e.to_string())),
    };
    if let Some(dir) = &args.emit_dir {
        let path = dir.join(format!("{hash}.ptx"));
        write_file(&path, &ptx.text)?;
        writeln!(err, "wrote {}", path.display()).map_err(io)?;
    }
    let sizes: BTreeMap<String, usize> = entry_sizes(&ptx.text).into_iter().collect();
    let kernels = pk.module.kernels();
    let label_width = pk.kernels.iter().map(|k| k.label.len()).max().unwrap_or(0);
    let symbol_width = kernels.iter().map(|k| k.name().len()).max().unwrap_or(0);
    for k in &pk.kernels {
        let symbol = kernels.get(k.module_index).map_or("?", |m| m.name());
        let index = k
            .table_index
            .map_or_else(|| "--".to_string(), |i| format!("k{i}"));
        let bytes = sizes
            .get(symbol)
            .map_or_else(|| "?".to_string(), |b| b.to_string());
        // How the executor spreads it over a launch.
        let shape = match kernels.get(k.module_index) {
            Some(m) if m.block_per_row() => "block/row",
            _ => "thread/row",
        };
        writeln!(
            out,
            "{index:<4} {:<label_width$}  {symbol:<symbol_width$}  {shape:<10}  {bytes:>7} B PTX",
            k.label
        )
        .map_err(io)?;
    }
    let (major, minor) = nvrtc.version();
    write!(
        out,
        "{} kernels ({} distinct) in {name}: {} B of PTX for {} with NVRTC {major}.{minor}",
        pk.kernels.len(),
        kernels.len(),
        ptx.text.len(),
        args.arch
    )
    .map_err(io)?;
    if !pk.native.is_empty() {
        let names: Vec<&str> = pk.native.iter().map(|(n, _)| n.as_str()).collect();
        write!(out, "; native, not generated: {}", names.join(", ")).map_err(io)?;
    }
    writeln!(out).map_err(io)?;
    Ok(EXIT_OK)
}
