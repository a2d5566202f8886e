//! The `moec` command line. [`run`] takes the arguments and output streams so
//! tests drive the whole CLI in-process; `main.rs` only wires it to the process.
//!
//! Exit codes: 0 success, 1 the input was rejected (errors in a `.moe` file or a
//! config), 2 usage errors (bad flags, unreadable files). A panic is a bug.

use crate::compile::{compile, fits_device, memory_warning, rank_memory_bytes, Compiled, Options};
use crate::timeline::{svg::gantt_svg, trace::chrome_trace};
use clap::{Parser, Subcommand, ValueEnum};
use moec_lang::{render, Checked};
use moec_runtime::plan::{human_bytes, human_rate, Plan};
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
        /// The .moe files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Go on (with a warning) when the plan does not fit the device's
        /// memory; without it, such a plan is an error.
        #[arg(long)]
        allow_oversize: bool,
    },
    /// Print a .moe file in canonical form.
    Fmt {
        /// The .moe file to format.
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
        /// A Hugging Face `config.json`.
        config: PathBuf,
        /// Write the layer here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        mesh: ImportMesh,
        /// Import a model moec does not know even when its config has fields
        /// that may change the layer's meaning (they are ignored, with a warning).
        #[arg(long)]
        generic: bool,
    },
    /// Compile a .moe file into an execution plan.
    Build {
        /// The .moe file describing the layer and its mesh.
        file: PathBuf,
        /// Write the output here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// What to write: the plan as text or JSON, a Chrome/Perfetto trace of the
        /// simulated timeline, a Gantt chart (SVG) of the streams against the
        /// no-overlap baseline, or the validated layer with its derived sizes.
        #[arg(long, value_enum, default_value_t = Emit::Text)]
        emit: Emit,
        /// Go on (with a warning) when the plan does not fit the device's
        /// memory; without it, such a plan is an error.
        #[arg(long)]
        allow_oversize: bool,
    },
    /// Say why the plan is what it is: the rewrites that fired, the e-graph, and
    /// the chosen plan's cost against the no-overlap baseline, phase by phase.
    Explain {
        /// The .moe file describing the layer and its mesh.
        file: PathBuf,
        /// Go on (with a warning) when the plan does not fit the device's
        /// memory; without it, such a plan is an error.
        #[arg(long)]
        allow_oversize: bool,
    },
    /// Predict the layer's time with the cost model and the timeline simulator.
    Simulate {
        /// The .moe file describing the layer and its mesh.
        file: PathBuf,
        /// Tokens per rank instead of the file's `tokens_per_rank`.
        #[arg(long)]
        tokens: Option<u64>,
        /// Predict under the routing of a statistics file (`moec run
        /// --stats-out`) instead of uniform routing: the busiest rank's
        /// load and the ranks and nodes tokens reach.
        #[arg(long, value_name = "STATS")]
        stats: Option<PathBuf>,
        /// Print JSON: `total_us`, `baseline_total_us` and `phases` with
        /// `name`, `time_us`, `bytes` and `exposed_us`.
        #[arg(long)]
        json: bool,
    },
    /// Choose which experts go on which EP rank (and which get extra copies)
    /// for the traffic of a routing statistics file, by the simulator.
    Place {
        /// The .moe file describing the layer and its mesh.
        file: PathBuf,
        /// The routing statistics (`moec run --stats-out`, or your router's logs).
        #[arg(long, value_name = "STATS")]
        stats: PathBuf,
        /// Write the .moe file with the chosen placement here.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Extra copies of hot experts to place (each on a rank of its own).
        #[arg(long, default_value_t = 0)]
        replicas: u64,
        /// Print JSON: every candidate with its predicted time, imbalance,
        /// remote nodes per token and co-activation cut; the chosen first.
        #[arg(long)]
        json: bool,
    },
    /// Rank the meshes of N GPUs for a layer (ep x etp x dp, nodes, the
    /// capacity factor) by predicted time and memory per rank.
    Tune {
        /// The .moe file describing the layer (its mesh gives the node size,
        /// the device and the links).
        file: PathBuf,
        /// GPUs in all.
        #[arg(long)]
        gpus: u64,
        /// Nodes (default: nodes of the file's GPUs per node).
        #[arg(long)]
        nodes: Option<u64>,
        /// A device preset instead of the file's (H100, H200, H800, A100, ...).
        #[arg(long)]
        device: Option<String>,
        /// Write the best mesh's .moe file here.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Print JSON: every candidate, ranked.
        #[arg(long)]
        json: bool,
    },
    /// Compile a .moe file and run the layer: on the CPU (every rank a
    /// thread) or on NVIDIA GPUs.
    Run(RunArgs),
    /// Print the plan's kernels as CUDA C, or compile them with NVRTC (--check).
    Kernels(crate::kernels_cmd::KernelsArgs),
    /// Time the layer's forward pass on the CPU backend against a loop over
    /// experts and against its GEMMs alone.
    Bench(crate::bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The .moe file describing the layer and its mesh.
    file: PathBuf,
    /// Where to run: `cpu` (every rank a thread of this process) or `cuda`
    /// (every rank a virtual rank of GPU 0, or one GPU per process under torchrun).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// Ranks (one EP group; nodes keep the file's GPUs per node). Default: the file's mesh.
    #[arg(long)]
    ranks: Option<u64>,
    /// Tokens per rank. Default: the file's `tokens_per_rank`.
    #[arg(long)]
    tokens: Option<u64>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Storage dtype of activations and weights (accumulation is f32).
    #[arg(long, value_enum)]
    dtype: Option<RunDtype>,
    /// Model width, to shrink a real layer for a quick run.
    #[arg(long)]
    hidden: Option<u64>,
    /// Experts' intermediate size (shared experts scale with it).
    #[arg(long)]
    ffn: Option<u64>,
    /// Load the weights from a safetensors checkpoint (Hugging Face names).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Prefix of the layer's tensor names in the checkpoint, e.g. `model.layers.3.`.
    #[arg(long, default_value = "", requires = "weights")]
    prefix: String,
    /// MoE layer N of the checkpoint: its prefix is found in the file
    /// (`model.layers.N.`, `language_model.model.layers.N.`, ...).
    #[arg(
        long,
        value_name = "N",
        requires = "weights",
        conflicts_with = "prefix"
    )]
    layer: Option<u64>,
    /// Write `run.safetensors` (inputs, outputs, weights), `config.json` and
    /// (CPU backend) `routing-stats.json` here.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Write the pass's routing statistics here (JSON: every token's picks,
    /// tokens per expert, co-activation counts), for `moec simulate --stats`.
    #[arg(long, value_name = "FILE")]
    stats_out: Option<PathBuf>,
    /// Also run K times with the streams interleaved in random legal orders and
    /// fail if any output differs (a race check of the plan's events).
    #[arg(long, value_name = "K")]
    shuffle: Option<u32>,
    /// Print a warning instead of failing when the output has non-finite
    /// values (the message names the phase where they first appear).
    #[arg(long)]
    allow_non_finite: bool,
    /// With `--backend cuda`: run the pass as a CUDA graph (capacity plans
    /// with every rank on this GPU; dropless plans read the routing on the host).
    #[arg(long)]
    graph: bool,
}

/// Where `moec run` and `moec bench` execute a plan.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum RunDtype {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Emit {
    Text,
    Json,
    Trace,
    Svg,
    Layer,
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
    let mut ctx = Ctx {
        out,
        err,
        color,
        // `simulate` predicts what a layer would take even where it does not
        // fit (a what-if); it warns.
        allow_oversize: true,
    };
    let result = match cli.command {
        Command::Check {
            files,
            allow_oversize,
        } => {
            ctx.allow_oversize = allow_oversize;
            ctx.check(&files)
        }
        Command::Fmt { file, write, check } => ctx.fmt(&file, write, check),
        Command::Import {
            config,
            output,
            mesh,
            generic,
        } => ctx.import(&config, output.as_deref(), &mesh, generic),
        Command::Build {
            file,
            output,
            emit,
            allow_oversize,
        } => {
            ctx.allow_oversize = allow_oversize;
            ctx.build(&file, output.as_deref(), emit)
        }
        Command::Explain {
            file,
            allow_oversize,
        } => {
            ctx.allow_oversize = allow_oversize;
            ctx.explain(&file)
        }
        Command::Simulate {
            file,
            tokens,
            stats,
            json,
        } => ctx.simulate(&file, tokens, stats.as_deref(), json),
        Command::Place {
            file,
            stats,
            output,
            replicas,
            json,
        } => ctx.place(&file, &stats, output.as_deref(), replicas, json),
        Command::Tune {
            file,
            gpus,
            nodes,
            device,
            output,
            json,
        } => {
            let options = crate::tune::TuneOptions {
                gpus,
                nodes,
                device,
            };
            ctx.tune(&file, &options, output.as_deref(), json)
        }
        Command::Run(args) => ctx.run(&args),
        Command::Kernels(args) => ctx.kernels(&args),
        Command::Bench(args) => crate::bench::bench(&args, ctx.out, ctx.err, ctx.color)
            .map_err(|(code, message)| Failure(code, message)),
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
    /// A plan that does not fit the device is a warning, not an error.
    allow_oversize: bool,
}

fn read(path: &Path) -> Result<String, Failure> {
    moec_runtime::files::read_to_string(path)
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

    /// A plan that does not fit its device is an error, unless the command
    /// allows it (then [`Report::warnings`](crate::compile::Report) says so).
    fn fits(&mut self, path: &Path, plan: &Plan) -> Result<(), Failure> {
        if self.allow_oversize || fits_device(plan) {
            return Ok(());
        }
        Err(Failure(
            EXIT_REJECTED,
            format!(
                "{}: {}; pass --allow-oversize to go on anyway",
                path.display(),
                memory_warning(plan)
            ),
        ))
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
                Some((p, d)) => {
                    let compiled = match compile(p, &Options::default()) {
                        Ok(c) => c,
                        Err(e) => {
                            writeln!(self.err, "error: {}: {e}", path.display()).map_err(io)?;
                            code = code.max(EXIT_REJECTED);
                            continue;
                        }
                    };
                    if let Err(Failure(c, m)) = self.fits(path, &compiled.plan) {
                        writeln!(self.err, "error: {m}").map_err(io)?;
                        code = code.max(c);
                        continue;
                    }
                    for warning in &compiled.report.warnings {
                        writeln!(self.err, "warning: {}: {warning}", path.display()).map_err(io)?;
                    }
                    let plan = compiled.plan;
                    writeln!(
                        self.out,
                        "{}: ok: layer {} ({} experts, top-{}) on {} ranks, {} per rank of the {}'s {}",
                        path.display(),
                        p.layer.name,
                        p.layer.experts.count,
                        p.layer.router.top_k,
                        d.world_size,
                        human_bytes(rank_memory_bytes(&plan)),
                        plan.mesh.device.name,
                        human_rate(plan.mesh.device.memory, "B"),
                    )
                    .map_err(io)?
                }
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
        generic: bool,
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
            generic,
        };
        let imported = match moec_lang::import::import(&json, &options) {
            Ok(i) => i,
            Err(e) => return Err(Failure(EXIT_REJECTED, format!("{}: {e}", config.display()))),
        };
        for warning in &imported.warnings {
            writeln!(self.err, "warning: {}: {warning}", config.display()).map_err(io)?;
        }
        let text = imported.text;
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

    /// Checks a file and compiles it; diagnostics go to stderr.
    fn compile(&mut self, path: &Path, options: &Options) -> Result<Option<Compiled>, Failure> {
        let source = read(path)?;
        let checked = moec_lang::check_source(&source);
        self.report(path, &source, &checked)?;
        match &checked.program {
            Some((program, _)) => {
                let compiled = compile(program, options)
                    .map_err(|e| Failure(EXIT_REJECTED, format!("{}: {e}", path.display())))?;
                self.fits(path, &compiled.plan)?;
                for warning in &compiled.report.warnings {
                    writeln!(self.err, "warning: {}: {warning}", path.display()).map_err(io)?;
                }
                Ok(Some(compiled))
            }
            None => {
                let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
                writeln!(self.err, "{}: {errors} error(s)", path.display()).map_err(io)?;
                Ok(None)
            }
        }
    }

    fn build(&mut self, path: &Path, output: Option<&Path>, emit: Emit) -> Result<i32, Failure> {
        if emit == Emit::Layer {
            let source = read(path)?;
            let checked = moec_lang::check_source(&source);
            self.report(path, &source, &checked)?;
            let Some((program, derived)) = &checked.program else {
                let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
                writeln!(self.err, "{}: {errors} error(s)", path.display()).map_err(io)?;
                return Ok(EXIT_REJECTED);
            };
            let text = format!("{program}{derived}");
            return self.emit(output, &text);
        }
        let Some(c) = self.compile(path, &Options::default())? else {
            return Ok(EXIT_REJECTED);
        };
        let text = match emit {
            Emit::Text => c.plan.to_string(),
            Emit::Json => format!("{}\n", c.plan.to_json()),
            Emit::Trace => format!("{}\n", chrome_trace(&c.plan, &c.timeline)),
            Emit::Layer => String::new(),
            Emit::Svg => {
                let title = format!(
                    "{}: {} on {} ranks",
                    c.plan.layer.name,
                    path.display(),
                    c.plan.mesh.world_size()
                );
                gantt_svg(
                    &title,
                    &[
                        ("chosen plan", &c.plan, &c.timeline),
                        ("no-overlap baseline", &c.baseline, &c.baseline_timeline),
                    ],
                )
            }
        };
        self.emit(output, &text)
    }

    fn emit(&mut self, output: Option<&Path>, text: &str) -> Result<i32, Failure> {
        match output {
            Some(out) => std::fs::write(out, text).map_err(|e| {
                Failure(EXIT_USAGE, format!("cannot write `{}`: {e}", out.display()))
            })?,
            None => self.out.write_all(text.as_bytes()).map_err(io)?,
        }
        Ok(EXIT_OK)
    }

    fn kernels(&mut self, args: &crate::kernels_cmd::KernelsArgs) -> Result<i32, Failure> {
        // The kernels of the plan the CUDA backend runs.
        let Some(c) = self.compile(&args.file, &Options::cuda())? else {
            return Ok(EXIT_REJECTED);
        };
        crate::kernels_cmd::kernels(args, &c.plan, self.out, self.err)
            .map_err(|(code, message)| Failure(code, message))
    }

    fn explain(&mut self, path: &Path) -> Result<i32, Failure> {
        let Some(c) = self.compile(path, &Options::default())? else {
            return Ok(EXIT_REJECTED);
        };
        self.out
            .write_all(crate::explain::explain(&c).as_bytes())
            .map_err(io)?;
        Ok(EXIT_OK)
    }

    fn simulate(
        &mut self,
        path: &Path,
        tokens: Option<u64>,
        stats: Option<&Path>,
        json: bool,
    ) -> Result<i32, Failure> {
        if tokens == Some(0) {
            return Err(Failure(EXIT_USAGE, "--tokens must be at least 1".into()));
        }
        let stats = match stats {
            Some(p) => Some(
                moec_runtime::stats::RoutingStatistics::load(p)
                    .map_err(|e| Failure(EXIT_REJECTED, e.to_string()))?,
            ),
            None => None,
        };
        let measured = stats.is_some();
        let Some(c) = self.compile(
            path,
            &Options {
                tokens,
                stats,
                ..Options::default()
            },
        )?
        else {
            return Ok(EXIT_REJECTED);
        };
        if json {
            self.print_json(&c.simulation_json(measured))?;
        } else {
            let p = &c.plan;
            writeln!(
                self.out,
                "{}: {} tokens per rank on {} ranks; predicted {:.1} us ({:.1} us without overlap, {:.2}x)\n",
                p.layer.name,
                p.layer.tokens_per_rank,
                p.mesh.world_size(),
                c.timeline.total_us,
                c.baseline_timeline.total_us,
                c.baseline_timeline.total_us / c.timeline.total_us.max(1e-9),
            )
            .map_err(io)?;
            if measured {
                writeln!(
                    self.out,
                    "measured routing: the busiest EP rank gets {:.2}x the mean load{}\n",
                    c.report.load_skew,
                    if p.layer.capacity == moec_runtime::plan::CapacityConfig::Dropless {
                        ""
                    } else {
                        " (a capacity layer computes every slot: its time does not follow the load)"
                    }
                )
                .map_err(io)?;
            }
            write!(self.out, "{}", c.timeline.phase_table()).map_err(io)?;
        }
        Ok(EXIT_OK)
    }
}

/// Largest total activation memory `moec run` allocates without being told to
/// shrink the layer.
const RUN_MEMORY_LIMIT: u64 = 16 << 30;

/// What `moec run` says about loaded weights: where the layer was, in which
/// layout, and what was dequantised.
fn weights_line(path: &Path, report: &moec_runtime::weights::LoadReport) -> String {
    let mut line = format!(
        "weights: {}, prefix `{}`, {}",
        path.display(),
        report.prefix,
        report.family.describe()
    );
    if !report.dequantised.is_empty() {
        let parts: Vec<String> = report
            .dequantised
            .iter()
            .map(|(format, n)| format!("{n} {format}"))
            .collect();
        line.push_str(&format!("; dequantised on the CPU: {}", parts.join(", ")));
    }
    line
}

impl Ctx<'_> {
    /// Reads and checks a `.moe` file, its diagnostics on stderr: its text
    /// and program, or `None` when it has errors.
    fn checked_program(
        &mut self,
        path: &Path,
    ) -> Result<Option<(String, moec_lang::Program)>, Failure> {
        let source = read(path)?;
        let checked = moec_lang::check_source(&source);
        self.report(path, &source, &checked)?;
        match checked.program {
            Some((program, _)) => Ok(Some((source, program))),
            None => {
                let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
                writeln!(self.err, "{}: {errors} error(s)", path.display()).map_err(io)?;
                Ok(None)
            }
        }
    }

    /// `value` as pretty JSON on stdout.
    fn print_json(&mut self, value: &serde_json::Value) -> Result<(), Failure> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| Failure(EXIT_USAGE, format!("cannot print JSON: {e}")))?;
        writeln!(self.out, "{text}").map_err(io)
    }

    fn tune(
        &mut self,
        path: &Path,
        options: &crate::tune::TuneOptions,
        output: Option<&Path>,
        json: bool,
    ) -> Result<i32, Failure> {
        let Some((source, program)) = self.checked_program(path)? else {
            return Ok(EXIT_REJECTED);
        };
        let program = &program;
        // Progress on stderr, a line per tenth of the candidates.
        let err = &mut *self.err;
        let mut shown = 0;
        let mut progress = |done: usize, total: usize| {
            let tenth = (done * 10) / total.max(1);
            if total > 10 && tenth > shown {
                shown = tenth;
                let _ = writeln!(err, "tune: {done} of {total} meshes compiled");
            }
        };
        let ranked = crate::tune::tune(&source, program, options, &mut progress)
            .map_err(|e| Failure(EXIT_REJECTED, format!("{}: {e}", path.display())))?;
        let Some(best) = ranked.first() else {
            return Err(Failure(
                EXIT_REJECTED,
                format!(
                    "{}: no mesh of {} GPUs passes the checker for this layer",
                    path.display(),
                    options.gpus
                ),
            ));
        };
        if json {
            let rows: Vec<serde_json::Value> = ranked
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "nodes": t.nodes, "gpus_per_node": t.gpus_per_node,
                        "ep": t.ep, "etp": t.etp, "dp": t.dp,
                        "capacity_factor": t.capacity_factor,
                        "total_us": t.total_us, "memory_bytes": t.memory_bytes,
                        "fits": t.fits, "chunks": t.chunks,
                        "tokens_travel": t.routing.name(), "own": t.own,
                    })
                })
                .collect();
            self.print_json(&serde_json::json!({
                "layer": program.layer.name,
                "gpus": options.gpus,
                "candidates": rows,
            }))?;
        } else {
            writeln!(
                self.out,
                "{}: {} meshes of {} GPUs ({} node(s) of {}), ranked by predicted time (fitting plans first)\n",
                program.layer.name,
                ranked.len(),
                options.gpus,
                best.nodes,
                best.gpus_per_node
            )
            .map_err(io)?;
            let factor = ranked.iter().any(|t| t.capacity_factor.is_some());
            writeln!(
                self.out,
                "{:>4} {:>5} {:>4} {:>4}{} {:>13} {:>12} {:>7}  tokens travel",
                "rank",
                "ep",
                "etp",
                "dp",
                if factor { "  capacity" } else { "" },
                "predicted us",
                "memory/rank",
                "chunks",
            )
            .map_err(io)?;
            for (i, t) in ranked.iter().enumerate() {
                let mut note = Vec::new();
                if t.own {
                    note.push("the file's mesh");
                }
                if !t.fits {
                    note.push("does not fit the device");
                }
                writeln!(
                    self.out,
                    "{:>4} {:>5} {:>4} {:>4}{} {:>13.1} {:>12} {:>7}  {}{}",
                    i + 1,
                    t.ep,
                    t.etp,
                    t.dp,
                    match t.capacity_factor {
                        Some(f) if factor => format!("  {f:>8}"),
                        _ if factor => format!("  {:>8}", "-"),
                        _ => String::new(),
                    },
                    t.total_us,
                    human_bytes(t.memory_bytes),
                    t.chunks,
                    t.routing.name(),
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", note.join(", "))
                    }
                )
                .map_err(io)?;
            }
        }
        if let Some(out) = output {
            std::fs::write(out, &best.source).map_err(|e| {
                Failure(EXIT_USAGE, format!("cannot write `{}`: {e}", out.display()))
            })?;
            writeln!(self.err, "wrote {}", out.display()).map_err(io)?;
        }
        Ok(EXIT_OK)
    }

    fn place(
        &mut self,
        path: &Path,
        stats: &Path,
        output: Option<&Path>,
        replicas: u64,
        json: bool,
    ) -> Result<i32, Failure> {
        let Some((source, program)) = self.checked_program(path)? else {
            return Ok(EXIT_REJECTED);
        };
        let program = &program;
        let stats = moec_runtime::stats::RoutingStatistics::load(stats)
            .map_err(|e| Failure(EXIT_REJECTED, e.to_string()))?;
        let placed = crate::place::place(program, &stats, replicas)
            .map_err(|e| Failure(EXIT_REJECTED, format!("{}: {e}", path.display())))?;
        let best = placed.best();
        let placed_source = crate::place::rewrite_source(&source, &best.layout)
            .map_err(|e| Failure(EXIT_REJECTED, format!("{}: {e}", path.display())))?;
        if json {
            let candidates: Vec<serde_json::Value> = placed
                .candidates
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "placement": c.name,
                        "total_us": c.total_us,
                        "imbalance": c.imbalance,
                        "remote_nodes_per_token": c.remote_nodes,
                        "coactivation_cut": c.cut,
                        "experts_of_rank": c.layout.primaries,
                        "replicas": c.layout.replicas,
                    })
                })
                .collect();
            self.print_json(&serde_json::json!({
                "layer": program.layer.name,
                "tokens": stats.tokens,
                "candidates": candidates,
            }))?;
        } else {
            writeln!(
                self.out,
                "{}: {} experts on {} EP ranks, {} node(s); statistics of {} tokens\n",
                program.layer.name,
                program.layer.experts.count,
                program.mesh.ep,
                program.mesh.nodes,
                stats.tokens
            )
            .map_err(io)?;
            writeln!(
                self.out,
                "{:<26} {:>13} {:>13} {:>13} {:>12}",
                "placement", "predicted us", "busiest/mean", "remote nodes", "cut pairs"
            )
            .map_err(io)?;
            for (i, c) in placed.candidates.iter().enumerate() {
                writeln!(
                    self.out,
                    "{:<26} {:>13.1} {:>13.2} {:>13.2} {:>12}{}",
                    c.name,
                    c.total_us,
                    c.imbalance,
                    c.remote_nodes,
                    c.cut,
                    if i == 0 { "  <- chosen" } else { "" }
                )
                .map_err(io)?;
            }
        }
        match output {
            Some(out) => {
                std::fs::write(out, &placed_source).map_err(|e| {
                    Failure(EXIT_USAGE, format!("cannot write `{}`: {e}", out.display()))
                })?;
                writeln!(self.err, "wrote {}", out.display()).map_err(io)?;
            }
            None if !json => {
                writeln!(self.out, "\n{}", best.layout.moe_entries().trim_end()).map_err(io)?;
            }
            None => {}
        }
        Ok(EXIT_OK)
    }

    /// `moec run --stats-out`: the pass's routing as a statistics file.
    fn write_stats(
        &mut self,
        path: &Path,
        layer: &moec_runtime::plan::LayerConfig,
        result: &moec_runtime::Forward,
    ) -> Result<(), Failure> {
        let tokens = save_stats(path, layer, result)?;
        writeln!(
            self.out,
            "stats: {tokens} tokens' routing written to {}",
            path.display()
        )
        .map_err(io)?;
        Ok(())
    }

    fn run(&mut self, a: &RunArgs) -> Result<i32, Failure> {
        use moec_runtime::cpu::{CpuBackend, CpuOptions};
        use moec_runtime::weights::{
            load_checkpoint, random_inputs, save_run, LayerWeights, Select,
        };
        if a.graph && a.backend != Backend::Cuda {
            return Err(Failure(
                EXIT_USAGE,
                "--graph runs the pass as a CUDA graph; it needs --backend cuda".into(),
            ));
        }
        if a.allow_non_finite && a.backend == Backend::Cuda {
            return Err(Failure(
                EXIT_USAGE,
                "--allow-non-finite is the CPU backend's (the CUDA backend fails on non-finite outputs); use --backend cpu".into(),
            ));
        }
        if a.backend == Backend::Cuda {
            crate::run::cuda_preflight(a.shuffle.is_some())
                .map_err(|(code, e)| Failure(code, e))?;
        }
        let source = read(&a.file)?;
        let checked = moec_lang::check_source(&source);
        self.report(&a.file, &source, &checked)?;
        let Some((program, _)) = &checked.program else {
            let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
            writeln!(self.err, "{}: {errors} error(s)", a.file.display()).map_err(io)?;
            return Ok(EXIT_REJECTED);
        };
        let written = program.clone();
        let mut program = program.clone();
        let overrides = crate::run::Overrides {
            ranks: a.ranks,
            tokens: a.tokens,
            dtype: a.dtype.map(|d| match d {
                RunDtype::F32 => moec_lang::spec::DType::F32,
                RunDtype::Bf16 => moec_lang::spec::DType::Bf16,
                RunDtype::F16 => moec_lang::spec::DType::F16,
            }),
            hidden: a.hidden,
            ffn: a.ffn,
        };
        crate::run::apply(&mut program, &overrides).map_err(|e| Failure(EXIT_USAGE, e))?;
        let options = match a.backend {
            Backend::Cpu => Options::default(),
            Backend::Cuda => Options::cuda_run(a.graph),
        };
        let compiled = compile(&program, &options)
            .map_err(|e| Failure(EXIT_REJECTED, format!("{}: {e}", a.file.display())))?;
        let plan = compiled.plan;
        if a.hidden.is_some() || a.ffn.is_some() || a.tokens.is_some() {
            // Shrinking a layer can change what pays: say so rather than let a
            // user test a different plan than the one the file compiles to.
            let mut full = written;
            let keep = crate::run::Overrides {
                ranks: overrides.ranks,
                dtype: overrides.dtype,
                ..Default::default()
            };
            if crate::run::apply(&mut full, &keep).is_ok() {
                if let Ok(c) = compile(&full, &options) {
                    if let Some(note) = crate::run::shrink_note(&plan, &c.plan) {
                        writeln!(self.err, "note: {note}").map_err(io)?;
                    }
                }
            }
        }
        let ranks = plan.mesh.world_size();
        // Everything this process will hold, before any of it is allocated
        // (the embedding API sizes layers by the same figures).
        let need = moec_runtime::footprint::Footprint::of(&plan);
        let available = moec_runtime::footprint::mem_available().unwrap_or(u64::MAX);
        let (limit, whose) = if available < RUN_MEMORY_LIMIT {
            (available, "this machine has available")
        } else {
            (RUN_MEMORY_LIMIT, "moec run allows")
        };
        if need.total() > limit {
            let bytes = moec_runtime::plan::human_bytes;
            return Err(Failure(
                EXIT_USAGE,
                format!(
                    "{} ranks need {} in this process ({} of activations, {} of weights, {} of inputs and outputs), more than the {} {whose}; shrink the layer with --hidden, --ffn, --tokens or --ranks",
                    ranks,
                    bytes(need.total()),
                    bytes(need.activations),
                    bytes(need.weights),
                    bytes(need.io),
                    bytes(limit),
                ),
            ));
        }
        let layer = plan.layer.clone();
        let (weights, report) = match &a.weights {
            Some(path) => {
                let select = match a.layer {
                    Some(n) => Select::Layer(n),
                    None => Select::Prefix(a.prefix.clone()),
                };
                let (w, report) = load_checkpoint(path, &layer, &select).map_err(|e| {
                    // An unreadable file is a usage error (2), as the README says;
                    // a readable checkpoint that does not fit the layer is rejected (1).
                    let code = match e {
                        moec_runtime::weights::WeightsError::Io { .. } => EXIT_USAGE,
                        _ => EXIT_REJECTED,
                    };
                    Failure(code, e.to_string())
                })?;
                (w, Some(report))
            }
            None => (LayerWeights::random(&layer, a.seed), None),
        };
        let tokens = layer.tokens_per_rank as usize;
        let inputs = random_inputs(&layer, ranks as usize, tokens, a.seed);
        writeln!(
            self.out,
            "moec run: layer {} on {} rank(s), {} backend; {} tokens per rank, hidden {}, {} experts x {}({}), {}, seed {}",
            layer.name,
            ranks,
            if a.backend == Backend::Cuda { "cuda" } else { "cpu" },
            tokens,
            layer.hidden,
            layer.experts,
            layer.ffn.name(),
            layer.intermediate,
            layer.dtype.name(),
            a.seed
        )
        .map_err(io)?;
        if let (Some(report), Some(path)) = (&report, &a.weights) {
            writeln!(self.out, "{}", weights_line(path, report)).map_err(io)?;
        }
        writeln!(
            self.out,
            "plan: {} chunk(s), {} dispatch, {} on the wire{}",
            plan.choices.chunks,
            match plan.choices.dispatch {
                moec_runtime::plan::A2aAlgorithm::Flat => "flat",
                moec_runtime::plan::A2aAlgorithm::Hierarchical => "hierarchical",
            },
            plan.choices.dispatch_dtype.name(),
            if plan.choices.shared_concurrent {
                ", shared experts beside the dispatch"
            } else {
                ""
            }
        )
        .map_err(io)?;
        let expected_traffic = crate::run::expected_traffic(&plan);
        let fail = |e: moec_runtime::cpu::ExecError| Failure(EXIT_REJECTED, e.to_string());
        let (result, cpu) = match a.backend {
            Backend::Cpu => {
                let options = CpuOptions {
                    non_finite: if a.allow_non_finite {
                        moec_runtime::cpu::NonFinite::Warn
                    } else {
                        moec_runtime::cpu::NonFinite::Error
                    },
                    ..CpuOptions::default()
                };
                let backend = CpuBackend::new(plan, &weights, options).map_err(fail)?;
                let result = backend.forward(&inputs).map_err(fail)?;
                for warning in &result.warnings {
                    writeln!(self.err, "warning: {warning}").map_err(io)?;
                }
                (result, Some(backend))
            }
            Backend::Cuda => {
                let result = crate::run::cuda_forward(plan, &weights, &inputs, a.graph, self.out)
                    .map_err(|(code, e)| Failure(code, e))?;
                (result, None)
            }
        };
        writeln!(self.out, "\n{:<12} {:>12}", "phase", "time (ms)").map_err(io)?;
        for (phase, seconds) in &result.phase_seconds {
            writeln!(self.out, "{:<12} {:>12.3}", phase.name(), seconds * 1e3).map_err(io)?;
        }
        writeln!(
            self.out,
            "{:<12} {:>12.3}  (phases are means over ranks; streams overlap; the wall time also counts starting every rank's threads)",
            "wall",
            result.wall_seconds * 1e3
        )
        .map_err(io)?;
        if !expected_traffic.is_empty() && !result.traffic.is_empty() {
            writeln!(
                self.out,
                "\ntraffic per rank, counted at the collectives (plan: the cost model's \
                 expectation for uniform routing)"
            )
            .map_err(io)?;
            let table = crate::run::traffic_table(&expected_traffic, &result.traffic);
            self.out.write_all(table.as_bytes()).map_err(io)?;
        }
        let stats = &result.stats;
        writeln!(self.out).map_err(io)?;
        let per = &stats.routed_per_expert;
        if per.len() <= 32 {
            let list: Vec<String> = per
                .iter()
                .enumerate()
                .map(|(e, n)| format!("{e}:{n}"))
                .collect();
            writeln!(self.out, "tokens per expert: {}", list.join(" ")).map_err(io)?;
        } else {
            let min = per.iter().min().copied().unwrap_or(0);
            let max = per.iter().max().copied().unwrap_or(0);
            writeln!(
                self.out,
                "tokens per expert: min {min}, mean {:.1}, max {max} over {} experts",
                stats.assignments as f64 / per.len().max(1) as f64,
                per.len()
            )
            .map_err(io)?;
        }
        writeln!(
            self.out,
            "dropped: {} of {} assignments ({:.2}%)",
            stats.dropped,
            stats.assignments,
            100.0 * stats.dropped as f64 / stats.assignments.max(1) as f64
        )
        .map_err(io)?;
        writeln!(
            self.out,
            "load imbalance (max/mean): {:.2}",
            stats.imbalance()
        )
        .map_err(io)?;
        if let Some(g) = &result.grown {
            let rank = if g.needed.rank_rows > 0 {
                format!(
                    " ({} by-rank rows; held {})",
                    g.needed.rank_rows, g.planned.rank_rows
                )
            } else {
                String::new()
            };
            writeln!(
                self.out,
                "grown: the routing needed {} expert rows of one rank in a chunk, the plan's buffers held {}{rank}; \
                 the pass stopped at the assignment and re-ran on buffers grown to the real counts \
                 ({} run(s) stopped, arena now {} per rank)",
                g.needed.expert_rows,
                g.planned.expert_rows,
                g.reruns,
                human_bytes(g.arena_bytes),
            )
            .map_err(io)?;
        }
        let values = result.outputs.iter().flatten();
        let (mut sum, mut max, mut n) = (0.0f64, 0.0f64, 0usize);
        for v in values {
            sum += f64::from(v.abs());
            max = max.max(f64::from(v.abs()));
            n += 1;
        }
        writeln!(
            self.out,
            "output: mean |y| {:.4}, max |y| {:.4}",
            sum / n.max(1) as f64,
            max
        )
        .map_err(io)?;
        if let (Some(k), Some(backend)) = (a.shuffle, &cpu) {
            for seed in 0..u64::from(k) {
                let shuffled = backend.forward_shuffled(&inputs, seed).map_err(fail)?;
                if let Some((r, i)) = first_difference(&result.outputs, &shuffled.outputs) {
                    writeln!(
                        self.err,
                        "error: race: interleaving {seed} gives a different output at rank {r}, value {i} ({} vs {}); the plan lacks an event",
                        result.outputs[r][i], shuffled.outputs[r][i]
                    )
                    .map_err(io)?;
                    return Ok(EXIT_REJECTED);
                }
            }
            writeln!(
                self.out,
                "shuffle: {k} random interleavings gave identical outputs"
            )
            .map_err(io)?;
        }
        if let Some(path) = &a.stats_out {
            self.write_stats(path, &layer, &result)?;
        }
        if let Some(dir) = &a.save {
            if result.outputs.len() != ranks as usize {
                return Err(Failure(
                    EXIT_USAGE,
                    "--save needs every rank's output; with one process per rank, run without it"
                        .into(),
                ));
            }
            save_run(
                dir,
                &layer,
                &weights,
                ranks as usize,
                tokens,
                &inputs,
                &result.outputs,
            )
            .map_err(|e| Failure(EXIT_USAGE, e.to_string()))?;
            // The routing too, where the backend reports it (the CPU backend).
            let stats = if result.routing.is_empty() {
                ""
            } else {
                save_stats(&dir.join("routing-stats.json"), &layer, &result)?;
                " and routing-stats.json"
            };
            writeln!(
                self.out,
                "saved {}/run.safetensors, config.json{stats}",
                dir.display()
            )
            .map_err(io)?;
        }
        Ok(EXIT_OK)
    }
}

/// Writes the routing statistics of `result` to `path`; returns the tokens
/// counted.
fn save_stats(
    path: &Path,
    layer: &moec_runtime::plan::LayerConfig,
    result: &moec_runtime::Forward,
) -> Result<u64, Failure> {
    if result.routing.is_empty() {
        return Err(Failure(
            EXIT_USAGE,
            "the routing statistics: this backend does not report the per-token routing yet; run with --backend cpu"
                .into(),
        ));
    }
    let stats = moec_runtime::stats::RoutingStatistics::from_passes(
        layer.experts,
        layer.router.top_k,
        &result.routing,
    )
    .map_err(|e| Failure(EXIT_REJECTED, e.to_string()))?;
    std::fs::write(path, stats.to_json()).map_err(|e| {
        Failure(
            EXIT_USAGE,
            format!("cannot write `{}`: {e}", path.display()),
        )
    })?;
    Ok(stats.tokens)
}

/// The first (rank, index) where two runs' outputs differ bit for bit.
fn first_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> Option<(usize, usize)> {
    for (r, (x, y)) in a.iter().zip(b).enumerate() {
        if x.len() != y.len() {
            return Some((r, 0));
        }
        if let Some(i) = x
            .iter()
            .zip(y)
            .position(|(p, q)| p.to_bits() != q.to_bits())
        {
            return Some((r, i));
        }
    }
    None
}
