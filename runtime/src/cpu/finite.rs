//! Non-finite outputs: a layer's output must be finite, and when it is not
//! the error says where the values first appeared.
//!
//! Checking every op's output in every pass would cost a read of everything
//! written; the output alone is checked instead, and only when it holds a
//! non-finite value is the pass run again with every op's written buffers
//! checked after the op ([`Trace`]). Passes are deterministic, so the second
//! pass computes the same values; the first op (in the plan's sequential
//! order) that wrote one names the phase: the router (huge logits), the
//! experts (an FFN that overflows the dtype), the shared experts, the combine.

use super::exec::ExecError;
use crate::plan::{DType, Op, Phase};
use std::sync::Mutex;

/// What a pass does when its output is not finite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinite {
    /// The pass fails with an error naming the phase (the default).
    #[default]
    Error,
    /// The pass returns its output and the same message as a warning
    /// (`Forward::warnings`).
    Warn,
}

/// The non-finite values of a pass's output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BadOutput {
    pub count: usize,
    /// Rank, element and value of the first.
    pub rank: usize,
    pub index: usize,
    pub value: f32,
}

/// The non-finite values of `outputs` (one tensor per rank), if any.
pub fn scan_outputs(outputs: &[Vec<f32>]) -> Option<BadOutput> {
    let mut found: Option<BadOutput> = None;
    for (rank, values) in outputs.iter().enumerate() {
        for (index, &value) in values.iter().enumerate() {
            if !value.is_finite() {
                match &mut found {
                    Some(b) => b.count += 1,
                    None => {
                        found = Some(BadOutput {
                            count: 1,
                            rank,
                            index,
                            value,
                        })
                    }
                }
            }
        }
    }
    found
}

/// Where non-finite values first appeared: an op that wrote one.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub op_id: u32,
    pub op_name: String,
    pub phase: Phase,
    pub buffer: String,
    pub rank: usize,
    /// Non-finite values the op wrote into the buffer, and the first.
    pub count: usize,
    pub value: f32,
}

/// The ops of a pass that wrote non-finite values; keeps the first in the
/// plan's sequential order (op id), then by rank.
#[derive(Debug, Default)]
pub struct Trace {
    first: Mutex<Option<Origin>>,
}

impl Trace {
    /// Checks `values`, which `op` on `rank` just wrote into `buffer`.
    pub fn check(&self, op: &Op, rank: usize, buffer: &str, values: &[f32]) {
        let mut bad = values.iter().filter(|v| !v.is_finite());
        let Some(&value) = bad.next() else {
            return;
        };
        let count = 1 + bad.count();
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first
            .as_ref()
            .is_some_and(|f| (f.op_id, f.rank) <= (op.id, rank))
        {
            return;
        }
        *first = Some(Origin {
            op_id: op.id,
            op_name: op.name.clone(),
            phase: op.phase,
            buffer: buffer.to_string(),
            rank,
            count,
            value,
        });
    }

    /// The first op that wrote a non-finite value, if any did.
    pub fn first(&self) -> Option<Origin> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What causes non-finite values in each phase, for the message.
fn likely_cause(phase: Phase) -> &'static str {
    match phase {
        Phase::Router => "the router's logits or scores overflowed (huge inputs or gate weights)",
        Phase::Experts => "an expert FFN overflowed (its weights or inputs are too large)",
        Phase::Shared => {
            "the shared experts' FFN overflowed (their weights or the inputs are too large)"
        }
        _ => "a sum of expert outputs overflowed",
    }
}

/// The message for `bad` output values of a layer in `dtype`, with where
/// they first appeared when a traced pass found it.
pub fn message(bad: &BadOutput, dtype: DType, origin: Option<&Origin>) -> String {
    let mut text = format!(
        "the layer's output has {} non-finite value(s), the first {} at rank {}, element {}",
        bad.count, bad.value, bad.rank, bad.index
    );
    match origin {
        Some(o) => text.push_str(&format!(
            "; they first appear in the {} phase: op #{} `{}` wrote {} non-finite value(s) ({} first) \
             into `{}` on rank {}: {} in {}; try f32 or smaller weights",
            o.phase.name(),
            o.op_id,
            o.op_name,
            o.count,
            o.value,
            o.buffer,
            o.rank,
            likely_cause(o.phase),
            dtype.name()
        )),
        None => text.push_str(&format!(
            ": a value overflowed {} somewhere in the pass (the weights or the inputs are too \
             large for it); try f32 or smaller weights",
            dtype.name()
        )),
    }
    text
}

/// A layer's outputs must be finite: an overflow inside the pass (weights or
/// inputs too large for the dtype) would otherwise come back as `inf` or
/// `NaN` without a word. For a backend that cannot trace where the values
/// appeared (the CUDA backend).
pub fn check_finite(outputs: &[Vec<f32>], dtype: DType) -> Result<(), ExecError> {
    match scan_outputs(outputs) {
        None => Ok(()),
        Some(bad) => Err(ExecError {
            rank: None,
            op: None,
            message: message(&bad, dtype, None),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::OpKind;

    fn op(id: u32, phase: Phase) -> Op {
        Op {
            id,
            name: format!("op{id}"),
            phase,
            chunk: None,
            kind: OpKind::Record { event: 0 },
            estimate_us: 0.0,
        }
    }

    #[test]
    fn the_first_op_in_plan_order_is_kept() {
        let t = Trace::default();
        t.check(
            &op(9, Phase::Shared),
            0,
            "shared_out",
            &[1.0, f32::INFINITY],
        );
        t.check(
            &op(4, Phase::Experts),
            2,
            "expert_act",
            &[f32::NAN, f32::NAN],
        );
        t.check(
            &op(4, Phase::Experts),
            1,
            "expert_act",
            &[0.0, f32::INFINITY],
        );
        t.check(&op(2, Phase::Router), 0, "logits", &[1.0, 2.0]);
        let first = t.first().unwrap_or_else(|| panic!("nothing recorded"));
        assert_eq!((first.op_id, first.rank, first.count), (4, 1, 1));
        let bad = scan_outputs(&[vec![1.0], vec![f32::INFINITY, f32::NAN]]);
        let bad = bad.unwrap_or_else(|| panic!("nothing found"));
        assert_eq!((bad.count, bad.rank, bad.index), (2, 1, 0));
        let text = message(&bad, DType::Bf16, Some(&first));
        assert!(
            text.contains("first appear in the experts phase: op #4 `op4`"),
            "{text}"
        );
        assert!(scan_outputs(&[vec![1.0, -2.0]]).is_none());
    }
}
