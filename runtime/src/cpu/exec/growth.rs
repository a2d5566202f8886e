//! Bounded dropless buffers: a pass whose routing needs more rows than the
//! plan's bounded buffers hold stops at the assignment (every rank of the
//! group sees the same exchanged counts, so all stop together, before any
//! row moves) and runs again on the plan grown to the real counts.
//!
//! The grown backend shares the compiled kernels and the laid-out weights
//! (they do not depend on the buffers' sizes) and is kept: later passes start
//! from it, as a GPU runtime keeps the larger allocation.

use super::{CpuBackend, ExecError, Forward};
use crate::footprint::{Budget, Footprint};
use crate::plan::arena::RowNeed;
use crate::plan::Plan;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Why a pass did not finish.
pub(super) enum PassError {
    /// The routing needs more rows than the bounded buffers hold.
    Overflow(RowNeed),
    Failed(ExecError),
}

impl From<ExecError> for PassError {
    fn from(e: ExecError) -> PassError {
        PassError::Failed(e)
    }
}

/// A pass that re-ran with grown buffers, as [`Forward::grown`] reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Growth {
    /// What the plan's bounded buffers held when the pass began (rows of one
    /// rank and chunk).
    pub planned: RowNeed,
    /// What the routing of this pass needed (the most over ranks and chunks).
    pub needed: RowNeed,
    /// Passes this call ran before the one that finished (each stopped at
    /// the assignment).
    pub reruns: u32,
    /// The arena of one rank after growing, bytes.
    pub arena_bytes: u64,
}

/// Most growths one call makes: a group that overflows stops the others
/// before they learn their own counts, so each re-run reveals at least one
/// more group's need; past this many the call gives up.
const MAX_GROWTHS: u32 = 64;

impl CpuBackend {
    /// Runs `pass` on this backend, or on the one a previous overflow grew,
    /// growing (and re-running) as often as the routing needs.
    pub(super) fn with_growth(
        &self,
        pass: impl Fn(&CpuBackend) -> Result<Forward, PassError>,
    ) -> Result<Forward, ExecError> {
        let mut current: Option<Arc<CpuBackend>> = self.grown_backend();
        let mut growth: Option<Growth> = None;
        for reruns in 0..=MAX_GROWTHS {
            let backend: &CpuBackend = current.as_deref().unwrap_or(self);
            match pass(backend) {
                Ok(mut forward) => {
                    forward.grown = growth;
                    return Ok(forward);
                }
                Err(PassError::Failed(e)) => return Err(e),
                Err(PassError::Overflow(need)) => {
                    let planned = growth
                        .as_ref()
                        .map_or_else(|| backend.plan.row_bounds(), |g| g.planned);
                    let needed = growth.as_ref().map_or(need, |g| g.needed.max(need));
                    let grown = Arc::new(backend.grow(need)?);
                    growth = Some(Growth {
                        planned,
                        needed,
                        reruns: reruns + 1,
                        arena_bytes: grown.plan.memory.peak_activation_bytes,
                    });
                    *self.grown.lock().unwrap_or_else(|p| p.into_inner()) = Some(grown.clone());
                    current = Some(grown);
                }
            }
        }
        Err(ExecError::new(format!(
            "the routing overflowed the grown buffers {MAX_GROWTHS} times; giving up"
        )))
    }

    fn grown_backend(&self) -> Option<Arc<CpuBackend>> {
        self.grown.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This backend on its plan grown to hold `need`, sized against the
    /// memory budget before anything is allocated.
    fn grow(&self, need: RowNeed) -> Result<CpuBackend, ExecError> {
        let have = self.plan.row_bounds();
        let plan: Plan = self.plan.grown(need).map_err(|e| {
            ExecError::new(format!(
                "the routing needs {} expert rows (and {} by-rank rows) of one rank in a chunk, \
                 the plan's buffers hold {} ({}), and growing them failed: {e}",
                need.expert_rows, need.rank_rows, have.expert_rows, have.rank_rows
            ))
        })?;
        Footprint::of(&plan)
            .check(Budget::host(self.options.memory_budget))
            .map_err(|e| {
                ExecError::new(format!(
                    "the routing needs {} expert rows of one rank in a chunk, the plan's buffers \
                     hold {}; growing them does not fit: {e} (a capacity limit bounds the rows)",
                    need.expert_rows, have.expert_rows
                ))
            })?;
        let regions = super::memory::regions(&plan.buffers, plan.memory.peak_activation_bytes)
            .map_err(ExecError::new)?;
        let arena_bytes = usize::try_from(plan.memory.peak_activation_bytes)
            .map_err(|_| ExecError::new("the grown arena does not fit this machine"))?;
        Ok(CpuBackend {
            plan,
            geo: self.geo.clone(),
            topo: self.topo,
            regions,
            arena_bytes,
            prepared: self.prepared.clone(),
            world: self.world,
            options: self.options.clone(),
            passes: AtomicU64::new(0),
            spare_arenas: Mutex::new(Vec::new()),
            grown: Mutex::new(None),
        })
    }
}
