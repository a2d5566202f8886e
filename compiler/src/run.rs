//! `moec run`: compile a layer and execute it on a backend.
//!
//! The overrides (`--ranks`, `--tokens`, `--dtype`, `--hidden`, `--ffn`) edit
//! the checked program before it is compiled, so the plan that runs is the
//! plan `moec build` would print for the edited layer.

use moec_lang::spec::{DType, Link, Placement, Program};

/// Edits a checked program for a run.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub ranks: Option<u64>,
    pub tokens: Option<u64>,
    pub dtype: Option<DType>,
    pub hidden: Option<u64>,
    pub ffn: Option<u64>,
}

/// Applies `o` to `program`, or says why it cannot.
pub fn apply(program: &mut Program, o: &Overrides) -> Result<(), String> {
    let layer = &mut program.layer;
    if let Some(t) = o.tokens {
        if t == 0 {
            return Err("--tokens must be at least 1".into());
        }
        layer.tokens_per_rank = t;
    }
    if let Some(d) = o.dtype {
        layer.dtype = d;
    }
    if let Some(h) = o.hidden {
        if h == 0 {
            return Err("--hidden must be at least 1".into());
        }
        layer.hidden = h;
    }
    if let Some(f) = o.ffn {
        if f == 0 {
            return Err("--ffn must be at least 1".into());
        }
        // Shared experts keep their size relative to the routed ones
        // (Qwen2-MoE's shared expert is 8 times wider).
        if let Some(shared) = layer.shared.as_mut() {
            let scaled = (shared.intermediate as f64 * f as f64
                / layer.experts.intermediate.max(1) as f64)
                .round() as u64;
            shared.intermediate = scaled.max(1);
        }
        layer.experts.intermediate = f;
    }
    if let Some(n) = o.ranks {
        reshape_mesh(program, n)?;
    }
    Ok(())
}

/// `--ranks N`: one EP group of `N` ranks, filling nodes of the file's size.
fn reshape_mesh(program: &mut Program, ranks: u64) -> Result<(), String> {
    let experts = program.layer.experts.count;
    let mesh = &mut program.mesh;
    if ranks == 0 {
        return Err("--ranks must be at least 1".into());
    }
    if mesh.etp != 1 {
        return Err(format!(
            "--ranks reshapes expert parallelism only; this mesh has etp = {}",
            mesh.etp
        ));
    }
    if matches!(mesh.placement, Placement::Explicit(_)) || !mesh.replicas.is_empty() {
        return Err(
            "--ranks cannot reshape an explicit placement or replicas; edit the mesh block instead"
                .into(),
        );
    }
    if experts % ranks != 0 {
        return Err(format!(
            "--ranks {ranks} does not divide the {experts} experts evenly"
        ));
    }
    let gpn = mesh.gpus_per_node.max(1);
    let (nodes, gpus_per_node) = if ranks % gpn == 0 {
        (ranks / gpn, gpn)
    } else {
        (1, ranks)
    };
    if nodes > 1 && mesh.inter_node.is_none() {
        // A one-node file grown to several nodes: borrow the intra-node link
        // figures rather than invent new ones.
        mesh.inter_node = Some(Link {
            bandwidth: mesh.intra_node.bandwidth,
            latency: mesh.intra_node.latency,
        });
    }
    if nodes == 1 {
        mesh.inter_node = None;
    }
    mesh.nodes = nodes;
    mesh.gpus_per_node = gpus_per_node;
    mesh.ep = ranks;
    mesh.dp = 1;
    Ok(())
}

/// Checks that `moec run --backend cuda` can run on this machine before the
/// layer is compiled: a CUDA driver and a GPU (an exit code and a message
/// otherwise; `no CUDA driver found; use --backend cpu` without a driver).
pub fn cuda_preflight(shuffle: bool) -> Result<(), (i32, String)> {
    use crate::cli::{EXIT_REJECTED, EXIT_USAGE};
    if shuffle {
        return Err((
            EXIT_USAGE,
            "--shuffle is the CPU backend's race check of the plan; drop --backend cuda to use it"
                .into(),
        ));
    }
    moec_runtime::cuda::device::probe()
        .map(|_| ())
        .map_err(|e| (EXIT_REJECTED, e.to_string()))
}

/// Runs `plan` on the CUDA backend: every rank a virtual rank of one GPU,
/// or, under torchrun (`WORLD_SIZE` > 1), this process's rank over NCCL
/// (the outputs are then this rank's only). Prints where it runs. The pass
/// is profiled, so the phases hold their device times; with `graph` it
/// runs as a CUDA graph instead (no phases).
pub fn cuda_forward(
    plan: moec_runtime::Plan,
    weights: &moec_runtime::weights::LayerWeights,
    inputs: &[Vec<f32>],
    graph: bool,
    out: &mut dyn std::io::Write,
) -> Result<moec_runtime::Forward, (i32, String)> {
    use crate::cli::{EXIT_REJECTED, EXIT_USAGE};
    use moec_runtime::cuda::{CudaBackend, CudaOptions};
    let rejected = |e: moec_runtime::cpu::ExecError| (EXIT_REJECTED, e.to_string());
    let mut backend = CudaBackend::new(plan, weights, CudaOptions::default()).map_err(rejected)?;
    let how = if graph { ", as a CUDA graph" } else { "" };
    writeln!(out, "device: {}{how}", backend.describe())
        .map_err(|e| (EXIT_USAGE, format!("cannot write output: {e}")))?;
    if graph {
        return backend.forward_graph(inputs).map_err(rejected);
    }
    backend
        .forward_profiled(inputs)
        .map(|(forward, _)| forward)
        .map_err(rejected)
}

/// Each collective of a plan (op name, every chunk together) with the bytes the
/// plan expects one rank to send in it (the cost model's figure for uniform
/// routing), in the order the plan first runs them.
pub fn expected_traffic(plan: &moec_runtime::Plan) -> Vec<(String, u64)> {
    let mut ops: Vec<_> = plan.ops().map(|(_, op)| op).collect();
    ops.sort_by_key(|op| op.id);
    let mut out: Vec<(String, u64)> = Vec::new();
    for op in ops {
        if let moec_runtime::plan::OpKind::Collective { bytes_sent, .. } = op.kind {
            match out.iter_mut().find(|(name, _)| *name == op.name) {
                Some((_, bytes)) => *bytes = bytes.saturating_add(bytes_sent),
                None => out.push((op.name.clone(), bytes_sent)),
            }
        }
    }
    out
}

/// The traffic table `moec run` prints: per collective and link class, the
/// rows and bytes each rank sent (mean and max over ranks), and beside each
/// collective the bytes over links (local copies excluded) against the plan's
/// expectation.
pub fn traffic_table(
    expected: &[(String, u64)],
    traffic: &[moec_runtime::cpu::traffic::RankTraffic],
) -> String {
    use moec_runtime::cpu::traffic::LinkClass;
    use moec_runtime::plan::human_bytes;
    use std::fmt::Write as _;
    let ranks = traffic.len().max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:<11} {:>10} {:>12} {:>12} {:>12}",
        "collective", "link", "rows/rank", "bytes/rank", "max bytes", "plan"
    );
    for (name, plan_bytes) in expected {
        let mut over_links = 0u64;
        for link in LinkClass::ALL {
            let key = (name.clone(), link);
            let per_rank: Vec<_> = traffic.iter().filter_map(|t| t.get(&key)).collect();
            if per_rank.is_empty() {
                continue;
            }
            let rows: u64 = per_rank.iter().map(|m| m.rows).sum();
            let bytes: u64 = per_rank.iter().map(|m| m.bytes).sum();
            let max = per_rank.iter().map(|m| m.bytes).max().unwrap_or(0);
            if link != LinkClass::Local {
                over_links += bytes;
            }
            let _ = writeln!(
                s,
                "{:<22} {:<11} {:>10.1} {:>12} {:>12}",
                name,
                link.name(),
                rows as f64 / ranks,
                human_bytes((bytes as f64 / ranks).round() as u64),
                human_bytes(max),
            );
        }
        let _ = writeln!(
            s,
            "{:<22} {:<11} {:>10} {:>12} {:>12} {:>12}",
            name,
            "all links",
            "",
            human_bytes((over_links as f64 / ranks).round() as u64),
            "",
            human_bytes(*plan_bytes),
        );
    }
    s
}

/// What a shrunk run's plan chose differently from the layer as written
/// (the all-to-all, the dtype on the wire), or `None` when they agree.
pub fn shrink_note(shrunk: &moec_runtime::Plan, written: &moec_runtime::Plan) -> Option<String> {
    use moec_runtime::plan::A2aAlgorithm;
    let form = |p: &moec_runtime::Plan| {
        let algorithm = match p.choices.dispatch {
            A2aAlgorithm::Flat => "flat",
            A2aAlgorithm::Hierarchical => "hierarchical",
        };
        format!(
            "a {algorithm} dispatch in {}",
            p.choices.dispatch_dtype.name()
        )
    };
    let (small, full) = (form(shrunk), form(written));
    (small != full).then(|| {
        format!(
            "at this size the compiler chose {small}, but the layer as written compiles to {full}: \
             what pays depends on the bytes per row and per rank, so a larger --hidden or --tokens \
             runs the written layer's plan"
        )
    })
}
