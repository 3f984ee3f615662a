#!/usr/bin/env bash
# Context parallelism on one multi-GPU machine, in one call: compile the kernels, check the example against one GPU,
# then the weak-scaling benchmark; logs and JSON under $OUT.
#   bash bench/run_cp.sh [GPUS (default: all)] [PER_GPU (default 131072)]
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 ATTNGEN_CACHE_DIR=${ATTNGEN_CACHE_DIR:-/tmp/attngen-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
OUT=${OUT:-/tmp/attngen-out}; mkdir -p "$OUT"
GPUS=${1:-$(nvidia-smi -L | wc -l)} PER_GPU=${2:-131072}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 240 python3 bench/bench_cp.py --prewarm "$GPUS" --per-gpu "$PER_GPU" 2>&1 | tee "$OUT/prewarm.log" | tail -n 4
timeout 240 torchrun --nproc-per-node "$GPUS" examples/07_context_parallel.py --seq $((GPUS * PER_GPU)) 2>&1 \
  | tee "$OUT/example.log" | grep -v '^W1\|^\*\*\*\|OMP_NUM' | tail -n 12
timeout 300 torchrun --nproc-per-node "$GPUS" bench/bench_cp.py --per-gpu "$PER_GPU" --out "$OUT/bench_cp.json" 2>&1 \
  | tee "$OUT/bench_cp.log" | grep -v '^W1\|^\*\*\*\|OMP_NUM' | tail -n 20
