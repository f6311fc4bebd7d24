"""The performance bar (``/work/shared/notes/kernels.md``) judged on ``bench_kernels.py``'s rows: ours against the
dense GEMM or copy baseline per op, the whole layer against the official loop and megatron-core's path, and the
layer's slowdown when one expert gets twice the average load."""

from __future__ import annotations

import statistics

# op: the least ours / baseline that meets the bar (GEMMs against one dense GEMM of the same FLOPs, permutes
# against device-to-device copy bandwidth)
BAR = {
    "gate/up fwd": 0.9,
    "down fwd": 0.85,
    "down dX": 0.85,
    "down dX: dH part": 0.85,
    "gate/up dX": 0.85,
    "down dW": 0.8,
    "gate/up dW": 0.8,
    "permute": 0.8,
    "unpermute": 0.8,
}
SKEW_BAR = 0.10  # the layer under the skewed load: at most 10% slower than under the balanced one
# peer layer fwd+bwd: how many times faster ours must be (at least 3x the official loop, faster than megatron)
LAYER_BAR = {"naive (official loop)": 3.0, "megatron permute+_grouped_mm": 1.0}

LAYER = "layer fwd+bwd"
OURS = ("triton", "triton (tiles now)")  # the tiles in use: timed alone, then in rounds interleaved with others


def judged(rows: list[dict]) -> list[dict]:
    """Our rows that the bar applies to, in order: {shape, op, impl, ratio (ours / baseline), bar, ok, and
    ratio_epilogue (against the baseline plus the extra traffic at copy bandwidth) where the row has one}."""
    out = []
    for r in rows:
        if r["impl"].startswith("triton") and r["op"] in BAR and "vs_baseline" in r:
            j = {"shape": r["shape"], "op": r["op"], "impl": r["impl"], "ratio": r["vs_baseline"], "bar": BAR[r["op"]]}
            j["ok"] = j["ratio"] >= j["bar"]
            if "vs_baseline_plus_epilogue" in r:
                j["ratio_epilogue"] = r["vs_baseline_plus_epilogue"]
            out.append(j)
    return out


def skew_slowdowns(rows: list[dict]) -> dict[str, float]:
    """{skewed shape: its layer time / the balanced shape's - 1}, both from the rows of impl "triton" (the tiles in
    use), not the re-times under other tiles ("triton (...)"), which come later and would stand in for them."""
    ms = {r["shape"]: r["ms"] for r in rows if r["op"] == LAYER and r["impl"] == "triton"}
    return {
        shape: ms[shape] / ms[shape.split("-")[0]] - 1
        for shape in ms
        if shape.endswith("-skew") and shape.split("-")[0] in ms
    }


def layer_speedups(rows: list[dict]) -> list[dict]:
    """Per shape and peer of ``LAYER_BAR``: {shape, peer, speedup (peer ms / ours), bar, ok}. Ours is the median of
    every time of the tiles in use (alone and in the interleaved rounds): where the host sets the pace (S) one
    timing alone can land far from the others."""
    ours: dict[str, list[float]] = {}
    peers: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["op"] == LAYER and r["impl"] in OURS:
            ours.setdefault(r["shape"], []).append(r["ms"])
        elif r["op"] == LAYER and r["impl"] in LAYER_BAR:
            peers[(r["shape"], r["impl"])] = r["ms"]
    speedups = [
        (shape, peer, ms / statistics.median(ours[shape])) for (shape, peer), ms in peers.items() if shape in ours
    ]
    return [
        {"shape": shape, "peer": peer, "speedup": x, "bar": LAYER_BAR[peer], "ok": x >= LAYER_BAR[peer]}
        for shape, peer, x in speedups
    ]


def ratio_text(j: dict) -> str:
    """A ratio to two decimals, or three where two would round it onto its bar (0.797 against 0.80)."""
    return f"{j['ratio']:.3f}" if round(j["ratio"], 2) == j["bar"] and not j["ok"] else f"{j['ratio']:.2f}"
