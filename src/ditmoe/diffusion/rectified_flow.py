"""Rectified flow as in the official DiT-MoE code.

Path x_t = (1 - t) x0 + t noise, t ~ sigmoid(N(0, 1)); the model predicts the velocity dx/dt = noise - x0 and is
called with t in (0, 1) itself (no x1000 scaling). Sampling integrates from t = 1 (noise) to t = 0 with Euler.
Shapes: x0 / noise [B, C, H, W], t [B]; model output [B, C, ...] or [B, 2C, ...] with learn_sigma (second half unused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ditmoe.diffusion.gaussian import ModelFn, compute_dtype, mean_flat, randn


@dataclass(frozen=True)
class FlowContext:
    """What ``loss`` needs from ``training_inputs``."""

    x0: torch.Tensor  # [B, C, H, W]
    noise: torch.Tensor  # [B, C, H, W]
    x_t: torch.Tensor  # [B, C, H, W]
    t: torch.Tensor  # [B] in (0, 1)


def parse_euler_steps(steps: str | int) -> int:
    """Number of Euler steps from an int or a digit string; ValueError naming the value otherwise or if < 1."""
    if isinstance(steps, bool):
        raise ValueError(f"rectified-flow steps must be a positive int, got {steps!r}")
    if isinstance(steps, str):
        if not (steps.strip().isascii() and steps.strip().isdigit()):
            raise ValueError(f"rectified-flow steps must be a positive int, got {steps!r}")
        steps = int(steps.strip())
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"rectified-flow steps must be a positive int, got {steps!r}")
    return steps


class RectifiedFlow:
    """Logit-normal rectified flow with velocity prediction.

    Args:
        learn_sigma: the model outputs 2C channels; only the first C (velocity) are trained and used.
        sampling_steps: default number of Euler steps for ``sample``.
    """

    official_guide_channels: int | None = None  # the official rectified-flow sampler guides every velocity channel

    def __init__(self, *, learn_sigma: bool, sampling_steps: str | int = 50):
        self.learn_sigma = learn_sigma
        self.sampling_steps = parse_euler_steps(sampling_steps)

    def _velocity(self, pred: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if pred.shape[:2] != (x.shape[0], expected):
            raise ValueError(f"prediction shape {tuple(pred.shape)}; expected [B={x.shape[0]}, {expected}, ...]")
        return pred[:, :C]

    def training_inputs(
        self, x0: torch.Tensor, *, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, FlowContext]:
        """Draw t = sigmoid(z), z ~ N(0,1) [B], then noise ~ N(0, I) (in that order, from ``generator``).

        ``rows=(first, total)``: draw for a global batch of ``total`` and keep rows ``first:first+B`` (see DDPM).
        Returns (x_t [B,C,H,W], t [B] in (0,1) for the model as is, context for ``loss``).
        """
        B = x0.shape[0]
        first, total = rows or (0, B)
        keep = slice(first, first + B)
        dtype = compute_dtype(x0.dtype)
        t = torch.sigmoid(randn((total,), dtype=dtype, device=x0.device, generator=generator))[keep]
        noise = randn((total, *x0.shape[1:]), dtype=x0.dtype, device=x0.device, generator=generator)[keep]
        x_t = self._interpolate(x0, noise, t)
        return x_t, t, FlowContext(x0=x0, noise=noise, x_t=x_t, t=t)

    def noised(
        self, x0: torch.Tensor, level_B: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 noised at ``level_B`` in [0, 1] (t itself: 0 data, 1 noise): (x_t, t [B] for the model)."""
        t = level_B.clamp(0, 1).to(device=x0.device, dtype=compute_dtype(x0.dtype))
        noise = randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        return self._interpolate(x0, noise, t), t

    @staticmethod
    def _interpolate(x0: torch.Tensor, noise: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t noise, in the compute dtype of t, returned in x0's dtype."""
        t_b = t_B.reshape(-1, *([1] * (x0.ndim - 1)))
        return ((1.0 - t_b) * x0.to(t_B.dtype) + t_b * noise.to(t_B.dtype)).to(x0.dtype)

    def loss(self, pred: torch.Tensor, ctx: FlowContext) -> dict[str, torch.Tensor]:
        """Per-sample velocity MSE [B] (mean over non-batch dims): {"mse", "loss"} (equal)."""
        v = self._velocity(pred, ctx.x0)
        dtype = compute_dtype(pred.dtype)
        target = ctx.noise.to(dtype) - ctx.x0.to(dtype)
        mse = mean_flat((v.to(dtype) - target) ** 2)
        return {"mse": mse, "loss": mse}

    @torch.no_grad()
    def euler_sample_loop(
        self, model_fn: ModelFn, noise: torch.Tensor, *, steps: int, progress: bool = False
    ) -> torch.Tensor:
        """x <- x - (1/N) v(x, t) for t = 1, (N-1)/N, ..., 1/N, starting from x = ``noise``. Returns x at t = 0."""
        steps = parse_euler_steps(steps)
        x = noise
        dt = 1.0 / steps
        for i in tqdm(range(steps, 0, -1), disable=not progress, desc="euler", leave=False):
            t = torch.full((x.shape[0],), i / steps, dtype=compute_dtype(x.dtype), device=x.device)
            v = self._velocity(model_fn(x, t), x)
            x = (x - dt * v).to(noise.dtype)
        return x

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
        """Euler sampling with ``steps`` (default ``self.sampling_steps``). ``generator`` is unused (deterministic)."""
        if sampler not in (None, "euler"):
            raise ValueError(f"unknown sampler {sampler!r} for rectified flow (use 'euler')")
        n = self.sampling_steps if steps is None else parse_euler_steps(steps)
        return self.euler_sample_loop(model_fn, noise, steps=n, progress=progress)
