"""Layers x experts utilisation heatmap (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def utilisation_heatmap(fractions_LE: np.ndarray, path: Path, title: str = "Expert utilisation") -> Path:
    """Share of routed tokens per expert (columns) in each layer (rows); 1/E is perfectly balanced."""
    fractions_LE = np.asarray(fractions_LE, dtype=np.float64)
    L, E = fractions_LE.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 + 0.55 * E), 1.2 + 0.45 * L))
    im = ax.imshow(fractions_LE, cmap="viridis", vmin=0.0, vmax=max(2.0 / E, float(fractions_LE.max())), aspect="auto")
    for layer in range(L):
        for e in range(E):
            v = fractions_LE[layer, e]
            ax.text(e, layer, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 1.0 / E else "k")
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
    plt.close(fig)
    return path
