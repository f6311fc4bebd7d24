"""Input embeddings of DiT: patches, fixed 2D sin-cos positions, timesteps and class labels.

Shape suffixes: B batch, C channels, H/W spatial, T tokens, D hidden, P frequency dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: [B, C, H, W] -> [B, T, D]."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time (cos first, as DiT) -> Linear-SiLU-Linear: [B] -> [B, D]."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def sinusoid(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs_P = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
        args_BP = t_B.float()[:, None] * freqs_P[None]
        emb = torch.cat([torch.cos(args_BP), torch.sin(args_BP)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoid(t_B, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class label -> [B, D]. Row ``num_classes`` is the null class for classifier-free guidance.

    Label dropout is done by the training loop (it replaces labels with the null id using its own generator),
    so this module is a plain lookup and training and sampling share one path.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_B)


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding as in MAE/DiT: [grid*grid, D] float64."""
    if hidden_size % 4:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for the 2D sin-cos embedding")
    coords = np.arange(grid_size, dtype=np.float64)
    col, row = np.meshgrid(coords, coords)  # token i = (row i // grid, col i % grid)
    # As DiT: the first half of the channels embeds the column index, the second half the row index.
    emb_col = _sincos_1d(hidden_size // 2, col.reshape(-1))
    emb_row = _sincos_1d(hidden_size // 2, row.reshape(-1))
    return np.concatenate([emb_col, emb_row], axis=1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
