"""Pure-torch MoE dispatch: the CPU path and the oracle for the Triton kernels.

Shape suffixes:
    T  tokens            K  experts chosen per token (top-k)
    E  routed experts    R  permuted rows = T*K (static; dropped rows sort to the end)
    D  model width       F  expert intermediate width
    O, I  output / input width of a grouped GEMM weight stored like nn.Linear: [E, O, I]

A "flat" id is ``token * K + slot``: the position of one (token, choice) pair in ``experts_TK.flatten()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ditmoe_kernels import checks


@dataclass
class RoutingPlan:
    """Where each (token, choice) pair goes. Rows of the permuted buffer are sorted by expert, stably."""

    sorted_flat_R: torch.Tensor  # int64 [R]: flat id held by each permuted row; dropped pairs come last
    counts_E: torch.Tensor  # int64 [E]: rows kept per expert
    offsets_E1: torch.Tensor  # int64 [E+1]: exclusive scan of counts_E; offsets_E1[-1] = rows kept
    dropped: torch.Tensor  # int64 []: pairs dropped by the capacity limit (0 when dropless)
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()


def routing_plan(experts_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> RoutingPlan:
    """Sort (token, choice) pairs by expert, stable in flat order.

    With ``capacity``, each expert keeps at most that many pairs; priority goes to first choices over second
    choices, then to earlier tokens (GShard order). Dropped pairs are routed to a sentinel expert ``E`` so every
    shape stays static at R = T*K. Ids outside [0, num_experts) raise ValueError (see ``checks``).
    """
    checks.check_routing(experts_TK, num_experts, capacity)
    T, K = experts_TK.shape
    flat_R = experts_TK.reshape(-1).long()
    if capacity is not None:
        # Rank of each pair within its expert in priority order (slot-major, then token).
        prio = experts_TK.t().reshape(-1).long()  # [K*T] slot-major
        onehot = F.one_hot(prio, num_experts)
        rank = (onehot.cumsum(0) - 1).gather(1, prio[:, None]).squeeze(1)  # [K*T]
        keep = (rank < capacity).view(K, T).t().reshape(-1)  # back to flat order
        flat_R = torch.where(keep, flat_R, torch.full_like(flat_R, num_experts))
    sorted_flat_R = torch.argsort(flat_R, stable=True)
    counts_E = torch.bincount(flat_R, minlength=num_experts + 1)[:num_experts]
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=experts_TK.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    dropped = T * K - offsets_E1[-1]
    return RoutingPlan(sorted_flat_R, counts_E, offsets_E1, dropped, K)


def permute(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather one copy of each token per choice into expert-sorted order: [R, D]."""
    checks.check_permute(x_TD, plan)
    return x_TD.index_select(0, plan.sorted_flat_R // plan.top_k)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a grouped GEMM on ``x`` computes in: ``x``'s, or the autocast dtype under autocast."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, plan: RoutingPlan, bias_EO: torch.Tensor | None = None):
    """Per-expert ``x @ w[e].T (+ b[e])`` on contiguous row groups; rows past the kept ones are zero. [R, O].
    Weights and bias are cast to the dtype of x (to the autocast dtype under autocast)."""
    checks.check_grouped_mm(x_RI, w_EOI, plan, bias_EO)
    dt = compute_dtype(x_RI)
    x_RI, w_EOI = x_RI.to(dt), w_EOI.to(dt)
    bias_EO = None if bias_EO is None else bias_EO.to(dt)
    y_RO = _GroupedMM.apply(x_RI, w_EOI, plan.counts_E.tolist())  # the reference path may sync; Triton does not
    if bias_EO is None:
        return y_RO
    row_bias = torch.repeat_interleave(bias_EO, plan.counts_E, dim=0, output_size=int(plan.offsets_E1[-1]))
    return y_RO + F.pad(row_bias, (0, 0, 0, y_RO.shape[0] - row_bias.shape[0]))


class _GroupedMM(torch.autograd.Function):
    """Loops experts writing into one preallocated output (no concatenation copies); backward likewise."""

    @staticmethod
    def forward(ctx, x_RI, w_EOI, counts: list[int]):
        ctx.save_for_backward(x_RI, w_EOI)
        ctx.counts = counts
        y_RO = x_RI.new_zeros(x_RI.shape[0], w_EOI.shape[1])
        start = 0
        for e, n in enumerate(counts):
            torch.mm(x_RI[start : start + n], w_EOI[e].t(), out=y_RO[start : start + n])
            start += n
        return y_RO

    @staticmethod
    @once_differentiable  # its torch.mm(out=...) calls record no graph: a second derivative is refused, not wrong
    def backward(ctx, dy_RO):
        x_RI, w_EOI = ctx.saved_tensors
        dx_RI = torch.zeros_like(x_RI) if ctx.needs_input_grad[0] else None
        dw_EOI = torch.zeros_like(w_EOI) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            rows = slice(start, start + n)
            if dx_RI is not None:
                torch.mm(dy_RO[rows], w_EOI[e], out=dx_RI[rows])
            if dw_EOI is not None:
                torch.mm(dy_RO[rows].t(), x_RI[rows], out=dw_EOI[e])
            start += n
        return dx_RI, dw_EOI, None


class _SwiGLU(torch.autograd.Function):
    """``silu(g) * u`` keeping only g and u for backward (silu is recomputed)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        silu = g * sig
        return dh * u * (sig * (1 + g * (1 - sig))), dh * silu


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(g, u)


def unpermute(y_RD: torch.Tensor, weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs, accumulated in fp32 (float64 for float64), in the dtype of y.
    [T, D]."""
    checks.check_unpermute(y_RD, weights_TK, plan)
    T, K = weights_TK.shape
    y_flat = torch.empty_like(y_RD).index_copy(0, plan.sorted_flat_R, y_RD)  # back to flat order (inverse perm)
    acc = torch.promote_types(y_RD.dtype, torch.float32)  # float64 stays float64
    out = (y_flat.view(T, K, y_RD.shape[-1]).to(acc) * weights_TK.to(acc).unsqueeze(-1)).sum(1)
    return out.to(y_RD.dtype)


def swiglu_experts(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF) -> torch.Tensor:
    """Routed SwiGLU experts: ``down(silu(gate(x)) * up(x))`` per expert (``gate_up`` [E, 2F, D]: the gate rows,
    then the up rows), combined with the routing weights."""
    checks.check_swiglu(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF)
    x_RD = permute(x_TD, plan)
    h_RF = swiglu(*grouped_mm(x_RD, gate_up_E2FD, plan).chunk(2, dim=-1))
    return unpermute(grouped_mm(h_RF, down_EDF, plan), weights_TK, plan)


def gelu_experts(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED) -> torch.Tensor:
    """Routed GELU (tanh) experts as in DiT's MLP, for upcycling a dense DiT."""
    checks.check_gelu(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED)
    x_RD = permute(x_TD, plan)
    h_RF = F.gelu(grouped_mm(x_RD, fc1_EFD, plan, fc1_bias_EF), approximate="tanh")
    return unpermute(grouped_mm(h_RF, fc2_EDF, plan, fc2_bias_ED), weights_TK, plan)
