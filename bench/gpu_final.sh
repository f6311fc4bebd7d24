#!/usr/bin/env bash
# Final short GPU check (H100/H200), hard-capped at ~150 s: CUDA kernel tests for the key shards only (4 in
# parallel, 55 s), then the benchmark at XL and G (no GEMM sweep; a 4-config permute/unpermute row sweep only).
# Logs and the JSON go to $OUT (else bench/results/). megatron-core is used when importable: a carried
# .whl/megatron_core-*.whl (pure-python parts) is put on PYTHONPATH, else the megatron rows are skipped.
#
#   bash bench/gpu_final.sh
#
# Budget: setup <= ~15 s, tests 55 s, benchmark 75 s (its own --budget 55 stops starting new sections).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
say() { echo "[gpu_final $(($(date +%s) - START))s] $*"; }
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOGDIR=${OUT:-$REPO/bench/results}
mkdir -p "$LOGDIR"
unset TRITON_INTERPRET
STAMP=$(mktemp)

say "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
timeout 20 "$PY" -c "
import sys, torch, triton
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__,
      '| cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
" 2>&1 | tee "$LOGDIR/env.log"

# ditmoe_kernels: a PYTHONPATH shim (no pip install); the package layout is kernels/ -> ditmoe_kernels
if ! "$PY" -c "import ditmoe, ditmoe_kernels" >/dev/null 2>&1; then
    SHIM=$(mktemp -d)
    ln -s "$REPO/kernels" "$SHIM/ditmoe_kernels"
    export PYTHONPATH="$SHIM:$REPO/src:${PYTHONPATH:-}"
    say "using a PYTHONPATH shim for ditmoe / ditmoe_kernels"
fi
if ! "$PY" -c "import megatron.core" >/dev/null 2>&1; then
    for w in "$REPO"/.whl/megatron_core-*.whl; do
        [ -f "$w" ] && export PYTHONPATH="$w:$PYTHONPATH"
    done
fi
"$PY" -c "import ditmoe_kernels.triton_ops as o; print('ditmoe_kernels.triton_ops from', o.__file__)" || exit 1
timeout 20 "$PY" -c "import megatron.core; print('megatron.core importable')" 2>/dev/null \
    || say "megatron.core not importable: its rows will be skipped"

if "$PY" -c "import pytest" >/dev/null 2>&1; then
    say "kernel tests on CUDA (4 key shards in parallel, 55 s limit)"
    SHARDS=(
        "medium_cuda or bitwise or no_host_sync or split"
        "low_precision or ((grouped_mm or permute) and not property)"
        "experts_fp32 and swiglu"
        "autocast or dit_moe or (experts_fp32 and gelu)"
    )
    PIDS=()
    for i in "${!SHARDS[@]}"; do
        timeout 55 "$PY" -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider -k "${SHARDS[$i]}" \
            >"$LOGDIR/tests_$i.log" 2>&1 &
        PIDS+=($!)
    done
    for i in "${!SHARDS[@]}"; do
        wait "${PIDS[$i]}"
        rc=$?
        say "shard $i ('${SHARDS[$i]}') exit $rc$([ $rc = 124 ] && echo ' (timed out)')"
        grep -E "^(FAILED|ERROR)|Error|passed|failed|error" "$LOGDIR/tests_$i.log" | tail -n 8
    done
else
    say "pytest is not installed: skipping the tests (the benchmark still checks ours vs reference)"
fi

say "benchmark: XL, G + unpermute row sweep (75 s limit)"
timeout 75 "$PY" -W ignore bench/bench_kernels.py --shapes XL,G --reps 15 --budget 55 \
    --sweep --sweep-kinds rows 2>&1 | grep --line-buffered -v "^  warnings.warn" | tee "$LOGDIR/bench.log"
say "benchmark exit ${PIPESTATUS[0]}"
if [ -n "${OUT:-}" ]; then
    find bench/results -maxdepth 1 -name '*.json' -newer "$STAMP" -exec cp {} "$OUT/" \;
fi
rm -f "$STAMP"
say "done; logs in $LOGDIR"
