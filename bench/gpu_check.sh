#!/usr/bin/env bash
# Full GPU check of the MoE kernels (H100/H200), 4-6 minutes: the kernel tests on CUDA (3 shards in parallel,
# 150 s), then bench/bench_kernels.py with a tile sweep (190 s). Logs and JSON go to $OUT (else bench/results/).
#
#   bash bench/gpu_check.sh
NAME=gpu_check
source "$(dirname "$0")/gpu_common.sh"

run_test_shards 150 \
    "routing or permute or grouped_mm" \
    "experts_fp32 or noncontiguous" \
    "not (routing or permute or grouped_mm or experts_fp32 or noncontiguous)"

say "benchmark (190 s limit)"
timeout 190 "$PY" bench/bench_kernels.py --sweep --budget 130 2>&1 | tee "$LOGDIR/bench.log"
say "benchmark exit ${PIPESTATUS[0]}"
say "training throughput: S/2 and XL/2-8E2A, triton vs torch vs naive (150 s limit)"
timeout 150 "$PY" -W ignore bench/bench_train.py 2>&1 | tee "$LOGDIR/bench_train.log"
say "training benchmark exit ${PIPESTATUS[0]}"
collect_results
