"""The kernel benchmark's tuning path: how the sweep picks the tiles to adopt, and ``--write-tiles`` end to end on
CPU (the interpreter times nothing meaningful, so this checks the path, not the choice of a GPU run); the bar plot;
and the bench scripts' refusal of bad arguments before any work."""

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ditmoe_kernels.tiles import load_tiles

REPO = Path(__file__).parents[1]


def _from_bench(module: str):
    """A helper module of ``bench/`` (the scripts' folder, on their path when they run)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))


@pytest.fixture(scope="module")
def adopted():
    return _from_bench("sweep_candidates").adopted


def test_the_fastest_variant_with_the_same_bits_is_adopted(adopted):
    a, b = {"ew": {"BR": 8}}, {"rows": {"BT": 8}}
    assert adopted(2.0, {"winners": (a, 1.5, 0.0), "winner rows": (b, 1.8, 0.0)}) == ("winners", a)
    assert adopted(2.0, {"winners": (a, 1.5, 1e-3), "winner rows": (b, 1.8, 0.0)}) == ("winner rows", b)


def test_nothing_is_adopted_unless_it_beats_the_tiles_in_use(adopted):
    assert adopted(1.0, {"winners": ({"ew": {"BR": 8}}, 1.2, 0.0)}) == ("tiles now", {})
    assert adopted(1.0, {"winners": ({"ew": {"BR": 8}}, 0.5, 2e-2)}) == ("tiles now", {})  # faster, other bits
    assert adopted(1.0, {}) == ("tiles now", {})


def _layer(shape: str, impl: str, ms: float) -> dict:
    return {"shape": shape, "op": "layer fwd+bwd", "impl": impl, "ms": ms}


def test_the_skewed_layer_is_judged_against_the_balanced_one_under_the_tiles_in_use():
    """Re-times under other tiles come after the plain rows (run 6 printed +11.3% from two of them: the skewed
    layer under old tiles against the balanced one under a sweep winner; the tiles in use gave +1.1%)."""
    rows = [
        _layer("XL", "triton", 2.0),
        _layer("XL", "reference", 6.0),
        _layer("XL", "triton (sweep winner rows)", 1.6),
        _layer("XL-skew", "triton", 2.1),
        _layer("XL-skew", "triton (bench/tiles/run3-bf16.json)", 3.0),
        _layer("G", "triton", 4.0),
        _layer("G-skew", "reference", 9.0),  # no triton row: nothing to judge
        {"shape": "XL-skew", "op": "permute", "impl": "triton", "ms": 0.1},
    ]
    assert _from_bench("bar").skew_slowdowns(rows) == pytest.approx({"XL-skew": 0.05})


def test_the_layer_is_judged_against_the_loop_and_megatron_on_the_median_of_its_times():
    """Run 6 at S: the layer timed alone (1.57 ms) beat megatron's 1.97, the interleaved rounds of the same tiles
    (2.36, 2.06) did not; the median of the three decides. The official loop must be 3x slower."""
    rows = [
        _layer("S", "triton", 1.5744),
        _layer("S", "naive (official loop)", 11.5228),
        _layer("S", "megatron permute+_grouped_mm", 1.9746),
        _layer("S", "triton (tiles now)", 2.3642),
        _layer("S", "triton (bench/tiles/run3-bf16.json)", 1.7376),  # other tiles: not ours as run
        _layer("S", "triton (tiles now)", 2.0626),
        _layer("XL", "triton", 2.7195),
        _layer("XL", "naive (official loop)", 7.0),
        _layer("XL", "reference", 5.9372),  # no bar against the reference
    ]
    got = {(j["shape"], j["peer"]): (round(j["speedup"], 3), j["ok"]) for j in _from_bench("bar").layer_speedups(rows)}
    assert got == {
        ("S", "naive (official loop)"): (5.587, True),
        ("S", "megatron permute+_grouped_mm"): (0.957, False),
        ("XL", "naive (official loop)"): (2.574, False),
    }


def test_a_ratio_that_two_decimals_round_onto_its_bar_gets_three():
    ratio_text = _from_bench("bar").ratio_text
    assert ratio_text({"ratio": 0.7964, "bar": 0.8, "ok": False}) == "0.796"
    assert ratio_text({"ratio": 0.8012, "bar": 0.8, "ok": True}) == "0.80"
    assert ratio_text({"ratio": 0.7712, "bar": 0.9, "ok": False}) == "0.77"


def test_sweep_writes_a_tile_file_that_training_reads(tmp_path):
    """CPU: the tiny benchmark (with the rows of every peer that runs here), a sweep of the row kernels' tiles, the
    layer re-timed under any winner, and the adopted tiles written as JSON that ``load_tiles`` (``ditmoe train
    --kernel-tiles``) accepts."""
    out = tmp_path / "tiles.json"
    cmd = [sys.executable, "-W", "ignore", str(REPO / "bench" / "bench_kernels.py"), "--shapes", "tiny", "--sweep"]
    cmd += ["--sweep-kinds", "rows", "--write-tiles", str(out), "--out", str(tmp_path / "results")]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| shape | op | impl | ms |" in proc.stdout  # the markdown table
    peers = ["naive (official loop)", "megatron-core", "deepspeed group_gemm_triton", "deepspeed AutoEP (Triton"]
    for impl in peers:
        assert f"| {impl}" in proc.stdout, impl
    assert "skipped deepspeed AutoEP fused restore: CUDA only" in proc.stdout  # said, not silently left out
    assert len(list((tmp_path / "results").glob("*.json"))) == 1
    said = re.search(rf"wrote {re.escape(str(out))} \((.+?) at .*\): (\{{.*\}}) \(interpreter", proc.stdout)
    assert said, proc.stdout[-3000:]
    written = load_tiles(str(out))
    assert json.loads(said.group(2)) == written
    assert written["table"] == "interpret"  # the interpreter's launches read their own table
    if said.group(1) == "tiles now":  # nothing beat the tiles in use on the layer here
        assert set(written) == {"table"}
    else:  # a rows candidate that did
        assert said.group(1) == "sweep winners" and set(written) == {"table", "rows"}


def _row(shape: str, op: str, ratio: float, **extra) -> dict:
    return {"shape": shape, "op": op, "impl": "triton", "ms": 1.0, "vs_baseline": ratio, **extra}


def test_the_bar_plot_draws_a_result_and_lists_what_misses(tmp_path):
    """plot_bar.py on a small result: a PNG, and the rows below the bar named with their ratio (three decimals where
    two would round onto the bar)."""
    rows = [
        _row("XL", "gate/up fwd", 0.77, vs_baseline_plus_epilogue=0.87),
        _row("XL", "down fwd", 0.89),
        _row("G", "down dW", 0.7964),
        _row("G", "permute", 0.92),
        {"shape": "G", "op": "down dW", "impl": "dense torch.mm", "ms": 0.5},  # a baseline: not judged
        _layer("XL", "triton", 2.0),
        _layer("XL-skew", "triton", 2.3),
    ]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {"device": "NVIDIA H200"}, "rows": rows, "skipped": []}))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "plot_bar.py"), str(results)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "results-bar.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = proc.stdout.splitlines()
    assert lines[0] == "2 of 4 rows meet the bar; below it:"
    assert [line.split() for line in lines[1:3]] == [
        ["XL", "gate/up", "fwd", "0.77", "(bar", "0.90)"],
        ["G", "down", "dW", "0.796", "(bar", "0.80)"],
    ]


def test_the_bar_plot_refuses_a_result_without_rows(tmp_path):
    bad = tmp_path / "cpu.json"
    bad.write_text(json.dumps({"meta": {}, "rows": [{"shape": "tiny", "op": "permute", "impl": "reference", "ms": 1}]}))
    cmd = [sys.executable, str(REPO / "bench" / "plot_bar.py"), str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode != 0 and "no rows of ours against a baseline" in proc.stderr
    assert not list(tmp_path.glob("*.png"))


def test_the_bar_plot_makes_the_folder_of_out(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"meta": {}, "rows": [_row("XL", "down fwd", 0.9)]}))
    png = tmp_path / "new" / "folder" / "bar.png"
    cmd = [sys.executable, str(REPO / "bench" / "plot_bar.py"), str(results), "--out", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_bar_plot_names_a_row_that_is_not_a_bench_kernels_row(tmp_path):
    """Every row bench_kernels.py writes has a shape, op, impl and ms (e.g. not bench_train.py's rows)."""
    bad = tmp_path / "results.json"
    rows = [_row("XL", "down fwd", 0.9), {"shape": "XL", "op": "down fwd", "ms": 1.0}]
    bad.write_text(json.dumps({"meta": {}, "rows": rows}))
    cmd = [sys.executable, str(REPO / "bench" / "plot_bar.py"), str(bad)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"plot_bar.py: {bad}: rows[1] is not a bench_kernels.py row (no impl)" in proc.stderr, proc.stderr
    assert not list(tmp_path.glob("*.png"))


# the scripts that write results (into --out)
WRITERS = {"bench_kernels.py", "bench_moe_cpu.py", "bench_train.py", "bench_ep_cpu.py", "bench_loader.py"}
REFUSED = [  # (script, arguments, the error's words): refused with a usage line before any work
    ("bench_kernels.py", ["--shapes", "S,bogus,XXL"], "--shapes: unknown ['XXL', 'bogus']"),
    ("bench_kernels.py", ["--reps", "0"], "--reps must be at least 1, got 0"),
    ("bench_kernels.py", ["--warmup", "-1"], "--warmup must be at least 0, got -1"),
    ("bench_kernels.py", ["--sweep", "--sweep-kinds", "rows,bogus"], "--sweep-kinds: unknown ['bogus']"),
    ("bench_moe_cpu.py", ["--iters", "0"], "--iters must be at least 1, got 0"),
    ("bench_moe_cpu.py", ["--tokens", "0"], "--tokens must be at least 1, got 0"),
    ("bench_train.py", ["--iters", "0"], "--iters must be at least 1, got 0"),
    ("bench_train.py", ["--models", "DiT-MoE-micro/4-4E2A", "--batch", "4,8"], "'4,8': 2 values for 1 models"),
    ("bench_train.py", ["--batch", "0"], "--batch: images per step must be at least 1, got '0'"),
    ("bench_train.py", ["--models", "DiT-MoE-micro/4-4E2A,bogus"], "--models bogus at 16px: unknown model preset"),
    ("bench_ep_cpu.py", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("bench_ep_cpu.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("bench_ep_cpu.py", ["--train-steps", "20"], "--train-steps 20: must exceed --train-window 20"),
    ("bench_loader.py", ["--images", "0"], "--images must be at least 1, got 0"),
    ("bench_loader.py", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("bench_host.py", ["--steps", "0"], "--steps must be at least 1, got 0"),
    ("bench_host.py", ["--batch", "0"], "--batch must be at least 1, got 0"),
    ("bench_host.py", ["--model", "bogus"], "--model: unknown model preset 'bogus'"),
    ("bench_issue.py", ["--reps", "0"], "--reps must be at least 1, got 0"),
    ("bench_issue.py", ["--tokens", "0"], "--tokens must be at least 1, got 0"),
    ("bench_issue.py", ["--tiles", "/nonexistent/tiles.json"], "--tiles '/nonexistent/tiles.json'"),
    ("bench_kernels.py", ["--shapes", "tiny,G", "--top-k", "9"], "--top-k 9 is more than the 8 experts of tiny"),
    ("bench_kernels.py", ["--budget", "0"], "--budget must be more than 0 seconds, got 0.0"),
    # --ops bogus: without the count checks, the layer recorded (not compiled) and an error of its own
    ("inspect_kernels.py", ["--top-k", "0", "--ops", "bogus"], "--top-k must be at least 1, got 0"),
    ("inspect_kernels.py", ["--tokens", "0", "--ops", "bogus"], "--tokens must be at least 1, got 0"),
    ("inspect_kernels.py", ["--set", "gmm.GROUP_M=0"], "--set 'gmm.GROUP_M=0': gmm.GROUP_M must be >= 1, got 0"),
]


@pytest.mark.parametrize(("script", "argv", "said"), REFUSED, ids=[f"{s} {' '.join(a)}" for s, a, _ in REFUSED])
def test_bad_arguments_are_refused_before_any_work(tmp_path, script, argv, said):
    out = tmp_path / "out"
    argv = [*argv, "--out", str(out)] if script in WRITERS else argv
    cmd = [sys.executable, "-W", "ignore", str(REPO / "bench" / script), *argv]
    # no interpreter (conftest sets it): on CPU a script that missed its check then runs no Triton kernels, and
    # bench_issue.py stops at once
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "usage:" in proc.stderr and said in proc.stderr, proc.stderr
    assert not out.exists()


def test_the_cpu_moe_benchmark_writes_into_out(tmp_path):
    cmd = [sys.executable, "-W", "ignore", str(REPO / "bench" / "bench_moe_cpu.py"), "--iters", "1", "--tokens", "16"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [written] = tmp_path.glob("cpu-moe-*.json")
    assert [r["variant"] for r in json.loads(written.read_text())["results"]] == ["naive", "ours"]
    assert f"wrote {written}" in proc.stdout
