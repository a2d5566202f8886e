//! Happens-before between the ops of a plan: the order every legal execution
//! of the streams respects. The compiler places buffers in the arena by it
//! (two buffers share bytes only when their uses are ordered) and the load
//! checks hold a plan to it (every read after the write it needs, no two
//! unordered ops on the same bytes); both use this one relation.
//!
//! Op `a` happens before op `b` when a chain of stream order (an op before a
//! later op of its stream) and events (a record before every wait for it)
//! leads from `a` to `b`. A stream is an in-order queue, so everything a wait
//! waits for also happens before the ops after the wait on its stream.
//!
//! The relation is kept as vector clocks: per op and per stream, how many of
//! that stream's first ops happen before the op. That is `ops x streams`
//! counters (a plan has a handful of streams), and each question is one
//! comparison. Building it walks the ops in id order, which the load checks
//! require to be a valid sequential order (ids increase along each stream and
//! from each record to its waits); on a plan that breaks this the relation
//! is incomplete, never a panic.

use super::{Buffer, BufferRole, OpKind, Stream};
use std::collections::BTreeMap;

/// Happens-before between the ops of a set of streams, by op id.
#[derive(Clone, Debug)]
pub struct HappensBefore {
    /// The op ids in increasing order; an op's index here is its row in
    /// `clocks` and `place`.
    ids: Vec<u32>,
    /// Per op: its stream and its position in the stream.
    place: Vec<(usize, u32)>,
    streams: usize,
    /// Per op, per stream `s`: how many of `s`'s first ops happen before it.
    clocks: Vec<u32>,
}

impl HappensBefore {
    /// The relation of `streams`, whose events are numbered below `events`
    /// (a wait for an event nobody records orders nothing).
    pub fn new(streams: &[Stream], events: u32) -> HappensBefore {
        let mut ops: Vec<(u32, usize, u32, &OpKind)> = Vec::new();
        let mut record_of: BTreeMap<u32, u32> = BTreeMap::new();
        for (s, stream) in streams.iter().enumerate() {
            for (p, op) in stream.ops.iter().enumerate() {
                let position = u32::try_from(p).unwrap_or(u32::MAX);
                ops.push((op.id, s, position, &op.kind));
                if let OpKind::Record { event } = op.kind {
                    if event < events {
                        record_of.entry(event).or_insert(op.id);
                    }
                }
            }
        }
        ops.sort_by_key(|&(id, s, p, _)| (id, s, p));
        let n = streams.len();
        let mut order = HappensBefore {
            ids: ops.iter().map(|o| o.0).collect(),
            place: ops.iter().map(|o| (o.1, o.2)).collect(),
            streams: n,
            clocks: vec![0; ops.len().saturating_mul(n)],
        };
        // The op processed last on each stream: in a valid plan the one just
        // before the current op on its stream.
        let mut last_of: Vec<Option<usize>> = vec![None; n];
        for (i, &(_, s, p, kind)) in ops.iter().enumerate() {
            let mut clock = match last_of[s] {
                Some(prev) => order.clock(prev).to_vec(),
                None => vec![0; n],
            };
            clock[s] = clock[s].max(p);
            if let OpKind::Wait { event } = *kind {
                let record = record_of.get(&event).and_then(|&id| order.index(id));
                if let Some(r) = record.filter(|&r| r < i) {
                    for (c, &rc) in clock.iter_mut().zip(order.clock(r)) {
                        *c = (*c).max(rc);
                    }
                    let (rs, rp) = order.place[r];
                    clock[rs] = clock[rs].max(rp.saturating_add(1));
                }
            }
            order.clocks[i * n..(i + 1) * n].copy_from_slice(&clock);
            last_of[s] = Some(i);
        }
        order
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    fn clock(&self, index: usize) -> &[u32] {
        &self.clocks[index * self.streams..(index + 1) * self.streams]
    }

    /// True when op `a` finishes before op `b` starts on every legal
    /// execution (false for an op and itself, and for unknown ids).
    pub fn before(&self, a: u32, b: u32) -> bool {
        let (Some(ia), Some(ib)) = (self.index(a), self.index(b)) else {
            return false;
        };
        let (sa, pa) = self.place[ia];
        self.clock(ib)[sa] > pa
    }

    /// True when every op of `first` happens before every op of `then`
    /// (vacuously when either is empty).
    pub fn all_before(&self, first: &[u32], then: &[u32]) -> bool {
        if first.is_empty() || then.is_empty() {
            return true;
        }
        // The last op of `first` on each stream: the others precede it there.
        let mut last: Vec<Option<u32>> = vec![None; self.streams];
        for &a in first {
            let Some(ia) = self.index(a) else {
                return false;
            };
            let (s, p) = self.place[ia];
            last[s] = Some(last[s].map_or(p, |q| q.max(p)));
        }
        then.iter().all(|&b| {
            self.index(b).is_some_and(|ib| {
                let clock = self.clock(ib);
                last.iter()
                    .zip(clock)
                    .all(|(l, &c)| l.is_none_or(|p| c > p))
            })
        })
    }

    /// Whether two buffers, used by the ops `a_uses` and `b_uses`, may share
    /// arena bytes: neither is the layer's input or output (the caller writes
    /// and reads those around the pass), and every use of one happens before
    /// every use of the other.
    pub fn may_share(&self, a: (&Buffer, &[u32]), b: (&Buffer, &[u32])) -> bool {
        !pinned(a.0) && !pinned(b.0) && (self.all_before(a.1, b.1) || self.all_before(b.1, a.1))
    }
}

/// The input and the output keep their bytes for the whole pass.
fn pinned(b: &Buffer) -> bool {
    matches!(b.role, BufferRole::Input | BufferRole::Output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Op, Phase, StreamRole};

    fn op(id: u32, kind: OpKind) -> Op {
        Op {
            id,
            name: format!("op{id}"),
            phase: Phase::Router,
            chunk: None,
            kind,
            estimate_us: 0.0,
        }
    }

    fn launch(id: u32) -> Op {
        op(
            id,
            OpKind::Launch {
                kernel: 0,
                inputs: Vec::new(),
                outputs: Vec::new(),
                rows: 1,
            },
        )
    }

    fn stream(ops: Vec<Op>) -> Stream {
        Stream {
            name: "s".into(),
            role: StreamRole::Compute,
            ops,
        }
    }

    /// s0: 0, record e0 (1), 2; s1: 3, wait e0 (4), 5.
    fn two_streams() -> Vec<Stream> {
        vec![
            stream(vec![
                launch(0),
                op(1, OpKind::Record { event: 0 }),
                launch(2),
            ]),
            stream(vec![launch(3), op(4, OpKind::Wait { event: 0 }), launch(5)]),
        ]
    }

    #[test]
    fn stream_order_and_events_order_ops() {
        let hb = HappensBefore::new(&two_streams(), 1);
        assert!(hb.before(0, 2));
        assert!(hb.before(0, 5) && hb.before(1, 4) && hb.before(3, 5));
        assert!(!hb.before(2, 5), "after the record, not ordered");
        assert!(!hb.before(3, 0) && !hb.before(0, 3));
        assert!(!hb.before(5, 5), "an op does not precede itself");
        assert!(!hb.before(0, 99) && !hb.before(99, 0), "unknown ids");
    }

    #[test]
    fn a_wait_for_an_unrecorded_event_orders_nothing() {
        let hb = HappensBefore::new(&two_streams(), 0);
        assert!(!hb.before(0, 5));
        assert!(hb.before(3, 5));
    }

    #[test]
    fn all_before_needs_every_pair() {
        let hb = HappensBefore::new(&two_streams(), 1);
        assert!(hb.all_before(&[0, 3], &[5]));
        assert!(!hb.all_before(&[0, 2], &[5]));
        assert!(!hb.all_before(&[0], &[2, 3]));
        assert!(hb.all_before(&[], &[2]));
    }

    #[test]
    fn huge_ids_cost_nothing() {
        let streams = vec![stream(vec![launch(7), launch(u32::MAX)])];
        let hb = HappensBefore::new(&streams, u32::MAX);
        assert!(hb.before(7, u32::MAX));
    }
}
