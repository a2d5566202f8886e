//! Races: every read of data happens after the write it needs, and no two
//! ops that touch the same bytes, one of them writing, can run at the same
//! time. "Happens after" is [`HappensBefore`], the relation the compiler
//! schedules and places buffers by, so a deleted or redirected wait, or a
//! launch pointed at another buffer, is a load error rather than a race.
//!
//! What an op touches:
//! - a launch of a described kernel: each bound buffer as its kernel
//!   parameter's access says (read, write, or both); a buffer the op lists
//!   but the binding does not use counts as read (an input) or written (an
//!   output); launches over the rows sent or received read the routing table;
//! - an assignment launch: its inputs read, its outputs written; the second
//!   pass writes the routing table (which the executors keep beside the
//!   buffers, so it is checked as data of its own);
//! - a GEMM: `a` read, `c` written; the expert GEMMs read the routing table;
//! - a collective: `send` read, `recv` written, both whole; the all-to-alls
//!   read the routing table.
//!
//! An op of a token chunk touches only that chunk's rows of a whole-layer
//! buffer of token rows ([`Buffer::chunk_rows`]), so each chunk's rows are
//! checked on their own. The caller writes the input before the pass and
//! reads the output (and the dropless overflow flag) after it.
//!
//! The check walks each part of each buffer in op-id order (a valid
//! sequential order): a read needs the last write before it ordered before
//! it; a write needs the last write and every read since ordered before it.
//! Since happens-before implies id order, that orders every conflicting
//! pair. Every write is read before it is overwritten or the pass ends
//! (unless the host reads it after the pass), and no op writes the layer's
//! input: a launch pointed at the wrong buffer leaves such a lost write even
//! where its new target is never read again. Buffers that share arena bytes
//! must have ordered lifetimes ([`HappensBefore::may_share`]).

use super::binding::{binding, library_kind, Arg, LaunchRows};
use super::order::HappensBefore;
use super::validate::{LostWrite, PlanError, Race};
use super::{Buffer, BufferRole, CollectiveKind, GemmWeight, KernelKind, Op, OpKind, Plan};
use moec_kernels::ir::{Access, ParamKind};
use moec_kernels::library::describe;
use std::collections::{BTreeMap, BTreeSet};

/// The routing table the assignment's second pass computes, as the index of
/// a buffer of its own.
const ROUTING: u32 = u32::MAX;

/// The rows of a buffer an access touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    Whole,
    Chunk(u64),
}

#[derive(Clone, Copy, Debug)]
struct Touch {
    op: u32,
    stream: usize,
    read: bool,
    write: bool,
    part: Part,
}

/// Who last wrote a part: the caller (before the pass) or an op.
#[derive(Clone, Copy)]
enum Writer {
    Caller,
    Op(u32, usize),
}

impl Plan {
    /// The buffers (and the routing table) `op` reads and writes.
    fn touches(&self, op: &Op) -> Vec<(u32, bool, bool, Part)> {
        let tokens = self.layer.tokens_per_rank;
        let part = |b: u32| {
            self.buffers
                .get(b as usize)
                .and_then(|buf| buf.chunk_rows(op.chunk, tokens))
                .map_or(Part::Whole, Part::Chunk)
        };
        let mut out = Vec::new();
        match &op.kind {
            OpKind::Launch {
                kernel,
                inputs,
                outputs,
                ..
            } => {
                let Some(k) = self.kernels.get(*kernel as usize) else {
                    return out;
                };
                if k.kind == KernelKind::Assign {
                    let pass = k.constants.iter().find(|(n, _)| n == "pass").map(|p| p.1);
                    if matches!(pass, Some(2 | 3)) {
                        // The by-rank passes work on one chunk's rows and
                        // read the routing table the second pass wrote.
                        out.extend(inputs.iter().map(|&b| (b, true, false, part(b))));
                        out.extend(outputs.iter().map(|&b| (b, false, true, part(b))));
                        out.push((ROUTING, true, false, Part::Whole));
                        return out;
                    }
                    out.extend(inputs.iter().map(|&b| (b, true, false, Part::Whole)));
                    out.extend(outputs.iter().map(|&b| (b, false, true, Part::Whole)));
                    if pass != Some(0) {
                        out.push((ROUTING, false, true, Part::Whole));
                    }
                    return out;
                }
                let mut bound: BTreeSet<(bool, usize)> = BTreeSet::new();
                if let (Some(b), Some(lib)) = (binding(k.kind, op.phase), library_kind(k.kind)) {
                    if let Ok(desc) = describe(lib, &k.constants) {
                        let mut params = desc.params.iter();
                        for arg in b.args {
                            let param = params.next();
                            let (list, i, is_output) = match *arg {
                                Arg::Input(i) => (inputs, i, false),
                                Arg::Output(i) => (outputs, i, true),
                                _ => continue,
                            };
                            let Some(&buf) = list.get(i) else { continue };
                            let access = match param.map(|p| &p.kind) {
                                Some(ParamKind::Buffer { access, elem }) => {
                                    if *elem == moec_kernels::ir::Elem::Fp8E4m3 {
                                        params.next(); // its scales
                                    }
                                    *access
                                }
                                _ if is_output => Access::Write,
                                _ => Access::Read,
                            };
                            let read = matches!(access, Access::Read | Access::ReadWrite);
                            let write = matches!(access, Access::Write | Access::ReadWrite);
                            out.push((buf, read, write, part(buf)));
                            bound.insert((is_output, i));
                        }
                        if matches!(
                            b.rows,
                            LaunchRows::Sent
                                | LaunchRows::Received
                                | LaunchRows::ReceivedByRank
                                | LaunchRows::WireSent
                                | LaunchRows::WireReceived
                        ) {
                            out.push((ROUTING, true, false, Part::Whole));
                        }
                    }
                }
                for (i, &b) in inputs.iter().enumerate() {
                    if !bound.contains(&(false, i)) {
                        out.push((b, true, false, part(b)));
                    }
                }
                for (i, &b) in outputs.iter().enumerate() {
                    if !bound.contains(&(true, i)) {
                        out.push((b, false, true, part(b)));
                    }
                }
            }
            OpKind::Gemm {
                weight,
                a,
                c,
                by_rank,
                ..
            } => {
                out.push((*a, true, false, part(*a)));
                out.push((*c, false, true, part(*c)));
                if let Some(r) = by_rank {
                    out.push((r.index, true, false, part(r.index)));
                    out.push((r.weights, true, false, part(r.weights)));
                }
                if matches!(weight, GemmWeight::ExpertUp | GemmWeight::ExpertDown) {
                    out.push((ROUTING, true, false, Part::Whole));
                }
            }
            OpKind::Collective {
                kind, send, recv, ..
            } => {
                out.push((*send, true, false, Part::Whole));
                out.push((*recv, false, true, Part::Whole));
                if matches!(
                    kind,
                    CollectiveKind::AllToAll
                        | CollectiveKind::AllToAllV
                        | CollectiveKind::AllToAllRank
                ) {
                    out.push((ROUTING, true, false, Part::Whole));
                }
            }
            OpKind::Record { .. } | OpKind::Wait { .. } => {}
        }
        out
    }

    /// The buffers `op` writes (not the executors' own data, such as the
    /// routing table), each once.
    pub fn written_buffers(&self, op: &Op) -> Vec<u32> {
        let mut out: Vec<u32> = self
            .touches(op)
            .into_iter()
            .filter(|t| t.2 && t.0 != ROUTING)
            .map(|t| t.0)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The buffers the host reads after the pass: the output and the
    /// dropless overflow flag (the second assignment pass's second output).
    pub(super) fn read_after_pass(&self) -> BTreeSet<u32> {
        let mut after: BTreeSet<u32> = (0..self.buffers.len() as u32)
            .filter(|&i| self.buffers[i as usize].role == BufferRole::Output)
            .collect();
        for (_, op) in self.ops() {
            if let OpKind::Launch {
                kernel, outputs, ..
            } = &op.kind
            {
                let is_place = self.kernels.get(*kernel as usize).is_some_and(|k| {
                    k.kind == KernelKind::Assign
                        && k.constants.iter().any(|c| c == &("pass".to_string(), 1))
                });
                if let (true, Some(&flag)) = (is_place, outputs.get(1)) {
                    after.insert(flag);
                }
            }
        }
        after
    }

    fn data_name(&self, buffer: u32) -> Box<str> {
        match self.buffers.get(buffer as usize) {
            _ if buffer == ROUTING => "the routing table (assignment pass 1)".into(),
            Some(b) => format!("buffer b{buffer} `{}`", b.name).into(),
            None => format!("buffer b{buffer}").into(),
        }
    }

    /// Every access ordered after the write it reads and against every other
    /// access to the same part of the same data (see the module docs).
    pub(super) fn check_races(&self, order: &HappensBefore) -> Result<(), PlanError> {
        let mut by_data: BTreeMap<u32, Vec<Touch>> = BTreeMap::new();
        for (stream, op) in self.ops() {
            // One access per (data, part) of an op, reads and writes merged.
            let mut merged: BTreeMap<(u32, Part), (bool, bool)> = BTreeMap::new();
            for (b, read, write, part) in self.touches(op) {
                let e = merged.entry((b, part)).or_default();
                e.0 |= read;
                e.1 |= write;
            }
            for ((b, part), (read, write)) in merged {
                by_data.entry(b).or_default().push(Touch {
                    op: op.id,
                    stream,
                    read,
                    write,
                    part,
                });
            }
        }
        let after = self.read_after_pass();
        for &b in &after {
            by_data.entry(b).or_default();
        }
        for (&b, touches) in &mut by_data {
            touches.sort_by_key(|t| t.op);
            let chunks: BTreeSet<u64> = touches
                .iter()
                .filter_map(|t| match t.part {
                    Part::Chunk(c) => Some(c),
                    Part::Whole => None,
                })
                .collect();
            // Each chunk's rows seen on their own, then the rows no op of a
            // chunk touches (when chunks leave some out).
            let mut parts: Vec<Option<u64>> = chunks.iter().map(|&c| Some(c)).collect();
            if (chunks.len() as u64) < self.choices.chunks || chunks.is_empty() {
                parts.push(None);
            }
            let input = self
                .buffers
                .get(b as usize)
                .is_some_and(|buf| buf.role == BufferRole::Input);
            for part in parts {
                let seq = touches.iter().filter(|t| match (t.part, part) {
                    (Part::Whole, _) => true,
                    (Part::Chunk(c), Some(p)) => c == p,
                    (Part::Chunk(_), None) => false,
                });
                let last = self.check_part(order, (b, part), seq, input, after.contains(&b))?;
                if after.contains(&b) && last.is_none() {
                    return Err(PlanError::NeverWritten {
                        data: self.data_name(b),
                        chunk: part,
                    });
                }
            }
        }
        Ok(())
    }

    /// One part of one buffer's accesses in id order (`input`: the caller
    /// writes it before the pass; `host_reads`: the caller reads it after);
    /// the last writer.
    fn check_part<'t>(
        &self,
        order: &HappensBefore,
        (data, chunk): (u32, Option<u64>),
        seq: impl Iterator<Item = &'t Touch>,
        input: bool,
        host_reads: bool,
    ) -> Result<Option<Writer>, PlanError> {
        let mut last = input.then_some(Writer::Caller);
        let mut readers: Vec<(u32, usize)> = Vec::new();
        // The last write no op has read yet.
        let mut unread: Option<&Touch> = None;
        let race = |first: (u32, usize), first_writes: bool, second: &Touch| {
            PlanError::Race(Box::new(Race {
                first: self.op_ref_by_id(first.0, first.1),
                first_writes,
                second: self.op_ref_by_id(second.op, second.stream),
                second_writes: second.write,
                data: self.data_name(data),
                chunk,
            }))
        };
        for t in seq {
            if t.write && input {
                return Err(PlanError::Op {
                    op: self.op_ref_by_id(t.op, t.stream),
                    problem: format!(
                        "writes {}, the layer's input, which the caller owns",
                        self.data_name(data)
                    ),
                });
            }
            if t.read {
                unread = None;
            } else if let Some(w) = unread.filter(|w| w.op != t.op) {
                return Err(self.lost_write(w, Some(t), data, chunk));
            }
            if t.read {
                match last {
                    None => {
                        return Err(PlanError::ReadBeforeWrite {
                            op: self.op_ref_by_id(t.op, t.stream),
                            data: self.data_name(data),
                            chunk,
                        })
                    }
                    Some(Writer::Op(w, s)) if w != t.op && !order.before(w, t.op) => {
                        return Err(race((w, s), true, t));
                    }
                    _ => {}
                }
            }
            if t.write {
                if let Some(Writer::Op(w, s)) = last {
                    if w != t.op && !order.before(w, t.op) {
                        return Err(race((w, s), true, t));
                    }
                }
                if let Some(&r) = readers
                    .iter()
                    .find(|r| r.0 != t.op && !order.before(r.0, t.op))
                {
                    return Err(race(r, false, t));
                }
                last = Some(Writer::Op(t.op, t.stream));
                readers.clear();
                unread = Some(t);
            } else if t.read {
                readers.push((t.op, t.stream));
            }
        }
        if let Some(w) = unread.filter(|_| !host_reads) {
            return Err(self.lost_write(w, None, data, chunk));
        }
        Ok(last)
    }

    fn lost_write(
        &self,
        write: &Touch,
        overwrite: Option<&Touch>,
        data: u32,
        chunk: Option<u64>,
    ) -> PlanError {
        PlanError::LostWrite(Box::new(LostWrite {
            op: self.op_ref_by_id(write.op, write.stream),
            data: self.data_name(data),
            chunk,
            overwritten_by: overwrite.map(|t| self.op_ref_by_id(t.op, t.stream)),
        }))
    }

    /// Buffers that share arena bytes are never in use at the same time:
    /// every use of one happens before every use of the other, and neither
    /// is the input or the output (the rule the compiler places them by).
    pub(super) fn check_arena_sharing(&self, order: &HappensBefore) -> Result<(), PlanError> {
        let uses = self.buffer_uses();
        // Sweep by offset, keeping the buffers whose bytes reach past the
        // current offset (ends were checked against the arena before).
        let mut by_offset: Vec<usize> = (0..self.buffers.len())
            .filter(|&i| self.buffers[i].bytes > 0)
            .collect();
        by_offset.sort_by_key(|&i| (self.buffers[i].offset, i));
        let mut active: Vec<usize> = Vec::new();
        for &i in &by_offset {
            let b = &self.buffers[i];
            active.retain(|&j| {
                let o = &self.buffers[j];
                o.offset.saturating_add(o.bytes) > b.offset
            });
            for &j in &active {
                let o = &self.buffers[j];
                if !order.may_share((b, &uses[i]), (o, &uses[j])) {
                    let (first, second) = if j < i { (j, i) } else { (i, j) };
                    return Err(self.arena_overlap(first, second));
                }
            }
            active.push(i);
        }
        Ok(())
    }

    fn arena_overlap(&self, first: usize, second: usize) -> PlanError {
        let range = |b: &Buffer| (b.offset, b.offset.saturating_add(b.bytes));
        let (fb, sb) = (&self.buffers[first], &self.buffers[second]);
        PlanError::ArenaOverlap {
            first: self.buffer_ref(first as u32),
            first_range: range(fb),
            first_live: fb.live,
            second: self.buffer_ref(second as u32),
            second_range: range(sb),
            second_live: sb.live,
        }
    }
}
