"""The DiT backbone: shapes, init, official checkpoint layout, and the official per-expert algorithm as oracle."""

import argparse
import datetime
import math

import pytest
import torch
import torch.nn.functional as F

from ditmoe.config import model_config
from ditmoe.models.dit import DiTMoE
from ditmoe.models.official import load_official


def tiny(**kw):
    return model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, num_classes=5, **kw)


def test_forward_shapes_and_zero_init_output():
    torch.manual_seed(0)
    model = DiTMoE(tiny())
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 4, 5]))  # 5 = null class
    assert out.prediction.shape == (3, 2, 8, 8)  # learn_sigma doubles the channels
    assert torch.count_nonzero(out.prediction) == 0  # adaLN-Zero: the output layer starts at zero
    assert len(out.routing) == 2 and out.aux_loss.item() > 0


def official_state_dict(model: DiTMoE, flash: bool) -> dict:
    """Our weights in the official key layout (as the note lists it), built key by key."""
    cfg = model.cfg
    sd = {}
    for k, v in model.state_dict().items():
        if ".moe.experts." in k:
            block, proj = k.split(".")[1], k.split(".")[-1]
            for j in range(cfg.moe.num_experts):
                if proj == "gate_up_proj":  # the official experts keep gate and up apart
                    gate, up = v[j].chunk(2)
                    sd[f"blocks.{block}.moe.experts.{j}.gate_proj.weight"] = gate.clone()
                    sd[f"blocks.{block}.moe.experts.{j}.up_proj.weight"] = up.clone()
                else:
                    sd[f"blocks.{block}.moe.experts.{j}.{proj}.weight"] = v[j].clone()
            continue
        k = k.replace(".moe.router.", ".moe.gate.").replace(".moe.shared_expert.", ".moe.shared_experts.")
        if flash:
            k = k.replace(".attn.qkv.", ".attn.Wqkv.").replace(".attn.proj.", ".attn.out_proj.")
        sd[k] = v.clone()
    return sd


def official_forward(sd: dict, cfg, x, t, y, flash: bool) -> torch.Tensor:
    """The official algorithm written from the key layout: tokens repeated k times, experts looped with masks. Only
    torch here: none of our model's code."""

    def official_moe(i, h_BLD):
        B, L, D = h_BLD.shape
        h = h_BLD.reshape(-1, D)
        probs = F.linear(h, sd[f"blocks.{i}.moe.gate.weight"]).softmax(-1)
        w, idx = torch.topk(probs, cfg.moe.top_k, dim=-1)
        rep = h.repeat_interleave(cfg.moe.top_k, dim=0)
        y_rep = torch.empty_like(rep)
        flat = idx.reshape(-1)
        for j in range(cfg.moe.num_experts):
            mask = flat == j
            g = sd[f"blocks.{i}.moe.experts.{j}.gate_proj.weight"]
            u = sd[f"blocks.{i}.moe.experts.{j}.up_proj.weight"]
            d = sd[f"blocks.{i}.moe.experts.{j}.down_proj.weight"]
            y_rep[mask] = F.linear(F.silu(F.linear(rep[mask], g)) * F.linear(rep[mask], u), d)
        out = (y_rep.view(-1, cfg.moe.top_k, D) * w.unsqueeze(-1)).sum(1)
        s = f"blocks.{i}.moe.shared_experts."
        shared = F.linear(
            F.silu(F.linear(h, sd[s + "gate_proj.weight"])) * F.linear(h, sd[s + "up_proj.weight"]),
            sd[s + "down_proj.weight"],
        )
        return (out + shared).view(B, L, D)

    qkv, proj = ("Wqkv", "out_proj") if flash else ("qkv", "proj")
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=cfg.patch_size)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    # DiT's timestep_embedding: cos, then sin, of t * 10000^(-i/128) for i < 128
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    temb = F.linear(
        F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
        sd["t_embedder.mlp.2.weight"],
        sd["t_embedder.mlp.2.bias"],
    )
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    D, H = cfg.hidden_size, cfg.num_heads
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"]).chunk(6, 1)
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + mod[1][:, None]) + mod[0][:, None]
        B, L, _ = a.shape
        q, k, v = (
            F.linear(a, sd[p + f"attn.{qkv}.weight"], sd[p + f"attn.{qkv}.bias"])
            .view(B, L, 3, H, D // H)
            .permute(2, 0, 3, 1, 4)
        )
        if flash:
            q = F.layer_norm(q, (D // H,), sd[p + "attn.q_norm.weight"], sd[p + "attn.q_norm.bias"], eps=1e-6)
            k = F.layer_norm(k, (D // H,), sd[p + "attn.k_norm.weight"], sd[p + "attn.k_norm.bias"], eps=1e-6)
        att = ((q @ k.transpose(-1, -2)) * (D // H) ** -0.5).softmax(-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(B, L, D), sd[p + f"attn.{proj}.weight"], sd[p + f"attn.{proj}.bias"])
        h = h + mod[2][:, None] * att
        m = F.layer_norm(h, (D,), eps=1e-6) * (1 + mod[4][:, None]) + mod[3][:, None]
        h = h + mod[5][:, None] * official_moe(i, m)
    fmod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = fmod.chunk(2, 1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = F.linear(h, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    # DiT's unpatchify: [N, h*w, p*p*c] -> [N, c, h*p, w*p]
    p, c, side = cfg.patch_size, cfg.out_channels, int(h.shape[1] ** 0.5)
    h = torch.einsum("nhwpqc->nchpwq", h.reshape(h.shape[0], side, side, p, p, c))
    return h.reshape(h.shape[0], c, side * p, side * p)


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)


def test_official_checkpoint_loads_and_matches_the_official_algorithm(tmp_path):
    for flash in (False, True):
        torch.manual_seed(1)
        cfg = tiny(qk_norm=flash)
        src = DiTMoE(cfg)
        _randomise(src)  # adaLN-Zero would make every output zero
        sd = official_state_dict(src, flash)
        path = tmp_path / f"official_{flash}.pt"
        torch.save({"ema": sd, "model": {}}, path)
        loaded = load_official(path, cfg)
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 3])
        ours = loaded(x, t, y).prediction
        assert ours.abs().max() > 0
        torch.testing.assert_close(ours, official_forward(sd, cfg, x, t, y, flash), rtol=1e-4, atol=1e-4)


def test_official_checkpoint_with_wrong_preset_is_refused(tmp_path):
    src = DiTMoE(tiny())
    path = tmp_path / "official.pt"
    torch.save(official_state_dict(src, flash=False), path)
    other = model_config("DiT-MoE-micro/2-8E2A", image_size=8, latent=False, num_classes=5)
    try:
        load_official(path, other)
    except KeyError as e:
        assert "experts 0..7" in str(e)
    else:
        raise AssertionError("loading a 4-expert checkpoint into an 8-expert model must fail")


def test_official_train_py_checkpoint_loads_its_ema_weights(tmp_path):
    """The official train.py saves {"model", "ema", "opt", "args"} with its argparse options pickled beside the
    tensors; the EMA weights load. Any other pickled object is refused, named, without running its code."""
    cfg = tiny()
    ema, raw = DiTMoE(cfg), DiTMoE(cfg)
    _randomise(ema)
    args = argparse.Namespace(model="DiT-S/2", num_experts=4, num_experts_per_tok=2, lr=1e-4)
    path = tmp_path / "0050000.pt"
    sd = official_state_dict(ema, flash=False)
    torch.save({"model": official_state_dict(raw, flash=False), "ema": sd, "opt": {}, "args": args}, path)
    loaded = load_official(path, cfg)
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.save({"ema": sd, "args": datetime.date(2024, 7, 16)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt holds objects other than tensors.*datetime.date"):
        load_official(tmp_path / "other.pt", cfg)
