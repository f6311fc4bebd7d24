"""Parameter counts (on the meta device) and per-image compute of a DiT-MoE config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ditmoe.config import ModelConfig
from ditmoe.models.dit import DiTMoE


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    activated_params: int  # non-expert parameters + top_k / num_experts of the routed experts
    paper_gflops: float  # multiply-accumulates per image, attention scores excluded (the paper's Table 1 unit)
    train_flops: float  # 3 x 2 x MACs per image including attention scores (forward + backward), for MFU


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated) parameters of the model built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = DiTMoE(cfg)
    total = expert = 0
    for p in model.parameters():
        total += p.numel()
        if getattr(p, "is_expert", False):
            expert += p.numel()
    activated = total - expert + expert * cfg.moe.top_k // cfg.moe.num_experts
    return total, activated


def forward_macs(cfg: ModelConfig, include_attention_scores: bool) -> float:
    """Multiply-accumulates of one forward pass for one image."""
    T, D, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    E, K = cfg.moe.num_experts, cfg.moe.top_k
    F_routed = cfg.moe.expert_width(D)
    F_shared = cfg.moe.shared_width(D)
    mats_per_expert = 3 if cfg.moe.expert_act == "swiglu" else 2  # gate, up, down | fc1, fc2
    embed = T * D * cfg.in_channels * p * p + 256 * D + D * D  # patches + timestep MLP
    block = (
        6 * D * D  # adaLN modulation (once per image)
        + T * 4 * D * D  # qkv + output projection
        + T * D * E  # router
        + T * K * mats_per_expert * D * F_routed  # K routed experts per token
        + T * 3 * D * F_shared  # shared SwiGLU expert
    )
    if include_attention_scores:
        block += 2 * T * T * D  # QK^T and attention-weighted V
    final = 2 * D * D + T * D * p * p * cfg.out_channels
    return float(embed + cfg.depth * block + final)


def model_size(cfg: ModelConfig) -> ModelSize:
    total, activated = count_params(cfg)
    return ModelSize(
        total_params=total,
        activated_params=activated,
        paper_gflops=forward_macs(cfg, include_attention_scores=False) / 1e9,
        train_flops=3 * 2 * forward_macs(cfg, include_attention_scores=True),
    )
