"""Gaussian (DDPM) diffusion as in IDDPM / DiT: eps prediction, optional learned-range variance, hybrid loss.

Schedule constants are float64 numpy arrays indexed by the step index t of *this* process (which may be a
respaced subset of an original 1000-step process); ``model_time(t)`` gives the original timestep the model sees.
Runtime math is torch, done in at least float32 (float64 inputs stay float64).

Shapes: x / x0 / noise [B, C, H, W] (any trailing dims), t [B] int64, model output [B, C, ...] or, with
``learn_sigma``, [B, 2C, ...] = (eps, v) with v in [-1, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ditmoe.diffusion.respace import respace_betas, space_timesteps

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""model_fn(x [B, C, H, W], t_model [B]) -> prediction [B, C_out, H, W]."""


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM linear betas 1e-4 -> 0.02 for 1000 steps, scaled by 1000/num_timesteps otherwise. float64 [T]."""
    if num_timesteps <= 20:  # the last beta, 20 / num_timesteps, must stay below 1
        raise ValueError(f"num_timesteps must be > 20 for the linear beta schedule, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dims: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16/fp16/fp32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def randn(
    shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal of ``shape``, drawn on the generator's device (if any) and moved to ``device``."""
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF (the one IDDPM/DiT use for the decoder NLL)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of x in [-1, 1] quantised to 256 bins of width 2/255 under N(means, e^2ls).

    The edge bins extend to -inf / +inf. Probabilities are clamped at 1e-12 before the log.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclass(frozen=True)
class DDPMContext:
    """What ``loss`` needs from ``training_inputs``: clean data, the noise drawn, the noised input, step indices."""

    x0: torch.Tensor  # [B, C, H, W]
    noise: torch.Tensor  # [B, C, H, W]
    x_t: torch.Tensor  # [B, C, H, W]
    t: torch.Tensor  # [B] int64, index into this process's schedule


@dataclass(frozen=True)
class PMeanVar:
    """Reverse-step distribution p(x_{t-1} | x_t) derived from a model output."""

    mean: torch.Tensor  # [B, C, H, W]
    variance: torch.Tensor  # [B, C, H, W]
    log_variance: torch.Tensor  # [B, C, H, W]
    pred_x0: torch.Tensor  # [B, C, H, W] (clipped to [-1, 1] if asked)
    eps: torch.Tensor  # [B, C, H, W] (re-derived from the clipped pred_x0 if clipping)


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with eps prediction.

    Args:
        betas: float64 [T] in (0, 1).
        learn_sigma: model outputs (eps, v); variance is exp(frac*log(beta_t) + (1-frac)*log(posterior_var_clipped_t)),
            frac = (v+1)/2, trained by the VB term (mean detached). Loss = mse + vb (no num_timesteps/1000 rescale).
        fixed_variance: used when not learning sigma. "large" (DiT's default): sigma_t^2 = beta_t, with
            posterior_variance[1] at t=0; "small": the posterior variance (clipped log at t=0). Loss = mse.
        timestep_map: int64 [T], original timestep of each index (identity for an unrespaced process).
        sampling_respacing: default respacing used by ``sample`` when ``steps`` is None ("" = all steps).
    """

    official_guide_channels: int | None = 3  # the official DiT/DiT-MoE sampler guides eps[:, :3] alone

    def __init__(
        self,
        betas: np.ndarray,
        *,
        learn_sigma: bool,
        fixed_variance: Literal["large", "small"] = "large",
        timestep_map: np.ndarray | None = None,
        sampling_respacing: str | int = "",
    ):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
        if len(bad):  # a beta of 1 leaves no signal: alphas_cumprod 0, and the sampler divides by it
            raise ValueError(f"betas must lie in (0, 1), got betas[{bad[0]}] = {betas[bad[0]]}")
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        T = len(betas)
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.fixed_variance = fixed_variance
        self.timestep_map = (
            np.arange(T, dtype=np.int64) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        )
        if self.timestep_map.shape != (T,):
            raise ValueError(f"timestep_map must have shape ({T},), got {self.timestep_map.shape}")
        space_timesteps(T, sampling_respacing)  # validate early
        self.sampling_respacing = sampling_respacing

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior variance is 0 at t=0: use the t=1 value there (a 1-step process falls back to beta_0)
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.concatenate([[first], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        if fixed_variance == "large":
            self.fixed_variance_values = np.concatenate([[first], betas[1:]])
            self.fixed_log_variance_values = np.log(self.fixed_variance_values)
        else:
            self.fixed_variance_values = self.posterior_variance
            self.fixed_log_variance_values = self.posterior_log_variance_clipped
        self._tables: dict[tuple[int, torch.device, torch.dtype], tuple[np.ndarray, torch.Tensor]] = {}  # _table

    # ------------------------------------------------------------------ helpers
    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def _table(self, arr: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """One of this process's schedule arrays as a tensor on ``device``, copied once: a copy from host memory in
        every step would make the host wait for the GPU there."""
        key = (id(arr), device, dtype)
        if key not in self._tables:  # the entry keeps ``arr`` alive, so its id cannot be reused by another array
            self._tables[key] = (arr, torch.from_numpy(arr).to(device=device, dtype=dtype))
        return self._tables[key][1]

    def _gather(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as a tensor broadcastable to ``like`` ([B, 1, 1, ...]) in ``like``'s compute dtype."""
        vals = self._table(arr, like.device, compute_dtype(like.dtype))[t.to(like.device)]
        return vals.reshape(-1, *([1] * (like.ndim - 1)))

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """Index of this process [B] -> original timestep value [B] int64 in [0, 999] that the model was trained on."""
        return self._table(self.timestep_map, t.device, torch.int64)[t]

    def respace(self, spacing: str | int) -> GaussianDiffusion:
        """A process visiting only the steps kept by ``spacing`` (see ``respace.space_timesteps``)."""
        betas, kept = respace_betas(self.alphas_cumprod, space_timesteps(self.num_timesteps, spacing))
        return GaussianDiffusion(
            betas,
            learn_sigma=self.learn_sigma,
            fixed_variance=self.fixed_variance,
            timestep_map=self.timestep_map[kept],
        )

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        out = (
            self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )
        return out.to(x0.dtype)

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), each [B, C, H, W]."""
        mean = (
            self._gather(self.posterior_mean_coef1, t, x_t) * x0 + self._gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = self._gather(self.posterior_variance, t, x_t).expand_as(mean)
        log_var = self._gather(self.posterior_log_variance_clipped, t, x_t).expand_as(mean)
        return mean, var, log_var

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *, clip_denoised: bool = False
    ) -> PMeanVar:
        """p(x_{t-1} | x_t) from a model output (eps, or (eps, v) with learn_sigma)."""
        C = x_t.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if model_output.shape[0] != x_t.shape[0] or model_output.shape[1] != expected:
            raise ValueError(
                f"model output shape {tuple(model_output.shape)}; expected [B={x_t.shape[0]}, {expected}, ...]"
            )
        dtype = compute_dtype(x_t.dtype)
        model_output = model_output.to(dtype)
        x_t = x_t.to(dtype)
        eps = model_output[:, :C]
        if self.learn_sigma:
            v = model_output[:, C:]
            min_log = self._gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._gather(self.log_betas, t, x_t)
            frac = (v + 1.0) / 2.0
            log_var = frac * max_log + (1.0 - frac) * min_log
            var = torch.exp(log_var)
        else:
            var = self._gather(self.fixed_variance_values, t, x_t).expand_as(x_t)
            log_var = self._gather(self.fixed_log_variance_values, t, x_t).expand_as(x_t)
        pred_x0 = (
            self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
            eps = (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_x0) / self._gather(
                self.sqrt_recipm1_alphas_cumprod, t, x_t
            )
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return PMeanVar(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0, eps=eps)

    # ------------------------------------------------------------------ training
    def training_inputs(
        self, x0: torch.Tensor, *, generator: torch.Generator | None = None, rows: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, DDPMContext]:
        """Draw t ~ U{0..T-1} then noise ~ N(0, I) (in that order, from ``generator``).

        ``rows=(first, total)``: draw for a global batch of ``total`` and keep this rank's rows ``first:first+B``,
        so a run's randomness does not depend on how the batch is split over ranks.
        Returns (x_t [B,C,H,W], t_model [B] int64 original timesteps for the model, context for ``loss``).
        """
        B = x0.shape[0]
        first, total = rows or (0, B)
        keep = slice(first, first + B)
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.num_timesteps, (total,), generator=generator, device=device)[keep].to(x0.device)
        noise = randn((total, *x0.shape[1:]), dtype=x0.dtype, device=x0.device, generator=generator)[keep]
        x_t = self.q_sample(x0, t, noise)
        return x_t, self.model_time(t), DDPMContext(x0=x0, noise=noise, x_t=x_t, t=t)

    def noised(
        self, x0: torch.Tensor, level_B: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 noised at ``level_B`` in [0, 1] (0: t = 0, 1: t = T - 1; rounded to a step): (x_t, t_model [B])."""
        t = (level_B.clamp(0, 1) * (self.num_timesteps - 1)).round().long().to(x0.device)
        noise = randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        return self.q_sample(x0, t, noise), self.model_time(t)

    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Variational-bound term per sample [B] in bits: KL(q || p) for t > 0, decoder NLL of x0 for t == 0."""
        dtype = compute_dtype(x_t.dtype)
        x0, x_t = x0.to(dtype), x_t.to(dtype)
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, means=out.mean, log_scales=0.5 * out.log_variance)
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def loss(self, pred: torch.Tensor, ctx: DDPMContext) -> dict[str, torch.Tensor]:
        """Per-sample losses [B]: "mse" (eps), "vb" (learn_sigma only; trains the variance only), "loss" (their sum)."""
        C = ctx.x0.shape[1]
        expected = 2 * C if self.learn_sigma else C
        if pred.shape[:2] != (ctx.x0.shape[0], expected):
            raise ValueError(f"prediction shape {tuple(pred.shape)}; expected [B={ctx.x0.shape[0]}, {expected}, ...]")
        pred = pred.to(compute_dtype(pred.dtype))
        mse = mean_flat((ctx.noise.to(pred.dtype) - pred[:, :C]) ** 2)
        if not self.learn_sigma:
            return {"mse": mse, "loss": mse}
        frozen = torch.cat([pred[:, :C].detach(), pred[:, C:]], dim=1)
        vb = self.vb_terms_bpd(frozen, ctx.x0, ctx.x_t, ctx.t)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    # ------------------------------------------------------------------ sampling
    def _steps(self, progress: bool, desc: str) -> Iterable[int]:
        return tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc=desc, leave=False)

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        *,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling over all steps of this process, starting from x_T = ``noise``. Returns x_0."""
        x = noise
        for i in self._steps(progress, "ddpm"):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            out = self.p_mean_variance(model_fn(x, self.model_time(t)), x, t, clip_denoised=clip_denoised)
            x = out.mean
            if i > 0:
                x = x + torch.exp(0.5 * out.log_variance) * randn(
                    x.shape, dtype=x.dtype, device=x.device, generator=generator
                )
            x = x.to(noise.dtype)
        return x

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        *,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDIM sampling over all steps of this process (eta=0: deterministic). Returns x_0."""
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        x = noise
        for i in self._steps(progress, "ddim"):
            t = torch.full((x.shape[0],), i, dtype=torch.int64, device=x.device)
            out = self.p_mean_variance(model_fn(x, self.model_time(t)), x, t, clip_denoised=clip_denoised)
            ab = self._gather(self.alphas_cumprod, t, out.eps)
            ab_prev = self._gather(self.alphas_cumprod_prev, t, out.eps)
            sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
            x = out.pred_x0 * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * out.eps
            if i > 0 and eta > 0:
                x = x + sigma * randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            x = x.to(noise.dtype)
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
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> torch.Tensor:
        """Sample x_0 from ``noise`` on the process respaced by ``steps`` (default ``self.sampling_respacing``).

        sampler: "ddpm" (ancestral) or "ddim"; None picks "ddim" for "ddimN" spacings, else "ddpm".
        """
        spacing = self.sampling_respacing if steps is None else steps
        if sampler is None:
            sampler = "ddim" if str(spacing).strip().startswith("ddim") else "ddpm"
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r} for DDPM diffusion (use 'ddpm' or 'ddim')")
        proc = self.respace(spacing)
        if sampler == "ddim":
            return proc.ddim_sample_loop(
                model_fn, noise, eta=eta, clip_denoised=clip_denoised, generator=generator, progress=progress
            )
        return proc.p_sample_loop(model_fn, noise, clip_denoised=clip_denoised, generator=generator, progress=progress)
