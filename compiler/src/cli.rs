//! The `moec` command line. [`run`] takes the arguments and output streams so
//! tests drive the whole CLI in-process; `main.rs` only wires it to the process.
//!
//! Exit codes: 0 success, 1 the input was rejected (errors in a `.moe` file or a
//! config), 2 usage errors (bad flags, unreadable files). A panic is a bug.

use clap::{Parser, Subcommand, ValueEnum};
use moec_lang::{render, Checked};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const EXIT_OK: i32 = 0;
pub const EXIT_REJECTED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
/// Most diagnostics printed for one file.
pub const MAX_SHOWN_DIAGNOSTICS: usize = 100;

#[derive(Parser, Debug)]
#[command(
    name = "moec",
    version,
    about = "Compiler for Mixture-of-Experts layers with expert parallelism"
)]
struct Cli {
    /// Colour diagnostics: auto (when stderr is a terminal), always or never.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    color: Color,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Color {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check .moe files and report every error in them.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print a .moe file in canonical form.
    Fmt {
        file: PathBuf,
        /// Rewrite the file in place.
        #[arg(short, long, conflicts_with = "check")]
        write: bool,
        /// Exit with 1 if the file is not in canonical form; print nothing else.
        #[arg(long)]
        check: bool,
    },
    /// Turn a Hugging Face config.json into a .moe layer.
    Import {
        config: PathBuf,
        /// Write the layer here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        mesh: ImportMesh,
    },
    /// Compile a .moe file (for now: check it and print the validated layer and its sizes).
    Build { file: PathBuf },
}

#[derive(clap::Args, Debug)]
struct ImportMesh {
    /// Nodes in the mesh.
    #[arg(long, default_value_t = 1)]
    nodes: u64,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u64,
    /// Device preset: H100, H200, H800, A100 or B200.
    #[arg(long, default_value = "H100")]
    device: String,
    /// Expert-parallel degree (default: the largest that divides both the GPUs and the experts).
    #[arg(long)]
    ep: Option<u64>,
    /// Tokens per rank.
    #[arg(long, default_value_t = 4096)]
    tokens_per_rank: u64,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

/// Runs the CLI on `args` (including the program name) and returns the exit code.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write, stderr_is_tty: bool) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                err.write_all(text.as_bytes())
            } else {
                out.write_all(text.as_bytes())
            };
            return code;
        }
    };
    let color = match cli.color {
        Color::Always => true,
        Color::Never => false,
        Color::Auto => stderr_is_tty,
    };
    let mut ctx = Ctx { out, err, color };
    let result = match cli.command {
        Command::Check { files } => ctx.check(&files),
        Command::Fmt { file, write, check } => ctx.fmt(&file, write, check),
        Command::Import {
            config,
            output,
            mesh,
        } => ctx.import(&config, output.as_deref(), &mesh),
        Command::Build { file } => ctx.build(&file),
    };
    match result {
        Ok(code) => code,
        Err(Failure(code, message)) => {
            let _ = writeln!(ctx.err, "error: {message}");
            code
        }
    }
}

/// An exit code and the message that goes with it.
struct Failure(i32, String);

struct Ctx<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
    color: bool,
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure(EXIT_USAGE, format!("cannot read `{}`: {e}", path.display())))
}

fn io(e: std::io::Error) -> Failure {
    Failure(EXIT_USAGE, format!("cannot write output: {e}"))
}

impl Ctx<'_> {
    fn report(&mut self, path: &Path, source: &str, checked: &Checked) -> Result<(), Failure> {
        // A file of garbage can have thousands of errors; the first ones say enough.
        let shown = checked.diagnostics.len().min(MAX_SHOWN_DIAGNOSTICS);
        if shown > 0 {
            let text = render(
                &path.display().to_string(),
                source,
                &checked.diagnostics[..shown],
                self.color,
            );
            self.err.write_all(text.as_bytes()).map_err(io)?;
        }
        if checked.diagnostics.len() > shown {
            writeln!(
                self.err,
                "... and {} more diagnostic(s) not shown",
                checked.diagnostics.len() - shown
            )
            .map_err(io)?;
        }
        Ok(())
    }

    fn check(&mut self, files: &[PathBuf]) -> Result<i32, Failure> {
        let mut code = EXIT_OK;
        for path in files {
            let source = match read(path) {
                Ok(s) => s,
                Err(Failure(c, m)) => {
                    writeln!(self.err, "error: {m}").map_err(io)?;
                    code = code.max(c);
                    continue;
                }
            };
            let checked = moec_lang::check_source(&source);
            self.report(path, &source, &checked)?;
            match &checked.program {
                Some((p, d)) => writeln!(
                    self.out,
                    "{}: ok: layer {} ({} experts, top-{}) on {} ranks",
                    path.display(),
                    p.layer.name,
                    p.layer.experts.count,
                    p.layer.router.top_k,
                    d.world_size
                )
                .map_err(io)?,
                None => {
                    let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
                    writeln!(self.err, "{}: {errors} error(s)", path.display()).map_err(io)?;
                    code = code.max(EXIT_REJECTED);
                }
            }
        }
        Ok(code)
    }

    fn fmt(&mut self, path: &Path, write: bool, check: bool) -> Result<i32, Failure> {
        let source = read(path)?;
        let formatted = match moec_lang::format_source(&source) {
            Ok(f) => f,
            Err(diagnostics) => {
                let text = render(
                    &path.display().to_string(),
                    &source,
                    &diagnostics,
                    self.color,
                );
                self.err.write_all(text.as_bytes()).map_err(io)?;
                writeln!(
                    self.err,
                    "{}: not formatted: the file has syntax errors",
                    path.display()
                )
                .map_err(io)?;
                return Ok(EXIT_REJECTED);
            }
        };
        if check {
            if formatted == source {
                return Ok(EXIT_OK);
            }
            writeln!(
                self.err,
                "{}: not in canonical form (run `moec fmt -w {}`)",
                path.display(),
                path.display()
            )
            .map_err(io)?;
            return Ok(EXIT_REJECTED);
        }
        if write {
            if formatted != source {
                std::fs::write(path, &formatted).map_err(|e| {
                    Failure(
                        EXIT_USAGE,
                        format!("cannot write `{}`: {e}", path.display()),
                    )
                })?;
            }
            return Ok(EXIT_OK);
        }
        self.out.write_all(formatted.as_bytes()).map_err(io)?;
        Ok(EXIT_OK)
    }

    fn import(
        &mut self,
        config: &Path,
        output: Option<&Path>,
        mesh: &ImportMesh,
    ) -> Result<i32, Failure> {
        let json = read(config)?;
        let options = moec_lang::import::ImportOptions {
            nodes: mesh.nodes,
            gpus_per_node: mesh.gpus_per_node,
            device: mesh.device.clone(),
            ep: mesh.ep,
            tokens_per_rank: mesh.tokens_per_rank,
            dtype: mesh.dtype.clone(),
            source_name: config.display().to_string(),
        };
        let text = match moec_lang::import::import_config(&json, &options) {
            Ok(t) => t,
            Err(e) => return Err(Failure(EXIT_REJECTED, format!("{}: {e}", config.display()))),
        };
        match output {
            Some(path) => {
                std::fs::write(path, &text).map_err(|e| {
                    Failure(
                        EXIT_USAGE,
                        format!("cannot write `{}`: {e}", path.display()),
                    )
                })?;
                writeln!(self.err, "wrote {}", path.display()).map_err(io)?;
            }
            None => self.out.write_all(text.as_bytes()).map_err(io)?,
        }
        Ok(EXIT_OK)
    }

    fn build(&mut self, path: &Path) -> Result<i32, Failure> {
        let source = read(path)?;
        let checked = moec_lang::check_source(&source);
        self.report(path, &source, &checked)?;
        match &checked.program {
            Some((program, derived)) => {
                write!(self.out, "{program}{derived}").map_err(io)?;
                Ok(EXIT_OK)
            }
            None => {
                let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
                writeln!(self.err, "{}: {errors} error(s)", path.display()).map_err(io)?;
                Ok(EXIT_REJECTED)
            }
        }
    }
}
