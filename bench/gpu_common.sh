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
# Carried wheels (.whl/*.whl) for what the GPU image lacks, installed into a scratch folder there (it has no network):
# megatron-core (peer rows, tests/test_peers.py); DeepSpeed and the needs of it the image lacks: hjson, pydantic,
# pydantic-core, annotated-types, typing-inspection (AutoEP peer rows and tests); webdataset and braceexpand (the
# training modules, which the host-read tests import). Here, once, then carry .whl:
#   python3 -m pip download --no-deps -d .whl megatron-core==0.16.1 webdataset braceexpand hjson pydantic==2.14.4 \
#       annotated-types typing-inspection
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic-core==2.50.5                    # compiled: the host's Python
#   DS_BUILD_OPS=0 .venv/bin/python -m pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # an sdist
MISSING=()
for w in "$REPO"/.whl/*.whl; do
    [ -f "$w" ] || continue
    pkg=$(basename "$w")
    pkg=${pkg%%-*}
    "$PY" -c "import ${pkg/megatron_core/megatron.core}" >/dev/null 2>&1 || MISSING+=("$w")
done
if [ ${#MISSING[@]} -gt 0 ]; then
    SITE=$(mktemp -d)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${MISSING[@]}"; then
        export PYTHONPATH="$SITE:${PYTHONPATH:-}"
        say "installed ${#MISSING[@]} carried wheels into $SITE"
    else
        say "the carried wheels did not install: their peers and tests skip"
    fi
fi

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
    # tests/test_peers.py needs DeepSpeed and megatron-core; tests/test_host_reads.py trains a step, and the training
    # modules import webdataset (carry their wheels, see above)
    if "$PY" -c "import deepspeed, megatron.core" >/dev/null 2>&1; then
        files+=(tests/test_peers.py)
    else
        say "DeepSpeed or megatron-core is not importable: skipping tests/test_peers.py (carry their wheels, see above)"
    fi
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
