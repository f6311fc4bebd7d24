"""The performance bar (``/work/shared/notes/kernels.md``) judged on ``bench_kernels.py``'s rows: ours against the
dense GEMM or copy baseline per op, and the whole layer's slowdown when one expert gets twice the average load."""

from __future__ import annotations

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

LAYER = "layer fwd+bwd"


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
