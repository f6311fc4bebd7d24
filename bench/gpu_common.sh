# Sourced by bench/gpu_check.sh and bench/gpu_final.sh (GPU machines): the shared set-up and helpers.
#   NAME    the calling script's name, for log lines
# After sourcing: REPO, PY, LOGDIR (= $OUT when set, else bench/results), say, run_test_shards, collect_results.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
START=$(date +%s)
say() { echo "[$NAME $(($(date +%s) - START))s] $*"; }
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOGDIR=${OUT:-$REPO/bench/results}
mkdir -p "$LOGDIR"
unset TRITON_INTERPRET
STAMP=$(mktemp)

# ditmoe / ditmoe_kernels without installing: a PYTHONPATH shim (the package layout maps kernels/ -> ditmoe_kernels)
if ! "$PY" -c "import ditmoe, ditmoe_kernels" >/dev/null 2>&1; then
    SHIM=$(mktemp -d)
    ln -s "$REPO/kernels" "$SHIM/ditmoe_kernels"
    export PYTHONPATH="$SHIM:$REPO/src:${PYTHONPATH:-}"
    say "using a PYTHONPATH shim for ditmoe / ditmoe_kernels"
fi
# Carried wheels (.whl/*.whl: megatron-core for the peer rows, webdataset and braceexpand for the training modules
# that the host-read tests import) go on PYTHONPATH where the package is not installed: their pure-python parts
# import from the archive. The GPU hosts have no network to install them.
#   pip download --no-deps -d .whl megatron-core==0.16.1 webdataset braceexpand     # here, once; then carry .whl
for w in "$REPO"/.whl/*.whl; do
    [ -f "$w" ] || continue
    pkg=$(basename "$w")
    pkg=${pkg%%-*}
    "$PY" -c "import ${pkg/megatron_core/megatron.core}" >/dev/null 2>&1 || export PYTHONPATH="$w:${PYTHONPATH:-}"
done

say "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
timeout 30 "$PY" - <<'PYEOF' 2>&1 | tee "$LOGDIR/env.log"
import logging, sys, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for m in ("triton", "pytest", "hypothesis", "megatron.core", "deepspeed", "webdataset"):
    try:
        mod = __import__(m)
        print(f"{m} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"{m} missing ({type(e).__name__})")
PYEOF
"$PY" -c "import ditmoe_kernels.triton_ops as o; print('ditmoe_kernels.triton_ops from', o.__file__)" || exit 1

# run_test_shards SECONDS "k-expr" ...: CUDA kernel tests, one shard per -k expression, in parallel (Triton compiles
# overlap), each capped at SECONDS. SHARD_RC["k-expr"] holds each shard's exit status (none when pytest is missing).
declare -A SHARD_RC
run_test_shards() {
    local limit=$1
    shift
    if ! "$PY" -c "import pytest" >/dev/null 2>&1; then
        say "pytest is not installed: skipping the tests (the benchmark still checks ours vs reference)"
        return
    fi
    say "kernel tests on CUDA ($# shards in parallel, $limit s limit)"
    # The device tool brings back at most 8 files: the shards log to a scratch folder, then into one tests.log.
    local shards=("$@") pids=() i rc scratch files=(tests/test_kernels.py)
    # tests/test_host_reads.py trains a step: the training modules import webdataset (carry its wheel, see above)
    if "$PY" -c "import webdataset" >/dev/null 2>&1; then
        files+=(tests/test_host_reads.py)
    else
        say "webdataset is not importable: skipping tests/test_host_reads.py (carry its wheel, see above)"
    fi
    scratch=$(mktemp -d)
    for i in "${!shards[@]}"; do
        timeout "$limit" "$PY" -m pytest "${files[@]}" -q -rs -p no:cacheprovider \
            -k "${shards[$i]}" \
            >"$scratch/$i.log" 2>&1 &
        pids+=($!)
    done
    for i in "${!shards[@]}"; do
        wait "${pids[$i]}"
        rc=$?
        SHARD_RC["${shards[$i]}"]=$rc
        say "shard $i ('${shards[$i]}') exit $rc$([ $rc = 124 ] && echo ' (timed out)')"
        grep -E "^(FAILED|ERROR)|passed|failed|error" "$scratch/$i.log" | tail -n 8
        { echo "=== shard $i: -k '${shards[$i]}' (exit $rc)"; cat "$scratch/$i.log"; } >>"$LOGDIR/tests.log"
    done
    rm -rf "$scratch"
}

# collect_results: copy the JSON results written during this run into $OUT (what the device tool brings back).
collect_results() {
    if [ -n "${OUT:-}" ]; then
        find bench/results -maxdepth 1 -name '*.json' -newer "$STAMP" -exec cp {} "$OUT/" \;
    fi
    rm -f "$STAMP"
    say "done; logs in $LOGDIR"
}
