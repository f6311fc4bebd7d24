"""MoE dispatch kernels. ``reference`` is pure torch (CPU path, test oracle); Triton kernels live beside it.

Installed as the package ``ditmoe_kernels`` (see pyproject.toml). ``select_backend`` picks the implementation the
MoE layer calls; the environment variable ``DITMOE_MOE_BACKEND`` (``torch``, ``triton`` or ``naive``) overrides the
config. Backends:
    torch   ``reference``: grouped GEMMs over expert-sorted rows, pure torch (any device)
    triton  ``triton_ops``: fused Triton kernels (CUDA)
    naive   ``naive``: the official DiT-MoE per-expert loop over boolean masks (any device), a baseline to compare
            against; same routing plan, results equal to ``torch``
    auto    triton on CUDA where available, torch elsewhere
Every backend checks its inputs alike (``checks``): expert ids out of range, shapes that do not fit the routing
plan and integer tensors where values are multiplied raise ValueError naming them. The Triton kernels compute in
float32, bfloat16 or float16 and refuse other dtypes (float64: use ``torch``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from ditmoe_kernels import naive, reference

BACKENDS = ("auto", "torch", "triton", "naive")


def resolve_backend(requested: str, device: torch.device) -> str:
    """``auto`` -> triton on CUDA, torch elsewhere; ``DITMOE_MOE_BACKEND`` wins over ``requested``."""
    choice = os.environ.get("DITMOE_MOE_BACKEND", requested) or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"MoE backend must be one of {BACKENDS}, got {choice!r} (from DITMOE_MOE_BACKEND or config)")
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton_ops() is not None else "torch"
    return choice


def select_backend(requested: str, device: torch.device) -> ModuleType:
    """The module providing ``routing_plan``, ``swiglu_experts`` and ``gelu_experts`` for this device."""
    choice = resolve_backend(requested, device)
    if choice == "torch":
        return reference
    if choice == "naive":
        return naive
    ops = _triton_ops()
    if ops is None:
        raise RuntimeError("MoE backend 'triton' requested but the Triton kernels are not available")
    return ops


def _triton_ops() -> ModuleType | None:
    """The Triton implementation, or None where Triton or its module is not installed."""
    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("ditmoe_kernels.triton_ops") is None:
        return None
    return importlib.import_module("ditmoe_kernels.triton_ops")
