"""The naive backend (the official DiT-MoE per-expert loop) against the torch reference: forward and every gradient."""

import pytest
import torch

from ditmoe.config import ConfigError, MoEConfig, model_config
from ditmoe.models.dit import DiTMoE
from ditmoe.models.moe import MoEFeedForward
from ditmoe_kernels import BACKENDS, naive, reference, resolve_backend, select_backend

CPU = torch.device("cpu")


def _experts_TK(T, K, E, gen, unused=()):
    """K distinct experts per token, never one of ``unused``."""
    allowed = torch.tensor([e for e in range(E) if e not in unused])
    scores = torch.rand(T, len(allowed), generator=gen)
    return allowed[scores.topk(K, dim=-1).indices]


def _params(act, E, D, Fi, gen):
    def w(*shape):
        return (torch.randn(*shape, generator=gen) * shape[-1] ** -0.5).requires_grad_(True)

    if act == "swiglu":
        return [w(E, 2 * Fi, D), w(E, D, Fi)]
    return [w(E, Fi, D), w(E, Fi), w(E, D, Fi), w(E, D)]


def _run(ops, act, x, weights, plan, params, probe):
    fn = ops.swiglu_experts if act == "swiglu" else ops.gelu_experts
    inputs = [x, weights, *params]
    out = fn(x, weights, plan, *params)
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    return out, grads


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize(
    "T,K,E,unused,capacity",
    [
        (24, 2, 4, (2,), None),  # expert 2 gets no tokens
        (13, 1, 3, (), None),
        (10, 3, 3, (), None),  # k = E
        (32, 2, 4, (0,), 6),  # capacity drops pairs (and expert 0 is empty)
        (0, 2, 4, (), None),  # an empty batch
    ],
)
def test_naive_equals_reference(act, T, K, E, unused, capacity):
    gen = torch.Generator().manual_seed(T * 10 + E)
    D, Fi = 16, 24
    experts_TK = _experts_TK(T, K, E, gen, unused)
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    weights = torch.rand(T, K, generator=gen, requires_grad=True)
    params = _params(act, E, D, Fi, gen)
    probe = torch.randn(T, D, generator=gen)

    plan = reference.routing_plan(experts_TK, E, capacity)
    if capacity is not None:
        assert int(plan.dropped) > 0
    for e in unused:
        assert int(plan.counts_E[e]) == 0
    out_n, grads_n = _run(naive, act, x, weights, plan, params, probe)
    out_r, grads_r = _run(reference, act, x, weights, plan, params, probe)
    torch.testing.assert_close(out_n, out_r, rtol=1e-5, atol=1e-5)
    names = ["x", "weights"] + (["gate_up", "down"] if act == "swiglu" else ["fc1", "fc1_bias", "fc2", "fc2_bias"])
    for name, a, b in zip(names, grads_n, grads_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    for e in unused:  # an expert without tokens: zero gradient, not missing
        for p, g in zip(params, grads_n[2:], strict=True):
            assert g.shape == p.shape and not g[e].any()


def test_naive_gelu_experts_without_biases_equal_the_reference():
    gen = torch.Generator().manual_seed(5)
    experts_TK = _experts_TK(12, 2, 3, gen)
    x, weights = torch.randn(12, 16, generator=gen), torch.rand(12, 2, generator=gen)
    fc1, _, fc2, _ = _params("gelu", 3, 16, 24, gen)
    plan = reference.routing_plan(experts_TK, 3)
    out_n = naive.gelu_experts(x, weights, plan, fc1, None, fc2, None)
    torch.testing.assert_close(out_n, reference.gelu_experts(x, weights, plan, fc1, None, fc2, None))


def test_flat_experts_inverts_the_plan():
    gen = torch.Generator().manual_seed(0)
    experts_TK = _experts_TK(20, 2, 4, gen)
    assert torch.equal(naive.flat_experts(reference.routing_plan(experts_TK, 4)), experts_TK.flatten())
    plan = reference.routing_plan(experts_TK, 4, capacity=5)
    flat = naive.flat_experts(plan)
    kept = flat < 4
    assert int((~kept).sum()) == int(plan.dropped)
    assert torch.equal(flat[kept], experts_TK.flatten()[kept])


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_moe_layer_naive_equals_torch(act):
    """The whole layer (router gradients through the routing weights, shared expert) with each backend."""
    torch.manual_seed(0)
    D, E = 16, 4
    layers = {}
    for backend in ("torch", "naive"):
        torch.manual_seed(0)
        layers[backend] = MoEFeedForward(D, MoEConfig(num_experts=E, top_k=2, expert_act=act, backend=backend))
    x = torch.randn(2, 9, D)
    probe = torch.randn_like(x)
    results = {}
    for backend, layer in layers.items():
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        ((out.out_BLD * probe).sum() + out.aux_loss).backward()
        results[backend] = (out, xi.grad, {n: p.grad for n, p in layer.named_parameters()})
    (out_t, gx_t, g_t), (out_n, gx_n, g_n) = results["torch"], results["naive"]
    torch.testing.assert_close(out_n.out_BLD, out_t.out_BLD, rtol=1e-5, atol=1e-5)
    assert torch.equal(out_n.stats.tokens_per_expert_E, out_t.stats.tokens_per_expert_E)
    torch.testing.assert_close(gx_n, gx_t, rtol=1e-4, atol=1e-5)
    assert g_n.keys() == g_t.keys() and "router.weight" in g_n
    for n in g_t:
        torch.testing.assert_close(g_n[n], g_t[n], rtol=1e-4, atol=1e-5, msg=f"gradient of {n}")


def test_dit_moe_naive_equals_torch(monkeypatch):
    monkeypatch.delenv("DITMOE_MOE_BACKEND", raising=False)
    grads, outs = {}, {}
    for backend in ("torch", "naive"):
        cfg = model_config(
            "DiT-MoE-micro/4-4E2A", image_size=16, latent=False, in_channels=1, num_classes=10, moe={"backend": backend}
        )
        torch.manual_seed(0)
        model = DiTMoE(cfg)
        with torch.no_grad():  # leave DiT's zero init, so every parameter gets a gradient
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3, 1, 16, 16, generator=gen)
        t = torch.tensor([3.0, 400.0, 999.0])
        y = torch.tensor([1, 10, 4])
        out = model(x, t, y)
        (out.prediction.square().mean() + out.aux_loss).backward()
        outs[backend] = out
        grads[backend] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs["naive"].prediction, outs["torch"].prediction, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["naive"].aux_loss, outs["torch"].aux_loss)
    for a, b in zip(outs["naive"].routing, outs["torch"].routing, strict=True):
        assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E)
    assert grads["naive"].keys() == grads["torch"].keys()
    assert any(".experts.gate_up_proj" in n for n in grads["naive"])
    for n in grads["torch"]:
        torch.testing.assert_close(grads["naive"][n], grads["torch"][n], rtol=1e-4, atol=1e-6, msg=f"grad {n}")


def test_naive_backend_selection(monkeypatch):
    monkeypatch.delenv("DITMOE_MOE_BACKEND", raising=False)
    assert "naive" in BACKENDS
    assert resolve_backend("naive", CPU) == "naive"
    assert select_backend("naive", CPU) is naive
    assert select_backend("auto", CPU) is reference
    monkeypatch.setenv("DITMOE_MOE_BACKEND", "naive")
    assert select_backend("torch", CPU) is naive


def test_config_accepts_naive_backend():
    MoEConfig(backend="naive").validate()
    with pytest.raises(ConfigError, match="'naive'"):
        MoEConfig(backend="loop").validate()
