//! Sizing before allocating: what a layer holds in this process when the CPU
//! backend runs it, computed from the plan alone, so that a layer too large
//! for the machine is refused with the figures instead of growing until the
//! operating system kills the process.
//!
//! The figures ([`Footprint::of`]) are the ones the CPU backend allocates:
//! - every rank's arena (`memory.peak_activation_bytes` per rank);
//! - the weights in f32 twice: drawn or loaded, then laid out for the GEMMs
//!   ([`host_weight_bytes`]);
//! - one input and one output tensor per rank (f32).
//!
//! The budget ([`Budget::host`]) is the one the caller gives, else what the
//! kernel says is available (`MemAvailable` in `/proc/meminfo`); where
//! neither exists nothing is refused. All arithmetic saturates: a layer too
//! large to count is too large to run.

use crate::plan::{human_bytes, Activation, LayerConfig, Plan};
use std::fmt;

/// Bytes of a layer's weights as the host holds them (f32): the router (and
/// its biases), every expert's projections and biases, the shared experts
/// and their gate.
pub fn host_weight_bytes(layer: &LayerConfig) -> u64 {
    let ffn = |width: u64, gated: bool| {
        let projections = if gated { 3 } else { 2 };
        width
            .saturating_mul(layer.hidden)
            .saturating_mul(projections)
            .saturating_add(width.saturating_mul(2).saturating_add(layer.hidden))
    };
    let gated = |a: Activation| a.gated();
    let experts = layer
        .experts
        .saturating_mul(ffn(layer.intermediate, gated(layer.ffn)));
    let shared = layer.shared.as_ref().map_or(0, |s| {
        ffn(s.count.saturating_mul(s.intermediate), gated(s.ffn)).saturating_add(layer.hidden)
    });
    let router = layer.experts.saturating_mul(layer.hidden.saturating_add(2));
    experts
        .saturating_add(shared)
        .saturating_add(router)
        .saturating_mul(4)
}

/// What running a plan holds in this process, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub ranks: u64,
    /// Every rank's arena.
    pub activations: u64,
    /// The weights in f32, twice (drawn or loaded, then laid out).
    pub weights: u64,
    /// One input and one output `[tokens, hidden]` f32 tensor per rank.
    pub io: u64,
}

impl Footprint {
    /// The footprint of running `plan` on the CPU backend, every rank in this
    /// process.
    pub fn of(plan: &Plan) -> Footprint {
        let ranks = plan.mesh.world_size();
        let layer = &plan.layer;
        let tensor = layer
            .tokens_per_rank
            .saturating_mul(layer.hidden)
            .saturating_mul(4);
        Footprint {
            ranks,
            activations: plan.memory.peak_activation_bytes.saturating_mul(ranks),
            weights: host_weight_bytes(layer).saturating_mul(2),
            io: tensor.saturating_mul(2).saturating_mul(ranks),
        }
    }

    pub fn total(&self) -> u64 {
        self.activations
            .saturating_add(self.weights)
            .saturating_add(self.io)
    }

    /// `Ok` when the footprint fits `budget` (always without one).
    pub fn check(&self, budget: Option<Budget>) -> Result<(), MemoryError> {
        match budget {
            Some(budget) if self.total() > budget.bytes => Err(MemoryError {
                footprint: *self,
                budget,
            }),
            _ => Ok(()),
        }
    }
}

/// Where a budget comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetSource {
    /// The caller's (`CpuOptions::memory_budget`, a command's limit).
    Given,
    /// What the machine has available (`MemAvailable`).
    Available,
}

/// Most bytes a layer may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub bytes: u64,
    pub source: BudgetSource,
}

impl Budget {
    /// `given` when there is one, else the memory this machine has available,
    /// else none.
    pub fn host(given: Option<u64>) -> Option<Budget> {
        match given {
            Some(bytes) => Some(Budget {
                bytes,
                source: BudgetSource::Given,
            }),
            None => mem_available().map(|bytes| Budget {
                bytes,
                source: BudgetSource::Available,
            }),
        }
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes, where the file exists.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(value.saturating_mul(1024)),
        None => Some(value),
        Some(_) => None,
    }
}

/// A layer that does not fit its budget: the figures and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryError {
    pub footprint: Footprint,
    pub budget: Budget,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.footprint;
        let budget = match self.budget.source {
            BudgetSource::Given => {
                format!("the memory budget of {}", human_bytes(self.budget.bytes))
            }
            BudgetSource::Available => format!(
                "the {} this machine has available",
                human_bytes(self.budget.bytes)
            ),
        };
        write!(
            f,
            "the layer needs {} in this process ({} rank{}: {} of activations, {} of weights in f32 \
             drawn and laid out, {} of inputs and outputs), more than {budget}; shrink the layer \
             (hidden, intermediate, tokens_per_rank) or build it for fewer ranks",
            human_bytes(p.total()),
            p.ranks,
            if p.ranks == 1 { "" } else { "s" },
            human_bytes(p.activations),
            human_bytes(p.weights),
            human_bytes(p.io),
        )
    }
}

impl std::error::Error for MemoryError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_kilobytes() {
        let meminfo = "MemTotal:       16314912 kB\nMemFree:  1 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(12_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(parse_mem_available("MemAvailable: lots\n"), None);
    }

    #[test]
    fn an_explicit_budget_wins() {
        let b = Budget::host(Some(7));
        assert_eq!(
            b,
            Some(Budget {
                bytes: 7,
                source: BudgetSource::Given
            })
        );
    }
}
