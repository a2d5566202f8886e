//! The checks a plan passes when it is loaded.
//!
//! [`Plan::validate`] runs the checks in a fixed order and reports the first
//! problem it finds, so the same broken plan always gives the same error:
//!
//! 1. the format version;
//! 2. the layer, mesh and choices (sizes, dtypes, finite hardware figures,
//!    expert placement, chunking) and every op's estimate;
//! 3. references: at least one stream, unique stream names, kernel constants
//!    sorted, every kernel, buffer and event index in range, unique op ids;
//! 4. buffers: byte sizes, live ranges, arena overlap, arena size;
//! 5. events and order: each event recorded exactly once, no wait on an event
//!    that is never recorded, no deadlock between streams (found by running
//!    the streams abstractly), ids increasing along each stream and from each
//!    record to its waits;
//! 6. dropless layers raise the device-side overflow flag;
//! 7. consistency with the layer (`consistency.rs`): the input and output,
//!    every launch's kernel constants and bound buffers, every GEMM and
//!    collective, the ops the layer needs;
//! 8. races (`races.rs`), by the happens-before relation of `order.rs`:
//!    every read after the write it needs, conflicting accesses ordered,
//!    buffers that share arena bytes used one after the other.
//!
//! Limits on the counts of streams, ops, buffers, kernels and events come
//! right after the version, so that no later check sizes anything by a
//! number the file made up; all size arithmetic is checked.

use super::order::HappensBefore;
use super::{Activation, CapacityConfig, DType, Op, OpKind, Plan, RowBound, PLAN_FORMAT_VERSION};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// An op named in an error: its id and name and the stream it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpRef {
    pub id: u32,
    pub name: Box<str>,
    pub stream: usize,
    pub stream_name: Box<str>,
}

impl fmt::Display for OpRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "op #{} `{}` (stream s{} `{}`)",
            self.id, self.name, self.stream, self.stream_name
        )
    }
}

/// A buffer named in an error: its index and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferRef {
    pub index: u32,
    pub name: Box<str>,
}

impl fmt::Display for BufferRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "buffer b{} `{}`", self.index, self.name)
    }
}

/// A stream that cannot finish: it waits at `op` for `event`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stuck {
    /// The wait op the stream is stuck at.
    pub op: OpRef,
    pub event: u32,
    /// The op that records the event (itself stuck behind another wait).
    pub record: Option<OpRef>,
}

/// Two ops that touch the same part of `data` (the rows of `chunk`, when
/// given), at least one writing, with no stream order or event between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Race {
    pub first: OpRef,
    pub first_writes: bool,
    pub second: OpRef,
    pub second_writes: bool,
    pub data: Box<str>,
    pub chunk: Option<u64>,
}

/// What `op` writes into `data` (the rows of `chunk`, when given) is never
/// read: `overwritten_by` writes it again first, or the pass ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostWrite {
    pub op: OpRef,
    pub data: Box<str>,
    pub chunk: Option<u64>,
    pub overwritten_by: Option<OpRef>,
}

/// Why a plan was rejected.
#[derive(Clone, Debug, PartialEq)]
pub enum PlanError {
    /// The text is not JSON of a plan (syntax, missing or unknown fields, types).
    Json(String),
    /// The plan was written for another format version.
    Version {
        found: u32,
        expected: u32,
    },
    /// A field of the layer, mesh, choices, kernels or memory plan is wrong;
    /// `field` is its path (`layer.router.top_k`), `problem` says what is wrong
    /// and what was expected.
    Field {
        field: String,
        problem: String,
    },
    /// A floating-point field is not finite or out of range.
    Number {
        field: String,
        value: f64,
        expected: &'static str,
    },
    /// An op's cost estimate is not a finite number >= 0.
    Estimate {
        op: OpRef,
        value: f64,
    },
    NoStreams,
    DuplicateStreamName {
        name: String,
        first: usize,
        second: usize,
    },
    UnknownKernel {
        op: OpRef,
        kernel: u32,
        kernels: usize,
    },
    /// `field` is the op field that holds the index (`inputs`, `a`, `send`, ...).
    UnknownBuffer {
        op: OpRef,
        field: &'static str,
        buffer: u32,
        buffers: usize,
    },
    UnknownEvent {
        op: OpRef,
        event: u32,
        events: u32,
    },
    DuplicateOpId {
        first: OpRef,
        second: OpRef,
    },
    /// `expected` is `None` when `product(shape) * dtype size` overflows u64.
    BufferBytes {
        buffer: BufferRef,
        dtype: DType,
        shape: Vec<u64>,
        found: u64,
        expected: Option<u64>,
    },
    /// The live range ends before it starts.
    BufferLiveRange {
        buffer: BufferRef,
        live: (u32, u32),
    },
    /// An op touches a buffer outside the buffer's live range.
    BufferNotLive {
        op: OpRef,
        buffer: BufferRef,
        live: (u32, u32),
    },
    /// Two buffers share arena bytes, but their uses are not ordered one
    /// after the other (or one is the layer's input or output).
    ArenaOverlap {
        first: BufferRef,
        first_range: (u64, u64),
        first_live: (u32, u32),
        second: BufferRef,
        second_range: (u64, u64),
        second_live: (u32, u32),
    },
    /// A buffer ends past the arena; `end` is `None` when `offset + bytes` overflows u64.
    ArenaOverflow {
        buffer: BufferRef,
        offset: u64,
        end: Option<u64>,
        arena: u64,
    },
    EventRecordedTwice {
        event: u32,
        first: OpRef,
        second: OpRef,
    },
    /// `wait` is the first op that waits for the event, if any.
    EventNeverRecorded {
        event: u32,
        events: u32,
        wait: Option<OpRef>,
    },
    /// The streams cannot all finish: each stuck stream waits for an event
    /// whose record sits behind a wait that is never satisfied.
    Deadlock {
        stuck: Vec<Stuck>,
    },
    /// Ids do not increase along a stream.
    OpOrder {
        previous: OpRef,
        op: OpRef,
    },
    /// A wait has a smaller id than the record it waits for.
    WaitBeforeRecord {
        event: u32,
        wait: OpRef,
        record: OpRef,
    },
    /// A dropless layer without the device-side overflow flag.
    DroplessWithoutOverflowFlag,
    /// The plan has more of `what` than a plan may have.
    Limit {
        what: &'static str,
        found: u64,
        limit: u64,
    },
    /// A launched kernel's constants are not those the layer gives its kind.
    KernelConstants {
        op: OpRef,
        kernel: u32,
        name: Box<str>,
        problem: String,
    },
    /// An op's buffers or sizes do not fit what it computes (a launch's
    /// bound buffers against its kernel's parameters, a GEMM's shapes
    /// against the layer's weights, a collective's buffers).
    Op {
        op: OpRef,
        problem: String,
    },
    /// The plan's ops are not those the layer needs (a router stage, an
    /// assignment pass, the expert GEMMs, fp8 casts, shared experts).
    Form {
        problem: String,
    },
    /// `op` reads `data` (the rows of `chunk`, when given) before any op
    /// writes it.
    ReadBeforeWrite {
        op: OpRef,
        data: Box<str>,
        chunk: Option<u64>,
    },
    /// Two ops touch the same data, at least one writing, and no stream
    /// order or event orders them.
    Race(Box<Race>),
    /// What an op writes is never read.
    LostWrite(Box<LostWrite>),
    /// Data the host reads after the pass (the output, the overflow flag)
    /// is never written (in the rows of `chunk`, when given).
    NeverWritten {
        data: Box<str>,
        chunk: Option<u64>,
    },
}

/// " (the rows of chunk c)" or nothing.
fn rows_of(chunk: &Option<u64>) -> String {
    chunk.map_or(String::new(), |c| format!(" (the rows of chunk {c})"))
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use PlanError as E;
        if let E::Json(e) = self {
            return write!(f, "not a moec plan: {e}");
        }
        write!(f, "invalid plan: ")?;
        match self {
            E::Json(_) => Ok(()),
            E::Version { found, expected } => write!(
                f,
                "plan format version {found}, this runtime reads version {expected}; \
                 rebuild the plan with this moec"
            ),
            E::Field { field, problem } => write!(f, "`{field}` {problem}"),
            E::Number {
                field,
                value,
                expected,
            } => write!(f, "`{field}` is {value}, expected {expected}"),
            E::Estimate { op, value } => write!(
                f,
                "{op}: estimate_us is {value}, expected a finite number >= 0"
            ),
            E::NoStreams => write!(f, "the plan has no streams, expected at least one"),
            E::DuplicateStreamName {
                name,
                first,
                second,
            } => write!(
                f,
                "streams s{first} and s{second} are both named `{name}`; stream names must be unique"
            ),
            E::UnknownKernel {
                op,
                kernel,
                kernels,
            } => write!(
                f,
                "{op} launches kernel k{kernel}, but the plan has {kernels} kernel{} ({})",
                plural(*kernels),
                index_range("k", *kernels)
            ),
            E::UnknownBuffer {
                op,
                field,
                buffer,
                buffers,
            } => write!(
                f,
                "{op} refers to buffer b{buffer} in `{field}`, but the plan has {buffers} buffer{} ({})",
                plural(*buffers),
                index_range("b", *buffers)
            ),
            E::UnknownEvent { op, event, events } => write!(
                f,
                "{op} uses event e{event}, but the plan has {events} event{} ({})",
                plural(*events as usize),
                index_range("e", *events as usize)
            ),
            E::DuplicateOpId { first, second } => write!(
                f,
                "{second} has the same id as {first}; op ids must be unique"
            ),
            E::BufferBytes {
                buffer,
                dtype,
                shape,
                found,
                expected,
            } => {
                let shape = shape_text(shape);
                let scales = if *dtype == DType::Fp8E4m3 {
                    " plus 4-byte scales per 128-element block"
                } else {
                    ""
                };
                match expected {
                    Some(e) => write!(
                        f,
                        "{buffer} is {} {shape}{scales}, expected {e} bytes, found {found}",
                        dtype.name()
                    ),
                    None => write!(
                        f,
                        "{buffer}: the size of {} {shape} overflows 64 bits (found {found} bytes)",
                        dtype.name()
                    ),
                }
            }
            E::BufferLiveRange { buffer, live } => write!(
                f,
                "{buffer} has live range ops {}..{}, which ends before it starts",
                live.0, live.1
            ),
            E::BufferNotLive { op, buffer, live } => write!(
                f,
                "{op} uses {buffer} outside its live range ops {}..{}",
                live.0, live.1
            ),
            E::ArenaOverlap {
                first,
                first_range,
                first_live,
                second,
                second_range,
                second_live,
            } => write!(
                f,
                "{first} (arena [{}, {}), ops {}..{}) and {second} (arena [{}, {}), ops {}..{}) \
                 share arena bytes, but the streams and events do not order every use of one \
                 before every use of the other (or one is the layer's input or output)",
                first_range.0,
                first_range.1,
                first_live.0,
                first_live.1,
                second_range.0,
                second_range.1,
                second_live.0,
                second_live.1
            ),
            E::ArenaOverflow {
                buffer,
                offset,
                end,
                arena,
            } => match end {
                Some(end) => write!(
                    f,
                    "{buffer} occupies arena [{offset}, {end}), past the arena of \
                     {arena} bytes (`memory.peak_activation_bytes`)"
                ),
                None => write!(f, "{buffer}: offset {offset} + its bytes overflows 64 bits"),
            },
            E::EventRecordedTwice {
                event,
                first,
                second,
            } => write!(
                f,
                "event e{event} is recorded by {first} and again by {second}; \
                 each event must be recorded exactly once"
            ),
            E::EventNeverRecorded { event, events, wait } => match wait {
                Some(wait) => write!(
                    f,
                    "{wait} waits for event e{event}, which no op records"
                ),
                None => write!(
                    f,
                    "event e{event} is never recorded; each of the {events} event{} ({}) \
                     must be recorded exactly once",
                    plural(*events as usize),
                    index_range("e", *events as usize)
                ),
            },
            E::Deadlock { stuck } => {
                write!(f, "the streams deadlock: ")?;
                for (i, s) in stuck.iter().enumerate() {
                    if i > 0 {
                        write!(f, "; ")?;
                    }
                    write!(
                        f,
                        "stream s{} `{}` waits at op #{} `{}` for event e{}",
                        s.op.stream, s.op.stream_name, s.op.id, s.op.name, s.event
                    )?;
                    if let Some(r) = &s.record {
                        write!(f, ", recorded later by {r}")?;
                    }
                }
                Ok(())
            }
            E::OpOrder { previous, op } => write!(
                f,
                "{op} follows op #{} `{}` on its stream but has a smaller id; \
                 ids must increase along a stream",
                previous.id, previous.name
            ),
            E::WaitBeforeRecord {
                event,
                wait,
                record,
            } => write!(
                f,
                "{wait} waits for event e{event} but its id is not greater than that of \
                 {record}, which records it; a wait's id must come after its record's"
            ),
            E::DroplessWithoutOverflowFlag => write!(
                f,
                "`choices.overflow_flag` is false but `layer.capacity` is dropless; \
                 dropless plans must raise the device-side overflow flag"
            ),
            E::Limit { what, found, limit } => write!(
                f,
                "the plan has {found} {what}, at most {limit} are accepted"
            ),
            E::KernelConstants {
                op,
                kernel,
                name,
                problem,
            } => write!(f, "{op} launches kernel k{kernel} `{name}`, which {problem}"),
            E::Op { op, problem } => write!(f, "{op} {problem}"),
            E::Form { problem } => write!(f, "{problem}"),
            E::ReadBeforeWrite { op, data, chunk } => write!(
                f,
                "{op} reads {data}{} before any op writes it; \
                 a wait for the op that writes it is missing or points elsewhere",
                rows_of(chunk)
            ),
            E::Race(r) => {
                let verb = |w: bool| if w { "writes" } else { "reads" };
                write!(
                    f,
                    "{} {} {}{} and {} {} it, but no stream order or event \
                     orders them (a race); a wait between them is missing or points elsewhere",
                    r.first,
                    verb(r.first_writes),
                    r.data,
                    rows_of(&r.chunk),
                    r.second,
                    verb(r.second_writes)
                )
            }
            E::LostWrite(w) => {
                write!(
                    f,
                    "{} writes {}{}, but no op reads it before ",
                    w.op,
                    w.data,
                    rows_of(&w.chunk)
                )?;
                match &w.overwritten_by {
                    Some(o) => write!(f, "{o} writes it again")?,
                    None => write!(f, "the pass ends")?,
                }
                write!(f, "; an op's output points at the wrong buffer")
            }
            E::NeverWritten { data, chunk } => write!(
                f,
                "{data}{} is read after the pass, but no op writes it",
                rows_of(chunk)
            ),
        }
    }
}

impl std::error::Error for PlanError {}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn index_range(prefix: &str, n: usize) -> String {
    match n {
        0 => "none".to_string(),
        1 => format!("{prefix}0"),
        _ => format!("{prefix}0..{prefix}{}", n - 1),
    }
}

fn shape_text(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

pub(super) fn field(field: impl Into<String>, problem: impl Into<String>) -> PlanError {
    PlanError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

fn positive(name: &str, v: u64) -> Result<(), PlanError> {
    if v == 0 {
        Err(field(name, "is 0, expected a positive number"))
    } else {
        Ok(())
    }
}

/// A finite number > 0.
fn finite_positive(name: &str, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(PlanError::Number {
            field: name.to_string(),
            value: v,
            expected: "a finite number > 0",
        })
    }
}

/// A finite number >= 0.
fn finite_non_negative(name: &str, v: f64) -> Result<(), PlanError> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(PlanError::Number {
            field: name.to_string(),
            value: v,
            expected: "a finite number >= 0",
        })
    }
}

fn check_activation(name: &str, ffn: Activation) -> Result<(), PlanError> {
    if let Activation::Swiglu { limit: Some(limit) } = ffn {
        finite_positive(&format!("{name}.limit"), limit)?;
    }
    Ok(())
}

fn float_dtype(name: &str, dtype: DType, fp8: bool) -> Result<(), PlanError> {
    match dtype {
        DType::F32 | DType::Bf16 | DType::F16 => Ok(()),
        DType::Fp8E4m3 if fp8 => Ok(()),
        _ => Err(field(
            name,
            format!(
                "is {}, expected {}",
                dtype.name(),
                if fp8 {
                    "f32, bf16, f16 or fp8_e4m3"
                } else {
                    "f32, bf16 or f16"
                }
            ),
        )),
    }
}

/// `product(shape) * dtype size`; fp8 adds one f32 scale per block of 128
/// elements of a row (the last dimension; a row's last block may be partial).
pub fn buffer_bytes(dtype: DType, shape: &[u64]) -> Option<u64> {
    let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
    if dtype == DType::Fp8E4m3 {
        let (cols, rows) = shape.split_last().map_or((1, &[][..]), |(c, r)| (*c, r));
        let rows = rows.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        let scales = rows.checked_mul(cols.div_ceil(128))?.checked_mul(4)?;
        elements.checked_add(scales)
    } else {
        elements.checked_mul(dtype.bytes())
    }
}

/// The buffer indices an op refers to, with the field that holds each.
pub(crate) fn op_buffers(op: &Op) -> Vec<(&'static str, u32)> {
    op.kind.buffers()
}

impl Plan {
    /// Checks the plan: version, layer and mesh, every reference, buffers and
    /// the arena, events (no deadlock) and op order. Reports the first problem,
    /// in a fixed order (see the module documentation).
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.version != PLAN_FORMAT_VERSION {
            return Err(PlanError::Version {
                found: self.version,
                expected: PLAN_FORMAT_VERSION,
            });
        }
        self.check_limits()?;
        self.check_layer()?;
        self.check_mesh()?;
        self.check_choices()?;
        self.check_estimates()?;
        self.check_references()?;
        self.check_buffers()?;
        self.check_row_bounds()?;
        self.check_events()?;
        self.check_order()?;
        if self.layer.capacity == CapacityConfig::Dropless && !self.choices.overflow_flag {
            return Err(PlanError::DroplessWithoutOverflowFlag);
        }
        let expect = self.expect()?;
        self.check_io(&expect)?;
        self.check_launches(&expect)?;
        self.check_gemms(&expect)?;
        self.check_collectives()?;
        self.check_forms()?;
        let order = HappensBefore::new(&self.streams, self.events);
        self.check_races(&order)?;
        self.check_arena_sharing(&order)
    }

    pub(super) fn op_ref(&self, stream: usize, op: &Op) -> OpRef {
        OpRef {
            id: op.id,
            name: op.name.as_str().into(),
            stream,
            stream_name: self
                .streams
                .get(stream)
                .map_or("", |s| s.name.as_str())
                .into(),
        }
    }

    fn op_ref_at(&self, (stream, index): (usize, usize)) -> Option<OpRef> {
        let op = self.streams.get(stream)?.ops.get(index)?;
        Some(self.op_ref(stream, op))
    }

    /// The op `id` on `stream` (ids are unique once the references are checked).
    pub(super) fn op_ref_by_id(&self, id: u32, stream: usize) -> OpRef {
        let op = self
            .streams
            .get(stream)
            .and_then(|s| s.ops.iter().find(|o| o.id == id));
        match op {
            Some(op) => self.op_ref(stream, op),
            None => OpRef {
                id,
                name: "".into(),
                stream,
                stream_name: "".into(),
            },
        }
    }

    pub(super) fn buffer_ref(&self, index: u32) -> BufferRef {
        BufferRef {
            index,
            name: self
                .buffers
                .get(index as usize)
                .map_or("", |b| b.name.as_str())
                .into(),
        }
    }

    fn check_layer(&self) -> Result<(), PlanError> {
        let l = &self.layer;
        positive("layer.hidden", l.hidden)?;
        positive("layer.tokens_per_rank", l.tokens_per_rank)?;
        positive("layer.experts", l.experts)?;
        positive("layer.intermediate", l.intermediate)?;
        float_dtype("layer.dtype", l.dtype, false)?;
        float_dtype("layer.dispatch_dtype", l.dispatch_dtype, true)?;
        check_activation("layer.ffn", l.ffn)?;
        let r = &l.router;
        if r.top_k == 0 || r.top_k > l.experts {
            return Err(field(
                "layer.router.top_k",
                format!(
                    "is {}, expected 1..={} (the layer has {} experts)",
                    r.top_k, l.experts, l.experts
                ),
            ));
        }
        if let Some(g) = r.groups {
            positive("layer.router.groups.count", g.count)?;
            if l.experts % g.count != 0 {
                return Err(field(
                    "layer.router.groups.count",
                    format!(
                        "is {}, which does not divide the {} experts",
                        g.count, l.experts
                    ),
                ));
            }
            if g.kept == 0 || g.kept > g.count {
                return Err(field(
                    "layer.router.groups.kept",
                    format!("is {}, expected 1..={}", g.kept, g.count),
                ));
            }
            let candidates = (l.experts / g.count).saturating_mul(g.kept);
            if r.top_k > candidates {
                return Err(field(
                    "layer.router.top_k",
                    format!(
                        "is {}, but the {} kept groups of {} experts hold only {candidates}",
                        r.top_k,
                        g.kept,
                        l.experts / g.count
                    ),
                ));
            }
        }
        finite_positive("layer.router.scale", r.scale)?;
        if let Some(s) = &l.shared {
            positive("layer.shared.count", s.count)?;
            positive("layer.shared.intermediate", s.intermediate)?;
            check_activation("layer.shared.ffn", s.ffn)?;
        }
        if let CapacityConfig::Limited { slots, factor, .. } = l.capacity {
            positive("layer.capacity.slots", slots)?;
            if let Some(factor) = factor {
                finite_positive("layer.capacity.factor", factor)?;
            }
        }
        Ok(())
    }

    fn check_mesh(&self) -> Result<(), PlanError> {
        let m = &self.mesh;
        positive("mesh.nodes", m.nodes)?;
        positive("mesh.gpus_per_node", m.gpus_per_node)?;
        positive("mesh.ep", m.ep)?;
        positive("mesh.etp", m.etp)?;
        positive("mesh.dp", m.dp)?;
        let world = m.nodes.checked_mul(m.gpus_per_node);
        let parallel = m.ep.checked_mul(m.etp).and_then(|x| x.checked_mul(m.dp));
        let Some(world) = world else {
            return Err(field(
                "mesh.nodes",
                format!(
                    "{} x mesh.gpus_per_node {} overflows 64 bits",
                    m.nodes, m.gpus_per_node
                ),
            ));
        };
        if parallel != Some(world) {
            let product = parallel.map_or("more than 2^64".to_string(), |p| p.to_string());
            return Err(field(
                "mesh.ep",
                format!(
                    "x etp x dp is {} x {} x {} = {product}, but the mesh has {} nodes x {} GPUs \
                     = {world} ranks; expected ep x etp x dp = nodes x gpus_per_node",
                    m.ep, m.etp, m.dp, m.nodes, m.gpus_per_node
                ),
            ));
        }
        finite_positive("mesh.device.peak_flops", m.device.peak_flops)?;
        finite_positive("mesh.device.memory_bandwidth", m.device.memory_bandwidth)?;
        finite_positive("mesh.device.memory", m.device.memory)?;
        finite_positive("mesh.intra_node.bandwidth", m.intra_node.bandwidth)?;
        finite_non_negative("mesh.intra_node.latency", m.intra_node.latency)?;
        match m.inter_node {
            Some(link) => {
                finite_positive("mesh.inter_node.bandwidth", link.bandwidth)?;
                finite_non_negative("mesh.inter_node.latency", link.latency)?;
            }
            None if m.nodes > 1 => {
                return Err(field(
                    "mesh.inter_node",
                    format!("is missing, but the mesh has {} nodes", m.nodes),
                ));
            }
            None => {}
        }
        self.check_placement()
    }

    fn check_placement(&self) -> Result<(), PlanError> {
        let m = &self.mesh;
        let experts = self.layer.experts;
        if m.experts_of_ep_rank.len() as u64 != m.ep {
            return Err(field(
                "mesh.experts_of_ep_rank",
                format!(
                    "has {} entries, expected one per EP rank ({})",
                    m.experts_of_ep_rank.len(),
                    m.ep
                ),
            ));
        }
        let mut all = Vec::new();
        for (rank, list) in m.experts_of_ep_rank.iter().enumerate() {
            let name = format!("mesh.experts_of_ep_rank[{rank}]");
            if let Some(&e) = list.iter().find(|&&e| e >= experts) {
                return Err(field(
                    name,
                    format!("holds expert {e}, but the layer has {experts} experts (0..{experts})"),
                ));
            }
            let mut sorted = list.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(field(
                    name,
                    format!("lists expert {} twice, expected each expert once", w[0]),
                ));
            }
            all.extend(sorted);
        }
        all.sort_unstable();
        all.dedup();
        if all.len() as u64 != experts {
            // All ids are < experts and distinct, so one is missing; find the first.
            let missing = (0u64..)
                .zip(all.iter())
                .find(|(want, &have)| *want != have)
                .map_or(all.len() as u64, |(want, _)| want);
            return Err(field(
                "mesh.experts_of_ep_rank",
                format!("gives expert {missing} to no EP rank, expected every expert to be held"),
            ));
        }
        Ok(())
    }

    fn check_choices(&self) -> Result<(), PlanError> {
        let c = &self.choices;
        let tokens = self.layer.tokens_per_rank;
        positive("choices.chunks", c.chunks)?;
        positive("choices.chunk_tokens", c.chunk_tokens)?;
        let covered = c.chunks.checked_mul(c.chunk_tokens);
        if covered.is_none_or(|covered| covered < tokens) {
            // (overflow means more than enough, but such a plan is absurd anyway)
            if let Some(covered) = covered {
                return Err(field(
                    "choices.chunk_tokens",
                    format!(
                        "is {}: {} chunks cover {covered} tokens, expected at least \
                         tokens_per_rank {tokens}",
                        c.chunk_tokens, c.chunks
                    ),
                ));
            }
            return Err(field(
                "choices.chunks",
                format!(
                    "{} x chunk_tokens {} overflows 64 bits",
                    c.chunks, c.chunk_tokens
                ),
            ));
        }
        // The last chunk is not empty: (chunks - 1) * chunk_tokens < tokens.
        let before_last = (c.chunks - 1).saturating_mul(c.chunk_tokens);
        if before_last >= tokens {
            return Err(field(
                "choices.chunks",
                format!(
                    "is {} chunks of {} tokens, but the first {} chunks already cover \
                     tokens_per_rank {tokens}; expected a non-empty last chunk",
                    c.chunks,
                    c.chunk_tokens,
                    c.chunks - 1
                ),
            ));
        }
        float_dtype("choices.dispatch_dtype", c.dispatch_dtype, true)?;
        positive("choices.expert_rows", c.expert_rows)?;
        match (c.dedup_dispatch, c.rank_rows) {
            (true, 0) => {
                return Err(field(
                    "choices.rank_rows",
                    "is 0, but the plan dispatches by rank",
                ))
            }
            (false, r) if r != 0 => {
                return Err(field(
                    "choices.rank_rows",
                    format!("is {r}, but the plan does not dispatch by rank (expected 0)"),
                ))
            }
            _ => {}
        }
        match (c.headroom, &self.layer.capacity) {
            (Some(h), CapacityConfig::Dropless) if !(h.is_finite() && h >= 1.0) => {
                return Err(field(
                    "choices.headroom",
                    format!("is {h}, expected a factor of at least 1 (or null: the worst case)"),
                ))
            }
            (Some(h), CapacityConfig::Limited { .. }) => {
                return Err(field(
                    "choices.headroom",
                    format!("is {h}, but a capacity plan's buffers are exact (expected null)"),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Buffers sized by the expected load: only in dropless plans, matrices
    /// whose rows are exactly the bound they name, so the overflow
    /// test on the bounds ([`Plan::overflows`]) covers every one of them.
    fn check_row_bounds(&self) -> Result<(), PlanError> {
        for (i, b) in self.buffers.iter().enumerate() {
            let Some(bound) = b.bound else { continue };
            let wrong = |problem: String| field(format!("buffers[{i}] `{}`", b.name), problem);
            if self.layer.capacity != CapacityConfig::Dropless {
                return Err(wrong(
                    "is bounded by the expected load, but the layer has a capacity".into(),
                ));
            }
            let (what, rows) = match bound {
                RowBound::ExpertRows => ("choices.expert_rows", self.choices.expert_rows),
                RowBound::RankRows => ("choices.rank_rows", self.choices.rank_rows),
            };
            if b.shape.len() != 2 || b.shape.first() != Some(&rows) {
                return Err(wrong(format!(
                    "is bounded by {what} = {rows}, expected a buffer of [{rows}, columns], found {:?}",
                    b.shape
                )));
            }
        }
        Ok(())
    }

    fn check_estimates(&self) -> Result<(), PlanError> {
        for (s, op) in self.ops() {
            if !(op.estimate_us.is_finite() && op.estimate_us >= 0.0) {
                return Err(PlanError::Estimate {
                    op: self.op_ref(s, op),
                    value: op.estimate_us,
                });
            }
        }
        Ok(())
    }

    fn check_references(&self) -> Result<(), PlanError> {
        if self.streams.is_empty() {
            return Err(PlanError::NoStreams);
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, stream) in self.streams.iter().enumerate() {
            if let Some(&first) = names.get(stream.name.as_str()) {
                return Err(PlanError::DuplicateStreamName {
                    name: stream.name.clone(),
                    first,
                    second: i,
                });
            }
            names.insert(&stream.name, i);
        }
        for (k, kernel) in self.kernels.iter().enumerate() {
            if let Some(w) = kernel.constants.windows(2).find(|w| w[0].0 >= w[1].0) {
                return Err(field(
                    format!("kernels[{k}].constants"),
                    format!(
                        "of kernel k{k} `{}` has `{}` before `{}`, expected unique names in sorted order",
                        kernel.name, w[0].0, w[1].0
                    ),
                ));
            }
        }
        let mut ids: HashMap<u32, (usize, usize)> = HashMap::new();
        for (s, stream) in self.streams.iter().enumerate() {
            for (i, op) in stream.ops.iter().enumerate() {
                if let OpKind::Launch { kernel, .. } = op.kind {
                    if kernel as usize >= self.kernels.len() {
                        return Err(PlanError::UnknownKernel {
                            op: self.op_ref(s, op),
                            kernel,
                            kernels: self.kernels.len(),
                        });
                    }
                }
                for (name, b) in op_buffers(op) {
                    if b as usize >= self.buffers.len() {
                        return Err(PlanError::UnknownBuffer {
                            op: self.op_ref(s, op),
                            field: name,
                            buffer: b,
                            buffers: self.buffers.len(),
                        });
                    }
                }
                if let OpKind::Record { event } | OpKind::Wait { event } = op.kind {
                    if event >= self.events {
                        return Err(PlanError::UnknownEvent {
                            op: self.op_ref(s, op),
                            event,
                            events: self.events,
                        });
                    }
                }
                if let Some(c) = op.chunk.filter(|&c| c >= self.choices.chunks) {
                    return Err(PlanError::Op {
                        op: self.op_ref(s, op),
                        problem: format!(
                            "works on chunk {c}, but the plan has {} chunks",
                            self.choices.chunks
                        ),
                    });
                }
                if let Some(&first) = ids.get(&op.id) {
                    return Err(PlanError::DuplicateOpId {
                        first: self.op_ref_at(first).unwrap_or_else(|| self.op_ref(s, op)),
                        second: self.op_ref(s, op),
                    });
                }
                ids.insert(op.id, (s, i));
            }
        }
        Ok(())
    }

    fn check_buffers(&self) -> Result<(), PlanError> {
        let mut total: Option<u64> = Some(0);
        for (i, b) in self.buffers.iter().enumerate() {
            let index = i as u32;
            let expected = buffer_bytes(b.dtype, &b.shape);
            if expected != Some(b.bytes) {
                return Err(PlanError::BufferBytes {
                    buffer: self.buffer_ref(index),
                    dtype: b.dtype,
                    shape: b.shape.clone(),
                    found: b.bytes,
                    expected,
                });
            }
            if let Some(c) = b.chunk.filter(|&c| c >= self.choices.chunks) {
                return Err(field(
                    format!("buffers[{i}].chunk"),
                    format!(
                        "of `{}` is {c}, but the plan has {} chunks",
                        b.name, self.choices.chunks
                    ),
                ));
            }
            if b.live.0 > b.live.1 {
                return Err(PlanError::BufferLiveRange {
                    buffer: self.buffer_ref(index),
                    live: b.live,
                });
            }
            total = total.and_then(|t| t.checked_add(b.bytes));
        }
        // Every use lies in the buffer's live range.
        for (s, op) in self.ops() {
            for (_, index) in op_buffers(op) {
                let Some(b) = self.buffers.get(index as usize) else {
                    continue;
                };
                if op.id < b.live.0 || op.id > b.live.1 {
                    return Err(PlanError::BufferNotLive {
                        op: self.op_ref(s, op),
                        buffer: self.buffer_ref(index),
                        live: b.live,
                    });
                }
            }
        }
        // Arena: every buffer fits.
        let arena = self.memory.peak_activation_bytes;
        for (i, b) in self.buffers.iter().enumerate() {
            let end = b.offset.checked_add(b.bytes);
            if end.is_none_or(|end| end > arena) {
                return Err(PlanError::ArenaOverflow {
                    buffer: self.buffer_ref(i as u32),
                    offset: b.offset,
                    end,
                    arena,
                });
            }
        }
        // The arena is what the buffers need, no more: its size is allocated
        // per rank.
        let end = self
            .buffers
            .iter()
            .map(|b| b.offset.saturating_add(b.bytes))
            .max()
            .unwrap_or(0);
        if end != arena {
            return Err(field(
                "memory.peak_activation_bytes",
                format!("is {arena}, but the buffers end at {end} bytes"),
            ));
        }
        if total != Some(self.memory.total_buffer_bytes) {
            return Err(field(
                "memory.total_buffer_bytes",
                format!(
                    "is {}, expected the sum of the buffers' bytes ({})",
                    self.memory.total_buffer_bytes,
                    total.map_or("more than 2^64".to_string(), |t| t.to_string())
                ),
            ));
        }
        Ok(())
    }

    /// Records and waits: each event recorded once, waits satisfiable, no deadlock.
    fn check_events(&self) -> Result<(), PlanError> {
        let mut records: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
        for (s, stream) in self.streams.iter().enumerate() {
            for (i, op) in stream.ops.iter().enumerate() {
                if let OpKind::Record { event } = op.kind {
                    if let Some(&first) = records.get(&event) {
                        return Err(PlanError::EventRecordedTwice {
                            event,
                            first: self.op_ref_at(first).unwrap_or_else(|| self.op_ref(s, op)),
                            second: self.op_ref(s, op),
                        });
                    }
                    records.insert(event, (s, i));
                }
            }
        }
        for (s, op) in self.ops() {
            if let OpKind::Wait { event } = op.kind {
                if !records.contains_key(&event) {
                    return Err(PlanError::EventNeverRecorded {
                        event,
                        events: self.events,
                        wait: Some(self.op_ref(s, op)),
                    });
                }
            }
        }
        // Every event index is below `events` (checked before), so fewer
        // records than events means some event is never recorded. The search
        // stops after at most `records.len() + 1` steps.
        if (records.len() as u64) < u64::from(self.events) {
            if let Some(event) = (0..self.events).find(|e| !records.contains_key(e)) {
                return Err(PlanError::EventNeverRecorded {
                    event,
                    events: self.events,
                    wait: None,
                });
            }
        }
        // Run the streams abstractly: a wait proceeds once its record has run.
        let n = self.streams.len();
        let mut position = vec![0usize; n];
        let mut recorded: BTreeSet<u32> = BTreeSet::new();
        let mut blocked: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        let mut ready: Vec<usize> = (0..n).rev().collect();
        while let Some(s) = ready.pop() {
            let ops = &self.streams[s].ops;
            while let Some(op) = ops.get(position[s]) {
                match op.kind {
                    OpKind::Wait { event } if !recorded.contains(&event) => {
                        blocked.entry(event).or_default().push(s);
                        break;
                    }
                    OpKind::Record { event } => {
                        recorded.insert(event);
                        if let Some(waiting) = blocked.remove(&event) {
                            ready.extend(waiting.into_iter().rev());
                        }
                    }
                    _ => {}
                }
                position[s] += 1;
            }
        }
        let mut stuck = Vec::new();
        for (s, stream) in self.streams.iter().enumerate() {
            if let Some(op) = stream.ops.get(position[s]) {
                let event = match op.kind {
                    OpKind::Wait { event } => event,
                    _ => continue,
                };
                stuck.push(Stuck {
                    op: self.op_ref(s, op),
                    event,
                    record: records.get(&event).and_then(|&at| self.op_ref_at(at)),
                });
            }
        }
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(PlanError::Deadlock { stuck })
        }
    }

    /// Ids are one valid sequential order: increasing along each stream and
    /// from each record to its waits.
    fn check_order(&self) -> Result<(), PlanError> {
        let mut records: BTreeMap<u32, (usize, &Op)> = BTreeMap::new();
        for (s, stream) in self.streams.iter().enumerate() {
            for pair in stream.ops.windows(2) {
                if pair[1].id <= pair[0].id {
                    return Err(PlanError::OpOrder {
                        previous: self.op_ref(s, &pair[0]),
                        op: self.op_ref(s, &pair[1]),
                    });
                }
            }
            for op in &stream.ops {
                if let OpKind::Record { event } = op.kind {
                    records.insert(event, (s, op));
                }
            }
        }
        for (s, op) in self.ops() {
            if let OpKind::Wait { event } = op.kind {
                if let Some(&(rs, record)) = records.get(&event) {
                    if op.id <= record.id {
                        return Err(PlanError::WaitBeforeRecord {
                            event,
                            wait: self.op_ref(s, op),
                            record: self.op_ref(rs, record),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
