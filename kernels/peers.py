"""Other projects' MoE pieces in our shapes: oracles in tests and peers in ``bench/bench_kernels.py``, never our code
path (``select_backend`` offers none of them).

- DeepSpeed 0.19's AutoEP (``deepspeed.module_inject.auto_ep_layer``, ``deepspeed.moe.ep_experts``): its Triton
  grouped GEMM (``group_gemm_triton``: forward, dX and dW; what AutoEP's experts run where torch._grouped_mm has no
  fused kernel) and its fused SwiGLU; ``autoep_swiglu_experts`` is AutoEP's local path (no expert parallelism) end
  to end, with its default combine (a scatter, then the weighted sum over top-k in fp32). Its opt-in fused weighted
  restore (``deepspeed_combine``) runs on a GPU only: the interpreter refuses its kernel's mask (a block of bools
  and'ed with a scalar one).
- megatron-core 0.16's permute / unpermute (``moe_utils``, its unfused torch path), which take a [T, E] routing map
  and probabilities; ``megatron_grouped_mm_swiglu_experts`` puts them around torch._grouped_mm (sm90+).

DeepSpeed defines its Triton kernels only where a GPU driver is active, and picks each GEMM's tiles by timing its
configs. Under ``TRITON_INTERPRET=1`` (CPU tests) ``deepspeed_triton`` therefore imports the kernel modules again
with Triton marked available (for them alone), and pins each autotuned kernel to one small config; with a GPU it
changes nothing. The 3.9 interpreter multiplies bf16 wrongly in ``tl.dot``, so there DeepSpeed's GEMMs are oracles
in fp32 only. Neither project routes with a capacity: these take dropless routings.

Shape suffixes as in ``reference``: T tokens, K top-k, E experts, R = T*K rows, D model width, F expert width.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch

from ditmoe_kernels.triton_ops.common import INTERPRET

_DS_TRITON = ("group_gemm_triton", "autoep_fused_token_ops", "swiglu_triton")


@functools.cache
def deepspeed_triton() -> SimpleNamespace:
    """DeepSpeed's Triton op modules ``gemm`` (group_gemm_triton) and ``tokens`` (autoep_fused_token_ops), with its
    fused SwiGLU (swiglu_triton, which AutoEP's experts call) defined too. Raises ImportError without DeepSpeed,
    RuntimeError where its Triton kernels cannot run."""
    import triton
    from deepspeed.ops.triton_ops import _triton as flag

    mods = [importlib.import_module(f"deepspeed.ops.triton_ops.{name}") for name in _DS_TRITON]
    if INTERPRET and not flag._TRITON_AVAILABLE:
        flag._TRITON_AVAILABLE = True  # seen by these modules alone: DeepSpeed's other code keeps the flag it had
        try:
            mods = [importlib.reload(m) for m in mods]
        finally:
            flag._TRITON_AVAILABLE = False
        gemm = mods[0]
        gemm._group_gemm_kernel.configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16})]
        gemm._group_gemm_dw_kernel.configs = [triton.Config({"BLOCK_K": 16, "BLOCK_N": 32, "BLOCK_M": 16})]
    if not mods[0]._TRITON_AVAILABLE:
        raise RuntimeError("DeepSpeed's Triton ops need a GPU (or TRITON_INTERPRET=1 set before Triton is imported)")
    return SimpleNamespace(gemm=mods[0], tokens=mods[1])


def deepspeed_grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """``reference.grouped_mm`` (dropless) by DeepSpeed's Triton grouped GEMM: rows in expert order, ``counts_E``
    rows per expert, ``x @ w[e].T``. [R, O]; its autograd runs dX and dW through its kernels too."""
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return deepspeed_triton().gemm.group_gemm_triton(x_RI, w_EOI.contiguous(), offs_E, trans_b=True)


def deepspeed_combine(y_RD: torch.Tensor, weights_TK: torch.Tensor, sorted_flat_R: torch.Tensor) -> torch.Tensor:
    """``reference.unpermute`` (dropless) by AutoEP's fused weighted restore: row r of ``y_RD`` belongs to flat pair
    ``sorted_flat_R[r]`` = token * K + slot. [T, D]."""
    T, K = weights_TK.shape
    shape = (1, T, y_RD.shape[1])
    return deepspeed_triton().tokens.fused_weighted_restore(y_RD, weights_TK, sorted_flat_R, K, shape).view(T, -1)


def autoep_swiglu_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    gate_EFD: torch.Tensor,
    up_EFD: torch.Tensor,
    down_EDF: torch.Tensor,
    gemm: str = "triton",
) -> torch.Tensor:
    """``swiglu_experts`` as DeepSpeed AutoEP's layer runs it without expert parallelism, through its own functions:
    per-expert counts, a stable argsort of the flat expert ids, the tokens gathered in that order and padded per
    expert to its alignment, the experts (gate and up as two grouped GEMMs, its fused SwiGLU, down), the padding
    stripped, and its default combine. The gate and up weights are AutoEP's separate tensors. ``gemm``: "triton"
    (its Triton grouped GEMM) or "grouped_mm" (torch._grouped_mm: bf16 on sm90+, what AutoEP picks there)."""
    from deepspeed.module_inject.auto_ep_layer import (
        combine_from_routed,
        permute_by_local_expert,
        unpermute_by_local_expert,
    )
    from deepspeed.moe import ep_experts
    from deepspeed.moe.ep_count import count_tokens_per_expert

    runs = {"triton": ep_experts._run_experts_triton_grouped_mm, "grouped_mm": ep_experts._run_experts_grouped_mm}
    if gemm not in runs:
        raise ValueError(f"gemm must be one of {sorted(runs)}, got {gemm!r}")
    deepspeed_triton()  # its kernels defined, also under the interpreter
    T, K = experts_TK.shape
    counts_E = count_tokens_per_expert(experts_TK, gate_EFD.shape[0])
    sorted_flat_R = torch.argsort(experts_TK.reshape(-1), stable=True)
    rows, perm, aligned_counts, n = permute_by_local_expert(x_TD[sorted_flat_R // K], counts_E)
    y = runs[gemm](gate_EFD, down_EDF, up_EFD, rows, aligned_counts)
    y = unpermute_by_local_expert(y, perm, n)
    shape = (1, T, x_TD.shape[1])
    return combine_from_routed(y, weights_TK, sorted_flat_R, K, "post", "weighted_sum", shape).view(T, -1)


def routing_map(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bool [T, E]: megatron-core's routing map, True where a token chose the expert."""
    T = experts_TK.shape[0]
    return torch.zeros(T, num_experts, dtype=torch.bool, device=experts_TK.device).scatter_(1, experts_TK, True)


def probs_map(weights_TK: torch.Tensor, experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E]: megatron-core's routing probabilities, each token's weights at its experts and zeros elsewhere."""
    T = weights_TK.shape[0]
    zeros = torch.zeros(T, num_experts, dtype=weights_TK.dtype, device=weights_TK.device)
    return zeros.scatter(1, experts_TK, weights_TK)


def megatron_permute(
    x_TD: torch.Tensor, routing_map_TE: torch.Tensor, R: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-core's permute: (rows [R, D] in expert order, its sorted token indices for ``megatron_unpermute``).
    Its dropless path reads the row count R from the routing map (a host sync) whether or not R is given."""
    from megatron.core.transformer.moe import moe_utils

    rows, _, sorted_indices = moe_utils.permute(x_TD, routing_map_TE, num_out_tokens=R)
    return rows, sorted_indices


def megatron_unpermute(
    y_RD: torch.Tensor, sorted_indices_R: torch.Tensor, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor
) -> torch.Tensor:
    """megatron-core's unpermute: each token's rows weighted by its routing probabilities and summed. [T, D]."""
    from megatron.core.transformer.moe import moe_utils

    shape = torch.Size((probs_TE.shape[0], y_RD.shape[1]))
    return moe_utils.unpermute(y_RD, sorted_indices_R, shape, probs=probs_TE, routing_map=routing_map_TE)


def megatron_grouped_mm_swiglu_experts(
    x_TD: torch.Tensor,
    probs_TE: torch.Tensor,
    routing_map_TE: torch.Tensor,
    offs_E: torch.Tensor,
    gate_up_E2FD: torch.Tensor,
    down_EDF: torch.Tensor,
) -> torch.Tensor:
    """``swiglu_experts`` as megatron-core permutes and combines around ``torch._grouped_mm`` (sm90+: gate and up as
    one GEMM, ``offs_E`` the int32 row ends of the experts)."""
    F = down_EDF.shape[2]
    rows, sorted_indices = megatron_permute(x_TD, routing_map_TE)
    gu = torch._grouped_mm(rows, gate_up_E2FD.transpose(1, 2), offs=offs_E)
    h = torch.nn.functional.silu(gu[:, :F]) * gu[:, F:]
    y = torch._grouped_mm(h, down_EDF.transpose(1, 2), offs=offs_E)
    return megatron_unpermute(y, sorted_indices, probs_TE, routing_map_TE)
