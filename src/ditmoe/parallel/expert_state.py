"""Map between a model's full (global) state dict and the expert slices an EP rank holds.

A module holding routed experts exposes ``global_expert_ids`` (a ``range``) and ``num_global_experts`` (the layer's
experts on all EP ranks); its stacked parameters are ``[len(global_expert_ids), ...]`` and row i is global expert
``global_expert_ids[i]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def _stacked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(state-dict key, module) of every stacked expert parameter of ``model``."""
    for prefix, module in model.named_modules():
        if isinstance(getattr(module, "global_expert_ids", None), range):
            for name, _ in module.named_parameters(recurse=False):
                yield (f"{prefix}.{name}" if prefix else name), module


def expert_slices(model: nn.Module) -> dict[str, range]:
    """State-dict key -> global expert ids held in its rows, for every stacked expert parameter of ``model``."""
    return {key: module.global_expert_ids for key, module in _stacked_parameters(model)}


def local_state_dict(model: nn.Module, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``global_state`` (every expert stacked, as a model without EP saves it) cut to the experts ``model`` holds.
    Its expert entries must hold as many experts as the model's layers (``num_global_experts``)."""
    stacked = dict(_stacked_parameters(model))
    out = {}
    for key, value in global_state.items():
        module = stacked.get(key)
        if module is None:
            out[key] = value
            continue
        total = module.num_global_experts
        if value.shape[0] != total:
            raise ValueError(f"{key}: holds {value.shape[0]} experts, the model's layer has {total}")
        ids = module.global_expert_ids
        out[key] = value[ids.start : ids.stop]
    return out


# Checkpoint rows: {state-dict key: {global expert id: [...] tensor}}, one entry per expert, cloned out of the stack
# so that saving one expert never writes the whole stacked storage.
ExpertRows = dict[str, dict[int, torch.Tensor]]


def split_expert_rows(
    state: dict[str, torch.Tensor], slices: dict[str, range]
) -> tuple[dict[str, torch.Tensor], ExpertRows]:
    """(replicated entries, expert rows by global id) of a rank's state dict; ``slices`` from ``expert_slices``."""
    dense = {k: v for k, v in state.items() if k not in slices}
    rows: ExpertRows = {}
    for key, ids in slices.items():
        if key in state:
            rows[key] = {gid: state[key][i].detach().clone() for i, gid in enumerate(ids)}
    return dense, rows


def merge_expert_rows(parts: list[ExpertRows]) -> ExpertRows:
    """Rows from several files (e.g. one per EP rank) into one mapping; an expert id present twice is an error."""
    merged: ExpertRows = {}
    for part in parts:
        for key, rows in part.items():
            into = merged.setdefault(key, {})
            twice = into.keys() & rows.keys()
            if twice:
                raise ValueError(f"{key}: experts {sorted(twice)} saved more than once")
            into.update(rows)
    return merged


def stack_expert_rows(rows: ExpertRows, wanted: dict[str, range] | None = None) -> dict[str, torch.Tensor]:
    """Stacked ``[len(ids), ...]`` tensors for the ids ``wanted`` per key (all saved ids, 0..E-1, when None)."""
    out = {}
    for key, by_id in rows.items():
        if wanted is not None and key not in wanted:
            raise ValueError(f"{key}: saved as routed experts, but the model has no such expert parameter")
        ids = wanted[key] if wanted is not None else range(len(by_id))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{key}: experts {missing[:8]} are not in the checkpoint (it holds {len(by_id)})")
        out[key] = torch.stack([by_id[i] for i in ids])
    return out


def join_gate_up(rows: ExpertRows) -> ExpertRows:
    """Rows saved before routed experts kept gate and up in one tensor: each ``X.gate_proj`` and ``X.up_proj``
    pair ([F, D] per expert) becomes ``X.gate_up_proj`` ([2F, D]); other keys pass through."""
    out = dict(rows)
    for key in [k for k in rows if k.endswith(".gate_proj")]:
        base = key.removesuffix("gate_proj")
        if f"{base}up_proj" in out:
            gate, up = out.pop(key), out.pop(f"{base}up_proj")
            out[f"{base}gate_up_proj"] = {gid: torch.cat([g, up[gid]]) for gid, g in gate.items()}
    return out
