"""Multi-head self-attention, optionally with qk-norm (the XL/G flash-attention block of the official code).

Shape suffixes: B batch, T tokens, D hidden, H heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q_BHTDh, k_BHTDh, v_BHTDh = qkv.unbind(0)
        q_BHTDh, k_BHTDh = self.q_norm(q_BHTDh), self.k_norm(k_BHTDh)
        o_BHTDh = F.scaled_dot_product_attention(q_BHTDh, k_BHTDh, v_BHTDh)
        return self.proj(o_BHTDh.transpose(1, 2).reshape(B, T, D))
