#!/usr/bin/env bash
# Second device call of 2026-11-27 (H100, ~200 s, no extension build): the two fixes' checks and
# the SF-Conv forward re-measure. Run from the repository root: OUT=dir bash <this file>
#  1. segv_probe.py: which TORCH_CHECK messages crash in nvcc- vs g++-compiled code (background)
#  2. the float32 RefCO tests that hit OutOfResources in the first call (Triton SF-Conv backward,
#     default launch without autotuning), now with the fallback to a smaller tile
#  3. copy + SF-Conv forward, dense cuDNN vs the Triton composed GEMM (the bf16 default), channels_last
set -u
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
R=benchmarks/results/2026-11-27-h100
start=$(date +%s); stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }
( timeout 150 python $R/segv_probe.py > "$OUT/segv_probe.log" 2>&1; echo "exit code: $?" >> "$OUT/segv_probe.log" ) &
stamp "RefCO float32 tests"
FALCONNET_TRITON_AUTOTUNE=0 timeout -s INT 60 python -m pytest -q -p no:cacheprovider tests/test_refco_train.py \
  -k cuda_fused_matches_cpu_float64 -m cuda > "$OUT/tests2.log" 2>&1
echo "exit code: $?" >> "$OUT/tests2.log"; tail -4 "$OUT/tests2.log"
stamp "benchmarks: copy, sf_conv forward (dense, triton-gemm)"
FALCONNET_BENCH_STREAM="$OUT/bench_sf_fwd_stream.jsonl" timeout -s INT -k 10 ${BENCH_TIME:-110} python -m pytest -q \
  -p no:cacheprovider benchmarks/test_bench_copy.py benchmarks/test_bench_sf_conv.py --bench-device cuda \
  -k "copy or (fwd and not fwdbwd and (dense or falconnet-triton-gemm))" --timeout=60 \
  --benchmark-json="$OUT/bench_sf_fwd.json" > "$OUT/bench2.log" 2>&1
echo "exit code: $?" >> "$OUT/bench2.log"; tail -3 "$OUT/bench2.log"
wait; stamp "probe"; cat "$OUT/segv_probe.log" | grep -v "^W1127"
stamp done
