"""Expert specialisation: which experts each class and each noise level is routed to, layer by layer.

Shape suffixes: N images, L MoE layers, C classes, B noise-level buckets, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ditmoe.diffusion import Diffusion


@dataclass
class ExpertChoices:
    """Routed (token, slot) choices counted per layer and expert, split by class and by noise-level bucket."""

    by_class_LCE: np.ndarray  # int64: choices of class c's tokens for expert e
    by_level_LBE: np.ndarray  # int64: choices at noise levels in bucket b for expert e
    level_edges: np.ndarray  # [B + 1] bucket boundaries in [0, 1] (0 clean, 1 pure noise)
    images: int  # held-out images, each noised once per bucket

    @staticmethod
    def shares(counts_LXE: np.ndarray) -> np.ndarray:
        """Counts -> each row's share per expert (rows without tokens stay 0)."""
        counts = counts_LXE.astype(np.float64)
        return counts / np.maximum(counts.sum(-1, keepdims=True), 1)

    @staticmethod
    def lift(counts_LXE: np.ndarray) -> np.ndarray:
        """[L, X, E] each row's share per expert over the layer's share for that expert (all rows together): above
        1 the row picks the expert more often than its layer does; rows without tokens are 0."""
        overall_LE = ExpertChoices.shares(counts_LXE.sum(1))
        return ExpertChoices.shares(counts_LXE) / np.maximum(overall_LE[:, None, :], 1e-12)

    def classes_without_images(self) -> list[int]:
        """Classes none of the routed images belong to (their rows of ``by_class_LCE`` are 0)."""
        return [int(c) for c in np.flatnonzero(self.by_class_LCE.sum((0, 2)) == 0)]

    def most_specialised(self) -> list[tuple[int, int, float, float]]:
        """Per layer (class, expert, share, layer-average share) of the class that leans hardest on one expert,
        measured against how often the layer as a whole picks that expert (the highest lift)."""
        by_class = self.shares(self.by_class_LCE)
        overall = self.shares(self.by_class_LCE.sum(1))  # [L, E]
        lift = self.lift(self.by_class_LCE)
        out = []
        for layer in range(by_class.shape[0]):
            c, e = np.unravel_index(int(np.argmax(lift[layer])), lift[layer].shape)
            out.append((int(c), int(e), float(by_class[layer, c, e]), float(overall[layer, e])))
        return out

    def to_json(self) -> dict:
        return {
            "images": self.images,
            "level_edges": self.level_edges.tolist(),
            "by_class_LCE": self.by_class_LCE.tolist(),
            "by_level_LBE": self.by_level_LBE.tolist(),
        }


@torch.no_grad()
def count_expert_choices(
    model,
    diffusion: Diffusion,
    x_NCHW: torch.Tensor,
    y_N: torch.Tensor,
    *,
    level_buckets: int = 10,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> ExpertChoices:
    """Route every image through ``model`` once per noise-level bucket (a level drawn uniformly inside it) and count
    the experts its tokens choose in every MoE layer."""
    if level_buckets < 1:
        raise ValueError(f"level_buckets must be at least 1, got {level_buckets}")
    if len(x_NCHW) != len(y_N) or len(x_NCHW) == 0:
        raise ValueError(f"need matching, non-empty images and labels, got {len(x_NCHW)} and {len(y_N)}")
    cfg = model.cfg
    C, E = cfg.num_classes, cfg.moe.num_experts
    bad = sorted({int(c) for c in y_N.unique() if not 0 <= c < C})
    if bad:
        raise ValueError(f"label(s) {bad} out of range for a model with {C} classes")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    edges = np.linspace(0.0, 1.0, level_buckets + 1)
    by_class = torch.zeros(cfg.depth, C, E, dtype=torch.int64)  # one MoE layer per block
    by_level = torch.zeros(cfg.depth, level_buckets, E, dtype=torch.int64)
    batches = [(s, min(s + batch_size, len(x_NCHW))) for s in range(0, len(x_NCHW), batch_size)]
    with tqdm(total=len(batches) * level_buckets, disable=not progress, desc="routing", unit="batch") as bar:
        for start, stop in batches:
            x0, y = x_NCHW[start:stop], y_N[start:stop]
            for b in range(level_buckets):
                level = edges[b] + (edges[b + 1] - edges[b]) * torch.rand(len(x0), generator=gen, dtype=torch.float64)
                x_t, t_model = diffusion.noised(x0, level.float(), generator=gen)
                routing = model(x_t.to(dev), t_model.to(dev), y.to(dev)).routing
                # [L, N, E]: how many of each image's (token, slot) choices went to each expert
                per_image = torch.stack(
                    [torch.nn.functional.one_hot(r.experts_BLK.flatten(1), E).sum(1).cpu() for r in routing]
                )
                by_class.index_add_(1, y, per_image)
                by_level[:, b] += per_image.sum(1)
                bar.update()
    return ExpertChoices(by_class.numpy(), by_level.numpy(), edges, len(x_NCHW))
