"""Diffusion processes checked against float64 numpy formulas written here."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from ditmoe.diffusion import (
    DDPMContext,
    Diffusion,
    FlowContext,
    GaussianDiffusion,
    RectifiedFlow,
    cfg_combine,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    guided_model_fn,
    linear_beta_schedule,
    normal_kl,
    space_timesteps,
)

# ----------------------------------------------------------------------------- numpy references


def np_schedule(T: int = 1000):
    betas = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    ab = np.cumprod(1.0 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_logvar_clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    coef1 = betas * np.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab)
    return dict(
        betas=betas, ab=ab, ab_prev=ab_prev, post_var=post_var, post_logvar=post_logvar_clipped, c1=coef1, c2=coef2
    )


def bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(-1, *([1] * (ndim - 1)))


def np_cdf_approx(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def np_disc_loglik(x, mean, log_scale):
    inv = np.exp(-log_scale)
    hi = np_cdf_approx(inv * (x - mean + 1 / 255))
    lo = np_cdf_approx(inv * (x - mean - 1 / 255))
    out = np.log(np.maximum(hi - lo, 1e-12))
    out = np.where(x < -0.999, np.log(np.maximum(hi, 1e-12)), out)
    return np.where(x > 0.999, np.log(np.maximum(1 - lo, 1e-12)), out)


def np_kl(m1, lv1, m2, lv2):
    # KL between diagonal Gaussians, written from the textbook form
    return (
        np.log(np.sqrt(np.exp(lv2)) / np.sqrt(np.exp(lv1))) + (np.exp(lv1) + (m1 - m2) ** 2) / (2 * np.exp(lv2)) - 0.5
    )


def t64(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


@pytest.fixture(scope="module")
def ref():
    return np_schedule()


def rand64(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------- schedule / forward process


def test_linear_schedule_and_scaling():
    assert np.allclose(linear_beta_schedule(1000)[[0, -1]], [1e-4, 0.02], rtol=0, atol=1e-15)
    b = linear_beta_schedule(250)
    assert len(b) == 250 and np.allclose(b[[0, -1]], [4e-4, 0.08], rtol=0, atol=1e-15)
    assert b.dtype == np.float64
    assert linear_beta_schedule(21)[-1] < 1
    for n in (0, 10, 20):  # the last beta, 20 / n, reaches 1 at n = 20: no signal left, NaN samples
        with pytest.raises(ValueError, match=f"num_timesteps must be > 20 for the linear beta schedule, got {n}"):
            linear_beta_schedule(n)


def test_betas_outside_the_open_unit_interval_are_named():
    for betas, bad in (([0.1, 1.0], "betas[1] = 1.0"), ([0.0, 0.5], "betas[0] = 0.0"), ([0.2, np.nan], "betas[1]")):
        with pytest.raises(ValueError, match=re.escape(bad)):
            GaussianDiffusion(np.array(betas), learn_sigma=False)


def test_q_sample_matches_numpy(ref):
    d = GaussianDiffusion(linear_beta_schedule(), learn_sigma=False)
    x0, noise = rand64(4, 3, 5, 5, seed=1), rand64(4, 3, 5, 5, seed=2)
    t = np.array([0, 17, 500, 999])
    want = bcast(np.sqrt(ref["ab"][t]), 4) * x0 + bcast(np.sqrt(1 - ref["ab"][t]), 4) * noise
    got = d.q_sample(t64(x0), torch.from_numpy(t), t64(noise))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_posterior_mean_variance_matches_numpy(ref):
    d = GaussianDiffusion(linear_beta_schedule(), learn_sigma=True)
    x0, xt = rand64(4, 2, 3, 3, seed=3), rand64(4, 2, 3, 3, seed=4)
    t = np.array([0, 1, 250, 999])
    mean, var, logvar = d.q_posterior_mean_variance(t64(x0), t64(xt), torch.from_numpy(t))
    np.testing.assert_allclose(mean.numpy(), bcast(ref["c1"][t], 4) * x0 + bcast(ref["c2"][t], 4) * xt, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), np.broadcast_to(bcast(ref["post_var"][t], 4), xt.shape), rtol=1e-12)
    np.testing.assert_allclose(logvar.numpy(), np.broadcast_to(bcast(ref["post_logvar"][t], 4), xt.shape), rtol=1e-12)
    # t=0: the true posterior variance is 0 and the clipped log-variance uses the t=1 value
    assert var[0].abs().max() == 0 and torch.isfinite(logvar).all()
    assert logvar[0, 0, 0, 0].item() == pytest.approx(math.log(ref["post_var"][1]), rel=1e-12)


def test_learned_variance_interpolation_and_mean(ref):
    d = GaussianDiffusion(linear_beta_schedule(), learn_sigma=True)
    B, C = 5, 2
    xt, eps = rand64(B, C, 4, 4, seed=5), rand64(B, C, 4, 4, seed=6)
    v = np.tanh(rand64(B, C, 4, 4, seed=7))
    v[0] = -1.0  # -> clipped posterior log-variance
    v[1] = 1.0  # -> log beta
    t = np.array([3, 40, 0, 600, 999])
    out = d.p_mean_variance(t64(np.concatenate([eps, v], 1)), t64(xt), torch.from_numpy(t))
    frac = (v + 1) / 2
    logvar = frac * bcast(np.log(ref["betas"][t]), 4) + (1 - frac) * bcast(ref["post_logvar"][t], 4)
    np.testing.assert_allclose(out.log_variance.numpy(), logvar, rtol=1e-12)
    np.testing.assert_allclose(out.variance.numpy(), np.exp(logvar), rtol=1e-12)
    np.testing.assert_allclose(out.log_variance[0].numpy(), np.full((C, 4, 4), ref["post_logvar"][3]), rtol=1e-12)
    np.testing.assert_allclose(out.log_variance[1].numpy(), np.full((C, 4, 4), np.log(ref["betas"][40])), rtol=1e-12)
    pred_x0 = (xt - bcast(np.sqrt(1 - ref["ab"][t]), 4) * eps) / bcast(np.sqrt(ref["ab"][t]), 4)
    np.testing.assert_allclose(out.pred_x0.numpy(), pred_x0, rtol=1e-9, atol=1e-9)
    mean = bcast(ref["c1"][t], 4) * pred_x0 + bcast(ref["c2"][t], 4) * xt
    np.testing.assert_allclose(out.mean.numpy(), mean, rtol=1e-9, atol=1e-9)
    # default: no clipping of pred_x0 (values well outside [-1, 1] survive)
    assert out.pred_x0.abs().max() > 1.5
    clipped = d.p_mean_variance(t64(np.concatenate([eps, v], 1)), t64(xt), torch.from_numpy(t), clip_denoised=True)
    assert clipped.pred_x0.abs().max() <= 1.0


def test_fixed_large_and_small_variance(ref):
    xt = rand64(3, 1, 2, 2, seed=8)
    t = np.array([0, 1, 700])
    large = GaussianDiffusion(linear_beta_schedule(), learn_sigma=False)
    out = large.p_mean_variance(t64(xt), t64(xt), torch.from_numpy(t))
    # IDDPM gaussian_diffusion.py FIXED_LARGE: variance = append(posterior_variance[1], betas[1:]), and the
    # log-variance is the log of that same array (not the clipped posterior one: that is FIXED_SMALL)
    want = np.concatenate([[ref["post_var"][1]], ref["betas"][1:]])[t]
    np.testing.assert_allclose(out.variance[:, 0, 0, 0].numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(out.log_variance[:, 0, 0, 0].numpy(), np.log(want), rtol=1e-12)
    small = GaussianDiffusion(linear_beta_schedule(), learn_sigma=False, fixed_variance="small")
    out = small.p_mean_variance(t64(xt), t64(xt), torch.from_numpy(t))
    np.testing.assert_allclose(out.log_variance[:, 0, 0, 0].numpy(), ref["post_logvar"][t], rtol=1e-12)
    with pytest.raises(ValueError, match="medium"):
        GaussianDiffusion(linear_beta_schedule(), learn_sigma=False, fixed_variance="medium")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- VB term


def test_normal_kl_matches_numpy():
    m1, m2 = rand64(50, seed=9), rand64(50, seed=10)
    lv1, lv2 = rand64(50, seed=11), rand64(50, seed=12)
    got = normal_kl(t64(m1), t64(lv1), t64(m2), t64(lv2)).numpy()
    np.testing.assert_allclose(got, np_kl(m1, lv1, m2, lv2), rtol=1e-10, atol=1e-12)
    assert normal_kl(t64(m1), t64(lv1), t64(m1), t64(lv1)).abs().max() < 1e-12


def test_discretized_gaussian_loglik_matches_numpy_and_normalises():
    grid = -1.0 + 2.0 * np.arange(256) / 255.0  # every 8-bit level, including both edges
    mean, log_scale = 0.1, math.log(0.3)
    ll = discretized_gaussian_log_likelihood(
        t64(grid), means=t64(np.full(256, mean)), log_scales=t64(np.full(256, log_scale))
    ).numpy()
    np.testing.assert_allclose(ll, np_disc_loglik(grid, mean, log_scale), rtol=1e-10, atol=1e-12)
    # bins tile the real line, so the probabilities of all 256 levels sum to one
    assert np.exp(ll).sum() == pytest.approx(1.0, abs=1e-9)
    # and the most likely level is the one nearest the mean
    assert abs(grid[np.argmax(ll)] - mean) <= 1 / 255 + 1e-12


def _np_hybrid_loss(ref, x0, noise, t, pred):
    C = x0.shape[1]
    eps, v = pred[:, :C], pred[:, C:]
    ab = bcast(ref["ab"][t], 4)
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    mse = ((noise - eps) ** 2).mean(axis=(1, 2, 3))
    pred_x0 = (xt - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    model_mean = bcast(ref["c1"][t], 4) * pred_x0 + bcast(ref["c2"][t], 4) * xt
    frac = (v + 1) / 2
    model_lv = frac * bcast(np.log(ref["betas"][t]), 4) + (1 - frac) * bcast(ref["post_logvar"][t], 4)
    true_mean = bcast(ref["c1"][t], 4) * x0 + bcast(ref["c2"][t], 4) * xt
    true_lv = np.broadcast_to(bcast(ref["post_logvar"][t], 4), x0.shape)
    kl = np_kl(true_mean, true_lv, model_mean, model_lv).mean(axis=(1, 2, 3)) / np.log(2)
    nll = -np_disc_loglik(x0, model_mean, 0.5 * model_lv).mean(axis=(1, 2, 3)) / np.log(2)
    vb = np.where(t == 0, nll, kl)
    return xt, mse, vb


def test_hybrid_loss_matches_numpy_and_vb_trains_only_variance(ref):
    d = create_diffusion("ddpm", learn_sigma=True)
    B, C = 4, 3
    x0 = np.clip(rand64(B, C, 4, 4, seed=13) * 0.5, -1, 1)
    noise = rand64(B, C, 4, 4, seed=14)
    t = np.array([0, 1, 321, 999])
    pred = np.concatenate([noise + 0.3 * rand64(B, C, 4, 4, seed=15), np.tanh(rand64(B, C, 4, 4, seed=16))], 1)
    xt, mse, vb = _np_hybrid_loss(ref, x0, noise, t, pred)
    ctx = DDPMContext(x0=t64(x0), noise=t64(noise), x_t=t64(xt), t=torch.from_numpy(t))
    pred_t = t64(pred).requires_grad_(True)
    losses = d.loss(pred_t, ctx)
    assert set(losses) == {"mse", "vb", "loss"} and all(v.shape == (B,) for v in losses.values())
    np.testing.assert_allclose(losses["mse"].detach().numpy(), mse, rtol=1e-10)
    np.testing.assert_allclose(losses["vb"].detach().numpy(), vb, rtol=1e-8, atol=1e-10)
    # plain MSE loss type: no num_timesteps/1000 rescaling of the VB term
    np.testing.assert_allclose(losses["loss"].detach().numpy(), mse + vb, rtol=1e-8, atol=1e-10)
    (grad,) = torch.autograd.grad(losses["vb"].sum(), pred_t, retain_graph=True)
    assert grad[:, :C].abs().max() == 0 and grad[:, C:].abs().max() > 0
    (grad,) = torch.autograd.grad(losses["mse"].sum(), pred_t)
    assert grad[:, C:].abs().max() == 0 and grad[:, :C].abs().max() > 0


def test_fixed_variance_loss_is_mse_and_shape_checked(ref):
    d = create_diffusion("ddpm", learn_sigma=False)
    x0, noise, eps = rand64(2, 3, 2, 2, seed=17), rand64(2, 3, 2, 2, seed=18), rand64(2, 3, 2, 2, seed=19)
    t = torch.tensor([5, 900])
    ctx = DDPMContext(x0=t64(x0), noise=t64(noise), x_t=d.q_sample(t64(x0), t, t64(noise)), t=t)
    losses = d.loss(t64(eps), ctx)
    assert set(losses) == {"mse", "loss"}
    np.testing.assert_allclose(losses["loss"].numpy(), ((noise - eps) ** 2).mean(axis=(1, 2, 3)), rtol=1e-12)
    with pytest.raises(ValueError, match="6"):
        d.loss(t64(np.concatenate([eps, eps], 1)), ctx)


def test_training_inputs_reproducible_and_consistent():
    d = create_diffusion("ddpm", learn_sigma=True)
    x0 = torch.randn(64, 4, 2, 2)
    a = d.training_inputs(x0, generator=torch.Generator().manual_seed(3))
    b = d.training_inputs(x0, generator=torch.Generator().manual_seed(3))
    c = d.training_inputs(x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    x_t, t_model, ctx = a
    assert t_model.dtype == torch.int64 and t_model.shape == (64,)
    assert int(ctx.t.min()) >= 0 and int(ctx.t.max()) <= 999 and len(ctx.t.unique()) > 30
    assert torch.equal(t_model, ctx.t)  # unrespaced: the model sees the index itself
    torch.testing.assert_close(x_t, d.q_sample(x0, ctx.t, ctx.noise))
    assert ctx.noise.std() == pytest.approx(1.0, abs=0.15)


# ----------------------------------------------------------------------------- respacing


def test_space_timesteps_strings():
    assert space_timesteps(1000, "") == set(range(1000))
    ddim = space_timesteps(1000, "ddim50")
    assert sorted(ddim) == list(range(0, 1000, 20))
    even = sorted(space_timesteps(1000, "250"))
    assert len(even) == 250 and even[0] == 0 and even[-1] == 999 and max(np.diff(even)) <= 5
    assert space_timesteps(1000, 250) == set(even)
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sum(s < 100 for s in sections) == 10 and sum(100 <= s < 200 for s in sections) == 15
    assert sections[0] == 0 and sections[9] == 99 and sections[10] == 100 and sections[-1] == 299
    # IDDPM sums the fractional stride 999 / 20 = 49.95; ten of them come to 499.49999..., which rounds to 499
    # (10 * 49.95 = 499.5 would round to 500): the steps official samples were drawn at
    assert sorted(space_timesteps(1000, "21"))[9:12] == [450, 499, 549]


@pytest.mark.parametrize(
    "bad", ["ddim999", "1001", "abc", "0", "ddim", "300,300,300,300", "-5", -3, "10,,5", "\u00b2", "\u0663"]
)
def test_bad_respacing_raises_naming_value(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        space_timesteps(1000, bad)


def test_respaced_process_consistent(ref):
    base = create_diffusion("ddpm", learn_sigma=True)
    for spacing in ["250", "ddim50", "10,15,20", "7"]:
        r = base.respace(spacing)
        kept = np.array(sorted(space_timesteps(1000, spacing)))
        assert r.num_timesteps == len(kept)
        np.testing.assert_allclose(r.alphas_cumprod, ref["ab"][kept], rtol=1e-12)
        idx = torch.arange(r.num_timesteps)
        assert torch.equal(r.model_time(idx), torch.from_numpy(kept))
    assert base.respace("ddim50").num_timesteps == 50
    # respacing a respaced process composes the maps back to original timesteps
    twice = base.respace("100").respace("ddim10")
    once = base.respace("100")
    assert torch.equal(twice.model_time(torch.arange(10)), once.model_time(torch.arange(0, 100, 10)))
    np.testing.assert_allclose(twice.alphas_cumprod, once.alphas_cumprod[::10], rtol=1e-12)


# ----------------------------------------------------------------------------- DDPM sampling


def _exact_eps_fn(x0_star: torch.Tensor, learn_sigma: bool, calls: list | None = None):
    """eps for data concentrated at x0*, computed with the ORIGINAL schedule at the model's timestep."""
    ab = torch.from_numpy(np_schedule()["ab"])

    def fn(x, t_model):
        if calls is not None:
            calls.append(t_model.clone())
        a = ab[t_model].to(x.dtype).reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0_star) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if learn_sigma else eps

    return fn


@pytest.mark.parametrize("spacing", ["ddim50", "25"])
def test_ddim_eta0_deterministic_and_recovers_point(spacing):
    d = create_diffusion("ddpm", learn_sigma=True)
    x0_star = torch.linspace(-0.8, 0.9, 2 * 3 * 4 * 4, dtype=torch.float64).reshape(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    calls: list = []
    out1 = d.sample(_exact_eps_fn(x0_star, True, calls), noise, steps=spacing, sampler="ddim")
    out2 = d.sample(_exact_eps_fn(x0_star, True), noise, steps=spacing, sampler="ddim")
    assert torch.equal(out1, out2)
    torch.testing.assert_close(out1, x0_star, rtol=0, atol=1e-6)
    kept = sorted(space_timesteps(1000, spacing), reverse=True)
    assert [int(c[0]) for c in calls] == kept  # the model saw original timesteps, high to low


def _np_toy_model(x, t_model):
    """A deterministic, non-exact (eps, v) model used on both sides."""
    eps = 0.3 * x + 0.1 * bcast(t_model / 1000.0, x.ndim)
    return eps, np.tanh(x)


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sampling_trajectory_matches_numpy(ref, sampler, eta):
    """4 respaced steps (original 750, 500, 250, 0) against the update rules written out in numpy."""
    d = create_diffusion("ddpm", learn_sigma=True)
    kept = np.array([0, 250, 500, 750])
    ab = ref["ab"][kept]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    betas = 1 - ab / ab_prev
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_logvar = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    x = rand64(2, 2, 3, 3, seed=30)
    gen = torch.Generator().manual_seed(11)
    draws = torch.Generator().manual_seed(11)  # same seed: the sampler draws one N(0, I) per step with i > 0

    def model_fn(xt, t_model):
        eps, v = _np_toy_model(xt.numpy(), t_model.numpy())
        return t64(np.concatenate([eps, v], 1))

    got = d.sample(model_fn, t64(x), steps="ddim4", sampler=sampler, eta=eta, generator=gen)
    for k in range(3, -1, -1):
        eps, v = _np_toy_model(x, np.full(2, kept[k], dtype=np.float64))
        pred_x0 = (x - np.sqrt(1 - ab[k]) * eps) / np.sqrt(ab[k])
        if sampler == "ddim":
            sigma = eta * np.sqrt((1 - ab_prev[k]) / (1 - ab[k])) * np.sqrt(1 - ab[k] / ab_prev[k])
            x = np.sqrt(ab_prev[k]) * pred_x0 + np.sqrt(1 - ab_prev[k] - sigma**2) * eps
            if k > 0 and eta > 0:
                x = x + sigma * torch.randn(x.shape, generator=draws, dtype=torch.float64).numpy()
        else:
            mean = (betas[k] * np.sqrt(ab_prev[k]) * pred_x0 + (1 - ab_prev[k]) * np.sqrt(1 - betas[k]) * x) / (
                1 - ab[k]
            )
            logvar = (v + 1) / 2 * np.log(betas[k]) + (1 - v) / 2 * post_logvar[k]
            x = mean
            if k > 0:
                x = x + np.exp(0.5 * logvar) * torch.randn(x.shape, generator=draws, dtype=torch.float64).numpy()
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-9, atol=1e-9)


def test_ddim_inexact_model_not_trivially_recovering():
    d = create_diffusion("ddpm", learn_sigma=False, sampling_steps="ddim20")
    x0_star = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    noise = torch.randn(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = _exact_eps_fn(x0_star, False)
    # default respacing "ddim20" (which sampler that picks: test_default_sampler_follows_the_respacing_string)
    out = d.sample(lambda x, t: exact(x, t) * 0.9, noise)
    assert (out - x0_star).abs().max() > 1e-3


def test_default_sampler_follows_the_respacing_string():
    """A spacing "ddimN" runs DDIM (eta 0: no noise drawn, the sample is a function of x_T alone); any other spacing
    runs ancestral sampling (IDDPM p_sample_loop: one fresh N(0, I) per step from the generator)."""
    x0_star = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
    noise = torch.randn(1, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = _exact_eps_fn(x0_star, False)

    def inexact(x, t):
        return exact(x, t) * 0.9

    def run(d, seed):
        g = torch.Generator().manual_seed(seed)
        before = g.get_state()
        return d.sample(inexact, noise, generator=g), torch.equal(g.get_state(), before)

    ddim = create_diffusion("ddpm", learn_sigma=False, sampling_steps="ddim20")
    (a, untouched_a), (b, untouched_b) = run(ddim, 1), run(ddim, 2)
    assert untouched_a and untouched_b and torch.equal(a, b)
    assert torch.equal(a, ddim.sample(inexact, noise, sampler="ddim"))
    ddpm = create_diffusion("ddpm", learn_sigma=False, sampling_steps="20")
    (c, untouched_c), (d, _) = run(ddpm, 1), run(ddpm, 2)
    assert not untouched_c and not torch.allclose(c, d)


def test_ancestral_sampling_reproducible_and_recovers_point():
    d = create_diffusion("ddpm", learn_sigma=True, sampling_steps="50")
    x0_star = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64).reshape(1, 1, 4, 4).repeat(2, 1, 1, 1)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fn = _exact_eps_fn(x0_star, True)
    out1 = d.sample(fn, noise, generator=torch.Generator().manual_seed(7))
    out2 = d.sample(fn, noise, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out1, out2)
    torch.testing.assert_close(out1, x0_star, rtol=0, atol=1e-6)  # exact eps -> posterior collapses at t=0

    def noisy_fn(x, t):  # a model that is not exact: different seeds must give different samples
        return torch.cat([0.5 * x, torch.zeros_like(x)], 1)

    a = d.sample(noisy_fn, noise, sampler="ddpm", generator=torch.Generator().manual_seed(7))
    b = d.sample(noisy_fn, noise, sampler="ddpm", generator=torch.Generator().manual_seed(7))
    c = d.sample(noisy_fn, noise, sampler="ddpm", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.isfinite(a).all()


def test_ddpm_sampler_validation_and_progress(capsys):
    d = create_diffusion("ddpm", learn_sigma=False)
    noise = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="euler"):
        d.sample(lambda x, t: x, noise, steps="5", sampler="euler")
    with pytest.raises(ValueError, match="ddim999"):
        d.sample(lambda x, t: x, noise, steps="ddim999")
    out = d.sample(lambda x, t: torch.zeros_like(x), noise, steps=3, progress=True)
    assert out.shape == noise.shape and out.dtype == noise.dtype
    for eta in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"eta must be a finite number >= 0, got {eta}"):
            d.sample(lambda x, t: x, noise, steps="ddim3", eta=eta)


# ----------------------------------------------------------------------------- rectified flow


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_euler_exact_on_straight_path(steps):
    rf = create_diffusion("rf", learn_sigma=True)
    x0_star = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = []

    def fn(x, t):
        # exact velocity of the straight path through x0*: (x - x0*) / t == noise - x0* along the path
        assert t.shape == (3,) and (t > 0).all() and (t <= 1).all()
        seen.append(float(t[0]))
        v = (x - x0_star) / t.reshape(-1, 1, 1, 1)
        return torch.cat([v, torch.full_like(v, 1e3)], 1)

    out = rf.sample(fn, noise, steps=steps)
    torch.testing.assert_close(out, x0_star, rtol=0, atol=1e-6)
    assert seen == pytest.approx([i / steps for i in range(steps, 0, -1)])


def test_rf_default_steps_and_validation():
    rf = create_diffusion("rf", learn_sigma=False)
    n = []
    rf.sample(lambda x, t: n.append(1) or torch.zeros_like(x), torch.zeros(1, 1, 1, 1))
    assert len(n) == 50
    for bad in [0, "ddim50", -2, "\u00b2", "\u0663"]:  # superscript two, Arabic-Indic three: not ASCII digits
        with pytest.raises(ValueError, match=repr(bad)):
            rf.sample(lambda x, t: x, torch.zeros(1, 1, 1, 1), steps=bad)
    with pytest.raises(ValueError, match="ddpm"):
        rf.sample(lambda x, t: x, torch.zeros(1, 1, 1, 1), sampler="ddpm")


def test_rf_training_inputs_logit_normal():
    rf = create_diffusion("rf", learn_sigma=True)
    x0 = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    x_t, t_model, ctx = rf.training_inputs(x0, generator=torch.Generator().manual_seed(5))
    assert isinstance(ctx, FlowContext) and t_model.shape == (20000,)
    assert (t_model > 0).all() and (t_model < 1).all()
    assert torch.equal(t_model, ctx.t)  # the model gets t itself, not 1000*t
    logit = torch.log(t_model / (1 - t_model))
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1.0) < 0.05
    torch.testing.assert_close(x_t, (1 - ctx.t).reshape(-1, 1, 1, 1) * x0 + ctx.t.reshape(-1, 1, 1, 1) * ctx.noise)
    again = rf.training_inputs(x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[1], t_model) and torch.equal(again[0], x_t)


def test_rf_loss_hand_formula_and_first_half_channels():
    x0, noise = rand64(3, 2, 3, 3, seed=20), rand64(3, 2, 3, 3, seed=21)
    t = np.array([0.2, 0.5, 0.9])
    xt = (1 - bcast(t, 4)) * x0 + bcast(t, 4) * noise
    ctx = FlowContext(x0=t64(x0), noise=t64(noise), x_t=t64(xt), t=t64(t))
    v = rand64(3, 2, 3, 3, seed=22)
    want = ((v - (noise - x0)) ** 2).mean(axis=(1, 2, 3))
    plain = RectifiedFlow(learn_sigma=False)
    np.testing.assert_allclose(plain.loss(t64(v), ctx)["loss"].numpy(), want, rtol=1e-12)
    learned = RectifiedFlow(learn_sigma=True)
    extra_a, extra_b = rand64(3, 2, 3, 3, seed=23), 100 * rand64(3, 2, 3, 3, seed=24)
    la = learned.loss(t64(np.concatenate([v, extra_a], 1)), ctx)["loss"].numpy()
    lb = learned.loss(t64(np.concatenate([v, extra_b], 1)), ctx)["loss"].numpy()
    np.testing.assert_allclose(la, want, rtol=1e-12)
    np.testing.assert_allclose(lb, want, rtol=1e-12)
    with pytest.raises(ValueError, match="4"):
        learned.loss(t64(v), ctx)


# ----------------------------------------------------------------------------- guidance


def _cond_uncond(c_out=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, c_out, 2, 2, generator=g), torch.randn(3, c_out, 2, 2, generator=g)


def test_cfg_combine_arithmetic():
    cond, uncond = _cond_uncond()
    s = 4.0
    full = uncond + s * (cond - uncond)
    assert torch.equal(cfg_combine(cond, uncond, s), full)
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    ls = cfg_combine(cond, uncond, s, learn_sigma=True)
    assert torch.equal(ls[:, :4], full[:, :4]) and torch.equal(ls[:, 4:], cond[:, 4:])
    q = cfg_combine(cond, uncond, s, guide_channels=3, learn_sigma=True)
    assert torch.equal(q[:, :3], full[:, :3]) and torch.equal(q[:, 3:], cond[:, 3:])
    assert not torch.equal(q[:, 3], full[:, 3])


def test_guided_model_fn_batches_and_scale_one_skips_uncond():
    B, C, null = 3, 4, 10
    y = torch.tensor([1, 5, 7])
    calls = []

    def model(x, t, labels):
        calls.append((x.shape[0], labels.clone(), t.clone()))
        # output depends on the label so cond and uncond differ: channels 0..C-1 eps-like, C..2C-1 "variance"
        return torch.cat([x * (1 + labels.reshape(-1, 1, 1, 1)), x - labels.reshape(-1, 1, 1, 1)], 1).float()

    x = torch.randn(B, C, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 20, 30])
    out = guided_model_fn(model, y, null, 1.0, learn_sigma=True)(x, t)
    assert len(calls) == 1 and calls[0][0] == B and torch.equal(calls[0][1], y)
    assert torch.equal(out, model(x, t, y))
    calls.clear()
    s = 2.5
    out = guided_model_fn(model, y, null, s, learn_sigma=True)(x, t)
    assert len(calls) == 1 and calls[0][0] == 2 * B
    assert torch.equal(calls[0][1], torch.tensor([1, 5, 7, null, null, null]))
    assert torch.equal(calls[0][2], torch.cat([t, t]))
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, null))
    assert torch.equal(out[:, :C], uncond[:, :C] + s * (cond[:, :C] - uncond[:, :C]))
    assert torch.equal(out[:, C:], cond[:, C:])  # variance half unguided
    quirk = guided_model_fn(model, y, null, s, guide_channels=3, learn_sigma=True)(x, t)
    assert torch.equal(quirk[:, 3:], cond[:, 3:]) and torch.equal(quirk[:, :3], out[:, :3])
    with pytest.raises(ValueError, match="0"):
        guided_model_fn(model, y, null, s, guide_channels=0)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"guidance scale must be a finite number, got {scale}"):
            guided_model_fn(model, y, null, scale)


# ----------------------------------------------------------------------------- factory


def test_create_diffusion_factory():
    ddpm = create_diffusion("ddpm", learn_sigma=True)
    rf = create_diffusion("rf", learn_sigma=False, sampling_steps="20")
    assert isinstance(ddpm, GaussianDiffusion) and isinstance(ddpm, Diffusion)
    assert isinstance(rf, RectifiedFlow) and isinstance(rf, Diffusion) and rf.sampling_steps == 20
    assert ddpm.num_timesteps == 1000 and ddpm.sampling_respacing == "250" and ddpm.fixed_variance == "large"
    with pytest.raises(ValueError, match="'vp'"):
        create_diffusion("vp", learn_sigma=True)
    with pytest.raises(ValueError, match="ddim7777"):
        create_diffusion("ddpm", learn_sigma=True, sampling_steps="ddim7777")
    with pytest.raises(ValueError, match="0"):
        create_diffusion("rf", learn_sigma=True, sampling_steps=0)
    with pytest.raises(ValueError, match="0"):
        create_diffusion("ddpm", learn_sigma=True, sampling_steps=0)
