#!/usr/bin/env bash
# The CUDA backend's GPU checks, in one call on a machine with a GPU.
#
# The GPU machine has no Rust toolchain, so the binaries are built on a
# development machine (x86_64, glibc) and carried:
#
#   runtime/gpu/check.sh build     # here: release moec + the cuda_gpu test binary
#                                  #   into runtime/gpu/bin/ (git-ignored, ~25 MB)
#   runtime/gpu/check.sh           # there (carry runtime/gpu/bin): every check below
#
# What `run` (the default) does, each step reported, a summary at the end:
#   1. the GPU, the driver's CUDA version, and the NVRTC moec uses (version
#      and library path: the `device:` line of a tiny run);
#   2. `moec run --backend cuda` on every example, shrunk (hidden 64, ffn 32,
#      128 tokens per rank, bf16), beside `--backend cpu`: the routing lines
#      (tokens per expert, drops) must be equal, the output lines are shown;
#   3. a capacity plan (switch_base_128, shrunk) as a CUDA graph;
#   4. the ignored GPU tests (tests/cuda_gpu.rs): every example in bf16 and
#      f32 against the CPU backend, capacity (eager and as a graph), chunks,
#      replicas, profiled passes;
#   5. a one-rank NCCL smoke test (MOEC_COMM=nccl); NCCL needs a GPU per
#      rank, so multi-rank NCCL runs need a multi-GPU host (torchrun).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$here/bin"

if [ "${1:-run}" = build ]; then
    set -e
    cd "$root"
    cargo build --release -p moec
    test_bin="$(cargo test --release -p moec-tests --test cuda_gpu --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*cuda_gpu[^"]*\)".*/\1/p' | tail -1)"
    [ -n "$test_bin" ] || { echo "no cuda_gpu test binary" >&2; exit 1; }
    mkdir -p "$bin"
    cp "${CARGO_TARGET_DIR:-$root/target}/release/moec" "$bin/moec"
    cp "$test_bin" "$bin/cuda_gpu"
    strip "$bin/moec" "$bin/cuda_gpu" 2>/dev/null || true
    ls -la "$bin"
    exit 0
fi

cd "$root"
failures=()
step() { printf '\n=== %s\n' "$1"; }
fail() { echo "FAILED: $1"; failures+=("$1"); }

step "GPU and libraries"
nvidia-smi -L || fail "nvidia-smi"
# shellcheck source=runtime/gpu/env.sh
source "$here/env.sh"
[ -x "$bin/moec" ] || { echo "no $bin/moec: run 'runtime/gpu/check.sh build' on a machine with Rust and carry runtime/gpu/bin"; exit 2; }
print_toolchain

step "moec run --backend cuda on every example (shrunk, bf16), beside --backend cpu"
shrink=(--hidden 64 --ffn 32 --tokens 128 --dtype bf16 --seed 3)
for example in examples/*.moe; do
    name="$(basename "$example" .moe)"
    cpu="$("$bin/moec" run "$example" --backend cpu "${shrink[@]}" 2>&1)"
    start=$(date +%s.%N)
    gpu="$("$bin/moec" run "$example" --backend cuda "${shrink[@]}" 2>&1)"
    code=$?
    secs=$(echo "$(date +%s.%N) - $start" | bc 2>/dev/null || echo "?")
    echo "--- $name (exit $code, ${secs}s)"
    echo "$gpu" | grep -E '^(device|output|error)' || true
    echo "$cpu" | grep -E '^output' | sed 's/^/cpu /'
    if [ $code -ne 0 ]; then
        echo "$gpu" | tail -5
        fail "moec run --backend cuda $name"
        continue
    fi
    for line in 'tokens per expert' 'dropped'; do
        a="$(echo "$cpu" | grep "^$line")"
        b="$(echo "$gpu" | grep "^$line")"
        [ "$a" = "$b" ] || { echo "cpu: $a"; echo "gpu: $b"; fail "$name: $line differs"; }
    done
done

step "a capacity plan as a CUDA graph (moec run --graph), beside the CPU"
graph_args=(examples/switch_base_128.moe --hidden 64 --ffn 32 --tokens 128 --dtype bf16 --seed 3)
cpu="$("$bin/moec" run "${graph_args[@]}" --backend cpu 2>&1)"
gpu="$("$bin/moec" run "${graph_args[@]}" --backend cuda --graph 2>&1)" || fail "moec run --graph"
echo "$gpu" | grep -E '^(device|output|error|wall)' || true
for line in 'tokens per expert' 'dropped'; do
    a="$(echo "$cpu" | grep "^$line")"
    b="$(echo "$gpu" | grep "^$line")"
    [ "$a" = "$b" ] || { echo "cpu: $a"; echo "gpu: $b"; fail "--graph: $line differs"; }
done

step "the GPU tests (tests/cuda_gpu.rs, ignored elsewhere)"
MOEC_EXAMPLES="$root/examples" "$bin/cuda_gpu" --ignored --nocapture --test-threads 1 || fail "cuda_gpu tests"

step "NCCL, a world of one (MOEC_COMM=nccl)"
MOEC_COMM=nccl "$bin/moec" run examples/tiny.moe --backend cuda --ranks 1 --tokens 64 || fail "NCCL smoke test"

step "summary"
if [ ${#failures[@]} -eq 0 ]; then
    echo "all GPU checks passed"
else
    printf 'failed: %s\n' "${failures[@]}"
    exit 1
fi
