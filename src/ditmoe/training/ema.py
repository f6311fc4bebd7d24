"""Exponential moving average of model weights, kept in fp32."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``shadow = d * shadow + (1 - d) * param`` for every floating-point entry of the state dict.

    ``d = decay``, or with ``warmup`` ``d = min(decay, (1 + step) / (10 + step))`` so that a short run's average is
    not dominated by the initial weights (the official recipe uses a fixed 0.9999 over 400K+ steps).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0-based)."""
        weight = 1.0 - self.decay_at(step)
        current = model.state_dict(keep_vars=True)  # no detach per entry: this runs under no_grad
        keys = [k for k in self.shadow if k in current]
        # one multi-tensor launch per chunk, not one per entry: hundreds of small kernels a step for an S/2 model
        torch._foreach_lerp_([self.shadow[k] for k in keys], [current[k].float() for k in keys], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = self.shadow.keys() - state.keys()
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} entries, e.g. {sorted(missing)[:3]}")
        self.shadow = {k: state[k].float().clone() for k in self.shadow}
