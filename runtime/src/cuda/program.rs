//! The lowering: a plan as a device program, computed without a GPU.
//!
//! [`Program::lower`] turns a validated plan into the ordered list of
//! [`Step`]s every rank runs: per plan op, in op-id order (one valid
//! sequential order of all ops, so an event is always recorded before a wait
//! on it is issued), the device work on the op's stream. Every buffer is a
//! [`Span`] of one of a rank's three device allocations:
//!
//! - the **arena** (`Space::Arena`): the plan's buffers at the plan's offsets,
//!   `peak_activation_bytes` long, as on the CPU;
//! - the **weights** (`Space::Weights`): router, biases, shared gate, one slot
//!   per local expert (the most any rank holds) and the shared experts, each
//!   in the dtype of the GEMM input it multiplies ([`WeightLayout`]), plus the
//!   tables the assignment kernels read;
//! - the **workspace** (`Space::Work`): one status block per launch, the
//!   routing table and statistics `assign_place` writes, and per stream the
//!   `f32` GEMM accumulator and the scratch of large-array kernels
//!   ([`WorkLayout`]).
//!
//! What depends on the routing (the rows of a `pack`, the row groups of an
//! expert GEMM, the byte runs of an all-to-all) stays symbolic here
//! ([`Rows`], [`Groups`], [`CollectiveStep`]) and is resolved by the issuer
//! from the routing table the host reads back after `assign_place`.
//!
//! The argument lists follow the CPU backend's bindings (`cpu/exec.rs`,
//! `launch`) exactly, and every one is checked against the kernel's
//! description when the program is built.

use crate::plan::arena::RowNeed;
use crate::plan::binding::{binding, Arg, LaunchRows};
use std::collections::BTreeMap;

use moec_kernels::ir::{Param, ParamKind, Ty};
use moec_kernels::native::NativeKernel;

use super::plan::{plan_kernels, PlanKernels};
use super::route::{expand_frame_len, RouteShape};
use crate::cpu::hier::Topology;
use crate::cpu::layout::Geometry;
use crate::plan::{
    Buffer, CollectiveKind, CollectiveScope, DType, Epilogue, GemmWeight, KernelKind, OpKind,
    Phase, Plan,
};

/// Threads per block of a launch (the grid-stride loop covers any row count).
pub const BLOCK: u32 = 256;
/// Most blocks of a launch.
pub const MAX_GRID: u32 = 4096;
/// Threads per block and most blocks of a block-per-row kernel (a row's
/// `hidden` elements in 128-thread strides; rows past the grid loop).
pub const ROW_BLOCK: u32 = 128;
pub const MAX_ROW_GRID: u32 = 16384;
/// Threads per block and most blocks of a kernel that keeps its arrays in
/// the scratch block (the scratch is sized for all of them).
pub const SCRATCH_BLOCK: u32 = 128;
pub const SCRATCH_GRID: u32 = 32;
/// Alignment of every span the lowering places in the weights and the workspace.
pub const ALIGN: u64 = 256;
/// Bytes of one launch's status block (four `i64` words).
pub const STATUS_BYTES: u64 = 32;

/// One of a rank's device allocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Space {
    Arena,
    Weights,
    Work,
}

/// Bytes of one space of a rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub space: Space,
    pub offset: u64,
    pub bytes: u64,
}

impl Span {
    pub fn end(&self) -> u64 {
        self.offset + self.bytes
    }

    /// `bytes` bytes at `offset` inside this span, or an error naming `what`.
    pub fn sub(&self, offset: u64, bytes: u64, what: &str) -> Result<Span, String> {
        match offset.checked_add(bytes) {
            Some(end) if end <= self.bytes => Ok(Span {
                space: self.space,
                offset: self.offset + offset,
                bytes,
            }),
            _ => Err(format!(
                "{what}: {bytes} bytes at {offset} fall outside its {} bytes",
                self.bytes
            )),
        }
    }
}

/// A kernel of the plan's generated module (by index) or a native one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelRef {
    Generated(usize),
    Native(NativeKernel),
}

/// One launch argument before a rank is known.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArgT {
    /// A buffer: its span and its length in elements.
    Buf {
        span: Span,
        len: u64,
    },
    F32(f32),
    I64(i64),
    /// The rank's index in its EP group, as an `i64`.
    Me,
}

/// Rows of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    Fixed(u64),
    /// The rows this rank sends in the chunk (routing-dependent), and the
    /// most there can be (the buffer's rows).
    Sent(usize, u64),
    /// The rows this rank receives in the chunk (routing-dependent), and the
    /// most there can be (the buffer's rows; every slot of a padded layout).
    Received(usize, u64),
    /// Dispatch by rank: the by-rank rows (one per token and destination
    /// rank) this rank sends, or receives, in the chunk, and the most there
    /// can be.
    RankSent(usize, u64),
    RankReceived(usize, u64),
}

/// A kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchStep {
    pub kernel: KernelRef,
    /// The plan's name for the kernel (or the epilogue's label), for errors.
    pub label: String,
    pub args: Vec<ArgT>,
    pub rows: Rows,
    /// Index of the launch's status block in the workspace.
    pub status: usize,
    /// Bytes of scratch per thread (0: none; see [`SCRATCH_GRID`]).
    pub scratch_per_thread: u64,
}

/// The row groups of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Groups {
    /// One group of this many rows (router and shared experts).
    Fixed(u64),
    /// One group per local expert, rows from the chunk's routing table.
    Experts(usize),
}

/// What happens to a GEMM's `f32` product.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tail {
    /// cuBLAS writes the output itself (`f32`, no bias, no activation).
    Direct,
    /// `gemm_store` (module kernel) adds the bias and rounds into the output.
    Store { kernel: usize },
    /// The activation (module kernel) reads the product, after a
    /// `gemm_store` into the second accumulator when there is a bias.
    Activation {
        store: Option<usize>,
        kernel: usize,
        limit: f32,
    },
    /// The reducing epilogue of a down projection that sums through the
    /// expansion index ([`crate::plan::RankIndex`]): after every group's
    /// product (and `gemm_store` of the bias into the second accumulator),
    /// [`EXPERT_REDUCE`](super::plan::EXPERT_REDUCE) sums each received
    /// by-rank row's picks into `c`, over the chunk's received rows.
    Reduce {
        store: Option<usize>,
        kernel: usize,
        index: Span,
        weights: Span,
    },
}

/// The expansion fused into an up projection: before the GEMM,
/// [`EXPERT_GATHER`](super::plan::EXPERT_GATHER) copies each received
/// by-rank row (`rows`) to its picks' expert rows in the stream's gather
/// workspace, which the GEMM reads as its input (cuBLAS reads a dense
/// operand; the CPU backend reads through the index itself).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankGather {
    pub kernel: usize,
    pub rows: Span,
    pub index: Span,
    pub weights: Span,
}

/// `c = a · wᵀ` per row group, as the CPU backend computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmStep {
    pub weight: GemmWeight,
    pub a: Span,
    pub a_dtype: DType,
    pub c: Span,
    pub c_dtype: DType,
    pub k: u64,
    pub n: u64,
    /// Columns of `c` (the activation's width with an activation, else `n`).
    pub out_cols: u64,
    pub groups: Groups,
    pub tail: Tail,
    /// The fused expansion (then `a` is the gather workspace).
    pub gather: Option<RankGather>,
    /// The `f32` accumulator (rows × `n`) and the biased copy, in the
    /// stream's workspace.
    pub acc: Span,
    pub biased: Span,
    /// Status block of the tail launches.
    pub status: usize,
    pub label: String,
}

pub use crate::plan::rows::RowLayout;

/// A collective of one EP group.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectiveStep {
    pub kind: CollectiveKind,
    pub send: Span,
    pub recv: Span,
    pub send_rows: RowLayout,
    pub recv_rows: RowLayout,
    pub send_name: String,
    pub recv_name: String,
    /// Token side to expert side (dispatch), or back (combine).
    pub dispatch: bool,
    pub chunk: usize,
    /// The status block of the collective's copy kernels: `route_copy`
    /// for a flat all-to-all between virtual ranks, `copy_runs` for a leg
    /// of the hierarchical all-to-all over NCCL; `None` for the fixed-size
    /// collectives.
    pub status: Option<usize>,
    /// The EP group (flat), or one leg of the hierarchical all-to-all.
    pub scope: CollectiveScope,
    /// The reducing combine's intra-node leg: the forwarder's sum.
    pub forwarder_sum: Option<ForwarderSum>,
}

/// The sum a forwarder runs after the reducing combine's intra-node leg:
/// the leg moves the partial rows into the stream's `forward_parts`, the
/// host uploads which parts each staged token adds (`forward_index`, one
/// row of `width` per token, `-1` past its parts), and the
/// [`super::plan::FORWARDER_SUM`] kernel adds them into the leg's receive
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwarderSum {
    /// The kernel's index in the module.
    pub kernel: usize,
    pub status: usize,
    /// Parts per token at most (the ranks of a node).
    pub width: usize,
}

/// What the host computes of a dispatch by rank, from this rank's routing
/// and the gathered metadata it read back, with the CPU backend's layout
/// functions (`cpu::layout`: one implementation of the by-rank layout for
/// both backends), and uploads in stream order where the plan runs the
/// assignment pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByRankStep {
    /// `assign_rank` (pass 2): the chunk's by-rank slots (`[tokens, G]`
    /// i32) and the pick rows sent beside the rows (`[rows, 2k]` i32).
    Source {
        chunk: usize,
        rank_slots: Span,
        picks: Span,
    },
    /// Before `assign_expand` (pass 3, on the device): the chunk's
    /// [`RouteTable::expand_frame`](super::route::RouteTable::expand_frame)
    /// into its part of [`WorkLayout::expand_frame`].
    Frame { chunk: usize },
}

/// One piece of device work on one stream.
#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    Record(u32),
    Wait(u32),
    Memset {
        span: Span,
        value: u8,
    },
    Launch(LaunchStep),
    Gemm(GemmStep),
    Collective(CollectiveStep),
    /// A device-to-device copy of `src.bytes` bytes within the rank.
    Copy {
        src: Span,
        dst: Span,
    },
    /// A by-rank layout the host computes and uploads.
    ByRank(ByRankStep),
    /// Copy the status blocks and the routing `assign_place` wrote to the
    /// host (the routing-dependent steps after it wait for the copy).
    ReadRoute,
}

/// A step and where it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// Index into [`Program::ops`].
    pub op: usize,
    pub stream: usize,
    pub kind: StepKind,
}

/// A plan op, for messages.
#[derive(Clone, Debug, PartialEq)]
pub struct OpInfo {
    pub id: u32,
    pub name: String,
    pub stream: usize,
    pub phase: Phase,
}

/// Who owns a status block.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusSlot {
    pub op: usize,
    pub label: String,
    /// The kernel's parameters (to name the one a failure points at).
    pub params: Vec<Param>,
    /// Whether it belongs to an assignment kernel (checked when the routing
    /// is read back).
    pub assign: bool,
}

/// Weights of one FFN slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FfnSpans {
    /// `[up_rows, hidden]` (`[gate; up]` when gated).
    pub up: Span,
    pub up_bias: Option<Span>,
    /// `[hidden, width]`.
    pub down: Span,
    pub down_bias: Option<Span>,
    pub width: u64,
    pub up_rows: u64,
}

/// Where a rank's weights live (the same for every rank: one slot per local
/// expert, the most any rank holds).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightLayout {
    pub router: Span,
    /// The router's logit bias, f32 `[E]` (placed after every other weight,
    /// so that layers without it keep their layout).
    pub router_logit_bias: Option<Span>,
    pub router_bias: Span,
    pub shared_gate: Span,
    pub dest_rank: Span,
    pub dest_local: Span,
    pub experts: Vec<FfnSpans>,
    pub shared: Option<FfnSpans>,
    /// Storage dtype of each GEMM weight (the dtype of its GEMM's input).
    pub dtypes: BTreeMap<&'static str, DType>,
    pub bytes: u64,
}

/// Per-stream workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamWork {
    pub acc: Span,
    pub biased: Span,
    /// The expert rows a fused expansion gathers ([`RankGather`]).
    pub gathered: Span,
    pub scratch: Span,
    /// The reducing hierarchical combine's partial rows and their index on
    /// a forwarder ([`ForwarderSum`]; empty on streams without that leg).
    pub forward_parts: Span,
    pub forward_index: Span,
    /// The hierarchical legs over NCCL: each peer's rows packed into one
    /// message, the messages received before they are unpacked, and the
    /// `copy_runs` tables of both (empty on streams without such a leg).
    pub pack: Span,
    pub unpack: Span,
    pub runs: Span,
    /// The bytes of a message that go in one round when the legs' worst
    /// case does not fit `pack` and `unpack` ([`LEG_WORKSPACE_LIMIT`]); the
    /// same on every rank, so both sides of a pair cut a message alike.
    pub piece: u64,
}

/// Bytes of [`StreamWork::pack`], [`StreamWork::unpack`] and
/// [`StreamWork::runs`] a stream's hierarchical legs need at worst, and the
/// most peers one of them has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LegExchange {
    pub pack: u64,
    pub unpack: u64,
    pub runs: u64,
    pub peers: u64,
}

/// The most a stream's `pack` (and its `unpack`) workspace holds. A leg's
/// worst case is every row it may move (DeepSeek-V3: 154 MiB to pack and
/// 299 MiB to unpack on the combine stream), almost all of it idle in a
/// typical pass; above this the messages go in rounds. At 64 MiB a round
/// of a seven-peer leg moves about 9 MiB a peer, some 60 us at H100
/// NVLink's 160 GB/s, against the few microseconds an NCCL group costs to
/// start.
pub const LEG_WORKSPACE_LIMIT: u64 = 64 << 20;

impl LegExchange {
    /// The bytes a round moves per message: everything in one round when
    /// the worst case fits, else an equal share of the smaller workspace
    /// per peer (16-byte multiples, so packed pieces stay aligned).
    fn piece(&self) -> u64 {
        if self.pack <= LEG_WORKSPACE_LIMIT && self.unpack <= LEG_WORKSPACE_LIMIT {
            return u64::MAX;
        }
        let share = self.pack.min(self.unpack).min(LEG_WORKSPACE_LIMIT) / self.peers.max(1);
        (share / 16 * 16).max(16)
    }
}

/// Where a rank's workspace lives.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkLayout {
    pub status: Span,
    pub table: Span,
    pub stats: Span,
    pub keep_own: Span,
    pub kept_own: Span,
    /// Where each routing table cell's rows start on the send side and on
    /// the expert side (`route_offsets`, read by `route_copy`).
    pub send_off: Span,
    pub recv_off: Span,
    /// Dispatch by rank: copies of the routing (`[tokens, k]` expert ids
    /// and weights) and of the group's gathered assignment metadata
    /// (`meta_all`), taken right after `assign_place` and read back with
    /// the table (empty otherwise): all the host needs to lay out this
    /// rank's by-rank rows (`cpu::layout::assign_place`), whichever process
    /// holds the other ranks.
    pub routing_ids: Span,
    pub routing_weights: Span,
    pub routing_meta: Span,
    /// Dispatch by rank: per chunk, the routing table's
    /// [`RouteTable::expand_frame`](super::route::RouteTable::expand_frame)
    /// of this rank, uploaded in stream order before `assign_expand`.
    pub expand_frame: Span,
    /// The hierarchical dispatch's inter-node leg over NCCL (empty without
    /// that leg): what a source tells each forwarder before the rows (per
    /// node, its row count and the length of their routing, `u32` each),
    /// and that routing itself. Each holds the sent half, then the
    /// received half ([`StagedExchange`]).
    pub staged: StagedExchange,
    pub streams: Vec<StreamWork>,
    pub bytes: u64,
}

/// Where a source's messages to the forwarders of the inter-node leg live
/// (see [`WorkLayout::staged`]): the host reads the received halves back
/// before it lays out the rows the forwarder stages and fans out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagedExchange {
    /// `[nodes, 2]` `u32` sent, then `[nodes, 2]` received.
    pub counts: Span,
    /// Routing values (`u32`) sent, at most `routing_sent`, then received,
    /// at most `routing_received`.
    pub routing: Span,
    pub routing_sent: u64,
    pub routing_received: u64,
}

impl StagedExchange {
    /// The counts' sent and received halves.
    pub fn counts_halves(&self) -> (Span, Span) {
        let half = self.counts.bytes / 2;
        (
            Span {
                bytes: half,
                ..self.counts
            },
            Span {
                offset: self.counts.offset + half,
                bytes: half,
                ..self.counts
            },
        )
    }

    /// The routing's sent and received halves.
    pub fn routing_halves(&self) -> (Span, Span) {
        let sent = self.routing_sent * 4;
        (
            Span {
                bytes: sent,
                ..self.routing
            },
            Span {
                offset: self.routing.offset + sent,
                bytes: self.routing_received * 4,
                ..self.routing
            },
        )
    }

    /// Bounds on a chunk's staged routing (`cpu::hier::InterSend`): a
    /// source sends, per token, one count per node it reaches and an
    /// (index, row) pair per destination (at most `top_k`); a forwarder
    /// receives from each node at most one routed row per token of the
    /// chunk, each with at most one pair per rank of its node.
    pub fn sized(chunk_tokens: u64, top_k: u64, nodes: u64, per_node: u64) -> (u64, u64) {
        let sent = chunk_tokens * (top_k.min(nodes) + 2 * top_k);
        let received = nodes * chunk_tokens * (1 + 2 * top_k.min(per_node));
        (sent, received)
    }
}

impl WorkLayout {
    /// The most bytes one read-back copies: the routing, or a received
    /// half of the staged exchange.
    pub fn largest_read_back(&self) -> u64 {
        let (_, counts) = self.staged.counts_halves();
        let (_, routing) = self.staged.routing_halves();
        self.readback().bytes.max(counts.bytes).max(routing.bytes)
    }

    /// What [`StepKind::ReadRoute`] copies: the status blocks, the table,
    /// the statistics and, with dispatch by rank, the routing and the
    /// gathered metadata (contiguous).
    pub fn readback(&self) -> Span {
        let end = [
            self.stats,
            self.routing_ids,
            self.routing_weights,
            self.routing_meta,
        ]
        .iter()
        .filter(|s| s.bytes > 0)
        .map(Span::end)
        .max()
        .unwrap_or(self.stats.end());
        Span {
            space: Space::Work,
            offset: self.status.offset,
            bytes: end - self.status.offset,
        }
    }
}

/// A plan lowered for the device.
#[derive(Clone, Debug)]
pub struct Program {
    pub kernels: PlanKernels,
    pub ops: Vec<OpInfo>,
    pub steps: Vec<Step>,
    pub streams: usize,
    pub events: u32,
    pub ranks: usize,
    pub group: usize,
    pub geometry: Geometry,
    pub route: RouteShape,
    pub arena_bytes: u64,
    pub weights: WeightLayout,
    pub work: WorkLayout,
    pub x: Span,
    pub x_dtype: DType,
    pub out: Span,
    pub out_dtype: DType,
    pub status: Vec<StatusSlot>,
    pub layer_dtype: DType,
    pub hidden: u64,
    /// Capacity plans: the rows each local expert owns on the expert side
    /// (local expert `l` at rows `l · padded ..`, whatever the routing), so
    /// that the expert GEMMs, the launches over received rows and the
    /// all-to-all between virtual ranks need no routing on the host. 0:
    /// the packed layout of dropless plans (the CPU backend's).
    pub padded: u64,
    /// The `slots` table `assign_place` writes (`[tokens, top_k]` i32: the
    /// send row of each assignment), which the host reads back for the
    /// hierarchical all-to-all's inter-node leg.
    pub slots: Option<Span>,
    pub gpus_per_node: usize,
    /// What the plan's bounded buffers hold (rows of one rank and chunk):
    /// a pass whose routing needs more is refused before any row moves.
    pub row_bounds: RowNeed,
}

/// Bytes of each cuBLAS handle's workspace (what NVIDIA recommends for
/// Hopper); the driver layer gives every stream of every rank a handle with
/// its own, so that cuBLAS allocates nothing during a capture.
pub const CUBLAS_WORKSPACE_BYTES: u64 = 32 << 20;

/// Device memory the CUDA context itself holds (its code, heaps and
/// queues), modelled, not measured: about half a GiB on Hopper with lazy
/// module loading.
pub const CONTEXT_BYTES: u64 = 512 << 20;

/// The local-memory reserve is sized for every thread the device can hold
/// at once: the per-thread stack (the driver's default limit, 1 KiB, which
/// every kernel here stays within: large local arrays use the workspace's
/// scratch instead) times the resident threads per SM times the SMs (an
/// H100 SXM or H200: 2048 × 132). Modelled from the published figures.
pub const LOCAL_BYTES_PER_THREAD: u64 = 1 << 10;
pub const HOPPER_RESIDENT_THREADS: u64 = 2048 * 132;

/// What a program takes of a GPU's memory, for `ranks` ranks on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Arena, weights and workspace of every rank.
    pub allocations: u64,
    /// One cuBLAS workspace per stream and rank.
    pub cublas: u64,
    pub context: u64,
    pub local_reserve: u64,
}

impl DeviceMemory {
    pub fn total(&self) -> u64 {
        self.allocations
            .saturating_add(self.cublas)
            .saturating_add(self.context)
            .saturating_add(self.local_reserve)
    }
}

impl Program {
    /// The device memory `ranks` ranks of this program take on one GPU:
    /// their allocations, the cuBLAS workspaces, the context and the
    /// local-memory reserve (see the constants).
    pub fn device_memory(&self, ranks: usize) -> DeviceMemory {
        let ranks = ranks as u64;
        let per_rank = self
            .arena_bytes
            .saturating_add(self.weights.bytes)
            .saturating_add(self.work.bytes);
        DeviceMemory {
            allocations: per_rank.saturating_mul(ranks),
            cublas: CUBLAS_WORKSPACE_BYTES.saturating_mul(self.streams as u64 * ranks),
            context: CONTEXT_BYTES,
            local_reserve: LOCAL_BYTES_PER_THREAD * HOPPER_RESIDENT_THREADS,
        }
    }
}

/// The name of a GEMM weight, as [`WeightLayout::dtypes`] keys it.
pub fn weight_name(w: GemmWeight) -> &'static str {
    match w {
        GemmWeight::RouterGate => "router_gate",
        GemmWeight::ExpertUp => "expert_up",
        GemmWeight::ExpertDown => "expert_down",
        GemmWeight::SharedUp => "shared_up",
        GemmWeight::SharedDown => "shared_down",
    }
}

/// Places spans one after the other, aligned.
struct Placer {
    space: Space,
    at: u64,
}

impl Placer {
    fn new(space: Space) -> Placer {
        Placer { space, at: 0 }
    }

    fn take(&mut self, bytes: u64) -> Result<Span, String> {
        let offset = self.at.next_multiple_of(ALIGN);
        self.at = offset
            .checked_add(bytes)
            .ok_or_else(|| "the device memory layout overflows".to_string())?;
        Ok(Span {
            space: self.space,
            offset,
            bytes,
        })
    }

    fn total(&self) -> u64 {
        self.at.next_multiple_of(ALIGN)
    }
}

/// The workspace spans that do not depend on the streams.
const FIXED_WORK: usize = 16;
/// The first of the `drop = probs` sort's spans in the fixed workspace.
const PROBS_WORK: usize = 6;
/// The routing copies of dispatch by rank in the fixed workspace (expert
/// ids, weights, gathered metadata).
const ROUTING_WORK: usize = 12;
/// The by-rank expansion frames in the fixed workspace.
const FRAME_WORK: usize = 15;
/// The order the fixed workspace is placed in: what the routing's
/// read-back copies first (table, statistics, routing copies), contiguous.
const FIXED_ORDER: [usize; FIXED_WORK] = [0, 1, 12, 13, 14, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15];

/// What the `drop = probs` keep decision reads and writes besides its own
/// sort's workspace.
struct KeepProbs {
    meta: ArgT,
    dest_rank: ArgT,
    dest_local: ArgT,
    table: Span,
    kept_own: Span,
    max_local: usize,
    capacity: i64,
}

/// Checked `a * b * c` for sizes.
fn mul(parts: &[u64]) -> Result<u64, String> {
    parts
        .iter()
        .try_fold(1u64, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| "a size overflows".to_string())
}

/// How a kernel spreads over a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One thread per row (grid-stride over threads).
    ThreadPerRow,
    /// One thread per row, with local arrays in the scratch block.
    Scratch,
    /// One block per row, its threads sharing the row's parallel loops
    /// (`moec_kernels::parallel`).
    BlockPerRow,
}

/// The launch shape for `rows` rows: `(grid, block)`.
pub fn launch_shape(rows: u64, shape: Shape) -> (u32, u32) {
    let (per_block, block, max) = match shape {
        Shape::Scratch => (SCRATCH_BLOCK, SCRATCH_BLOCK, SCRATCH_GRID),
        Shape::ThreadPerRow => (BLOCK, BLOCK, MAX_GRID),
        Shape::BlockPerRow => (1, ROW_BLOCK, MAX_ROW_GRID),
    };
    let grid = rows.div_ceil(u64::from(per_block)).clamp(1, u64::from(max));
    (grid as u32, block)
}

impl Program {
    /// Lowers `plan` (validated) for the CUDA backend.
    pub fn lower(plan: &Plan) -> Result<Program, String> {
        Lowering::new(plan)?.run()
    }

    /// The parameters of a kernel.
    pub fn params(&self, k: KernelRef) -> Vec<Param> {
        match k {
            KernelRef::Generated(i) => self
                .kernels
                .module
                .kernels()
                .get(i)
                .map(|k| k.params().to_vec())
                .unwrap_or_default(),
            KernelRef::Native(n) => n.params(),
        }
    }

    /// The symbol a kernel has in its module.
    pub fn symbol(&self, k: KernelRef) -> String {
        match k {
            KernelRef::Generated(i) => self
                .kernels
                .module
                .kernels()
                .get(i)
                .map(|k| k.name().to_string())
                .unwrap_or_default(),
            KernelRef::Native(n) => n.symbol().to_string(),
        }
    }

    /// How a kernel spreads over a launch.
    pub fn shape(&self, k: KernelRef) -> Shape {
        match k {
            KernelRef::Generated(i) => match self.kernels.module.kernels().get(i) {
                Some(g) if g.scratch_bytes_per_thread() > 0 => Shape::Scratch,
                Some(g) if g.block_per_row() => Shape::BlockPerRow,
                _ => Shape::ThreadPerRow,
            },
            KernelRef::Native(_) => Shape::ThreadPerRow,
        }
    }

    /// Scratch bytes per thread of a generated kernel.
    pub fn scratch_per_thread(&self, k: KernelRef) -> u64 {
        scratch_per_thread(&self.kernels, k)
    }

    /// Whether a step is a leg of the hierarchical all-to-all (whose rows
    /// the host lays out from the routing it reads back).
    pub fn hierarchical(&self) -> bool {
        self.steps.iter().any(
            |s| matches!(&s.kind, StepKind::Collective(c) if c.scope != CollectiveScope::EpGroup),
        )
    }

    /// The EP index of global rank `rank`.
    pub fn me(&self, rank: usize) -> usize {
        rank % self.group
    }
}

struct Lowering<'p> {
    plan: &'p Plan,
    geo: Geometry,
    kernels: PlanKernels,
    regions: Vec<Span>,
    weights: WeightLayout,
    status: Vec<StatusSlot>,
    steps: Vec<Step>,
    ops: Vec<OpInfo>,
    /// Per stream: most accumulator bytes, biased-accumulator bytes (GEMMs
    /// with a bias and an activation only) and scratch bytes needed.
    acc_need: Vec<u64>,
    biased_need: Vec<u64>,
    gathered_need: Vec<u64>,
    scratch_need: Vec<u64>,
    /// Per stream: bytes of the forwarder's partial rows and of their index.
    forward_need: Vec<(u64, u64)>,
    /// Per stream: what the hierarchical legs over NCCL need to pack and
    /// unpack their messages ([`LegExchange`]).
    exchange_need: Vec<LegExchange>,
    /// Placeholders of the workspace spans that do not depend on the
    /// streams (see [`Lowering::work`]), patched in `finish`.
    work_fixed: [Span; FIXED_WORK],
    padded: u64,
    /// The `slots` buffer `assign_place` writes.
    slots: Option<Span>,
}

impl<'p> Lowering<'p> {
    fn new(plan: &'p Plan) -> Result<Lowering<'p>, String> {
        let geo = Geometry::new(plan)?;
        let group = geo.group;
        let world = usize::try_from(plan.mesh.world_size())
            .map_err(|_| "the mesh is too large".to_string())?;
        if world == 0 || world % group != 0 {
            return Err(format!(
                "{world} ranks do not divide into EP groups of {group}"
            ));
        }
        let kernels = plan_kernels(plan).map_err(|e| e.to_string())?;
        let regions = plan
            .buffers
            .iter()
            .map(|b| {
                let end = b.offset.checked_add(b.bytes);
                if end.is_none_or(|e| e > plan.memory.peak_activation_bytes) {
                    return Err(format!(
                        "buffer `{}` ({} bytes at offset {}) lies outside the {}-byte arena",
                        b.name, b.bytes, b.offset, plan.memory.peak_activation_bytes
                    ));
                }
                let align = b.dtype.bytes().min(8);
                if b.offset % align != 0 {
                    return Err(format!(
                        "buffer `{}` at offset {} is not aligned for {}",
                        b.name,
                        b.offset,
                        b.dtype.name()
                    ));
                }
                Ok(Span {
                    space: Space::Arena,
                    offset: b.offset,
                    bytes: b.bytes,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let weights = weight_layout(plan, &geo)?;
        // The workspace's fixed part (routing table, statistics, own keeps):
        // placeholders at offsets no real span has, placed in `finish`.
        let shape = route_shape(&geo);
        let tokens = geo.tokens as u64;
        let k = geo.top_k as u64;
        let placeholder = |i: u64, bytes: u64| Span {
            space: Space::Work,
            offset: u64::MAX - i,
            bytes,
        };
        // drop = probs sorts the group's assignments per expert: a cursor
        // and the bucket starts per expert, two pairs of (key, row) buffers.
        let (experts, sorted) = match geo.capacity {
            Some((_, crate::plan::DropPolicy::Probs)) => {
                (geo.experts as u64, mul(&[geo.group as u64, tokens, k])?)
            }
            _ => (0, 0),
        };
        let (routing, meta_all, frames) = if geo.by_rank {
            let frame = expand_frame_len(geo.group, shape.max_local) as u64;
            (
                mul(&[tokens, k, 4])?,
                mul(&[geo.meta_len() as u64, geo.group as u64, 4])?,
                mul(&[geo.chunks as u64, frame, 4])?,
            )
        } else {
            (0, 0, 0)
        };
        let fixed = [
            placeholder(1, mul(&[shape.table_len() as u64, 4])?),
            placeholder(2, mul(&[shape.stats_len() as u64, 4])?),
            placeholder(3, mul(&[geo.chunks as u64, geo.experts as u64, 4])?),
            placeholder(4, mul(&[tokens, k])?),
            placeholder(5, mul(&[shape.table_len() as u64, 4])?),
            placeholder(6, mul(&[shape.table_len() as u64, 4])?),
            placeholder(7, mul(&[experts, 4])?),
            placeholder(8, mul(&[experts + u64::from(experts > 0), 4])?),
            placeholder(9, mul(&[sorted, 4])?),
            placeholder(10, mul(&[sorted, 4])?),
            placeholder(11, mul(&[sorted, 4])?),
            placeholder(12, mul(&[sorted, 4])?),
            placeholder(13, routing),
            placeholder(14, routing),
            placeholder(15, meta_all),
            placeholder(16, frames),
        ];
        // Capacity plans: an expert gets at most `capacity` rows in all, and
        // in a chunk at most one per token of the group; its expert-side
        // slot holds that many, when the plan's expert buffers hold a slot
        // for every local expert. Not with dispatch by rank: its expansion
        // (`assign_expand`, as `cpu::layout::expand_index`) lays the expert
        // side out packed, and the host reads the routing back anyway.
        let padded = match geo.capacity {
            Some(_) if geo.by_rank => 0,
            Some((cap, _)) => {
                let slot = (cap as u64).min(mul(&[geo.chunk_tokens as u64, geo.group as u64])?);
                let need = mul(&[slot, shape.max_local as u64])?;
                if need <= plan.choices.expert_rows {
                    slot
                } else {
                    0
                }
            }
            None => 0,
        };
        let streams = plan.streams.len();
        Ok(Lowering {
            plan,
            geo,
            kernels,
            regions,
            weights,
            status: Vec::new(),
            steps: Vec::new(),
            ops: Vec::new(),
            acc_need: vec![0; streams],
            biased_need: vec![0; streams],
            gathered_need: vec![0; streams],
            scratch_need: vec![0; streams],
            forward_need: vec![(0, 0); streams],
            exchange_need: vec![LegExchange::default(); streams],
            work_fixed: fixed,
            padded,
            slots: None,
        })
    }

    /// Lowers every op in op-id order. Workspace spans are placed after
    /// every step is known (the status area is sized by the launches, the
    /// accumulators by the GEMMs): steps refer to placeholders until `finish`.
    fn run(mut self) -> Result<Program, String> {
        let mut all: Vec<(usize, &crate::plan::Op)> = self.plan.ops().collect();
        all.sort_by_key(|(_, op)| op.id);
        for (stream, op) in all {
            let index = self.ops.len();
            self.ops.push(OpInfo {
                id: op.id,
                name: op.name.clone(),
                stream,
                phase: op.phase,
            });
            self.op(index, stream, op)
                .map_err(|e| format!("op #{} `{}`: {e}", op.id, op.name))?;
        }
        self.finish()
    }

    fn push(&mut self, op: usize, stream: usize, kind: StepKind) {
        self.steps.push(Step { op, stream, kind });
    }

    fn slot(&mut self, op: usize, label: &str, params: Vec<Param>, assign: bool) -> usize {
        self.status.push(StatusSlot {
            op,
            label: label.to_string(),
            params,
            assign,
        });
        self.status.len() - 1
    }

    /// The rows both buffers hold: the most a launch over them may cover.
    fn common_rows(&self, a: u32, b: u32) -> Result<u64, String> {
        let rows = |i: u32| self.buffer(i).and_then(RowLayout::of).map(|l| l.rows);
        Ok(rows(a)?.min(rows(b)?))
    }

    fn buffer(&self, i: u32) -> Result<&'p Buffer, String> {
        self.plan
            .buffers
            .get(i as usize)
            .ok_or_else(|| format!("buffer b{i} does not exist"))
    }

    /// The span of `buffer` an op of `chunk` touches: a whole-layer
    /// per-token buffer is cut to the chunk's tokens (as on the CPU).
    fn region(&self, buffer: u32, chunk: Option<u64>) -> Result<(Span, &'p Buffer), String> {
        let buf = self.buffer(buffer)?;
        let mut span = self.regions[buffer as usize];
        if let Some(c) = buf.chunk_rows(chunk, self.geo.tokens as u64) {
            let range = self.geo.chunk_range(c as usize);
            let row_bytes = span.bytes / (self.geo.tokens as u64).max(1);
            span = Span {
                space: Space::Arena,
                offset: span.offset + range.start as u64 * row_bytes,
                bytes: range.len() as u64 * row_bytes,
            };
        }
        Ok((span, buf))
    }

    /// A buffer as kernel arguments: one, or two for fp8 (data, scales).
    fn raw(&self, buffer: u32, chunk: Option<u64>) -> Result<Vec<ArgT>, String> {
        let (span, buf) = self.region(buffer, chunk)?;
        if buf.dtype == DType::Fp8E4m3 {
            let layout = RowLayout::of(buf)?;
            let (base, per_row) = layout.scales.unwrap_or((0, 0));
            Ok(vec![
                ArgT::Buf {
                    span: span.sub(0, base, &buf.name)?,
                    len: base,
                },
                ArgT::Buf {
                    span: span.sub(base, layout.rows * per_row, &buf.name)?,
                    len: layout.rows * per_row / 4,
                },
            ])
        } else {
            Ok(vec![ArgT::Buf {
                span,
                len: span.bytes / buf.dtype.bytes(),
            }])
        }
    }

    fn op(&mut self, index: usize, stream: usize, op: &crate::plan::Op) -> Result<(), String> {
        match &op.kind {
            OpKind::Record { event } => self.push(index, stream, StepKind::Record(*event)),
            OpKind::Wait { event } => self.push(index, stream, StepKind::Wait(*event)),
            OpKind::Launch {
                kernel,
                inputs,
                outputs,
                ..
            } => self.launch(index, stream, op, *kernel, inputs, outputs)?,
            OpKind::Gemm {
                weight,
                a,
                c,
                epilogue,
                n,
                m,
                by_rank,
                ..
            } => self.gemm(
                index,
                stream,
                op,
                *weight,
                (*a, *c, *n, *m),
                (*epilogue, *by_rank),
            )?,
            OpKind::Collective {
                kind,
                send,
                recv,
                scope,
                ..
            } => {
                let (send_span, send_buf) = (self.regions[*send as usize], self.buffer(*send)?);
                let (recv_span, recv_buf) = (self.regions[*recv as usize], self.buffer(*recv)?);
                if matches!(
                    kind,
                    CollectiveKind::CountExchange | CollectiveKind::AllGather
                ) && recv_span.bytes < send_span.bytes * self.geo.group as u64
                {
                    return Err(format!(
                        "`{}` is too small to gather {} blocks of {} bytes",
                        recv_buf.name, self.geo.group, send_span.bytes
                    ));
                }
                let dispatch = op.phase != Phase::Combine;
                let (send_rows, recv_rows) = (RowLayout::of(send_buf)?, RowLayout::of(recv_buf)?);
                let hierarchical = *scope != CollectiveScope::EpGroup;
                let status = if hierarchical {
                    // The legs move rows the host finds from the routing it
                    // read back (`cpu::hier`): copies between virtual ranks,
                    // or NCCL messages packed and unpacked by `copy_runs`.
                    self.leg_exchange(stream, (*kind, *scope, dispatch), &send_rows, &recv_rows)?;
                    let params = NativeKernel::CopyRuns.params();
                    Some(self.slot(index, &format!("{} (copy_runs)", op.name), params, false))
                } else if matches!(kind, CollectiveKind::AllToAll | CollectiveKind::AllToAllV) {
                    if send_rows.row_bytes != recv_rows.row_bytes
                        || send_rows.scales.map(|s| s.1) != recv_rows.scales.map(|s| s.1)
                    {
                        return Err(format!(
                            "`{}` and `{}` have rows of different sizes",
                            send_buf.name, recv_buf.name
                        ));
                    }
                    let expert_side = if dispatch { recv_rows } else { send_rows };
                    let slots = self.padded * self.route_max_local() as u64;
                    if expert_side.rows < slots {
                        return Err(format!(
                            "`{}` holds {} rows, fewer than the {slots} expert slots of the capacity",
                            if dispatch { &recv_buf.name } else { &send_buf.name },
                            expert_side.rows
                        ));
                    }
                    let params = NativeKernel::RouteCopy.params();
                    Some(self.slot(index, &format!("{} (route_copy)", op.name), params, false))
                } else {
                    None
                };
                let forwarder_sum = if *kind == CollectiveKind::AllToAllRank
                    && !dispatch
                    && *scope == CollectiveScope::IntraNode
                {
                    Some(self.forwarder_sum(index, stream, op, &send_rows)?)
                } else {
                    None
                };
                let step = CollectiveStep {
                    kind: *kind,
                    send: send_span,
                    recv: recv_span,
                    send_rows,
                    recv_rows,
                    send_name: send_buf.name.clone(),
                    recv_name: recv_buf.name.clone(),
                    dispatch,
                    chunk: op.chunk.unwrap_or(0) as usize,
                    status,
                    scope: *scope,
                    forwarder_sum,
                };
                self.push(index, stream, StepKind::Collective(step));
            }
        }
        Ok(())
    }

    /// Nodes and ranks per node of an EP group (`cpu::hier::Topology`, the
    /// one rule every hierarchical leg follows).
    fn topology(&self) -> Result<Topology, String> {
        let gpus_per_node = usize::try_from(self.plan.mesh.gpus_per_node)
            .map_err(|_| "gpus_per_node does not fit this machine")?;
        Topology::new(self.geo.group, gpus_per_node)
    }

    /// What a hierarchical leg on `stream` needs to move its rows over NCCL
    /// as one message per peer: at most every row it may send, packed (the
    /// dispatch's intra-node leg fans a staged row out to each rank of the
    /// node that picked it, at most `top_k` and at most the node's other
    /// ranks' receive buffers), every row it may receive, unpacked (the
    /// reducing combine's intra-node leg receives into the forwarder's
    /// partial rows), and a run table entry per row and per fp8 scale run.
    fn leg_exchange(
        &mut self,
        stream: usize,
        (kind, scope, dispatch): (CollectiveKind, CollectiveScope, bool),
        send: &RowLayout,
        recv: &RowLayout,
    ) -> Result<(), String> {
        let topo = self.topology()?;
        let per_node = topo.per_node as u64;
        let sent_rows = if dispatch && scope == CollectiveScope::IntraNode {
            let fan_out = mul(&[send.rows, self.geo.top_k as u64])?;
            fan_out.min(mul(&[recv.rows, per_node.saturating_sub(1)])?)
        } else {
            send.rows
        };
        let received_rows = if kind == CollectiveKind::AllToAllRank
            && !dispatch
            && scope == CollectiveScope::IntraNode
        {
            mul(&[self.geo.chunk_tokens as u64, self.geo.group as u64])?
        } else {
            recv.rows
        };
        let peers = if scope == CollectiveScope::IntraNode {
            topo.per_node
        } else {
            topo.nodes
        }
        .saturating_sub(1) as u64;
        let need = LegExchange {
            pack: mul(&[sent_rows, send.bytes_per_row()])?,
            unpack: mul(&[received_rows, recv.bytes_per_row()])?,
            // (source, destination, bytes) per run: the own share's, the
            // packed ones and the unpacked ones, two per row with fp8, and
            // a round's cut through one run per peer and direction.
            runs: mul(&[send.rows + sent_rows + received_rows + peers, 2, 3, 4])?,
            peers,
        };
        let have = &mut self.exchange_need[stream];
        have.pack = have.pack.max(need.pack);
        have.unpack = have.unpack.max(need.unpack);
        have.runs = have.runs.max(need.runs);
        have.peers = have.peers.max(need.peers);
        Ok(())
    }

    /// The forwarder's sum after a reducing intra-node combine leg whose
    /// send buffer has rows `rows`: its kernel and status block, and the
    /// stream's staging for the partial rows (a forwarder stages at most one
    /// row per token of every source at its index, `nodes × chunk tokens`,
    /// and receives at most one part per rank of its node for each, so at
    /// most `group × chunk tokens` parts).
    fn forwarder_sum(
        &mut self,
        index: usize,
        stream: usize,
        op: &crate::plan::Op,
        rows: &RowLayout,
    ) -> Result<ForwarderSum, String> {
        if rows.scales.is_some() {
            return Err(
                "the reducing combine sums rows of the layer's float dtype, not fp8".into(),
            );
        }
        let topo = self.topology()?;
        let parts = mul(&[self.geo.chunk_tokens as u64, self.geo.group as u64])?;
        let need = (mul(&[parts, rows.row_bytes])?, mul(&[parts, 4])?);
        let have = &mut self.forward_need[stream];
        *have = (have.0.max(need.0), have.1.max(need.1));
        let kernel = self.labelled(super::plan::FORWARDER_SUM)?;
        let kref = KernelRef::Generated(kernel);
        let scratch = scratch_per_thread(&self.kernels, kref);
        if scratch > 0 {
            let need = mul(&[u64::from(SCRATCH_GRID), u64::from(SCRATCH_BLOCK), scratch])?;
            self.scratch_need[stream] = self.scratch_need[stream].max(need);
        }
        let params = self.params_of(kref);
        let status = self.slot(
            index,
            &format!("{} (forwarder sum)", op.name),
            params,
            false,
        );
        Ok(ForwarderSum {
            kernel,
            status,
            width: topo.per_node,
        })
    }

    fn module_index(&self, table_index: usize) -> Result<usize, String> {
        self.kernels
            .kernels
            .iter()
            .find(|k| k.table_index == Some(table_index))
            .map(|k| k.module_index)
            .ok_or_else(|| format!("kernel k{table_index} has no CUDA kernel"))
    }

    fn labelled(&self, label: &str) -> Result<usize, String> {
        self.kernels
            .kernels
            .iter()
            .find(|k| k.table_index.is_none() && k.label == label)
            .map(|k| k.module_index)
            .ok_or_else(|| format!("the CUDA module has no `{label}` kernel"))
    }

    fn launch(
        &mut self,
        index: usize,
        stream: usize,
        op: &crate::plan::Op,
        kernel: u32,
        inputs: &[u32],
        outputs: &[u32],
    ) -> Result<(), String> {
        let plan = self.plan;
        let k = plan
            .kernels
            .get(kernel as usize)
            .ok_or_else(|| format!("kernel k{kernel} does not exist"))?;
        if k.kind == KernelKind::Assign {
            return self.assign(index, stream, op.chunk, k, inputs, outputs);
        }
        let module = self.module_index(kernel as usize)?;
        let chunk = op.chunk;
        let input = |i: usize| {
            inputs
                .get(i)
                .copied()
                .ok_or_else(|| format!("`{}` needs input {i}", k.name))
        };
        let output = |i: usize| {
            outputs
                .get(i)
                .copied()
                .ok_or_else(|| format!("`{}` needs output {i}", k.name))
        };
        let binding =
            binding(k.kind, op.phase).ok_or_else(|| format!("`{}` cannot be launched", k.name))?;
        let tokens = match chunk {
            Some(c) => self.geo.chunk_range(c as usize).len() as u64,
            None => self.geo.tokens as u64,
        };
        let c = chunk.unwrap_or(0) as usize;
        let mut args: Vec<ArgT> = Vec::new();
        for arg in binding.args {
            match *arg {
                Arg::Input(i) => args.extend(self.raw(input(i)?, chunk)?),
                Arg::Output(i) => args.extend(self.raw(output(i)?, chunk)?),
                Arg::RouterBias => args.push(ArgT::Buf {
                    span: self.weights.router_bias,
                    len: self.weights.router_bias.bytes / 4,
                }),
                Arg::RouterScale => args.push(ArgT::F32(plan.layer.router.scale as f32)),
                Arg::SharedGate => args.push(ArgT::Buf {
                    span: self.weights.shared_gate,
                    len: self.weights.shared_gate.bytes / 4,
                }),
                Arg::ClampLimit => {
                    args.push(ArgT::F32(self.clamp_limit(op.phase == Phase::Shared)))
                }
            }
        }
        let rows = match binding.rows {
            LaunchRows::ChunkTokens => Rows::Fixed(tokens),
            LaunchRows::LayerTokens => Rows::Fixed(self.geo.tokens as u64),
            LaunchRows::Sent => Rows::Sent(c, self.common_rows(input(0)?, output(0)?)?),
            LaunchRows::Received => Rows::Received(c, self.common_rows(input(0)?, output(0)?)?),
            LaunchRows::WireSent if self.geo.by_rank => {
                Rows::RankSent(c, self.common_rows(input(0)?, output(0)?)?)
            }
            LaunchRows::WireSent => Rows::Sent(c, self.common_rows(input(0)?, output(0)?)?),
            LaunchRows::WireReceived if !self.geo.by_rank => {
                Rows::Received(c, self.common_rows(input(0)?, output(0)?)?)
            }
            LaunchRows::WireReceived | LaunchRows::ReceivedByRank => {
                Rows::RankReceived(c, self.common_rows(input(0)?, output(0)?)?)
            }
        };
        let kref = KernelRef::Generated(module);
        self.add_launch(index, stream, kref, &k.name, args, rows, false)
    }

    /// Checks `args` against the kernel's parameters and pushes the launch.
    #[allow(clippy::too_many_arguments)] // a launch, spelled out
    fn add_launch(
        &mut self,
        index: usize,
        stream: usize,
        kernel: KernelRef,
        label: &str,
        args: Vec<ArgT>,
        rows: Rows,
        assign: bool,
    ) -> Result<(), String> {
        let params = self.params_of(kernel);
        check_args(label, &params, &args)?;
        let scratch_per_thread = scratch_per_thread(&self.kernels, kernel);
        if scratch_per_thread > 0 {
            let need = mul(&[
                u64::from(SCRATCH_GRID),
                u64::from(SCRATCH_BLOCK),
                scratch_per_thread,
            ])?;
            self.scratch_need[stream] = self.scratch_need[stream].max(need);
        }
        let status = self.slot(index, label, params, assign);
        self.push(
            index,
            stream,
            StepKind::Launch(LaunchStep {
                kernel,
                label: label.to_string(),
                args,
                rows,
                status,
                scratch_per_thread,
            }),
        );
        Ok(())
    }

    fn params_of(&self, kernel: KernelRef) -> Vec<Param> {
        match kernel {
            KernelRef::Generated(i) => self
                .kernels
                .module
                .kernels()
                .get(i)
                .map(|k| k.params().to_vec())
                .unwrap_or_default(),
            KernelRef::Native(n) => n.params(),
        }
    }

    fn clamp_limit(&self, shared: bool) -> f32 {
        let ffn = match (shared, &self.plan.layer.shared) {
            (true, Some(s)) => s.ffn,
            _ => self.plan.layer.ffn,
        };
        ffn.limit().unwrap_or(0.0) as f32
    }

    /// A placeholder of the fixed workspace part (0 table, 1 statistics,
    /// 2 and 3 own keeps, 4 send offsets, 5 receive offsets, then the
    /// `drop = probs` sort's from [`PROBS_WORK`]: its cursor, bucket starts,
    /// keys and rows, the other keys and rows); offsets are patched in
    /// `finish`.
    fn work(&self, which: usize) -> Span {
        self.work_fixed[which.min(FIXED_WORK - 1)]
    }

    /// `drop = probs`: the group's assignments bucketed by expert, sorted in
    /// each bucket by (weight descending, row) with one merge launch per
    /// run width, then kept by their place in the bucket (the sequence
    /// `assign.cu` describes).
    fn assign_keep_probs(
        &mut self,
        index: usize,
        stream: usize,
        label: &str,
        keep: KeepProbs,
    ) -> Result<(), String> {
        let geo = self.geo.clone();
        let assignments = mul(&[geo.group as u64, geo.tokens as u64, geo.top_k as u64])?;
        // Rows and sorted positions are ints on the device.
        if assignments > i32::MAX as u64 {
            return Err(format!(
                "{assignments} assignments in an EP group are more than the device's drop = probs ranking indexes"
            ));
        }
        let i64v = |v: usize| ArgT::I64(v as i64);
        let ints = |span: Span| ArgT::Buf {
            span,
            len: span.bytes / 4,
        };
        let cursor = self.work(PROBS_WORK);
        let starts = self.work(PROBS_WORK + 1);
        let keys = [self.work(PROBS_WORK + 2), self.work(PROBS_WORK + 4)];
        let order = [self.work(PROBS_WORK + 3), self.work(PROBS_WORK + 5)];
        self.push(
            index,
            stream,
            StepKind::Memset {
                span: cursor,
                value: 0,
            },
        );
        let each = Rows::Fixed(assignments);
        let launch = |l: &mut Self, kernel: NativeKernel, args: Vec<ArgT>, rows: Rows| {
            l.add_launch(
                index,
                stream,
                KernelRef::Native(kernel),
                label,
                args,
                rows,
                true,
            )
        };
        launch(
            self,
            NativeKernel::ProbsCount,
            vec![
                keep.meta,
                ints(cursor),
                i64v(geo.tokens),
                i64v(geo.top_k),
                i64v(geo.experts),
            ],
            each,
        )?;
        launch(
            self,
            NativeKernel::ProbsStarts,
            vec![ints(cursor), ints(starts), i64v(geo.experts)],
            Rows::Fixed(1),
        )?;
        launch(
            self,
            NativeKernel::ProbsFill,
            vec![
                keep.meta,
                ints(cursor),
                ints(keys[0]),
                ints(order[0]),
                i64v(geo.top_k),
            ],
            each,
        )?;
        let mut from = 0;
        for shift in moec_kernels::native::probs_merge_shifts(assignments) {
            launch(
                self,
                NativeKernel::ProbsMerge,
                vec![
                    ints(keys[from]),
                    ints(order[from]),
                    ints(starts),
                    ints(keys[1 - from]),
                    ints(order[1 - from]),
                    i64v(geo.experts),
                    ArgT::I64(i64::from(shift)),
                ],
                each,
            )?;
            from = 1 - from;
        }
        launch(
            self,
            NativeKernel::AssignKeepProbs,
            vec![
                ints(order[from]),
                ints(starts),
                keep.dest_rank,
                keep.dest_local,
                ints(keep.table),
                ArgT::Buf {
                    span: keep.kept_own,
                    len: keep.kept_own.bytes,
                },
                i64v(geo.group),
                ArgT::Me,
                i64v(geo.tokens),
                i64v(geo.top_k),
                i64v(geo.experts),
                i64v(geo.chunk_tokens),
                i64v(keep.max_local),
                ArgT::I64(keep.capacity),
            ],
            each,
        )
    }

    /// The assignment kernels (see `kernels/src/cuda_templates/assign.cu`).
    fn assign(
        &mut self,
        index: usize,
        stream: usize,
        chunk: Option<u64>,
        k: &crate::plan::Kernel,
        inputs: &[u32],
        outputs: &[u32],
    ) -> Result<(), String> {
        let pass = k
            .constants
            .iter()
            .find(|(n, _)| n == "pass")
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("`{}` has no `pass` constant", k.name))?;
        if pass >= 2 {
            return self.assign_by_rank(index, stream, chunk, k, pass, (inputs, outputs));
        }
        let (Some(&ids), Some(&weights), Some(&out)) =
            (inputs.first(), inputs.get(1), outputs.first())
        else {
            return Err(format!("`{}` lacks its buffers", k.name));
        };
        let geo = self.geo.clone();
        let geo = &geo;
        let i64v = |v: usize| ArgT::I64(v as i64);
        let whole = |l: &Self, b: u32| -> Result<ArgT, String> {
            let buf = l.buffer(b)?;
            let span = l.regions[b as usize];
            Ok(ArgT::Buf {
                span,
                len: span.bytes / buf.dtype.bytes(),
            })
        };
        let probs = matches!(geo.capacity, Some((_, crate::plan::DropPolicy::Probs)));
        // The counts of a chunk in the metadata: one per expert, then (by
        // rank) one per destination rank (`Geometry::meta_len`).
        let chunk_stride = geo.experts + if geo.by_rank { geo.group } else { 0 };
        let ids_arg = whole(self, ids)?;
        let weights_arg = whole(self, weights)?;
        let n = (geo.tokens * geo.top_k) as u64;
        for (b, what) in [(ids, "expert ids"), (weights, "routing weights")] {
            if self.regions[b as usize].bytes < n * 4 {
                return Err(format!("the {what} buffer is smaller than tokens x top_k"));
            }
        }
        if pass == 0 {
            let meta = self.regions[out as usize];
            if meta.bytes < geo.meta_len() as u64 * 4 {
                return Err("the assignment metadata buffer is too small".into());
            }
            self.push(
                index,
                stream,
                StepKind::Memset {
                    span: meta,
                    value: 0,
                },
            );
            let args = vec![
                ids_arg,
                weights_arg,
                whole(self, out)?,
                i64v(geo.tokens),
                i64v(geo.top_k),
                i64v(geo.experts),
                i64v(geo.chunk_tokens),
                ArgT::I64(i64::from(probs)),
                i64v(chunk_stride),
            ];
            let rows = Rows::Fixed(geo.tokens as u64);
            self.add_launch(
                index,
                stream,
                KernelRef::Native(NativeKernel::AssignCount),
                &k.name,
                args,
                rows,
                true,
            )?;
            if geo.by_rank && !probs {
                // The by-rank row counts travel with the expert counts, so
                // that every rank derives the by-rank table from the
                // exchange alone (`drop = probs` derives them from the
                // exchanged picks).
                let dest_rank = ArgT::Buf {
                    span: self.weights.dest_rank,
                    len: self.weights.dest_rank.bytes / 4,
                };
                let args = vec![
                    ids_arg,
                    dest_rank,
                    whole(self, out)?,
                    ArgT::Me,
                    i64v(geo.top_k),
                    i64v(geo.experts),
                    i64v(geo.chunk_tokens),
                    i64v(chunk_stride),
                ];
                self.add_launch(
                    index,
                    stream,
                    KernelRef::Native(NativeKernel::AssignRankCount),
                    &k.name,
                    args,
                    rows,
                    true,
                )?;
            }
            return Ok(());
        }
        let meta_all = inputs
            .get(2)
            .copied()
            .ok_or_else(|| format!("`{}` lacks its metadata input", k.name))?;
        if self.regions[meta_all as usize].bytes < (geo.meta_len() * geo.group) as u64 * 4 {
            return Err(format!(
                "the gathered metadata holds less than {} ranks' worth",
                geo.group
            ));
        }
        let slots = self.regions[out as usize];
        if slots.bytes < n * 4 {
            return Err("the slots buffer is too small".into());
        }
        self.slots = Some(slots);
        let max_local = self.route_max_local();
        let (table, stats, keep_own, kept_own) =
            (self.work(0), self.work(1), self.work(2), self.work(3));
        let buf = |span: Span, elem: u64| ArgT::Buf {
            span,
            len: span.bytes / elem,
        };
        let dest_rank = buf(self.weights.dest_rank, 4);
        let dest_local = buf(self.weights.dest_local, 4);
        for (span, value) in [
            (table, 0u8),
            (stats, 0),
            (keep_own, 0),
            (kept_own, 0),
            (slots, 0xff),
        ] {
            self.push(index, stream, StepKind::Memset { span, value });
        }
        let capacity = match geo.capacity {
            Some((cap, _)) => cap as i64,
            None => -1,
        };
        let meta_arg = whole(self, meta_all)?;
        let (group, me_arg) = (i64v(geo.group), ArgT::Me);
        if probs {
            let keep = KeepProbs {
                meta: meta_arg,
                dest_rank,
                dest_local,
                table,
                kept_own,
                max_local,
                capacity,
            };
            self.assign_keep_probs(index, stream, &k.name, keep)?;
        } else {
            let args = vec![
                meta_arg,
                dest_rank,
                dest_local,
                buf(table, 4),
                buf(keep_own, 4),
                group,
                me_arg,
                i64v(geo.experts),
                i64v(geo.chunks),
                i64v(max_local),
                ArgT::I64(capacity),
                i64v(chunk_stride),
            ];
            let rows = Rows::Fixed(geo.experts as u64);
            self.add_launch(
                index,
                stream,
                KernelRef::Native(NativeKernel::AssignKeepCounts),
                &k.name,
                args,
                rows,
                true,
            )?;
        }
        let args = vec![
            ids_arg,
            buf(table, 4),
            buf(keep_own, 4),
            buf(kept_own, 1),
            dest_rank,
            dest_local,
            ArgT::Buf {
                span: slots,
                len: slots.bytes / 4,
            },
            buf(stats, 4),
            i64v(geo.group),
            ArgT::Me,
            i64v(geo.tokens),
            i64v(geo.top_k),
            i64v(geo.experts),
            i64v(geo.chunk_tokens),
            i64v(geo.chunks),
            i64v(max_local),
            ArgT::I64(i64::from(probs)),
        ];
        let rows = Rows::Fixed((geo.chunks * geo.group * max_local) as u64);
        self.add_launch(
            index,
            stream,
            KernelRef::Native(NativeKernel::AssignSlots),
            &k.name,
            args,
            rows,
            true,
        )?;
        if let Some(&flag) = outputs.get(1) {
            let f = self.regions[flag as usize];
            let args = vec![
                buf(table, 4),
                ArgT::Buf {
                    span: f,
                    len: f.bytes,
                },
                i64v(geo.group),
                ArgT::Me,
                i64v(geo.chunks),
                i64v(max_local),
                ArgT::I64(i64::try_from(self.plan.choices.expert_rows).unwrap_or(i64::MAX)),
            ];
            self.add_launch(
                index,
                stream,
                KernelRef::Native(NativeKernel::AssignOverflow),
                &k.name,
                args,
                Rows::Fixed(1),
                true,
            )?;
        }
        // Where every cell's rows start, for the copies between virtual
        // ranks (and checked against the padded slots of capacity plans).
        let args = vec![
            buf(table, 4),
            buf(self.work(4), 4),
            buf(self.work(5), 4),
            i64v(geo.group),
            i64v(max_local),
            ArgT::I64(i64::try_from(self.padded).unwrap_or(i64::MAX)),
        ];
        self.add_launch(
            index,
            stream,
            KernelRef::Native(NativeKernel::RouteOffsets),
            &k.name,
            args,
            Rows::Fixed((geo.chunks * geo.group * geo.group) as u64),
            true,
        )?;
        if geo.by_rank {
            // The routing and the gathered metadata travel back with the
            // table: the host lays this rank's by-rank rows out from them
            // (`StepKind::ByRank`), needing no other rank's routing.
            let all = (geo.meta_len() * geo.group) as u64 * 4;
            for (b, to, bytes) in [
                (ids, ROUTING_WORK, n * 4),
                (weights, ROUTING_WORK + 1, n * 4),
                (meta_all, ROUTING_WORK + 2, all),
            ] {
                let src = self.regions[b as usize].sub(0, bytes, &self.buffer(b)?.name)?;
                let dst = self.work(to);
                self.push(index, stream, StepKind::Copy { src, dst });
            }
        }
        self.push(index, stream, StepKind::ReadRoute);
        Ok(())
    }

    /// `assign_rank` (pass 2): what the host computes of this rank's send
    /// side and uploads ([`ByRankStep::Source`]) into the chunk's part of
    /// the outputs. `assign_expand` (pass 3): the device lays out the
    /// received rows from the picks that came with them
    /// ([`NativeKernel::AssignExpand`]), after the host uploads the chunk's
    /// table frame ([`ByRankStep::Frame`]) on the same stream, so no pass
    /// waits for the host a second time.
    fn assign_by_rank(
        &mut self,
        index: usize,
        stream: usize,
        chunk: Option<u64>,
        k: &crate::plan::Kernel,
        pass: i64,
        (inputs, outputs): (&[u32], &[u32]),
    ) -> Result<(), String> {
        let (Some(&first), Some(&second)) = (outputs.first(), outputs.get(1)) else {
            return Err(format!("`{}` lacks its buffers", k.name));
        };
        if !self.geo.by_rank {
            return Err(format!(
                "`{}` in a plan that does not dispatch by rank",
                k.name
            ));
        }
        let (first, _) = self.region(first, chunk)?;
        let (second, _) = self.region(second, chunk)?;
        let op_chunk = chunk;
        let chunk = chunk.unwrap_or(0) as usize;
        match pass {
            2 => {
                let step = ByRankStep::Source {
                    chunk,
                    rank_slots: first,
                    picks: second,
                };
                self.push(index, stream, StepKind::ByRank(step));
                Ok(())
            }
            3 => {
                let picks = inputs
                    .first()
                    .copied()
                    .ok_or_else(|| format!("`{}` lacks its pick rows", k.name))?;
                let (picks, _) = self.region(picks, op_chunk)?;
                self.push(index, stream, StepKind::ByRank(ByRankStep::Frame { chunk }));
                let ints = |span: Span| ArgT::Buf {
                    span,
                    len: span.bytes / 4,
                };
                let i64v = |v: usize| ArgT::I64(v as i64);
                let group = self.geo.group;
                let max_local = self.route_max_local();
                let args = vec![
                    ints(picks),
                    ints(self.work(FRAME_WORK)),
                    ints(first),
                    ints(second),
                    i64v(group),
                    i64v(max_local),
                    i64v(self.geo.top_k),
                    i64v(chunk),
                ];
                let rows = Rows::Fixed(mul(&[group as u64, max_local as u64])?);
                let label = k.name.clone();
                self.add_launch(
                    index,
                    stream,
                    KernelRef::Native(NativeKernel::AssignExpand),
                    &label,
                    args,
                    rows,
                    false,
                )
            }
            other => Err(format!("`{}`: no assignment pass {other}", k.name)),
        }
    }

    fn route_max_local(&self) -> usize {
        route_shape(&self.geo).max_local
    }

    fn gemm(
        &mut self,
        index: usize,
        stream: usize,
        op: &crate::plan::Op,
        weight: GemmWeight,
        (a, c, plan_n, plan_m): (u32, u32, u64, u64),
        (epilogue, by_rank): (Epilogue, Option<crate::plan::RankIndex>),
    ) -> Result<(), String> {
        let plan = self.plan;
        let h = plan.layer.hidden;
        let (mut a_span, a_buf) = self.region(a, op.chunk)?;
        let (c_span, c_buf) = self.region(c, op.chunk)?;
        let by_rank = match by_rank {
            Some(r) => Some((
                self.region(r.index, op.chunk)?.0,
                self.region(r.weights, op.chunk)?.0,
            )),
            None => None,
        };
        let (k, n, groups, ffn) = match weight {
            GemmWeight::RouterGate => {
                let k = h;
                let rows = a_span.bytes / (k * a_buf.dtype.bytes()).max(1);
                (k, plan.layer.experts, Groups::Fixed(rows), None)
            }
            GemmWeight::SharedUp | GemmWeight::SharedDown => {
                let f = self
                    .weights
                    .shared
                    .ok_or_else(|| "a shared-expert GEMM without shared experts".to_string())?;
                let rows = Groups::Fixed(self.geo.tokens as u64);
                if weight == GemmWeight::SharedUp {
                    (h, f.up_rows, rows, Some(f))
                } else {
                    (f.width, h, rows, Some(f))
                }
            }
            GemmWeight::ExpertUp | GemmWeight::ExpertDown => {
                let f = *self
                    .weights
                    .experts
                    .first()
                    .ok_or_else(|| "this plan places no experts".to_string())?;
                let rows = Groups::Experts(op.chunk.unwrap_or(0) as usize);
                if weight == GemmWeight::ExpertUp {
                    (h, f.up_rows, rows, Some(f))
                } else {
                    (f.width, h, rows, Some(f))
                }
            }
        };
        if !matches!(a_buf.dtype, DType::F32 | DType::Bf16 | DType::F16) {
            return Err(format!(
                "a GEMM input in {} (`{}`) is not supported",
                a_buf.dtype.name(),
                a_buf.name
            ));
        }
        if n != plan_n {
            return Err(format!(
                "the plan says n = {plan_n}, the weights give n = {n}"
            ));
        }
        let name = weight_name(weight);
        let out_cols = match (epilogue, ffn) {
            (Epilogue::Activation, Some(f)) => f.width,
            (Epilogue::Activation, None) => {
                return Err("an activation epilogue on the router GEMM".into())
            }
            (Epilogue::None, _) => n,
        };
        let tail = self.gemm_tail(op, weight, (epilogue, by_rank), c_buf.dtype)?;
        // The fused expansion: the GEMM reads the gather workspace, the
        // plan's `m` expert rows of `a`'s width.
        let gather = match (by_rank, weight) {
            (Some((index, weights)), GemmWeight::ExpertUp) => {
                let bytes = mul(&[plan_m, k, a_buf.dtype.bytes()])?;
                self.gathered_need[stream] = self.gathered_need[stream].max(bytes);
                let gather = RankGather {
                    kernel: self.labelled(super::plan::EXPERT_GATHER)?,
                    rows: a_span,
                    index,
                    weights,
                };
                a_span = Span {
                    space: Space::Work,
                    offset: u64::MAX,
                    bytes,
                };
                Some(gather)
            }
            _ => None,
        };
        // Accumulator rows: every row `a` holds.
        let a_rows = a_span.bytes / (k * a_buf.dtype.bytes()).max(1);
        let acc_bytes = mul(&[a_rows, n, 4])?;
        self.acc_need[stream] = self.acc_need[stream].max(acc_bytes);
        // The second accumulator: only where a bias is added before an
        // activation or a reduction (`gemm_store` into it, then the
        // activation or the reduction reads it).
        let biased_bytes = match tail {
            Tail::Activation { store: Some(_), .. } | Tail::Reduce { store: Some(_), .. } => {
                acc_bytes
            }
            _ => 0,
        };
        self.biased_need[stream] = self.biased_need[stream].max(biased_bytes);
        let params = match tail {
            Tail::Direct => Vec::new(),
            Tail::Store { kernel } => self.params_of(KernelRef::Generated(kernel)),
            Tail::Activation { kernel, .. } | Tail::Reduce { kernel, .. } => {
                self.params_of(KernelRef::Generated(kernel))
            }
        };
        let label = format!("{name} gemm");
        let status = self.slot(index, &label, params, false);
        let placeholder = |bytes: u64| Span {
            space: Space::Work,
            offset: u64::MAX,
            bytes,
        };
        self.push(
            index,
            stream,
            StepKind::Gemm(GemmStep {
                weight,
                a: a_span,
                a_dtype: a_buf.dtype,
                c: c_span,
                c_dtype: c_buf.dtype,
                k,
                n,
                out_cols,
                groups,
                tail,
                gather,
                acc: placeholder(acc_bytes),
                biased: placeholder(biased_bytes),
                status,
                label,
            }),
        );
        Ok(())
    }

    /// What happens to a GEMM's `f32` product: cuBLAS writes the output,
    /// a store, the activation, or the reduction through the expansion
    /// index (each with the bias's store where there is one).
    fn gemm_tail(
        &mut self,
        op: &crate::plan::Op,
        weight: GemmWeight,
        (epilogue, by_rank): (Epilogue, Option<(Span, Span)>),
        c_dtype: DType,
    ) -> Result<Tail, String> {
        let has_bias = super::plan::gemm_has_bias(self.plan, weight);
        let name = weight_name(weight);
        // `gemm_store` of the bias into the second accumulator, before an
        // activation or a reduction reads it.
        let bias_store = if has_bias {
            Some(self.labelled(&format!("{name}_store"))?)
        } else {
            None
        };
        Ok(match (epilogue, by_rank, weight) {
            (Epilogue::None, Some((index, weights)), GemmWeight::ExpertDown) => Tail::Reduce {
                store: bias_store,
                kernel: self.labelled(super::plan::EXPERT_REDUCE)?,
                index,
                weights,
            },
            (_, Some(_), GemmWeight::ExpertUp) | (_, None, _) => match epilogue {
                Epilogue::None if c_dtype == DType::F32 && !has_bias => Tail::Direct,
                Epilogue::None => Tail::Store {
                    kernel: match bias_store {
                        Some(k) => k,
                        None => self.labelled(&format!("{name}_store"))?,
                    },
                },
                Epilogue::Activation => {
                    let label = if weight == GemmWeight::SharedUp {
                        "shared_activation"
                    } else {
                        "expert_activation"
                    };
                    Tail::Activation {
                        store: bias_store,
                        kernel: self.labelled(label)?,
                        limit: self.clamp_limit(weight == GemmWeight::SharedUp),
                    }
                }
            },
            (_, Some(_), _) => {
                return Err(format!(
                    "`{}`: only the expert projections go through the expansion index",
                    op.name
                ))
            }
        })
    }

    /// Places the workspace and patches the steps' workspace spans.
    fn finish(self) -> Result<Program, String> {
        // Needed (and required to hold) only by the hierarchical legs.
        let topo = self.topology();
        let Lowering {
            plan,
            geo,
            kernels,
            weights,
            status,
            mut steps,
            ops,
            acc_need,
            biased_need,
            gathered_need,
            scratch_need,
            forward_need,
            exchange_need,
            work_fixed,
            padded,
            ..
        } = self;
        let mut w = Placer::new(Space::Work);
        let status_span = w.take(mul(&[status.len() as u64, STATUS_BYTES])?)?;
        let mut placed = work_fixed;
        for i in FIXED_ORDER {
            placed[i] = w.take(placed[i].bytes)?;
        }
        let [table, stats, keep_own, kept_own, send_off, recv_off, ..] = placed;
        let (routing_ids, routing_weights, routing_meta) = (
            placed[ROUTING_WORK],
            placed[ROUTING_WORK + 1],
            placed[ROUTING_WORK + 2],
        );
        let mut streams = Vec::with_capacity(acc_need.len());
        for (((((acc, biased), scratch), forward), gathered), exchange) in acc_need
            .iter()
            .zip(&biased_need)
            .zip(&scratch_need)
            .zip(&forward_need)
            .zip(&gathered_need)
            .zip(&exchange_need)
        {
            streams.push(StreamWork {
                acc: w.take(*acc)?,
                biased: w.take(*biased)?,
                gathered: w.take(*gathered)?,
                scratch: w.take(*scratch)?,
                forward_parts: w.take(forward.0)?,
                forward_index: w.take(forward.1)?,
                pack: w.take(exchange.pack.min(LEG_WORKSPACE_LIMIT))?,
                unpack: w.take(exchange.unpack.min(LEG_WORKSPACE_LIMIT))?,
                runs: w.take(exchange.runs)?,
                piece: exchange.piece(),
            });
        }
        let staged = place_staged_exchange(&mut w, (&geo, topo), &steps)?;
        let work = WorkLayout {
            status: status_span,
            table,
            stats,
            keep_own,
            kept_own,
            send_off,
            recv_off,
            routing_ids,
            routing_weights,
            routing_meta,
            expand_frame: placed[FRAME_WORK],
            staged,
            streams,
            bytes: w.total(),
        };
        // Patch: the fixed placeholders sit at offset 0 of the work space.
        let patch = |span: &mut Span| {
            if span.space != Space::Work {
                return;
            }
            if let Some(i) = work_fixed.iter().position(|p| p == span) {
                *span = placed[i];
            }
        };
        for step in &mut steps {
            match &mut step.kind {
                StepKind::Memset { span, .. } => patch(span),
                StepKind::Copy { src, dst } => {
                    patch(src);
                    patch(dst);
                }
                StepKind::Launch(l) => {
                    for a in &mut l.args {
                        if let ArgT::Buf { span, .. } = a {
                            patch(span);
                        }
                    }
                }
                StepKind::Gemm(g) => {
                    let sw = work.streams[step.stream];
                    g.acc = Span {
                        bytes: g.acc.bytes,
                        ..sw.acc
                    };
                    g.biased = Span {
                        bytes: g.biased.bytes,
                        ..sw.biased
                    };
                    if g.gather.is_some() {
                        g.a = Span {
                            bytes: g.a.bytes,
                            ..sw.gathered
                        };
                    }
                }
                _ => {}
            }
        }
        let x_index = plan
            .buffers
            .iter()
            .position(|b| b.role == crate::plan::BufferRole::Input)
            .ok_or("the plan has no input buffer")?;
        let out_index = plan
            .buffers
            .iter()
            .position(|b| b.role == crate::plan::BufferRole::Output)
            .ok_or("the plan has no output buffer")?;
        let span_of = |i: usize| Span {
            space: Space::Arena,
            offset: plan.buffers[i].offset,
            bytes: plan.buffers[i].bytes,
        };
        let route = route_shape(&geo);
        let group = geo.group;
        let ranks = usize::try_from(plan.mesh.world_size()).map_err(|_| "the mesh is too large")?;
        Ok(Program {
            kernels,
            ops,
            steps,
            streams: plan.streams.len(),
            events: plan.events,
            ranks,
            group,
            geometry: geo,
            route,
            arena_bytes: plan.memory.peak_activation_bytes,
            weights,
            work,
            x: span_of(x_index),
            x_dtype: plan.buffers[x_index].dtype,
            out: span_of(out_index),
            out_dtype: plan.buffers[out_index].dtype,
            status,
            layer_dtype: plan.layer.dtype,
            hidden: plan.layer.hidden,
            padded,
            slots: self.slots,
            gpus_per_node: usize::try_from(plan.mesh.gpus_per_node)
                .map_err(|_| "gpus_per_node does not fit this machine")?,
            row_bounds: plan.row_bounds(),
        })
    }
}

/// The staged exchange's workspace, when a step is the hierarchical
/// dispatch's inter-node leg (a process that holds only part of an EP group
/// exchanges the staged routing over NCCL).
fn place_staged_exchange(
    w: &mut Placer,
    (geo, topo): (&Geometry, Result<Topology, String>),
    steps: &[Step],
) -> Result<StagedExchange, String> {
    let inter_dispatch = steps.iter().any(|s| {
        matches!(&s.kind, StepKind::Collective(c)
            if c.dispatch && c.scope == CollectiveScope::InterNode)
    });
    if !inter_dispatch {
        let none = Span {
            space: Space::Work,
            offset: 0,
            bytes: 0,
        };
        return Ok(StagedExchange {
            counts: none,
            routing: none,
            routing_sent: 0,
            routing_received: 0,
        });
    }
    let topo = topo?;
    let (nodes, per_node) = (topo.nodes as u64, topo.per_node as u64);
    let (sent, received) =
        StagedExchange::sized(geo.chunk_tokens as u64, geo.top_k as u64, nodes, per_node);
    Ok(StagedExchange {
        counts: w.take(mul(&[nodes, 4, 4])?)?,
        routing: w.take(mul(&[sent.saturating_add(received), 4])?)?,
        routing_sent: sent,
        routing_received: received,
    })
}

/// Scratch bytes per thread of a kernel (a generated one's local arrays).
fn scratch_per_thread(kernels: &PlanKernels, k: KernelRef) -> u64 {
    match k {
        KernelRef::Generated(i) => kernels
            .module
            .kernels()
            .get(i)
            .map_or(0, |k| k.scratch_bytes_per_thread()),
        KernelRef::Native(_) => 0,
    }
}

/// The routing data's shape for a plan's geometry.
pub fn route_shape(geo: &Geometry) -> RouteShape {
    RouteShape {
        chunks: geo.chunks,
        group: geo.group,
        max_local: geo
            .experts_of
            .iter()
            .map(Vec::len)
            .max()
            .unwrap_or(1)
            .max(1),
        experts: geo.experts,
    }
}

/// Checks launch arguments against a kernel's parameters: one argument per
/// parameter, buffers for buffers (a whole number of elements), `f32` and
/// `i64` scalars for theirs.
pub fn check_args(label: &str, params: &[Param], args: &[ArgT]) -> Result<(), String> {
    if params.len() != args.len() {
        return Err(format!(
            "`{label}`: {} arguments for {} parameters",
            args.len(),
            params.len()
        ));
    }
    for (p, a) in params.iter().zip(args) {
        let ok = match (p.kind, a) {
            (ParamKind::Buffer { elem, .. }, ArgT::Buf { span, len }) => {
                span.bytes == len * elem.bytes() as u64
            }
            (ParamKind::Scalar(Ty::F32), ArgT::F32(_)) => true,
            (ParamKind::Scalar(Ty::I64), ArgT::I64(_) | ArgT::Me) => true,
            _ => false,
        };
        if !ok {
            return Err(format!(
                "`{label}`: argument {a:?} does not fit parameter `{}` ({:?})",
                p.name, p.kind
            ));
        }
    }
    Ok(())
}

/// The weight layout of a plan (see [`WeightLayout`]).
fn weight_layout(plan: &Plan, geo: &Geometry) -> Result<WeightLayout, String> {
    let l = &plan.layer;
    // Each GEMM weight is stored in its GEMM input's dtype.
    let mut dtypes: BTreeMap<&'static str, DType> = BTreeMap::new();
    for (_, op) in plan.ops() {
        if let OpKind::Gemm { weight, a, .. } = op.kind {
            let a_dtype = plan
                .buffers
                .get(a as usize)
                .map(|b| b.dtype)
                .ok_or_else(|| format!("buffer b{a} does not exist"))?;
            let name = weight_name(weight);
            match dtypes.insert(name, a_dtype) {
                Some(prev) if prev != a_dtype => {
                    return Err(format!(
                        "the {name} weights multiply inputs in {} and in {}",
                        prev.name(),
                        a_dtype.name()
                    ))
                }
                _ => {}
            }
        }
    }
    let dt = |w: GemmWeight| dtypes.get(weight_name(w)).copied().unwrap_or(l.dtype);
    let (h, e, g) = (l.hidden, l.experts, geo.group as u64);
    let mut p = Placer::new(Space::Weights);
    let router = p.take(mul(&[e, h, dt(GemmWeight::RouterGate).bytes()])?)?;
    let router_bias = p.take(if l.router.selection_bias {
        mul(&[e, 4])?
    } else {
        0
    })?;
    let shared_gate = p.take(match &l.shared {
        Some(s) if s.sigmoid_gate => mul(&[h, 4])?,
        _ => 0,
    })?;
    let dest_rank = p.take(mul(&[g, e, 4])?)?;
    let dest_local = p.take(mul(&[g, e, 4])?)?;
    let ffn = |p: &mut Placer,
               width: u64,
               gated: bool,
               bias: bool,
               up: GemmWeight,
               down: GemmWeight|
     -> Result<FfnSpans, String> {
        let up_rows = if gated { 2 * width } else { width };
        Ok(FfnSpans {
            up: p.take(mul(&[up_rows, h, dt(up).bytes()])?)?,
            up_bias: if bias {
                Some(p.take(mul(&[up_rows, 4])?)?)
            } else {
                None
            },
            down: p.take(mul(&[h, width, dt(down).bytes()])?)?,
            down_bias: if bias {
                Some(p.take(mul(&[h, 4])?)?)
            } else {
                None
            },
            width,
            up_rows,
        })
    };
    let max_local = geo.experts_of.iter().map(Vec::len).max().unwrap_or(0);
    let mut experts = Vec::with_capacity(max_local);
    for _ in 0..max_local {
        experts.push(ffn(
            &mut p,
            l.intermediate,
            l.ffn.gated(),
            l.expert_bias,
            GemmWeight::ExpertUp,
            GemmWeight::ExpertDown,
        )?);
    }
    let shared = match &l.shared {
        Some(s) => Some(ffn(
            &mut p,
            mul(&[s.count, s.intermediate])?,
            s.ffn.gated(),
            s.bias,
            GemmWeight::SharedUp,
            GemmWeight::SharedDown,
        )?),
        None => None,
    };
    let router_logit_bias = if l.router.logit_bias {
        Some(p.take(mul(&[e, 4])?)?)
    } else {
        None
    };
    let mut dtypes_out = BTreeMap::new();
    for w in [
        GemmWeight::RouterGate,
        GemmWeight::ExpertUp,
        GemmWeight::ExpertDown,
        GemmWeight::SharedUp,
        GemmWeight::SharedDown,
    ] {
        dtypes_out.insert(weight_name(w), dt(w));
    }
    Ok(WeightLayout {
        router,
        router_logit_bias,
        router_bias,
        shared_gate,
        dest_rank,
        dest_local,
        experts,
        shared,
        dtypes: dtypes_out,
        bytes: p.total(),
    })
}
