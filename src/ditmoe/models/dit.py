"""DiT-MoE: a class-conditional diffusion transformer whose every MLP is a mixture of experts.

Shape suffixes: B batch, C channels, H/W spatial, T tokens, D hidden, p patch size.

    x_BCHW --PatchEmbed--> + pos --> [DiTBlock x depth] --> FinalLayer --> unpatchify --> [B, C_out, H, W]
    c_BD = t_embed(t) + y_embed(y) modulates every block (adaLN-Zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import ProcessGroup

from ditmoe.config import ModelConfig
from ditmoe.models.attention import Attention
from ditmoe.models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d
from ditmoe.models.moe import MoEFeedForward, RoutingStats


def modulate(x_BTD: torch.Tensor, shift_BD: torch.Tensor, scale_BD: torch.Tensor) -> torch.Tensor:
    return x_BTD * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


@dataclass
class DiTOutput:
    prediction: torch.Tensor  # [B, C_out, H, W]
    aux_loss: torch.Tensor  # [] sum of the MoE layers' balance and z-losses
    routing: list[RoutingStats]  # one per block, in depth order


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block with an MoE feed-forward (experts split over ``ep_group`` when given)."""

    def __init__(self, cfg: ModelConfig, ep_group: ProcessGroup | None = None):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.moe = MoEFeedForward(D, cfg.moe, ep_group)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BD).chunk(6, dim=1)
        x_BTD = x_BTD + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x_BTD), shift_msa, scale_msa))
        moe = self.moe(modulate(self.norm2(x_BTD), shift_mlp, scale_mlp))
        return x_BTD + gate_mlp.unsqueeze(1) * moe.out_BLD, moe


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x_BTD: torch.Tensor, c_BD: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x_BTD), shift, scale))


class DiTMoE(nn.Module):
    """``ep_group``: expert-parallel process group; each rank then holds E/ep experts of every layer."""

    def __init__(self, cfg: ModelConfig, ep_group: ProcessGroup | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg, ep_group) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        if not self.pos_embed.is_meta:
            self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears with zero bias, N(0, 0.02) embeddings, adaLN and output zeroed."""
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear) and m is not block.moe.router:
                    nn.init.xavier_uniform_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        grid = int(self.cfg.num_tokens**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.cfg.hidden_size, grid)).float()[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for i in (0, 2):
            nn.init.normal_(self.t_embedder.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.t_embedder.mlp[i].bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x_BTP: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W]."""
        p, C = self.cfg.patch_size, self.cfg.out_channels
        h = w = int(x_BTP.shape[1] ** 0.5)
        x = x_BTP.reshape(x_BTP.shape[0], h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x_BTP.shape[0], C, h * p, w * p)

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: torch.Tensor) -> DiTOutput:
        """x: noisy input; t: the diffusion's model time (float or int) per sample; y: labels (null id allowed)."""
        x_BTD = self.x_embedder(x_BCHW) + self.pos_embed
        c_BD = self.t_embedder(t_B) + self.y_embedder(y_B)
        aux, routing = [], []
        for block in self.blocks:
            x_BTD, moe = block(x_BTD, c_BD)
            aux.append(moe.aux_loss)
            routing.append(moe.stats)
        out = self.unpatchify(self.final_layer(x_BTD, c_BD))
        return DiTOutput(out, torch.stack(aux).sum(), routing)  # one sum, not one add per block
