#!/usr/bin/env bash
# NVIDIA's CUDA 13.0 compiler and headers from their PyPI wheels (nvcc, ptxas, cicc, the runtime
# and CCCL headers), unpacked into a folder without installing anything system-wide; prints the
# CUDA root to use. Enough to build candle-moe with `--features cuda` on a machine without a GPU
# or a CUDA install (the kernels are compiled; running them needs a GPU and its driver).
#
#   root=$(scripts/cuda_toolchain.sh [DEST])          # default DEST: target/cuda-wheels
#   CUDA_ROOT=$root PATH=$root/bin:$PATH CUDA_COMPUTE_CAP=90 cargo build --release --features cuda
set -euo pipefail
dest=${1:-target/cuda-wheels}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
root="$dest/nvidia/cu13"
if [ ! -x "$root/bin/nvcc" ]; then
  wheels="$dest/wheels"
  mkdir -p "$wheels"
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
  for w in "$wheels"/*.whl; do
    python3 -m zipfile -e "$w" "$dest" >&2
  done
  chmod +x "$root"/bin/* "$root"/nvvm/bin/* 2>/dev/null || true
fi
"$root/bin/nvcc" --version >&2
echo "$root"
