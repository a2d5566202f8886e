//! The CUDA executor without a GPU: every example's plan lowered to a device
//! program (`moec_runtime::cuda::program`), issued by the executor's own
//! issuer (`moec_runtime::cuda::issue`) onto a host emulation of the device,
//! and compared with the CPU backend.
//!
//! The emulation (`Emu`) implements the issuer's `Target` on host memory:
//! one arena, weights and workspace allocation per rank; kernels are the very
//! CUDA C the GPU compiles (the plan's generated module and the native
//! assignment kernels), compiled for the host with the system C++ compiler
//! and a few lines of shim, launched with the issuer's grid, block, argument
//! slots, status block and scratch; GEMMs go through the `gemm` crate as on
//! the CPU backend; copies, memsets and read-backs are byte copies. In its
//! shuffled mode every rank's streams are queues and a seeded random choice
//! runs one ready command at a time, with CUDA's event semantics (a wait
//! waits for the last record issued before it), so a missing event in the
//! lowering (or in the plan) changes the bits. Host writes are asynchronous
//! as on a GPU: queued on the rank's first stream (landing when that queue
//! reaches them), and every command must be ordered after the writes to the
//! memory it touches (`WriteOrder`, checked at submission).
//!
//! What this cannot check is the driver layer itself (cudarc calls, cuBLAS's
//! column-major arguments, NCCL): `cuda_gpu.rs` does that where a GPU exists.
//!
//! Without a C++ compiler the emulation tests print a notice and pass.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use moec::compile::{compile, Options};
use moec::cost::RoutingForm;
use moec::run::{apply, Overrides};
use moec_kernels::ir::{Access, Elem, Param, ParamKind, Ty};
use moec_kernels::native::{NativeKernel, SOURCE as NATIVE_SOURCE};
use moec_runtime::cpu::comm::Run;
use moec_runtime::cpu::layout::{
    assign_count, assign_place, expand_index, Geometry, Placement, Routing,
};
use moec_runtime::cpu::memory;
use moec_runtime::cpu::{CpuBackend, CpuOptions};
use moec_runtime::cuda::issue::{
    collective_runs, graph_pass, pair_runs, run_pass, upload_weights, Addr, Arg, Command, EventId,
    GraphStage, Pass, PassMode, PeerRuns, Target,
};
use moec_runtime::cuda::program::{
    check_args, ArgT, KernelRef, Program, Space, Span, StepKind, Tail, CUBLAS_WORKSPACE_BYTES,
};
use moec_runtime::cuda::route::RouteTable;
use moec_runtime::plan::{DType, GemmWeight, OpKind, Plan, WeightOn};
use moec_runtime::weights::{random_inputs, LayerWeights};

// ---------------------------------------------------------------- plans

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "moe"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "examples missing: {files:?}");
    files
}

/// The plan the CUDA backend runs on virtual ranks (any routing form).
fn plan_of(source: &str, overrides: &Overrides) -> Plan {
    plan_with(source, overrides, &Options::cuda())
}

fn plan_with(source: &str, overrides: &Overrides, options: &Options) -> Plan {
    let checked = moec_lang::check_source(source);
    let (program, _) = checked
        .program
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    compile(&program, options).unwrap().plan
}

fn shrunk(dtype: moec_lang::spec::DType) -> Overrides {
    Overrides {
        ranks: None,
        tokens: Some(128),
        dtype: Some(dtype),
        hidden: Some(64),
        ffn: Some(32),
    }
}

/// Every example shrunk, by name.
fn shrunk_examples(dtype: moec_lang::spec::DType) -> Vec<(String, Plan)> {
    shrunk_examples_with(dtype, &Options::cuda())
}

fn shrunk_examples_with(dtype: moec_lang::spec::DType, options: &Options) -> Vec<(String, Plan)> {
    examples()
        .into_iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let source = std::fs::read_to_string(&path).unwrap();
            (name, plan_with(&source, &shrunk(dtype), options))
        })
        .collect()
}

/// A small layer on 4 ranks (the numerics tests' shape).
fn small_layer(router: &str, experts: &str, extra: &str, schedule: &str) -> String {
    format!(
        "layer t {{\n hidden = 32\n dtype = f32\n tokens_per_rank = 48\n experts {{\n count = 16\n {experts}\n }}\n router {{\n {router}\n }}\n {extra}\n}}\n\nmesh {{\n gpus_per_node = 4\n device = H100\n ep = 4\n}}\n{schedule}\n"
    )
}

/// Small layers that cover what the examples do not: both drop policies,
/// chunked (overlapped) plans with and without capacity, unfused kernel
/// chains, biases, the clamped SwiGLU, GELU, replicated experts.
fn small_layers() -> Vec<(String, Plan)> {
    small_layers_with(&Options::cuda())
}

fn small_layers_with(options: &Options) -> Vec<(String, Plan)> {
    let none = Overrides::default();
    let relu = "ffn = relu\n intermediate = 24";
    let swiglu = "ffn = swiglu\n intermediate = 24";
    let mut out = Vec::new();
    let mut add = |name: &str, source: String| {
        out.push((name.to_string(), plan_with(&source, &none, options)))
    };
    for drop in ["position", "probs"] {
        for k in [1, 2] {
            add(
                &format!("capacity drop = {drop}, top-{k}"),
                small_layer(
                    &format!("scoring = softmax\n top_k = {k}"),
                    relu,
                    &format!("capacity {{\n factor = 0.5\n drop = {drop}\n }}"),
                    "",
                ),
            );
        }
    }
    add(
        "router logit bias, softmax over the top-k",
        small_layer(
            "scoring = softmax\n top_k = 2\n logit_bias = true\n softmax_over = topk",
            "ffn = swiglu\n intermediate = 24\n bias = true\n swiglu_limit = 7.0",
            "",
            "",
        ),
    );
    add(
        "chunked with shared experts",
        small_layer(
            "scoring = softmax\n top_k = 2\n normalize = true",
            swiglu,
            "shared_experts {\n intermediate = 24\n }",
            "schedule {\n overlap = 2\n }",
        ),
    );
    add(
        "capacity with fp8 dispatch",
        small_layer(
            "scoring = softmax\n top_k = 2",
            swiglu,
            "dispatch_dtype = fp8_e4m3\n capacity {\n factor = 0.75\n drop = probs\n }",
            "",
        ),
    );
    add(
        "chunked capacity",
        small_layer(
            "scoring = softmax\n top_k = 2",
            relu,
            "capacity {\n factor = 0.75\n drop = position\n }",
            "schedule {\n overlap = 3\n }",
        ),
    );
    add(
        "unfused",
        small_layer(
            "scoring = sigmoid\n top_k = 4\n selection_bias = true\n groups = 4\n groups_kept = 2\n normalize = true\n scale = 2.5",
            swiglu,
            "shared_experts {\n intermediate = 24\n gate = sigmoid\n }",
            "schedule {\n allow = []\n }",
        ),
    );
    add(
        "gelu with biases",
        small_layer(
            "scoring = softmax\n top_k = 2",
            "ffn = gelu\n intermediate = 24\n bias = true",
            "",
            "",
        ),
    );
    add(
        "clamped swiglu with biases",
        small_layer(
            "scoring = softmax\n top_k = 4\n softmax_over = topk",
            "ffn = swiglu\n intermediate = 24\n bias = true\n swiglu_limit = 7.0",
            "",
            "",
        ),
    );
    add(
        "replicas",
        "layer t {\n hidden = 32\n dtype = f32\n tokens_per_rank = 40\n experts {\n count = 8\n ffn = relu\n intermediate = 16\n }\n router {\n scoring = softmax\n top_k = 2\n }\n}\n\nmesh {\n gpus_per_node = 4\n device = H100\n ep = 4\n replicas {\n 0 = [2, 3]\n 5 = [0]\n }\n}\n".to_string(),
    );
    // Replicas give ranks different numbers of local experts: the padded
    // slots follow the most any rank holds.
    add(
        "capacity with replicas",
        "layer t {\n hidden = 32\n dtype = f32\n tokens_per_rank = 40\n experts {\n count = 8\n ffn = relu\n intermediate = 16\n }\n router {\n scoring = softmax\n top_k = 2\n }\n capacity {\n factor = 1.0\n drop = position\n }\n}\n\nmesh {\n gpus_per_node = 4\n device = H100\n ep = 4\n replicas {\n 0 = [2, 3]\n 5 = [0]\n }\n}\n".to_string(),
    );
    out.push((
        "one rank".to_string(),
        plan_with(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.moe"),
            )
            .unwrap(),
            &Overrides {
                ranks: Some(1),
                tokens: Some(64),
                ..Overrides::default()
            },
            options,
        ),
    ));
    out
}

// ------------------------------------------------------- host kernels

const SHIM: &str = r#"
#include <math.h>
#include <string.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct moec_dim3 { unsigned int x, y, z; };
// Thread-local: emulated processes launch kernels from several threads.
static thread_local moec_dim3 blockIdx, threadIdx, blockDim, gridDim;
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c,
                                           unsigned long long v) {
    unsigned long long o = *p;
    if (o == c) *p = v;
    return o;
}
static inline int atomicAdd(int* p, int v) { int o = *p; *p = o + v; return o; }
static inline float moec_host_f32(unsigned long long slot) {
    return __uint_as_float((unsigned int)slot);
}
"#;

type HostFn = unsafe extern "C" fn(*const u64, i64, *mut i64, *mut u8, u32, u32);

fn cxx() -> Option<String> {
    let mut candidates: Vec<String> = Vec::new();
    if let Ok(c) = std::env::var("CXX") {
        candidates.push(c);
    }
    candidates.extend(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| {
        Process::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The wrapper `moec_host_<i>` that runs every thread of a launch of `symbol`.
fn wrapper(i: usize, symbol: &str, params: &[Param], scratch: bool) -> String {
    let mut args = Vec::new();
    let mut slot = 0;
    for p in params {
        match p.kind {
            ParamKind::Buffer { elem, access } => {
                let ty = match elem {
                    Elem::F32 => "float",
                    Elem::Bf16 | Elem::F16 => "unsigned short",
                    Elem::Fp8E4m3 | Elem::U8 => "unsigned char",
                    Elem::I32 => "int",
                };
                let konst = if access == Access::Read { "const " } else { "" };
                args.push(format!("({konst}{ty}*)a[{slot}]"));
                args.push(format!("a[{}]", slot + 1));
                slot += 2;
            }
            ParamKind::Scalar(Ty::F32) => {
                args.push(format!("moec_host_f32(a[{slot}])"));
                slot += 1;
            }
            ParamKind::Scalar(_) => {
                args.push(format!("(long long)a[{slot}]"));
                slot += 1;
            }
        }
    }
    args.push("rows".into());
    args.push("status".into());
    if scratch {
        args.push("scratch".into());
    }
    format!(
        "extern \"C\" void moec_host_{i}(const unsigned long long* a, long long rows, long long* status,\n\
         \x20   unsigned char* scratch, unsigned int grid, unsigned int block) {{\n\
         \x20   (void)scratch;\n\
         \x20   gridDim.x = grid; blockDim.x = block;\n\
         \x20   for (unsigned int b = 0; b < grid; ++b) for (unsigned int i = 0; i < block; ++i) {{\n\
         \x20       // Odd blocks run their threads backwards: a kernel whose\n\
         \x20       // threads depend on each other's order shows it.\n\
         \x20       const unsigned int t = (b & 1u) ? block - 1u - i : i;\n\
         \x20       blockIdx.x = b; threadIdx.x = t;\n\
         \x20       {symbol}({});\n\
         \x20   }}\n}}\n",
        args.join(", ")
    )
}

/// Compiles `source` plus wrappers for the host and loads it.
fn build(source: &str, kernels: &[(String, Vec<Param>, bool)]) -> libloading::Library {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let cxx = cxx().unwrap();
    let dir = std::env::temp_dir().join(format!(
        "moec-cuda-emu-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut src = String::from(SHIM);
    src.push_str(source);
    for (i, (sym, params, scratch)) in kernels.iter().enumerate() {
        src.push_str(&wrapper(i, sym, params, *scratch));
    }
    let cpp = dir.join("k.cpp");
    let so = dir.join("libk.so");
    std::fs::write(&cpp, &src).unwrap();
    let out = Process::new(&cxx)
        .args([
            "-std=c++17",
            "-O1",
            "-ffp-contract=off",
            "-fno-fast-math",
            "-fPIC",
            "-shared",
            "-w",
        ])
        .arg(&cpp)
        .arg("-o")
        .arg(&so)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cxx} failed on {}:\n{}",
        cpp.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: the library was just built from CUDA C meant for the device
    // and the shim; its initialisers only zero the shim's globals.
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    lib
}

/// A program's kernels for the host: the generated module and the native one.
struct HostKernels {
    generated: libloading::Library,
    native: libloading::Library,
}

impl HostKernels {
    fn new(p: &Program) -> HostKernels {
        let gen: Vec<(String, Vec<Param>, bool)> = p
            .kernels
            .module
            .kernels()
            .iter()
            .map(|k| {
                (
                    k.name().to_string(),
                    k.params().to_vec(),
                    k.scratch_bytes_per_thread() > 0,
                )
            })
            .collect();
        let native: Vec<(String, Vec<Param>, bool)> = NativeKernel::ALL
            .iter()
            .map(|k| (k.symbol().to_string(), k.params(), false))
            .collect();
        HostKernels {
            generated: build(&p.kernels.module.source(), &gen),
            native: build(NATIVE_SOURCE, &native),
        }
    }

    fn get(&self, k: KernelRef) -> HostFn {
        let (lib, i) = match k {
            KernelRef::Generated(i) => (&self.generated, i),
            KernelRef::Native(n) => (
                &self.native,
                NativeKernel::ALL.iter().position(|&x| x == n).unwrap(),
            ),
        };
        let symbol = format!("moec_host_{i}");
        // SAFETY: the symbol is a wrapper generated with this signature.
        unsafe { *lib.get::<HostFn>(symbol.as_bytes()).unwrap() }
    }
}

// ------------------------------------------------------------ emulator

/// One queued piece of work and, for a wait, the record generation it
/// waits for.
struct Queued {
    work: Work,
    gen: u64,
}

/// What a stream's queue holds: a command, or a host write (`Target::write`
/// lands asynchronously, when its stream reaches it).
enum Work {
    Device(Command),
    HostWrite { at: Addr, bytes: Vec<u8> },
}

/// Happens-before of the host's writes (checked at submission, so in order
/// and shuffled alike): per rank, the writes queued so far; per stream and
/// per event, how many of each rank's writes are ordered before it. A
/// command that touches a rank's memory before all of that rank's writes
/// are ordered before it is an error: on a GPU, the copy may land after
/// the command ran.
#[derive(Default)]
struct WriteOrder {
    writes: BTreeMap<usize, u64>,
    seen: BTreeMap<(usize, usize), BTreeMap<usize, u64>>,
    events: BTreeMap<EventId, BTreeMap<usize, u64>>,
}

impl WriteOrder {
    fn write(&mut self, rank: usize) {
        let n = self.writes.entry(rank).or_default();
        *n += 1;
        self.seen.entry((rank, 0)).or_default().insert(rank, *n);
    }

    /// Merges what `from` has seen into stream `at`.
    fn join(&mut self, at: (usize, usize), from: &BTreeMap<usize, u64>) {
        let seen = self.seen.entry(at).or_default();
        for (&r, &n) in from {
            let m = seen.entry(r).or_default();
            *m = (*m).max(n);
        }
    }

    fn submit(&mut self, rank: usize, stream: usize, cmd: &Command) -> Result<(), String> {
        let at = (rank, stream);
        match cmd {
            Command::Record(e) => {
                let seen = self.seen.get(&at).cloned().unwrap_or_default();
                self.events.insert(*e, seen);
            }
            Command::Wait(e) => {
                let from = self.events.get(e).cloned().unwrap_or_default();
                self.join(at, &from);
            }
            _ => {
                let seen = self.seen.get(&at);
                for r in touched(cmd) {
                    let written = self.writes.get(&r).copied().unwrap_or(0);
                    let ordered = seen.and_then(|s| s.get(&r)).copied().unwrap_or(0);
                    if ordered < written {
                        return Err(format!(
                            "{cmd:?} on stream {stream} of rank {rank} is not ordered after the host's write {written} to rank {r} (the copy may land after it runs)"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// The ranks whose memory a command reads or writes.
fn touched(cmd: &Command) -> Vec<usize> {
    let mut ranks = Vec::new();
    match cmd {
        Command::Launch {
            args,
            status,
            scratch,
            ..
        } => {
            for a in args {
                if let Arg::Buf { addr, .. } = a {
                    ranks.push(addr.rank);
                }
            }
            ranks.push(status.rank);
            ranks.extend(scratch.map(|s| s.rank));
        }
        Command::Gemm { a, w, c, .. } | Command::GemmBatched { a, w, c, .. } => {
            ranks.extend([a.rank, w.rank, c.rank]);
        }
        Command::Copy { src, dst, .. } => ranks.extend([src.rank, dst.rank]),
        Command::Memset { dst, .. } | Command::Upload { dst, .. } => ranks.push(dst.rank),
        Command::ReadBack { src, .. } => ranks.push(src.rank),
        Command::Nccl { sends, recvs } => {
            ranks.extend(sends.iter().chain(recvs).map(|(_, at, _)| at.rank));
        }
        Command::Record(_) | Command::Wait(_) | Command::Stamp(_) => {}
    }
    ranks.sort_unstable();
    ranks.dedup();
    ranks
}

/// The device, emulated on the host (see the module docs).
struct Emu<'k> {
    program: &'k Program,
    kernels: &'k HostKernels,
    mem: BTreeMap<(usize, Space), Vec<u64>>,
    readbacks: BTreeMap<usize, Vec<u8>>,
    /// Shuffled mode: the queues, the events (records issued, record
    /// completed) and the random state.
    shuffle: Option<u64>,
    queues: BTreeMap<(usize, usize), VecDeque<Queued>>,
    events: BTreeMap<EventId, (u64, u64)>,
    /// Commands executed, for the statistics of a test.
    executed: usize,
    launches: usize,
    /// NCCL between emulated processes (one rank per `Emu`, one thread each).
    mailbox: Option<Arc<Mailbox>>,
    /// Per rank, the NCCL operations issued and run: NCCL runs one
    /// communicator's operations in the order the host issued them, whatever
    /// streams they are on, so in shuffled mode an operation is ready only
    /// after the one issued before it has run.
    nccl_issued: BTreeMap<usize, u64>,
    nccl_run: BTreeMap<usize, u64>,
    /// The most sends or receives one peer had in one NCCL group.
    nccl_per_peer: usize,
    /// The emulated clock (commands executed so far) at each stamp.
    stamps: BTreeMap<u32, usize>,
    /// Read-backs the host waited for during passes.
    fetches: usize,
    /// A capture in progress, and the graph of the last one (and the
    /// stream it was captured on, which its launches are ordered after).
    capture: Option<Capture>,
    graph: Option<Vec<(usize, usize, Command)>>,
    graph_origin: (usize, usize),
    /// Happens-before of the host's writes.
    order: WriteOrder,
    /// Kernels launched and cuBLAS handles (rank, stream) used outside a
    /// capture: a first use inside one is an error, as a GPU may allocate
    /// or synchronise there (cuBLAS's first call, lazy module loading).
    warm_kernels: Vec<KernelRef>,
    warm_blas: Vec<(usize, usize)>,
    /// Host writes that have landed.
    writes_landed: usize,
}

/// A stream capture as CUDA runs one: it starts on one stream; a stream
/// joins when it waits for an event recorded on a joined stream; work on
/// any other stream is an error; at the end every joined stream must have
/// been waited on by the first one after its last command.
struct Capture {
    origin: (usize, usize),
    joined: BTreeMap<(usize, usize), bool>,
    /// The stream each event was last recorded on during the capture.
    recorded_on: BTreeMap<EventId, (usize, usize)>,
    commands: Vec<(usize, usize, Command)>,
}

impl Capture {
    fn record(&mut self, rank: usize, stream: usize, cmd: Command) -> Result<(), String> {
        let at = (rank, stream);
        if let Command::Wait(e) = &cmd {
            if let Some(&from) = self.recorded_on.get(e) {
                if self.joined.contains_key(&from) {
                    self.joined.entry(at).or_insert(false);
                }
            }
        }
        if !self.joined.contains_key(&at) {
            return Err(format!(
                "{cmd:?} on stream {stream} of rank {rank}, which is not part of the capture"
            ));
        }
        if matches!(
            cmd,
            Command::ReadBack { .. }
                | Command::Stamp(_)
                | Command::Nccl { .. }
                | Command::Upload { .. }
        ) {
            return Err(format!("{cmd:?} cannot be captured"));
        }
        // A stream is joined back when the origin waits on its latest record.
        if let Command::Record(e) = &cmd {
            self.recorded_on.insert(*e, at);
        }
        for (s, back) in self.joined.iter_mut() {
            if *s == at && at != self.origin {
                *back = false;
            }
        }
        if at == self.origin {
            if let Command::Wait(e) = &cmd {
                if let Some(&from) = self.recorded_on.get(e) {
                    let last_is_record = self
                        .commands
                        .iter()
                        .rev()
                        .find(|(r, s, _)| (*r, *s) == from)
                        .is_some_and(|(_, _, c)| c == &Command::Record(*e));
                    if last_is_record {
                        self.joined.insert(from, true);
                    }
                }
            }
        }
        self.commands.push((rank, stream, cmd));
        Ok(())
    }
}

/// Per (source, destination), the messages not received yet.
type Messages = BTreeMap<(usize, usize), VecDeque<Vec<u8>>>;

/// Messages between emulated NCCL processes: per (source, destination), the
/// byte runs sent, in order (NCCL matches a pair's sends and receives in
/// order, and requires their sizes to agree).
#[derive(Default)]
struct Mailbox {
    queues: Mutex<Messages>,
    arrived: Condvar,
}

impl Mailbox {
    fn send(&self, from: usize, to: usize, data: Vec<u8>) {
        let mut q = self.queues.lock().unwrap();
        q.entry((from, to)).or_default().push_back(data);
        self.arrived.notify_all();
    }

    fn recv(&self, from: usize, to: usize) -> Result<Vec<u8>, String> {
        let mut q = self.queues.lock().unwrap();
        loop {
            if let Some(d) = q.get_mut(&(from, to)).and_then(VecDeque::pop_front) {
                return Ok(d);
            }
            let (g, timeout) = self
                .arrived
                .wait_timeout(q, std::time::Duration::from_secs(10))
                .unwrap();
            q = g;
            if timeout.timed_out() {
                return Err(format!("rank {to} waited 10 s for rank {from}"));
            }
        }
    }
}

impl<'k> Emu<'k> {
    fn new(program: &'k Program, kernels: &'k HostKernels, shuffle: Option<u64>) -> Emu<'k> {
        let mut mem = BTreeMap::new();
        for r in 0..program.ranks {
            for (space, bytes) in [
                (Space::Arena, program.arena_bytes),
                (Space::Weights, program.weights.bytes),
                (Space::Work, program.work.bytes),
            ] {
                mem.insert((r, space), vec![0u64; (bytes as usize).div_ceil(8).max(1)]);
            }
        }
        Emu {
            program,
            kernels,
            mem,
            readbacks: BTreeMap::new(),
            shuffle,
            queues: BTreeMap::new(),
            events: BTreeMap::new(),
            executed: 0,
            launches: 0,
            mailbox: None,
            nccl_issued: BTreeMap::new(),
            nccl_run: BTreeMap::new(),
            nccl_per_peer: 0,
            stamps: BTreeMap::new(),
            fetches: 0,
            capture: None,
            graph: None,
            graph_origin: (0, 0),
            order: WriteOrder::default(),
            writes_landed: 0,
            warm_kernels: Vec::new(),
            warm_blas: Vec::new(),
        }
    }

    /// The host address of `bytes` bytes at `at`, checked against its allocation.
    fn ptr(&mut self, at: Addr, bytes: u64) -> Result<*mut u8, String> {
        let space = self
            .mem
            .get_mut(&(at.rank, at.space))
            .ok_or_else(|| format!("rank {} has no {:?}", at.rank, at.space))?;
        let len = space.len() as u64 * 8;
        if at.offset.checked_add(bytes).is_none_or(|end| end > len) {
            return Err(format!(
                "{bytes} bytes at {:?}+{} fall outside its {len} bytes",
                at.space, at.offset
            ));
        }
        // SAFETY: in bounds of the allocation (checked above).
        Ok(unsafe { space.as_mut_ptr().cast::<u8>().add(at.offset as usize) })
    }

    fn bytes(&mut self, at: Addr, bytes: u64) -> Result<Vec<u8>, String> {
        let p = self.ptr(at, bytes)?;
        // SAFETY: `p` points at `bytes` readable bytes (checked by `ptr`).
        Ok(unsafe { std::slice::from_raw_parts(p, bytes as usize) }.to_vec())
    }

    fn put(&mut self, at: Addr, data: &[u8]) -> Result<(), String> {
        let p = self.ptr(at, data.len() as u64)?;
        // SAFETY: `p` points at `data.len()` writable bytes (checked by
        // `ptr`); `data` is a distinct host vector.
        unsafe { std::ptr::copy(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// `c[m, n] = a[m, k] · w[n, k]ᵀ` in `f32`, through the `gemm` crate
    /// as the CPU backend computes it.
    fn gemm(
        &mut self,
        a: Addr,
        w: Addr,
        c: Addr,
        dtype: DType,
        (m, n, k): (u64, u64, u64),
    ) -> Result<(), String> {
        let (m, n, k) = (m as usize, n as usize, k as usize);
        let el = dtype.bytes();
        let a_bytes = self.bytes(a, (m * k) as u64 * el)?;
        let w_bytes = self.bytes(w, (n * k) as u64 * el)?;
        let mut av = vec![0f32; m * k];
        let mut wv = vec![0f32; n * k];
        memory::read_f32(&a_bytes, dtype, &mut av);
        memory::read_f32(&w_bytes, dtype, &mut wv);
        let mut cv = vec![0f32; m * n];
        if k == 0 {
            cv.fill(0.0);
        } else {
            // SAFETY: `av` holds m*k, `wv` n*k and `cv` m*n values;
            // the strides below stay inside them (as in the CPU
            // backend's `matmul_wt`).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    cv.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    av.as_ptr(),
                    1,
                    k as isize,
                    wv.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
        let mut out = vec![0u8; m * n * 4];
        memory::write_f32(&cv, DType::F32, &mut out);
        self.put(c, &out)?;
        Ok(())
    }

    fn execute(&mut self, rank: usize, cmd: &Command, gen: u64) -> Result<(), String> {
        self.executed += 1;
        match cmd {
            Command::Launch {
                kernel,
                args,
                rows,
                grid,
                block,
                status,
                scratch,
            } => {
                self.launches += 1;
                let params = self.program.params(*kernel);
                let mut slots: Vec<u64> = Vec::new();
                for (a, p) in args.iter().zip(&params) {
                    match (*a, p.kind) {
                        (Arg::Buf { addr, len }, ParamKind::Buffer { elem, .. }) => {
                            // Only the all-to-all copy between virtual ranks
                            // reads a peer's memory (one GPU, one address
                            // space), and only its source.
                            let pull = *kernel == KernelRef::Native(NativeKernel::RouteCopy)
                                && p.name == "src";
                            if addr.rank != rank && !pull {
                                return Err("a launch reads another rank's memory".into());
                            }
                            let ptr = self.ptr(addr, len * elem.bytes() as u64)?;
                            slots.push(ptr as u64);
                            slots.push(len);
                        }
                        (Arg::F32(v), ParamKind::Scalar(Ty::F32)) => {
                            slots.push(u64::from(v.to_bits()))
                        }
                        (Arg::I64(v), ParamKind::Scalar(Ty::I64)) => slots.push(v as u64),
                        (a, p) => return Err(format!("argument {a:?} for parameter {p:?}")),
                    }
                }
                if args.len() != params.len() {
                    return Err(format!(
                        "{} arguments for {} parameters",
                        args.len(),
                        params.len()
                    ));
                }
                let st = self.ptr(*status, 32)?.cast::<i64>();
                let per_thread = self.program.scratch_per_thread(*kernel);
                let sc = match scratch {
                    Some(s) => {
                        let need = u64::from(*grid) * u64::from(*block) * per_thread;
                        self.ptr(*s, need)?
                    }
                    None if per_thread > 0 => return Err("a scratch kernel without scratch".into()),
                    None => std::ptr::null_mut(),
                };
                let f = self.kernels.get(*kernel);
                // SAFETY: every buffer slot was checked to lie in its rank's
                // allocation for its length; the status block and scratch
                // likewise; the wrapper matches the kernel's parameters.
                unsafe { f(slots.as_ptr(), *rows as i64, st, sc, *grid, *block) };
            }
            Command::Gemm {
                a,
                w,
                c,
                dtype,
                m,
                n,
                k,
            } => self.gemm(*a, *w, *c, *dtype, (*m, *n, *k))?,
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
            } => {
                for i in 0..*batch {
                    self.gemm(
                        a.plus(i * strides.0),
                        w.plus(i * strides.1),
                        c.plus(i * strides.2),
                        *dtype,
                        (*m, *n, *k),
                    )?;
                }
            }
            Command::Copy { src, dst, bytes } => {
                let data = self.bytes(*src, *bytes)?;
                self.put(*dst, &data)?;
            }
            Command::Memset { dst, bytes, value } => {
                self.put(*dst, &vec![*value; *bytes as usize])?;
            }
            Command::Upload { dst, bytes } => self.put(*dst, bytes)?,
            Command::Record(e) => {
                self.events.entry(*e).or_default().1 = gen;
            }
            Command::Wait(_) => {}
            Command::ReadBack { src, bytes } => {
                let data = self.bytes(*src, *bytes)?;
                self.readbacks.insert(rank, data);
            }
            Command::Stamp(n) => {
                self.stamps.insert(*n, self.executed);
            }
            Command::Nccl { sends, recvs } => {
                *self.nccl_run.entry(rank).or_default() += 1;
                for list in [sends, recvs] {
                    let mut per_peer: BTreeMap<usize, usize> = BTreeMap::new();
                    for &(peer, _, _) in list {
                        *per_peer.entry(peer).or_default() += 1;
                    }
                    let most = per_peer.values().copied().max().unwrap_or(0);
                    self.nccl_per_peer = self.nccl_per_peer.max(most);
                }
                let mailbox = self.mailbox.clone().ok_or("NCCL without a mailbox")?;
                for &(peer, at, bytes) in sends {
                    let data = self.bytes(at, bytes)?;
                    mailbox.send(rank, peer, data);
                }
                for &(peer, at, bytes) in recvs {
                    let data = mailbox.recv(peer, rank)?;
                    if data.len() as u64 != bytes {
                        return Err(format!(
                            "rank {rank} receives {bytes} bytes from rank {peer}, which sent {}",
                            data.len()
                        ));
                    }
                    self.put(at, &data)?;
                }
            }
        }
        Ok(())
    }

    fn ready(&self, rank: usize, q: &Queued) -> bool {
        match &q.work {
            Work::Device(Command::Wait(e)) => {
                q.gen == 0 || self.events.get(e).is_some_and(|(_, done)| *done >= q.gen)
            }
            // `gen` is the operation's place in the rank's issue order.
            Work::Device(Command::Nccl { .. }) => {
                self.nccl_run.get(&rank).copied().unwrap_or(0) + 1 == q.gen
            }
            _ => true,
        }
    }

    /// Runs one ready queue head, chosen at random; false when every queue is empty.
    fn step_random(&mut self) -> Result<bool, String> {
        let ready: Vec<(usize, usize)> = self
            .queues
            .iter()
            .filter(|(k, q)| q.front().is_some_and(|h| self.ready(k.0, h)))
            .map(|(k, _)| *k)
            .collect();
        if ready.is_empty() {
            if self.queues.values().all(VecDeque::is_empty) {
                return Ok(false);
            }
            return Err("deadlock: every queue waits for an event".into());
        }
        let state = self.shuffle.get_or_insert(1);
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let key = ready[(*state % ready.len() as u64) as usize];
        let q = self.queues.get_mut(&key).and_then(VecDeque::pop_front);
        match q.map(|q| (q.work, q.gen)) {
            Some((Work::Device(cmd), gen)) => self.execute(key.0, &cmd, gen)?,
            Some((Work::HostWrite { at, bytes }, _)) => {
                self.writes_landed += 1;
                self.put(at, &bytes)?;
            }
            None => {}
        }
        Ok(true)
    }
}

impl Emu<'_> {
    /// Runs `cmd` now, or queues it (shuffled mode).
    fn enqueue(&mut self, rank: usize, stream: usize, cmd: Command) -> Result<(), String> {
        self.order.submit(rank, stream, &cmd)?;
        let gen = match &cmd {
            Command::Record(e) => {
                let ev = self.events.entry(*e).or_default();
                ev.0 += 1;
                ev.0
            }
            Command::Wait(e) => self.events.get(e).map_or(0, |ev| ev.0),
            Command::Nccl { .. } => {
                let n = self.nccl_issued.entry(rank).or_default();
                *n += 1;
                *n
            }
            _ => 0,
        };
        if let Command::ReadBack { .. } = cmd {
            self.readbacks.remove(&rank);
        }
        if self.shuffle.is_none() {
            return self.execute(rank, &cmd, gen);
        }
        self.queues
            .entry((rank, stream))
            .or_default()
            .push_back(Queued {
                work: Work::Device(cmd),
                gen,
            });
        Ok(())
    }
}

impl Target for Emu<'_> {
    fn submit(&mut self, rank: usize, stream: usize, cmd: Command) -> Result<(), String> {
        let first_use = match &cmd {
            Command::Launch { kernel, .. } if !self.warm_kernels.contains(kernel) => {
                self.warm_kernels.push(*kernel);
                Some(format!("the first launch of {kernel:?}"))
            }
            Command::Gemm { .. } | Command::GemmBatched { .. }
                if !self.warm_blas.contains(&(rank, stream)) =>
            {
                self.warm_blas.push((rank, stream));
                Some(format!(
                    "the first cuBLAS call on stream {stream} of rank {rank}"
                ))
            }
            _ => None,
        };
        match self.capture.as_mut() {
            Some(_) if first_use.is_some() => Err(format!(
                "{} inside a capture",
                first_use.unwrap_or_default()
            )),
            Some(c) => c.record(rank, stream, cmd),
            None => self.enqueue(rank, stream, cmd),
        }
    }

    fn begin_capture(&mut self, rank: usize, stream: usize) -> Result<(), String> {
        if self.capture.is_some() {
            return Err("a capture is already in progress".into());
        }
        self.capture = Some(Capture {
            origin: (rank, stream),
            joined: BTreeMap::from([((rank, stream), true)]),
            recorded_on: BTreeMap::new(),
            commands: Vec::new(),
        });
        Ok(())
    }

    fn end_capture(&mut self) -> Result<(), String> {
        let c = self.capture.take().ok_or("no capture is in progress")?;
        if let Some((s, _)) = c.joined.iter().find(|(_, back)| !**back) {
            return Err(format!("stream {s:?} was not joined back into the capture"));
        }
        self.graph = Some(c.commands);
        self.graph_origin = c.origin;
        Ok(())
    }

    /// The graph is launched into its origin stream: its nodes run after
    /// what that stream holds, and after nothing else (the streams they
    /// were captured from play no part), so for the write order every
    /// stream of the graph has seen what the origin has.
    fn launch_graph(&mut self) -> Result<(), String> {
        let graph = self.graph.clone().ok_or("no graph has been captured")?;
        let before = self
            .order
            .seen
            .get(&self.graph_origin)
            .cloned()
            .unwrap_or_default();
        for &(rank, stream, _) in &graph {
            self.order.seen.insert((rank, stream), before.clone());
        }
        for (rank, stream, cmd) in graph {
            self.enqueue(rank, stream, cmd)?;
        }
        Ok(())
    }

    fn fetch(&mut self, rank: usize) -> Result<Vec<u8>, String> {
        self.fetches += 1;
        while !self.readbacks.contains_key(&rank) {
            if self.shuffle.is_none() || !self.step_random()? {
                return Err(format!("rank {rank} has no read-back queued"));
            }
        }
        Ok(self.readbacks[&rank].clone())
    }

    /// Queued on stream 0 of the rank (see `Target::write`); in shuffled
    /// mode it lands when that queue reaches it.
    fn write(&mut self, at: Addr, bytes: &[u8]) -> Result<(), String> {
        if self.capture.is_some() {
            return Err("a host write during a capture".into());
        }
        self.order.write(at.rank);
        if self.shuffle.is_none() {
            self.writes_landed += 1;
            return self.put(at, bytes);
        }
        self.ptr(at, bytes.len() as u64)?;
        self.queues
            .entry((at.rank, 0))
            .or_default()
            .push_back(Queued {
                work: Work::HostWrite {
                    at,
                    bytes: bytes.to_vec(),
                },
                gen: 0,
            });
        Ok(())
    }

    fn synchronize(&mut self) -> Result<(), String> {
        if self.shuffle.is_some() {
            while self.step_random()? {}
        }
        Ok(())
    }

    fn read(&mut self, at: Addr, bytes: u64) -> Result<Vec<u8>, String> {
        self.bytes(at, bytes)
    }

    /// One emulated microsecond per command executed.
    fn stamp_seconds(&mut self, count: u32) -> Result<Vec<f64>, String> {
        let clock = |n: u32| {
            self.stamps
                .get(&n)
                .copied()
                .ok_or(format!("stamp {n} never ran"))
        };
        let first = clock(0)?;
        (0..count)
            .map(|n| clock(n).map(|t| (t as f64 - first as f64) * 1e-6))
            .collect()
    }
}

// --------------------------------------------------------------- runs

struct Outcome {
    outputs: Vec<Vec<f32>>,
    routed: Vec<u64>,
    dropped: u64,
}

fn cpu_run(plan: &Plan, seed: u64) -> Outcome {
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let weights = LayerWeights::random(&layer, seed);
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, seed);
    let f = CpuBackend::new(plan.clone(), &weights, CpuOptions::default())
        .unwrap()
        .forward(&inputs)
        .unwrap();
    Outcome {
        outputs: f.outputs,
        routed: f.stats.routed_per_expert,
        dropped: f.stats.dropped,
    }
}

/// One emulated device holding every rank of `plan`, the weights and inputs
/// of `seed` uploaded, after passes in each of `modes` in turn (a failing
/// pass panics, naming its mode).
fn emu_passes<'k>(
    plan: &Plan,
    program: &'k Program,
    kernels: &'k HostKernels,
    seed: u64,
    shuffle: Option<u64>,
    modes: &[PassMode],
) -> (Emu<'k>, Vec<Pass>) {
    let layer = &plan.layer;
    let ranks = plan.mesh.world_size() as usize;
    let weights = LayerWeights::random(layer, seed);
    let inputs = random_inputs(layer, ranks, layer.tokens_per_rank as usize, seed);
    let mut emu = Emu::new(program, kernels, shuffle);
    let local: Vec<usize> = (0..ranks).collect();
    upload_weights(program, &mut emu, &local, &weights).unwrap();
    let passes = modes
        .iter()
        .map(|&mode| {
            run_pass(program, &mut emu, &local, &inputs, mode)
                .unwrap_or_else(|e| panic!("{} {mode:?}: {e}", layer.name))
        })
        .collect();
    (emu, passes)
}

/// One emulated device holding every rank of `plan`, the weights and inputs
/// of `seed` uploaded, after `count` passes through `graph_pass` (an eager
/// pass and a capture, then replays).
fn emu_graph_passes<'k>(
    plan: &Plan,
    program: &'k Program,
    kernels: &'k HostKernels,
    shuffle: Option<u64>,
    count: usize,
) -> (Emu<'k>, Vec<Pass>) {
    let (mut emu, _) = emu_passes(plan, program, kernels, 3, shuffle, &[]);
    let ranks = plan.mesh.world_size() as usize;
    let inputs = random_inputs(&plan.layer, ranks, plan.layer.tokens_per_rank as usize, 3);
    let local: Vec<usize> = (0..ranks).collect();
    let mut stage = GraphStage::Cold;
    let passes = (0..count)
        .map(|i| {
            graph_pass(program, &mut emu, &local, &inputs, &mut stage)
                .unwrap_or_else(|e| panic!("{} graph pass {i}: {e}", plan.layer.name))
        })
        .collect();
    (emu, passes)
}

fn emu_run(
    plan: &Plan,
    program: &Program,
    kernels: &HostKernels,
    seed: u64,
    shuffle: Option<u64>,
) -> Outcome {
    let ranks = plan.mesh.world_size() as usize;
    let (emu, mut passes) = emu_passes(plan, program, kernels, seed, shuffle, &[PassMode::Eager]);
    let pass = passes.remove(0);
    assert!(emu.launches > 0);
    // Capacity plans with every rank here need nothing from the device
    // during the pass (no host synchronisation) unless the hierarchical
    // legs need the routing on the host; dropless plans read the routing
    // back once per rank.
    if program.padded > 0 && !program.hierarchical() {
        assert_eq!(emu.fetches, 0, "a capacity plan waited for the routing");
    } else {
        assert_eq!(emu.fetches, ranks, "one routing read-back per rank");
    }
    Outcome {
        outputs: pass.outputs,
        routed: pass.stats.routed_per_expert,
        dropped: pass.stats.dropped,
    }
}

/// The largest difference over the largest value.
fn relative_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut diff, mut max) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
        diff = diff.max(f64::from((x - y).abs()));
        max = max.max(f64::from(y.abs()));
    }
    assert!(max > 1e-3, "the outputs are all (nearly) zero");
    diff / max
}

fn compare(name: &str, plan: &Plan, shuffles: &[u64], bound: f64) {
    let program = Program::lower(plan).unwrap_or_else(|e| panic!("{name}: {e}"));
    let kernels = HostKernels::new(&program);
    let want = cpu_run(plan, 3);
    let got = emu_run(plan, &program, &kernels, 3, None);
    assert_eq!(got.routed, want.routed, "{name}: assignments per expert");
    assert_eq!(got.dropped, want.dropped, "{name}: dropped assignments");
    assert_eq!(got.outputs.len(), want.outputs.len());
    let err = relative_error(&got.outputs, &want.outputs);
    assert!(
        err <= bound,
        "{name}: relative error {err:e} (bound {bound:e})"
    );
    eprintln!("{name}: the emulated device matches the CPU backend (relative error {err:e})");
    for &s in shuffles {
        let shuffled = emu_run(
            plan,
            &program,
            &kernels,
            3,
            Some(s.wrapping_mul(0x9e37_79b9) | 1),
        );
        assert!(
            shuffled.outputs == got.outputs,
            "{name}: shuffled device queues (seed {s}) changed the output"
        );
    }
}

fn have_cxx(test: &str) -> bool {
    if cxx().is_none() {
        eprintln!("{test}: skipped, no C++ compiler found (set CXX)");
        return false;
    }
    true
}

// -------------------------------------------------------------- tests

/// Every example at full size and shrunk: every op becomes steps, events keep
/// their record-before-wait order, every span lies inside its allocation,
/// every launch's arguments fit its kernel's parameters.
#[test]
fn every_example_lowers_to_a_consistent_program() {
    let full: Vec<(String, Plan)> = examples()
        .into_iter()
        .map(|p| {
            let name = format!("{} (full)", p.file_stem().unwrap().to_string_lossy());
            (
                name,
                plan_of(&std::fs::read_to_string(&p).unwrap(), &Overrides::default()),
            )
        })
        .collect();
    let all = full
        .into_iter()
        .chain(shrunk_examples(moec_lang::spec::DType::Bf16))
        .chain(small_layers());
    let mut hierarchical = 0;
    let mut by_rank_full = Vec::new();
    for (name, plan) in all {
        if plan.choices.dispatch == moec_runtime::plan::A2aAlgorithm::Hierarchical {
            hierarchical += 1;
        }
        if plan.choices.dedup_dispatch && name.ends_with("(full)") {
            by_rank_full.push(name.clone());
        }
        let p = Program::lower(&plan).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Every op, in id order, with at least one step on its own stream.
        let ids: Vec<u32> = {
            let mut v: Vec<u32> = plan.ops().map(|(_, o)| o.id).collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            p.ops.iter().map(|o| o.id).collect::<Vec<_>>(),
            ids,
            "{name}"
        );
        for (i, o) in p.ops.iter().enumerate() {
            assert!(
                p.steps.iter().any(|s| s.op == i && s.stream == o.stream),
                "{name}: op #{} has no step",
                o.id
            );
        }
        assert!(
            p.steps.windows(2).all(|w| w[0].op <= w[1].op),
            "{name}: order"
        );
        // Events: one record each, before every wait on it, on the plan's streams.
        let mut recorded = vec![false; p.events as usize];
        for s in &p.steps {
            let op = plan.ops().find(|(_, o)| o.id == p.ops[s.op].id).unwrap();
            match s.kind {
                StepKind::Record(e) => {
                    assert!(!recorded[e as usize], "{name}: e{e} recorded twice");
                    recorded[e as usize] = true;
                    assert!(matches!(op.1.kind, OpKind::Record { event } if event == e));
                }
                StepKind::Wait(e) => {
                    assert!(
                        recorded[e as usize],
                        "{name}: e{e} waited before its record"
                    );
                    assert!(matches!(op.1.kind, OpKind::Wait { event } if event == e));
                }
                _ => {}
            }
            assert_eq!(s.stream, op.0, "{name}: a step off its op's stream");
        }
        // Spans inside their allocations; arguments fit their parameters.
        let inside = |span: &Span| {
            let size = match span.space {
                Space::Arena => p.arena_bytes,
                Space::Weights => p.weights.bytes,
                Space::Work => p.work.bytes,
            };
            assert!(span.end() <= size, "{name}: {span:?} outside {size} bytes");
        };
        let mut slots = Vec::new();
        for s in &p.steps {
            match &s.kind {
                StepKind::Launch(l) => {
                    check_args(&l.label, &p.params(l.kernel), &l.args).unwrap();
                    for a in &l.args {
                        if let ArgT::Buf { span, .. } = a {
                            inside(span);
                        }
                    }
                    slots.push(l.status);
                }
                StepKind::Gemm(g) => {
                    for span in [&g.a, &g.c, &g.acc, &g.biased] {
                        inside(span);
                    }
                    // The second accumulator only where a bias is added
                    // before an activation or a reduction, and as large as
                    // the first.
                    let biased = matches!(
                        g.tail,
                        Tail::Activation { store: Some(_), .. }
                            | Tail::Reduce { store: Some(_), .. }
                    );
                    if let Some(x) = g.gather {
                        for span in [&x.rows, &x.index, &x.weights] {
                            inside(span);
                        }
                        assert!(
                            g.a.bytes <= p.work.streams[s.stream].gathered.bytes,
                            "{name}"
                        );
                    }
                    let want = if biased { g.acc.bytes } else { 0 };
                    assert_eq!(g.biased.bytes, want, "{name}: {} biased", g.label);
                    let stream = &p.work.streams[s.stream];
                    assert!(g.biased.bytes <= stream.biased.bytes, "{name}");
                    slots.push(g.status);
                }
                StepKind::Memset { span, .. } => inside(span),
                StepKind::Collective(c) => {
                    inside(&c.send);
                    inside(&c.recv);
                    // The flat all-to-alls' copy kernels (`route_copy`) and
                    // the hierarchical legs' (`copy_runs`, over NCCL) have a
                    // block of their own.
                    let hierarchical = c.scope != moec_runtime::plan::CollectiveScope::EpGroup;
                    let routed = hierarchical
                        || matches!(
                            c.kind,
                            moec_runtime::plan::CollectiveKind::AllToAll
                                | moec_runtime::plan::CollectiveKind::AllToAllV
                        );
                    assert_eq!(c.status.is_some(), routed, "{name}: {c:?}");
                    if hierarchical {
                        // Every leg can pack and unpack on its stream.
                        let stream = &p.work.streams[s.stream];
                        assert!(stream.pack.bytes > 0 && stream.unpack.bytes > 0, "{name}");
                        assert!(stream.runs.bytes > 0, "{name}");
                    }
                    slots.extend(c.status);
                    slots.extend(c.forwarder_sum.map(|f| f.status));
                }
                _ => {}
            }
        }
        let n = slots.len();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), n, "{name}: two launches share a status block");
        assert_eq!(n, p.status.len(), "{name}: unused status blocks");
        for span in [
            p.work.status,
            p.work.table,
            p.work.stats,
            p.work.keep_own,
            p.work.kept_own,
            p.work.send_off,
            p.work.recv_off,
        ] {
            inside(&span);
        }
        // Capacity plans pad the expert side, dropless ones pack it.
        let capacity = matches!(
            plan.layer.capacity,
            moec_runtime::plan::CapacityConfig::Limited { .. }
        );
        // By rank, the expansion index packs the expert side.
        let by_rank = plan.choices.dedup_dispatch || plan.choices.reduce_combine;
        assert_eq!(
            p.padded > 0,
            capacity && !by_rank,
            "{name}: padded {}",
            p.padded
        );
        assert!(p.weights.router.end() <= p.weights.bytes);
    }
    // The full DeepSeek-V3 example crosses its nodes hierarchically.
    assert!(hierarchical >= 1, "no hierarchical plan was lowered");
    // No routing form is held back from the GPU: the full examples whose
    // best plan dispatches by rank (DeepSeek-V3's hierarchically) lower as
    // they are, with every other (Llama-4 routes top-1: a token already
    // travels once per rank).
    eprintln!("full examples dispatching by rank: {by_rank_full:?}");
    assert!(
        by_rank_full.iter().any(|n| n == "deepseek_v3 (full)"),
        "{by_rank_full:?}"
    );
}

/// DeepSeek-V3 on two nodes of eight virtual ranks over a slow network,
/// where the compiler picks the hierarchical all-to-all: the legs on the
/// emulated device (host-side routing, device-to-device copies) against the
/// CPU backend, in f32 and bf16, under shuffled device queues.
#[test]
fn the_hierarchical_all_to_all_on_the_emulated_device_matches_the_cpu() {
    if !have_cxx("the_hierarchical_all_to_all_on_the_emulated_device_matches_the_cpu") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deepseek_v3.moe");
    let source = std::fs::read_to_string(path)
        .unwrap()
        .replace("bandwidth = 400 Gb/s", "bandwidth = 10 Gb/s");
    for dtype in [moec_lang::spec::DType::F32, moec_lang::spec::DType::Bf16] {
        let overrides = Overrides {
            ranks: Some(16),
            tokens: Some(128),
            dtype: Some(dtype),
            hidden: Some(64),
            ffn: Some(32),
        };
        let plan = plan_of(&source, &overrides);
        assert_eq!(
            plan.choices.dispatch,
            moec_runtime::plan::A2aAlgorithm::Hierarchical,
            "this mesh should pick the hierarchical all-to-all"
        );
        let name = format!("deepseek_v3 hierarchical {}", plan.layer.dtype.name());
        // Bit for bit: the same rows, copied, and the same kernels.
        compare(&name, &plan, &[1, 2], 0.0);
    }
}

/// A dropless plan whose routing needs more rows than its bounded buffers
/// hold (`headroom = 1`, random routing): the emulated device refuses the
/// pass at the routing read-back, before any row moves, with the rows and
/// what to change; the CPU backend grows its buffers and runs it.
#[test]
fn an_overflowing_dropless_pass_is_refused_on_the_device() {
    if !have_cxx("an_overflowing_dropless_pass_is_refused_on_the_device") {
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny.moe");
    let source = format!(
        "{}\nschedule {{\n    headroom = 1\n}}\n",
        std::fs::read_to_string(path).unwrap()
    );
    for routing in [RoutingForm::PerAssignment, RoutingForm::DedupReduce] {
        let options = Options {
            routing: Some(routing),
            ..Options::default()
        };
        let plan = plan_with(&source, &Overrides::default(), &options);
        let program = Program::lower(&plan).unwrap();
        let kernels = HostKernels::new(&program);
        // The check sits where the host first reads the routing back, which
        // every step that moves a row waits for.
        let (mut emu, _) = emu_passes(&plan, &program, &kernels, 3, None, &[]);
        let inputs = random_inputs(&plan.layer, 4, 32, 3);
        let local: Vec<usize> = (0..4).collect();
        let e = run_pass(&program, &mut emu, &local, &inputs, PassMode::Eager)
            .err()
            .unwrap_or_else(|| panic!("{}: the pass should overflow", routing.name()))
            .to_string();
        for part in ["expert rows", "buffers hold 64", "headroom = worst_case"] {
            assert!(
                e.contains(part),
                "{}: `{part}` is not in: {e}",
                routing.name()
            );
        }
        let f = CpuBackend::new(
            plan.clone(),
            &LayerWeights::random(&plan.layer, 3),
            CpuOptions::default(),
        )
        .unwrap()
        .forward(&inputs)
        .unwrap();
        assert!(
            f.grown.is_some(),
            "{}: the CPU pass did not grow",
            routing.name()
        );
    }
}

/// Every example shrunk, in f32: the emulated device gives the CPU
/// backend's outputs and routing statistics.
#[test]
fn every_example_on_the_emulated_device_matches_the_cpu() {
    if !have_cxx("every_example_on_the_emulated_device_matches_the_cpu") {
        return;
    }
    for (name, plan) in shrunk_examples(moec_lang::spec::DType::F32) {
        compare(&name, &plan, &[], 1e-6);
    }
}

/// The same in bf16, where the issue's bound for the GPU is a relative
/// error under 1e-2.
#[test]
fn every_example_in_bf16_on_the_emulated_device_matches_the_cpu() {
    if !have_cxx("every_example_in_bf16_on_the_emulated_device_matches_the_cpu") {
        return;
    }
    for (name, plan) in shrunk_examples(moec_lang::spec::DType::Bf16) {
        compare(&name, &plan, &[], 1e-2);
    }
}

/// Both drop policies, chunked and unfused plans, biases and GELU; every
/// one also under shuffled device queues.
#[test]
fn capacity_chunks_and_unfused_plans_match_under_shuffled_queues() {
    if !have_cxx("capacity_chunks_and_unfused_plans_match_under_shuffled_queues") {
        return;
    }
    for (name, plan) in small_layers() {
        compare(&name, &plan, &[1, 2], 1e-6);
    }
}

/// Examples whose plans run streams side by side (shared experts beside the
/// dispatch) give the same bits whatever order the device queues run in.
#[test]
fn examples_survive_shuffled_device_queues() {
    if !have_cxx("examples_survive_shuffled_device_queues") {
        return;
    }
    let plans = shrunk_examples(moec_lang::spec::DType::F32);
    for (name, plan) in plans
        .iter()
        .filter(|(n, _)| ["tiny", "qwen2_57b_a14b", "mixtral_8x7b"].contains(&n.as_str()))
    {
        compare(name, plan, &[7], 1e-6);
    }
}

/// A profiled pass (a stamp before and after every step and every cuBLAS
/// GEMM, in order and shuffled) gives the same outputs as a plain one, and a
/// timing for every timed step of every rank: each GEMM with its shape and
/// rows summing to what the routing sent, and every step that issued work
/// taking time on the emulated clock.
#[test]
fn profiled_passes_time_every_step_and_change_nothing() {
    if !have_cxx("profiled_passes_time_every_step_and_change_nothing") {
        return;
    }
    let plans = shrunk_examples(moec_lang::spec::DType::F32);
    for (name, plan) in plans
        .iter()
        .filter(|(n, _)| ["tiny", "qwen2_57b_a14b", "gpt_oss_20b"].contains(&n.as_str()))
    {
        let program = Program::lower(plan).unwrap();
        let kernels = HostKernels::new(&program);
        let plain = emu_run(plan, &program, &kernels, 3, None);
        let ranks = plan.mesh.world_size() as usize;
        let local: Vec<usize> = (0..ranks).collect();
        for shuffle in [None, Some(5)] {
            let (_, mut passes) =
                emu_passes(plan, &program, &kernels, 3, shuffle, &[PassMode::Profiled]);
            let pass = passes.remove(0);
            assert!(
                pass.outputs == plain.outputs,
                "{name}: profiling changed the output"
            );
            let timed_steps = program
                .steps
                .iter()
                .filter(|s| {
                    !matches!(
                        s.kind,
                        StepKind::Record(_) | StepKind::Wait(_) | StepKind::ReadRoute
                    )
                })
                .count();
            let steps: Vec<_> = pass.timings.iter().filter(|t| t.gemm.is_none()).collect();
            assert_eq!(
                steps.len(),
                timed_steps * ranks,
                "{name}: one timing per step and rank"
            );
            for &r in &local {
                let mine = steps.iter().filter(|t| t.rank == r).count();
                assert_eq!(mine, timed_steps, "{name}: rank {r}");
            }
            assert!(
                steps.iter().any(|t| t.seconds > 0.0),
                "{name}: no step took time"
            );
            let gemms: Vec<_> = pass
                .timings
                .iter()
                .filter_map(|t| t.gemm.map(|g| (t, g)))
                .collect();
            assert!(!gemms.is_empty(), "{name}: no GEMM was timed");
            for (t, (m, n, k)) in &gemms {
                assert!(*m > 0 && *n > 0 && *k > 0, "{name}: GEMM {m}x{n}x{k}");
                assert!(t.seconds > 0.0, "{name}: a GEMM took no time");
                assert!(program.ops.get(t.op).is_some(), "{name}: op {}", t.op);
            }
            // The expert down projections ([m, F] · [H, F]ᵀ) cover every row
            // the routing kept, once.
            let (hidden, ffn) = (plan.layer.hidden, plan.layer.intermediate);
            let down_rows: u64 = gemms
                .iter()
                .filter(|(t, (_, n, k))| {
                    *n == hidden
                        && *k == ffn
                        && program.ops[t.op].phase == moec_runtime::plan::Phase::Experts
                })
                .map(|(_, (m, _, _))| *m)
                .sum();
            let kept: u64 = pass.stats.routed_per_expert.iter().sum::<u64>() - pass.stats.dropped;
            assert_eq!(down_rows, kept, "{name}: rows of the expert down GEMMs");
        }
        eprintln!("{name}: profiled passes time every step");
    }
}

/// Capacity plans run as a graph: a captured pass (every stream forked from
/// the first rank's first stream and joined back, nothing on another
/// stream, no read-back, stamp or NCCL call inside) and two replays give
/// the eager pass's outputs and statistics, in order and shuffled; dropless
/// plans refuse to be captured, with the reason.
#[test]
fn capacity_plans_run_as_a_graph() {
    if !have_cxx("capacity_plans_run_as_a_graph") {
        return;
    }
    // What `--graph` compiles: per-pick routing, found on the device.
    let routed = Options::cuda_device_routed();
    let mut plans: Vec<(String, Plan)> = small_layers_with(&routed)
        .into_iter()
        .filter(|(n, _)| n.contains("capacity"))
        .collect();
    plans.extend(
        shrunk_examples_with(moec_lang::spec::DType::Bf16, &routed)
            .into_iter()
            .filter(|(n, _)| n == "switch_base_128"),
    );
    assert!(plans.len() >= 5, "{}", plans.len());
    for (name, plan) in &plans {
        let program = Program::lower(plan).unwrap();
        assert!(program.padded > 0, "{name}");
        let kernels = HostKernels::new(&program);
        let eager = emu_run(plan, &program, &kernels, 3, None);
        let ranks = plan.mesh.world_size() as usize;
        let modes = [PassMode::Capture, PassMode::Replay, PassMode::Replay];
        for shuffle in [None, Some(9)] {
            let (emu, passes) = emu_graph_passes(plan, &program, &kernels, shuffle, modes.len());
            for (mode, pass) in modes.iter().zip(passes) {
                assert!(
                    pass.outputs == eager.outputs,
                    "{name} {mode:?}: outputs differ"
                );
                assert_eq!(
                    pass.stats.routed_per_expert, eager.routed,
                    "{name} {mode:?}"
                );
                assert_eq!(pass.stats.dropped, eager.dropped, "{name} {mode:?}");
            }
            assert_eq!(emu.fetches, 0, "{name}");
            // The experts' slots are equal and their weights evenly spaced:
            // one strided-batched GEMM per projection and rank.
            let graph = emu.graph.as_ref().unwrap();
            let batched = graph
                .iter()
                .filter(|(_, _, c)| matches!(c, Command::GemmBatched { .. }))
                .count();
            assert!(batched >= 2 * ranks, "{name}: {batched} batched GEMMs");
        }
        eprintln!("{name}: captured and replayed");
    }
    let dropless = shrunk_examples(moec_lang::spec::DType::F32)
        .into_iter()
        .find(|(n, _)| n == "tiny")
        .unwrap()
        .1;
    let program = Program::lower(&dropless).unwrap();
    let kernels = HostKernels::new(&program);
    let mut emu = Emu::new(&program, &kernels, None);
    let ranks = dropless.mesh.world_size() as usize;
    let inputs = random_inputs(
        &dropless.layer,
        ranks,
        dropless.layer.tokens_per_rank as usize,
        3,
    );
    let local: Vec<usize> = (0..ranks).collect();
    let e = run_pass(&program, &mut emu, &local, &inputs, PassMode::Capture).unwrap_err();
    assert!(e.to_string().contains("only capacity plans"), "{e}");
    assert!(emu.graph.is_none());
    // Through `graph_pass` too, before any pass runs.
    let mut stage = GraphStage::Cold;
    let e = graph_pass(&program, &mut emu, &local, &inputs, &mut stage).unwrap_err();
    assert!(e.to_string().contains("only capacity plans"), "{e}");
    assert_eq!((emu.executed, stage), (0, GraphStage::Cold));
}

/// The first graph pass runs an eager pass before it captures, so the
/// first launch of every kernel and the first call of every cuBLAS handle
/// (which may load a module or allocate on a GPU) happen outside the
/// capture; capturing a cold device is an error of the emulation.
#[test]
fn a_graph_is_captured_after_an_eager_pass() {
    if !have_cxx("a_graph_is_captured_after_an_eager_pass") {
        return;
    }
    let (name, plan) = small_layers_with(&Options::cuda_device_routed())
        .into_iter()
        .find(|(n, _)| n.contains("capacity"))
        .unwrap();
    let program = Program::lower(&plan).unwrap();
    let kernels = HostKernels::new(&program);
    let (emu, passes) = emu_graph_passes(&plan, &program, &kernels, Some(5), 2);
    let eager = emu_run(&plan, &program, &kernels, 3, None);
    for pass in &passes {
        assert!(pass.outputs == eager.outputs, "{name}");
    }
    assert!(emu.graph.is_some());
    // What a capture on the first pass would do.
    let (mut emu, _) = emu_passes(&plan, &program, &kernels, 3, None, &[]);
    let ranks = plan.mesh.world_size() as usize;
    let inputs = random_inputs(&plan.layer, ranks, plan.layer.tokens_per_rank as usize, 3);
    let local: Vec<usize> = (0..ranks).collect();
    let e = run_pass(&program, &mut emu, &local, &inputs, PassMode::Capture).unwrap_err();
    assert!(e.to_string().contains("inside a capture"), "{e}");
}

/// The host's writes (inputs, status blocks) land asynchronously on each
/// rank's first stream; the issuer orders them before every stream of the
/// pass by itself, not through the plan's events: with every plan wait
/// removed, no command touches memory before the writes are ordered before
/// it (the emulation checks each one), eager, profiled and as a graph; and
/// the emulation catches a kernel that is not ordered after a write.
#[test]
fn host_writes_are_ordered_before_every_stream() {
    if !have_cxx("host_writes_are_ordered_before_every_stream") {
        return;
    }
    let (name, plan) = small_layers_with(&Options::cuda_device_routed())
        .into_iter()
        .find(|(n, p)| n.contains("capacity") && p.streams.len() > 1)
        .unwrap();
    let mut program = Program::lower(&plan).unwrap();
    assert!(program.streams > 1, "{name}");
    let kernels = HostKernels::new(&program);
    let modes = [
        PassMode::Eager,
        PassMode::Profiled,
        PassMode::Capture,
        PassMode::Replay,
    ];
    let (emu, passes) = emu_passes(&plan, &program, &kernels, 3, Some(11), &modes);
    assert!(emu.writes_landed > 0);
    for (mode, pass) in modes.iter().zip(&passes) {
        assert!(pass.outputs == passes[0].outputs, "{name} {mode:?}");
    }
    // Without the plan's waits the outputs may race; the write order must not.
    program
        .steps
        .retain(|s| !matches!(s.kind, StepKind::Wait(_)));
    let ranks = plan.mesh.world_size() as usize;
    let inputs = random_inputs(&plan.layer, ranks, plan.layer.tokens_per_rank as usize, 3);
    let local: Vec<usize> = (0..ranks).collect();
    let weights = LayerWeights::random(&plan.layer, 3);
    let mut emu = Emu::new(&program, &kernels, None);
    upload_weights(&program, &mut emu, &local, &weights).unwrap();
    for mode in [PassMode::Eager, PassMode::Profiled] {
        run_pass(&program, &mut emu, &local, &inputs, mode)
            .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
    }
    // The emulation's own check: a memset on stream 1 right after a write
    // is an error, on stream 0 it is ordered.
    let mut emu = Emu::new(&program, &kernels, None);
    emu.write(
        Addr {
            rank: 0,
            space: Space::Arena,
            offset: 0,
        },
        &[1, 2, 3, 4],
    )
    .unwrap();
    let memset = Command::Memset {
        dst: Addr {
            rank: 0,
            space: Space::Arena,
            offset: 0,
        },
        bytes: 4,
        value: 0,
    };
    let e = emu.submit(0, 1, memset.clone()).unwrap_err();
    assert!(e.contains("not ordered after the host's write"), "{e}");
    emu.submit(0, 0, memset).unwrap();
}

/// A pass with one emulated process per rank (a thread each, one rank
/// each), the collectives as NCCL send and receive lists through a mailbox;
/// with each process's most operations with one peer in one NCCL group.
#[allow(clippy::type_complexity)] // a pass and a count per process
fn nccl_passes(
    program: &Program,
    kernels: &HostKernels,
    weights: &LayerWeights,
    inputs: &[Vec<f32>],
    shuffle: Option<u64>,
) -> Vec<(Result<Pass, moec_runtime::cpu::ExecError>, usize)> {
    let mailbox = Arc::new(Mailbox::default());
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..inputs.len())
            .map(|r| {
                let mailbox = mailbox.clone();
                let input = vec![inputs[r].clone()];
                s.spawn(move || {
                    // Each process its own interleaving of its streams.
                    let mut emu = Emu::new(program, kernels, shuffle.map(|s| s + 31 * r as u64));
                    emu.mailbox = Some(mailbox);
                    upload_weights(program, &mut emu, &[r], weights).unwrap();
                    let pass = run_pass(program, &mut emu, &[r], &input, PassMode::Eager);
                    (pass, emu.nccl_per_peer)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One emulated process per rank, the collectives as NCCL send and receive
/// lists through a mailbox (sizes checked pair by pair): the issuer's NCCL
/// path gives the CPU backend's outputs too.
#[test]
fn the_nccl_path_matches_the_cpu() {
    if !have_cxx("the_nccl_path_matches_the_cpu") {
        return;
    }
    // Per-pick routing (the by-rank forms have their own NCCL test).
    let routed = Options::cuda_device_routed();
    let mut plans: Vec<(String, Plan)> = shrunk_examples_with(moec_lang::spec::DType::F32, &routed)
        .into_iter()
        .filter(|(n, _)| ["tiny", "qwen2_57b_a14b", "gpt_oss_20b"].contains(&n.as_str()))
        .collect();
    plans.extend(
        small_layers_with(&routed)
            .into_iter()
            .filter(|(n, _)| n.starts_with("capacity drop = probs") || n.starts_with("chunked")),
    );
    for (name, plan) in plans {
        nccl_matches_the_cpu(&name, &plan);
    }
}

/// `plan` with one emulated process per rank (NCCL) gives the CPU
/// backend's outputs bit for bit and its routing statistics, in issue
/// order and with each process's streams shuffled. Returns the most
/// operations any process had with one peer in one NCCL group.
fn nccl_matches_the_cpu(name: &str, plan: &Plan) -> usize {
    nccl_matches_the_cpu_with(name, plan, |_| {})
}

/// [`nccl_matches_the_cpu`] with the lowered program changed by `adjust`.
fn nccl_matches_the_cpu_with(name: &str, plan: &Plan, adjust: impl Fn(&mut Program)) -> usize {
    let mut program = Program::lower(plan).unwrap_or_else(|e| panic!("{name}: {e}"));
    adjust(&mut program);
    let kernels = HostKernels::new(&program);
    let want = cpu_run(plan, 3);
    let layer = plan.layer.clone();
    let ranks = plan.mesh.world_size() as usize;
    let weights = LayerWeights::random(&layer, 3);
    let inputs = random_inputs(&layer, ranks, layer.tokens_per_rank as usize, 3);
    // In issue order, then with every process's streams shuffled (NCCL
    // keeps its own operations in issue order; see `Emu::nccl_issued`).
    let mut most_per_peer = 0;
    for shuffle in [None, Some(1), Some(2)] {
        let name = format!("{name} (shuffle {shuffle:?})");
        let (passes, per_peer): (Vec<_>, Vec<_>) =
            nccl_passes(&program, &kernels, &weights, &inputs, shuffle)
                .into_iter()
                .unzip();
        most_per_peer = most_per_peer.max(per_peer.into_iter().max().unwrap_or(0));
        let mut outputs = Vec::new();
        let mut routed = vec![0u64; plan.layer.experts as usize];
        let mut dropped = 0;
        let errors: Vec<String> = passes
            .iter()
            .filter_map(|p| p.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:#?}");
        for p in passes {
            let p = p.unwrap_or_else(|e| panic!("{name}: {e}"));
            outputs.extend(p.outputs);
            for (a, b) in routed.iter_mut().zip(&p.stats.routed_per_expert) {
                *a += b;
            }
            dropped += p.stats.dropped;
        }
        assert_eq!(routed, want.routed, "{name}");
        assert_eq!(dropped, want.dropped, "{name}");
        assert!(outputs == want.outputs, "{name}: the NCCL path differs");
    }
    eprintln!(
        "{name}: the NCCL path matches the CPU backend, in order and shuffled (at most {most_per_peer} operations with one peer in one NCCL group)"
    );
    most_per_peer
}

/// Random routing on every example's geometry: for each all-to-all, what a
/// rank sends a peer is cut into runs of exactly the lengths the peer
/// receives (NCCL matches sends and receives one to one), and the runs pair.
#[test]
fn every_all_to_all_pairs_run_for_run() {
    for (name, plan) in shrunk_examples(moec_lang::spec::DType::Bf16)
        .into_iter()
        .chain(small_layers())
    {
        let p = Program::lower(&plan).unwrap();
        let geo = Geometry::new(&plan).unwrap();
        let g = geo.group;
        // Random routing per EP rank, the tables layout.rs derives from it.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let n = geo.tokens * geo.top_k;
        let ids: Vec<Vec<i32>> = (0..g)
            .map(|_| {
                (0..geo.tokens)
                    .flat_map(|_| {
                        let mut picked: Vec<i32> = Vec::new();
                        while picked.len() < geo.top_k {
                            let e = (next() % geo.experts as u64) as i32;
                            if !picked.contains(&e) {
                                picked.push(e);
                            }
                        }
                        picked
                    })
                    .collect()
            })
            .collect();
        let weights: Vec<f32> = (0..n).map(|i| (i % 7) as f32 * 0.1 + 0.05).collect();
        let metas: Vec<i32> = ids
            .iter()
            .flat_map(|ids| {
                assign_count(
                    &geo,
                    0,
                    &Routing {
                        ids,
                        weights: &weights,
                    },
                )
                .unwrap()
            })
            .collect();
        let place = assign_place(
            &geo,
            0,
            &Routing {
                ids: &ids[0],
                weights: &weights,
            },
            &metas,
        )
        .unwrap();
        let lmax = p.route.max_local;
        let tables: Vec<RouteTable> = place
            .tables
            .iter()
            .map(|t| {
                let mut rows = Vec::new();
                for s in 0..g {
                    for q in 0..g {
                        for l in 0..lmax {
                            rows.push(t.rows(s, q, l));
                        }
                    }
                }
                let rt = RouteTable::new(g, lmax, rows).unwrap();
                for s in 0..g {
                    assert_eq!(rt.sent(s), t.sent(s));
                    assert_eq!(rt.received(s), t.received(s));
                    for l in 0..lmax {
                        assert_eq!(rt.expert_start(s, l), t.expert_start(s, l));
                        for q in 0..g {
                            assert_eq!(rt.send_start(s, q, l), t.send_start(s, q, l));
                            assert_eq!(rt.recv_start(s, q, l), t.recv_start(s, q, l));
                        }
                    }
                }
                rt
            })
            .collect();
        let mut checked = 0;
        for s in &p.steps {
            let StepKind::Collective(c) = &s.kind else {
                continue;
            };
            let table = tables.get(c.chunk);
            let runs: Vec<(PeerRuns, PeerRuns)> = (0..g)
                .map(|me| collective_runs(c, g, me, table, p.padded as usize).unwrap())
                .collect();
            for src in 0..g {
                for dst in 0..g {
                    let lens = |v: &[Run]| v.iter().map(|r| r.len).collect::<Vec<_>>();
                    assert_eq!(
                        lens(&runs[src].0[dst]),
                        lens(&runs[dst].1[src]),
                        "{name}: {src} -> {dst}"
                    );
                    let pairs = pair_runs(&runs[src].0[dst], &runs[dst].1[src]).unwrap();
                    let total: u64 = pairs.iter().map(|p| p.2).sum();
                    assert!(pairs
                        .iter()
                        .all(|&(a, b, l)| a + l <= c.send.bytes && b + l <= c.recv.bytes));
                    assert_eq!(
                        total as usize,
                        runs[src].0[dst].iter().map(|r| r.len).sum::<usize>()
                    );
                }
            }
            checked += 1;
        }
        assert!(checked >= 2 || g == 1, "{name}: no collectives?");
    }
}

fn le(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn ints(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The native kernels compiled for the host, launched one by one on byte
/// vectors (64 threads a block).
struct NativeHost {
    lib: libloading::Library,
}

impl NativeHost {
    fn new() -> NativeHost {
        let native: Vec<(String, Vec<Param>, bool)> = NativeKernel::ALL
            .iter()
            .map(|k| (k.symbol().to_string(), k.params(), false))
            .collect();
        NativeHost {
            lib: build(NATIVE_SOURCE, &native),
        }
    }

    /// Runs `k` over `rows` rows with its buffers and scalars in parameter
    /// order; the status block.
    fn run(
        &self,
        k: NativeKernel,
        bufs: &mut [&mut Vec<u8>],
        scalars: &[i64],
        rows: u64,
    ) -> [i64; 4] {
        let mut slots = Vec::new();
        let mut b = bufs.iter_mut();
        let mut s = scalars.iter();
        for p in k.params() {
            match p.kind {
                ParamKind::Buffer { elem, .. } => {
                    let v = b.next().unwrap();
                    slots.push(v.as_mut_ptr() as u64);
                    slots.push((v.len() / elem.bytes()) as u64);
                }
                ParamKind::Scalar(_) => slots.push(*s.next().unwrap() as u64),
            }
        }
        assert!(
            b.next().is_none() && s.next().is_none(),
            "{k:?}: extra arguments"
        );
        let i = NativeKernel::ALL.iter().position(|&x| x == k).unwrap();
        let mut status = [0i64; 4];
        // SAFETY: the wrapper matches the parameters; every buffer is a
        // live vector of the length passed beside it.
        unsafe {
            let f: libloading::Symbol<'_, HostFn> =
                self.lib.get(format!("moec_host_{i}").as_bytes()).unwrap();
            let grid = rows.div_ceil(64).max(1) as u32;
            f(
                slots.as_ptr(),
                rows as i64,
                status.as_mut_ptr(),
                std::ptr::null_mut(),
                grid,
                64,
            );
        }
        status
    }

    /// The `drop = probs` keep decision as the lowering launches it (count,
    /// starts, fill, one merge per width, keep) on `[meta_all, dest_rank,
    /// dest_local, table, kept_own]`: the first failing status, or zeros.
    fn keep_probs(
        &self,
        geo: &Geometry,
        me: usize,
        max_local: usize,
        bufs: &mut [&mut Vec<u8>; 5],
    ) -> [i64; 4] {
        let (g, t, k, e) = (geo.group, geo.tokens, geo.top_k, geo.experts);
        let n = (g * t * k) as u64;
        let cap = geo.capacity.map_or(-1, |(c, _)| c as i64);
        let [meta_all, dest_rank, dest_local, table, kept_own] = bufs;
        let mut cursor = vec![0u8; e * 4];
        let mut starts = vec![0u8; (e + 1) * 4];
        let mut keys = [vec![0u8; n as usize * 4], vec![0u8; n as usize * 4]];
        let mut order = keys.clone();
        let mut statuses = vec![
            self.run(
                NativeKernel::ProbsCount,
                &mut [meta_all, &mut cursor],
                &[t as i64, k as i64, e as i64],
                n,
            ),
            self.run(
                NativeKernel::ProbsStarts,
                &mut [&mut cursor, &mut starts],
                &[e as i64],
                1,
            ),
        ];
        {
            let [k0, _] = &mut keys;
            let [o0, _] = &mut order;
            statuses.push(self.run(
                NativeKernel::ProbsFill,
                &mut [meta_all, &mut cursor, k0, o0],
                &[k as i64],
                n,
            ));
        }
        // Each merge reads buffers 0 and writes buffers 1; the swap makes
        // its output the next one's input, so the sorted rows end in 0.
        for shift in moec_kernels::native::probs_merge_shifts(n) {
            let [k_in, k_out] = &mut keys;
            let [o_in, o_out] = &mut order;
            statuses.push(self.run(
                NativeKernel::ProbsMerge,
                &mut [k_in, o_in, &mut starts, k_out, o_out],
                &[e as i64, i64::from(shift)],
                n,
            ));
            keys.swap(0, 1);
            order.swap(0, 1);
        }
        let sorted = &mut order[0];
        statuses.push(self.run(
            NativeKernel::AssignKeepProbs,
            &mut [sorted, &mut starts, dest_rank, dest_local, table, kept_own],
            &[
                g as i64,
                me as i64,
                t as i64,
                k as i64,
                e as i64,
                geo.chunk_tokens as i64,
                max_local as i64,
                cap,
            ],
            n,
        ));
        statuses.into_iter().find(|s| s[0] != 0).unwrap_or([0; 4])
    }
}

/// Random routing for every rank of an EP group (`tokens` x `top_k`
/// distinct experts of `experts` per rank), skewed towards three experts
/// when `skewed` (drops), with weights from five values (ties: probs ranks
/// ties by global order).
fn random_routing(
    seed: u64,
    group: usize,
    tokens: usize,
    top_k: usize,
    experts: usize,
    skewed: bool,
) -> (Vec<Vec<i32>>, Vec<Vec<f32>>) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let ids: Vec<Vec<i32>> = (0..group)
        .map(|_| {
            (0..tokens)
                .flat_map(|_| {
                    let mut picked: Vec<i32> = Vec::new();
                    while picked.len() < top_k {
                        let span = if skewed { 3.min(experts) } else { experts };
                        let x = (next() % span as u64) as i32;
                        if !picked.contains(&x) || span < top_k {
                            picked.push(x);
                        }
                    }
                    picked
                })
                .collect()
        })
        .collect();
    let weights: Vec<Vec<f32>> = (0..group)
        .map(|_| {
            (0..tokens * top_k)
                .map(|_| (next() % 5) as f32 * 0.25)
                .collect()
        })
        .collect();
    (ids, weights)
}

/// The native assignment kernels on one routing of every rank of `plan`'s
/// EP group against `layout.rs`: the same metadata, then for every rank the
/// same slots, routing tables, routed and dropped counts and overflow flag;
/// with `by_rank` (dispatch by rank, whatever the plan chose), the by-rank
/// counts in the metadata and the expansion of every rank's received rows
/// too ([`check_expansion`]).
fn check_assignment(
    native: &NativeHost,
    name: &str,
    plan: &Plan,
    by_rank: bool,
    (ids, weights): (&[Vec<i32>], &[Vec<f32>]),
) {
    let mut geo = Geometry::new(plan).unwrap();
    geo.by_rank = by_rank;
    let p = Program::lower(plan).unwrap();
    let (g, e, t, k) = (geo.group, geo.experts, geo.tokens, geo.top_k);
    let lmax = p.route.max_local;
    let probs = matches!(
        geo.capacity,
        Some((_, moec_runtime::plan::DropPolicy::Probs))
    );
    let cap = geo.capacity.map_or(-1, |(c, _)| c as i64);
    // A chunk's counts: per expert, then (by rank) per destination rank.
    let stride = (e + if by_rank { g } else { 0 }) as i64;
    let mut dest_rank = Vec::new();
    let mut dest_local = Vec::new();
    for s in 0..g {
        for x in 0..e {
            let (q, l) = geo.dest(s, x);
            dest_rank.push(q as i32);
            dest_local.push(l as i32);
        }
    }
    let run =
        |k, bufs: &mut [&mut Vec<u8>], scalars: &[i64], rows| native.run(k, bufs, scalars, rows);
    let metas: Vec<i32> = (0..g)
        .flat_map(|q| {
            assign_count(
                &geo,
                q,
                &Routing {
                    ids: &ids[q],
                    weights: &weights[q],
                },
            )
            .unwrap()
        })
        .collect();
    // The device's metadata, rank by rank.
    let mut dev_meta: Vec<u8> = Vec::new();
    for q in 0..g {
        let mut meta = vec![0u8; geo.meta_len() * 4];
        let mut idb = le(&ids[q]);
        let mut wb: Vec<u8> = weights[q].iter().flat_map(|w| w.to_le_bytes()).collect();
        let st = run(
            NativeKernel::AssignCount,
            &mut [&mut idb, &mut wb, &mut meta],
            &[
                t as i64,
                k as i64,
                e as i64,
                geo.chunk_tokens as i64,
                i64::from(probs),
                stride,
            ],
            t as u64,
        );
        assert_eq!(st, [0; 4], "{name}: assign_count");
        if by_rank && !probs {
            let st = run(
                NativeKernel::AssignRankCount,
                &mut [&mut idb, &mut le(&dest_rank), &mut meta],
                &[
                    q as i64,
                    k as i64,
                    e as i64,
                    geo.chunk_tokens as i64,
                    stride,
                ],
                t as u64,
            );
            assert_eq!(st, [0; 4], "{name}: assign_rank_count");
        }
        dev_meta.extend(meta);
    }
    assert_eq!(ints(&dev_meta), metas, "{name} : metadata");
    let mut placements = Vec::with_capacity(g);
    for me in 0..g {
        let want = assign_place(
            &geo,
            me,
            &Routing {
                ids: &ids[me],
                weights: &weights[me],
            },
            &metas,
        )
        .unwrap();
        let mut table = vec![0u8; geo.chunks * g * g * lmax * 4];
        let mut keep_own = vec![0u8; geo.chunks * e * 4];
        let mut kept_own = vec![0u8; t * k];
        let mut meta_all = dev_meta.clone();
        let mut dr = le(&dest_rank);
        let mut dl = le(&dest_local);
        let st = if probs {
            native.keep_probs(
                &geo,
                me,
                lmax,
                &mut [&mut meta_all, &mut dr, &mut dl, &mut table, &mut kept_own],
            )
        } else {
            run(
                NativeKernel::AssignKeepCounts,
                &mut [&mut meta_all, &mut dr, &mut dl, &mut table, &mut keep_own],
                &[
                    g as i64,
                    me as i64,
                    e as i64,
                    geo.chunks as i64,
                    lmax as i64,
                    cap,
                    stride,
                ],
                e as u64,
            )
        };
        assert_eq!(st, [0; 4], "{name}: keep");
        let mut idb = le(&ids[me]);
        let mut slots = le(&vec![-1; t * k]);
        let mut stats = vec![0u8; (e + 1) * 4];
        let st = run(
            NativeKernel::AssignSlots,
            &mut [
                &mut idb,
                &mut table,
                &mut keep_own,
                &mut kept_own,
                &mut dr,
                &mut dl,
                &mut slots,
                &mut stats,
            ],
            &[
                g as i64,
                me as i64,
                t as i64,
                k as i64,
                e as i64,
                geo.chunk_tokens as i64,
                geo.chunks as i64,
                lmax as i64,
                i64::from(probs),
            ],
            (geo.chunks * g * lmax) as u64,
        );
        assert_eq!(st, [0; 4], "{name}: slots");
        assert_eq!(ints(&slots), want.slots, "{name} (rank {me}): slots");
        let stats = ints(&stats);
        let routed: Vec<u64> = stats[..e].iter().map(|&v| v as u64).collect();
        assert_eq!(routed, want.routed_per_expert, "{name}: routed");
        assert_eq!(stats[e] as u64, want.dropped, "{name}: dropped");
        let tab = ints(&table);
        for (c, ct) in want.tables.iter().enumerate() {
            for s in 0..g {
                for q in 0..g {
                    for l in 0..lmax {
                        let got = tab[((c * g + s) * g + q) * lmax + l];
                        assert_eq!(
                            got as usize,
                            ct.rows(s, q, l),
                            "{name}: table[{c}][{s}][{q}][{l}]"
                        );
                    }
                }
            }
        }
        let mut flag = vec![0u8; 1];
        let st = run(
            NativeKernel::AssignOverflow,
            &mut [&mut table, &mut flag],
            &[
                g as i64,
                me as i64,
                geo.chunks as i64,
                lmax as i64,
                plan.choices.expert_rows as i64,
            ],
            1,
        );
        assert_eq!(st, [0; 4]);
        let over = want
            .tables
            .iter()
            .any(|ct| ct.received(me) as u64 > plan.choices.expert_rows);
        assert_eq!(flag[0], u8::from(over));
        placements.push(want);
    }
    if by_rank {
        check_expansion(native, name, &geo, lmax, &placements);
    }
}

/// `assign_expand` against `layout.rs`'s `expand_index` on every rank and
/// chunk of a group whose placements (`layout.rs`, one per rank) are
/// given: the pick rows each rank receives (every source's by-rank
/// metadata for it, by source) expand to the same expert-side rows and
/// weights; a pick beyond the table and a pick missing from it are refused
/// by both.
fn check_expansion(
    native: &NativeHost,
    name: &str,
    geo: &Geometry,
    lmax: usize,
    placements: &[Placement],
) {
    let (g, k) = (geo.group, geo.top_k);
    let cols = geo.rank_meta_cols();
    let mut corrupted = false;
    for me in 0..g {
        let frames: Vec<i32> = placements[me]
            .tables
            .iter()
            .flat_map(|t| t.expand_frame(me).unwrap())
            .collect();
        for (c, table) in placements[me].tables.iter().enumerate() {
            let mut picks = Vec::new();
            for (s, placement) in placements.iter().enumerate() {
                let rows = table.rank_send_rows(s, me);
                let meta = &placement.by_rank.as_ref().unwrap().meta[c];
                picks.extend_from_slice(&meta[rows.start * cols..rows.end * cols]);
            }
            let expand = |picks: &[i32]| {
                let received = picks.len() / cols;
                let mut index = le(&vec![0x5555; received * k]);
                let mut weights = le(&vec![0x5555; received * k]);
                let st = native.run(
                    NativeKernel::AssignExpand,
                    &mut [&mut le(picks), &mut le(&frames), &mut index, &mut weights],
                    &[g as i64, lmax as i64, k as i64, c as i64],
                    (g * lmax) as u64,
                );
                (st, ints(&index), ints(&weights))
            };
            let (st, index, weights) = expand(&picks);
            let (want_index, want_weights) = expand_index(geo, table, me, &picks).unwrap();
            assert_eq!(st, [0; 4], "{name}: assign_expand (rank {me}, chunk {c})");
            assert_eq!(
                index, want_index,
                "{name}: expansion index (rank {me}, chunk {c})"
            );
            let want_bits: Vec<i32> = want_weights.iter().map(|w| w.to_bits() as i32).collect();
            assert_eq!(
                weights, want_bits,
                "{name}: expansion weights (rank {me}, chunk {c})"
            );
            // Corrupt metadata: the first pick landing here beyond the
            // table, or missing.
            let Some(at) = (0..picks.len() / cols)
                .flat_map(|row| (0..k).map(move |j| row * cols + j))
                .find(|&i| picks[i] >= 0)
            else {
                continue;
            };
            for bad in [lmax as i32, -1] {
                let mut broken = picks.clone();
                broken[at] = bad;
                assert!(expand_index(geo, table, me, &broken).is_err());
                let (st, _, _) = expand(&broken);
                assert_eq!(
                    st[0],
                    moec_kernels::native::STATUS_BAD_METADATA,
                    "{name}: corrupt pick {bad} (rank {me}, chunk {c})"
                );
            }
            corrupted = true;
        }
    }
    assert!(corrupted, "{name}: no rank received a pick");
}

/// The native assignment kernels, compiled for the host, against the CPU
/// backend's `layout.rs` on random and skewed routing: the same slots, the
/// same routing tables, the same routed and dropped counts, for dropless,
/// both drop policies, chunked plans and replicated experts.
#[test]
fn native_assignment_kernels_match_layout_rs() {
    if !have_cxx("native_assignment_kernels_match_layout_rs") {
        return;
    }
    let native = NativeHost::new();
    let run =
        |k, bufs: &mut [&mut Vec<u8>], scalars: &[i64], rows| native.run(k, bufs, scalars, rows);
    for (name, plan) in small_layers() {
        let geo = Geometry::new(&plan).unwrap();
        for trial in 0..4u64 {
            // Trials 2 and 3 are skewed towards a few experts (drops).
            let (ids, weights) = random_routing(
                trial,
                geo.group,
                geo.tokens,
                geo.top_k,
                geo.experts,
                trial >= 2,
            );
            for by_rank in [false, true] {
                check_assignment(
                    &native,
                    &format!("{name} (trial {trial}, by rank: {by_rank})"),
                    &plan,
                    by_rank,
                    (&ids, &weights),
                );
            }
        }
        eprintln!("{name}: the native assignment kernels match layout.rs");
    }
    // Bad input is a status code, not a crash.
    let mut ids = le(&[0, 99]);
    let mut w: Vec<u8> = [0.5f32, 0.5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut meta = vec![0u8; 16];
    let st = run(
        NativeKernel::AssignCount,
        &mut [&mut ids, &mut w, &mut meta],
        &[1, 2, 4, 1, 0, 4],
        1,
    );
    assert_eq!(st[0], moec_kernels::native::STATUS_BAD_EXPERT);
    assert_eq!(st[1], 99);
    let mut ids = le(&[0, 1]);
    let mut w: Vec<u8> = [0.5f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let st = run(
        NativeKernel::AssignCount,
        &mut [&mut ids, &mut w, &mut meta],
        &[1, 2, 4, 1, 0, 4],
        1,
    );
    assert_eq!(st[0], moec_kernels::native::STATUS_BAD_WEIGHT);
}

/// `drop = probs` on many tokens with many ties, where ranking every
/// assignment against every other was quadratic: 4 ranks x 4096 tokens x
/// top-4 (65,536 assignments of the group, weights from five values), with
/// uniform routing (buckets of about 8,000 sorted by 14 merge widths) and
/// routing skewed onto three experts (one bucket of over 20,000 rows, most of
/// them dropped), kept exactly as `layout.rs` keeps them.
#[test]
fn probs_ranking_of_many_tied_tokens_matches_layout_rs() {
    if !have_cxx("probs_ranking_of_many_tied_tokens_matches_layout_rs") {
        return;
    }
    let plan = plan_of(
        &small_layer(
            "scoring = softmax\n top_k = 4",
            "ffn = relu\n intermediate = 24",
            "capacity {\n factor = 1.0\n drop = probs\n }",
            "",
        )
        .replace("tokens_per_rank = 48", "tokens_per_rank = 4096"),
        &Overrides::default(),
    );
    let geo = Geometry::new(&plan).unwrap();
    assert_eq!((geo.group, geo.tokens, geo.top_k), (4, 4096, 4));
    assert!(matches!(
        geo.capacity,
        Some((_, moec_runtime::plan::DropPolicy::Probs))
    ));
    let native = NativeHost::new();
    for skewed in [false, true] {
        let (ids, weights) =
            random_routing(7, geo.group, geo.tokens, geo.top_k, geo.experts, skewed);
        let name = format!("probs, 4096 tokens, skewed = {skewed}");
        check_assignment(&native, &name, &plan, false, (&ids, &weights));
    }
}

/// The GPU benchmark's layers (`runtime/gpu/layers/`, run by
/// `runtime/gpu/bench.sh`) lower for the device, and every rank's memory
/// together fits on the GPU the benchmark is meant for, so a benchmark call
/// cannot fail on allocation: the Mixtral and Qwen3 layers on an H100 (80
/// GB), the DeepSeek-V3 layer's eight virtual ranks, whose dropless buffers
/// are sized for the worst case, on an H200 (141 GB). The Qwen3 layer is a
/// capacity plan, so it can run as a CUDA graph.
#[test]
fn the_gpu_benchmark_layers_fit_on_one_gpu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/gpu/layers");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "moe"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in files {
        let gpu_bytes: u64 = if f.ends_with("deepseek_v3.moe") {
            141_000_000_000
        } else {
            80_000_000_000
        };
        let source = std::fs::read_to_string(&f).unwrap();
        let plan = plan_of(&source, &Overrides::default());
        let p = Program::lower(&plan).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if f.ends_with("qwen3_capacity.moe") {
            // As `moec bench --graph` compiles it.
            let routed = plan_with(
                &source,
                &Overrides::default(),
                &Options::cuda_device_routed(),
            );
            let routed = Program::lower(&routed).unwrap();
            let local: Vec<usize> = (0..routed.ranks).collect();
            assert!(moec_runtime::cuda::issue::capturable(&routed, &local));
        }
        let per_rank = p.arena_bytes + p.weights.bytes + p.work.bytes;
        // Besides the allocations: a cuBLAS workspace per stream and rank,
        // the context and the local-memory reserve.
        let memory = p.device_memory(p.ranks);
        assert_eq!(memory.allocations, per_rank * p.ranks as u64);
        assert_eq!(
            memory.cublas,
            CUBLAS_WORKSPACE_BYTES * (p.streams * p.ranks) as u64
        );
        assert!(memory.context > 0 && memory.local_reserve > 0);
        let total = memory.total();
        eprintln!(
            "{}: {} rank(s) x ({} arena + {} weights + {} workspace) + {} cuBLAS + {} context and local memory = {:.1} GB",
            f.display(),
            p.ranks,
            p.arena_bytes,
            p.weights.bytes,
            p.work.bytes,
            memory.cublas,
            memory.context + memory.local_reserve,
            total as f64 / 1e9
        );
        assert!(
            total < gpu_bytes / 10 * 9,
            "{}: {total} bytes do not fit {gpu_bytes} with room to spare",
            f.display()
        );
    }
}

/// The GPU benchmark's layers, shrunk (hidden 64, ffn 32, 128 tokens per
/// rank, bf16), run on the emulated device with the CPU backend's outputs
/// (within bf16's bound), so a benchmark call on a GPU cannot fail for a
/// reason this machine can see; the capacity layer also as a graph.
#[test]
fn the_gpu_benchmark_layers_run_shrunk_on_the_emulated_device() {
    if !have_cxx("the_gpu_benchmark_layers_run_shrunk_on_the_emulated_device") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/gpu/layers");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "moe"))
        .collect();
    files.sort();
    for f in files {
        let name = f.file_stem().unwrap().to_string_lossy().into_owned();
        let plan = plan_of(
            &std::fs::read_to_string(&f).unwrap(),
            &shrunk(moec_lang::spec::DType::Bf16),
        );
        compare(&name, &plan, &[], 1e-2);
        let program = Program::lower(&plan).unwrap();
        let ranks = plan.mesh.world_size() as usize;
        let local: Vec<usize> = (0..ranks).collect();
        if moec_runtime::cuda::issue::capturable(&program, &local) {
            let kernels = HostKernels::new(&program);
            let eager = emu_run(&plan, &program, &kernels, 3, None);
            let modes = [PassMode::Capture, PassMode::Replay];
            let (_, passes) = emu_graph_passes(&plan, &program, &kernels, None, modes.len());
            for (mode, pass) in modes.iter().zip(passes) {
                assert!(pass.outputs == eager.outputs, "{name} {mode:?}");
            }
            eprintln!("{name}: captured and replayed");
        }
    }
}

/// `source` compiled with only candidates of routing form `form`.
fn plan_in_form(source: &str, overrides: &Overrides, form: RoutingForm) -> Plan {
    let checked = moec_lang::check_source(source);
    let (program, _) = checked
        .program
        .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
    let mut program = program.clone();
    apply(&mut program, overrides).unwrap();
    let options = Options {
        routing: Some(form),
        ..Options::default()
    };
    compile(&program, &options)
        .unwrap_or_else(|e| panic!("{form:?}: {e}"))
        .plan
}

/// Small layers for the flat by-rank forms: the router's weight on the
/// output and on the input, dropless and both capacity drop policies,
/// chunked plans, shared experts, fp8 dispatch, replicas.
fn by_rank_layers() -> [(&'static str, String); 6] {
    let swiglu = "ffn = swiglu\n intermediate = 24";
    [
        (
            "weight on the output, shared experts, chunked",
            small_layer(
                "scoring = softmax\n top_k = 4\n normalize = true",
                swiglu,
                "shared_experts {\n intermediate = 24\n }",
                "schedule {\n overlap = 2\n }",
            ),
        ),
        (
            "weight on the input, shared experts",
            small_layer(
                "scoring = sigmoid\n top_k = 2\n weight_on = input",
                swiglu,
                "shared_experts {\n intermediate = 24\n }",
                "",
            ),
        ),
        (
            "capacity drop = position, chunked",
            small_layer(
                "scoring = softmax\n top_k = 2",
                "ffn = relu\n intermediate = 24",
                "capacity {\n factor = 0.75\n drop = position\n }",
                "schedule {\n overlap = 3\n }",
            ),
        ),
        (
            "capacity drop = probs, fp8 dispatch",
            small_layer(
                "scoring = softmax\n top_k = 2",
                swiglu,
                "dispatch_dtype = fp8_e4m3\n capacity {\n factor = 0.5\n drop = probs\n }",
                "",
            ),
        ),
        (
            "expert biases, clamped swiglu, bf16",
            small_layer(
                "scoring = softmax\n top_k = 4",
                "ffn = swiglu\n intermediate = 24\n bias = true\n swiglu_limit = 7.0",
                "",
                "",
            )
            .replace("dtype = f32", "dtype = bf16"),
        ),
        (
            "replicas",
            "layer t {\n hidden = 32\n dtype = f32\n tokens_per_rank = 40\n experts {\n count = 8\n ffn = relu\n intermediate = 16\n }\n router {\n scoring = softmax\n top_k = 2\n }\n}\n\nmesh {\n gpus_per_node = 4\n device = H100\n ep = 4\n replicas {\n 0 = [2, 3]\n 5 = [0]\n }\n}\n".to_string(),
        ),
    ]
}

/// The flat by-rank forms (dispatch by rank, with and without the reducing
/// combine) on the emulated device, against the CPU backend bit for bit,
/// in order and under shuffled device queues: the router's weight on the
/// output and on the input, dropless and both capacity drop policies,
/// chunked plans, shared experts, fp8 dispatch, replicas.
#[test]
fn dispatch_by_rank_on_the_emulated_device_matches_the_cpu() {
    if !have_cxx("dispatch_by_rank_on_the_emulated_device_matches_the_cpu") {
        return;
    }
    let none = Overrides::default();
    let layers = by_rank_layers();
    for (name, source) in &layers {
        for form in [RoutingForm::DedupDispatch, RoutingForm::DedupReduce] {
            let plan = plan_in_form(source, &none, form);
            assert!(plan.choices.dedup_dispatch, "{name}: {form:?}");
            assert_eq!(
                plan.choices.reduce_combine,
                form == RoutingForm::DedupReduce,
                "{name}: {form:?}"
            );
            // The expansion is fused into the up projection where the
            // layer weighs the outputs, the reduction into the down
            // projection's epilogue whenever the form reduces.
            let fused = |w: GemmWeight| {
                plan.ops().any(|(_, op)| {
                    matches!(op.kind, OpKind::Gemm { weight, by_rank: Some(_), .. } if weight == w)
                })
            };
            let on_output = plan.layer.router.weight_on == WeightOn::Output;
            assert_eq!(fused(GemmWeight::ExpertUp), on_output, "{name}: {form:?}");
            assert_eq!(
                fused(GemmWeight::ExpertDown),
                form == RoutingForm::DedupReduce,
                "{name}: {form:?}"
            );
            // The received rows are laid out on the device (pass 3).
            let program = Program::lower(&plan).unwrap();
            assert!(
                program.steps.iter().any(|s| matches!(
                    &s.kind,
                    StepKind::Launch(l) if l.kernel == KernelRef::Native(NativeKernel::AssignExpand)
                )),
                "{name}: {form:?}"
            );
            compare(&format!("{name}, {form:?}"), &plan, &[1, 2], 0.0);
        }
    }
    // The host lays the by-rank send rows out from the routing it reads
    // back during the pass: a graph is refused.
    let plan = plan_in_form(&layers[0].1, &none, RoutingForm::DedupReduce);
    let program = Program::lower(&plan).unwrap();
    let kernels = HostKernels::new(&program);
    let inputs = random_inputs(&plan.layer, 4, plan.layer.tokens_per_rank as usize, 3);
    let mut emu = Emu::new(&program, &kernels, None);
    let local: Vec<usize> = (0..4).collect();
    let e = run_pass(&program, &mut emu, &local, &inputs, PassMode::Capture).unwrap_err();
    assert!(e.to_string().contains("dispatches by rank"), "{e}");
}

/// The flat by-rank forms with one emulated process per rank: each process
/// reads back only its own routing and the gathered metadata, lays out its
/// own send side with `layout.rs`, exchanges rows and picks by NCCL sends
/// and receives, and expands what it received on the device; the outputs
/// are the CPU backend's bit for bit, on every layer of
/// [`by_rank_layers`], with and without the reducing combine.
#[test]
fn dispatch_by_rank_over_nccl_matches_the_cpu() {
    if !have_cxx("dispatch_by_rank_over_nccl_matches_the_cpu") {
        return;
    }
    let none = Overrides::default();
    for (name, source) in &by_rank_layers() {
        for form in [RoutingForm::DedupDispatch, RoutingForm::DedupReduce] {
            let plan = plan_in_form(source, &none, form);
            assert!(plan.choices.dedup_dispatch, "{name}: {form:?}");
            nccl_matches_the_cpu(&format!("{name}, {form:?}, NCCL"), &plan);
        }
    }
}

/// The hierarchical all-to-all with one emulated process per rank: every
/// leg over NCCL, the forwarders learning what they stage from a count
/// exchange and the routing sent beside the rows (each process reads back
/// only its own routing). DeepSeek-V3 on two nodes of eight ranks (per
/// pick, by rank and with the reducing combine; also with a capacity) and
/// a capacity layer on two nodes of four (by rank, with and without the
/// reducing combine): the CPU backend's outputs bit for bit, in order and
/// shuffled.
#[test]
fn the_hierarchical_all_to_all_over_nccl_matches_the_cpu() {
    if !have_cxx("the_hierarchical_all_to_all_over_nccl_matches_the_cpu") {
        return;
    }
    // The small capacity layer's per-pick plan stays flat on its mesh.
    for (name, form, plan) in hierarchical_plans(|name| !name.starts_with("capacity")) {
        // Each leg is one message per peer and direction (the rows packed),
        // whatever the routing; a flat collective's runs are one per local
        // expert, and the fp8 scales apart.
        let most = nccl_matches_the_cpu(&format!("{name}, {form:?}, NCCL"), &plan);
        let max_local = (plan.layer.experts / plan.mesh.ep).max(1) as usize;
        assert!(
            most <= 2 * max_local,
            "{name}, {form:?}: {most} operations with one peer"
        );
        if name == "deepseek_v3 bf16" {
            // A workspace smaller than the legs' worst case: every message
            // goes in rounds of 1000 bytes, cutting rows and their fp8
            // scales (`StreamWork::piece`), still bit for bit.
            nccl_matches_the_cpu_with(
                &format!("{name}, {form:?}, NCCL in rounds"),
                &plan,
                |program| {
                    for stream in &mut program.work.streams {
                        stream.piece = 1000;
                    }
                },
            );
        }
    }
}

/// Every layer of [`hierarchical_layers`] in every hierarchical routing
/// form: by rank, with and without the reducing combine, and per pick where
/// `per_pick(name)`; each plan checked to use the hierarchical all-to-all.
fn hierarchical_plans(per_pick: impl Fn(&str) -> bool) -> Vec<(&'static str, RoutingForm, Plan)> {
    let mut plans = Vec::new();
    for (name, source, overrides) in &hierarchical_layers() {
        let forms = [
            RoutingForm::PerAssignment,
            RoutingForm::NodeDedupDispatch,
            RoutingForm::NodeDedupReduce,
        ];
        for form in forms.into_iter().filter(|f| per_pick(name) || f.by_rank()) {
            let plan = plan_in_form(source, overrides, form);
            assert_eq!(
                plan.choices.dispatch,
                moec_runtime::plan::A2aAlgorithm::Hierarchical,
                "{name}: {form:?}"
            );
            plans.push((*name, form, plan));
        }
    }
    plans
}

/// A CUDA graph cannot wait for the host, which lays the hierarchical legs
/// out: `--graph` (`Options::cuda_device_routed`) compiles a mesh whose
/// per-pick plan is hierarchical with the flat all-to-all, and that plan
/// can be captured; the hierarchical one cannot.
#[test]
fn graph_runs_compile_the_flat_all_to_all() {
    let (name, source, overrides) = &hierarchical_layers()[3];
    assert!(name.contains("capacity"), "{name}");
    let hierarchical = plan_in_form(source, overrides, RoutingForm::PerAssignment);
    assert_eq!(
        hierarchical.choices.dispatch,
        moec_runtime::plan::A2aAlgorithm::Hierarchical
    );
    let graph = plan_with(source, overrides, &Options::cuda_device_routed());
    assert_eq!(
        graph.choices.dispatch,
        moec_runtime::plan::A2aAlgorithm::Flat
    );
    for (plan, can) in [(&hierarchical, false), (&graph, true)] {
        let p = Program::lower(plan).unwrap();
        let local: Vec<usize> = (0..p.ranks).collect();
        assert_eq!(moec_runtime::cuda::issue::capturable(&p, &local), can);
    }
}

/// Layers on two nodes over a slow network (the hierarchical all-to-all):
/// DeepSeek-V3 shrunk to two nodes of eight ranks, in f32 and bf16 (fp8
/// dispatch) and with a capacity (`drop = position`), and a small capacity
/// layer on two nodes of four. (Llama-4 Maverick, top-1, has nothing to
/// deduplicate across the network and keeps the flat all-to-all even on a
/// slow one.)
fn hierarchical_layers() -> [(&'static str, String, Overrides); 4] {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/deepseek_v3.moe");
    let deepseek = std::fs::read_to_string(path)
        .unwrap()
        .replace("bandwidth = 400 Gb/s", "bandwidth = 10 Gb/s");
    let capacity = "layer t {\n hidden = 32\n dtype = f32\n tokens_per_rank = 40\n experts {\n count = 16\n ffn = relu\n intermediate = 16\n }\n router {\n scoring = softmax\n top_k = 4\n }\n capacity {\n factor = 0.75\n drop = position\n }\n}\n\nmesh {\n nodes = 2\n gpus_per_node = 4\n device = H100\n inter_node {\n bandwidth = 10 Gb/s\n latency = 10 us\n }\n ep = 8\n}\n";
    let shrunk_to = |dtype| Overrides {
        ranks: Some(16),
        tokens: Some(128),
        dtype: Some(dtype),
        hidden: Some(64),
        ffn: Some(32),
    };
    [
        (
            "deepseek_v3 f32",
            deepseek.clone(),
            shrunk_to(moec_lang::spec::DType::F32),
        ),
        (
            "deepseek_v3 bf16",
            deepseek.clone(),
            shrunk_to(moec_lang::spec::DType::Bf16),
        ),
        (
            "capacity on two nodes",
            capacity.to_string(),
            Overrides::default(),
        ),
        (
            "deepseek_v3 with capacity",
            deepseek.replace(
                "capacity = dropless",
                "capacity {\n factor = 1.0\n drop = position\n }",
            ),
            shrunk_to(moec_lang::spec::DType::F32),
        ),
    ]
}

/// The hierarchical by-rank legs (one row per token and destination node
/// over the network, fanned out inside the node; with the reducing combine,
/// each node's forwarder sums its ranks' partial rows before one row per
/// token and node returns) on the emulated device: DeepSeek-V3 on two nodes
/// of eight virtual ranks (also with a capacity, then per pick too: its
/// padded expert slots), and a small capacity layer on two nodes of four,
/// against the CPU backend bit for bit, in order and shuffled.
#[test]
fn the_hierarchical_by_rank_legs_on_the_emulated_device_match_the_cpu() {
    if !have_cxx("the_hierarchical_by_rank_legs_on_the_emulated_device_match_the_cpu") {
        return;
    }
    // Per pick, the capacity plans keep their expert slots padded (the
    // other per-pick plans run in
    // `the_hierarchical_all_to_all_on_the_emulated_device_matches_the_cpu`).
    let per_pick = |name: &str| name == "deepseek_v3 with capacity";
    for (name, form, plan) in hierarchical_plans(per_pick) {
        let reduce = form == RoutingForm::NodeDedupReduce;
        assert_eq!(plan.choices.reduce_combine, reduce, "{name}: {form:?}");
        // The reducing combine sums on the forwarder, on the device.
        let program = Program::lower(&plan).unwrap();
        let sums = program
            .steps
            .iter()
            .filter(|s| matches!(&s.kind, StepKind::Collective(c) if c.forwarder_sum.is_some()))
            .count();
        assert_eq!(sums > 0, reduce, "{name}: {form:?}");
        compare(&format!("{name}, {form:?}"), &plan, &[1, 2], 0.0);
    }
}
