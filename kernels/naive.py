"""The official DiT-MoE expert computation: a per-expert loop over boolean masks (a baseline, not a fast path).

github.com/feizc/DiT-MoE ``models.py`` ``MoE.forward`` in training mode::

    x = x.repeat_interleave(K, dim=0)                 # every token K times: row token * K + slot
    y = torch.empty_like(x)
    for i, expert in enumerate(self.experts):
        y[flat_topk_idx == i] = expert(x[flat_topk_idx == i])
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)

Only ``swiglu_experts`` and ``gelu_experts`` differ from ``reference``: the routing plan, ``permute`` and
``unpermute`` (used by expert parallelism) are the reference's. The expert of each (token, choice) pair, which the
official code has as ``flat_topk_idx``, is read back from the plan (one O(T*K) scatter). Two deliberate differences:
the output buffer starts at zero rather than uninitialised, so pairs dropped by a capacity limit (routed to the
sentinel expert E, which no mask selects) contribute zero exactly as in the reference; and it takes the dtype of
the experts' output (bf16 under autocast) so the masked writes type-check. Every boolean mask costs a host sync,
as in the official code.

Shape suffixes as in ``reference``: T tokens, K top-k, E experts, R = T*K pairs, D model width, F expert width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ditmoe_kernels import checks
from ditmoe_kernels.reference import RoutingPlan, permute, routing_plan, unpermute

__all__ = ["RoutingPlan", "flat_experts", "gelu_experts", "permute", "routing_plan", "swiglu_experts", "unpermute"]


def flat_experts(plan: RoutingPlan) -> torch.Tensor:
    """Expert of every (token, choice) pair in flat order, i.e. ``experts_TK.flatten()``; dropped pairs get E. [R]"""
    R = plan.sorted_flat_R.numel()
    rows_R = torch.arange(R, device=plan.sorted_flat_R.device)
    # permuted row r belongs to the expert whose [offset, offset + count) holds it; rows past the kept ones -> E
    expert_of_row_R = torch.searchsorted(plan.offsets_E1[1:], rows_R, right=True)
    return torch.empty_like(expert_of_row_R).index_copy_(0, plan.sorted_flat_R, expert_of_row_R)


def _per_expert_loop(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    plan: RoutingPlan,
    expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    T, K = weights_TK.shape
    x_RD = x_TD.repeat_interleave(K, dim=0)
    flat_R = flat_experts(plan)
    y_RD = None
    for e in range(plan.num_experts):
        mask_R = flat_R == e
        y_e = expert(e, x_RD[mask_R])  # an expert without tokens runs on zero rows (its grads are zeros)
        if y_RD is None:
            y_RD = y_e.new_zeros(x_RD.shape[0], y_e.shape[-1])
        y_RD[mask_R] = y_e
    return (y_RD.view(T, K, y_RD.shape[-1]) * weights_TK.unsqueeze(-1).to(y_RD.dtype)).sum(1)


def swiglu_experts(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF) -> torch.Tensor:
    """Routed SwiGLU experts ``down(silu(gate(x)) * up(x))``, one expert at a time (``gate_up`` [E, 2F, D]: the
    official per-expert gate and up weights, stacked)."""
    checks.check_swiglu(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF)
    F_ = gate_up_E2FD.shape[1] // 2

    def expert(e, x):
        gate, up = gate_up_E2FD[e, :F_], gate_up_E2FD[e, F_:]
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down_EDF[e])

    return _per_expert_loop(x_TD, weights_TK, plan, expert)


def gelu_experts(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED) -> torch.Tensor:
    """Routed GELU (tanh) experts as DiT's MLP, one expert at a time."""
    checks.check_gelu(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED)

    def bias(b_EO, e):
        return None if b_EO is None else b_EO[e]

    def expert(e, x):
        h = F.gelu(F.linear(x, fc1_EFD[e], bias(fc1_bias_EF, e)), approximate="tanh")
        return F.linear(h, fc2_EDF[e], bias(fc2_bias_ED, e))

    return _per_expert_loop(x_TD, weights_TK, plan, expert)
