# Sourced by check.sh and bench.sh on the GPU machine: where the CUDA
# libraries are. Sets LD_LIBRARY_PATH (the toolkit's lib64, pip's NVIDIA
# wheels that PyTorch brings: cuBLAS, NCCL, NVRTC), MOEC_CUDA_HOME (NVRTC's
# headers) and links libnccl.so, which cudarc opens by that name, to the
# wheel's libnccl.so.2 in runtime/gpu/lib. Expects $here (runtime/gpu).
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
nvidia_py="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || true)"
if [ -n "$nvidia_py" ]; then
    for dir in "$nvidia_py"/*/lib; do
        [ -d "$dir" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$dir"
    done
fi
[ -d /usr/local/cuda ] && export MOEC_CUDA_HOME="${MOEC_CUDA_HOME:-/usr/local/cuda}"
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
echo "MOEC_CUDA_HOME=${MOEC_CUDA_HOME:-}"
nccl2="$(ls "$nvidia_py"/nccl/lib/libnccl.so.2 2>/dev/null | head -1)"
if [ -n "$nccl2" ]; then
    mkdir -p "$here/lib" && ln -sf "$nccl2" "$here/lib/libnccl.so"
    export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}:$here/lib"
fi

# The GPU, the driver's CUDA version and the NVRTC moec uses (version and
# library path), as moec itself finds them: the `device:` line of a tiny run.
# Expects $bin (runtime/gpu/bin) and the repository root as the current folder.
print_toolchain() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$bin/moec" run examples/tiny.moe --backend cuda --ranks 1 --tokens 64 --hidden 64 --ffn 32 2>&1 |
        grep -E '^(device|error)' || echo "moec found no usable GPU"
}
