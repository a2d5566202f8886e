#!/usr/bin/env bash
# The CUDA backend's benchmark, in one call on a machine with a GPU: the
# figures of BENCHMARKS.md's GPU section.
#
#   runtime/gpu/check.sh build   # here: release moec into runtime/gpu/bin
#   runtime/gpu/bench.sh         # there (carry runtime/gpu/bin)
#
# 1. `moec bench --backend cuda --json` on each layer of runtime/gpu/layers/
#    (Mixtral size on one rank; DeepSeek-V3 size on eight virtual ranks,
#    which needs about 78 GB with the cuBLAS workspaces and the context: an H200; a Qwen3 capacity layer, timed eager
#    and as a CUDA graph): the layer's time, its phases, the expert GEMMs'
#    TFLOP/s and the permute/unpermute kernels' GB/s;
# 2. runtime/gpu/bench.py: the dense bf16 GEMM rate and the device-to-device
#    copy bandwidth, and the same layers in PyTorch (a loop over experts,
#    and torch._grouped_mm), then the comparison.
#
# Everything lands in $OUT (default runtime/gpu/out): moec-LAYER.json and
# .txt, bench.json, and bench.md, the Markdown section for BENCHMARKS.md.
# MOEC_BENCH_ITERS (default 10) sets the timed passes of every measurement.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="$here/bin"
out="${OUT:-$here/out}"
iters="${MOEC_BENCH_ITERS:-10}"
mkdir -p "$out"
cd "$root"

echo "=== GPU and libraries"
# shellcheck source=runtime/gpu/env.sh
source "$here/env.sh"
[ -x "$bin/moec" ] || { echo "no $bin/moec: run 'runtime/gpu/check.sh build' on a machine with Rust and carry runtime/gpu/bin"; exit 2; }
print_toolchain

reports=()
failed=0
for layer in "$here"/layers/*.moe; do
    name="$(basename "$layer" .moe)"
    echo "=== moec bench --backend cuda $layer"
    start=$SECONDS
    graph=()
    # Capacity plans run as a CUDA graph too (timed beside the eager passes).
    grep -q '^    capacity {' "$layer" && graph=(--graph)
    if timeout 300 "$bin/moec" bench "$layer" --backend cuda "${graph[@]}" --iters "$iters" --warmup 2 --json \
        >"$out/moec-$name.json" 2>"$out/moec-$name.log"; then
        reports+=(--moec "$out/moec-$name.json")
        cat "$out/moec-$name.log"
        python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("total %.3f ms, expert GEMMs %.1f TFLOP/s, %s" % (r["total_ms"]["median"], r["expert_gemm"]["tflops"], ", ".join("%s %.0f GB/s" % (m["what"], m["rate"]) for m in r["memory_bound"])))' "$out/moec-$name.json"
    else
        failed=1
        echo "FAILED (exit $?):"
        tail -20 "$out/moec-$name.log"
    fi
    echo "($((SECONDS - start)) s)"
done

echo "=== PyTorch: yardsticks and the same layers"
python3 "$here/bench.py" --out "$out" --iters "$iters" "${reports[@]}" || failed=1
exit $failed
