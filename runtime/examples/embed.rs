//! Embeds the moec runtime: loads a plan and its weights, runs one forward
//! pass on random inputs and prints what came out.
//!
//! ```text
//! moec build examples/tiny.moe --emit json -o tiny.plan.json
//! cargo run -p moec-runtime --example embed -- tiny.plan.json [--weights PATH [--prefix P | --layer N]] [--seed S]
//! ```
//!
//! Without `--weights` the weights are drawn from the seed. Exit codes: 0
//! success, 1 the plan, weights or run failed, 2 a usage error.

use std::error::Error;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use moec_runtime::{CpuOptions, Layer, Weights};

const USAGE: &str = "usage: embed PLAN.json [--weights PATH [--prefix P | --layer N]] [--seed S]";

struct Args {
    plan: PathBuf,
    weights: Option<PathBuf>,
    prefix: String,
    layer: Option<u64>,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut plan = None;
    let mut weights = None;
    let mut prefix = None;
    let mut layer = None;
    let mut seed = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--weights" => weights = Some(PathBuf::from(value("--weights")?)),
            "--prefix" => prefix = Some(value("--prefix")?),
            "--layer" => {
                let n = value("--layer")?;
                layer = Some(
                    n.parse()
                        .map_err(|_| format!("--layer {n}: not a number"))?,
                );
            }
            "--seed" => {
                let s = value("--seed")?;
                seed = s.parse().map_err(|_| format!("--seed {s}: not a number"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            a if a.starts_with('-') => return Err(format!("unknown option {a}")),
            _ if plan.is_some() => return Err(format!("unexpected argument {arg}")),
            _ => plan = Some(PathBuf::from(arg)),
        }
    }
    if (prefix.is_some() || layer.is_some()) && weights.is_none() {
        return Err("--prefix and --layer need --weights".into());
    }
    if prefix.is_some() && layer.is_some() {
        return Err("--prefix and --layer cannot be combined".into());
    }
    Ok(Args {
        plan: plan.ok_or("no plan file given")?,
        weights,
        prefix: prefix.unwrap_or_default(),
        layer,
        seed,
    })
}

fn run(args: Args, out: &mut impl Write) -> Result<(), Box<dyn Error>> {
    let weights = match (args.weights, args.layer) {
        (Some(path), Some(layer)) => Weights::FileLayer { path, layer },
        (Some(path), None) => Weights::File {
            path,
            prefix: args.prefix,
        },
        (None, _) => Weights::Random { seed: args.seed },
    };
    let source = match &weights {
        Weights::File { path, .. } => path.display().to_string(),
        Weights::FileLayer { path, layer } => format!("{}, layer {layer}", path.display()),
        _ => format!("random, seed {}", args.seed),
    };
    let layer = Layer::from_plan_file(&args.plan, weights, CpuOptions::default())?;
    let plan = layer.plan();
    writeln!(
        out,
        "layer {}: {} rank(s) x {} tokens, hidden {}, {} experts; weights: {source}",
        plan.layer.name,
        layer.ranks(),
        layer.tokens_per_rank(),
        layer.hidden(),
        plan.layer.experts
    )?;

    let inputs = layer.random_inputs(args.seed);
    let forward = layer.forward(&inputs)?;

    for (rank, y) in forward.outputs.iter().enumerate() {
        let mean_abs = y.iter().map(|v| f64::from(v.abs())).sum::<f64>() / y.len().max(1) as f64;
        writeln!(
            out,
            "rank {rank}: output [{}, {}], mean |y| {mean_abs:.6}",
            y.len() / layer.hidden().max(1),
            layer.hidden()
        )?;
    }
    let stats = &forward.stats;
    let per_expert: Vec<String> = stats
        .routed_per_expert
        .iter()
        .enumerate()
        .map(|(e, n)| format!("{e}:{n}"))
        .collect();
    writeln!(out, "tokens per expert: {}", per_expert.join(" "))?;
    writeln!(
        out,
        "dropped: {} of {} assignments",
        stats.dropped, stats.assignments
    )?;
    writeln!(out, "load imbalance (max/mean): {:.2}", stats.imbalance())?;
    writeln!(out, "wall time: {:.3} ms", forward.wall_seconds * 1e3)?;
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("embed: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: error: {e}");
            ExitCode::from(1)
        }
    }
}
