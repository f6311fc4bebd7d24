"""The DiT-MoE feed-forward: a softmax top-k router, stacked routed experts and an always-on shared expert.

Shape suffixes: B batch, L tokens per image, T = B*L tokens, D hidden, E routed experts, K top-k, F intermediate.

The routed experts of a layer live in one module as stacked tensors ``[E, out, in]``; the dispatch (routing plan,
permutation, grouped GEMMs, weighted combine) is delegated to ``ditmoe_kernels`` (torch reference on CPU, Triton on
CUDA). The layer returns its auxiliary loss and routing statistics explicitly; nothing is stored on the module.

Expert parallelism: given an EP process group of size ``ep``, each rank allocates only its ``E/ep`` consecutive
experts (``StackedExperts.global_expert_ids``) and the dispatch exchanges tokens with ``ditmoe.parallel``; the router
and shared expert stay replicated and routing statistics stay per global expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from ditmoe.config import ConfigError, MoEConfig
from ditmoe.parallel.expert_parallel import expert_parallel_experts
from ditmoe.parallel.groups import expert_shard
from ditmoe_kernels import select_backend


@dataclass
class RoutingStats:
    """What one MoE layer did with one batch. Tensors are detached and stay on device (no host sync)."""

    tokens_per_expert_E: torch.Tensor  # int64 [E] pairs kept per expert
    router_entropy: torch.Tensor  # [] mean over tokens of the router distribution's entropy (nats)
    dropped: torch.Tensor  # int64 [] pairs dropped by the capacity limit
    balance_loss: torch.Tensor  # [] the layer's balance loss (already multiplied by alpha)
    z_loss: torch.Tensor  # [] the layer's router z-loss (already multiplied by its coefficient)
    experts_BLK: torch.Tensor  # int64 [B, L, K] chosen experts per token, for specialisation analysis


@dataclass
class MoEOutput:
    out_BLD: torch.Tensor
    aux_loss: torch.Tensor  # [] balance + z-loss of this layer, to be added to the training loss
    stats: RoutingStats


class SwiGLU(nn.Module):
    """Dense ``down(silu(gate(x)) * up(x))`` without biases (the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class StackedExperts(nn.Module):
    """E routed experts as stacked weights, nn.Linear layout ``[E, out, in]``.

    SwiGLU: gate_up_proj [E, 2F, D] (each expert's gate rows, then its up rows: the official per-expert
    ``gate_proj`` and ``up_proj`` stacked, so one GEMM computes both), down_proj [E, D, F]; no biases, as the
    official code.
    GELU (DiT's MLP, for upcycling): fc1 [E, F, D] + fc1_bias [E, F], fc2 [E, D, F] + fc2_bias [E, D].
    Every parameter is tagged ``is_expert = True`` so parallel code can shard and reduce it separately.
    Under expert parallelism the module holds only ``local_experts`` (global ids, a range of ``num_experts``): row i
    of every stacked parameter is global expert ``global_expert_ids[i]``.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, act: str, local_experts: range | None = None
    ):
        super().__init__()
        self.act = act
        self.num_global_experts = num_experts
        self.global_expert_ids = range(num_experts) if local_experts is None else local_experts
        E, D, Fi = len(self.global_expert_ids), hidden_size, intermediate_size
        if act == "swiglu":
            self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fi, D))
            self.down_proj = nn.Parameter(torch.empty(E, D, Fi))
        else:
            self.fc1 = nn.Parameter(torch.empty(E, Fi, D))
            self.fc1_bias = nn.Parameter(torch.empty(E, Fi))
            self.fc2 = nn.Parameter(torch.empty(E, D, Fi))
            self.fc2_bias = nn.Parameter(torch.empty(E, D))
        for p in self.parameters():
            p.is_expert = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform per expert (as DiT initialises every nn.Linear), zero biases.

        A rank holding a slice draws all experts and keeps its own, so the same seed gives the same global experts
        at every expert-parallel size (and different experts on different EP ranks).
        """
        ids = self.global_expert_ids
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
                continue
            fan_out, fan_in = p.shape[1] // (2 if name == "gate_up_proj" else 1), p.shape[2]  # per nn.Linear
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            if len(ids) == self.num_global_experts:
                nn.init.uniform_(p, -bound, bound)
            else:
                every_expert = nn.init.uniform_(p.new_empty(self.num_global_experts, *p.shape[1:]), -bound, bound)
                with torch.no_grad():
                    p.copy_(every_expert[ids.start : ids.stop])

    def forward(self, ops, x_TD: torch.Tensor, weights_TK: torch.Tensor, plan) -> torch.Tensor:
        if self.act == "swiglu":
            return ops.swiglu_experts(x_TD, weights_TK, plan, self.gate_up_proj, self.down_proj)
        return ops.gelu_experts(x_TD, weights_TK, plan, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias)


class MoEFeedForward(nn.Module):
    """Router + routed experts + shared expert. ``ep_group``: split the routed experts over this process group."""

    def __init__(self, hidden_size: int, cfg: MoEConfig, ep_group: ProcessGroup | None = None):
        super().__init__()
        self.cfg = cfg
        self.expert_shard = expert_shard(cfg.num_experts, ep_group)  # all experts, no group, when ep_group is None
        if ep_group is not None and cfg.capacity_factor is not None:
            raise ConfigError(
                f"capacity_factor={cfg.capacity_factor} is not supported with expert parallelism yet; "
                "use the dropless default (capacity_factor=None)"
            )
        self.router = nn.Linear(hidden_size, cfg.num_experts, bias=False)  # kaiming-uniform(a=sqrt(5)) default
        self.experts = StackedExperts(
            cfg.num_experts,
            hidden_size,
            cfg.expert_width(hidden_size),
            cfg.expert_act,
            local_experts=self.expert_shard.global_expert_ids,
        )
        shared = cfg.shared_width(hidden_size)
        self.shared_expert = SwiGLU(hidden_size, shared) if shared > 0 else None

    def capacity(self, num_tokens: int) -> int | None:
        """Pairs each expert may keep: ceil(factor * T * K / E), or None when dropless."""
        cf, E, K = self.cfg.capacity_factor, self.cfg.num_experts, self.cfg.top_k
        # in exact fractions: 1.1 * 200 * 2 / 8 is 55.000000000000007 in floats, whose ceiling would be 56
        return None if cf is None else max(1, math.ceil(Fraction(str(cf)) * num_tokens * K / E))

    def forward(self, x_BLD: torch.Tensor) -> MoEOutput:
        cfg = self.cfg
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        logits_TE = self.router(x_TD).float()
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = torch.topk(probs_TE, cfg.top_k, dim=-1)
        if cfg.norm_topk_prob and cfg.top_k > 1:  # as official: one weight renormalised to 1 has no router gradient
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        ops = select_backend(cfg.backend, x_TD.device)
        if self.expert_shard.group is None:
            plan = ops.routing_plan(experts_TK, cfg.num_experts, self.capacity(B * L))
            out_TD = self.experts(ops, x_TD, weights_TK.to(x_TD.dtype), plan)
        else:
            out_TD, plan = expert_parallel_experts(
                ops, self.experts, x_TD, weights_TK.to(x_TD.dtype), experts_TK, self.expert_shard
            )
        if self.shared_expert is not None:
            out_TD = out_TD + self.shared_expert(x_TD)

        chosen_TE = choice_counts(experts_TK, cfg.num_experts)
        balance = cfg.balance_loss_alpha * balance_loss(probs_TE, chosen_TE, cfg.top_k, B, cfg.balance_loss_type)
        aux = balance
        if cfg.router_z_loss > 0:  # skipped at 0 (the default): a dozen ops per layer and step for a zero
            z_loss = cfg.router_z_loss * torch.logsumexp(logits_TE, dim=-1).square().mean()
            aux = aux + z_loss
        else:
            z_loss = balance.new_zeros(())
        with torch.no_grad():
            # entr(p) = -p log p, 0 at p = 0; an empty batch has 0, not the mean of nothing
            entropy = torch.special.entr(probs_TE).sum() / max(B * L, 1)
        stats = RoutingStats(  # integer tensors carry no gradient: only the losses need detaching
            tokens_per_expert_E=plan.counts_E,
            router_entropy=entropy,
            dropped=plan.dropped,
            balance_loss=balance.detach(),
            z_loss=z_loss.detach(),
            experts_BLK=experts_TK.view(B, L, cfg.top_k),
        )
        return MoEOutput(out_TD.view(B, L, D), aux, stats)


def choice_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.LongTensor:
    """int64 [T, E]: how many of each token's K choices went to each expert. Unlike ``torch.bincount`` (which reads
    the largest id back to size its output) it never makes the host wait for the GPU."""
    experts_E = torch.arange(num_experts, device=experts_TK.device)
    return (experts_TK.unsqueeze(-1) == experts_E).sum(1)


def balance_loss(
    probs_TE: torch.Tensor, chosen_TE: torch.Tensor, top_k: int, batch: int, kind: str = "expert"
) -> torch.Tensor:
    """Switch/DeepSeek balance loss ``sum_i P_i * f_i`` (before alpha).

    P_i: mean router probability of expert i; f_i = E * (share of the T*K routed pairs that chose i), from
    ``chosen_TE`` (``choice_counts``). ``expert``: over all tokens of the batch (official default); ``sequence``: per
    image, then averaged.
    """
    T, E = probs_TE.shape
    if T == 0:  # an empty batch (a rank without tokens): nothing to balance
        return probs_TE.sum()
    G = 1 if kind == "expert" else batch
    L = T // G
    P_GE = probs_TE.view(G, L, E).mean(1)
    counts_GE = chosen_TE.view(G, L, E).sum(1)
    # mean over groups of sum_i P_i * E * counts_i / (L * K), as one scaled sum: fewer ops per layer and step
    return (P_GE * counts_GE).sum() * (E / (top_k * L * G))
