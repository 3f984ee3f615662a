#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests, the pattern fuzzer (1000 seeded cases), the N:M check, a process's
# first-call cost, the time per call at small shapes, then the benchmarks (static patterns, N:M, buckets and
# dropping, block top-k, key-index lists, top-k by token, score modifications); full logs and JSON under $OUT.
# Context parallelism has its own script (bench/run_cp.sh).
#   bash bench/run_device.sh [--quick] [--baseline DIR]
# --baseline DIR also benchmarks the attngen package found in DIR (e.g. `git archive` of an earlier commit) in the
# same call, with its own kernel cache, and prints both runs side by side (bench/compare.py).
set -uo pipefail
cd "$(dirname "$0")/.."
BASELINE="" QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) BASELINE=$(cd "$2" && pwd); shift 2 ;;
    --quick) QUICK=--quick; shift ;;
    --sanitize) SANITIZE=1; shift ;;  # optional: also run bench/sanitize.py (compute-sanitizer, ~tens of minutes)
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 ATTNGEN_CACHE_DIR=${ATTNGEN_CACHE_DIR:-/tmp/attngen-cache}
OUT=${OUT:-/tmp/attngen-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"
python3 bench/prewarm.py sm_90 2>&1 | tail -n 3
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 40
python3 bench/fuzz_gpu.py --cases 1000 --seed 0 --out "$OUT" 2>&1 | tee "$OUT/fuzz.log" | tail -n 12
python3 bench/nm_check.py $QUICK 2>&1 | tee "$OUT/nm_check.log" | grep -v '^ok' | tail -n 12
python3 bench/first_call.py --out "$OUT/first_call.json" 2>&1 | tee "$OUT/first_call.log" | tail -n 5
python3 bench/bench_latency.py --out "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log"
python3 bench/bench_attention.py --out "$OUT/bench.json" $QUICK 2>&1 | tee "$OUT/bench.log"
python3 bench/bench_nm.py --out "$OUT/bench_nm.json" $QUICK 2>&1 | tee "$OUT/bench_nm.log"
python3 bench/bench_buckets.py --out "$OUT/bench_buckets.json" $QUICK 2>&1 | tee "$OUT/bench_buckets.log"
TOPK_LENGTHS=""; [ -n "$QUICK" ] && TOPK_LENGTHS="--lengths 8192 32768"
python3 bench/bench_topk_blocks.py --out "$OUT/bench_topk_blocks.json" $TOPK_LENGTHS 2>&1 | tee "$OUT/bench_topk_blocks.log"
python3 bench/bench_key_indices.py --out "$OUT/bench_key_indices.json" 2>&1 | tee "$OUT/bench_key_indices.log"
INDEXER_LENGTHS=""; [ -n "$QUICK" ] && INDEXER_LENGTHS="--indexer-lengths 16384 32768"
python3 bench/bench_topk_tokens.py --out "$OUT/bench_topk_tokens.json" $INDEXER_LENGTHS 2>&1 | tee "$OUT/bench_topk_tokens.log"
SCORE_MOD_LENGTHS=""; [ -n "$QUICK" ] && SCORE_MOD_LENGTHS="--lengths 16384"
python3 bench/bench_score_mod.py --out "$OUT/bench_score_mod.json" $SCORE_MOD_LENGTHS 2>&1 | tee "$OUT/bench_score_mod.log"
if [ -n "$BASELINE" ]; then
  echo "== baseline: $BASELINE"
  (cd "$BASELINE" && PYTHONPATH=$BASELINE:${PYTHONPATH#"$PWD:"} ATTNGEN_CACHE_DIR=/tmp/attngen-cache-baseline \
    python3 "$OLDPWD/bench/bench_attention.py" --out "$OUT/bench_baseline.json" $QUICK 2>&1 | tee "$OUT/bench_baseline.log")
  echo "== before (baseline) vs after (this tree)"
  python3 bench/compare.py "$OUT/bench_baseline.json" "$OUT/bench.json"
fi
if [ -n "${SANITIZE:-}" ]; then  # optional step, only with --sanitize
  python3 bench/sanitize.py --jobs 12 --out "$OUT/sanitize" 2>&1 | tee "$OUT/sanitize.log" | tail -n 25
  cp "$OUT/sanitize/findings.txt" "$OUT/" 2>/dev/null  # the first reports of what is not clean (logs stay behind)
fi
echo "== tests: $(tail -n 1 "$OUT/gpu_tests.log")"
echo "== fuzz: $(grep -m1 '^all ' "$OUT/fuzz.log")"
echo "== N:M: $(tail -n 1 "$OUT/nm_check.log")"
