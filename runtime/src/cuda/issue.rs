//! The issuer: walks a [`Program`] and hands concrete commands to a
//! [`Target`].
//!
//! The issuer is everything of the CUDA executor that is not a driver call:
//! it resolves the routing-dependent steps (rows of a `pack`, the row groups
//! of an expert GEMM, the byte runs of an all-to-all) from the routing table
//! read back after `assign_place`, turns a collective into device-to-device
//! copies between virtual ranks (or NCCL sends and receives when the group's
//! ranks live in other processes), and turns status blocks into errors. The
//! driver layer (`driver.rs`) implements [`Target`] with cudarc; the tests
//! implement it on host memory and run every example through the very same
//! issuer, so all of this is checked without a GPU.
//!
//! Commands are issued in the program's order (op-id order, ranks in turn),
//! onto per-rank, per-stream queues; only the plan's events and the
//! collectives' own events order the queues, as on a GPU.

use super::program::{
    launch_shape, ArgT, ByRankStep, CollectiveStep, GemmStep, Groups, KernelRef, LaunchStep,
    Program, Rows, Space, Span, StepKind, StreamWork, Tail, STATUS_BYTES,
};
use super::route::{expand_frame_len, RouteTable, Routes};
use crate::cpu::comm::Run;
use crate::cpu::hier::{PeerRows, Staged};
use crate::cpu::layout::{assign_place, row_need, ByRank, Routing};
use crate::cpu::memory;
use crate::cpu::{ExecError, RoutingStats};
use crate::plan::{CollectiveKind, CollectiveScope, DType, GemmWeight};
use crate::weights::{Ffn, LayerWeights};
use moec_kernels::cuda::{STATUS_DIV_ZERO, STATUS_OOB_ARRAY, STATUS_OOB_BUFFER};
use moec_kernels::ir::{Param, ParamKind};
use moec_kernels::native::{
    NativeKernel, STATUS_BAD_EXPERT, STATUS_BAD_METADATA, STATUS_BAD_WEIGHT, STATUS_COUNTS_DISAGREE,
};
use std::collections::BTreeMap;
use std::ops::Range;

mod hier_legs;

/// Byte runs per peer of a group.
pub type PeerRuns = Vec<Vec<Run>>;

/// A device address: a rank's space and a byte offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr {
    pub rank: usize,
    pub space: Space,
    pub offset: u64,
}

impl Addr {
    pub fn of(rank: usize, span: Span) -> Addr {
        Addr {
            rank,
            space: span.space,
            offset: span.offset,
        }
    }

    pub fn plus(self, bytes: u64) -> Addr {
        Addr {
            offset: self.offset + bytes,
            ..self
        }
    }
}

/// A launch argument.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A buffer: its address and its length in elements.
    Buf {
        addr: Addr,
        len: u64,
    },
    F32(f32),
    I64(i64),
}

/// An event of a rank: one of the plan's, or one the collectives use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    pub rank: usize,
    pub id: u32,
    pub comm: bool,
}

/// One piece of device work, on one stream of one rank.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Launch {
        kernel: KernelRef,
        args: Vec<Arg>,
        rows: u64,
        grid: u32,
        block: u32,
        status: Addr,
        scratch: Option<Addr>,
    },
    /// `c[m, n] = a[m, k] · w[n, k]ᵀ` in `f32` (row-major; `a` and `w` in
    /// `dtype`, `c` in `f32`).
    Gemm {
        a: Addr,
        w: Addr,
        c: Addr,
        dtype: DType,
        m: u64,
        n: u64,
        k: u64,
    },
    /// `batch` GEMMs like [`Command::Gemm`], the `i`-th one's operands
    /// `i · stride` bytes after the first's (`strides` of `a`, `w`, `c`):
    /// one strided-batched cuBLAS call.
    GemmBatched {
        a: Addr,
        w: Addr,
        c: Addr,
        dtype: DType,
        m: u64,
        n: u64,
        k: u64,
        batch: u64,
        strides: (u64, u64, u64),
    },
    Copy {
        src: Addr,
        dst: Addr,
        bytes: u64,
    },
    /// Host bytes copied to the device in stream order (what the host
    /// computes of a dispatch by rank during a pass).
    Upload {
        dst: Addr,
        bytes: Vec<u8>,
    },
    Memset {
        dst: Addr,
        bytes: u64,
        value: u8,
    },
    Record(EventId),
    Wait(EventId),
    /// Copy to the host; [`Target::fetch`] waits for it.
    ReadBack {
        src: Addr,
        bytes: u64,
    },
    /// One grouped NCCL exchange: sends and receives of byte runs, with
    /// the peers' global ranks.
    Nccl {
        sends: Vec<(usize, Addr, u64)>,
        recvs: Vec<(usize, Addr, u64)>,
    },
    /// A timing mark, numbered from 0 in each pass: the time the stream
    /// reaches it (a timing event on a GPU). Only profiled passes have them.
    Stamp(u32),
}

/// What executes commands: the GPU (driver layer) or a host emulation.
pub trait Target {
    /// Enqueues `cmd` on `stream` of global rank `rank`.
    fn submit(&mut self, rank: usize, stream: usize, cmd: Command) -> Result<(), String>;
    /// Waits for the rank's latest [`Command::ReadBack`] and returns its bytes.
    fn fetch(&mut self, rank: usize) -> Result<Vec<u8>, String>;
    /// Queues a copy of host bytes to the device on stream 0 of `at.rank`
    /// (the host's bytes may be dropped once it returns). The copy lands
    /// asynchronously: commands submitted to that stream afterwards are
    /// ordered after it, commands on any other stream only through an event
    /// recorded on stream 0 after it (the issuer forks every stream from
    /// stream 0 after a pass's writes). Never during a capture.
    fn write(&mut self, at: Addr, bytes: &[u8]) -> Result<(), String>;
    /// Waits until every queue of every rank is idle.
    fn synchronize(&mut self) -> Result<(), String>;
    /// Copies device bytes to the host now: after [`Target::synchronize`],
    /// or bytes that a rank's stream wrote before a [`Command::ReadBack`]
    /// whose [`Target::fetch`] has returned (the fetch waited for them; the
    /// hierarchical all-to-all reads the `slots` table so).
    fn read(&mut self, at: Addr, bytes: u64) -> Result<Vec<u8>, String>;
    /// The times of stamps `0..count` of this pass in seconds after stamp 0
    /// (negative for a stamp that ran before it on another stream), after
    /// [`Target::synchronize`].
    fn stamp_seconds(&mut self, count: u32) -> Result<Vec<f64>, String>;
    /// From now on, records what is submitted to `stream` of `rank`, and to
    /// every stream that waits on an event recorded there (and so on), into
    /// a graph instead of running it.
    fn begin_capture(&mut self, rank: usize, stream: usize) -> Result<(), String>;
    /// Ends the recording (every stream has joined the first one again) and
    /// keeps the graph, replacing an earlier one.
    fn end_capture(&mut self) -> Result<(), String>;
    /// Enqueues one run of the kept graph ([`Target::synchronize`] waits for it).
    fn launch_graph(&mut self) -> Result<(), String>;
}

/// How [`run_pass`] issues a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassMode {
    /// Command by command, as the program says.
    Eager,
    /// Eager, with a [`Command::Stamp`] before and after every step and
    /// every cuBLAS GEMM; the pass returns their device times.
    Profiled,
    /// Records the pass into a graph (capacity plans whose EP groups are
    /// all in this process: nothing in them needs the host), then runs it.
    Capture,
    /// Runs the graph an earlier `Capture` pass recorded.
    Replay,
}

/// The device time of one step of one op on one rank, from a profiled pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// Global rank.
    pub rank: usize,
    /// Index into [`Program::ops`].
    pub op: usize,
    /// `Some((m, n, k))` for one cuBLAS GEMM inside the step (`[m, k] ·
    /// [n, k]ᵀ`), `None` for the whole step (launches, GEMMs with their
    /// epilogues, a collective with its waits for peers, a memset).
    pub gemm: Option<(u64, u64, u64)>,
    /// When it started, in seconds after the pass's first stamp (negative
    /// if it started before that stamp, on another stream).
    pub start: f64,
    pub seconds: f64,
}

/// The result of one pass on the local ranks.
#[derive(Clone, Debug)]
pub struct Pass {
    /// Per local rank, `[tokens, hidden]` as f32.
    pub outputs: Vec<Vec<f32>>,
    pub stats: RoutingStats,
    /// Host wall time from the first command issued to the device going
    /// idle: the layer's time with its inputs already on the device (the
    /// upload of the inputs and the read-back of the outputs excluded).
    pub seconds: f64,
    /// Per-step device times (profiled passes only; empty otherwise).
    pub timings: Vec<Timing>,
}

fn err(rank: usize, op: Option<String>, message: impl Into<String>) -> ExecError {
    ExecError {
        rank: Some(rank),
        op,
        message: message.into(),
    }
}

/// The weights of one FFN as the GEMMs read them: `[gate; up]`, its bias
/// (gate and up biases side by side, only when both exist, as on the CPU),
/// the down projection and its bias.
#[allow(clippy::type_complexity)] // the four tensors of an FFN, spelled out
fn stacked(ffn: &Ffn) -> (Vec<f32>, Option<Vec<f32>>, &[f32], Option<&[f32]>) {
    let mut up = Vec::with_capacity(ffn.up.len() * 2);
    let mut up_bias = None;
    if let Some(gate) = &ffn.gate {
        up.extend_from_slice(gate);
        if let (Some(gb), Some(ub)) = (&ffn.gate_bias, &ffn.up_bias) {
            up_bias = Some(gb.iter().chain(ub).copied().collect());
        }
    } else {
        up_bias = ffn.up_bias.clone();
    }
    up.extend_from_slice(&ffn.up);
    (up, up_bias, &ffn.down, ffn.down_bias.as_deref())
}

/// `memory::write_f32(values, dtype, bytes)`, by up to one thread per core
/// for large tensors (a rank of a DeepSeek-V3 layer holds 1.4 billion
/// weights to round to bf16).
fn convert_in_parallel(values: &[f32], dtype: DType, bytes: &mut [u8]) {
    const CHUNK: usize = 1 << 22;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let elem = dtype.bytes() as usize;
    if threads == 1 || values.len() <= CHUNK || elem == 0 {
        memory::write_f32(values, dtype, bytes);
        return;
    }
    let per_thread = values.len().div_ceil(threads).max(CHUNK);
    std::thread::scope(|s| {
        for (v, b) in values
            .chunks(per_thread)
            .zip(bytes.chunks_mut(per_thread * elem))
        {
            s.spawn(move || memory::write_f32(v, dtype, b));
        }
    });
}

/// The bytes of rank `rank`'s weights allocation.
pub fn weight_image(
    program: &Program,
    rank: usize,
    weights: &LayerWeights,
) -> Result<Vec<u8>, String> {
    let wl = &program.weights;
    let geo = &program.geometry;
    let mut image = vec![0u8; usize::try_from(wl.bytes).map_err(|_| "weights too large")?];
    let put = |image: &mut Vec<u8>, span: Span, values: &[f32], dtype: DType, what: &str| {
        let need = values.len() as u64 * dtype.bytes();
        if need != span.bytes {
            return Err(format!(
                "{what}: {} values in {} do not fill its {} bytes",
                values.len(),
                dtype.name(),
                span.bytes
            ));
        }
        let (a, b) = (span.offset as usize, span.end() as usize);
        convert_in_parallel(values, dtype, &mut image[a..b]);
        Ok(())
    };
    let dt = |name: &str| wl.dtypes.get(name).copied().unwrap_or(program.layer_dtype);
    put(
        &mut image,
        wl.router,
        &weights.router,
        dt("router_gate"),
        "the router",
    )?;
    if let Some(span) = wl.router_logit_bias {
        let b = weights
            .router_logit_bias
            .as_deref()
            .ok_or("the layer has a router logit bias but the weights lack it")?;
        put(&mut image, span, b, DType::F32, "the router logit bias")?;
    }
    if wl.router_bias.bytes > 0 {
        let b = weights
            .router_bias
            .as_deref()
            .ok_or("the layer has a selection bias but the weights lack it")?;
        put(
            &mut image,
            wl.router_bias,
            b,
            DType::F32,
            "the selection bias",
        )?;
    }
    if wl.shared_gate.bytes > 0 {
        let g = weights
            .shared_gate
            .as_deref()
            .ok_or("the layer has a shared gate but the weights lack it")?;
        put(&mut image, wl.shared_gate, g, DType::F32, "the shared gate")?;
    }
    let (mut ranks, mut locals) = (Vec::new(), Vec::new());
    for s in 0..geo.group {
        for e in 0..geo.experts {
            let (g, l) = geo.dest(s, e);
            ranks.push(g as f32);
            locals.push(l as f32);
        }
    }
    // i32 tables: written as i32 through the f32 path is exact for these
    // small integers.
    put(&mut image, wl.dest_rank, &ranks, DType::I32, "dest ranks")?;
    put(&mut image, wl.dest_local, &locals, DType::I32, "dest local")?;
    let ffn = |image: &mut Vec<u8>,
               spans: &super::program::FfnSpans,
               f: &Ffn,
               up_dt: DType,
               down_dt: DType,
               what: &str|
     -> Result<(), String> {
        let (up, up_bias, down, down_bias) = stacked(f);
        put(image, spans.up, &up, up_dt, what)?;
        put(image, spans.down, down, down_dt, what)?;
        match (spans.up_bias, up_bias) {
            (Some(s), Some(b)) => put(image, s, &b, DType::F32, what)?,
            (None, None) => {}
            _ => return Err(format!("{what}: the up bias and the plan disagree")),
        }
        match (spans.down_bias, down_bias) {
            (Some(s), Some(b)) => put(image, s, b, DType::F32, what)?,
            (None, None) => {}
            _ => return Err(format!("{what}: the down bias and the plan disagree")),
        }
        Ok(())
    };
    let me = program.me(rank);
    for (l, &e) in geo.experts_of[me].iter().enumerate() {
        let f = weights
            .experts
            .get(e)
            .ok_or_else(|| format!("no weights for expert {e}"))?;
        let spans = wl
            .experts
            .get(l)
            .ok_or_else(|| format!("no weight slot for local expert {l}"))?;
        ffn(
            &mut image,
            spans,
            f,
            dt("expert_up"),
            dt("expert_down"),
            &format!("expert {e}"),
        )?;
    }
    match (&wl.shared, &weights.shared) {
        (Some(spans), Some(f)) => ffn(
            &mut image,
            spans,
            f,
            dt("shared_up"),
            dt("shared_down"),
            "the shared experts",
        )?,
        (None, _) => {}
        (Some(_), None) => {
            return Err("the layer has shared experts but the weights lack them".into())
        }
    }
    Ok(image)
}

/// Pairs two run lists of equal total length into copies
/// `(source offset, destination offset, bytes)`, cutting at both lists'
/// boundaries (as `copy_runs` streams the bytes on the CPU).
pub fn pair_runs(src: &[Run], dst: &[Run]) -> Result<Vec<(u64, u64, u64)>, String> {
    let total_src: usize = src.iter().map(|r| r.len).sum();
    let total_dst: usize = dst.iter().map(|r| r.len).sum();
    if total_src != total_dst {
        return Err(format!(
            "{total_src} bytes sent but {total_dst} bytes expected"
        ));
    }
    let mut out = Vec::new();
    let (mut si, mut s_off) = (0usize, 0usize);
    for d in dst {
        let mut filled = 0;
        while filled < d.len {
            let Some(s) = src.get(si) else {
                return Err("ran out of send runs".into());
            };
            let take = (s.len - s_off).min(d.len - filled);
            if take > 0 {
                out.push((
                    (s.offset + s_off) as u64,
                    (d.offset + filled) as u64,
                    take as u64,
                ));
            }
            filled += take;
            s_off += take;
            if s_off == s.len {
                si += 1;
                s_off = 0;
            }
        }
    }
    Ok(out)
}

/// The byte runs EP rank `me` sends to and receives from each peer in a
/// collective, as the CPU backend's `collective_plan` computes them.
///
/// `padded` is the expert side's layout ([`Program::padded`]).
pub fn collective_runs(
    c: &CollectiveStep,
    group: usize,
    me: usize,
    table: Option<&RouteTable>,
    padded: usize,
) -> Result<(PeerRuns, PeerRuns), String> {
    match c.kind {
        CollectiveKind::CountExchange | CollectiveKind::AllGather => {
            let len = c.send.bytes as usize;
            Ok((
                (0..group).map(|_| vec![Run { offset: 0, len }]).collect(),
                (0..group)
                    .map(|p| {
                        vec![Run {
                            offset: p * len,
                            len,
                        }]
                    })
                    .collect(),
            ))
        }
        CollectiveKind::AllToAllRank => {
            let table = table.ok_or("the routing is used before `assign place` ran")?;
            // Token side: by destination; rank side: by source.
            let (mut to, mut from) = (Vec::with_capacity(group), Vec::with_capacity(group));
            for p in 0..group {
                let (token_side, rank_side) =
                    (table.rank_send_rows(me, p), table.rank_recv_rows(p, me));
                let (out, inc) = if c.dispatch {
                    (token_side, rank_side)
                } else {
                    (rank_side, token_side)
                };
                to.push(c.send_rows.runs(&[out], &c.send_name)?);
                from.push(c.recv_rows.runs(&[inc], &c.recv_name)?);
            }
            Ok((to, from))
        }
        CollectiveKind::AllToAll | CollectiveKind::AllToAllV => {
            let table = table.ok_or("the routing is used before `assign place` ran")?;
            let lmax = table.max_local();
            let mut to = Vec::with_capacity(group);
            let mut from = Vec::with_capacity(group);
            for p in 0..group {
                let (out_rows, in_rows): (Vec<Range<usize>>, Vec<Range<usize>>) = if c.dispatch {
                    (
                        (0..lmax).map(|l| table.send_rows(me, p, l)).collect(),
                        (0..lmax)
                            .map(|l| table.expert_side_rows(p, me, l, padded))
                            .collect(),
                    )
                } else {
                    (
                        (0..lmax)
                            .map(|l| table.expert_side_rows(p, me, l, padded))
                            .collect(),
                        (0..lmax).map(|l| table.send_rows(me, p, l)).collect(),
                    )
                };
                to.push(c.send_rows.runs(&out_rows, &c.send_name)?);
                from.push(c.recv_rows.runs(&in_rows, &c.recv_name)?);
            }
            Ok((to, from))
        }
    }
}

/// Uploads every local rank's weights.
pub fn upload_weights(
    program: &Program,
    target: &mut dyn Target,
    local: &[usize],
    weights: &LayerWeights,
) -> Result<(), ExecError> {
    for &r in local {
        let image = weight_image(program, r, weights).map_err(|e| err(r, None, e))?;
        target
            .write(
                Addr {
                    rank: r,
                    space: Space::Weights,
                    offset: 0,
                },
                &image,
            )
            .map_err(|e| err(r, None, e))?;
    }
    Ok(())
}

/// Runs one forward pass of `program` on the ranks `local` (global ranks,
/// ascending) with `inputs` (one `[tokens, hidden]` tensor per local rank).
///
/// A [`PassMode::Profiled`] pass puts a [`Command::Stamp`] before and after
/// every step (and every cuBLAS GEMM) on each rank's stream and returns
/// their device times in [`Pass::timings`]. It reads the routing back as
/// soon as it is queued rather than at its first use, so that no step's
/// interval holds the host's wait for it: its outputs are the same, its
/// [`Pass::seconds`] a little longer.
///
/// A [`PassMode::Capture`] pass forks every local rank's streams from the
/// first rank's first stream with an event, issues the program, joins them
/// back, and runs the recorded graph; a [`PassMode::Replay`] pass only
/// writes the inputs, clears the status blocks and runs the graph again.
/// Both need a plan that asks nothing of the host during the pass
/// ([`capturable`]).
pub fn run_pass(
    program: &Program,
    target: &mut dyn Target,
    local: &[usize],
    inputs: &[Vec<f32>],
    mode: PassMode,
) -> Result<Pass, ExecError> {
    let mut issuer = Issuer::new(program, target, local)?;
    if mode == PassMode::Profiled {
        issuer.marks = Some(Vec::new());
    }
    if matches!(mode, PassMode::Capture | PassMode::Replay) && !issuer.device_routed {
        return Err(ExecError {
            rank: None,
            op: None,
            message: not_capturable(program, local),
        });
    }
    issuer.mode = mode;
    issuer.run(inputs)
}

/// How far a backend's CUDA graph has come ([`graph_pass`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GraphStage {
    /// Nothing captured yet.
    #[default]
    Cold,
    /// The target holds the graph of a captured pass.
    Captured,
}

/// One pass as a CUDA graph. The first one runs an eager pass before it
/// captures (and runs) the graph: the first call of each cuBLAS handle and
/// the first launch of each kernel (module loading is lazy) then happen
/// outside the capture, where they may allocate or synchronise. Later ones
/// replay the graph. The pass returned is the captured or replayed one.
pub fn graph_pass(
    program: &Program,
    target: &mut dyn Target,
    local: &[usize],
    inputs: &[Vec<f32>],
    stage: &mut GraphStage,
) -> Result<Pass, ExecError> {
    if !capturable(program, local) {
        return Err(ExecError {
            rank: None,
            op: None,
            message: not_capturable(program, local),
        });
    }
    match stage {
        GraphStage::Captured => run_pass(program, target, local, inputs, PassMode::Replay),
        GraphStage::Cold => {
            run_pass(program, target, local, inputs, PassMode::Eager)?;
            let pass = run_pass(program, target, local, inputs, PassMode::Capture)?;
            *stage = GraphStage::Captured;
            Ok(pass)
        }
    }
}

/// Whether a pass of `program` on the ranks `local` can be captured in a
/// graph: a capacity plan (padded expert slots) without the hierarchical
/// all-to-all, whose EP groups are all among `local`, so that no step waits
/// for the routing on the host.
pub fn capturable(program: &Program, local: &[usize]) -> bool {
    program.padded > 0 && !program.hierarchical() && whole_groups(program, local)
}

/// Whether `local` (ascending) is whole EP groups, each rank of each.
fn whole_groups(p: &Program, local: &[usize]) -> bool {
    local.len() % p.group == 0
        && local
            .chunks(p.group)
            .all(|g| p.me(g[0]) == 0 && g.iter().enumerate().all(|(q, &r)| r == g[0] + q))
}

fn not_capturable(p: &Program, local: &[usize]) -> String {
    if p.geometry.by_rank {
        "a plan that dispatches by rank cannot run as a CUDA graph: the host lays its by-rank rows out from the routing it reads back during the pass (compile it with per-pick routing, as `--graph` does)".into()
    } else if p.hierarchical() {
        "a plan with the hierarchical all-to-all cannot run as a CUDA graph: the host lays each leg's rows out from the routing it reads back during the pass (compile it with the flat all-to-all, as `--graph` does, or `deny = [hierarchical_a2a]` in the schedule)".into()
    } else if p.padded == 0 {
        "only capacity plans can run as a CUDA graph: a dropless plan sizes its expert GEMMs from the routing, which the host reads back during the pass (give the layer a `capacity`)".into()
    } else {
        format!(
            "this process runs ranks {local:?} of EP groups of {}: a collective over NCCL needs the routing on the host, so only whole groups of virtual ranks run as a CUDA graph",
            p.group
        )
    }
}

/// A step's (or a GEMM's) stamps in a profiled pass.
struct Mark {
    rank: usize,
    op: usize,
    gemm: Option<(u64, u64, u64)>,
    start: u32,
    end: u32,
}

struct Issuer<'a> {
    p: &'a Program,
    t: &'a mut dyn Target,
    local: &'a [usize],
    /// Per local rank: the routing once read back; whether a read-back is queued.
    routes: Vec<Option<Routes>>,
    pending: Vec<bool>,
    collectives: u32,
    /// Profiled passes: the marks so far, and the next stamp's number.
    marks: Option<Vec<Mark>>,
    stamps: u32,
    /// The op of the step being issued.
    current_op: usize,
    /// Nothing of the pass needs the routing on the host: a capacity plan
    /// (padded expert slots) whose EP groups are all in this process. The
    /// routing is read once the pass is done, for the statistics.
    device_routed: bool,
    mode: PassMode,
    /// Per local rank: its `slots` table, read back at the first
    /// hierarchical leg that needs it.
    slots: Vec<Option<Vec<i32>>>,
    /// The routing of the rows each forwarder staged in the inter-node leg,
    /// by local rank index and staging span, for the intra-node leg.
    staged: BTreeMap<(usize, u64), Staged>,
    /// Dispatch by rank: per local rank, its by-rank send layout, laid out
    /// on the host from its routing and the gathered metadata.
    by_rank: Vec<Option<ByRank>>,
    /// The same staged routing by local rank index and chunk, for the
    /// by-rank combine legs (the forwarder sums and returns by it).
    rank_staged: BTreeMap<(usize, usize), Staged>,
}

impl<'a> Issuer<'a> {
    fn new(
        p: &'a Program,
        t: &'a mut dyn Target,
        local: &'a [usize],
    ) -> Result<Issuer<'a>, ExecError> {
        if let Some(&bad) = local.iter().find(|&&r| r >= p.ranks) {
            return Err(err(bad, None, format!("the plan has {} ranks", p.ranks)));
        }
        let device_routed = capturable(p, local);
        Ok(Issuer {
            p,
            t,
            local,
            routes: vec![None; local.len()],
            pending: vec![false; local.len()],
            slots: vec![None; local.len()],
            staged: BTreeMap::new(),
            by_rank: vec![None; local.len()],
            rank_staged: BTreeMap::new(),
            collectives: 0,
            marks: None,
            stamps: 0,
            current_op: 0,
            device_routed,
            mode: PassMode::Eager,
        })
    }

    fn op_label(&self, op: usize) -> Option<String> {
        self.p
            .ops
            .get(op)
            .map(|o| format!("op #{} `{}` on stream {}", o.id, o.name, o.stream))
    }

    fn run(mut self, inputs: &[Vec<f32>]) -> Result<Pass, ExecError> {
        let p = self.p;
        if inputs.len() != self.local.len() {
            return Err(ExecError {
                rank: None,
                op: None,
                message: format!(
                    "{} input tensors for {} ranks",
                    inputs.len(),
                    self.local.len()
                ),
            });
        }
        let per = p.geometry.tokens * p.hidden as usize;
        for (i, &r) in self.local.iter().enumerate() {
            let x = &inputs[i];
            if x.len() != per {
                return Err(err(
                    r,
                    None,
                    format!("the input holds {} values, {per} expected", x.len()),
                ));
            }
            if let Some(bad) = x.iter().position(|v| !v.is_finite()) {
                return Err(err(
                    r,
                    None,
                    format!("the input has a non-finite value at element {bad}"),
                ));
            }
            let mut bytes = vec![0u8; p.x.bytes as usize];
            memory::write_f32(x, p.x_dtype, &mut bytes);
            self.t
                .write(Addr::of(r, p.x), &bytes)
                .map_err(|e| err(r, None, e))?;
            let zeros = vec![0u8; p.work.status.bytes as usize];
            self.t
                .write(Addr::of(r, p.work.status), &zeros)
                .map_err(|e| err(r, None, e))?;
        }
        self.order_writes()?;
        let start = std::time::Instant::now();
        let graph_err = |e: String| ExecError {
            rank: None,
            op: None,
            message: format!("CUDA graph: {e}"),
        };
        match self.mode {
            PassMode::Replay => self.t.launch_graph().map_err(graph_err)?,
            PassMode::Capture => {
                let origin = self.local.first().copied().unwrap_or(0);
                self.t.begin_capture(origin, 0).map_err(graph_err)?;
                let issued = self
                    .fork_join(origin, true)
                    .and_then(|()| self.issue_steps())
                    .and_then(|()| self.fork_join(origin, false));
                if let Err(e) = issued {
                    // End the capture so the streams work again; the error
                    // that stopped it is the one to report.
                    let _ = self.t.end_capture();
                    return Err(e);
                }
                self.t.end_capture().map_err(graph_err)?;
                self.t.launch_graph().map_err(graph_err)?;
            }
            PassMode::Eager | PassMode::Profiled => self.issue_steps()?,
        }
        let local = self.local;
        self.t.synchronize().map_err(|e| ExecError {
            rank: None,
            op: None,
            message: e,
        })?;
        let seconds = start.elapsed().as_secs_f64();
        let timings = self.timings()?;
        if self.device_routed {
            // The routing, for the statistics (and its kernels' status).
            let span = p.work.readback();
            for (i, &r) in local.iter().enumerate() {
                let bytes = self
                    .t
                    .read(Addr::of(r, span), span.bytes)
                    .map_err(|e| err(r, None, e))?;
                self.routes[i] = Some(self.parse_routes(r, &bytes)?);
            }
        }
        let mut outputs = Vec::with_capacity(local.len());
        for &r in local {
            let status = self
                .t
                .read(Addr::of(r, p.work.status), p.work.status.bytes)
                .map_err(|e| err(r, None, e))?;
            self.check_status(r, &status, false)?;
            let bytes = self
                .t
                .read(Addr::of(r, p.out), p.out.bytes)
                .map_err(|e| err(r, None, e))?;
            let mut values = vec![0.0f32; (p.out.bytes / p.out_dtype.bytes()) as usize];
            memory::read_f32(&bytes, p.out_dtype, &mut values);
            values.truncate(per);
            outputs.push(values);
        }
        let mut stats = RoutingStats {
            routed_per_expert: vec![0; p.geometry.experts],
            ..RoutingStats::default()
        };
        for r in self.routes.iter().flatten() {
            for (acc, n) in stats.routed_per_expert.iter_mut().zip(&r.routed_per_expert) {
                *acc += n;
            }
            stats.dropped += r.dropped;
        }
        stats.assignments = stats.routed_per_expert.iter().sum();
        Ok(Pass {
            outputs,
            stats,
            seconds,
            timings,
        })
    }

    /// Issues every step of the program, in order.
    fn issue_steps(&mut self) -> Result<(), ExecError> {
        let p = self.p;
        for step in &p.steps {
            self.current_op = step.op;
            // The op's label only for an error (formatting it per step
            // would cost every pass).
            self.profiled_step(step.stream, &step.kind)
                .map_err(|mut e: ExecError| {
                    if e.op.is_none() {
                        e.op = self.op_label(step.op);
                    }
                    e
                })?;
        }
        Ok(())
    }

    /// Orders the host's writes (queued on each rank's stream 0, see
    /// [`Target::write`]) before everything the pass issues: eager and
    /// profiled passes fork every other stream of a rank from its stream 0
    /// by an event; a graph is launched on the first rank's stream 0, so
    /// that stream waits for every other rank's stream 0 (the capture's own
    /// fork then reaches every stream).
    fn order_writes(&mut self) -> Result<(), ExecError> {
        let local = self.local;
        let streams = self.p.streams;
        // An id neither the collectives (from 0 up) nor the capture's
        // fork and join (`u32::MAX - stream`) use.
        let written = |rank: usize| EventId {
            rank,
            id: u32::MAX - streams as u32,
            comm: true,
        };
        let origin = local.first().copied().unwrap_or(0);
        let graph = matches!(self.mode, PassMode::Capture | PassMode::Replay);
        for &r in local {
            let waiters: Vec<(usize, usize)> = if graph {
                if r == origin {
                    continue;
                }
                vec![(origin, 0)]
            } else {
                (1..streams).map(|s| (r, s)).collect()
            };
            if waiters.is_empty() {
                continue;
            }
            self.submit(r, 0, Command::Record(written(r)))?;
            for (rank, stream) in waiters {
                self.submit(rank, stream, Command::Wait(written(r)))?;
            }
        }
        Ok(())
    }

    /// Capture: every other stream of every local rank waits for an event
    /// of stream 0 of rank `origin` (`fork`), or stream 0 of `origin` waits
    /// for an event of every other stream (the join), so that one stream's
    /// capture takes in all of them.
    fn fork_join(&mut self, origin: usize, fork: bool) -> Result<(), ExecError> {
        let local = self.local;
        let streams = self.p.streams;
        // Ids no collective uses (theirs count up from 0).
        let event = |rank: usize, stream: usize| EventId {
            rank,
            id: u32::MAX - stream as u32,
            comm: true,
        };
        if fork {
            self.submit(origin, 0, Command::Record(event(origin, 0)))?;
        }
        for &r in local {
            for s in 0..streams {
                if (r, s) == (origin, 0) {
                    continue;
                }
                if fork {
                    self.submit(r, s, Command::Wait(event(origin, 0)))?;
                } else {
                    self.submit(r, s, Command::Record(event(r, s)))?;
                    self.submit(origin, 0, Command::Wait(event(r, s)))?;
                }
            }
        }
        Ok(())
    }

    /// Issues a step, between two stamps on every local rank's stream when
    /// profiling (events and read-backs are not timed).
    fn profiled_step(&mut self, stream: usize, kind: &StepKind) -> Result<(), ExecError> {
        if self.marks.is_none() || matches!(kind, StepKind::Record(_) | StepKind::Wait(_)) {
            return self.step(stream, kind);
        }
        if matches!(kind, StepKind::ReadRoute) {
            self.step(stream, kind)?;
            // Wait for the routing now, with nothing timed in flight.
            for i in 0..self.local.len() {
                if self.pending[i] {
                    self.routes(i)?;
                }
            }
            return Ok(());
        }
        let local = self.local;
        let mut starts = Vec::with_capacity(local.len());
        for &r in local {
            starts.push(self.stamp(r, stream)?);
        }
        self.step(stream, kind)?;
        for (&r, start) in local.iter().zip(starts) {
            self.close_mark(r, stream, start, None)?;
        }
        Ok(())
    }

    /// Queues the stamp that ends the interval from stamp `start` on
    /// `stream` of `rank`, and keeps the interval.
    fn close_mark(
        &mut self,
        rank: usize,
        stream: usize,
        start: u32,
        gemm: Option<(u64, u64, u64)>,
    ) -> Result<(), ExecError> {
        let end = self.stamp(rank, stream)?;
        let op = self.current_op;
        if let Some(marks) = self.marks.as_mut() {
            marks.push(Mark {
                rank,
                op,
                gemm,
                start,
                end,
            });
        }
        Ok(())
    }

    /// Queues the next stamp on `stream` of `rank` (profiled passes only).
    fn stamp(&mut self, rank: usize, stream: usize) -> Result<u32, ExecError> {
        let n = self.stamps;
        self.stamps += 1;
        self.submit(rank, stream, Command::Stamp(n))?;
        Ok(n)
    }

    /// The marks' device times (after the pass finished).
    fn timings(&mut self) -> Result<Vec<Timing>, ExecError> {
        let Some(marks) = self.marks.take() else {
            return Ok(Vec::new());
        };
        let at = self.t.stamp_seconds(self.stamps).map_err(|e| ExecError {
            rank: None,
            op: None,
            message: format!("reading the profile: {e}"),
        })?;
        let time = |i: u32| at.get(i as usize).copied().unwrap_or(0.0);
        Ok(marks
            .into_iter()
            .map(|m| Timing {
                rank: m.rank,
                op: m.op,
                gemm: m.gemm,
                start: time(m.start),
                seconds: (time(m.end) - time(m.start)).max(0.0),
            })
            .collect())
    }

    /// Turns the first failed status block into an error (only the
    /// assignment kernels' with `assign_only`).
    fn check_status(&self, rank: usize, status: &[u8], assign_only: bool) -> Result<(), ExecError> {
        for (i, slot) in self.p.status.iter().enumerate() {
            if assign_only && !slot.assign {
                continue;
            }
            let at = i * STATUS_BYTES as usize;
            let Some(words) = status.get(at..at + STATUS_BYTES as usize) else {
                continue;
            };
            let word = |w: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&words[w * 8..w * 8 + 8]);
                i64::from_le_bytes(b)
            };
            let code = word(0);
            if code == 0 {
                continue;
            }
            let message =
                describe_status(&slot.label, &slot.params, code, word(1), word(2), word(3));
            return Err(err(rank, self.op_label(slot.op), message));
        }
        Ok(())
    }

    /// The routing of local rank index `i`, read back at its first use.
    fn routes(&mut self, i: usize) -> Result<&Routes, ExecError> {
        let r = self.local[i];
        if self.routes[i].is_none() {
            if self.p.geometry.by_rank {
                self.by_rank_routes(i)?;
            }
            if self.routes[i].is_none() {
                if !self.pending[i] {
                    return Err(err(
                        r,
                        None,
                        "the routing is used before `assign place` ran",
                    ));
                }
                let bytes = self.t.fetch(r).map_err(|e| err(r, None, e))?;
                let routes = self.parse_routes(r, &bytes)?;
                self.routes[i] = Some(routes);
            }
            self.check_row_bounds(i)?;
        }
        self.routes[i]
            .as_ref()
            .ok_or_else(|| err(r, None, "the routing is missing"))
    }

    /// The routing just read back must fit the plan's bounded buffers. The
    /// tables are the whole group's, so one check covers every member, and
    /// it comes before any routing-dependent step moves a row.
    fn check_row_bounds(&self, i: usize) -> Result<(), ExecError> {
        let r = self.local[i];
        let Some(routes) = self.routes[i].as_ref() else {
            return Err(err(r, None, "the routing is missing"));
        };
        let need = row_need(&routes.tables);
        let have = self.p.row_bounds;
        if !need.exceeds(have) {
            return Ok(());
        }
        Err(err(
            r,
            None,
            format!(
                "the routing of this pass needs {} expert rows ({} by-rank rows) of one rank in a chunk, \
                 the plan's buffers hold {} ({}): the CUDA backend does not grow a dropless plan's \
                 buffers yet (the CPU backend does); build the layer with a larger `headroom`, or \
                 `headroom = worst_case`, in its schedule section",
                need.expert_rows, need.rank_rows, have.expert_rows, have.rank_rows
            ),
        ))
    }

    /// The routing in rank `r`'s read-back bytes (status blocks, table,
    /// statistics), after checking the assignment kernels' status.
    fn parse_routes(&self, r: usize, bytes: &[u8]) -> Result<Routes, ExecError> {
        let p = self.p;
        let status_len = p.work.status.bytes as usize;
        let rel = |s: Span| (s.offset - p.work.status.offset) as usize;
        let (t0, s0) = (rel(p.work.table), rel(p.work.stats));
        if bytes.len() < s0 + p.work.stats.bytes as usize {
            return Err(err(r, None, "the routing read back is short"));
        }
        self.check_status(r, &bytes[..status_len], true)?;
        p.route
            .parse(
                &bytes[t0..t0 + p.work.table.bytes as usize],
                &bytes[s0..s0 + p.work.stats.bytes as usize],
            )
            .map_err(|e| err(r, None, e))
    }

    /// Dispatch by rank: reads back local rank index `i`'s routing (tables,
    /// statistics, its expert ids and weights, and the group's gathered
    /// assignment metadata) and lays its by-rank rows out with the CPU
    /// backend's `assign_place`: the tables gain their by-rank counts, the
    /// rank its by-rank send layout. The gathered metadata is all it needs
    /// of the other ranks, so the rank's process need not hold them (NCCL).
    /// The device's per-pick counts must agree with the host's.
    fn by_rank_routes(&mut self, i: usize) -> Result<(), ExecError> {
        let p = self.p;
        let r = self.local[i];
        if !self.pending[i] {
            return Err(err(
                r,
                None,
                "the routing is used before `assign place` ran",
            ));
        }
        let bytes = self.t.fetch(r).map_err(|e| err(r, None, e))?;
        let on_device = self.parse_routes(r, &bytes)?;
        let own = self.parse_routing(r, &bytes)?;
        let routing = Routing {
            ids: &own.ids,
            weights: &own.weights,
        };
        let placement = assign_place(&p.geometry, p.me(r), &routing, &own.meta_all)
            .map_err(|e| err(r, None, e))?;
        if let Some(c) = (0..placement.tables.len())
            .find(|&c| !same_counts(&placement.tables[c], on_device.tables.get(c)))
        {
            return Err(err(
                r,
                None,
                format!("the device's routing table of chunk {c} disagrees with the host's layout of the same routing"),
            ));
        }
        self.routes[i] = Some(Routes {
            tables: placement.tables,
            routed_per_expert: on_device.routed_per_expert,
            dropped: on_device.dropped,
        });
        self.by_rank[i] = placement.by_rank;
        Ok(())
    }

    /// The expert ids, the weights and the group's gathered metadata in
    /// rank `r`'s read-back bytes (dispatch by rank: copied beside the table
    /// after `assign_place`).
    fn parse_routing(&self, r: usize, bytes: &[u8]) -> Result<OwnRouting, ExecError> {
        let p = self.p;
        let part = |s: Span| {
            let at = (s.offset - p.work.status.offset) as usize;
            bytes
                .get(at..at + s.bytes as usize)
                .ok_or_else(|| err(r, None, "the routing read back is short"))
        };
        let ids = memory::read_i32s(part(p.work.routing_ids)?);
        let weights = memory::read_f32s(part(p.work.routing_weights)?);
        let meta_all = memory::read_i32s(part(p.work.routing_meta)?);
        Ok(OwnRouting {
            ids,
            weights,
            meta_all,
        })
    }

    fn table(&mut self, i: usize, chunk: usize) -> Result<RouteTable, ExecError> {
        let r = self.local[i];
        self.routes(i)?
            .tables
            .get(chunk)
            .cloned()
            .ok_or_else(|| err(r, None, format!("no routing table for chunk {chunk}")))
    }

    fn submit(&mut self, rank: usize, stream: usize, cmd: Command) -> Result<(), ExecError> {
        self.t
            .submit(rank, stream, cmd)
            .map_err(|e| err(rank, None, e))
    }

    fn step(&mut self, stream: usize, kind: &StepKind) -> Result<(), ExecError> {
        let local = self.local;
        match kind {
            StepKind::Record(e) | StepKind::Wait(e) => {
                for &r in local {
                    let id = EventId {
                        rank: r,
                        id: *e,
                        comm: false,
                    };
                    let cmd = if matches!(kind, StepKind::Record(_)) {
                        Command::Record(id)
                    } else {
                        Command::Wait(id)
                    };
                    self.submit(r, stream, cmd)?;
                }
            }
            StepKind::Memset { span, value } => {
                for &r in local {
                    let cmd = Command::Memset {
                        dst: Addr::of(r, *span),
                        bytes: span.bytes,
                        value: *value,
                    };
                    self.submit(r, stream, cmd)?;
                }
            }
            StepKind::Launch(l) => {
                for i in 0..local.len() {
                    self.launch(i, stream, l)?;
                }
            }
            StepKind::Gemm(g) => {
                for i in 0..local.len() {
                    self.gemm(i, stream, g)?;
                }
            }
            StepKind::Collective(c) => self.collective(stream, c)?,
            StepKind::Copy { src, dst } => {
                for &r in local {
                    let cmd = Command::Copy {
                        src: Addr::of(r, *src),
                        dst: Addr::of(r, *dst),
                        bytes: src.bytes,
                    };
                    self.submit(r, stream, cmd)?;
                }
            }
            StepKind::ByRank(b) => {
                for i in 0..local.len() {
                    self.by_rank_step(i, stream, *b)?;
                }
            }
            StepKind::ReadRoute if self.device_routed => {}
            StepKind::ReadRoute => {
                let span = self.p.work.readback();
                for (i, &r) in local.iter().enumerate() {
                    self.submit(
                        r,
                        stream,
                        Command::ReadBack {
                            src: Addr::of(r, span),
                            bytes: span.bytes,
                        },
                    )?;
                    self.pending[i] = true;
                    self.routes[i] = None;
                    self.slots[i] = None;
                }
            }
        }
        Ok(())
    }

    fn rows(&mut self, i: usize, rows: Rows) -> Result<u64, ExecError> {
        let me = self.p.me(self.local[i]);
        Ok(match rows {
            Rows::Fixed(n) => n,
            // Without the routing on the host: every row the buffers hold
            // (the rows past the routed ones are never sent nor combined).
            Rows::Sent(_, max) if self.device_routed => max,
            Rows::Sent(c, _) => self.table(i, c)?.sent(me) as u64,
            // Padded expert slots: every slot.
            Rows::Received(_, max) if self.p.padded > 0 => max,
            Rows::Received(c, _) => self.table(i, c)?.received(me) as u64,
            Rows::RankSent(c, _) => self.table(i, c)?.rank_sent(me) as u64,
            Rows::RankReceived(c, _) => self.table(i, c)?.rank_received(me) as u64,
        })
    }

    /// What the host computes of a dispatch by rank for local rank index
    /// `i` ([`ByRankStep`]), uploaded on `stream`.
    fn by_rank_step(&mut self, i: usize, stream: usize, step: ByRankStep) -> Result<(), ExecError> {
        let p = self.p;
        let geo = &p.geometry;
        let r = self.local[i];
        let me = p.me(r);
        self.routes(i)?;
        let missing = |what: &str| err(r, None, format!("the by-rank layout lacks {what}"));
        match step {
            ByRankStep::Source {
                chunk,
                rank_slots,
                picks,
            } => {
                let by_rank = self.by_rank[i]
                    .as_ref()
                    .ok_or_else(|| missing("this rank"))?;
                let tokens = geo.chunk_range(chunk);
                let slots = by_rank
                    .rank_slots
                    .get(tokens.start * p.group..tokens.end * p.group)
                    .ok_or_else(|| missing("the chunk's slots"))?;
                let meta = by_rank
                    .meta
                    .get(chunk)
                    .ok_or_else(|| missing("the chunk's picks"))?;
                let (slots, meta) = (ints_le(slots), ints_le(meta));
                self.upload(r, stream, rank_slots, slots, "the by-rank slots")?;
                self.upload(r, stream, picks, meta, "the by-rank picks")
            }
            ByRankStep::Frame { chunk } => {
                let table = self.table(i, chunk)?;
                let frame = table.expand_frame(me).map_err(|e| err(r, None, e))?;
                let len = expand_frame_len(p.group, table.max_local()) as u64 * 4;
                let span = p
                    .work
                    .expand_frame
                    .sub(chunk as u64 * len, len, "the expansion frames")
                    .map_err(|e| err(r, None, e))?;
                self.upload(r, stream, span, ints_le(&frame), "the expansion frame")
            }
        }
    }

    /// Queues `bytes` for `span` of rank `r` on `stream` (nothing when empty).
    fn upload(
        &mut self,
        r: usize,
        stream: usize,
        span: Span,
        bytes: Vec<u8>,
        what: &str,
    ) -> Result<(), ExecError> {
        if bytes.len() as u64 > span.bytes {
            return Err(err(
                r,
                None,
                format!(
                    "{what}: {} bytes do not fit the buffer's {} bytes",
                    bytes.len(),
                    span.bytes
                ),
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let dst = Addr::of(r, span);
        self.submit(r, stream, Command::Upload { dst, bytes })
    }

    fn launch(&mut self, i: usize, stream: usize, l: &LaunchStep) -> Result<(), ExecError> {
        let r = self.local[i];
        let rows = self.rows(i, l.rows)?;
        if rows == 0 {
            return Ok(());
        }
        let me = self.p.me(r) as i64;
        let args = l
            .args
            .iter()
            .map(|a| match *a {
                ArgT::Buf { span, len } => Arg::Buf {
                    addr: Addr::of(r, span),
                    len,
                },
                ArgT::F32(v) => Arg::F32(v),
                ArgT::I64(v) => Arg::I64(v),
                ArgT::Me => Arg::I64(me),
            })
            .collect();
        let cmd = self.launch_cmd(r, stream, l.kernel, args, rows, l.status)?;
        self.submit(r, stream, cmd)
    }

    /// The workspace of `stream` (rank `r` names a failure).
    fn stream_work(&self, r: usize, stream: usize) -> Result<StreamWork, ExecError> {
        self.p
            .work
            .streams
            .get(stream)
            .copied()
            .ok_or_else(|| err(r, None, format!("no workspace for stream {stream}")))
    }

    fn launch_cmd(
        &self,
        r: usize,
        stream: usize,
        kernel: KernelRef,
        args: Vec<Arg>,
        rows: u64,
        status: usize,
    ) -> Result<Command, ExecError> {
        let p = self.p;
        let scratch = p.scratch_per_thread(kernel) > 0;
        let (grid, block) = launch_shape(rows, p.shape(kernel));
        let status = Addr::of(r, p.work.status).plus(status as u64 * STATUS_BYTES);
        let scratch = if scratch {
            Some(Addr::of(r, self.stream_work(r, stream)?.scratch))
        } else {
            None
        };
        Ok(Command::Launch {
            kernel,
            args,
            rows,
            grid,
            block,
            status,
            scratch,
        })
    }

    fn gemm(&mut self, i: usize, stream: usize, g: &GemmStep) -> Result<(), ExecError> {
        let r = self.local[i];
        let groups = self.gemm_groups(i, g)?;
        let (a_elem, c_elem) = (g.a_dtype.bytes(), g.c_dtype.bytes());
        let received = self.received_by_rank(i, g)?;
        let buf = |s: Span, elem: u64| Arg::Buf {
            addr: Addr::of(r, s),
            len: s.bytes / elem,
        };
        if let Some(x) = g.gather {
            let args = vec![
                buf(x.rows, a_elem),
                buf(x.index, 4),
                buf(x.weights, 4),
                buf(g.a, a_elem),
            ];
            self.launch_generated((r, stream), x.kernel, args, received, g.status)?;
        }
        // Equal slots and evenly spaced weights: one strided-batched GEMM,
        // then each expert's epilogue.
        let batched = self.batched_gemm(r, g, &groups)?;
        let is_batched = batched.is_some();
        if let (Some(cmd), Some(&(_, m, _))) = (batched, groups.first()) {
            let rows = m * groups.len() as u64;
            self.submit_gemm(r, stream, cmd, (rows, g.n, g.k))?;
        }
        // The reducing tail writes the by-rank rows after every group.
        let reduces = matches!(g.tail, Tail::Reduce { .. });
        for (start, m, slot) in groups {
            if m == 0 {
                continue;
            }
            let c_rows = if reduces { (0, 0) } else { (start, m) };
            let a =
                g.a.sub(start * g.k * a_elem, m * g.k * a_elem, "the GEMM input")
                    .and_then(|a| {
                        g.c.sub(
                            c_rows.0 * g.out_cols * c_elem,
                            c_rows.1 * g.out_cols * c_elem,
                            "the GEMM output",
                        )
                        .map(|c| (a, c))
                    });
            let (a, c) =
                a.map_err(|e| err(r, None, format!("GEMM rows {start}..{}: {e}", start + m)))?;
            let (w, bias) = self
                .gemm_weights(g.weight, slot)
                .map_err(|e| err(r, None, e))?;
            let acc = g
                .acc
                .sub(start * g.n * 4, m * g.n * 4, "the GEMM accumulator")
                .map_err(|e| err(r, None, e))?;
            let product = if g.tail == Tail::Direct { c } else { acc };
            if !is_batched {
                let cmd = Command::Gemm {
                    a: Addr::of(r, a),
                    w: Addr::of(r, w),
                    c: Addr::of(r, product),
                    dtype: g.a_dtype,
                    m,
                    n: g.n,
                    k: g.k,
                };
                self.submit_gemm(r, stream, cmd, (m, g.n, g.k))?;
            }
            let bias_arg = match bias {
                Some(b) => buf(b, 4),
                None => Arg::Buf {
                    addr: Addr::of(r, w),
                    len: 0,
                },
            };
            self.group_tail((r, stream), g, (start, m), (acc, c, bias_arg))?;
        }
        if let Tail::Reduce {
            store,
            kernel,
            index,
            weights,
        } = g.tail
        {
            let product = if store.is_some() { g.biased } else { g.acc };
            let args = vec![
                buf(product, 4),
                buf(index, 4),
                buf(weights, 4),
                buf(g.c, c_elem),
            ];
            self.launch_generated((r, stream), kernel, args, received, g.status)?;
        }
        Ok(())
    }

    /// A GEMM's row groups: (first row, rows, local expert slot).
    fn gemm_groups(
        &mut self,
        i: usize,
        g: &GemmStep,
    ) -> Result<Vec<(u64, u64, Option<usize>)>, ExecError> {
        let p = self.p;
        let me = p.me(self.local[i]);
        Ok(match g.groups {
            Groups::Fixed(rows) => vec![(0, rows, None)],
            // Padded slots and no routing on the host: every slot in full.
            Groups::Experts(_) if self.device_routed => (0..p.geometry.local_experts(me))
                .map(|l| (l as u64 * p.padded, p.padded, Some(l)))
                .collect(),
            Groups::Experts(c) => {
                let table = self.table(i, c)?;
                let padded = p.padded as usize;
                (0..p.geometry.local_experts(me))
                    .map(|l| {
                        (
                            table.slot_start(me, l, padded) as u64,
                            table.expert_rows(me, l) as u64,
                            Some(l),
                        )
                    })
                    .collect()
            }
        })
    }

    /// The by-rank rows local rank `i` received in the GEMM's chunk, when
    /// the GEMM goes through the expansion index (0 otherwise): the rows
    /// its gather or reduction covers.
    fn received_by_rank(&mut self, i: usize, g: &GemmStep) -> Result<u64, ExecError> {
        let r = self.local[i];
        let me = self.p.me(r);
        let fused = g.gather.is_some() || matches!(g.tail, Tail::Reduce { .. });
        match g.groups {
            _ if !fused => Ok(0),
            Groups::Experts(c) if !self.device_routed => {
                Ok(self.table(i, c)?.rank_received(me) as u64)
            }
            _ => Err(err(
                r,
                None,
                format!(
                    "`{}`: a GEMM through the expansion index needs the routing on the host",
                    g.label
                ),
            )),
        }
    }

    /// The tail of one row group of a GEMM (rows `start..start + m`): the
    /// store, the activation, or the bias before a reduction.
    fn group_tail(
        &mut self,
        (r, stream): (usize, usize),
        g: &GemmStep,
        (start, m): (u64, u64),
        (acc, c, bias_arg): (Span, Span, Arg),
    ) -> Result<(), ExecError> {
        let buf = |s: Span, elem: u64| Arg::Buf {
            addr: Addr::of(r, s),
            len: s.bytes / elem,
        };
        let c_elem = g.c_dtype.bytes();
        // The second accumulator of these rows (sized only for GEMMs with a
        // bias before an activation or a reduction).
        let biased = || {
            g.biased
                .sub(start * g.n * 4, m * g.n * 4, "the biased accumulator")
                .map_err(|e| err(r, None, e))
        };
        match g.tail {
            Tail::Direct | Tail::Reduce { store: None, .. } => Ok(()),
            Tail::Store { kernel } => {
                let args = vec![buf(acc, 4), bias_arg, buf(c, c_elem)];
                self.launch_generated((r, stream), kernel, args, m, g.status)
            }
            Tail::Reduce { store: Some(s), .. } => {
                let args = vec![buf(acc, 4), bias_arg, buf(biased()?, 4)];
                self.launch_generated((r, stream), s, args, m, g.status)
            }
            Tail::Activation {
                store,
                kernel,
                limit,
            } => {
                let input = match store {
                    Some(s) => {
                        let biased = biased()?;
                        let args = vec![buf(acc, 4), bias_arg, buf(biased, 4)];
                        self.launch_generated((r, stream), s, args, m, g.status)?;
                        biased
                    }
                    None => acc,
                };
                let args = vec![buf(input, 4), buf(c, c_elem), Arg::F32(limit)];
                self.launch_generated((r, stream), kernel, args, m, g.status)
            }
        }
    }

    /// Launches generated kernel `kernel` over `rows` rows on `stream` of
    /// rank `r`.
    fn launch_generated(
        &mut self,
        (r, stream): (usize, usize),
        kernel: usize,
        args: Vec<Arg>,
        rows: u64,
        status: usize,
    ) -> Result<(), ExecError> {
        let cmd = self.launch_cmd(r, stream, KernelRef::Generated(kernel), args, rows, status)?;
        self.submit(r, stream, cmd)
    }

    /// Submits a cuBLAS GEMM command of shape `(m, n, k)` (all of a batch's
    /// rows in `m`), between two stamps when profiling.
    fn submit_gemm(
        &mut self,
        r: usize,
        stream: usize,
        cmd: Command,
        shape: (u64, u64, u64),
    ) -> Result<(), ExecError> {
        let timed = if self.marks.is_some() {
            Some(self.stamp(r, stream)?)
        } else {
            None
        };
        self.submit(r, stream, cmd)?;
        match timed {
            Some(start) => self.close_mark(r, stream, start, Some(shape)),
            None => Ok(()),
        }
    }

    /// The strided-batched GEMM of `groups`, when they are experts' slots
    /// of equal rows one after the other (padded capacity plans) and their
    /// weights lie evenly spaced; `None` otherwise.
    fn batched_gemm(
        &self,
        r: usize,
        g: &GemmStep,
        groups: &[(u64, u64, Option<usize>)],
    ) -> Result<Option<Command>, ExecError> {
        if !self.device_routed || groups.len() < 2 {
            return Ok(None);
        }
        let &(first, m, _) = &groups[0];
        let even_rows = groups.iter().enumerate().all(|(i, &(start, rows, slot))| {
            rows == m && start == first + i as u64 * m && slot == Some(i)
        });
        if !even_rows || m == 0 {
            return Ok(None);
        }
        let weights = groups
            .iter()
            .map(|&(_, _, slot)| self.gemm_weights(g.weight, slot).map(|(w, _)| w))
            .collect::<Result<Vec<Span>, String>>()
            .map_err(|e| err(r, None, e))?;
        let step = |a: &Span, b: &Span| b.offset.checked_sub(a.offset).filter(|&d| d > 0);
        let stride_w = step(&weights[0], &weights[1]).unwrap_or(0);
        let even_weights = stride_w > 0
            && weights
                .windows(2)
                .all(|w| step(&w[0], &w[1]) == Some(stride_w) && w[1].space == w[0].space);
        if !even_weights {
            return Ok(None);
        }
        let a_elem = g.a_dtype.bytes();
        let batch = groups.len() as u64;
        let total = m * batch;
        let a =
            g.a.sub(first * g.k * a_elem, total * g.k * a_elem, "the GEMM input")
                .map_err(|e| err(r, None, e))?;
        // The product: the output itself (`f32`, no epilogue) or the
        // stream's accumulator, `n` columns of `f32` either way.
        let product = if g.tail == Tail::Direct {
            g.c.sub(first * g.n * 4, total * g.n * 4, "the GEMM output")
        } else {
            g.acc
                .sub(first * g.n * 4, total * g.n * 4, "the GEMM accumulator")
        }
        .map_err(|e| err(r, None, e))?;
        Ok(Some(Command::GemmBatched {
            a: Addr::of(r, a),
            w: Addr::of(r, weights[0]),
            c: Addr::of(r, product),
            dtype: g.a_dtype,
            m,
            n: g.n,
            k: g.k,
            batch,
            strides: (m * g.k * a_elem, stride_w, m * g.n * 4),
        }))
    }

    /// The weight matrix and bias of a GEMM (of local expert `slot`).
    fn gemm_weights(
        &self,
        w: GemmWeight,
        slot: Option<usize>,
    ) -> Result<(Span, Option<Span>), String> {
        let wl = &self.p.weights;
        let ffn = |f: Option<&super::program::FfnSpans>, up: bool| {
            let f = f.ok_or("no weights for this GEMM")?;
            Ok(if up {
                (f.up, f.up_bias)
            } else {
                (f.down, f.down_bias)
            })
        };
        match w {
            GemmWeight::RouterGate => Ok((wl.router, wl.router_logit_bias)),
            GemmWeight::SharedUp => ffn(wl.shared.as_ref(), true),
            GemmWeight::SharedDown => ffn(wl.shared.as_ref(), false),
            GemmWeight::ExpertUp => ffn(slot.and_then(|l| wl.experts.get(l)), true),
            GemmWeight::ExpertDown => ffn(slot.and_then(|l| wl.experts.get(l)), false),
        }
    }

    fn collective(&mut self, stream: usize, c: &CollectiveStep) -> Result<(), ExecError> {
        let p = self.p;
        let group = p.group;
        let ordinal = self.collectives;
        self.collectives += 1;
        let local = self.local;
        // The local ranks by EP group: a whole group is virtual ranks.
        let mut at = 0;
        while at < local.len() {
            let base = local[at] - p.me(local[at]);
            let end = at + local[at..].partition_point(|r| *r < base + group);
            if c.scope != CollectiveScope::EpGroup {
                let members = hier_legs::Members::new(p, local, at..end);
                self.hierarchical(stream, c, &members, ordinal)?;
            } else if end - at == group {
                if let Some(status) = c.status {
                    self.virtual_route_copy(stream, c, &local[at..end], ordinal, status)?;
                } else {
                    let runs = (at..end)
                        .map(|i| self.runs(i, c))
                        .collect::<Result<Vec<_>, _>>()?;
                    self.virtual_exchange(stream, c, &runs, ordinal)?;
                }
            } else {
                for i in at..end {
                    let (r, to, from) = self.runs(i, c)?;
                    self.nccl_exchange(stream, c, r, base, &to, &from)?;
                }
            }
            at = end;
        }
        Ok(())
    }

    /// The byte runs local rank index `i` sends and receives in `c`.
    fn runs(
        &mut self,
        i: usize,
        c: &CollectiveStep,
    ) -> Result<(usize, PeerRuns, PeerRuns), ExecError> {
        let p = self.p;
        let r = self.local[i];
        let table = match c.kind {
            CollectiveKind::AllToAll | CollectiveKind::AllToAllV | CollectiveKind::AllToAllRank => {
                Some(self.table(i, c.chunk)?)
            }
            _ => None,
        };
        let (to, from) = collective_runs(c, p.group, p.me(r), table.as_ref(), p.padded as usize)
            .map_err(|e| err(r, None, e))?;
        Ok((r, to, from))
    }

    /// An all-to-all between the virtual ranks `ranks` (a whole EP group):
    /// every rank pulls the rows each peer has for it with one `route_copy`
    /// launch per peer on its own stream, which finds the rows by the
    /// routing table on the device, between the events of
    /// [`Issuer::pull_from_peers`].
    fn virtual_route_copy(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        ranks: &[usize],
        ordinal: u32,
        status: usize,
    ) -> Result<(), ExecError> {
        let p = self.p;
        let padded = p.padded;
        let chunk_tokens = p.geometry.chunk_tokens as u64;
        let unit_rows = if padded > 0 {
            chunk_tokens.min(padded)
        } else {
            chunk_tokens
        };
        let rows = unit_rows * p.route.max_local as u64;
        let (scale_bytes, src_scales, dst_scales) = match (c.send_rows.scales, c.recv_rows.scales) {
            (Some((sb, per)), Some((db, _))) => (per, sb, db),
            _ => (0, 0, 0),
        };
        let whole = |r: usize, span: Span, elem: u64| Arg::Buf {
            addr: Addr::of(r, span),
            len: span.bytes / elem,
        };
        let int = |v: u64| Arg::I64(i64::try_from(v).unwrap_or(i64::MAX));
        self.pull_from_peers(stream, ranks, ordinal, |issuer, q, peer| {
            let (r, from) = (ranks[q], ranks[peer]);
            let args = vec![
                whole(from, c.send, 1),
                whole(r, c.recv, 1),
                whole(r, p.work.table, 4),
                whole(r, p.work.send_off, 4),
                whole(r, p.work.recv_off, 4),
                int(p.group as u64),
                int(q as u64),
                int(peer as u64),
                int(c.chunk as u64),
                int(p.route.max_local as u64),
                int(u64::from(c.dispatch)),
                int(unit_rows),
                int(c.send_rows.row_bytes),
                int(scale_bytes),
                int(src_scales),
                int(dst_scales),
            ];
            let cmd = Command::Launch {
                kernel: KernelRef::Native(NativeKernel::RouteCopy),
                args,
                rows,
                grid: u32::try_from(rows.clamp(1, ROUTE_COPY_GRID)).unwrap_or(1),
                block: ROUTE_COPY_BLOCK,
                status: Addr::of(r, p.work.status).plus(status as u64 * STATUS_BYTES),
                scratch: None,
            };
            issuer.submit(r, stream, cmd)
        })
    }

    /// A collective between virtual ranks of this process: every rank pulls
    /// its peers' runs into its receive buffer with device-to-device copies
    /// on its own stream, after every peer reached the collective (its send
    /// buffer is written, its receive buffer free), and goes on only when
    /// every peer has pulled from it (so it may reuse its send buffer).
    fn virtual_exchange(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        members: &[(usize, PeerRuns, PeerRuns)],
        ordinal: u32,
    ) -> Result<(), ExecError> {
        let ranks: Vec<usize> = members.iter().map(|m| m.0).collect();
        self.pull_from_peers(stream, &ranks, ordinal, |issuer, q, p| {
            let ((r, _, from), (peer, to, _)) = (&members[q], &members[p]);
            let copies = pair_runs(&to[q], &from[p])
                .map_err(|e| err(*r, None, format!("from EP rank {p}: {e}")))?;
            for (s, d, bytes) in copies {
                let src = Addr::of(*peer, c.send).plus(s);
                let dst = Addr::of(*r, c.recv).plus(d);
                issuer.submit(*r, stream, Command::Copy { src, dst, bytes })?;
            }
            Ok(())
        })
    }

    /// The events around a collective between the virtual ranks `ranks` (a
    /// whole EP group), each on its own `stream`: every rank records
    /// *arrive* (its send buffer is written, its receive buffer free); then,
    /// for each peer `p` in turn, it waits for the peer's *arrive* and
    /// `pull(self, q, p)` issues what rank `q` takes from it; it records
    /// *done*, and goes on only when every peer is done (no rank reuses its
    /// send buffer while a peer still reads it).
    fn pull_from_peers(
        &mut self,
        stream: usize,
        ranks: &[usize],
        ordinal: u32,
        mut pull: impl FnMut(&mut Self, usize, usize) -> Result<(), ExecError>,
    ) -> Result<(), ExecError> {
        let (arrive, done) = collective_events(ordinal);
        for &r in ranks {
            self.submit(r, stream, Command::Record(arrive(r)))?;
        }
        for (q, &r) in ranks.iter().enumerate() {
            for (p, &peer) in ranks.iter().enumerate() {
                if p != q {
                    self.submit(r, stream, Command::Wait(arrive(peer)))?;
                }
                pull(self, q, p)?;
            }
            self.submit(r, stream, Command::Record(done(r)))?;
        }
        for (q, &r) in ranks.iter().enumerate() {
            for (p, &peer) in ranks.iter().enumerate() {
                if p != q {
                    self.submit(r, stream, Command::Wait(done(peer)))?;
                }
            }
        }
        Ok(())
    }

    /// A collective with peers in other processes: NCCL sends and receives
    /// of the same runs (each pair of ranks cuts its bytes at the same
    /// boundaries: one run per local expert, then the fp8 scales), the
    /// rank's own share copied locally.
    fn nccl_exchange(
        &mut self,
        stream: usize,
        c: &CollectiveStep,
        r: usize,
        base: usize,
        to: &[Vec<Run>],
        from: &[Vec<Run>],
    ) -> Result<(), ExecError> {
        let me = self.p.me(r);
        let (mut sends, mut recvs) = (Vec::new(), Vec::new());
        for (p, (out, inc)) in to.iter().zip(from).enumerate() {
            if p == me {
                for (s, d, bytes) in pair_runs(out, inc).map_err(|e| err(r, None, e))? {
                    let src = Addr::of(r, c.send).plus(s);
                    let dst = Addr::of(r, c.recv).plus(d);
                    self.submit(r, stream, Command::Copy { src, dst, bytes })?;
                }
                continue;
            }
            for run in out {
                sends.push((
                    base + p,
                    Addr::of(r, c.send).plus(run.offset as u64),
                    run.len as u64,
                ));
            }
            for run in inc {
                recvs.push((
                    base + p,
                    Addr::of(r, c.recv).plus(run.offset as u64),
                    run.len as u64,
                ));
            }
        }
        self.submit(r, stream, Command::Nccl { sends, recvs })
    }
}

/// What a rank of a by-rank plan reads back besides its table: its own
/// routing (`[tokens, k]` expert ids and weights) and the group's gathered
/// assignment metadata.
struct OwnRouting {
    ids: Vec<i32>,
    weights: Vec<f32>,
    meta_all: Vec<i32>,
}

/// Ascending row numbers as ranges of consecutive rows.
fn merged(rows: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for &r in rows {
        match out.last_mut() {
            Some(last) if last.end == r => last.end = r + 1,
            _ => out.push(r..r + 1),
        }
    }
    out
}

/// The forwarder sum's index: `width` part rows per staged token, `-1`
/// past its parts; every part inside the `parts` rows staged.
fn parts_index(sums: &[Vec<usize>], width: usize, parts: u64) -> Result<Vec<i32>, String> {
    let mut index = vec![-1i32; sums.len() * width];
    for (k, list) in sums.iter().enumerate() {
        if list.len() > width {
            return Err(format!(
                "staged row {k} adds {} parts, more than the {width} ranks of a node",
                list.len()
            ));
        }
        for (j, &part) in list.iter().enumerate() {
            index[k * width + j] = i32::try_from(part)
                .ok()
                .filter(|&v| (v as u64) < parts)
                .ok_or_else(|| format!("part row {part} lies beyond the {parts} rows staged"))?;
        }
    }
    Ok(index)
}

/// `i32` values as little-endian bytes.
fn ints_le(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Whether the host's table of a chunk counts the same per-pick rows as the
/// device's (which has no by-rank counts).
fn same_counts(host: &RouteTable, device: Option<&RouteTable>) -> bool {
    let Some(device) = device else {
        return false;
    };
    let (g, lmax) = (host.group(), host.max_local());
    g == device.group()
        && lmax == device.max_local()
        && (0..g)
            .all(|s| (0..g).all(|d| (0..lmax).all(|l| host.rows(s, d, l) == device.rows(s, d, l))))
}

/// Rows per peer of a sub-group (`members`, EP indices, in the order of
/// `rows`) spread over the whole EP group: the other peers get nothing.
fn spread(group: usize, members: &[usize], rows: PeerRows) -> PeerRows {
    let mut all: PeerRows = vec![Vec::new(); group];
    for (&q, r) in members.iter().zip(rows) {
        if let Some(slot) = all.get_mut(q) {
            *slot = r;
        }
    }
    all
}

/// Blocks and threads per block of a `route_copy` launch: one block per
/// routed row at a time, its threads over the row's bytes.
const ROUTE_COPY_GRID: u64 = 4096;
const ROUTE_COPY_BLOCK: u32 = 64;

/// The events of collective number `ordinal` of a pass, per rank: *arrive*
/// (its send buffer is written and its receive buffer free) and *done* (it
/// has pulled from every peer).
#[allow(clippy::type_complexity)] // two constructors, spelled out
fn collective_events(ordinal: u32) -> (impl Fn(usize) -> EventId, impl Fn(usize) -> EventId) {
    (
        move |r| EventId {
            rank: r,
            id: 2 * ordinal,
            comm: true,
        },
        move |r| EventId {
            rank: r,
            id: 2 * ordinal + 1,
            comm: true,
        },
    )
}

/// A failed status block as a message.
pub fn describe_status(
    label: &str,
    params: &[Param],
    code: i64,
    which: i64,
    index: i64,
    row: i64,
) -> String {
    let param = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| params.get(i))
            .map_or_else(|| format!("#{i}"), |p| format!("`{}`", p.name))
    };
    match code {
        STATUS_OOB_BUFFER => format!(
            "kernel `{label}`: index {index} of {} out of bounds at row {row}",
            param(which)
        ),
        STATUS_OOB_ARRAY => format!(
            "kernel `{label}`: local array #{which} index {index} out of bounds at row {row}"
        ),
        STATUS_DIV_ZERO => format!("kernel `{label}`: integer division by zero at row {row}"),
        STATUS_BAD_EXPERT => format!(
            "the router produced expert id {which} (assignment {index}), outside the layer's experts"
        ),
        STATUS_BAD_WEIGHT => format!("the router produced a non-finite weight (assignment {index})"),
        STATUS_BAD_METADATA => {
            format!("corrupt routing metadata from EP rank {which}: value {index}")
        }
        STATUS_COUNTS_DISAGREE => format!(
            "the exchanged counts disagree with this rank's routing (chunk {which}, EP rank {index}, local expert {row})"
        ),
        other => format!("kernel `{label}` failed with status {other} ({which}, {index}, {row})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threaded conversion writes the bytes the sequential one writes.
    #[test]
    fn parallel_conversion_equals_the_sequential_one() {
        let values: Vec<f32> = (0..(9 << 20) + 5)
            .map(|i| ((i as f32) * 0.37).sin() * 300.0)
            .collect();
        for dtype in [DType::F32, DType::Bf16, DType::F16, DType::Fp8E4m3] {
            let n = values.len() * dtype.bytes() as usize;
            let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
            memory::write_f32(&values, dtype, &mut want);
            convert_in_parallel(&values, dtype, &mut got);
            assert!(want == got, "{dtype:?}");
        }
    }
}
