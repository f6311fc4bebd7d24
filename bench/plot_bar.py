"""Plot the performance bar from a ``bench_kernels.py`` result: per shape, each op's ours / baseline (a bar, green
where it meets the project's bar, red where not), the bar itself (a black tick) and, where the row has one, ours
against the baseline plus the op's extra traffic at copy bandwidth (a circle: the bound without overlap).

    python bench/plot_bar.py bench/results/nvidia-h200-2026-11-27-run6/results.json   # -> results-bar.png beside it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # bar.py, beside this script, also when imported by tests
from bar import BAR, SKEW_BAR, judged, layer_speedups, ratio_text, skew_slowdowns  # noqa: E402


def load(path: Path) -> dict:
    """A result file of ``bench_kernels.py`` ({meta, rows, skipped}); ValueError naming what is wrong."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not isinstance(result, dict) or not isinstance(result.get("rows"), list):
        raise ValueError(f"{path}: not a bench_kernels.py result (no list of rows)")
    for i, row in enumerate(result["rows"]):  # each one made by bench_kernels.py's record()
        if missing := [key for key in ("shape", "op", "impl", "ms") if not isinstance(row, dict) or key not in row]:
            raise ValueError(f"{path}: rows[{i}] is not a bench_kernels.py row (no {', '.join(missing)}): {row!r:.200}")
    return result


PEER_NAMES = {"naive (official loop)": "loop", "megatron permute+_grouped_mm": "mcore"}  # short, for panel titles


def plot(result: dict, out: Path, title: str) -> list[dict]:
    """Draw the bar chart of ``result`` into ``out``; returns the judged rows (``bar.judged``)."""
    rows = judged(result["rows"])
    if not rows:
        raise ValueError("no rows of ours against a baseline: a CPU run has none (the bar is judged on a GPU)")
    shapes = list(dict.fromkeys(j["shape"] for j in rows))
    ops = [op for op in BAR if any(j["op"] == op for j in rows)]
    skew = skew_slowdowns(result["rows"])
    speedups = layer_speedups(result["rows"])
    fig, axes = plt.subplots(
        1, len(shapes), figsize=(1.6 + 2.6 * len(shapes), 1.4 + 0.38 * len(ops)), sharey=True, squeeze=False
    )
    for ax, shape in zip(axes[0], shapes, strict=True):
        for j in (j for j in rows if j["shape"] == shape):
            i = ops.index(j["op"])
            ax.barh(i, j["ratio"], height=0.62, color="tab:green" if j["ok"] else "tab:red", alpha=0.8)
            ax.plot([j["bar"], j["bar"]], [i - 0.42, i + 0.42], color="black", lw=1.6)
            if "ratio_epilogue" in j:
                ax.plot(j["ratio_epilogue"], i, marker="o", ms=5, mfc="none", mec="black", ls="none")
            ax.text(0.02, i, ratio_text(j), va="center", fontsize=7, color="white", weight="bold")
        ax.axvline(1.0, color="grey", ls=":", lw=1)
        ax.set_xlim(0, 1.25)
        heading = shape
        if shape in skew:
            heading += f"\nlayer {skew[shape]:+.1%} vs balanced (bar {SKEW_BAR:+.0%})"
        against = [
            f"{j['speedup']:.2f}x {PEER_NAMES[j['peer']]}{'' if j['ok'] else ' NO'}"
            for j in speedups
            if j["shape"] == shape
        ]
        if against:
            heading += "\nlayer: " + ", ".join(against)
        ax.set_title(heading, fontsize=9)
        ax.set_xlabel("ours / baseline", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(ops)), ops)
    axes[0][0].invert_yaxis()
    legend = [
        Patch(color="tab:green", alpha=0.8, label="meets the bar"),
        Patch(color="tab:red", alpha=0.8, label="below the bar"),
        Line2D([], [], color="black", lw=1.6, label="bar"),
        Line2D([], [], marker="o", mfc="none", mec="black", ls="none", label="vs baseline + extra bytes"),
    ]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"{title}: GEMMs vs one dense GEMM of the same FLOPs, permutes vs copy bandwidth", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a JSON result of bench/bench_kernels.py")
    ap.add_argument(
        "--out", type=Path, help="the PNG to write (default: <results>-bar.png beside the results); its folder is made"
    )
    args = ap.parse_args(argv)
    try:
        result = load(args.results)
        out = args.out or args.results.with_name(f"{args.results.stem}-bar.png")
        title = f"{result.get('meta', {}).get('device', 'unknown device')} ({args.results.parent.name})"
        rows = plot(result, out, title)
    except (ValueError, OSError) as exc:  # OSError: the PNG could not be written
        sys.exit(f"plot_bar.py: {exc}")
    misses = [j for j in rows if not j["ok"]]
    print(f"{len(rows) - len(misses)} of {len(rows)} rows meet the bar; below it:")
    for j in misses:
        print(f"  {j['shape']:8s} {j['op']:18s} {ratio_text(j)} (bar {j['bar']:.2f})")
    for j in layer_speedups(result["rows"]):
        verdict = f"{'meets' if j['ok'] else 'is below'} the bar, x{j['bar']:g}"
        print(f"  {j['shape']:8s} layer fwd+bwd {j['speedup']:.2f}x the speed of {j['peer']}: {verdict}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
