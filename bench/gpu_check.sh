#!/usr/bin/env bash
# One-shot GPU check of the MoE kernels (H100/H200): make ditmoe importable, run the kernel tests natively on CUDA
# (three shards in parallel so Triton compiles overlap), then bench/bench_kernels.py with a short tile sweep.
# Logs and results go to $OUT when it is set (else bench/results/). Expected wall time: 4-6 minutes.
#
#   bash bench/gpu_check.sh
#
# Stages are time-boxed (tests 150 s, benchmark 190 s) so a slow stage cannot eat the next one.
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
say() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOGDIR=${OUT:-$REPO/bench/results}
mkdir -p "$LOGDIR"
unset TRITON_INTERPRET
STAMP=$(mktemp)

say "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
"$PY" - <<'EOF' 2>&1 | tee "$LOGDIR/env.log"
import logging, sys, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("triton", "pytest", "hypothesis", "megatron.core", "deepspeed"):
    try:
        mod = __import__(m)
        print(f"{m} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"{m} missing ({type(e).__name__})")
EOF

if ! "$PY" -c "import ditmoe, ditmoe_kernels" >/dev/null 2>&1; then
    say "installing ditmoe (pip install -e . --no-deps)"
    "$PY" -m pip install -e . --no-deps --no-build-isolation -q >"$LOGDIR/pip.log" 2>&1 \
        || say "pip install failed (see pip.log)"
fi
if ! "$PY" -c "import ditmoe, ditmoe_kernels" >/dev/null 2>&1; then
    SHIM=$(mktemp -d)
    ln -s "$REPO/kernels" "$SHIM/ditmoe_kernels"
    export PYTHONPATH="$SHIM:$REPO/src:${PYTHONPATH:-}"
    say "using a PYTHONPATH shim for ditmoe / ditmoe_kernels"
fi
"$PY" -c "import ditmoe_kernels.triton_ops as o; print('ditmoe_kernels.triton_ops from', o.__file__)" || exit 1

if "$PY" -c "import pytest" >/dev/null 2>&1; then
    say "kernel tests on CUDA (3 shards in parallel, 150 s limit)"
    SHARDS=("routing or permute or grouped_mm" "experts_fp32 or noncontiguous"
        "not (routing or permute or grouped_mm or experts_fp32 or noncontiguous)")
    PIDS=()
    for i in 0 1 2; do
        timeout 150 "$PY" -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider -k "${SHARDS[$i]}" \
            >"$LOGDIR/tests_$i.log" 2>&1 &
        PIDS+=($!)
    done
    for i in 0 1 2; do
        wait "${PIDS[$i]}"
        rc=$?
        say "shard $i ('${SHARDS[$i]}') exit $rc$([ $rc = 124 ] && echo ' (timed out)')"
        grep -E "^(FAILED|ERROR)|passed|failed|error" "$LOGDIR/tests_$i.log" | tail -n 12
    done
else
    say "pytest is not installed: skipping the test suite (the benchmark still checks ours vs reference)"
fi

say "benchmark (190 s limit)"
timeout 190 "$PY" bench/bench_kernels.py --sweep --budget 130 2>&1 | tee "$LOGDIR/bench.log"
say "benchmark exit ${PIPESTATUS[0]}"
if [ -n "${OUT:-}" ]; then
    find bench/results -maxdepth 1 -name '*.json' -newer "$STAMP" -exec cp {} "$OUT/" \;
fi
say "done; logs in $LOGDIR"
