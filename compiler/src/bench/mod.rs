//! `moec bench`: the forward time of a layer on the CPU backend, against two
//! yardsticks measured in the same process on the same weights and inputs.
//!
//! 1. **moec**: [`CpuBackend::forward`], the compiled plan with every rank a
//!    thread (wall time of the call, which includes setting up the ranks'
//!    arenas and threads).
//! 2. **loop over experts**: the layer written the way Hugging Face's
//!    `MixtralSparseMoeBlock` computes it: all ranks' tokens as one batch,
//!    the router GEMM, softmax and top-k, then for every expert a gather of
//!    its tokens, the gate and up GEMMs, the activation, the down GEMM and a
//!    weighted scatter-add into the output. Its GEMMs use the same `gemm`
//!    crate with every core (`Parallelism::Rayon(available_parallelism)`).
//!    Its output must equal the backend's (relative error per rank below the
//!    dtype's tolerance), so both are known to compute the same layer.
//! 3. **GEMMs alone**: only the layer's matrix products, on preallocated
//!    buffers, threaded the way the backend threads them: one thread per rank
//!    running that rank's router GEMM (`[T, H] · [E, H]ᵀ`), then for each of
//!    its experts the stacked gate+up GEMM (`[m, H] · [2F, H]ᵀ`) and the down
//!    GEMM (`[m, F] · [H, F]ᵀ`), with `m` the rows the backend routed to that
//!    expert (`Forward::stats`), each GEMM with `--gemm-threads` threads; the
//!    shared experts' two GEMMs over the rank's `T` tokens when the layer has
//!    them. Timed: the wall time from spawning the rank threads to joining
//!    them. Not timed: allocation, weight stacking, routing, gathers,
//!    activations, scatters and communication.
//!
//! One untimed pass of each of the first two checks the output; then come
//! `--warmup` untimed and `--iters` timed rounds, each round one pass of the
//! three in turn (interleaved, so that a change in the machine's load falls
//! on all three alike). The report gives the median and the minimum.

mod cuda;

use crate::cli::{EXIT_OK, EXIT_REJECTED, EXIT_USAGE, MAX_SHOWN_DIAGNOSTICS};
use crate::compile::{compile, Options};
use clap::ValueEnum;
use moec_runtime::cpu::{CpuBackend, CpuOptions, Forward};
use moec_runtime::plan::{
    Activation, CapacityConfig, DType, GroupScore, LayerConfig, Phase, Plan, Scoring, SoftmaxOver,
    WeightOn,
};
use moec_runtime::weights::{random_inputs, Ffn, LayerWeights};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The arguments of `moec bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The .moe file describing the layer and its mesh.
    file: PathBuf,
    /// Timed forward passes of each measurement.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed passes before the timed ones.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Ranks (one EP group; nodes keep the file's GPUs per node). Default: the file's mesh.
    #[arg(long)]
    ranks: Option<u64>,
    /// Tokens per rank. Default: the file's `tokens_per_rank`.
    #[arg(long)]
    tokens: Option<u64>,
    /// Storage dtype of activations and weights (accumulation is f32).
    #[arg(long, value_enum)]
    dtype: Option<BenchDtype>,
    /// Model width, to shrink a real layer.
    #[arg(long)]
    hidden: Option<u64>,
    /// Experts' intermediate size (shared experts scale with it).
    #[arg(long)]
    ffn: Option<u64>,
    /// Threads each GEMM of the backend (and of the GEMMs-alone run) may use.
    #[arg(long, default_value_t = CpuOptions::default().gemm_threads)]
    gemm_threads: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Where to run: `cpu` (against a loop over experts and the GEMMs
    /// alone) or `cuda` (the layer's time on the GPU, its phases and what
    /// its GEMMs and memory-bound kernels achieve).
    #[arg(long, value_enum, default_value_t = crate::cli::Backend::Cpu)]
    backend: crate::cli::Backend,
    /// With `--backend cuda`: time passes run as a CUDA graph (capacity
    /// plans), beside the eager ones.
    #[arg(long)]
    graph: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum BenchDtype {
    F32,
    Bf16,
    F16,
}

/// An exit code and its message (printed as `error: {message}`).
pub type Failure = (i32, String);

fn io(e: std::io::Error) -> Failure {
    (EXIT_USAGE, format!("cannot write output: {e}"))
}

/// Most bytes of weights and activations the benchmark allocates without
/// being told to shrink the layer.
const MEMORY_LIMIT: u64 = 16 << 30;

/// Relative error the loop-over-experts output may have against the backend's:
/// the loop computes in f32 throughout, the backend rounds activations to the
/// storage dtype and the dispatched rows to the plan's wire dtype.
fn tolerance(plan: &Plan) -> f64 {
    let worst = [plan.layer.dtype, plan.choices.dispatch_dtype]
        .iter()
        .map(|d| match d {
            DType::F32 => 1e-4,
            DType::F16 => 1e-2,
            DType::Bf16 => 5e-2,
            _ => 0.15,
        })
        .fold(0.0f64, f64::max);
    worst.max(1e-4)
}

/// Runs `moec bench`.
pub fn bench(
    a: &BenchArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
    color: bool,
) -> Result<i32, Failure> {
    if a.iters == 0 {
        return Err((EXIT_USAGE, "--iters must be at least 1".into()));
    }
    if a.iters.saturating_add(a.warmup) > MAX_ROUNDS {
        return Err((
            EXIT_USAGE,
            format!(
                "--warmup {} + --iters {} is more than the {MAX_ROUNDS} rounds a benchmark runs",
                a.warmup, a.iters
            ),
        ));
    }
    if a.gemm_threads == 0 {
        return Err((EXIT_USAGE, "--gemm-threads must be at least 1".into()));
    }
    if a.graph && a.backend != crate::cli::Backend::Cuda {
        return Err((EXIT_USAGE, "--graph needs --backend cuda".into()));
    }
    if a.backend == crate::cli::Backend::Cuda {
        // Before compiling: a machine without a GPU learns it at once.
        crate::run::cuda_preflight(false)?;
    }
    let plan = match plan_of(a, err, color)? {
        Ok(plan) => plan,
        Err(code) => return Ok(code),
    };
    match a.backend {
        crate::cli::Backend::Cpu => bench_cpu(a, plan, out, err),
        crate::cli::Backend::Cuda => cuda::bench_cuda(a, plan, out, err),
    }
}

/// The plan of the benchmarked layer: the file with the size overrides,
/// compiled (`Ok(Err(code))` when the file is rejected, its diagnostics
/// printed).
fn plan_of(a: &BenchArgs, err: &mut dyn Write, color: bool) -> Result<Result<Plan, i32>, Failure> {
    let source = std::fs::read_to_string(&a.file).map_err(|e| {
        (
            EXIT_USAGE,
            format!("cannot read `{}`: {e}", a.file.display()),
        )
    })?;
    let checked = moec_lang::check_source(&source);
    let shown = checked.diagnostics.len().min(MAX_SHOWN_DIAGNOSTICS);
    if shown > 0 {
        let text = moec_lang::render(
            &a.file.display().to_string(),
            &source,
            &checked.diagnostics[..shown],
            color,
        );
        err.write_all(text.as_bytes()).map_err(io)?;
    }
    let Some((program, _)) = &checked.program else {
        let errors = checked.diagnostics.iter().filter(|d| d.is_error()).count();
        writeln!(err, "{}: {errors} error(s)", a.file.display()).map_err(io)?;
        return Ok(Err(EXIT_REJECTED));
    };
    let mut program = program.clone();
    let overrides = crate::run::Overrides {
        ranks: a.ranks,
        tokens: a.tokens,
        dtype: a.dtype.map(|d| match d {
            BenchDtype::F32 => moec_lang::spec::DType::F32,
            BenchDtype::Bf16 => moec_lang::spec::DType::Bf16,
            BenchDtype::F16 => moec_lang::spec::DType::F16,
        }),
        hidden: a.hidden,
        ffn: a.ffn,
    };
    crate::run::apply(&mut program, &overrides).map_err(|e| (EXIT_USAGE, e))?;
    let options = match a.backend {
        crate::cli::Backend::Cpu => Options::default(),
        crate::cli::Backend::Cuda => Options::cuda_run(a.graph),
    };
    let compiled = compile(&program, &options)
        .map_err(|e| (EXIT_REJECTED, format!("{}: {e}", a.file.display())))?;
    Ok(Ok(compiled.plan))
}

/// `moec bench --backend cpu`.
fn bench_cpu(
    a: &BenchArgs,
    plan: Plan,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    let layer = plan.layer.clone();
    supported(&layer)?;
    let dims = Dims::of(&plan)?;
    let need = dims.memory_bytes(&plan);
    if need > MEMORY_LIMIT {
        return Err((
            EXIT_USAGE,
            format!(
                "the benchmark needs about {} of weights and activations; shrink the layer with --hidden, --ffn, --tokens or --ranks",
                moec_runtime::plan::human_bytes(need)
            ),
        ));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    writeln!(
        err,
        "moec bench: {}; {} core(s), gemm threads {}; warmup {}, iters {}",
        dims.describe(&layer),
        cores,
        a.gemm_threads,
        a.warmup,
        a.iters
    )
    .map_err(io)?;
    writeln!(err, "drawing weights and inputs (seed {})", a.seed).map_err(io)?;
    let weights = LayerWeights::random(&layer, a.seed);
    let inputs = random_inputs(&layer, dims.world, dims.tokens, a.seed);

    // The backend's first pass is the reference output and gives the rows
    // each expert gets; the loop's first pass must reproduce that output.
    let options = CpuOptions {
        gemm_threads: a.gemm_threads,
        ..CpuOptions::default()
    };
    let backend = CpuBackend::new(plan.clone(), &weights, options)
        .map_err(|e| (EXIT_REJECTED, e.to_string()))?;
    let moec_pass = || -> Result<(f64, Forward), Failure> {
        let start = Instant::now();
        let f = backend
            .forward(&inputs)
            .map_err(|e| (EXIT_REJECTED, e.to_string()))?;
        Ok((start.elapsed().as_secs_f64(), f))
    };
    let (t, reference) = moec_pass()?;
    writeln!(err, "moec: check pass: {:.2} ms", t * 1e3).map_err(io)?;
    let routed = reference.stats.routed_per_expert.clone();

    let batch: Vec<f32> = inputs.concat();
    let loop_layer = LoopLayer::new(&layer, &weights, &dims, cores)?;
    let loop_pass = || -> Result<(f64, Vec<f32>), Failure> {
        let start = Instant::now();
        let y = loop_layer.forward(&batch)?;
        Ok((start.elapsed().as_secs_f64(), y))
    };
    let (t, loop_out) = loop_pass()?;
    writeln!(err, "loop over experts: check pass: {:.2} ms", t * 1e3).map_err(io)?;
    let per_rank = dims.tokens * dims.hidden;
    let mut max_rel = 0.0f64;
    let mut worst_rank = 0;
    for (r, want) in reference.outputs.iter().enumerate() {
        let got = loop_out
            .get(r * per_rank..(r + 1) * per_rank)
            .unwrap_or(&[]);
        let e = relative_error(got, want);
        if e.is_nan() || e > max_rel {
            max_rel = e;
            worst_rank = r;
        }
    }
    let tol = tolerance(&plan);
    if max_rel.is_nan() || max_rel >= tol {
        return Err((
            EXIT_REJECTED,
            format!(
                "the loop over experts disagrees with the backend: relative error {max_rel:.3e} at rank {worst_rank} (tolerance {tol:.0e})"
            ),
        ));
    }
    writeln!(
        err,
        "loop over experts agrees with the backend: max relative error {max_rel:.3e} (tolerance {tol:.0e})"
    )
    .map_err(io)?;
    drop((reference, loop_out));

    let (gemms, mut rank_gemms) = GemmsAlone::new(&plan, &weights, &inputs, &dims, &routed)?;

    // Rounds of the three, interleaved, so that a change in the machine's
    // load (other processes, frequency) falls on all three alike.
    let mut times: [Vec<f64>; 3] = Default::default();
    let mut phase_sums: BTreeMap<Phase, f64> = BTreeMap::new();
    for round in 0..a.warmup + a.iters {
        let timed = round >= a.warmup;
        let (t_moec, f) = moec_pass()?;
        let (t_loop, _) = loop_pass()?;
        let t_gemms = gemms.run(&mut rank_gemms, a.gemm_threads)?;
        let label = if timed {
            format!("iter {}/{}", round - a.warmup + 1, a.iters)
        } else {
            format!("warmup {}/{}", round + 1, a.warmup)
        };
        writeln!(
            err,
            "{label}: moec {:.2} ms, loop over experts {:.2} ms, GEMMs alone {:.2} ms",
            t_moec * 1e3,
            t_loop * 1e3,
            t_gemms * 1e3
        )
        .map_err(io)?;
        if timed {
            for (p, sec) in &f.phase_seconds {
                *phase_sums.entry(*p).or_default() += sec;
            }
            for (v, t) in times.iter_mut().zip([t_moec, t_loop, t_gemms]) {
                v.push(t);
            }
        }
    }
    let phases: Vec<(Phase, f64)> = phase_sums
        .into_iter()
        .map(|(p, sec)| (p, sec / a.iters as f64))
        .collect();
    let [moec_times, loop_times, gemm_times] = times;

    let flops = dims.flops(&routed);
    let report = Report {
        file: a.file.clone(),
        layer: &layer,
        dims: &dims,
        cores,
        gemm_threads: a.gemm_threads,
        iters: a.iters,
        warmup: a.warmup,
        seed: a.seed,
        flops,
        rows: vec![
            Row::new("moec cpu backend", &moec_times, flops),
            Row::new("loop over experts", &loop_times, flops),
            Row::new("GEMMs alone", &gemm_times, flops),
        ],
        phases,
        routed,
        max_rel,
        tol,
    };
    print_report(out, a.json, || report.json(), || report.text())
}

/// Prints a report: one JSON object with `--json`, else the table.
fn print_report(
    out: &mut dyn Write,
    json: bool,
    as_json: impl FnOnce() -> serde_json::Value,
    as_text: impl FnOnce() -> String,
) -> Result<i32, Failure> {
    if json {
        let text = serde_json::to_string_pretty(&as_json())
            .map_err(|e| (EXIT_USAGE, format!("cannot print JSON: {e}")))?;
        writeln!(out, "{text}").map_err(io)?;
    } else {
        out.write_all(as_text().as_bytes()).map_err(io)?;
    }
    Ok(EXIT_OK)
}

/// `||a - b|| / ||b||` (0 when both are zero; NaN when the lengths differ).
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let d = f64::from(*x) - f64::from(*y);
        diff += d * d;
        norm += f64::from(*y) * f64::from(*y);
    }
    if norm == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (diff / norm).sqrt()
    }
}

// ------------------------------------------------------------ sizes

/// The layer's sizes as `usize`.
struct Dims {
    world: usize,
    tokens: usize,
    hidden: usize,
    experts: usize,
    width: usize,
    top_k: usize,
    gated: bool,
    /// The fused shared experts' width and whether they are gated, when present.
    shared: Option<(usize, bool)>,
}

fn to_usize(v: u64, what: &str) -> Result<usize, Failure> {
    usize::try_from(v).map_err(|_| (EXIT_USAGE, format!("{what} {v} is too large")))
}

impl Dims {
    fn of(plan: &Plan) -> Result<Dims, Failure> {
        let l = &plan.layer;
        let shared = match &l.shared {
            Some(s) => Some((
                to_usize(s.count.saturating_mul(s.intermediate), "shared width")?,
                s.ffn.gated(),
            )),
            None => None,
        };
        Ok(Dims {
            world: to_usize(plan.mesh.world_size(), "ranks")?,
            tokens: to_usize(l.tokens_per_rank, "tokens per rank")?,
            hidden: to_usize(l.hidden, "hidden")?,
            experts: to_usize(l.experts, "experts")?,
            width: to_usize(l.intermediate, "intermediate")?,
            top_k: to_usize(l.router.top_k, "top_k")?,
            gated: l.ffn.gated(),
            shared,
        })
    }

    /// `layer NAME on R rank(s) x T tokens, hidden H, E experts x FFN(F), top-k, DTYPE`.
    fn describe(&self, layer: &LayerConfig) -> String {
        format!(
            "layer {} on {} rank(s) x {} tokens, hidden {}, {} experts x {}({}), top-{}, {}",
            layer.name,
            self.world,
            self.tokens,
            self.hidden,
            self.experts,
            layer.ffn.name(),
            self.width,
            layer.router.top_k,
            layer.dtype.name()
        )
    }

    /// Rows of the stacked up projection of the routed experts (`2F` gated, `F` not).
    fn up_rows(&self) -> usize {
        if self.gated {
            2 * self.width
        } else {
            self.width
        }
    }

    /// A generous estimate of the bytes the benchmark holds at its peak: the
    /// weights three times (ours, the backend's layout, the stacked copy)
    /// and the activations of every rank.
    fn memory_bytes(&self, plan: &Plan) -> u64 {
        let (h, f, e) = (self.hidden as u64, self.width as u64, self.experts as u64);
        let up = if self.gated { 2 * f } else { f };
        let expert = h.saturating_mul(up + f);
        let shared = self.shared.map_or(0, |(w, g)| {
            let w = w as u64;
            h.saturating_mul(if g { 3 * w } else { 2 * w })
        });
        let weights = e
            .saturating_mul(expert)
            .saturating_add(shared)
            .saturating_add(e.saturating_mul(h))
            .saturating_mul(4 * 3);
        let activations = plan
            .memory
            .peak_activation_bytes
            .saturating_add(
                (self.tokens as u64)
                    .saturating_mul(h.saturating_add(up))
                    .saturating_mul(16),
            )
            .saturating_mul(self.world as u64);
        weights.saturating_add(activations)
    }

    /// FLOPs of one forward pass: the router GEMM, the routed experts' GEMMs
    /// for `routed` rows each and the shared experts' GEMMs over every token.
    fn flops(&self, routed: &[u64]) -> f64 {
        let (h, f) = (self.hidden as f64, self.width as f64);
        let n = (self.world * self.tokens) as f64;
        let mut total = 2.0 * n * h * self.experts as f64;
        let up = self.up_rows() as f64;
        for &m in routed {
            total += 2.0 * m as f64 * h * (up + f);
        }
        if let Some((w, gated)) = self.shared {
            let w = w as f64;
            let up = if gated { 2.0 * w } else { w };
            total += 2.0 * n * h * (up + w);
        }
        total
    }
}

// ------------------------------------------------------------ GEMM

/// `c[m, n] = a[m, k] · w[n, k]ᵀ`, row-major f32: the runtime's own GEMM
/// call (the `gemm` crate), so the loop and the backend use the same kernels.
#[allow(clippy::too_many_arguments)] // the BLAS shape: three operands and their sizes
fn matmul_wt(
    a: &[f32],
    w: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
) -> Result<(), Failure> {
    moec_runtime::cpu::gemm::matmul_wt(a, w, None, c, m, n, k, threads)
        .map_err(|e| (EXIT_REJECTED, e))
}

fn add_bias(c: &mut [f32], bias: Option<&[f32]>, n: usize) {
    if let Some(b) = bias {
        for row in c.chunks_exact_mut(n) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

// ------------------------------------------------------------ the loop

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// The element-wise function between the up and down projections.
#[derive(Clone, Copy)]
enum Act {
    Swiglu(Option<f32>),
    Gelu,
    GeluTanh,
    Relu,
}

impl Act {
    fn of(a: Activation) -> Act {
        match a {
            Activation::Swiglu { limit } => Act::Swiglu(limit.map(|l| l as f32)),
            Activation::Gelu => Act::Gelu,
            Activation::GeluTanh => Act::GeluTanh,
            Activation::Relu => Act::Relu,
        }
    }

    /// `h = act(g, u)`; `g` is empty for the ungated activations.
    fn apply(self, g: &[f32], u: &[f32], h: &mut Vec<f32>) {
        h.clear();
        match self {
            Act::Swiglu(None) => h.extend(g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u)),
            Act::Swiglu(Some(l)) => h.extend(g.iter().zip(u).map(|(&g, &u)| {
                let g = g.min(l);
                let u = u.clamp(-l, l);
                (u + 1.0) * g * sigmoid(1.702 * g)
            })),
            Act::Gelu => h.extend(
                u.iter()
                    .map(|&v| 0.5 * v * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2))),
            ),
            Act::GeluTanh => h.extend(u.iter().map(|&v| {
                let c = (2.0 / std::f32::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
            })),
            Act::Relu => h.extend(u.iter().map(|&v| v.max(0.0))),
        }
    }
}

/// One FFN's weights, borrowed from [`LayerWeights`] as Hugging Face keeps
/// them (separate gate and up projections).
struct LoopFfn<'w> {
    ffn: &'w Ffn,
    act: Act,
}

impl LoopFfn<'_> {
    /// `y[m, H] = down(act(gate(x), up(x)))` for the `m` rows of `x`.
    fn apply(
        &self,
        x: &[f32],
        m: usize,
        hidden: usize,
        threads: usize,
    ) -> Result<Vec<f32>, Failure> {
        let f = self.ffn.width;
        let mut u = vec![0.0f32; m * f];
        matmul_wt(x, &self.ffn.up, &mut u, m, f, hidden, threads)?;
        add_bias(&mut u, self.ffn.up_bias.as_deref(), f);
        let mut g = Vec::new();
        if let Some(gate) = &self.ffn.gate {
            g = vec![0.0f32; m * f];
            matmul_wt(x, gate, &mut g, m, f, hidden, threads)?;
            add_bias(&mut g, self.ffn.gate_bias.as_deref(), f);
        }
        let mut h = Vec::with_capacity(m * f);
        self.act.apply(&g, &u, &mut h);
        let mut y = vec![0.0f32; m * hidden];
        matmul_wt(&h, &self.ffn.down, &mut y, m, hidden, f, threads)?;
        add_bias(&mut y, self.ffn.down_bias.as_deref(), hidden);
        Ok(y)
    }
}

/// Whether the loop over experts computes `layer`: every router, FFN and
/// shared-expert option, but no capacity (its drop policies need the global
/// token order across ranks).
fn supported(layer: &LayerConfig) -> Result<(), Failure> {
    if let CapacityConfig::Limited { .. } = layer.capacity {
        return Err((
            EXIT_REJECTED,
            "the loop-over-experts baseline supports dropless layers only (this layer has a capacity); benchmark it with `capacity = dropless`".into(),
        ));
    }
    Ok(())
}

/// The straightforward implementation: Hugging Face's Mixtral block, with
/// the router options of [`moec_runtime::plan::RouterConfig`].
struct LoopLayer<'w> {
    layer: &'w LayerConfig,
    dims: &'w Dims,
    router: &'w [f32],
    logit_bias: Option<&'w [f32]>,
    selection_bias: Option<&'w [f32]>,
    experts: Vec<LoopFfn<'w>>,
    shared: Option<LoopFfn<'w>>,
    shared_gate: Option<&'w [f32]>,
    threads: usize,
}

impl<'w> LoopLayer<'w> {
    fn new(
        layer: &'w LayerConfig,
        weights: &'w LayerWeights,
        dims: &'w Dims,
        threads: usize,
    ) -> Result<LoopLayer<'w>, Failure> {
        supported(layer)?;
        let act = Act::of(layer.ffn);
        let shared = match (&weights.shared, &layer.shared) {
            (Some(ffn), Some(s)) => Some(LoopFfn {
                ffn,
                act: Act::of(s.ffn),
            }),
            (None, None) => None,
            _ => {
                return Err((
                    EXIT_REJECTED,
                    "the shared experts' weights do not match the layer".into(),
                ))
            }
        };
        Ok(LoopLayer {
            layer,
            dims,
            router: &weights.router,
            logit_bias: weights.router_logit_bias.as_deref(),
            selection_bias: weights.router_bias.as_deref(),
            experts: weights
                .experts
                .iter()
                .map(|ffn| LoopFfn { ffn, act })
                .collect(),
            shared,
            shared_gate: weights.shared_gate.as_deref(),
            threads,
        })
    }

    /// The layer's output `[N, H]` for the batch `x` `[N, H]`.
    fn forward(&self, x: &[f32]) -> Result<Vec<f32>, Failure> {
        let d = self.dims;
        let (h, e_count) = (d.hidden, d.experts);
        let n = x.len() / h.max(1);
        // Router logits.
        let mut logits = vec![0.0f32; n * e_count];
        matmul_wt(x, self.router, &mut logits, n, e_count, h, self.threads)?;
        add_bias(&mut logits, self.logit_bias, e_count);
        // Routing: per expert, the tokens it gets and their weights.
        let mut tokens_of: Vec<Vec<usize>> = vec![Vec::new(); e_count];
        let mut weights_of: Vec<Vec<f32>> = vec![Vec::new(); e_count];
        let mut picked = Vec::with_capacity(d.top_k);
        for (t, row) in logits.chunks_exact(e_count).enumerate() {
            self.route(row, &mut picked)?;
            for &(e, w) in &picked {
                tokens_of[e].push(t);
                weights_of[e].push(w);
            }
        }
        let mut out = vec![0.0f32; n * h];
        let on_input = self.layer.router.weight_on == WeightOn::Input;
        for (e, ffn) in self.experts.iter().enumerate() {
            let idx = &tokens_of[e];
            if idx.is_empty() {
                continue;
            }
            let m = idx.len();
            let mut xs = Vec::with_capacity(m * h);
            for (&t, &w) in idx.iter().zip(&weights_of[e]) {
                let row = &x[t * h..(t + 1) * h];
                if on_input {
                    xs.extend(row.iter().map(|v| v * w));
                } else {
                    xs.extend_from_slice(row);
                }
            }
            let y = ffn.apply(&xs, m, h, self.threads)?;
            for ((&t, &w), yr) in idx.iter().zip(&weights_of[e]).zip(y.chunks_exact(h)) {
                let w = if on_input { 1.0 } else { w };
                for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(yr) {
                    *o += w * v;
                }
            }
        }
        if let Some(shared) = &self.shared {
            let y = shared.apply(x, n, h, self.threads)?;
            for (t, (o, yr)) in out.chunks_exact_mut(h).zip(y.chunks_exact(h)).enumerate() {
                let g = match self.shared_gate {
                    Some(gate) => {
                        let row = &x[t * h..(t + 1) * h];
                        sigmoid(row.iter().zip(gate).map(|(a, b)| a * b).sum())
                    }
                    None => 1.0,
                };
                for (o, v) in o.iter_mut().zip(yr) {
                    *o += g * v;
                }
            }
        }
        Ok(out)
    }

    /// One token's `top_k` (expert, weight) pairs from its logits.
    fn route(&self, logits: &[f32], picked: &mut Vec<(usize, f32)>) -> Result<(), Failure> {
        let r = &self.layer.router;
        let e_count = logits.len();
        let softmax = |v: &[f32]| -> Vec<f32> {
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = v.iter().map(|&l| (l - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|&x| x / sum).collect()
        };
        let scores: Vec<f32> = match (r.scoring, r.softmax_over) {
            (Scoring::Softmax, SoftmaxOver::All) => softmax(logits),
            (Scoring::Sigmoid, _) => logits.iter().map(|&l| sigmoid(l)).collect(),
            (Scoring::Softmax, SoftmaxOver::Topk) => logits.to_vec(),
        };
        let sel: Vec<f32> = match self.selection_bias {
            Some(b) if r.selection_bias => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            _ => scores.clone(),
        };
        let desc = |a: f32, b: f32| b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal);
        let mut allowed = vec![true; e_count];
        if let Some(g) = r.groups {
            let count = usize::try_from(g.count).unwrap_or(1).max(1);
            let kept = usize::try_from(g.kept).unwrap_or(count).min(count);
            let size = e_count / count;
            let group_score: Vec<f32> = (0..count)
                .map(|i| {
                    let mut m = sel[i * size..(i + 1) * size].to_vec();
                    m.sort_by(|a, b| desc(*a, *b));
                    match g.score {
                        GroupScore::Top2Sum => m.iter().take(2).sum(),
                        GroupScore::Max => m.first().copied().unwrap_or(0.0),
                    }
                })
                .collect();
            let mut order: Vec<usize> = (0..count).collect();
            order.sort_by(|&a, &b| desc(group_score[a], group_score[b]).then(a.cmp(&b)));
            allowed = vec![false; e_count];
            for &i in &order[..kept] {
                allowed[i * size..(i + 1) * size].fill(true);
            }
        }
        let mut candidates: Vec<usize> = (0..e_count).filter(|&e| allowed[e]).collect();
        candidates.sort_by(|&a, &b| desc(sel[a], sel[b]).then(a.cmp(&b)));
        candidates.truncate(self.dims.top_k);
        let mut weights: Vec<f32> = match (r.scoring, r.softmax_over) {
            (Scoring::Softmax, SoftmaxOver::Topk) => {
                softmax(&candidates.iter().map(|&e| logits[e]).collect::<Vec<_>>())
            }
            _ => candidates.iter().map(|&e| scores[e]).collect(),
        };
        if r.normalize {
            let sum: f32 = weights.iter().sum();
            if sum <= 0.0 {
                return Err((
                    EXIT_REJECTED,
                    "the loop over experts: routing weights sum to 0; cannot normalise".into(),
                ));
            }
            for w in &mut weights {
                *w /= sum;
            }
        }
        picked.clear();
        picked.extend(
            candidates
                .into_iter()
                .zip(weights)
                .map(|(e, w)| (e, w * r.scale as f32)),
        );
        Ok(())
    }
}

// ------------------------------------------------------------ GEMMs alone

/// One rank's share of the GEMMs, with its preallocated buffers.
struct RankGemms {
    /// The rank's tokens `[T, H]`.
    x: Vec<f32>,
    logits: Vec<f32>,
    /// `(expert, rows)` for each expert the rank computes.
    experts: Vec<(usize, usize)>,
    /// Operand and result buffers sized for the rank's largest GEMM.
    a: Vec<f32>,
    up_out: Vec<f32>,
    act: Vec<f32>,
    down_out: Vec<f32>,
}

/// The layer's GEMMs on preallocated buffers, one thread per rank.
struct GemmsAlone {
    hidden: usize,
    tokens: usize,
    experts: usize,
    router: Vec<f32>,
    /// Per expert: stacked `[gate; up]` `[up_rows, H]` and down `[H, F]`.
    weights: Vec<(Vec<f32>, Vec<f32>)>,
    up_rows: usize,
    width: usize,
    /// The shared experts: stacked up, down, up rows, width.
    shared: Option<(Vec<f32>, Vec<f32>, usize, usize)>,
}

fn stacked(ffn: &Ffn) -> Vec<f32> {
    let mut up = Vec::with_capacity(ffn.up.len() * 2);
    if let Some(g) = &ffn.gate {
        up.extend_from_slice(g);
    }
    up.extend_from_slice(&ffn.up);
    up
}

impl GemmsAlone {
    fn new(
        plan: &Plan,
        weights: &LayerWeights,
        inputs: &[Vec<f32>],
        dims: &Dims,
        routed: &[u64],
    ) -> Result<(GemmsAlone, Vec<RankGemms>), Failure> {
        let (h, f) = (dims.hidden, dims.width);
        let ep = to_usize(plan.mesh.ep, "ep")?.max(1);
        let etp = to_usize(plan.mesh.etp, "etp")?.max(1);
        let experts_of = |r: usize| -> Vec<usize> {
            plan.mesh
                .experts_of_ep_rank
                .get((r / etp) % ep)
                .map(|v| v.iter().filter_map(|&e| usize::try_from(e).ok()).collect())
                .unwrap_or_default()
        };
        // An expert held by several ranks (data parallel groups, replicas)
        // has its rows split evenly among its holders.
        let mut holders = vec![0usize; dims.experts];
        for r in 0..dims.world {
            for e in experts_of(r) {
                if let Some(c) = holders.get_mut(e) {
                    *c += 1;
                }
            }
        }
        let mut seen = vec![0usize; dims.experts];
        let shared_up_rows = dims.shared.map(|(w, g)| if g { 2 * w } else { w });
        let mut ranks = Vec::with_capacity(dims.world);
        for (r, x) in inputs.iter().enumerate() {
            let mut list = Vec::new();
            for e in experts_of(r) {
                let (Some(&total), Some(&n)) = (routed.get(e), holders.get(e)) else {
                    continue;
                };
                let total = to_usize(total, "routed rows")?;
                let i = seen[e];
                seen[e] += 1;
                let rows = total / n + usize::from(i < total % n);
                list.push((e, rows));
            }
            let max_m = list.iter().map(|&(_, m)| m).max().unwrap_or(0);
            let rows = max_m.max(if dims.shared.is_some() {
                dims.tokens
            } else {
                0
            });
            let up = dims.up_rows().max(shared_up_rows.unwrap_or(0));
            let width = f.max(dims.shared.map_or(0, |(w, _)| w));
            // Operands hold real values (the rank's tokens, repeated), not
            // zeros, so the GEMMs see ordinary numbers.
            let a: Vec<f32> = x.iter().copied().cycle().take(rows * h).collect();
            let act: Vec<f32> = x.iter().copied().cycle().take(rows * width).collect();
            ranks.push(RankGemms {
                x: x.clone(),
                logits: vec![0.0; dims.tokens * dims.experts],
                experts: list,
                a,
                up_out: vec![0.0; rows * up],
                act,
                down_out: vec![0.0; rows * h],
            });
        }
        let shared = match (&weights.shared, dims.shared) {
            (Some(ffn), Some((w, _))) => Some((
                stacked(ffn),
                ffn.down.clone(),
                shared_up_rows.unwrap_or(w),
                w,
            )),
            _ => None,
        };
        let gemms = GemmsAlone {
            hidden: h,
            tokens: dims.tokens,
            experts: dims.experts,
            router: weights.router.clone(),
            weights: weights
                .experts
                .iter()
                .map(|ffn| (stacked(ffn), ffn.down.clone()))
                .collect(),
            up_rows: dims.up_rows(),
            width: f,
            shared,
        };
        Ok((gemms, ranks))
    }

    /// One pass: every rank's GEMMs, a thread per rank; returns the seconds.
    fn run(&self, ranks: &mut [RankGemms], threads: usize) -> Result<f64, Failure> {
        let start = Instant::now();
        let results: Vec<Result<(), Failure>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter_mut()
                .map(|rank| {
                    std::thread::Builder::new()
                        .spawn_scoped(s, move || self.rank(rank, threads))
                        .map_err(|e| (EXIT_REJECTED, format!("cannot start a GEMM thread: {e}")))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err((EXIT_REJECTED, "a GEMM thread panicked".into()))),
                    Err(e) => Err(e),
                })
                .collect()
        });
        let t = start.elapsed().as_secs_f64();
        for r in results {
            r?;
        }
        Ok(t)
    }

    fn rank(&self, r: &mut RankGemms, threads: usize) -> Result<(), Failure> {
        let (h, t) = (self.hidden, self.tokens);
        matmul_wt(
            &r.x,
            &self.router,
            &mut r.logits,
            t,
            self.experts,
            h,
            threads,
        )?;
        if let Some((up, down, up_rows, width)) = &self.shared {
            matmul_wt(&r.a, up, &mut r.up_out, t, *up_rows, h, threads)?;
            matmul_wt(&r.act, down, &mut r.down_out, t, h, *width, threads)?;
        }
        for &(e, m) in &r.experts {
            let Some((up, down)) = self.weights.get(e) else {
                continue;
            };
            matmul_wt(&r.a, up, &mut r.up_out, m, self.up_rows, h, threads)?;
            matmul_wt(&r.act, down, &mut r.down_out, m, h, self.width, threads)?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------ report

struct Row {
    name: &'static str,
    median: f64,
    min: f64,
    gflops: f64,
}

impl Row {
    fn new(name: &'static str, times: &[f64], flops: f64) -> Row {
        let mut t = times.to_vec();
        t.sort_by(|a, b| a.total_cmp(b));
        let median = match t.len() {
            0 => 0.0,
            n if n % 2 == 1 => t[n / 2],
            n => 0.5 * (t[n / 2 - 1] + t[n / 2]),
        };
        let min = t.first().copied().unwrap_or(0.0);
        Row {
            name,
            median,
            min,
            gflops: if median > 0.0 {
                flops / median / 1e9
            } else {
                0.0
            },
        }
    }
}

struct Report<'a> {
    file: PathBuf,
    layer: &'a LayerConfig,
    dims: &'a Dims,
    cores: usize,
    gemm_threads: usize,
    iters: usize,
    warmup: usize,
    seed: u64,
    flops: f64,
    /// moec, loop, GEMMs alone.
    rows: Vec<Row>,
    phases: Vec<(Phase, f64)>,
    routed: Vec<u64>,
    max_rel: f64,
    tol: f64,
}

/// The most rounds (warmup and timed) one benchmark runs: far more than a
/// median needs, and small enough that `warmup + iters` cannot overflow.
const MAX_ROUNDS: usize = 1_000_000;

/// The goals: at least this much faster than the loop ...
const GOAL_VS_LOOP: f64 = 3.0;
/// ... and at most this much slower than the GEMMs alone.
const GOAL_VS_GEMMS: f64 = 2.0;

impl Report<'_> {
    fn ratio(a: f64, b: f64) -> f64 {
        if b > 0.0 {
            a / b
        } else {
            f64::INFINITY
        }
    }

    fn loop_over_moec(&self) -> f64 {
        Self::ratio(self.rows[1].median, self.rows[0].median)
    }

    fn moec_over_gemms(&self) -> f64 {
        Self::ratio(self.rows[0].median, self.rows[2].median)
    }

    fn path(&self) -> String {
        display_path(&self.file)
    }

    fn text(&self) -> String {
        use std::fmt::Write as _;
        let d = self.dims;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "moec bench: {} ({}): {} rank(s) x {} tokens, hidden {}, {} experts x {}({}), top-{}, {}",
            self.layer.name,
            self.path(),
            d.world,
            d.tokens,
            d.hidden,
            d.experts,
            self.layer.ffn.name(),
            d.width,
            d.top_k,
            self.layer.dtype.name()
        );
        let _ = writeln!(
            s,
            "{} core(s); backend gemm threads {} per rank thread; loop GEMMs on {} thread(s); {} warmup + {} timed rounds of the three, seed {}; {:.2} GFLOP per pass",
            self.cores, self.gemm_threads, self.cores, self.warmup, self.iters, self.seed, self.flops / 1e9
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:<20} {:>12} {:>12} {:>10}",
            "", "median ms", "min ms", "GFLOP/s"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<20} {:>12.3} {:>12.3} {:>10.1}",
                r.name,
                r.median * 1e3,
                r.min * 1e3,
                r.gflops
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "loop / moec:   {:>6.2}x  (goal >= {GOAL_VS_LOOP}x: {})",
            self.loop_over_moec(),
            met(self.loop_over_moec() >= GOAL_VS_LOOP)
        );
        let _ = writeln!(
            s,
            "moec / GEMMs:  {:>6.2}x  (goal <= {GOAL_VS_GEMMS}x: {})",
            self.moec_over_gemms(),
            met(self.moec_over_gemms() <= GOAL_VS_GEMMS)
        );
        let _ = writeln!(
            s,
            "(goals: moec at least {GOAL_VS_LOOP}x faster than the loop over experts, and within \
             {GOAL_VS_GEMMS}x of its own GEMMs alone, on the full-size benchmark layer; a small \
             layer measures thread start-up, not arithmetic)"
        );
        let _ = writeln!(
            s,
            "loop over experts agrees with the backend: max relative error {:.3e} (tolerance {:.0e})",
            self.max_rel, self.tol
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "moec phases (mean ms per pass, means over ranks; streams overlap):"
        );
        for (p, sec) in &self.phases {
            let _ = writeln!(s, "  {:<12} {:>10.3}", p.name(), sec * 1e3);
        }
        let total: u64 = self.routed.iter().sum();
        let max = self.routed.iter().copied().max().unwrap_or(0);
        let min = self.routed.iter().copied().min().unwrap_or(0);
        let _ = writeln!(
            s,
            "rows per expert: min {min}, mean {:.1}, max {max} ({} assignments)",
            total as f64 / self.routed.len().max(1) as f64,
            total
        );
        s
    }

    fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let d = self.dims;
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "median_ms": r.median * 1e3,
                    "min_ms": r.min * 1e3,
                    "gflops": r.gflops,
                })
            })
            .collect();
        let phases: serde_json::Map<String, serde_json::Value> = self
            .phases
            .iter()
            .map(|(p, s)| (p.name().to_string(), json!(s * 1e3)))
            .collect();
        json!({
            "file": self.path(),
            "layer": self.layer.name,
            "ranks": d.world,
            "tokens_per_rank": d.tokens,
            "hidden": d.hidden,
            "experts": d.experts,
            "intermediate": d.width,
            "ffn": self.layer.ffn.name(),
            "top_k": d.top_k,
            "dtype": self.layer.dtype.name(),
            "cores": self.cores,
            "gemm_threads": self.gemm_threads,
            "loop_threads": self.cores,
            "warmup": self.warmup,
            "iters": self.iters,
            "seed": self.seed,
            "gflop_per_pass": self.flops / 1e9,
            "rows": rows,
            "loop_over_moec": self.loop_over_moec(),
            "moec_over_gemms": self.moec_over_gemms(),
            "goal_loop_over_moec_at_least_3": self.loop_over_moec() >= GOAL_VS_LOOP,
            "goal_moec_over_gemms_at_most_2": self.moec_over_gemms() <= GOAL_VS_GEMMS,
            "max_relative_error": self.max_rel,
            "tolerance": self.tol,
            "moec_phases_ms": phases,
            "routed_per_expert": self.routed,
        })
    }
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn display_path(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_the_norm_of_the_difference_over_the_norm() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        let e = relative_error(&[3.0, 4.0], &[0.0, 5.0]);
        assert!((e - (9.0f64 + 1.0).sqrt() / 5.0).abs() < 1e-12);
        assert!(relative_error(&[1.0], &[1.0, 2.0]).is_nan());
        assert_eq!(relative_error(&[0.0], &[0.0]), 0.0);
        assert!(relative_error(&[1.0], &[0.0]).is_infinite());
    }

    #[test]
    fn rows_give_the_median_and_the_minimum() {
        let r = Row::new("x", &[3.0, 1.0, 2.0], 6e9);
        assert_eq!((r.median, r.min), (2.0, 1.0));
        assert!((r.gflops - 3.0).abs() < 1e-12);
        let r = Row::new("x", &[4.0, 1.0, 2.0, 3.0], 1.0);
        assert_eq!((r.median, r.min), (2.5, 1.0));
    }

    #[test]
    fn the_loop_gemm_is_a_plain_product() {
        let (m, n, k) = (5, 3, 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        for threads in [1, 2] {
            let mut c = vec![0.0; m * n];
            assert!(matmul_wt(&a, &w, &mut c, m, n, k, threads).is_ok());
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|p| a[i * k + p] * w[j * k + p]).sum();
                    assert!((c[i * n + j] - want).abs() < 1e-4, "{i},{j}");
                }
            }
        }
        let mut c = vec![0.0; m * n];
        assert!(matmul_wt(&a, &w, &mut c, m + 1, n, k, 1).is_err());
    }
}
