"""The MoE reference path against a naive per-token loop, the balance loss against its formula, capacity drops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditmoe.config import MoEConfig
from ditmoe.models.moe import MoEFeedForward

torch.set_default_dtype(torch.float32)


def naive_moe(layer: MoEFeedForward, x_BLD: torch.Tensor, keep=None) -> torch.Tensor:
    """Token by token, choice by choice: the definition of the layer. ``keep[t, k]`` masks dropped pairs."""
    cfg, ex = layer.cfg, layer.experts
    B, L, D = x_BLD.shape
    x_TD = x_BLD.reshape(-1, D)
    probs = (x_TD @ layer.router.weight.t()).softmax(-1)
    w, idx = torch.topk(probs, cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(D)
        for k in range(cfg.top_k):
            if keep is not None and not keep[t, k]:
                continue
            e, xt = idx[t, k].item(), x_TD[t]
            if cfg.expert_act == "swiglu":
                gate, up = (ex.gate_up_proj[e] @ xt).chunk(2)
                h = F.silu(gate) * up
                y = ex.down_proj[e] @ h
            else:
                h = F.gelu(ex.fc1[e] @ xt + ex.fc1_bias[e], approximate="tanh")
                y = ex.fc2[e] @ h + ex.fc2_bias[e]
            acc = acc + w[t, k] * y
        if layer.shared_expert is not None:
            acc = acc + layer.shared_expert(x_TD[t])
        rows.append(acc)
    return torch.stack(rows).view(B, L, D)


def _grads(layer, x, fn, probe):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    (fn(x) * probe).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


CASES = [
    # (B, L, D, E, K, act, shared)
    (2, 5, 16, 4, 2, "swiglu", 2.0),
    (1, 1, 8, 4, 2, "swiglu", 2.0),  # a single token
    (2, 3, 8, 1, 1, "swiglu", 0.0),  # E = 1
    (2, 4, 8, 3, 3, "swiglu", 2.0),  # k = E
    (3, 4, 12, 6, 2, "gelu", 0.0),
    (2, 7, 16, 8, 1, "swiglu", 1.0),
]


@pytest.mark.parametrize("B,L,D,E,K,act,shared", CASES)
def test_reference_equals_naive_loop(B, L, D, E, K, act, shared):
    torch.manual_seed(B * 100 + L * 10 + E)
    cfg = MoEConfig(num_experts=E, top_k=K, expert_act=act, shared_expert_ratio=shared, backend="torch")
    layer = MoEFeedForward(D, cfg)
    x = torch.randn(B, L, D)
    out = layer(x).out_BLD
    torch.testing.assert_close(out, naive_moe(layer, x), rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(x)
    ours = _grads(layer, x, lambda x: layer(x).out_BLD, probe)
    ref = _grads(layer, x, lambda x: naive_moe(layer, x), probe)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


def test_expert_without_tokens_gets_zero_grad():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, backend="torch"))
    with torch.no_grad():
        layer.router.weight[0] = -10.0  # x > 0 below, so expert 0 always has the lowest logit
    x = torch.rand(2, 6, 8) + 0.1
    res = layer(x)
    assert res.stats.tokens_per_expert_E[0] == 0
    torch.testing.assert_close(res.out_BLD, naive_moe(layer, x), rtol=1e-5, atol=1e-5)
    res.out_BLD.square().sum().backward()
    assert torch.count_nonzero(layer.experts.gate_up_proj.grad[0]) == 0
    assert torch.count_nonzero(layer.experts.gate_up_proj.grad[1:]) > 0


def test_norm_topk_prob_renormalises():
    torch.manual_seed(1)
    layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, norm_topk_prob=True, backend="torch"))
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(layer(x).out_BLD, naive_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_norm_topk_prob_keeps_a_single_choice_its_probability():
    """As the official gate: top-1 is not renormalised, whose weight 1 would leave the router no gradient from the
    experts' output."""
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    grads = []
    for norm in (False, True):
        torch.manual_seed(1)
        layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=1, norm_topk_prob=norm, balance_loss_alpha=0.0))
        layer(x).out_BLD.square().sum().backward()
        grads.append(layer.router.weight.grad)
    assert grads[0].norm() > 0.1
    torch.testing.assert_close(grads[1], grads[0])


def _hand_balance(probs, idx, E, K, groups):
    probs, idx = probs.numpy().astype(np.float64), idx.numpy()
    T = probs.shape[0]
    per = T // groups
    total = 0.0
    for g in range(groups):
        sl = slice(g * per, (g + 1) * per)
        P = probs[sl].mean(0)
        counts = np.zeros(E)
        for e in idx[sl].reshape(-1):
            counts[e] += 1
        f = E * counts / (per * K)
        total += float((P * f).sum())
    return total / groups


@pytest.mark.parametrize("kind", ["expert", "sequence"])
def test_balance_loss_matches_formula(kind):
    torch.manual_seed(2)
    B, L, D, E, K, alpha = 3, 5, 8, 4, 2, 0.01
    layer = MoEFeedForward(D, MoEConfig(num_experts=E, top_k=K, balance_loss_alpha=alpha, balance_loss_type=kind))
    x = torch.randn(B, L, D)
    res = layer(x)
    probs = (x.reshape(-1, D) @ layer.router.weight.t()).softmax(-1).detach()
    idx = torch.topk(probs, K, -1).indices
    expected = alpha * _hand_balance(probs, idx, E, K, 1 if kind == "expert" else B)
    assert res.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert res.stats.balance_loss.item() == pytest.approx(expected, rel=1e-5)
    assert res.stats.z_loss.item() == 0.0  # router_z_loss = 0: not computed, reported as zero


def test_balance_loss_is_one_times_alpha_when_uniform():
    # With identical router rows every token sees P_i = 1/E; f sums to E, so the loss is exactly alpha.
    layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, balance_loss_alpha=0.5))
    with torch.no_grad():
        layer.router.weight.zero_()
    assert layer(torch.randn(2, 4, 8)).aux_loss.item() == pytest.approx(0.5, rel=1e-6)


def test_router_z_loss():
    torch.manual_seed(3)
    layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, balance_loss_alpha=0.0, router_z_loss=0.1))
    x = torch.randn(2, 3, 8)
    logits = x.reshape(-1, 8) @ layer.router.weight.t()
    expected = 0.1 * torch.logsumexp(logits, -1).square().mean()
    assert layer(x).aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_capacity_drops_exactly_the_overflow_and_counts_it():
    torch.manual_seed(4)
    B, L, D, E, K, cf = 2, 8, 8, 4, 2, 0.5
    layer = MoEFeedForward(D, MoEConfig(num_experts=E, top_k=K, capacity_factor=cf, backend="torch"))
    x = torch.randn(B, L, D)
    res = layer(x)
    T = B * L
    cap = math.ceil(cf * T * K / E)
    probs = (x.reshape(-1, D) @ layer.router.weight.t()).softmax(-1)
    idx = torch.topk(probs, K, -1).indices
    # Priority: all first choices in token order, then all second choices.
    used = [0] * E
    keep = torch.zeros(T, K, dtype=torch.bool)
    for k in range(K):
        for t in range(T):
            e = idx[t, k].item()
            if used[e] < cap:
                used[e] += 1
                keep[t, k] = True
    assert res.stats.dropped.item() == int((~keep).sum()) > 0
    assert res.stats.tokens_per_expert_E.tolist() == used
    torch.testing.assert_close(res.out_BLD, naive_moe(layer, x, keep=keep), rtol=1e-5, atol=1e-5)


def test_capacity_is_the_exact_ceiling():
    """ceil(cf * T * K / E) of the exact product: 1.1 * 200 * 2 / 8 = 55 (in floats 55.000000000000007 -> 56)."""
    layer = MoEFeedForward(8, MoEConfig(num_experts=8, top_k=2, capacity_factor=1.1))
    assert layer.capacity(200) == 55 and layer.capacity(201) == 56 and layer.capacity(1) == 1


@pytest.mark.parametrize("kind", ["expert", "sequence"])
def test_an_empty_batch_routes_nothing_and_costs_nothing(kind):
    """No tokens (a batch of 0 images, or a rank left without tokens): zero output, zero losses, no division by 0."""
    layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, balance_loss_type=kind, backend="torch"))
    x = torch.randn(0, 5, 8, requires_grad=True)
    res = layer(x)
    assert res.out_BLD.shape == (0, 5, 8) and res.aux_loss.item() == 0 and res.stats.router_entropy.item() == 0
    (res.out_BLD.sum() + res.aux_loss).backward()
    assert layer.router.weight.grad is not None and not layer.router.weight.grad.any()


def test_shared_expert_on_and_off():
    torch.manual_seed(5)
    on = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, shared_expert_ratio=2.0))
    off = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2, shared_expert_ratio=0.0))
    assert off.shared_expert is None and on.shared_expert.gate_proj.weight.shape == (16, 8)
    off.load_state_dict({k: v for k, v in on.state_dict().items() if "shared" not in k})
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(on(x).out_BLD, off(x).out_BLD + on.shared_expert(x), rtol=1e-5, atol=1e-6)


def test_routing_stats():
    torch.manual_seed(6)
    layer = MoEFeedForward(8, MoEConfig(num_experts=4, top_k=2))
    res = layer(torch.randn(2, 5, 8))
    st = res.stats
    assert st.tokens_per_expert_E.sum().item() == 2 * 5 * 2 and st.dropped.item() == 0
    assert st.experts_BLK.shape == (2, 5, 2)
    assert 0 < st.router_entropy.item() <= math.log(4) + 1e-6
