"""Routing statistics summed over training steps, as loggable numbers."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ditmoe.models.moe import RoutingStats


class RoutingAccumulator:
    """Sums per-layer routing statistics over several steps; ``summary`` turns them into loggable numbers."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._tokens_LE: torch.Tensor | None = None
        self._entropy_L: torch.Tensor | None = None
        self._dropped = None
        self._steps = 0

    def add(self, routing: list[RoutingStats]) -> None:
        tokens = torch.stack([r.tokens_per_expert_E for r in routing])
        entropy = torch.stack([r.router_entropy for r in routing])
        dropped = sum(r.dropped for r in routing)
        if self._tokens_LE is None:
            self._tokens_LE, self._entropy_L, self._dropped = tokens.clone(), entropy.clone(), dropped
        else:
            self._tokens_LE += tokens
            self._entropy_L += entropy
            self._dropped = self._dropped + dropped
        self._steps += 1

    @property
    def steps(self) -> int:
        return self._steps

    def all_reduce(self, group=None) -> None:
        """Make the sums describe the whole ``group``'s batches, in place; a no-op without torch.distributed.

        Kept-token counts and dropped pairs are summed (each rank counts its own tokens' choices per *global*
        expert, so the sum over the data-parallel world is the global load); the entropy sums are averaged over
        the ranks. A collective: every rank of ``group`` calls it, after the same number of ``add`` calls (at
        least one), and once per window (a second call would count the other ranks' tokens again).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._tokens_LE is None:
            raise RuntimeError("RoutingAccumulator.all_reduce before any add()")
        tokens = self._tokens_LE
        dropped = torch.as_tensor(self._dropped, dtype=tokens.dtype, device=tokens.device).reshape(1)
        counts = torch.cat([tokens.reshape(-1), dropped])  # one collective for all integer sums
        dist.all_reduce(counts, group=group)
        self._tokens_LE = counts[:-1].view_as(tokens)
        self._dropped = counts[-1]
        dist.all_reduce(self._entropy_L, group=group)
        self._entropy_L /= dist.get_world_size(group)

    def load_fractions(self) -> np.ndarray:
        """[layers, experts] share of kept routed pairs per expert."""
        tokens = self._tokens_LE.double().cpu().numpy()
        return tokens / np.maximum(tokens.sum(1, keepdims=True), 1)

    def summary(self) -> dict:
        """Per layer and over layers: imbalance (max / mean load) and router entropy; dropped pairs; and
        ``idle_experts``, the (layer, expert) slots that kept no token (a dead expert, a collapsed router)."""
        if self._steps == 0:
            return {}
        frac = self.load_fractions()
        E = frac.shape[1]
        imbalance_L = frac.max(1) * E  # max / mean load per layer; 1.0 is balanced
        entropy_L = (self._entropy_L / self._steps).cpu().numpy()
        out = {
            "moe/max_imbalance": float(imbalance_L.max()),
            "moe/mean_imbalance": float(imbalance_L.mean()),
            "moe/router_entropy": float(entropy_L.mean()),
            "moe/dropped_tokens": int(self._dropped),
            "moe/idle_experts": int((frac == 0).sum()),
        }
        for layer, (row, imb, ent) in enumerate(zip(frac, imbalance_L, entropy_L, strict=True)):
            out[f"moe/layer{layer}/imbalance"] = float(imb)
            out[f"moe/layer{layer}/entropy"] = float(ent)
            for e, share in enumerate(row):
                out[f"moe/layer{layer}/expert{e}"] = float(share)
        return out
