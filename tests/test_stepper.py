"""The single-process optimizer step: fused AdamW, gradient clipping, and a host cost that does not grow per tensor."""

import collections
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditmoe.config import model_config
from ditmoe.models.dit import DiTMoE
from ditmoe.training.config import TrainConfig
from ditmoe.training.ema import EMA
from ditmoe.training.stepper import TorchStepper, adamw


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _model(depth: int) -> DiTMoE:
    torch.manual_seed(0)
    return DiTMoE(model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, num_classes=5, depth=depth))


def _fill_grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)


def test_adamw_is_fused_and_makes_the_unfused_update():
    fused, plain = _model(2), _model(2)
    opt = adamw(list(fused.parameters()), lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(plain.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert opt.defaults["fused"] is True
    for step in range(3):
        for m, o in ((fused, opt), (plain, ref)):
            _fill_grads(m, step)
            o.step()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_optimizer_step_and_ema_issue_the_same_ops_for_any_depth():
    """The host's share of the step: a fixed number of multi-tensor ops, not some per parameter."""
    counts = []
    for depth in (2, 5):
        model = _model(depth)
        stepper, ema = TorchStepper(model, TrainConfig()), EMA(model, 0.99)
        for step in range(2):  # the first step creates the optimizer state
            _fill_grads(model, step)
            log = OpCount()
            with log:
                assert stepper.step().applied
                ema.update(model, step)
        counts.append(log.ops)
    assert counts[0] == counts[1], (counts[0] - counts[1]) + (counts[1] - counts[0])
    assert counts[0]["aten._fused_adamw_"] == 1


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_grad_clip_limits_the_update_and_reports_the_norm_before(clip):
    model = _model(2)
    stepper = TorchStepper(model, TrainConfig(grad_clip=clip))
    _fill_grads(model, 7)
    norm = torch.stack([p.grad.norm() for p in stepper.params]).norm().item()
    seen = []
    step = stepper.optimizer.step
    stepper.optimizer.step = lambda: (seen.append(torch.stack([p.grad.norm() for p in stepper.params]).norm()), step())
    result = stepper.step()
    assert result.applied and result.grad_norm == pytest.approx(norm, rel=1e-5)
    assert seen[0].item() == pytest.approx(min(norm, clip) if clip else norm, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_balance_loss_enters_the_gradient_summed_over_layers_and_scaled_per_micro_batch():
    """At init the adaLN gates are zero, so the experts' output does not reach the loss: each router's gradient is
    that of its layer's alpha * sum_i P_i f_i alone (f constant), divided by the accumulation steps."""
    from ditmoe.diffusion import create_diffusion
    from ditmoe.training.loop import train_step

    alpha, accum = 0.5, 2
    torch.manual_seed(0)
    moe = {"balance_loss_alpha": alpha}
    model = DiTMoE(model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, num_classes=5, depth=3, moe=moe))
    cfg = TrainConfig(grad_accum=accum)
    inputs = []
    for block in model.blocks:
        block.moe.register_forward_hook(lambda module, args, out: inputs.append(args[0].detach()))
    gen = torch.Generator().manual_seed(0)
    x0, y = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([1, 3])
    train_step(TorchStepper(model, cfg), create_diffusion("rf", learn_sigma=True), x0, y, gen)
    for block, x_BLD in zip(model.blocks, inputs, strict=True):
        w = block.moe.router.weight.detach().requires_grad_()
        probs_TE = (x_BLD.reshape(-1, x_BLD.shape[-1]) @ w.t()).softmax(-1)
        E, K = probs_TE.shape[1], model.cfg.moe.top_k
        f_E = torch.nn.functional.one_hot(probs_TE.topk(K).indices.flatten(), E).float().mean(0) * E
        (alpha * (probs_TE.mean(0) * f_E).sum() / accum).backward()
        torch.testing.assert_close(block.moe.router.weight.grad, w.grad, rtol=1e-5, atol=1e-8)
        assert w.grad.norm() > 0


def test_a_non_finite_gradient_skips_the_update():
    model = _model(2)
    stepper = TorchStepper(model, TrainConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fill_grads(model, 1)
    next(p for p in model.parameters() if p.requires_grad).grad[0] = float("nan")
    result = stepper.step()
    assert not result.applied and math.isnan(result.grad_norm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and not stepper.optimizer.state
