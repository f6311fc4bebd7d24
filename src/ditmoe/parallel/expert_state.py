"""Map between a model's full (global) state dict and the expert slices an EP rank holds.

A module holding routed experts exposes ``global_expert_ids`` (a ``range``); its stacked parameters are
``[len(global_expert_ids), ...]`` and row i is global expert ``global_expert_ids[i]``.
"""

from __future__ import annotations

import torch
from torch import nn


def expert_slices(model: nn.Module) -> dict[str, range]:
    """State-dict key -> global expert ids held in its rows, for every stacked expert parameter of ``model``."""
    slices = {}
    for prefix, module in model.named_modules():
        ids = getattr(module, "global_expert_ids", None)
        if isinstance(ids, range):
            for name, _ in module.named_parameters(recurse=False):
                slices[f"{prefix}.{name}" if prefix else name] = ids
    return slices


def local_state_dict(model: nn.Module, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``global_state`` (every expert stacked, as a model without EP saves it) cut to the experts ``model`` holds."""
    slices = expert_slices(model)
    out = {}
    for key, value in global_state.items():
        ids = slices.get(key)
        if ids is not None and value.shape[0] < ids.stop:
            raise ValueError(f"{key}: holds {value.shape[0]} experts, this rank needs global experts {ids}")
        out[key] = value if ids is None else value[ids.start : ids.stop]
    return out
