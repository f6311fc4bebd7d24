"""Heatmaps (PNG): layers x experts utilisation, and expert choice by class and by noise level per layer.

Drawn on bare ``Figure`` objects, without pyplot: importing this module leaves the process's matplotlib backend
(a notebook's inline one, say) as it was, and no figure is left open in pyplot's registry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ditmoe.analysis.specialisation import ExpertChoices

MAX_ROWS = 40  # a choice panel with more rows (classes) than this shows only its TOP_ROWS most specialised ones
TOP_ROWS = 20
MAX_INCHES = 40.0  # choice figures' width and height cap: 4400 px at 110 dpi
CMAP = colormaps["magma"].with_extremes(bad="lightgrey")  # rows without tokens are NaN


def utilisation_heatmap(fractions_LE: np.ndarray, path: Path, title: str = "Expert utilisation") -> Path:
    """Share of routed tokens per expert (columns) in each layer (rows); 1/E is perfectly balanced."""
    fractions_LE = np.asarray(fractions_LE, dtype=np.float64)
    L, E = fractions_LE.shape
    fig = Figure(figsize=(max(5.0, 1.6 + 0.55 * E), 1.2 + 0.45 * L))
    ax = fig.subplots()
    im = ax.imshow(fractions_LE, cmap="viridis", vmin=0.0, vmax=max(2.0 / E, float(fractions_LE.max())), aspect="auto")
    for layer in range(L):
        for e in range(E):
            v = fractions_LE[layer, e]
            ax.text(e, layer, f"{v:.2f}", ha="center", va="center", fontsize=7, color=text_colour(im.cmap(im.norm(v))))
    ax.set_xticks(range(E), [str(e) for e in range(E)])
    ax.set_yticks(range(L), [str(i) for i in range(L)])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (balanced = {1.0 / E:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def text_colour(rgba: tuple[float, ...]) -> str:
    """White on a dark cell, black on a light one, judged by the cell colour's luminance (Rec. 709 weights)."""
    r, g, b = rgba[:3]
    return "w" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.5 else "k"


def shown_rows(counts_LXE: np.ndarray) -> np.ndarray:
    """[L, R] the rows each layer's panel shows: all X in order when X <= MAX_ROWS, else the TOP_ROWS rows that lean
    hardest on one expert (highest lift over any expert, see ``ExpertChoices.lift``), most specialised first."""
    L, X, _ = counts_LXE.shape
    if X <= MAX_ROWS:
        return np.broadcast_to(np.arange(X), (L, X))
    return np.argsort(-ExpertChoices.lift(counts_LXE).max(-1), axis=1, kind="stable")[:, :TOP_ROWS]


def choice_heatmaps(counts_LXE: np.ndarray, path: Path, *, row_label: str, row_names: list[str], title: str) -> Path:
    """One panel per layer: the share of each row's (class's, noise level's) routed choices per expert, on one
    colour scale; a column brighter than the rest of its panel is an expert that row leans on. Rows without tokens
    (classes with no images) are grey and named in the title.

    Up to MAX_ROWS rows every panel shows them all, in order (the 10 digits, the noise levels). Above that (1000
    ImageNet classes) each panel shows only its layer's TOP_ROWS most specialised rows, labelled, most specialised
    first, and the title says so; ``ditmoe analyze`` keeps the full table in expert_choices.json. The figure is at
    most MAX_INCHES a side whatever the layers and experts.
    """
    counts_LXE = np.asarray(counts_LXE)
    L, X, E = counts_LXE.shape
    shares_LXE = ExpertChoices.shares(counts_LXE)
    vmax = max(2.0 / E, float(shares_LXE.max()))
    shares_LXE[counts_LXE.sum(-1) == 0] = np.nan  # no tokens (no images of a class): grey, not "no expert"
    empty = [row_names[r] for r in np.flatnonzero(counts_LXE.sum((0, 2)) == 0)]
    rows_LR = shown_rows(counts_LXE)
    R = rows_LR.shape[1]
    cols = min(L, 4)
    rows = -(-L // cols)
    size = (1.2 + cols * (1.2 + 0.3 * E), 0.6 + rows * (0.9 + 0.22 * R))
    fig = Figure(figsize=tuple(min(inches, MAX_INCHES) for inches in size), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=R == X)  # top rows differ from layer to layer
    step = max(1, R // 12)  # at most ~12 row labels per panel
    for layer, ax in enumerate(axes.flat):
        if layer >= L:
            ax.axis("off")
            continue
        shown = rows_LR[layer]
        im = ax.imshow(shares_LXE[layer, shown], cmap=CMAP, vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6)
        ax.set_yticks(range(0, R, step), [row_names[r] for r in shown[::step]], fontsize=6)
        if layer % cols == 0:
            ax.set_ylabel(row_label if R == X else f"{row_label} (top {R} by lift)", fontsize=7)
        if layer >= L - cols:
            ax.set_xlabel("expert", fontsize=7)
    heading = f"{title} (balanced = {1.0 / E:.2f})"
    if R < X:
        heading += (
            f"\nper layer only the {R} of {X} {row_label} rows that lean hardest on one expert: highest lift, "
            "the row's share over the layer's share for that expert"
        )
    if empty:
        heading += f"\ngrey: no tokens from {row_label} {listed(empty)}"
    fig.suptitle(heading, fontsize=9)
    fig.colorbar(im, ax=axes, label="share of routed tokens", shrink=0.8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def expert_choice_heatmaps(choices: ExpertChoices, out_dir: Path) -> tuple[Path, Path]:
    """``experts_by_class.png`` and ``experts_by_noise_level.png`` in ``out_dir``."""
    edges = choices.level_edges
    by_class = choice_heatmaps(
        choices.by_class_LCE,
        Path(out_dir) / "experts_by_class.png",
        row_label="class",
        row_names=[str(c) for c in range(choices.by_class_LCE.shape[1])],
        title="Expert choice by class",
    )
    by_level = choice_heatmaps(
        choices.by_level_LBE,
        Path(out_dir) / "experts_by_noise_level.png",
        row_label="noise level",
        row_names=level_names(edges),
        title="Expert choice by noise level (0 clean, 1 noise)",
    )
    return by_class, by_level


def listed(names: list[str], most: int = 10) -> str:
    """ "a, b, c", or the first ``most`` names and how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def level_names(edges: np.ndarray) -> list[str]:
    """ "lo-hi" per noise-level bucket between ``edges``, with the fewest decimals (1 to 4) that write every edge
    exactly (0.1 for 10 buckets, 0.05 for 20, 0.125 for 8), else 3 (or more, to tell a thousand buckets apart)."""
    edges = np.asarray(edges, dtype=np.float64)
    exact = (d for d in range(1, 5) if np.allclose(np.round(edges, d), edges, rtol=0.0, atol=1e-9))
    decimals = next(exact, max(3, int(np.ceil(np.log10(max(len(edges) - 1, 1))))))
    return [f"{lo:.{decimals}f}-{hi:.{decimals}f}" for lo, hi in zip(edges, edges[1:], strict=False)]
