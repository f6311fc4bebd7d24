"""What the dispatch API accepts, checked alike by every backend (``reference``, ``triton_ops``, ``naive``).

Each check raises ValueError naming the bad argument and its value before any kernel reads through it: the Triton
kernels index memory through the routing plan and these shapes, so an expert id out of range or a tensor of the wrong
size would otherwise read or write out of bounds, or silently mix rows. Expert ids are the one value checked on the
device, without a host sync (``torch._assert_async``): a bad id on a GPU fails at the next CUDA call that waits for
it. The Triton routing kernels check the ids as they read them, and route a bad one nowhere.

Shape suffixes as in ``reference``: T tokens, K top-k, E experts, R = T*K rows, D model width, F expert width.
"""

from __future__ import annotations

import numbers

import torch


def check_routing_args(experts_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> None:
    """``experts_TK`` a [T, K] integer tensor; ``num_experts`` >= 1; ``capacity`` None or >= 0. On the host only:
    the ids themselves are ``check_ids``'s."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}")
    if capacity is not None and (
        isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 0
    ):
        raise ValueError(f"capacity must be None (dropless) or an integer >= 0, got {capacity!r}")
    if not isinstance(experts_TK, torch.Tensor) or experts_TK.dim() != 2:
        shape = tuple(experts_TK.shape) if isinstance(experts_TK, torch.Tensor) else type(experts_TK).__name__
        raise ValueError(f"experts_TK must be a [T, K] tensor of expert ids (tokens x choices), got {shape}")
    if experts_TK.dtype == torch.bool or experts_TK.dtype.is_floating_point or experts_TK.dtype.is_complex:
        raise ValueError(f"experts_TK must hold integer expert ids, got dtype {experts_TK.dtype}")


def check_ids(experts_TK: torch.Tensor, num_experts: int, in_range: torch.Tensor) -> None:
    """Fail unless ``in_range`` (one element, on the ids' device: nonzero when every id is in [0, num_experts)) holds,
    without reading it back from a GPU: there the assert runs on the device and fails the next CUDA call that waits
    for it. On the CPU it raises ValueError at once, naming a bad id."""
    if experts_TK.device.type != "cpu":
        torch._assert_async(in_range, f"experts_TK holds ids outside [0, {num_experts})")
        return
    try:
        torch._assert_async(in_range)
    except RuntimeError:
        bad_N2 = ((experts_TK < 0) | (experts_TK >= num_experts)).nonzero()
        t, k = bad_N2[0].tolist()
        raise ValueError(
            f"experts_TK[{t}, {k}] = {int(experts_TK[t, k])} is not an expert id in [0, {num_experts}) "
            f"({len(bad_N2)} of {experts_TK.numel()} ids out of range)"
        ) from None


def check_routing(experts_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> None:
    """Both checks, the ids' range from their min and max (the same ops on every device, none of which reads a GPU
    value back: tests/test_host_reads.py). The Triton routing kernels check the ids as they read them instead."""
    check_routing_args(experts_TK, num_experts, capacity)
    if experts_TK.numel():
        lo, hi = torch.aminmax(experts_TK)
        check_ids(experts_TK, num_experts, (lo >= 0) & (hi < num_experts))


def plan_sizes(plan) -> tuple[int, int, int]:
    """(T tokens, K choices per token, E experts) of a routing plan."""
    R, K = plan.sorted_flat_R.numel(), plan.top_k
    return R // K, K, plan.counts_E.numel()


def check_shape(name: str, t: torch.Tensor | None, want: tuple[int | None, ...], dims: str, why: str) -> None:
    """Raise ValueError unless ``t`` has ``len(want)`` dimensions of the sizes in ``want`` (None: any). ``dims``
    names them ("T, D"), ``why`` says where the sizes come from."""
    if t is None:
        raise ValueError(f"{name} is missing: it must be a [{dims}] tensor")
    if t.dim() != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want, strict=True)):
        sizes = ", ".join("any" if w is None else str(w) for w in want)
        raise ValueError(f"{name} {tuple(t.shape)} must be [{dims}] = [{sizes}]: {why}")


def check_floating(**tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless every tensor given holds floating-point values (an integer one would be multiplied
    and rounded back to integers without a word)."""
    for name, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same_device(plan, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError unless every tensor given lives on the routing plan's device."""
    device = plan.sorted_flat_R.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the routing plan is on {device}")


def check_permute(x_TD: torch.Tensor, plan) -> None:
    T, _, _ = plan_sizes(plan)
    check_shape("x_TD", x_TD, (T, None), "T, D", f"T = {T} tokens in the routing plan")
    check_same_device(plan, x_TD=x_TD)


def check_unpermute(y_RD: torch.Tensor, weights_TK: torch.Tensor, plan) -> None:
    T, K, _ = plan_sizes(plan)
    check_shape("y_RD", y_RD, (T * K, None), "R, D", f"R = {T * K} rows in the routing plan ({T} tokens x {K})")
    check_shape("weights_TK", weights_TK, (T, K), "T, K", f"the routing plan's {T} tokens x {K} choices")
    check_floating(y_RD=y_RD, weights_TK=weights_TK)
    check_same_device(plan, y_RD=y_RD, weights_TK=weights_TK)


def check_grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, plan, bias_EO: torch.Tensor | None) -> None:
    T, K, E = plan_sizes(plan)
    check_shape("x_RI", x_RI, (T * K, None), "R, I", f"R = {T * K} rows in the routing plan ({T} tokens x {K})")
    n_in = x_RI.shape[1]
    check_shape("w_EOI", w_EOI, (E, None, n_in), "E, O, I", f"E = {E} experts in the plan, I = {n_in} columns of x")
    if bias_EO is not None:
        O = w_EOI.shape[1]
        check_shape("bias_EO", bias_EO, (E, O), "E, O", f"E = {E} experts, O = {O} rows of each expert's weight")
    check_floating(x_RI=x_RI, w_EOI=w_EOI, bias_EO=bias_EO)
    check_same_device(plan, x_RI=x_RI, w_EOI=w_EOI, bias_EO=bias_EO)


def _check_tokens(x_TD: torch.Tensor, weights_TK: torch.Tensor, plan) -> tuple[int, int]:
    """The experts' token inputs against the plan: (D, E)."""
    T, K, E = plan_sizes(plan)
    check_shape("x_TD", x_TD, (T, None), "T, D", f"T = {T} tokens in the routing plan")
    check_shape("weights_TK", weights_TK, (T, K), "T, K", f"the routing plan's {T} tokens x {K} choices")
    return x_TD.shape[1], E


def check_swiglu(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF) -> None:
    D, E = _check_tokens(x_TD, weights_TK, plan)
    check_shape("down", down_EDF, (E, D, None), "E, D, F", f"E = {E} experts in the plan, D = {D} columns of x")
    F = down_EDF.shape[2]
    why = f"E = {E} experts in the plan, D = {D} columns of x, 2F rows (gate, then up) for F = {F} columns of down"
    check_shape("gate_up", gate_up_E2FD, (E, 2 * F, D), "E, 2F, D", why)
    check_floating(x_TD=x_TD, weights_TK=weights_TK, gate_up=gate_up_E2FD, down=down_EDF)
    check_same_device(plan, x_TD=x_TD, weights_TK=weights_TK, gate_up=gate_up_E2FD, down=down_EDF)


def check_gelu(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED) -> None:
    D, E = _check_tokens(x_TD, weights_TK, plan)
    check_shape("fc1", fc1_EFD, (E, None, D), "E, F, D", f"E = {E} experts in the plan, D = {D} columns of x")
    F = fc1_EFD.shape[1]
    check_shape("fc2", fc2_EDF, (E, D, F), "E, D, F", f"E = {E} experts, D = {D} columns of x, F = {F} rows of fc1")
    if fc1_bias_EF is not None:
        check_shape("fc1_bias", fc1_bias_EF, (E, F), "E, F", f"E = {E} experts, F = {F} rows of fc1")
    if fc2_bias_ED is not None:
        check_shape("fc2_bias", fc2_bias_ED, (E, D), "E, D", f"E = {E} experts, D = {D} columns of x")
    tensors = dict(fc1=fc1_EFD, fc1_bias=fc1_bias_EF, fc2=fc2_EDF, fc2_bias=fc2_bias_ED)
    check_floating(x_TD=x_TD, weights_TK=weights_TK, **tensors)
    check_same_device(plan, x_TD=x_TD, weights_TK=weights_TK, **tensors)
