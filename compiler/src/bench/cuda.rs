//! `moec bench --backend cuda`: a layer's time on the GPU, where it goes,
//! and what its expert GEMMs and memory-bound kernels achieve.
//!
//! 1. **Total**: `--warmup` untimed then `--iters` timed passes of
//!    [`CudaBackend::forward`]; a pass's time runs from the first command
//!    issued to the device going idle, with the inputs already uploaded (the
//!    host's conversion and upload of the inputs and the read-back of the
//!    outputs are not in it; the routing read-back after `assign_place` is).
//! 2. **Phases**: one more pass with a timing event before and after every
//!    step and every cuBLAS GEMM ([`CudaBackend::forward_profiled`]). A
//!    phase's *busy* time is the union of its steps' intervals on the
//!    device's clock, over all ranks and streams: the time during which at
//!    least one of its steps ran.
//! 3. **Expert GEMMs**: their FLOPs (`2·m·n·k` of every cuBLAS call of the
//!    experts phase) over the union of their intervals: what the grouped
//!    work achieved, to compare with a dense GEMM's rate on the same device
//!    (`runtime/gpu/bench.py` measures one in the same run).
//! 4. **Memory-bound kernels**: the permute and the un-permute/weighted-sum
//!    phases' useful bytes (each routed row read and written once; the
//!    output written once) over their busy time, to compare with a
//!    device-to-device copy.
//!
//! Weights and inputs are drawn from the seed as for `moec run`; nothing is
//! compared with the CPU backend here (at benchmark sizes it would take
//! minutes): `runtime/gpu/check.sh` does that at reduced sizes.

use super::{io, print_report, BenchArgs, Dims, Failure, Row};
use crate::cli::{EXIT_REJECTED, EXIT_USAGE};
use moec_runtime::cuda::issue::{capturable, Timing};
use moec_runtime::cuda::program::Program;
use moec_runtime::cuda::{CudaBackend, CudaOptions};
use moec_runtime::plan::{Phase, Plan};
use moec_runtime::weights::{random_inputs, LayerWeights};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

/// The length of the union of `[start, start + len)` intervals.
fn busy_seconds(mut intervals: Vec<(f64, f64)>) -> f64 {
    intervals.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut open: Option<(f64, f64)> = None;
    for (start, len) in intervals {
        let end = start + len.max(0.0);
        open = match open {
            Some((s, e)) if start <= e => Some((s, e.max(end))),
            Some((s, e)) => {
                total += e - s;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((s, e)) = open {
        total += e - s;
    }
    total
}

/// One phase of the profiled pass.
struct PhaseTime {
    phase: Phase,
    /// Union of its steps' intervals.
    busy: f64,
    /// Sum of its steps' intervals, mean over ranks.
    per_rank: f64,
}

/// A throughput: an amount of work over the busy time it took.
struct Rate {
    what: &'static str,
    amount: f64,
    seconds: f64,
}

impl Rate {
    fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.amount / self.seconds
        } else {
            0.0
        }
    }
}

/// What the profiled pass measured.
struct Profile {
    phases: Vec<PhaseTime>,
    gemm: Rate,
    gemm_calls: usize,
    memory: Vec<Rate>,
}

/// The figures of a profiled pass of `plan` on `ranks` ranks whose routing
/// kept `kept_rows` rows; `phase_of` gives an op's phase.
fn profile(
    timings: &[Timing],
    phase_of: impl Fn(usize) -> Option<Phase>,
    ranks: usize,
    plan: &Plan,
    kept_rows: f64,
) -> Profile {
    let ranks = ranks.max(1) as f64;
    let mut by_phase: BTreeMap<Phase, Vec<(f64, f64)>> = BTreeMap::new();
    let mut gemm_intervals = Vec::new();
    let mut gemm_flops = 0.0;
    for t in timings {
        let Some(phase) = phase_of(t.op) else {
            continue;
        };
        match t.gemm {
            None => by_phase
                .entry(phase)
                .or_default()
                .push((t.start, t.seconds)),
            Some((m, n, k)) if phase == Phase::Experts => {
                gemm_flops += 2.0 * m as f64 * n as f64 * k as f64;
                gemm_intervals.push((t.start, t.seconds));
            }
            Some(_) => {}
        }
    }
    let phases = by_phase
        .into_iter()
        .map(|(phase, intervals)| PhaseTime {
            phase,
            per_rank: intervals.iter().map(|i| i.1).sum::<f64>() / ranks,
            busy: busy_seconds(intervals),
        })
        .collect::<Vec<_>>();
    let busy = |p: Phase| phases.iter().find(|x| x.phase == p).map_or(0.0, |x| x.busy);
    let l = &plan.layer;
    let h = l.hidden as f64;
    let elem = l.dtype.bytes() as f64;
    let wire = plan.choices.dispatch_dtype.bytes() as f64;
    let tokens = (plan.mesh.world_size() * l.tokens_per_rank) as f64;
    let gemm_calls = gemm_intervals.len();
    Profile {
        gemm: Rate {
            what: "expert GEMMs",
            amount: gemm_flops,
            seconds: busy_seconds(gemm_intervals),
        },
        gemm_calls,
        memory: vec![
            Rate {
                what: "permute",
                amount: kept_rows * h * (elem + wire),
                seconds: busy(Phase::Permute),
            },
            Rate {
                what: "unpermute",
                amount: kept_rows * h * elem + tokens * h * elem,
                seconds: busy(Phase::Unpermute),
            },
        ],
        phases,
    }
}

/// Runs `moec bench --backend cuda` on `plan`.
pub fn bench_cuda(
    a: &BenchArgs,
    plan: Plan,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    let layer = plan.layer.clone();
    let dims = Dims::of(&plan)?;
    writeln!(
        err,
        "moec bench --backend cuda: {}; warmup {}, iters {}",
        dims.describe(&layer),
        a.warmup,
        a.iters
    )
    .map_err(io)?;
    if a.graph {
        // Before minutes of weights: can this plan run as a graph at all?
        let program = Program::lower(&plan).map_err(|e| (EXIT_REJECTED, e))?;
        let every_rank: Vec<usize> = (0..dims.world).collect();
        if !capturable(&program, &every_rank) {
            return Err((
                EXIT_REJECTED,
                "--graph: only capacity plans run as a CUDA graph (a dropless plan reads the routing on the host during the pass); give the layer a `capacity`".into(),
            ));
        }
    }
    let clock = Instant::now();
    writeln!(err, "drawing weights and inputs (seed {})", a.seed).map_err(io)?;
    let weights = LayerWeights::random(&layer, a.seed);
    let inputs = random_inputs(&layer, dims.world, dims.tokens, a.seed);
    writeln!(
        err,
        "  {:.1} s; compiling kernels (NVRTC), allocating and uploading weights",
        clock.elapsed().as_secs_f64()
    )
    .map_err(io)?;
    let clock = Instant::now();
    let rejected = |e: moec_runtime::cpu::ExecError| (EXIT_REJECTED, e.to_string());
    let mut backend =
        CudaBackend::new(plan.clone(), &weights, CudaOptions::default()).map_err(rejected)?;
    drop(weights);
    let device = backend.describe();
    writeln!(
        err,
        "  {:.1} s; device: {device}",
        clock.elapsed().as_secs_f64()
    )
    .map_err(io)?;
    if backend.local_ranks().len() != dims.world {
        return Err((
            EXIT_USAGE,
            "moec bench --backend cuda runs every rank in one process (virtual ranks); unset WORLD_SIZE and MOEC_COMM".into(),
        ));
    }

    let first = backend.forward(&inputs).map_err(rejected)?;
    let values = first.outputs.iter().flatten();
    let (mut finite, mut nonzero) = (true, false);
    for v in values {
        finite &= v.is_finite();
        nonzero |= *v != 0.0;
    }
    if !finite || !nonzero {
        return Err((
            EXIT_REJECTED,
            format!(
                "the first pass's output is {}: the benchmark would time a broken layer",
                if finite { "all zero" } else { "not finite" }
            ),
        ));
    }
    writeln!(err, "first pass: {:.3} ms", first.wall_seconds * 1e3).map_err(io)?;
    let stats = first.stats;
    // The eager output the graph's must equal.
    let eager_outputs = if a.graph { first.outputs } else { Vec::new() };

    let mut times = Vec::with_capacity(a.iters);
    for round in 0..a.warmup + a.iters {
        let f = backend.forward(&inputs).map_err(rejected)?;
        if round >= a.warmup {
            times.push(f.wall_seconds);
        }
    }
    let graph = if a.graph {
        let captured = backend.forward_graph(&inputs).map_err(rejected)?;
        if captured.outputs.iter().flatten().any(|v| !v.is_finite()) {
            return Err((
                EXIT_REJECTED,
                "the CUDA graph's output is not finite".into(),
            ));
        }
        let (mut diff, mut max) = (0.0f64, 0.0f64);
        for (g, e) in captured
            .outputs
            .iter()
            .flatten()
            .zip(eager_outputs.iter().flatten())
        {
            diff = diff.max(f64::from((g - e).abs()));
            max = max.max(f64::from(e.abs()));
        }
        if diff.is_nan() || diff > 1e-2 * max {
            return Err((
                EXIT_REJECTED,
                format!("the CUDA graph's output differs from the eager pass's (max difference {diff:.3e} of {max:.3e})"),
            ));
        }
        writeln!(
            err,
            "CUDA graph captured: {:.3} ms (output max difference to the eager pass {diff:.1e})",
            captured.wall_seconds * 1e3
        )
        .map_err(io)?;
        let mut graph_times = Vec::with_capacity(a.iters);
        for round in 0..a.warmup + a.iters {
            let f = backend.forward_graph(&inputs).map_err(rejected)?;
            if round >= a.warmup {
                graph_times.push(f.wall_seconds);
            }
        }
        Some(Row::new("moec cuda backend, CUDA graph", &graph_times, 0.0))
    } else {
        None
    };
    let (profiled, timings) = backend.forward_profiled(&inputs).map_err(rejected)?;
    let kept: u64 = stats.routed_per_expert.iter().sum::<u64>() - stats.dropped;
    let prof = profile(
        &timings,
        |op| backend.op_phase(op),
        backend.local_ranks().len(),
        &plan,
        kept as f64,
    );
    let flops = dims.flops(&stats.routed_per_expert);
    let total = Row::new("moec cuda backend", &times, flops);
    let report = CudaReport {
        a,
        device,
        dims: &dims,
        plan: &plan,
        total,
        graph,
        profiled_seconds: profiled.wall_seconds,
        prof,
        stats: &stats,
    };
    print_report(out, a.json, || report.json(), || report.text())
}

struct CudaReport<'a> {
    a: &'a BenchArgs,
    device: String,
    dims: &'a Dims,
    plan: &'a Plan,
    total: Row,
    /// Passes run as a CUDA graph (`--graph`).
    graph: Option<Row>,
    profiled_seconds: f64,
    prof: Profile,
    stats: &'a moec_runtime::RoutingStats,
}

impl CudaReport<'_> {
    fn tokens(&self) -> f64 {
        (self.dims.world * self.dims.tokens) as f64
    }

    fn json(&self) -> serde_json::Value {
        let l = &self.plan.layer;
        let rate = |r: &Rate, unit: f64| {
            serde_json::json!({
                "what": r.what,
                "amount": r.amount,
                "busy_ms": r.seconds * 1e3,
                "rate": r.per_second() / unit,
            })
        };
        serde_json::json!({
            "backend": "cuda",
            "file": self.a.file.display().to_string(),
            "device": self.device,
            "layer": l.name,
            "ranks": self.dims.world,
            "tokens_per_rank": self.dims.tokens,
            "hidden": self.dims.hidden,
            "intermediate": self.dims.width,
            "experts": self.dims.experts,
            "top_k": l.router.top_k,
            "dtype": l.dtype.name(),
            "dispatch_dtype": self.plan.choices.dispatch_dtype.name(),
            "chunks": self.plan.choices.chunks,
            "iters": self.a.iters,
            "warmup": self.a.warmup,
            "seed": self.a.seed,
            "flops": self.total.gflops * self.total.median * 1e9,
            "total_ms": { "median": self.total.median * 1e3, "min": self.total.min * 1e3 },
            "graph_total_ms": self.graph.as_ref().map(|g| serde_json::json!({ "median": g.median * 1e3, "min": g.min * 1e3 })),
            "tflops": self.total.gflops / 1e3,
            "tokens_per_s": if self.total.median > 0.0 { self.tokens() / self.total.median } else { 0.0 },
            "profiled_pass_ms": self.profiled_seconds * 1e3,
            "phases": self.prof.phases.iter().map(|p| serde_json::json!({
                "phase": p.phase.name(),
                "busy_ms": p.busy * 1e3,
                "per_rank_ms": p.per_rank * 1e3,
            })).collect::<Vec<_>>(),
            "expert_gemm": {
                "calls": self.prof.gemm_calls,
                "flops": self.prof.gemm.amount,
                "busy_ms": self.prof.gemm.seconds * 1e3,
                "tflops": self.prof.gemm.per_second() / 1e12,
            },
            "memory_bound": self.prof.memory.iter().map(|r| rate(r, 1e9)).collect::<Vec<_>>(),
            "routing": {
                "assignments": self.stats.assignments,
                "dropped": self.stats.dropped,
                "imbalance": self.stats.imbalance(),
            },
        })
    }

    fn text(&self) -> String {
        let mut s = String::new();
        let l = &self.plan.layer;
        s += &format!(
            "layer {}: {} rank(s) x {} tokens, hidden {}, {} experts x {}, top-{}, {} ({} on the wire), {} chunk(s)\n",
            l.name,
            self.dims.world,
            self.dims.tokens,
            self.dims.hidden,
            self.dims.experts,
            self.dims.width,
            l.router.top_k,
            l.dtype.name(),
            self.plan.choices.dispatch_dtype.name(),
            self.plan.choices.chunks
        );
        s += &format!("device: {}\n\n", self.device);
        s += &format!(
            "total: median {:.3} ms, min {:.3} ms over {} passes; {:.1} TFLOP/s, {:.0} tokens/s\n",
            self.total.median * 1e3,
            self.total.min * 1e3,
            self.a.iters,
            self.total.gflops / 1e3,
            if self.total.median > 0.0 {
                self.tokens() / self.total.median
            } else {
                0.0
            }
        );
        if let Some(g) = &self.graph {
            s += &format!(
                "as a CUDA graph: median {:.3} ms, min {:.3} ms\n",
                g.median * 1e3,
                g.min * 1e3
            );
        }
        s += &format!(
            "profiled pass: {:.3} ms (a timing event around every step)\n\n",
            self.profiled_seconds * 1e3
        );
        s += &format!(
            "{:<12} {:>12} {:>14}\n",
            "phase", "busy (ms)", "per rank (ms)"
        );
        for p in &self.prof.phases {
            s += &format!(
                "{:<12} {:>12.3} {:>14.3}\n",
                p.phase.name(),
                p.busy * 1e3,
                p.per_rank * 1e3
            );
        }
        s += &format!(
            "\nexpert GEMMs: {} cuBLAS calls, {:.1} GFLOP in {:.3} ms busy: {:.1} TFLOP/s\n",
            self.prof.gemm_calls,
            self.prof.gemm.amount / 1e9,
            self.prof.gemm.seconds * 1e3,
            self.prof.gemm.per_second() / 1e12
        );
        for r in &self.prof.memory {
            s += &format!(
                "{}: {:.1} MB in {:.3} ms busy: {:.0} GB/s\n",
                r.what,
                r.amount / 1e6,
                r.seconds * 1e3,
                r.per_second() / 1e9
            );
        }
        s += &format!(
            "routing: {} assignments, {} dropped, load imbalance (max/mean) {:.2}\n",
            self.stats.assignments,
            self.stats.dropped,
            self.stats.imbalance()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan of a small layer (the figures only read its sizes).
    fn plan() -> Plan {
        let source =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny.moe"))
                .expect("examples/tiny.moe");
        let checked = moec_lang::check_source(&source);
        let (program, _) = checked.program.expect("tiny.moe checks");
        crate::compile::compile(&program, &crate::compile::Options::default())
            .expect("tiny.moe compiles")
            .plan
    }

    fn step(rank: usize, op: usize, start: f64, seconds: f64) -> Timing {
        Timing {
            rank,
            op,
            gemm: None,
            start,
            seconds,
        }
    }

    /// Phases are unions over ranks, GEMM rates count only the experts'
    /// GEMMs over their busy time, bandwidths use the routed rows.
    #[test]
    fn a_profile_adds_up() {
        let plan = plan();
        let phase_of = |op: usize| match op {
            0 => Some(Phase::Router),
            1 => Some(Phase::Experts),
            2 => Some(Phase::Permute),
            _ => None,
        };
        let gemm = |rank, op, start, seconds, m| Timing {
            gemm: Some((m, 10, 20)),
            ..step(rank, op, start, seconds)
        };
        let timings = vec![
            step(0, 0, 0.0, 1.0),
            step(1, 0, 0.5, 1.0),
            step(0, 1, 2.0, 2.0),
            step(1, 1, 5.0, 1.0),
            gemm(0, 1, 2.0, 1.0, 4),
            gemm(1, 1, 5.0, 0.5, 6),
            gemm(0, 0, 0.0, 1.0, 100), // the router's GEMM: not an expert GEMM
            step(0, 2, 7.0, 0.25),
            step(0, 9, 0.0, 100.0), // an op without a phase: ignored
        ];
        let p = profile(&timings, phase_of, 2, &plan, 64.0);
        let router = p.phases.iter().find(|x| x.phase == Phase::Router).unwrap();
        assert_eq!(router.busy, 1.5);
        assert_eq!(router.per_rank, 1.0);
        let experts = p.phases.iter().find(|x| x.phase == Phase::Experts).unwrap();
        assert_eq!(experts.busy, 3.0);
        assert_eq!(p.gemm_calls, 2);
        assert_eq!(p.gemm.amount, 2.0 * 10.0 * 20.0 * 10.0);
        assert_eq!(p.gemm.seconds, 1.5);
        let permute = &p.memory[0];
        let l = &plan.layer;
        let bytes =
            64.0 * l.hidden as f64 * (l.dtype.bytes() + plan.choices.dispatch_dtype.bytes()) as f64;
        assert_eq!(permute.amount, bytes);
        assert_eq!(permute.per_second(), bytes / 0.25);
        assert_eq!(p.memory[1].per_second(), 0.0, "no unpermute step ran");
    }

    #[test]
    fn busy_time_is_the_union_of_intervals() {
        assert_eq!(busy_seconds(vec![]), 0.0);
        assert_eq!(busy_seconds(vec![(0.0, 1.0), (2.0, 1.0)]), 2.0);
        assert_eq!(busy_seconds(vec![(2.0, 2.0), (0.0, 3.0)]), 4.0);
        assert_eq!(busy_seconds(vec![(0.0, 5.0), (1.0, 1.0), (6.0, 0.5)]), 5.5);
    }
}
