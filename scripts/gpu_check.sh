#!/usr/bin/env bash
# The GPU check, in two halves, for a GPU machine that has CUDA (and maybe PyTorch) but no Rust
# toolchain and no registry access:
#
#   scripts/gpu_check.sh build [DIR]   here (Rust, the CUDA compiler from scripts/cuda_toolchain.sh
#                                      or a CUDA install): builds route_bench and the CUDA test
#                                      binary with --features cuda into DIR (default gpu-carry/)
#   scripts/gpu_check.sh run [DIR]     there: checks that a GPU answers, then runs
#       1. the CUDA tests (tests/cuda.rs: the layer against the per-token reference in f32 and
#          bf16, gradients against the CPU, a tiny language model against the CPU and trained);
#       2. route_bench --device cuda in bf16 and f32 at T = 512, 4096, 16384 (MoE against the
#          dense FFN of equal active FLOPs, medians), with the GPU's peak memory per run sampled
#          by nvidia-smi;
#       3. when python3 has torch and transformers: transformers' MixtralSparseMoeBlock (eager
#          and grouped_mm experts) on the same GPU and shapes (benches/peers/torch_moe.py).
#     Everything is printed and written to DIR/results/.
#
# Without an NVIDIA GPU `run` stops at once with exit status 2 and says so.
set -uo pipefail
cmd=${1:-}
dir=${2:-gpu-carry}
shape=(--experts 8 --top-k 2 --hidden 512 --ffn 1024)
tokens=512,4096,16384

case "$cmd" in
build)
  set -e
  if ! command -v nvcc >/dev/null; then
    root=$(scripts/cuda_toolchain.sh target/cuda-wheels)
    export CUDA_HOME="$root" CUDA_ROOT="$root" CUDA_PATH="$root" PATH="$root/bin:$PATH"
  fi
  export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
  cargo build --release --features cuda --example route_bench
  test_bin=$(cargo test --release --features cuda --test cuda --no-run --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
  mkdir -p "$dir"
  cp "$CARGO_TARGET_DIR/release/examples/route_bench" "$dir/route_bench"
  cp "$test_bin" "$dir/cuda_tests"
  cp benches/peers/torch_moe.py "$dir/"
  echo "built into $dir/: route_bench, cuda_tests, torch_moe.py (carry it to the GPU machine)"
  ;;
run)
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu_check: no NVIDIA GPU found (nvidia-smi is missing or lists no GPU): this check needs one" >&2
    exit 2
  fi
  for f in route_bench cuda_tests; do
    if [ ! -x "$dir/$f" ]; then
      echo "gpu_check: $dir/$f is missing: run 'scripts/gpu_check.sh build $dir' where Rust is, and carry $dir" >&2
      exit 2
    fi
  done
  out="$dir/results"
  mkdir -p "$out"
  nvidia-smi -L | tee "$out/gpu.txt"
  status=0
  # Runs "$@" with nvidia-smi sampling the used memory; prints the peak above the idle value.
  peak() {
    local log base
    log=$(mktemp)
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    echo "peak GPU memory above idle: $(($(sort -n "$log" | tail -1) - base)) MiB"
    rm -f "$log"
    return $rc
  }
  echo "== CUDA tests"
  "$dir/cuda_tests" --test-threads 1 2>&1 | tee "$out/cuda_tests.txt" || status=1
  for dt in bf16 f32; do
    echo "== route_bench --device cuda --dtype $dt"
    peak "$dir/route_bench" --device cuda --dtype "$dt" "${shape[@]}" --tokens "$tokens" \
      --plot "$out/route_bench_$dt.png" 2>&1 | tee "$out/route_bench_$dt.txt" || status=1
  done
  if python3 -c 'import torch, transformers' 2>/dev/null; then
    for dt in bf16 f32; do
      for impl in eager grouped_mm; do
        echo "== transformers MixtralSparseMoeBlock ($impl, $dt)"
        python3 "$dir/torch_moe.py" --device cuda --dtype "$dt" --impl "$impl" \
          --workload layer --tokens "$tokens" 2>&1 | tee "$out/torch_${impl}_$dt.txt" || status=1
      done
    done
  else
    echo "== no torch + transformers in python3: the transformers comparison is skipped"
  fi
  exit $status
  ;;
*)
  echo "usage: scripts/gpu_check.sh build|run [DIR]" >&2
  exit 2
  ;;
esac
