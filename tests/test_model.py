"""The DiT backbone: shapes, init, official checkpoint layout, and the official per-expert algorithm as oracle."""

import argparse
import datetime
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditmoe.cli import main
from ditmoe.config import model_config
from ditmoe.models.attention import Attention
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


def test_every_block_starts_as_identity_adaln_zero():
    # DiT models.py initialize_weights: "Zero-out adaLN modulation layers in DiT blocks" (every block, not only the
    # final layer), so each block's gates are 0 and the block returns its input unchanged at init.
    torch.manual_seed(0)
    model = DiTMoE(tiny())
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0
        x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
        out, _ = block(x, c)
        assert torch.equal(out, x)


def _dit_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT/MAE get_2d_sincos_pos_embed, written out: grid = meshgrid(w, h) (w first), emb_h from grid[0], emb_w
    from grid[1], concatenated [emb_h, emb_w]; each 1D half is [sin(pos*omega), cos(pos*omega)] with
    omega_i = 1/10000^(i/(D/4))."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    half = []
    for g in (grid[0], grid[1]):
        d = embed_dim // 2
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(g.reshape(-1), omega)
        half.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    return np.concatenate(half, axis=1)


def test_pos_embed_matches_dit_get_2d_sincos_pos_embed():
    # Official checkpoints store pos_embed, but our model builds its own for fresh training and for
    # checkpoints loaded without it: channels [0, D/2) must embed the column (w) index and [D/2, D) the row.
    model = DiTMoE(tiny())  # 8x8 image, patch 2: a 4x4 grid, D = 32
    want = _dit_2d_sincos_pos_embed(32, 4)
    assert want[1, 0] != want[4, 0]  # token 1 is (row 0, col 1), token 4 is (row 1, col 0): the halves differ
    np.testing.assert_allclose(model.pos_embed[0].numpy(), want, rtol=0, atol=1e-6)


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _assert_uniform_bound(w: torch.Tensor, bound: float, what: str):
    # >= 1000 draws of U(-b, b): the max |w| lies within 0.5% of b (and may round up past it in float32); any of
    # the alternative inits (other fans, kaiming) has a bound at least 8% away from it.
    assert w.numel() >= 1000, what
    m = w.abs().max().item()
    assert 0.95 * bound < m <= bound * (1 + 1e-6), f"{what}: max |w| {m:.4f}, expected the bound {bound:.4f}"


def test_init_follows_the_official_per_module_init():
    """DiT models.py initialize_weights + DiT-MoE models.py (MoEGate.reset_parameters, per-expert nn.Linear)."""
    torch.manual_seed(0)
    cfg = model_config("DiT-MoE-tiny/2-16E2A", image_size=64, num_classes=1000)  # D=64, F=256, 4 latent channels
    model = DiTMoE(cfg)
    D, F_ = 64, 256
    blocks = model.blocks
    cat = torch.cat
    # routed experts: separate nn.Linear(D, F) gate_proj / up_proj and nn.Linear(F, D) down_proj, each xavier'd
    gate_up = cat([b.moe.experts.gate_up_proj.flatten() for b in blocks])
    _assert_uniform_bound(gate_up, _xavier_bound(D, F_), "expert gate/up")
    _assert_uniform_bound(cat([b.moe.experts.down_proj.flatten() for b in blocks]), _xavier_bound(F_, D), "down")
    # shared expert: SwiGLU of width 2D, plain nn.Linear layers
    _assert_uniform_bound(
        cat([b.moe.shared_expert.up_proj.weight.flatten() for b in blocks]), _xavier_bound(D, 2 * D), "shared up"
    )
    # router: MoEGate.weight is an nn.Parameter, kaiming_uniform_(a=sqrt(5)) -> bound 1/sqrt(D); DiT's xavier loop
    # only visits nn.Linear modules
    _assert_uniform_bound(cat([b.moe.router.weight.flatten() for b in blocks]), 1 / math.sqrt(D), "router")
    # attention: timm's one qkv nn.Linear(D, 3D), xavier with zero bias
    _assert_uniform_bound(cat([b.attn.qkv.weight.flatten() for b in blocks]), _xavier_bound(D, 3 * D), "qkv")
    assert all(torch.count_nonzero(b.attn.qkv.bias) == 0 and torch.count_nonzero(b.attn.proj.bias) == 0 for b in blocks)
    # patch embed: "Initialize patch_embed like nn.Linear (instead of nn.Conv2d)": xavier on weight.view(D, -1)
    _assert_uniform_bound(model.x_embedder.proj.weight, _xavier_bound(4 * 2 * 2, D), "x_embedder")
    assert torch.count_nonzero(model.x_embedder.proj.bias) == 0
    # label table N(0, 0.02): 1001 x 64 draws, so the sample std is within 1% (tolerance 5%; N(0, 1) is 50x off)
    std = model.y_embedder.embedding_table.weight.std().item()
    assert abs(std - 0.02) < 0.02 * 0.05, std
    # timestep MLP N(0, 0.02) (xavier on [64, 256] would give std 0.079), zero biases
    for i in (0, 2):
        std = model.t_embedder.mlp[i].weight.std().item()
        assert abs(std - 0.02) < 0.02 * 0.05, (i, std)
        assert torch.count_nonzero(model.t_embedder.mlp[i].bias) == 0


def test_qk_norm_uses_eps_1e6_where_it_matters():
    # The XL/G flash block (official train_deepspeed.py / models.py): LayerNorm(head_dim, eps=1e-6) on q and k.
    # With q, k of magnitude ~1e-3 (variance ~1e-6) the eps decides the normalised scale.
    torch.manual_seed(0)
    D, H = 32, 2
    attn = Attention(D, H, qk_norm=True)
    with torch.no_grad():
        attn.qkv.weight[: 2 * D] *= 1e-3  # q and k rows tiny, v untouched
        attn.qkv.bias[: 2 * D] *= 1e-3
        for n in (attn.q_norm, attn.k_norm):
            n.weight.normal_(1.0, 0.5)
            n.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 5, D)

    def reference(eps):
        q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(2, 5, 3, H, D // H).permute(2, 0, 3, 1, 4)

        def ln(a, norm):  # LayerNorm written out: biased variance, eps inside the square root
            mu = a.mean(-1, keepdim=True)
            var = ((a - mu) ** 2).mean(-1, keepdim=True)
            return (a - mu) / torch.sqrt(var + eps) * norm.weight + norm.bias

        q, k = ln(q, attn.q_norm), ln(k, attn.k_norm)
        o = ((q @ k.transpose(-1, -2)) * (D // H) ** -0.5).softmax(-1) @ v
        return F.linear(o.transpose(1, 2).reshape(2, 5, D), attn.proj.weight, attn.proj.bias)

    want = reference(1e-6)
    assert (want - reference(1e-2)).abs().max() > 1e-2  # this input does tell the two eps apart
    torch.testing.assert_close(attn(x), want, rtol=1e-4, atol=1e-5)


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


def test_sample_cli_samples_an_official_checkpoint_through_its_vae(vae_dir, tmp_path, capsys):
    """An official .pt carries no config: --model, --image-size and --diffusion give it; its samples are SD-VAE
    latents (scale 0.18215), decoded by --vae, in the file our own sampler makes of the same weights."""
    from ditmoe.data.vae import load_vae
    from ditmoe.sampling.npz import batch_seed
    from ditmoe.sampling.sample import generate, load_official_sampler, to_uint8

    cfg = model_config("DiT-MoE-micro/2-4E2A", image_size=16)  # latents [4, 2, 2], 1000 classes
    torch.manual_seed(0)
    src = DiTMoE(cfg)
    _randomise(src)
    path = tmp_path / "dit_moe_micro.pt"
    torch.save({"ema": official_state_dict(src, flash=False)}, path)
    common = ["sample", "--ckpt", str(path), "--classes", "1,7", "--per-class", "1", "--steps", "ddim2"]
    official = ["--model", "DiT-MoE-micro/2-4E2A", "--image-size", "16", "--diffusion", "ddpm"]
    assert main([*common, *official, "--vae", str(vae_dir), "--out", str(tmp_path / "s.npz")]) == 0
    sampler = load_official_sampler(path, cfg, "ddpm")
    latents = generate(sampler, [1, 7], steps="ddim2", seed=batch_seed(0, 0), progress=False)
    expected = to_uint8(load_vae(vae_dir, "cpu", 0.18215).decode(latents))
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (2, 4, 4, 3) and z["arr_1"].tolist() == [1, 7]
        np.testing.assert_array_equal(z["arr_0"], expected)
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "g.png")]) == 2  # no --model: one line that says what to give
    assert "carries no config: give --model" in capsys.readouterr().err
    wrong = ["--model", "DiT-MoE-micro/2-8E2A", "--image-size", "16", "--diffusion", "ddpm"]
    assert main([*common, *wrong, "--vae", str(vae_dir), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not hold an official DiT-MoE-micro/2-8E2A" in err and err.count("\n") == 0
