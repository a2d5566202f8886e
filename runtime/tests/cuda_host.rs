//! The generated CUDA C, compiled for the host with the system C++ compiler,
//! against the reference interpreter: the same bytes out for the same bytes
//! in, and the same failure for the same bad launch.
//!
//! A few lines of shim (`SHIM`) stand in for what CUDA provides
//! (`__global__`, `blockIdx`, `__uint_as_float`, `atomicCAS`, ...) and a
//! generated wrapper per kernel runs every thread of a launch in turn, so the
//! very source NVRTC compiles for the GPU runs here: the lowering, the
//! conversions and the transcribed `libm` functions are checked bit for bit
//! without a GPU. The C++ is compiled with `-ffp-contract=off`, the host
//! counterpart of NVRTC's `--fmad=false`.
//!
//! Without a C++ compiler (`$CXX`, `c++`, `g++` or `clang++`) the tests print
//! a notice and pass.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use moec_kernels::build::{
    abs, and, eq, erf, exp, floor, gt, log, lt, max, min, ne, not, or, select, sqrt, tanh, to_f32,
    to_i64, Builder,
};
use moec_kernels::cuda::{CudaKernel, Module, STATUS_WORDS};
use moec_kernels::interp;
use moec_kernels::ir::{Access, Arg, Elem, Kernel, LaunchError, ParamKind, Ty};
use moec_kernels::library::{describe, Kind};
use moec_kernels::scalar;

const SHIM: &str = r#"
#include <math.h>
#include <string.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct moec_dim3 { unsigned int x, y, z; };
static moec_dim3 blockIdx, threadIdx, blockDim, gridDim;
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long c,
                                           unsigned long long v) {
    unsigned long long o = *p;
    if (o == c) *p = v;
    return o;
}
static inline float moec_host_f32(unsigned long long slot) {
    return __uint_as_float((unsigned int)slot);
}
"#;

fn compiler() -> Option<String> {
    let mut candidates: Vec<String> = Vec::new();
    if let Ok(cxx) = std::env::var("CXX") {
        candidates.push(cxx);
    }
    candidates.extend(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The wrapper that runs every thread of a launch of kernel `i`:
/// `moec_host_<i>(slots, rows, status, scratch, grid, block)`.
fn wrapper(i: usize, k: &CudaKernel) -> String {
    let mut args = Vec::new();
    let mut slot = 0;
    for p in k.params() {
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
    if k.scratch_bytes_per_thread() > 0 {
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
         \x20       {}({});\n\
         \x20   }}\n}}\n",
        k.name(),
        args.join(", ")
    )
}

type HostFn = unsafe extern "C" fn(*const u64, i64, *mut i64, *mut u8, u32, u32);

/// A module compiled for the host and loaded.
struct Host {
    lib: libloading::Library,
    kernels: Vec<CudaKernel>,
}

/// Compiles `module` for the host, or `None` (with a notice) without a compiler.
fn compile(module: &Module, test: &str) -> Option<Host> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let Some(cxx) = compiler() else {
        eprintln!("{test}: skipped, no C++ compiler found (set CXX)");
        return None;
    };
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "moec-cuda-host-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut src = String::from(SHIM);
    src.push_str(&module.source());
    for (i, k) in module.kernels().iter().enumerate() {
        src.push_str(&wrapper(i, k));
    }
    let cpp = dir.join("module.cpp");
    let so = dir.join("libmodule.so");
    std::fs::write(&cpp, &src).unwrap();
    let out = Command::new(&cxx)
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
    // SAFETY: the library was just built from the generated source and the
    // shim; its initialisers only zero the shim's globals.
    let lib = unsafe { libloading::Library::new(&so) }.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(Host {
        lib,
        kernels: module.kernels().to_vec(),
    })
}

impl Host {
    /// Runs kernel `i` over `rows` rows on `bufs` (one entry per parameter;
    /// scalars take `scalars` in order) with a `grid` × `block` launch.
    /// Returns the status words.
    fn run(
        &self,
        i: usize,
        bufs: &mut [Vec<u8>],
        scalars: &[Arg<'_>],
        rows: u64,
        grid: u32,
        block: u32,
    ) -> [i64; STATUS_WORDS] {
        let k = &self.kernels[i];
        let mut slots: Vec<u64> = Vec::new();
        let mut scalars = scalars.iter();
        for (p, b) in k.params().iter().zip(bufs.iter_mut()) {
            match p.kind {
                ParamKind::Buffer { elem, .. } => {
                    slots.push(b.as_mut_ptr() as u64);
                    slots.push((b.len() / elem.bytes()) as u64);
                }
                ParamKind::Scalar(_) => match scalars.next() {
                    Some(Arg::F32(v)) => slots.push(u64::from(v.to_bits())),
                    Some(Arg::I64(v)) => slots.push(*v as u64),
                    _ => panic!("kernel {} needs more scalars", k.name()),
                },
            }
        }
        let threads = u64::from(grid) * u64::from(block);
        let mut scratch = vec![0u8; (threads * k.scratch_bytes_per_thread()) as usize];
        let mut status = [0i64; STATUS_WORDS];
        let symbol = format!("moec_host_{i}");
        // SAFETY: the wrapper was generated for exactly this parameter list;
        // every buffer pointer is a live Vec of the length passed beside it,
        // the scratch block has the size the launch contract asks for, and
        // the kernel bounds-checks every access.
        unsafe {
            let f: libloading::Symbol<'_, HostFn> = self.lib.get(symbol.as_bytes()).unwrap();
            f(
                slots.as_ptr(),
                rows as i64,
                status.as_mut_ptr(),
                scratch.as_mut_ptr(),
                grid,
                block,
            );
        }
        status
    }
}

/// Interpreter arguments over owned bytes (buffers) and `scalars` (in order).
fn interp_args<'a>(k: &Kernel, bufs: &'a mut [Vec<u8>], scalars: &[Arg<'_>]) -> Vec<Arg<'a>> {
    let mut scalars = scalars.iter();
    bufs.iter_mut()
        .zip(&k.params)
        .map(|(bytes, p)| match p.kind {
            ParamKind::Buffer {
                access: Access::Read,
                ..
            } => Arg::Read(bytes),
            ParamKind::Buffer { .. } => Arg::Write(bytes),
            ParamKind::Scalar(_) => match scalars.next() {
                Some(Arg::F32(v)) => Arg::F32(*v),
                Some(Arg::I64(v)) => Arg::I64(*v),
                _ => panic!("kernel {} needs more scalars", k.name),
            },
        })
        .collect()
}

/// The status words a launch error corresponds to (code, which, index).
fn expected_status(k: &Kernel, e: &LaunchError) -> (i64, i64, i64) {
    match e {
        LaunchError::OutOfBounds { param, index, .. } => {
            if let Some(p) = k.params.iter().position(|p| &p.name == param) {
                (1, p as i64, *index)
            } else {
                let a = k.arrays.iter().position(|a| &a.name == param).unwrap();
                (2, a as i64, *index)
            }
        }
        LaunchError::DivideByZero => (3, 0, 0),
        LaunchError::BadArguments(why) => panic!("bad arguments: {why}"),
    }
}

/// Deterministic pseudo-random bytes that decode to modest values; index
/// buffers get small indices and some `-1`s (dropped slots).
fn fill(k: &Kernel, rows: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    k.params
        .iter()
        .map(|p| match p.kind {
            ParamKind::Buffer { elem, .. } => {
                let n = rows * 4608; // a row of the 4096-expert router fits
                if elem.value_ty() == Ty::I64 {
                    let v: Vec<i64> = (0..n).map(|i| ((i * 7) % 13) as i64 - 1).collect();
                    interp::encode_i64(elem, &v)
                } else {
                    let v: Vec<f32> = (0..n).map(|_| next() * 3.0).collect();
                    interp::encode_f32(elem, &v)
                }
            }
            ParamKind::Scalar(_) => Vec::new(),
        })
        .collect()
}

fn consts(c: &[(&str, i64)]) -> Vec<(String, i64)> {
    c.iter().map(|(n, v)| ((*n).to_string(), *v)).collect()
}

/// Library kernels over a spread of constants: every kind in every
/// activation dtype, every router configuration, every activation.
fn library_kernels() -> Vec<Kernel> {
    let mut out = Vec::new();
    let router = [
        // experts, groups, kept, scoring, softmax_over, bias, group_score, normalize
        (12, 4, 2, 1, 0, 1, 0, 1),
        (12, 1, 1, 0, 0, 0, 0, 0),
        (12, 1, 1, 0, 1, 0, 0, 0),
        (12, 3, 1, 0, 0, 1, 1, 1),
        (7, 1, 1, 1, 0, 0, 0, 1),
    ];
    for kind in Kind::ALL {
        for dtype in [0, 1, 2] {
            let mut c = vec![
                ("dtype", dtype),
                ("hidden", 40),
                ("top_k", 3),
                ("block", 16),
            ];
            let is_router = kind.name().starts_with("router_");
            if is_router && dtype != 0 {
                continue;
            }
            if is_router {
                for (e, g, kept, scoring, over, bias, gs, norm) in router {
                    let mut c = c.clone();
                    c.extend([
                        ("experts", e),
                        ("groups", g),
                        ("groups_kept", kept),
                        ("scoring", scoring),
                        ("softmax_over", over),
                        ("selection_bias", bias),
                        ("group_score", gs),
                        ("normalize", norm),
                    ]);
                    out.push(describe(kind, &consts(&c)).unwrap());
                }
                continue;
            }
            match kind {
                Kind::Activation => {
                    for (act, clamped) in [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0)] {
                        for in_dtype in [0, dtype] {
                            let mut c = c.clone();
                            c.extend([
                                ("ffn", 24),
                                ("act", act),
                                ("clamped", clamped),
                                ("in_dtype", in_dtype),
                            ]);
                            out.push(describe(kind, &consts(&c)).unwrap());
                        }
                    }
                }
                Kind::Permute
                | Kind::PermutePack
                | Kind::WeightedSum
                | Kind::UnpermuteWeightedSum => {
                    for w in [0, 1] {
                        let mut c = c.clone();
                        c.push(("weight_on_input", w));
                        out.push(describe(kind, &consts(&c)).unwrap());
                    }
                }
                _ => {
                    // A ragged last fp8 block (40 = 2·16 + 8).
                    c.push(("rows", 99));
                    out.push(describe(kind, &consts(&c)).unwrap());
                }
            }
        }
    }
    // Local arrays too large for local memory: the scratch block.
    out.push(
        describe(
            Kind::RouterTopk,
            &consts(&[("experts", 4096), ("top_k", 4), ("selection_bias", 1)]),
        )
        .unwrap(),
    );
    out
}

fn same_bits(a: &[u8], b: &[u8]) -> bool {
    a == b
}

#[test]
fn generated_cuda_matches_the_interpreter_on_library_kernels() {
    let kernels = library_kernels();
    let mut module = Module::new();
    let index: Vec<usize> = kernels.iter().map(|k| module.add(k).unwrap()).collect();
    assert!(
        module
            .kernels()
            .iter()
            .any(|k| k.scratch_bytes_per_thread() > 0),
        "one kernel exercises the scratch block"
    );
    let Some(host) = compile(&module, "library kernels") else {
        return;
    };
    let scalars = [Arg::F32(2.5)];
    let mut block_per_row = 0;
    for (k, &i) in kernels.iter().zip(&index) {
        let rows = 5u64;
        let mut want = fill(k, rows as usize, 7);
        interp::run(k, &mut interp_args(k, &mut want, &scalars), rows)
            .unwrap_or_else(|e| panic!("{}: {e}", k.name));
        if module.kernels()[i].block_per_row() {
            block_per_row += 1;
        }
        // Launch shapes that cut rows (thread per row) or a row's shared
        // loops (block per row) differently, threads of odd blocks run
        // backwards: 3 blocks of 2 threads, 2 of 7, one of 1.
        for (grid, block) in [(3, 2), (2, 7), (1, 1)] {
            let mut got = fill(k, rows as usize, 7);
            let status = host.run(i, &mut got, &scalars, rows, grid, block);
            assert_eq!(status, [0; STATUS_WORDS], "{}: status", k.name);
            for (p, (g, w)) in k.params.iter().zip(got.iter().zip(&want)) {
                assert!(
                    same_bits(g, w),
                    "{} ({}, {grid} x {block}): buffer `{}` differs from the interpreter",
                    k.name,
                    module.kernels()[i].name(),
                    p.name
                );
            }
        }
    }
    assert!(block_per_row >= 10, "{block_per_row} block-per-row kernels");
}

#[test]
fn generated_cuda_fails_like_the_interpreter() {
    // Every library kernel with each buffer in turn cut short: the launch
    // fails on the same access, naming the same buffer and index, after the
    // same stores.
    let kernels: Vec<Kernel> = library_kernels().into_iter().step_by(3).collect();
    let mut module = Module::new();
    let index: Vec<usize> = kernels.iter().map(|k| module.add(k).unwrap()).collect();
    let Some(host) = compile(&module, "launch failures") else {
        return;
    };
    let scalars = [Arg::F32(2.5)];
    let mut failures = 0;
    for (k, &i) in kernels.iter().zip(&index) {
        for (p, param) in k.params.iter().enumerate() {
            let ParamKind::Buffer { elem, .. } = param.kind else {
                continue;
            };
            let rows = 4u64;
            let mut want = fill(k, rows as usize, 11);
            // Long enough for a row or two, not for all of them.
            let keep = want[p].len().min(60 * elem.bytes());
            want[p].truncate(keep);
            let mut got = want.clone();
            let r = interp::run(k, &mut interp_args(k, &mut want, &scalars), rows);
            // One thread, so the rows run in order as in the interpreter.
            let status = host.run(i, &mut got, &scalars, rows, 1, 1);
            match r {
                Ok(()) => assert_eq!(status[0], 0, "{} with `{}` short", k.name, param.name),
                Err(e) => {
                    failures += 1;
                    let (code, which, idx) = expected_status(k, &e);
                    assert_eq!(
                        (status[0], status[1], status[2]),
                        (code, which, idx),
                        "{} with `{}` short: {e}",
                        k.name,
                        param.name
                    );
                }
            }
            assert!(
                got == want,
                "{} with `{}` short: stores before the failure differ",
                k.name,
                param.name
            );
        }
    }
    assert!(failures > 10, "only {failures} launches failed");
}

/// Values every conversion and function is checked on: a stride through all
/// `f32` bit patterns and the edges of every format.
fn sample_f32() -> Vec<f32> {
    let mut v: Vec<f32> = (0..(1u64 << 18))
        .map(|i| f32::from_bits((i.wrapping_mul(16_411) as u32) ^ ((i as u32) << 20)))
        .collect();
    let edges = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x807f_ffff),
        448.0,
        464.0,
        479.9,
        480.0,
        -464.0,
        65504.0,
        65519.99,
        65520.0,
        1.0 / 64.0,
        1.0 / 1024.0,
        3.0 / 1024.0,
        1.0625,
        1.1875,
        88.72284,
        88.7229,
        -87.33655,
        -103.97208,
        -104.0,
        0.5493,
        0.2554,
        9.99,
        10.01,
        0.84375,
        1.25,
        2.857,
        5.99,
        6.01,
    ];
    for e in edges {
        v.push(e);
        v.push(-e);
        v.push(f32::from_bits(e.to_bits().wrapping_add(1)));
        v.push(f32::from_bits(e.to_bits().wrapping_sub(1)));
    }
    // Dense where the activations live.
    v.extend((0..40_000).map(|i| (i as f32 - 20_000.0) / 1000.0));
    // Every fp8 rounding boundary and its neighbours.
    for b in 0u8..=0x7e {
        let lo = scalar::fp8_e4m3_to_f32(b);
        let hi = scalar::fp8_e4m3_to_f32(b + 1);
        let mid = (lo + hi) / 2.0;
        for m in [mid, -mid] {
            v.push(m);
            v.push(f32::from_bits(m.to_bits() + 1));
            v.push(f32::from_bits(m.to_bits() - 1));
        }
    }
    v
}

#[test]
fn generated_cuda_helpers_are_bit_exact() {
    // One kernel that pushes each sampled value through every function and
    // conversion of the language; the interpreter is the oracle.
    let mut b = Builder::new("scalar_ops");
    let x = b.buffer("x", Elem::F32, Access::Read);
    let y = b.buffer("y", Elem::F32, Access::Read);
    let f = b.buffer("f", Elem::F32, Access::Write);
    let ints = b.buffer("ints", Elem::I32, Access::Write);
    let bf = b.buffer("bf", Elem::Bf16, Access::Write);
    let hf = b.buffer("hf", Elem::F16, Access::Write);
    let q = b.buffer("q", Elem::Fp8E4m3, Access::Write);
    let t = b.row();
    let v = b.local("v", x.at(&t));
    let w = b.local("w", y.at(&t));
    let outs = [
        exp(v),
        log(v),
        tanh(v),
        erf(v),
        sqrt(v),
        floor(v),
        abs(v),
        -v,
        min(v, w),
        max(v, w),
        min(w, v),
        max(w, v),
        v + w,
        v - w,
        v * w,
        v / w,
        (v * w) + v,
        to_f32(to_i64(v)),
        select(lt(v, w), 1.0f32, 0.0f32),
        select(ne(v, w), 1.0f32, 0.0f32),
        select(and(gt(v, 0.0f32), not(or(lt(w, 0.0f32), eq(v, w)))), v, w),
    ];
    let n = outs.len() as i64;
    for (j, o) in outs.into_iter().enumerate() {
        b.store(f, &t * n + j as i64, o);
    }
    let i = b.local("i", to_i64(v * 1000.0f32));
    let k = b.local("k", to_i64(w));
    b.store(ints, &t * 4, to_i64(v));
    b.store(ints, &t * 4 + 1, abs(-i) - i);
    b.store(ints, &t * 4 + 2, max(i, k) * 3 - min(i, k));
    b.if_else(
        eq(k, 0),
        |b| b.store(ints, &t * 4 + 3, 7),
        |b| b.store(ints, &t * 4 + 3, i / k + i % k),
    );
    b.store(bf, &t, v);
    b.store(hf, &t, v);
    b.store(q, &t, v);
    let kernel = b.finish().unwrap();

    let xs = sample_f32();
    let mut ys = xs.clone();
    ys.rotate_left(7);
    let rows = xs.len();
    let mut want = vec![
        interp::encode_f32(Elem::F32, &xs),
        interp::encode_f32(Elem::F32, &ys),
        vec![0u8; rows * n as usize * 4],
        vec![0u8; rows * 16],
        vec![0u8; rows * 2],
        vec![0u8; rows * 2],
        vec![0u8; rows],
    ];
    let mut got = want.clone();
    let mut module = Module::new();
    let i = module.add(&kernel).unwrap();
    let Some(host) = compile(&module, "helpers") else {
        return;
    };
    interp::run(
        &kernel,
        &mut interp_args(&kernel, &mut want, &[]),
        rows as u64,
    )
    .unwrap();
    let status = host.run(i, &mut got, &[], rows as u64, 7, 32);
    assert_eq!(status, [0; STATUS_WORDS]);
    let names = ["f", "ints", "bf", "hf", "q"];
    for (name, (g, w)) in names.iter().zip(got[2..].iter().zip(&want[2..])) {
        if g == w {
            continue;
        }
        // Report the first difference with the input that caused it.
        let elem = match *name {
            "f" => 4 * n as usize,
            "ints" => 16,
            "bf" | "hf" => 2,
            _ => 1,
        };
        let at = g.iter().zip(w.iter()).position(|(a, b)| a != b).unwrap();
        let row = at / elem;
        panic!(
            "`{name}` differs at byte {at} (row {row}, x = {:?} [{:#010x}], y = {:?}): got {:?}, want {:?}",
            xs[row],
            xs[row].to_bits(),
            ys[row],
            &g[row * elem..(row + 1) * elem],
            &w[row * elem..(row + 1) * elem],
        );
    }
}

#[test]
fn generated_cuda_loads_every_narrow_code() {
    // Every bf16 and f16 bit pattern and every fp8 code, loaded and stored
    // back as f32.
    let mut b = Builder::new("widen");
    let bf = b.buffer("bf", Elem::Bf16, Access::Read);
    let hf = b.buffer("hf", Elem::F16, Access::Read);
    let q = b.buffer("q", Elem::Fp8E4m3, Access::Read);
    let u = b.buffer("u", Elem::U8, Access::Read);
    let out = b.buffer("out", Elem::F32, Access::Write);
    let back = b.buffer("back", Elem::U8, Access::Write);
    let t = b.row();
    b.store(out, &t * 4, bf.at(&t));
    b.store(out, &t * 4 + 1, hf.at(&t));
    b.store(out, &t * 4 + 2, q.at(&t % 256));
    b.store(out, &t * 4 + 3, to_f32(u.at(&t % 256)));
    b.store(back, &t, u.at(&t % 256) * 3 - 700);
    let kernel = b.finish().unwrap();
    let rows = 1usize << 16;
    let codes: Vec<u8> = (0..rows).flat_map(|i| (i as u16).to_le_bytes()).collect();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let mut want = vec![
        codes.clone(),
        codes,
        bytes.clone(),
        bytes,
        vec![0u8; rows * 16],
        vec![0u8; rows],
    ];
    let mut got = want.clone();
    let mut module = Module::new();
    let i = module.add(&kernel).unwrap();
    let Some(host) = compile(&module, "narrow codes") else {
        return;
    };
    interp::run(
        &kernel,
        &mut interp_args(&kernel, &mut want, &[]),
        rows as u64,
    )
    .unwrap();
    let status = host.run(i, &mut got, &[], rows as u64, 16, 64);
    assert_eq!(status, [0; STATUS_WORDS]);
    assert!(got[4] == want[4], "widened values differ");
    assert!(got[5] == want[5], "u8 stores differ");
}

#[test]
fn generated_cuda_reports_division_by_zero() {
    let mut b = Builder::new("div");
    let d = b.buffer("d", Elem::I32, Access::Read);
    let out = b.buffer("out", Elem::I32, Access::Write);
    let t = b.row();
    b.store(out, &t, (t.clone() + 100) / d.at(&t));
    let kernel = b.finish().unwrap();
    let mut module = Module::new();
    let i = module.add(&kernel).unwrap();
    let Some(host) = compile(&module, "division by zero") else {
        return;
    };
    let divisors = interp::encode_i64(Elem::I32, &[3, -1, 7, 0, 5]);
    let mut want = vec![divisors, vec![0u8; 20]];
    let mut got = want.clone();
    let r = interp::run(&kernel, &mut interp_args(&kernel, &mut want, &[]), 5);
    assert_eq!(r, Err(LaunchError::DivideByZero));
    let status = host.run(i, &mut got, &[], 5, 1, 1);
    assert_eq!(status, [3, 0, 0, 3]);
    assert_eq!(got, want);
}

#[test]
fn generated_cuda_reports_local_array_out_of_bounds() {
    // A loop variable with literal bounds indexes the array unchecked; an
    // index read from memory is checked.
    let mut b = Builder::new("arr");
    let idx = b.buffer("idx", Elem::I32, Access::Read);
    let out = b.buffer("out", Elem::F32, Access::Write);
    let t = b.row();
    let a = b.array("a", Ty::F32, 4);
    b.for_range(0, 4, |b, i| b.array_set(a, i, to_f32(i.e()) + 0.5f32));
    b.store(out, &t, a.at(idx.at(&t)));
    let kernel = b.finish().unwrap();
    let mut module = Module::new();
    let i = module.add(&kernel).unwrap();
    let text = module.kernels()[i].text().to_string();
    assert_eq!(text.matches(">= 4ull)").count(), 1, "{text}");
    let Some(host) = compile(&module, "local array out of bounds") else {
        return;
    };
    let idx = interp::encode_i64(Elem::I32, &[3, 0, 4, 1]);
    let mut want = vec![idx, vec![0u8; 16]];
    let mut got = want.clone();
    let r = interp::run(&kernel, &mut interp_args(&kernel, &mut want, &[]), 4);
    assert_eq!(
        r,
        Err(LaunchError::OutOfBounds {
            param: "a".into(),
            index: 4,
            len: 4
        })
    );
    let status = host.run(i, &mut got, &[], 4, 1, 1);
    assert_eq!(status, [2, 0, 4, 2]);
    assert_eq!(got, want);
}
