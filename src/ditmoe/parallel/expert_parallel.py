"""Dropless expert-parallel dispatch: tokens travel to the EP rank holding their expert and back.

Shape suffixes: T local tokens, K top-k, E global experts, S EP ranks, El experts per EP rank (E = S*El),
R rows sent (= T*K), Rr rows received, D model width.

One layer's exchange (idea 6 of notes/kernels.md):
    1. route locally and sort the T*K (token, choice) pairs by global expert; because EP rank s holds experts
       ``s*El .. (s+1)*El-1`` the sorted rows are already grouped [destination rank][local expert];
    2. exchange the per-expert counts (one small ``all_to_all_single``) -> the uneven split sizes (one host sync);
    3. one ``all_to_all_single`` of the rows; the received buffer is ordered [source rank][local expert];
    4. run the local experts on it; the reorder to [local expert][source rank] is the experts' own permute gather
       (a K=1 routing plan over the received rows), and its inverse is their unpermute scatter;
    5. the reverse ``all_to_all_single`` returns the rows in the order they were sent, and the routing weights,
       which never left the rank, combine them in fp32 (``ops.unpermute``).
Both exchanges are autograd functions whose backward is the reverse exchange, so gradients reach x, the router
(through the weights) and the local experts. Every rank takes part in every exchange, even with zero rows.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ditmoe.parallel.groups import ExpertShard

# experts(ops, x_TD, weights_TK, plan) -> [T, D]: StackedExperts.forward's signature
ExpertsFn = Callable[[ModuleType, torch.Tensor, torch.Tensor, object], torch.Tensor]


def _exchange_rows(x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x_RD.new_empty((sum(recv_splits), *x_RD.shape[1:]))
    dist.all_to_all_single(out, x_RD.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Rows to other ranks with uneven splits; backward sends the row gradients back the same way reversed."""

    @staticmethod
    def forward(ctx, x_RD, send_splits: list[int], recv_splits: list[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange_rows(x_RD, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, dy_RD):
        return _exchange_rows(dy_RD, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all_rows(
    x_RD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: ProcessGroup | None
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` of rows: ``send_splits[s]`` rows go to rank s, ``recv_splits[s]`` come."""
    return _AllToAllRows.apply(x_RD, send_splits, recv_splits, group)


def exchange_counts(send_counts_SE: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Per-expert row counts: row s of the input goes to rank s; row s of the result came from rank s. [S, El]."""
    recv_counts_SE = torch.empty_like(send_counts_SE)
    dist.all_to_all_single(recv_counts_SE, send_counts_SE.contiguous(), group=group)
    return recv_counts_SE


def received_plan(ops: ModuleType, recv_counts_SE: torch.Tensor, num_rows: int):
    """A top-1 routing plan over the received rows (ordered [source][local expert]) by local expert."""
    S, El = recv_counts_SE.shape
    local_expert_S_El = torch.arange(El, device=recv_counts_SE.device).repeat(S)
    expert_of_row_Rr = torch.repeat_interleave(local_expert_S_El, recv_counts_SE.reshape(-1), output_size=num_rows)
    return ops.routing_plan(expert_of_row_Rr[:, None], El)


def _run_local_experts(
    ops: ModuleType, experts: ExpertsFn, recv_x_RD: torch.Tensor, recv_counts_SE: torch.Tensor
) -> torch.Tensor:
    """The local experts on the received rows, output in received order; routing weights are applied at home.

    A rank that receives nothing runs one zero row through expert 0 and drops it (the kernels' unpermute needs a
    row), so its expert parameters still get a (zero) gradient and backward stays collective.
    """
    num_rows = recv_x_RD.shape[0]
    if num_rows == 0:
        recv_x_RD = recv_x_RD.new_zeros(1, recv_x_RD.shape[1]) + recv_x_RD.sum()  # keeps x's autograd edge
        recv_counts_SE = torch.zeros_like(recv_counts_SE)
        recv_counts_SE[0, 0] = 1
    local_plan = received_plan(ops, recv_counts_SE, recv_x_RD.shape[0])
    unit_weights_R1 = recv_x_RD.new_ones(recv_x_RD.shape[0], 1)
    return experts(ops, recv_x_RD, unit_weights_R1, local_plan)[:num_rows]


def expert_parallel_experts(
    ops: ModuleType,
    experts: ExpertsFn,
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    shard: ExpertShard,
):
    """Dropless routed-expert output [T, D] of this rank's tokens, the experts spread over ``shard.group``.

    ``experts_TK`` holds global expert ids; ``experts`` runs this rank's ``shard.num_local`` experts. Returns the
    output and the global routing plan of the local tokens (its ``counts_E`` are per global expert).
    """
    S, El = shard.ep_size, shard.num_local
    plan = ops.routing_plan(experts_TK, shard.num_experts)  # sorted by global expert = [dest rank][local expert]
    send_counts_SE = plan.counts_E.view(S, El)
    recv_counts_SE = exchange_counts(send_counts_SE, shard.group)
    send_splits, recv_splits = torch.stack([send_counts_SE.sum(1), recv_counts_SE.sum(1)]).tolist()  # host sync

    recv_x_RD = all_to_all_rows(ops.permute(x_TD, plan), send_splits, recv_splits, shard.group)
    y_recv_RD = _run_local_experts(ops, experts, recv_x_RD, recv_counts_SE)
    y_sent_RD = all_to_all_rows(y_recv_RD, recv_splits, send_splits, shard.group)
    return ops.unpermute(y_sent_RD, weights_TK, plan), plan
