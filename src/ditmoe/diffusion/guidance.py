"""Classifier-free guidance: combine conditional and unconditional (null-label) predictions.

out[:, :G] = uncond[:, :G] + scale * (cond[:, :G] - uncond[:, :G]); every other channel is taken from ``cond``.
G = the eps/velocity channels (C_out, or C_out // 2 with learn_sigma, so the variance half stays conditional),
or min(guide_channels, that) when ``guide_channels`` is given (guide_channels=3 is the official DiT/DiT-MoE
sampler's quirk of guiding only eps[:, :3]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ditmoe.diffusion.gaussian import ModelFn

LabeledModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""model_fn(x [B, C, H, W], t_model [B], y [B]) -> prediction [B, C_out, H, W]."""


def _guided_channels(c_out: int, guide_channels: int | None, learn_sigma: bool) -> int:
    if learn_sigma and c_out % 2:
        raise ValueError(f"learn_sigma needs an even number of output channels, got {c_out}")
    g = c_out // 2 if learn_sigma else c_out
    if guide_channels is not None:
        if guide_channels < 1:
            raise ValueError(f"guide_channels must be >= 1, got {guide_channels}")
        g = min(g, guide_channels)
    return g


def cfg_combine(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    *,
    guide_channels: int | None = None,
    learn_sigma: bool = False,
) -> torch.Tensor:
    """Guided prediction [B, C_out, ...] from conditional and unconditional predictions of the same shape."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} shapes differ")
    g = _guided_channels(cond.shape[1], guide_channels, learn_sigma)
    guided = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)


def guided_model_fn(
    model_fn: LabeledModelFn,
    y: torch.Tensor,
    null_class: int,
    scale: float,
    *,
    guide_channels: int | None = None,
    learn_sigma: bool = False,
) -> ModelFn:
    """Close over labels ``y`` [B] and return ``(x, t) -> guided prediction`` for a sampler.

    scale == 1 calls the model once, conditionally. Otherwise one batched call on [x; x] with labels [y; null].
    """
    if guide_channels is not None and guide_channels < 1:
        raise ValueError(f"guide_channels must be >= 1, got {guide_channels}")
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale}")
    null = torch.full_like(y, null_class)

    if scale == 1.0:

        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model_fn(x, t, y)

        return conditional

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2, dim=0)
        return cfg_combine(cond, uncond, scale, guide_channels=guide_channels, learn_sigma=learn_sigma)

    return guided
