//! `moec tune`: for a layer and a number of GPUs, every mesh factorisation
//! the checker accepts (nodes x GPUs per node, `ep x etp x dp`) and, for a
//! layer with a capacity factor, a few factors around it, each compiled and
//! simulated (the overlap and the routing form are the compiler's own
//! choices for each), ranked: plans that fit the device first, then by
//! predicted time.
//!
//! Candidates are written as `.moe` text through the checker, so a mesh the
//! language forbids (an `ep` that does not divide the experts, an `etp` that
//! does not divide the intermediate size) is never scored, and the winner
//! can be written out as a file `moec check` accepts.

use crate::compile::{compile, fits_device, rank_memory_bytes, Options};
use crate::cost::RoutingForm;
use moec_lang::spec::{Capacity, CapacityLimit, DropPolicy, Program};

/// Capacity factors tried beside a layer's own.
const FACTORS: &[f64] = &[1.0, 1.25, 1.5, 2.0];

/// What to tune for.
#[derive(Clone, Debug, Default)]
pub struct TuneOptions {
    /// GPUs in all.
    pub gpus: u64,
    /// Nodes, when fixed (otherwise nodes of the file's GPUs per node).
    pub nodes: Option<u64>,
    /// Another device preset than the file's.
    pub device: Option<String>,
}

/// One scored mesh.
#[derive(Clone, Debug)]
pub struct Tuned {
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub ep: u64,
    pub etp: u64,
    pub dp: u64,
    /// The capacity factor tried (a layer with a capacity factor).
    pub capacity_factor: Option<f64>,
    pub total_us: f64,
    /// Activations and weights of one rank, bytes.
    pub memory_bytes: u64,
    pub fits: bool,
    pub chunks: u64,
    pub routing: RoutingForm,
    /// The file's own mesh (and capacity).
    pub own: bool,
    /// The `.moe` text of this candidate.
    pub source: String,
}

/// Every divisor of `n`, ascending.
fn divisors(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut d = 1;
    while d * d <= n {
        if n % d == 0 {
            small.push(d);
            if d * d != n {
                large.push(n / d);
            }
        }
        d += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// Most GPUs `moec tune` factors (the candidates grow with the divisors).
pub const MAX_TUNE_GPUS: u64 = 1 << 16;

/// Ranks every mesh of `options.gpus` GPUs for the layer of `source`
/// (checked as `program`); `progress(done, total)` after each candidate.
pub fn tune(
    source: &str,
    program: &Program,
    options: &TuneOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Tuned>, String> {
    let n = options.gpus;
    if n == 0 || n > MAX_TUNE_GPUS {
        return Err(format!("--gpus {n}: expected 1 to {MAX_TUNE_GPUS}"));
    }
    let m = &program.mesh;
    let (nodes, per_node) = match options.nodes {
        Some(0) => return Err("--nodes 0: expected at least 1".into()),
        Some(k) if n % k != 0 => {
            return Err(format!(
                "{n} GPUs do not split into {k} nodes of equal size"
            ))
        }
        Some(k) => (k, n / k),
        None if n <= m.gpus_per_node => (1, n),
        None if n % m.gpus_per_node == 0 => (n / m.gpus_per_node, m.gpus_per_node),
        None => {
            return Err(format!(
                "{n} GPUs do not fill nodes of the file's {} GPUs; give --nodes",
                m.gpus_per_node
            ))
        }
    };
    if nodes > 1 && m.inter_node.is_none() {
        return Err(format!(
            "{n} GPUs take {nodes} nodes, but the file's mesh has no `inter_node` link; \
             add one to its mesh section"
        ));
    }
    let l = &program.layer;
    // The layer's own capacity factor, and the factors tried beside it.
    let own_factor = match l.capacity {
        Capacity::Limited {
            limit: CapacityLimit::Factor(f),
            ..
        } => Some(f),
        _ => None,
    };
    let factors: Vec<Option<f64>> = match own_factor {
        Some(f) => {
            let mut fs: Vec<f64> = FACTORS.to_vec();
            if !fs.iter().any(|x| (x - f).abs() < 1e-12) {
                fs.push(f);
            }
            fs.sort_by(f64::total_cmp);
            fs.into_iter().map(Some).collect()
        }
        None => vec![None],
    };
    let mut shapes = Vec::new();
    for ep in divisors(n) {
        for etp in divisors(n / ep) {
            // The checker's rules, to skip what it would refuse anyway.
            if l.experts.count % ep != 0 || l.experts.intermediate % etp != 0 {
                continue;
            }
            for &factor in &factors {
                shapes.push((ep, etp, n / (ep * etp), factor));
            }
        }
    }
    let total = shapes.len();
    let mut out = Vec::new();
    for (i, (ep, etp, dp, factor)) in shapes.into_iter().enumerate() {
        let text = candidate_source(
            source,
            program,
            options,
            (nodes, per_node),
            (ep, etp, dp),
            factor,
        )?;
        progress(i + 1, total);
        // A mesh the checker refuses (a rank limit, a link) is not a candidate.
        let Some((p, _)) = moec_lang::check_source(&text).program else {
            continue;
        };
        let compiled = compile(&p, &Options::default())
            .map_err(|e| format!("ep {ep}, etp {etp}, dp {dp}: {e}"))?;
        let plan = &compiled.plan;
        out.push(Tuned {
            nodes,
            gpus_per_node: per_node,
            ep,
            etp,
            dp,
            capacity_factor: factor,
            total_us: compiled.timeline.total_us,
            memory_bytes: rank_memory_bytes(plan),
            fits: fits_device(plan),
            chunks: plan.choices.chunks,
            routing: RoutingForm::of(&plan.choices),
            own: (nodes, per_node, ep, etp, dp) == (m.nodes, m.gpus_per_node, m.ep, m.etp, m.dp)
                && factor == own_factor
                && options.device.is_none()
                && m.replicas.is_empty()
                && matches!(m.placement, moec_lang::spec::Placement::Contiguous),
            source: text,
        });
    }
    // Plans that fit first, then the fastest; ties keep the enumeration order.
    out.sort_by(|a, b| b.fits.cmp(&a.fits).then(a.total_us.total_cmp(&b.total_us)));
    Ok(out)
}

/// The `.moe` text of one candidate: the mesh's size, degrees and device
/// replaced (its placement back to contiguous), the capacity factor too.
fn candidate_source(
    source: &str,
    program: &Program,
    options: &TuneOptions,
    (nodes, per_node): (u64, u64),
    (ep, etp, dp): (u64, u64, u64),
    factor: Option<f64>,
) -> Result<String, String> {
    let mut add =
        format!("nodes = {nodes}\ngpus_per_node = {per_node}\nep = {ep}\netp = {etp}\ndp = {dp}\n");
    let mut remove = vec![
        "nodes",
        "gpus_per_node",
        "ep",
        "etp",
        "dp",
        "placement",
        "replicas",
    ];
    if let Some(device) = &options.device {
        add.push_str(&format!("device = {device}\n"));
        remove.push("device");
    }
    let mut text = crate::source_edit::replace_entries(source, "mesh", &remove, &add)?;
    if let (Some(f), Capacity::Limited { drop, .. }) = (factor, program.layer.capacity) {
        let drop = match drop {
            DropPolicy::Position => "position",
            DropPolicy::Probs => "probs",
        };
        let capacity = format!("capacity {{\nfactor = {f}\ndrop = {drop}\n}}\n");
        text = crate::source_edit::replace_entries(&text, "layer", &["capacity"], &capacity)?;
    }
    Ok(text)
}
