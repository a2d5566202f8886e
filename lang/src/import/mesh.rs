//! The mesh of an imported layer: the options checked, and the
//! expert-parallel degree.

use super::render::clean_comment;
use super::{ImportOptions, MAX_INT};

/// The mesh options, validated; `ep` is settled once the expert count is known.
pub(super) struct MeshPlan {
    pub(super) nodes: u64,
    pub(super) gpus_per_node: u64,
    pub(super) world: u64,
    pub(super) device: &'static str,
    pub(super) dtype: &'static str,
    pub(super) tokens_per_rank: u64,
}

pub(super) fn mesh_plan(o: &ImportOptions) -> Result<MeshPlan, String> {
    if o.nodes == 0 || o.nodes > MAX_INT {
        return Err(format!(
            "the mesh needs at least one node and at most {MAX_INT}, not {}.",
            o.nodes
        ));
    }
    if o.gpus_per_node == 0 || o.gpus_per_node > MAX_INT {
        return Err(format!(
            "a node needs at least one GPU and at most {MAX_INT}, not {}.",
            o.gpus_per_node
        ));
    }
    let world = o
        .nodes
        .checked_mul(o.gpus_per_node)
        .filter(|w| *w <= MAX_INT)
        .ok_or_else(|| {
            format!(
                "a mesh of {} nodes of {} GPUs is too large to describe.",
                o.nodes, o.gpus_per_node
            )
        })?;
    let device = crate::check::device_names()
        .find(|d| d.eq_ignore_ascii_case(o.device.trim()))
        .ok_or_else(|| {
            format!(
                "unknown device `{}`: the device presets are {}.",
                clean_comment(&o.device),
                crate::check::device_names().collect::<Vec<_>>().join(", ")
            )
        })?;
    let dtype = match o.dtype.trim().to_ascii_lowercase().as_str() {
        "f32" => "f32",
        "bf16" => "bf16",
        "f16" => "f16",
        _ => {
            return Err(format!(
                "unknown dtype `{}`: the compute dtype must be f32, bf16 or f16.",
                clean_comment(&o.dtype)
            ))
        }
    };
    if o.tokens_per_rank == 0 || o.tokens_per_rank > MAX_INT {
        return Err(format!(
            "tokens per rank must be at least 1 and at most {MAX_INT}, not {}.",
            o.tokens_per_rank
        ));
    }
    Ok(MeshPlan {
        nodes: o.nodes,
        gpus_per_node: o.gpus_per_node,
        world,
        device,
        dtype,
        tokens_per_rank: o.tokens_per_rank,
    })
}

pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The expert-parallel degree: the user's, checked, or the largest that divides both.
pub(super) fn choose_ep(requested: Option<u64>, world: u64, experts: u64) -> Result<u64, String> {
    let common = gcd(world, experts);
    let choices = || {
        let divisors: Vec<String> = (1..=common.min(4096))
            .filter(|d| common % d == 0)
            .map(|d| d.to_string())
            .collect();
        format!(
            "ep must divide both the GPUs and the experts: choose one of {}",
            divisors.join(", ")
        )
    };
    let Some(ep) = requested else {
        return Ok(common);
    };
    if ep == 0 {
        return Err("ep must be at least 1.".to_string());
    }
    if world % ep != 0 {
        return Err(format!(
            "ep {ep} does not divide the {world} GPUs of the mesh, so the GPUs cannot form whole expert-parallel groups; {}.",
            choices()
        ));
    }
    if experts % ep != 0 {
        return Err(format!(
            "ep {ep} does not divide the {experts} experts, so the expert-parallel ranks cannot hold equal shares; {}.",
            choices()
        ));
    }
    Ok(ep)
}
