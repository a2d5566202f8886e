//! Benchmark: `moec build` of every example, end to end in-process (check,
//! lower, rewrite, extract, schedule and simulate every candidate).
//!
//! Run with `cargo bench -p moec --bench build`. Prints the median, min and
//! max of N runs per example (`MOEC_BENCH_RUNS`, default 20).

use std::time::Instant;

fn main() {
    let runs: usize = std::env::var("MOEC_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
        .max(1);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "moe"))
            .collect(),
        Err(e) => {
            eprintln!("cannot read {}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    files.sort();
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>10}   plan",
        "example", "ranks", "median ms", "min ms", "max ms"
    );
    for path in files {
        let Ok(source) = std::fs::read_to_string(&path) else {
            eprintln!("cannot read {}", path.display());
            continue;
        };
        let mut times = Vec::with_capacity(runs);
        let mut summary = String::new();
        let mut ranks = 0;
        for _ in 0..runs {
            let start = Instant::now();
            let checked = moec_lang::check_source(&source);
            let Some((program, _)) = checked.program else {
                eprintln!("{} does not check", path.display());
                break;
            };
            let compiled = match moec::compile::compile(&program, &Default::default()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    break;
                }
            };
            let text = compiled.plan.to_string();
            times.push(start.elapsed().as_secs_f64() * 1e3);
            ranks = compiled.plan.mesh.world_size();
            summary = format!(
                "{} chunk(s), {:.1} us predicted ({:.1} us baseline), {} lines",
                compiled.plan.choices.chunks,
                compiled.timeline.total_us,
                compiled.baseline_timeline.total_us,
                text.lines().count()
            );
        }
        if times.is_empty() {
            continue;
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        println!(
            "{:<22} {:>6} {:>10.2} {:>10.2} {:>10.2}   {summary}",
            name,
            ranks,
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
}
