//! The thin driver layer: the issuer's [`Target`] on a GPU, through cudarc.
//!
//! Everything here is a direct translation of one [`Command`] into driver,
//! cuBLAS or NCCL calls; the decisions (what runs where, in which order,
//! with which arguments) were made by the lowering and the issuer, which the
//! tests run on a host emulation. This file is what a GPU is needed for.
//!
//! - One `CudaContext` (the primary context of the chosen device), with
//!   cudarc's automatic event tracking off: the plan's events order the
//!   work, and nothing here uses cudarc's tracked `CudaSlice`s.
//! - Per rank: three raw device allocations (arena, weights, workspace,
//!   sizes from the [`Program`]), one non-blocking CUDA stream per plan
//!   stream, a cuBLAS handle per stream, the plan's events and the
//!   collectives' events (created on first use, timing disabled), and a
//!   pinned host buffer for the routing read-back.
//! - Two modules: the plan's generated kernels and the native assignment
//!   kernels, compiled by NVRTC to a cubin for the device's architecture
//!   (queried here), cached by [`PtxCache`](super::PtxCache), loaded with
//!   `cuModuleLoadData` (the cubin, so the driver JIT-compiles nothing and
//!   an NVRTC newer than the driver works; see [`super::nvrtc`]).
//! - GEMMs: `cublasGemmEx` per row group (`f32` output and compute; the
//!   row-major `c = a · wᵀ` is the column-major `cᵀ = w · aᵀ`). A grouped
//!   `cublasGemmGroupedBatchedEx` over the local experts is the next step.
//! - NCCL: a communicator per process, initialised non-blocking with the id
//!   from the rendezvous ([`super::rdzv`]) and polled with a deadline; an
//!   exchange is one `ncclGroupStart` / sends / receives / `ncclGroupEnd`.

use std::collections::BTreeMap;
use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaGraph, CudaStream, DriverError};
use cudarc::nccl::{result as nccl_result, sys as nccl_sys};
use moec_kernels::native::NativeKernel;

use super::issue::{Addr, Arg, Command, EventId, Target};
use super::nvrtc::Ptx;
use super::program::{KernelRef, Program, Space, CUBLAS_WORKSPACE_BYTES as CUBLAS_WORKSPACE};
use super::rdzv::{self, Launch, ID_BYTES};
use crate::plan::DType;

/// A driver error as `NAME: description`.
pub fn describe(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name}: {}", s.to_string_lossy()),
        Err(_) => name,
    }
}

fn drv<T>(what: &str, r: Result<T, DriverError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {}", describe(e)))
}

fn blas_err<T>(what: &str, r: Result<T, blas::CublasError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: cuBLAS {:?}", e.0))
}

fn nccl_message(r: nccl_sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for
    // any result code.
    let s = unsafe { nccl_sys::ncclGetErrorString(r) };
    if s.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, NUL-terminated, static (see above).
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

fn nccl_err<T>(what: &str, r: Result<T, nccl_result::NcclError>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: NCCL {}", nccl_message(e.0)))
}

/// Between two polls of the device: spin (yielding) for the first two
/// milliseconds, since a routing read-back or the end of a pass usually
/// lands within tens of microseconds and a sleep would add its own
/// granularity to the layer's time; then sleep, so a long wait does not
/// burn a core.
fn backoff(started: Instant) {
    if started.elapsed() < Duration::from_millis(2) {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// One raw device allocation, freed on drop.
struct Alloc {
    ptr: sys::CUdeviceptr,
    bytes: u64,
}

impl Alloc {
    fn new(bytes: u64, what: &str) -> Result<Alloc, String> {
        let n = usize::try_from(bytes.max(256)).map_err(|_| format!("{what} is too large"))?;
        // SAFETY: a plain allocation of `n` bytes in the current context
        // (bound by the caller); the memory is zeroed before any use below
        // (`CudaTarget::new` waits for the zeroing before it returns).
        let ptr = drv(what, unsafe { result::malloc_sync(n) })?;
        // SAFETY: `ptr` was just allocated with `n` bytes.
        drv(what, unsafe { result::memset_d8_sync(ptr, 0, n) })?;
        Ok(Alloc { ptr, bytes })
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `malloc_sync` and is freed once, here;
        // the owner synchronised the device before dropping (errors are
        // ignored: nothing can be done about them in a drop).
        let _ = unsafe { result::free_sync(self.ptr) };
    }
}

/// Page-locked host memory for read-backs, freed on drop.
struct Pinned {
    ptr: *mut c_void,
    bytes: usize,
}

impl Pinned {
    fn new(bytes: usize) -> Result<Pinned, String> {
        // SAFETY: a plain page-locked allocation in the current context.
        let ptr = drv("pinned host memory", unsafe {
            result::malloc_host(bytes.max(1), 0)
        })?;
        Ok(Pinned { ptr, bytes })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `malloc_host`, freed once, after the
        // device finished with it (the owner synchronised).
        let _ = unsafe { result::free_host(self.ptr) };
    }
}

/// A loaded module and its functions, unloaded on drop.
struct Module {
    handle: sys::CUmodule,
    functions: Vec<sys::CUfunction>,
}

impl Module {
    /// Loads the cubin of `code` (for this device's architecture, so that
    /// the driver JIT-compiles nothing), or its PTX when it has none.
    fn load(code: &Ptx, symbols: &[String], what: &str) -> Result<Module, String> {
        let handle = if code.cubin.is_empty() {
            let image = CString::new(code.text.as_str())
                .map_err(|_| format!("{what}: the PTX holds a NUL byte"))?;
            // SAFETY: `image` is a NUL-terminated PTX text that outlives the call.
            drv(what, unsafe {
                result::module::load_data(image.as_ptr().cast::<c_void>())
            })?
        } else {
            // An ELF image, copied into 8-byte aligned memory.
            let mut image = vec![0u64; code.cubin.len().div_ceil(8)];
            // SAFETY: `image` holds at least `cubin.len()` bytes; the two
            // buffers are distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    code.cubin.as_ptr(),
                    image.as_mut_ptr().cast::<u8>(),
                    code.cubin.len(),
                )
            };
            // SAFETY: `image` is a whole cubin (its ELF header gives its
            // size) that outlives the call.
            drv(what, unsafe {
                result::module::load_data(image.as_ptr().cast::<c_void>())
            })?
        };
        let mut module = Module {
            handle,
            functions: Vec::new(),
        };
        for s in symbols {
            let name = CString::new(s.as_str()).map_err(|_| format!("{what}: bad symbol {s}"))?;
            // SAFETY: `handle` is a loaded module; `name` is NUL-terminated.
            let f = drv(&format!("{what}: {s}"), unsafe {
                result::module::get_function(module.handle, name)
            })?;
            module.functions.push(f);
        }
        Ok(module)
    }
}

impl Module {
    /// No module (what a leaked one is replaced with).
    fn none() -> Module {
        Module {
            handle: std::ptr::null_mut(),
            functions: Vec::new(),
        }
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.handle.is_null() {
            return;
        }
        // SAFETY: the module was loaded once and is unloaded once, after the
        // device finished every launch of its functions.
        let _ = unsafe { result::module::unload(self.handle) };
    }
}

/// A cuBLAS handle bound to one stream, destroyed on drop.
struct Blas(blas_sys::cublasHandle_t);

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle`, destroyed once.
        let _ = unsafe { blas::destroy_handle(self.0) };
    }
}

/// The NCCL communicator of this process, aborted on drop.
struct Nccl {
    comm: nccl_sys::ncclComm_t,
    timeout: Duration,
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised once and is torn down
        // once (abort never blocks on peers).
        let _ = unsafe { nccl_sys::ncclCommAbort(self.comm) };
    }
}

impl Nccl {
    /// Creates the world communicator of `launch` (non-blocking init,
    /// polled until `timeout`).
    fn new(launch: &Launch, plan_hash: u64, timeout: Duration) -> Result<Nccl, String> {
        // SAFETY: probing only dlopens candidate names.
        if !unsafe { nccl_sys::is_culib_present() } {
            return Err(
                "libnccl not found (cudarc opens `libnccl.so`; pip's nvidia-nccl wheel has only libnccl.so.2: link libnccl.so to it in a folder on LD_LIBRARY_PATH)"
                    .into(),
            );
        }
        let id = if launch.rank == 0 {
            let id = nccl_err("ncclGetUniqueId", nccl_result::get_uniqueid())?;
            Some(id.internal.map(|c| c as u8))
        } else {
            None
        };
        let id = rdzv::exchange(launch, id, plan_hash, timeout)?;
        let mut unique = nccl_sys::ncclUniqueId {
            internal: [0; ID_BYTES],
        };
        for (d, s) in unique.internal.iter_mut().zip(id) {
            *d = s as _;
        }
        let version = nccl_err("ncclGetVersion", nccl_result::get_nccl_version())?;
        let undef = i32::MIN;
        let mut config = nccl_sys::ncclConfig_t {
            size: std::mem::size_of::<nccl_sys::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: version as u32,
            blocking: 0,
            cgaClusterSize: undef,
            minCTAs: undef,
            maxCTAs: undef,
            netName: std::ptr::null(),
            splitShare: undef,
            trafficClass: undef,
            commName: std::ptr::null(),
            collnetEnable: undef,
            CTAPolicy: undef,
            shrinkShare: undef,
            nvlsCTAs: undef,
            nChannelsPerNetPeer: undef,
            nvlinkCentricSched: undef,
            graphUsageMode: undef,
            numRmaCtx: undef,
            maxP2pPeers: undef,
        };
        let mut comm: nccl_sys::ncclComm_t = std::ptr::null_mut();
        let (world, rank) = (
            c_int::try_from(launch.world).map_err(|_| "too many ranks")?,
            c_int::try_from(launch.rank).map_err(|_| "rank too large")?,
        );
        // SAFETY: `comm` and `config` are valid out/in pointers for the call;
        // the id is the one every rank received.
        let r = unsafe {
            nccl_sys::ncclCommInitRankConfig(&mut comm, world, unique, rank, &mut config)
        };
        nccl_err("ncclCommInitRankConfig", r.result())?;
        let nccl = Nccl { comm, timeout };
        nccl.settle("ncclCommInitRank (a peer is missing?)")?;
        Ok(nccl)
    }

    /// Polls the communicator until no operation is in progress, or fails
    /// (aborting it) after the timeout.
    fn settle(&self, what: &str) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut state = nccl_sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is a live communicator; `state` an out-pointer.
            let r = unsafe { nccl_sys::ncclCommGetAsyncError(self.comm, &mut state) };
            nccl_err(what, r.result())?;
            match state {
                nccl_sys::ncclResult_t::ncclSuccess => return Ok(()),
                nccl_sys::ncclResult_t::ncclInProgress => {}
                other => return Err(format!("{what}: NCCL {}", nccl_message(other))),
            }
            if Instant::now() >= deadline {
                return Err(format!("{what}: timed out after {:?}", self.timeout));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// The first asynchronous error of the communicator, if any.
    fn check(&self) -> Result<(), String> {
        let mut state = nccl_sys::ncclResult_t::ncclSuccess;
        // SAFETY: as in `settle`.
        let r = unsafe { nccl_sys::ncclCommGetAsyncError(self.comm, &mut state) };
        nccl_err("ncclCommGetAsyncError", r.result())?;
        match state {
            nccl_sys::ncclResult_t::ncclSuccess | nccl_sys::ncclResult_t::ncclInProgress => Ok(()),
            other => Err(format!("NCCL: {}", nccl_message(other))),
        }
    }
}

/// One rank's device state (fields drop in order: the cuBLAS handles before
/// the streams they are bound to).
struct RankDev {
    blas: Vec<Blas>,
    /// Each handle's workspace, held (and freed after the handles).
    _blas_work: Vec<Alloc>,
    events: BTreeMap<(u32, bool), CudaEvent>,
    streams: Vec<Arc<CudaStream>>,
    arena: Alloc,
    weights: Alloc,
    work: Alloc,
    readback: Pinned,
    readback_len: usize,
    readback_done: Option<CudaEvent>,
}

impl RankDev {
    fn base(&self, space: Space) -> &Alloc {
        match space {
            Space::Arena => &self.arena,
            Space::Weights => &self.weights,
            Space::Work => &self.work,
        }
    }
}

/// How the GPU executes: the device, the modules, the local ranks.
pub struct CudaTarget {
    // Fields drop in order: the graph and the communicator first, the
    // context last.
    graph: Option<CudaGraph>,
    /// The stream a capture began on (rank, stream), until it ends.
    capturing: Option<(usize, usize)>,
    nccl: Option<Nccl>,
    ranks: BTreeMap<usize, RankDev>,
    /// Timing events of profiled passes, by stamp number (made on first use).
    stamps: Vec<CudaEvent>,
    generated: Module,
    native: Module,
    timeout: Duration,
    /// A wait for the device or a peer failed (a timeout, an NCCL error):
    /// work may be stuck on the device, so the teardown waits only briefly.
    stalled: AtomicBool,
    // Last: everything above is released while the context is alive.
    ctx: Arc<CudaContext>,
}

/// How long the teardown waits for the device once a wait has failed
/// (after the communicator's abort, NCCL's kernels return at once).
const STALLED_DRAIN: Duration = Duration::from_secs(2);

/// The steps of tearing a target down, in the order [`teardown`] takes them.
trait Teardown {
    /// Aborts the NCCL communicator, if any: its kernels stop waiting for
    /// peers (`ncclCommAbort` never blocks on them).
    fn abort_comm(&mut self);
    /// Waits up to `bound` for every stream; false when they did not finish.
    fn drain(&mut self, bound: Duration) -> bool;
    /// Gives up the device's memory, modules, graph and context without
    /// freeing them (freeing waits for the device; the process's exit
    /// releases them).
    fn leak(&mut self);
}

/// Tears a target down without hanging: the communicator is aborted before
/// anything waits for the device (a kernel waiting for a dead peer would
/// never finish otherwise), the wait is bounded (by the timeout, or by
/// [`STALLED_DRAIN`] once a wait has failed), and what the device may
/// still use is leaked rather than freed.
fn teardown(t: &mut impl Teardown, timeout: Duration, stalled: bool) {
    t.abort_comm();
    let bound = if stalled {
        STALLED_DRAIN.min(timeout)
    } else {
        timeout
    };
    if !t.drain(bound) {
        t.leak();
    }
}

impl Teardown for CudaTarget {
    fn abort_comm(&mut self) {
        drop(self.nccl.take());
    }

    fn drain(&mut self, bound: Duration) -> bool {
        let started = Instant::now();
        let mut marks = Vec::new();
        for dev in self.ranks.values() {
            for s in &dev.streams {
                match self.ctx.new_event(None).and_then(|ev| {
                    ev.record(s)?;
                    Ok(ev)
                }) {
                    Ok(ev) => marks.push(ev),
                    Err(_) => return false,
                }
            }
        }
        for ev in &marks {
            loop {
                match ev.try_is_complete() {
                    Ok(true) => break,
                    Ok(false) if started.elapsed() < bound => backoff(started),
                    _ => return false,
                }
            }
        }
        true
    }

    fn leak(&mut self) {
        std::mem::forget(std::mem::take(&mut self.ranks));
        std::mem::forget(std::mem::take(&mut self.stamps));
        std::mem::forget(self.graph.take());
        std::mem::forget(std::mem::replace(&mut self.generated, Module::none()));
        std::mem::forget(std::mem::replace(&mut self.native, Module::none()));
        // The context's last reference would release (destroy) it.
        std::mem::forget(Arc::clone(&self.ctx));
    }
}

impl Drop for CudaTarget {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let stalled = self.stalled.load(Ordering::Relaxed);
        teardown(self, self.timeout, stalled);
    }
}

/// What [`CudaTarget::new`] needs besides the program.
pub struct TargetSetup<'a> {
    pub local: &'a [usize],
    /// The compiled generated module and native kernels, for this device.
    pub code: (&'a Ptx, &'a Ptx),
    pub launch: Option<&'a Launch>,
    pub plan_hash: u64,
    pub timeout: Duration,
}

impl CudaTarget {
    /// The primary context of device `ordinal`, with cudarc's event tracking off.
    pub fn context(ordinal: usize) -> Result<Arc<CudaContext>, String> {
        let ctx = drv("cuDevicePrimaryCtxRetain", CudaContext::new(ordinal))?;
        // SAFETY: no CudaSlice is ever allocated by this backend; the plan's
        // events order every use of its raw allocations.
        unsafe { ctx.disable_event_tracking() };
        Ok(ctx)
    }

    /// The compute capability of the context's device.
    pub fn capability(ctx: &Arc<CudaContext>) -> Result<(i32, i32), String> {
        drv("compute capability", ctx.compute_capability())
    }

    pub fn new(
        ctx: Arc<CudaContext>,
        program: &Program,
        setup: TargetSetup<'_>,
    ) -> Result<CudaTarget, String> {
        drv("bind the context", ctx.bind_to_thread())?;
        // SAFETY: probing only dlopens candidate names.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(
                "libcublas not found: add the CUDA toolkit's lib64 folder (or pip's nvidia/cu13/lib) to LD_LIBRARY_PATH"
                    .into(),
            );
        }
        let generated_symbols: Vec<String> = program
            .kernels
            .module
            .kernels()
            .iter()
            .map(|k| k.name().to_string())
            .collect();
        let generated = Module::load(setup.code.0, &generated_symbols, "the plan's kernels")?;
        let native_symbols: Vec<String> = NativeKernel::ALL
            .iter()
            .map(|k| k.symbol().to_string())
            .collect();
        let native = Module::load(setup.code.1, &native_symbols, "the native kernels")?;
        let readback_len = program.work.largest_read_back() as usize;
        let mut ranks = BTreeMap::new();
        for &r in setup.local {
            let mut streams = Vec::with_capacity(program.streams);
            let mut handles = Vec::with_capacity(program.streams);
            let mut blas_work = Vec::with_capacity(program.streams);
            for _ in 0..program.streams {
                let s = drv("cuStreamCreate", ctx.new_stream())?;
                let h = Blas(blas_err("cublasCreate", blas::create_handle())?);
                // SAFETY: a live handle and a live stream of this context.
                blas_err("cublasSetStream", unsafe {
                    blas::set_stream(h.0, s.cu_stream() as _)
                })?;
                // A workspace of its own, so that cuBLAS allocates nothing
                // while a pass is captured into a graph.
                let w = Alloc::new(CUBLAS_WORKSPACE, "a cuBLAS workspace")?;
                // SAFETY: a live handle; the workspace outlives it (dropped
                // after the handles, see `RankDev`).
                blas_err("cublasSetWorkspace", unsafe {
                    blas_sys::cublasSetWorkspace_v2(h.0, w.ptr as *mut c_void, w.bytes as usize)
                        .result()
                })?;
                streams.push(s);
                handles.push(h);
                blas_work.push(w);
            }
            ranks.insert(
                r,
                RankDev {
                    arena: Alloc::new(program.arena_bytes, "the arena")?,
                    weights: Alloc::new(program.weights.bytes, "the weights")?,
                    work: Alloc::new(program.work.bytes, "the workspace")?,
                    streams,
                    blas: handles,
                    _blas_work: blas_work,
                    events: BTreeMap::new(),
                    readback: Pinned::new(readback_len)?,
                    readback_len,
                    readback_done: None,
                },
            );
        }
        // The allocations were zeroed with `cuMemsetD8` on the legacy
        // stream, which may still run when this returns and which the
        // non-blocking streams (where the weights are then written) are not
        // ordered after: wait for it once, here.
        drv("zeroing the allocations", ctx.synchronize())?;
        let nccl = match setup.launch {
            Some(l) => Some(Nccl::new(l, setup.plan_hash, setup.timeout)?),
            None => None,
        };
        Ok(CudaTarget {
            ranks,
            generated,
            native,
            graph: None,
            capturing: None,
            nccl,
            stamps: Vec::new(),
            timeout: setup.timeout,
            stalled: AtomicBool::new(false),
            ctx,
        })
    }

    fn rank(&self, r: usize) -> Result<&RankDev, String> {
        self.ranks
            .get(&r)
            .ok_or_else(|| format!("rank {r} is not on this process"))
    }

    /// The device address of `bytes` bytes at `at`, checked against its allocation.
    fn ptr(&self, at: Addr, bytes: u64) -> Result<sys::CUdeviceptr, String> {
        let a = self.rank(at.rank)?.base(at.space);
        if at
            .offset
            .checked_add(bytes)
            .is_none_or(|end| end > a.bytes.max(256))
        {
            return Err(format!(
                "{bytes} bytes at {:?}+{} fall outside its {} bytes",
                at.space, at.offset, a.bytes
            ));
        }
        Ok(a.ptr + at.offset)
    }

    fn stream(&self, rank: usize, stream: usize) -> Result<&Arc<CudaStream>, String> {
        self.rank(rank)?
            .streams
            .get(stream)
            .ok_or_else(|| format!("stream {stream} does not exist"))
    }

    fn event(&mut self, e: EventId) -> Result<&CudaEvent, String> {
        let ctx = self.ctx.clone();
        let rank = self
            .ranks
            .get_mut(&e.rank)
            .ok_or_else(|| format!("rank {} is not on this process", e.rank))?;
        match rank.events.entry((e.id, e.comm)) {
            std::collections::btree_map::Entry::Occupied(o) => Ok(o.into_mut()),
            std::collections::btree_map::Entry::Vacant(v) => {
                Ok(v.insert(drv("cuEventCreate", ctx.new_event(None))?))
            }
        }
    }

    fn function(&self, k: KernelRef) -> Result<sys::CUfunction, String> {
        match k {
            KernelRef::Generated(i) => self.generated.functions.get(i).copied(),
            KernelRef::Native(n) => NativeKernel::ALL
                .iter()
                .position(|&x| x == n)
                .and_then(|i| self.native.functions.get(i).copied()),
        }
        .ok_or_else(|| format!("kernel {k:?} is not loaded"))
    }

    #[allow(clippy::too_many_arguments)] // a launch, spelled out
    fn launch(
        &self,
        rank: usize,
        stream: usize,
        kernel: KernelRef,
        args: &[Arg],
        rows: u64,
        (grid, block): (u32, u32),
        status: Addr,
        scratch: Option<Addr>,
    ) -> Result<(), String> {
        // Every parameter in an 8-byte slot (an `f32` in the low half:
        // little-endian), then a pointer to each slot.
        let mut slots: Vec<u64> = Vec::with_capacity(args.len() * 2 + 3);
        for a in args {
            match *a {
                Arg::Buf { addr, len } => {
                    slots.push(self.ptr(addr, 0)?);
                    slots.push(len);
                }
                Arg::F32(v) => slots.push(u64::from(v.to_bits())),
                Arg::I64(v) => slots.push(v as u64),
            }
        }
        slots.push(rows);
        slots.push(self.ptr(status, 32)?);
        if let Some(s) = scratch {
            slots.push(self.ptr(s, 0)?);
        }
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast::<c_void>())
            .collect();
        let f = self.function(kernel)?;
        let s = self.stream(rank, stream)?;
        // SAFETY: `f` is a function of a loaded module whose parameter list
        // is the one these slots follow (the issuer checked the arguments
        // against the kernel's description; buffer lengths bound every
        // access the kernel makes); the slots outlive the call, which copies
        // them; the stream belongs to this context.
        drv("cuLaunchKernel", unsafe {
            result::launch_kernel(
                f,
                (grid, 1, 1),
                (block, 1, 1),
                0,
                s.cu_stream(),
                &mut params,
            )
        })
    }

    /// `batch` GEMMs `c_i = a_i · w_iᵀ` (row-major, `f32` output and
    /// compute), operand `i` at `i · strides` bytes: `cublasGemmEx` for one,
    /// `cublasGemmStridedBatchedEx` for more.
    fn gemm(
        &self,
        rank: usize,
        stream: usize,
        (a, w, c): (Addr, Addr, Addr),
        dtype: DType,
        (m, n, k): (u64, u64, u64),
        (batch, strides): (u64, (u64, u64, u64)),
    ) -> Result<(), String> {
        let ty = match dtype {
            DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
            DType::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            other => return Err(format!("no GEMM for {} inputs", other.name())),
        };
        let int = |v: u64, what: &str| {
            c_int::try_from(v).map_err(|_| format!("GEMM {what} = {v} does not fit cuBLAS's int"))
        };
        let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        let el = dtype.bytes();
        // The last operands' ends lie inside their allocations, so all do.
        let last = batch.saturating_sub(1);
        let span = |stride: u64, bytes: u64| {
            last.checked_mul(stride)
                .and_then(|s| s.checked_add(bytes))
                .ok_or_else(|| "a batched GEMM's extent overflows".to_string())
        };
        let a_ptr = self.ptr(a, span(strides.0, m * k * el)?)?;
        let w_ptr = self.ptr(w, span(strides.1, n * k * el)?)?;
        let c_ptr = self.ptr(c, span(strides.2, m * n * 4)?)?;
        let h = self
            .rank(rank)?
            .blas
            .get(stream)
            .ok_or("no cuBLAS handle for this stream")?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let ld = ki.max(1);
        let (op_w, op_a) = (
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
        );
        let alpha = (&alpha as *const f32).cast::<c_void>();
        let beta = (&beta as *const f32).cast::<c_void>();
        let (f32_out, compute, algo) = (
            blas_sys::cudaDataType::CUDA_R_32F,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        );
        // Row-major c[m,n] = a[m,k] · w[n,k]ᵀ is column-major
        // cᵀ[n,m] = (w as k×n)ᵀ · (a as k×m).
        if batch <= 1 {
            // SAFETY: the three pointers address `n·k`, `m·k` and `m·n`
            // elements inside their allocations (checked by `ptr`); alpha
            // and beta are host scalars (the handle's default pointer mode);
            // the handle is bound to this rank's stream.
            return blas_err("cublasGemmEx", unsafe {
                blas::gemm_ex(
                    h.0,
                    op_w,
                    op_a,
                    ni,
                    mi,
                    ki,
                    alpha,
                    w_ptr as *const c_void,
                    ty,
                    ld,
                    a_ptr as *const c_void,
                    ty,
                    ld,
                    beta,
                    c_ptr as *mut c_void,
                    f32_out,
                    ni,
                    compute,
                    algo,
                )
            });
        }
        let elems = |bytes: u64, size: u64| {
            if bytes % size != 0 {
                return Err(format!(
                    "a GEMM stride of {bytes} bytes is no whole element"
                ));
            }
            i64::try_from(bytes / size).map_err(|_| "a GEMM stride is too large".to_string())
        };
        let (sa, sw, sc) = (
            elems(strides.0, el)?,
            elems(strides.1, el)?,
            elems(strides.2, 4)?,
        );
        let count = int(batch, "batch")?;
        // SAFETY: as above, for each of the `batch` operand triples, the
        // last of which was checked to end inside its allocation.
        blas_err("cublasGemmStridedBatchedEx", unsafe {
            blas::gemm_strided_batched_ex(
                h.0,
                op_w,
                op_a,
                ni,
                mi,
                ki,
                alpha,
                w_ptr as *const c_void,
                ty,
                ld,
                sw,
                a_ptr as *const c_void,
                ty,
                ld,
                sa,
                beta,
                c_ptr as *mut c_void,
                f32_out,
                ni,
                sc,
                count,
                compute,
                algo,
            )
        })
    }

    fn exchange(
        &self,
        rank: usize,
        stream: usize,
        sends: &[(usize, Addr, u64)],
        recvs: &[(usize, Addr, u64)],
    ) -> Result<(), String> {
        let nccl = self
            .nccl
            .as_ref()
            .ok_or("a collective with ranks of other processes, but no NCCL communicator")?;
        let s = self.stream(rank, stream)?.cu_stream();
        let peer = |p: usize| c_int::try_from(p).map_err(|_| "peer rank too large".to_string());
        nccl_err("ncclGroupStart", nccl_result::group_start())?;
        let issue = || -> Result<(), String> {
            for &(p, at, bytes) in sends {
                let ptr = self.ptr(at, bytes)?;
                // SAFETY: `bytes` bytes at `ptr` lie in this rank's
                // allocation; the send is ordered on the rank's stream.
                nccl_err("ncclSend", unsafe {
                    nccl_result::send(
                        ptr as *const c_void,
                        bytes as usize,
                        nccl_sys::ncclDataType_t::ncclUint8,
                        peer(p)?,
                        nccl.comm,
                        s as _,
                    )
                })?;
            }
            for &(p, at, bytes) in recvs {
                let ptr = self.ptr(at, bytes)?;
                // SAFETY: as for the sends.
                nccl_err("ncclRecv", unsafe {
                    nccl_result::recv(
                        ptr as *mut c_void,
                        bytes as usize,
                        nccl_sys::ncclDataType_t::ncclUint8,
                        peer(p)?,
                        nccl.comm,
                        s as _,
                    )
                })?;
            }
            Ok(())
        };
        let issued = issue();
        let ended = nccl_err("ncclGroupEnd", nccl_result::group_end());
        issued?;
        ended?;
        nccl.settle("an NCCL exchange")
    }
}

impl CudaTarget {
    /// [`Target::fetch`]: polls the read-back's event (and NCCL) until the timeout.
    fn wait_for_read_back(&mut self, rank: usize) -> Result<Vec<u8>, String> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let dev = self.rank(rank)?;
        let done = dev
            .readback_done
            .as_ref()
            .ok_or_else(|| format!("rank {rank} has no read-back queued"))?;
        self.poll(done, "cuEventQuery", started, deadline, || {
            format!(
                "timed out after {:?} waiting for the routing of rank {rank}",
                self.timeout
            )
        })?;
        // SAFETY: the copy into the pinned buffer has completed (the event
        // after it is complete); nothing else writes it now.
        let bytes =
            unsafe { std::slice::from_raw_parts(dev.readback.ptr.cast::<u8>(), dev.readback_len) };
        Ok(bytes.to_vec())
    }

    /// [`Target::synchronize`]: polls an event on every stream (and NCCL)
    /// until the timeout.
    fn wait_for_streams(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let ctx = self.ctx.clone();
        let mut marks = Vec::new();
        for dev in self.ranks.values() {
            for s in &dev.streams {
                let ev = drv("cuEventCreate", ctx.new_event(None))?;
                drv("cuEventRecord", ev.record(s))?;
                marks.push(ev);
            }
        }
        for ev in &marks {
            self.poll(ev, "the device", started, deadline, || {
                format!(
                    "the device did not finish within {:?} (a peer stopped, or a kernel hangs)",
                    self.timeout
                )
            })?;
        }
        drv("the device", ctx.check_err())
    }

    /// Polls `event` until it completes, checking NCCL for a failed peer in
    /// between; past `deadline`, the error `timed_out` says.
    fn poll(
        &self,
        event: &CudaEvent,
        call: &str,
        started: Instant,
        deadline: Instant,
        timed_out: impl Fn() -> String,
    ) -> Result<(), String> {
        loop {
            if drv(call, event.try_is_complete())? {
                return Ok(());
            }
            if let Some(n) = &self.nccl {
                n.check()?;
            }
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            backoff(started);
        }
    }
}

impl Target for CudaTarget {
    fn submit(&mut self, rank: usize, stream: usize, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::Launch {
                kernel,
                args,
                rows,
                grid,
                block,
                status,
                scratch,
            } => self.launch(
                rank,
                stream,
                kernel,
                &args,
                rows,
                (grid, block),
                status,
                scratch,
            ),
            Command::Gemm {
                a,
                w,
                c,
                dtype,
                m,
                n,
                k,
            } => self.gemm(rank, stream, (a, w, c), dtype, (m, n, k), (1, (0, 0, 0))),
            Command::GemmBatched {
                a,
                w,
                c,
                dtype,
                m,
                n,
                k,
                batch,
                strides,
            } => self.gemm(rank, stream, (a, w, c), dtype, (m, n, k), (batch, strides)),
            Command::Copy { src, dst, bytes } => {
                let (s, d) = (self.ptr(src, bytes)?, self.ptr(dst, bytes)?);
                let st = self.stream(rank, stream)?.cu_stream();
                // SAFETY: both ranges lie in live allocations of this
                // context (checked by `ptr`); the plan's and the
                // collectives' events order the copy against their users.
                drv("cuMemcpyDtoDAsync", unsafe {
                    result::memcpy_dtod_async(d, s, bytes as usize, st)
                })
            }
            Command::Upload { dst, bytes } => {
                let d = self.ptr(dst, bytes.len() as u64)?;
                let st = self.stream(rank, stream)?.cu_stream();
                // SAFETY: the range lies in a live allocation (checked);
                // the plan's events give the step its buffer. `bytes` is
                // pageable: the driver stages it before returning (it may
                // wait for the stream's earlier work, all of it issued
                // already, so it cannot deadlock), so it may be dropped
                // afterwards.
                drv("cuMemcpyHtoDAsync", unsafe {
                    result::memcpy_htod_async(d, &bytes, st)
                })
            }
            Command::Memset { dst, bytes, value } => {
                let d = self.ptr(dst, bytes)?;
                let st = self.stream(rank, stream)?.cu_stream();
                // SAFETY: the range lies in a live allocation (checked).
                drv("cuMemsetD8Async", unsafe {
                    result::memset_d8_async(d, value, bytes as usize, st)
                })
            }
            Command::Record(e) => {
                let s = self.stream(rank, stream)?.clone();
                let ev = self.event(e)?;
                drv("cuEventRecord", ev.record(&s))
            }
            Command::Wait(e) => {
                let s = self.stream(rank, stream)?.clone();
                let ev = self.event(e)?;
                drv("cuStreamWaitEvent", s.wait(ev))
            }
            Command::ReadBack { src, bytes } => {
                let p = self.ptr(src, bytes)?;
                let s = self.stream(rank, stream)?.clone();
                let ctx = self.ctx.clone();
                let dev = self
                    .ranks
                    .get_mut(&rank)
                    .ok_or_else(|| format!("rank {rank} is not on this process"))?;
                let n = (bytes as usize).min(dev.readback.bytes);
                // SAFETY: the pinned buffer holds `n` bytes and stays alive
                // (and untouched by the host) until `fetch` synchronises on
                // the event recorded after the copy.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(dev.readback.ptr.cast::<u8>(), n) };
                // SAFETY: the source range lies in a live allocation; the
                // destination is page-locked host memory.
                drv("cuMemcpyDtoHAsync", unsafe {
                    result::memcpy_dtoh_async(dst, p, s.cu_stream())
                })?;
                let done = drv("cuEventCreate", ctx.new_event(None))?;
                drv("cuEventRecord", done.record(&s))?;
                dev.readback_len = n;
                dev.readback_done = Some(done);
                Ok(())
            }
            Command::Nccl { sends, recvs } => self
                .exchange(rank, stream, &sends, &recvs)
                .inspect_err(|_| self.stalled.store(true, Ordering::Relaxed)),
            Command::Stamp(n) => {
                let s = self.stream(rank, stream)?.clone();
                let n = n as usize;
                while self.stamps.len() <= n {
                    let timed = sys::CUevent_flags::CU_EVENT_DEFAULT;
                    let ev = drv("cuEventCreate", self.ctx.new_event(Some(timed)))?;
                    self.stamps.push(ev);
                }
                drv("cuEventRecord", self.stamps[n].record(&s))
            }
        }
    }

    fn begin_capture(&mut self, rank: usize, stream: usize) -> Result<(), String> {
        if self.capturing.is_some() {
            return Err("a capture is already in progress".into());
        }
        let s = self.stream(rank, stream)?.clone();
        // Relaxed: the lazily created events of a first capture may call
        // the driver from this thread while it captures.
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        drv("cuStreamBeginCapture", s.begin_capture(mode))?;
        self.capturing = Some((rank, stream));
        Ok(())
    }

    fn end_capture(&mut self) -> Result<(), String> {
        let (rank, stream) = self.capturing.take().ok_or("no capture is in progress")?;
        let s = self.stream(rank, stream)?.clone();
        let graph = drv(
            "cuStreamEndCapture",
            s.end_capture(sys::CUgraphInstantiate_flags(0)),
        )?;
        self.graph = Some(graph.ok_or("the capture recorded nothing")?);
        Ok(())
    }

    fn launch_graph(&mut self) -> Result<(), String> {
        let graph = self.graph.as_ref().ok_or("no graph has been captured")?;
        drv("cuGraphLaunch", graph.launch())
    }

    fn stamp_seconds(&mut self, count: u32) -> Result<Vec<f64>, String> {
        let count = count as usize;
        if count > self.stamps.len() {
            return Err(format!(
                "{count} stamps asked for, {} recorded",
                self.stamps.len()
            ));
        }
        let Some(first) = self.stamps.first() else {
            return Ok(Vec::new());
        };
        self.stamps[..count]
            .iter()
            .map(|ev| drv("cuEventElapsedTime", first.elapsed_ms(ev)).map(|ms| f64::from(ms) / 1e3))
            .collect()
    }

    fn fetch(&mut self, rank: usize) -> Result<Vec<u8>, String> {
        self.wait_for_read_back(rank)
            .inspect_err(|_| self.stalled.store(true, Ordering::Relaxed))
    }

    fn write(&mut self, at: Addr, bytes: &[u8]) -> Result<(), String> {
        if self.capturing.is_some() {
            return Err("a host write during a capture".into());
        }
        drv("bind the context", self.ctx.bind_to_thread())?;
        let p = self.ptr(at, bytes.len() as u64)?;
        // On the rank's first stream, not the legacy stream: the plan's
        // streams are non-blocking, so only an event orders them after a
        // copy, and the issuer forks them from this stream after its writes.
        let s = self.stream(at.rank, 0)?.cu_stream();
        // SAFETY: the range lies in a live allocation; no queued work uses
        // it (writes happen between passes, after `synchronize`). `bytes`
        // is pageable: the driver stages it before returning, so the host
        // may drop it afterwards.
        drv("cuMemcpyHtoDAsync", unsafe {
            result::memcpy_htod_async(p, bytes, s)
        })
    }

    fn synchronize(&mut self) -> Result<(), String> {
        self.wait_for_streams()
            .inspect_err(|_| self.stalled.store(true, Ordering::Relaxed))
    }

    fn read(&mut self, at: Addr, bytes: u64) -> Result<Vec<u8>, String> {
        let p = self.ptr(at, bytes)?;
        let mut out = vec![0u8; bytes as usize];
        // SAFETY: the range lies in a live allocation, and no queued work
        // writes it: `read` follows `synchronize`, or a `fetch` that waited
        // for everything its stream wrote there (the `Target::read` contract).
        drv("cuMemcpyDtoH", unsafe {
            result::memcpy_dtoh_sync(&mut out, p)
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose device finishes after `busy_for` (never with `None`),
    /// recording the teardown's steps.
    struct Fake {
        busy_for: Option<Duration>,
        steps: Vec<String>,
    }

    impl Teardown for Fake {
        fn abort_comm(&mut self) {
            self.steps.push("abort".into());
            // An NCCL kernel waiting for a dead peer returns once aborted.
            if self.busy_for.is_none() {
                self.busy_for = Some(Duration::ZERO);
            }
        }

        fn drain(&mut self, bound: Duration) -> bool {
            self.steps.push(format!("drain {bound:?}"));
            self.busy_for.is_some_and(|b| b <= bound)
        }

        fn leak(&mut self) {
            self.steps.push("leak".into());
        }
    }

    fn teardown_steps(busy_for: Option<Duration>, stalled: bool) -> Vec<String> {
        let mut fake = Fake {
            busy_for,
            steps: Vec::new(),
        };
        teardown(&mut fake, Duration::from_secs(300), stalled);
        fake.steps
    }

    #[test]
    fn the_communicator_is_aborted_before_the_device_is_waited_for() {
        // A kernel stuck on a dead peer: only the abort lets the wait end.
        assert_eq!(teardown_steps(None, true), ["abort", "drain 2s"]);
        // A healthy device: the whole timeout, nothing leaked.
        assert_eq!(
            teardown_steps(Some(Duration::from_secs(10)), false),
            ["abort", "drain 300s"]
        );
        // After a reported timeout the wait is short; what the device
        // still uses is leaked, not freed (a free would wait for it).
        assert_eq!(
            teardown_steps(Some(Duration::from_secs(10)), true),
            ["abort", "drain 2s", "leak"]
        );
    }
}
