"""Diffusion processes for training and sampling DiT-MoE: DDPM (IDDPM/DiT style) and rectified flow.

Training never calls the model::

    x_t, t_model, ctx = diffusion.training_inputs(x0, generator=g)
    pred = model(x_t, t_model, y)          # [B, C_out, H, W]
    losses = diffusion.loss(pred, ctx)     # per-sample [B] tensors; average losses["loss"]

Sampling: ``diffusion.sample(model_fn, noise, steps=..., sampler=..., progress=...)`` with
``model_fn(x, t_model) -> prediction`` (close over labels / guidance, e.g. ``guided_model_fn``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ditmoe.diffusion.gaussian import (
    DDPMContext,
    GaussianDiffusion,
    ModelFn,
    PMeanVar,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    normal_kl,
)
from ditmoe.diffusion.guidance import cfg_combine, guided_model_fn
from ditmoe.diffusion.rectified_flow import FlowContext, RectifiedFlow
from ditmoe.diffusion.respace import respace_betas, space_timesteps

__all__ = [
    "DDPMContext",
    "Diffusion",
    "FlowContext",
    "GaussianDiffusion",
    "ModelFn",
    "PMeanVar",
    "RectifiedFlow",
    "cfg_combine",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "guided_model_fn",
    "linear_beta_schedule",
    "normal_kl",
    "respace_betas",
    "space_timesteps",
]


@runtime_checkable
class Diffusion(Protocol):
    """What the training loop and the sampler use."""

    learn_sigma: bool
    official_guide_channels: int | None
    """How many leading channels the official sampler guides (None: all); the sampler's default."""

    def training_inputs(
        self, x0: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x0 [B,C,H,W] -> (x_t [B,C,H,W], t_model [B], ctx for ``loss``)."""
        ...

    def noised(
        self, x0: torch.Tensor, level_B: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 [B,C,H,W] noised at a chosen noise level [B] in [0, 1] (0 clean, 1 pure noise): (x_t, t_model [B])."""
        ...

    def loss(self, pred: torch.Tensor, ctx: Any) -> dict[str, torch.Tensor]:
        """Model prediction [B,C_out,H,W] -> per-sample losses [B]; "loss" is the one to average."""
        ...

    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        *,
        steps: str | int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from ``noise`` [B,C,H,W] to data [B,C,H,W]."""
        ...


DEFAULT_SAMPLING_STEPS = {"ddpm": "250", "rf": 50}


def create_diffusion(
    kind: str, *, learn_sigma: bool, sampling_steps: str | int | None = None, num_timesteps: int = 1000
) -> Diffusion:
    """Build the diffusion for ``kind``.

    "ddpm": 1000-step (``num_timesteps``) linear-beta GaussianDiffusion used for training as is; ``sampling_steps``
        is the default respacing for ``sample`` (default "250"; "ddimN" also selects the DDIM sampler).
        Without learn_sigma the variance is "fixed large" (DiT's default).
    "rf": RectifiedFlow; ``sampling_steps`` is the number of Euler steps (default 50).
    Raises ValueError naming the bad value (unknown kind, unsatisfiable respacing, steps < 1).
    """
    if kind not in DEFAULT_SAMPLING_STEPS:
        raise ValueError(f"unknown diffusion kind {kind!r} (expected 'ddpm' or 'rf')")
    steps = DEFAULT_SAMPLING_STEPS[kind] if sampling_steps is None else sampling_steps
    if kind == "ddpm":
        return GaussianDiffusion(
            linear_beta_schedule(num_timesteps),
            learn_sigma=learn_sigma,
            fixed_variance="large",
            sampling_respacing=steps,
        )
    return RectifiedFlow(learn_sigma=learn_sigma, sampling_steps=steps)
