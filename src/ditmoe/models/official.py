"""Load checkpoints of the official DiT-MoE code (github.com/feizc/DiT-MoE) into ``DiTMoE``.

The official layout keeps one module per expert (``moe.experts.{j}.gate_proj.weight`` [F, D]); ours stacks them
(``moe.experts.down_proj`` [E, D, F]), gate and up into one tensor (``moe.experts.gate_up_proj`` [E, 2F, D]: each
expert's gate rows, then its up rows). The XL/G flash-attention block names ``Wqkv``/``out_proj`` where the S/B
block names ``qkv``/``proj``.
"""

from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

from ditmoe.config import ModelConfig
from ditmoe.models.dit import DiTMoE
from ditmoe.parallel.expert_state import join_gate_up, stack_expert_rows

_EXPERT = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_RENAMES = [
    (re.compile(r"\.moe\.gate\.weight$"), ".moe.router.weight"),
    (re.compile(r"\.moe\.shared_experts\."), ".moe.shared_expert."),
    (re.compile(r"\.attn\.Wqkv\."), ".attn.qkv."),
    (re.compile(r"\.attn\.out_proj\."), ".attn.proj."),
]


def convert_official_state_dict(official: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Official key layout -> ours: rename, stack each layer's per-expert weights into [E, ...] and join the gate
    and up weights."""
    ours: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, value in official.items():
        key = key.removeprefix("module.")
        m = _EXPERT.match(key)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = value
            continue
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        ours[key] = value
    rows = {}
    for (block, proj), by_id in experts.items():
        if sorted(by_id) != list(range(num_experts)):
            raise KeyError(f"block {block} {proj}: expected experts 0..{num_experts - 1}, found {sorted(by_id)}")
        rows[f"blocks.{block}.moe.experts.{proj}"] = by_id
    return {**ours, **stack_expert_rows(join_gate_up(rows))}  # as our own checkpoints' expert rows load


def load_official(path: Path | str, cfg: ModelConfig, *, prefer: str = "ema") -> DiTMoE:
    """Build ``DiTMoE(cfg)`` and load an official ``.pt``: a state dict, or train.py's checkpoint (its "ema" or
    "model" entry; train.py also pickles its argparse options, the one object loaded beside tensors)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # torch names the object in a line of its long message
            what = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), "")
            raise ValueError(f"{path} holds objects other than tensors and train.py's options. {what}") from None
    if isinstance(raw, dict) and prefer in raw and isinstance(raw[prefer], dict):
        raw = raw[prefer]
    elif isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    model = DiTMoE(cfg)
    state = convert_official_state_dict(raw, cfg.moe.num_experts)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            f"{path} does not match {cfg.name}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model
