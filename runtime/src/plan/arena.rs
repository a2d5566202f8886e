//! The arena layout of a plan's buffers, and the plan grown for a pass whose
//! routing overflowed its bounded buffers.
//!
//! The compiler places buffers with [`allocate`]; the runtime re-places them
//! with the same function when it grows a dropless plan ([`Plan::grown`]), so
//! both follow one rule: two buffers share bytes only when
//! [`HappensBefore::may_share`] allows it, the rule the load checks hold every
//! plan to.

use super::order::HappensBefore;
use super::validate::{buffer_bytes, field, op_buffers, PlanError};
use super::{Buffer, CapacityConfig, GemmWeight, OpKind, Plan, RowBound};

/// Every buffer starts at a multiple of this many bytes (a GPU's widest
/// vector access and cuBLAS's preferred alignment).
pub const ARENA_ALIGN: u64 = 256;

/// Places `buffers` in one arena: greedy first fit in order of first use,
/// largest first on ties; `uses[i]` lists the ids of the ops that use buffer
/// `i` (a buffer the host reads after the pass counts as used by the last
/// op). Returns the arena's size.
pub fn allocate(buffers: &mut [Buffer], uses: &[Vec<u32>], order: &HappensBefore) -> u64 {
    let mut idx: Vec<usize> = (0..buffers.len()).collect();
    idx.sort_by_key(|&i| (buffers[i].live.0, std::cmp::Reverse(buffers[i].bytes), i));
    let mut placed: Vec<usize> = Vec::new();
    let mut peak = 0u64;
    let no_uses: Vec<u32> = Vec::new();
    let uses_of = |i: usize| uses.get(i).unwrap_or(&no_uses);
    for i in idx {
        let disjoint =
            |j: usize| order.may_share((&buffers[i], uses_of(i)), (&buffers[j], uses_of(j)));
        let mut conflicts: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&j| !disjoint(j))
            .map(|&j| {
                (
                    buffers[j].offset,
                    buffers[j].offset.saturating_add(buffers[j].bytes),
                )
            })
            .collect();
        conflicts.sort();
        let mut offset = 0u64;
        let size = buffers[i].bytes;
        for (start, end) in conflicts {
            if offset.saturating_add(size) <= start {
                break;
            }
            offset = offset.max(end.div_ceil(ARENA_ALIGN).saturating_mul(ARENA_ALIGN));
        }
        buffers[i].offset = offset;
        peak = peak.max(offset.saturating_add(size));
        placed.push(i);
    }
    peak
}

/// Rows a pass needs in the bounded buffers of one rank, the most over its
/// chunks (and, as the runtime computes it, over the ranks of the group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RowNeed {
    /// Expert-side rows of one chunk ([`RowBound::ExpertRows`]).
    pub expert_rows: u64,
    /// By-rank rows received in one chunk ([`RowBound::RankRows`]).
    pub rank_rows: u64,
}

impl RowNeed {
    /// More rows than `have` in either bound (a plan without dispatch by
    /// rank needs no by-rank rows, so its 0 bound is never exceeded).
    pub fn exceeds(self, have: RowNeed) -> bool {
        self.expert_rows > have.expert_rows || self.rank_rows > have.rank_rows
    }

    /// The larger of the two needs, field by field.
    pub fn max(self, other: RowNeed) -> RowNeed {
        RowNeed {
            expert_rows: self.expert_rows.max(other.expert_rows),
            rank_rows: self.rank_rows.max(other.rank_rows),
        }
    }
}

impl Plan {
    /// What the plan's bounded buffers hold.
    pub fn row_bounds(&self) -> RowNeed {
        RowNeed {
            expert_rows: self.choices.expert_rows,
            rank_rows: self.choices.rank_rows,
        }
    }

    /// The rows `need` exceeds the bounded buffers by, or `None` when it
    /// fits: the overflow test every backend makes once the counts are
    /// exchanged, before any row moves.
    pub fn overflows(&self, need: RowNeed) -> Option<RowNeed> {
        need.exceeds(self.row_bounds()).then_some(need)
    }

    /// The ops that use each buffer, by op id; a buffer the host reads after
    /// the pass (the output, the overflow flag) counts as used by the last
    /// op too, as the compiler counts it when it places the buffers.
    pub fn buffer_uses(&self) -> Vec<Vec<u32>> {
        let mut uses: Vec<Vec<u32>> = vec![Vec::new(); self.buffers.len()];
        for (_, op) in self.ops() {
            for (_, b) in op_buffers(op) {
                if let Some(u) = uses.get_mut(b as usize) {
                    u.push(op.id);
                }
            }
        }
        let last = self.ops().map(|(_, op)| op.id).max().unwrap_or(0);
        for b in self.read_after_pass() {
            if let Some(u) = uses.get_mut(b as usize) {
                u.push(last);
            }
        }
        uses
    }

    /// This dropless plan with its bounded buffers grown to hold `need`
    /// (never shrunk), the expert GEMMs' row counts with them, and the arena
    /// laid out again. The result is validated like any loaded plan.
    ///
    /// Errors: the plan has a capacity (its buffers are exact and never
    /// grow), a size overflows, or the grown plan fails validation.
    pub fn grown(&self, need: RowNeed) -> Result<Plan, PlanError> {
        if self.layer.capacity != CapacityConfig::Dropless {
            return Err(field(
                "layer.capacity",
                "only a dropless plan's buffers grow; a capacity plan's are exact",
            ));
        }
        let rows = self.row_bounds().max(need);
        let mut plan = self.clone();
        plan.choices.expert_rows = rows.expert_rows;
        if plan.choices.dedup_dispatch {
            plan.choices.rank_rows = rows.rank_rows;
        }
        let old = self.row_bounds();
        for b in &mut plan.buffers {
            let Some(bound) = b.bound else { continue };
            let new_rows = match bound {
                RowBound::ExpertRows => plan.choices.expert_rows,
                RowBound::RankRows => plan.choices.rank_rows,
            };
            if let Some(first) = b.shape.first_mut() {
                *first = new_rows;
            }
            b.bytes = buffer_bytes(b.dtype, &b.shape).ok_or_else(|| {
                field(
                    "choices.expert_rows",
                    format!("`{}` of {new_rows} rows overflows 64 bits", b.name),
                )
            })?;
        }
        // The expert GEMMs run on the real counts; `m` is the most they may
        // see, the rows of their bounded operands.
        for s in &mut plan.streams {
            for op in &mut s.ops {
                if let OpKind::Gemm {
                    weight,
                    a,
                    m,
                    by_rank,
                    ..
                } = &mut op.kind
                {
                    // An up projection that reads through the expansion index
                    // has by-rank rows in `a` and expert rows in `m`.
                    let bound = if by_rank.is_some() && *weight == GemmWeight::ExpertUp {
                        Some(RowBound::ExpertRows)
                    } else {
                        self.buffers.get(*a as usize).and_then(|b| b.bound)
                    };
                    *m = match bound {
                        Some(RowBound::ExpertRows) if *m == old.expert_rows => rows.expert_rows,
                        Some(RowBound::RankRows) if *m == old.rank_rows => rows.rank_rows,
                        _ => *m,
                    };
                }
            }
        }
        let uses = plan.buffer_uses();
        let order = HappensBefore::new(&plan.streams, plan.events);
        let peak = allocate(&mut plan.buffers, &uses, &order);
        plan.memory.peak_activation_bytes = peak;
        plan.memory.total_buffer_bytes = plan
            .buffers
            .iter()
            .fold(0u64, |sum, b| sum.saturating_add(b.bytes));
        plan.validate()?;
        Ok(plan)
    }
}
