"""Triton MoE kernels (kernels/triton_ops/) against the pure-torch oracle (kernels/reference.py).

Every public op and every gradient is compared with the reference on the same inputs. On CPU the kernels run in
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU) with small tiles; on CUDA
they run natively with the production tiles, so the same shapes exercise the masks of both.

Tolerances, as the max abs error normalised by the oracle tensor's max magnitude (``_nerr``):
fp32 <= 1e-5 (summation order only), against the reference in fp32. In fp16/bf16 the oracle is the reference run
in fp32 on the same (upcast) inputs, not the reference in the low dtype: on CUDA the reference's bias gradients
come from ``repeat_interleave``'s backward, an ``index_add_`` whose bf16 atomics round the running sum to bf16
after every row (0.05 normalised error on a 256-row expert, which failed the old ours-vs-bf16-reference check for
``fc1_bias`` while the kernels, which sum in fp32, were right). Against that oracle: fp16 <= 4e-3, bf16 <= 1.6e-2
(2 bf16 ulps of the largest entry: the kernels round their stored intermediates, h, z, dH, to the dtype), and the
kernels must be at least as accurate as the reference in the same dtype: error <= 1.5 x the reference's + 1e-3.
Routing metadata and permutes are compared exactly.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

try:  # GPU hosts may lack hypothesis: only the property test needs it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

from ditmoe_kernels import naive, tiles  # noqa: E402
from ditmoe_kernels import reference as ref  # noqa: E402
from ditmoe_kernels import triton_ops as ops  # noqa: E402
from ditmoe_kernels.triton_ops import common  # noqa: E402
from ditmoe_kernels.triton_ops import dw as dw_mod  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not common.INTERPRET:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")
pytestmark = pytest.mark.usefixtures("exact_fp32_matmuls")  # tests/conftest.py


def _nerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / max(scale, 1e-30) if scale > 0 else err


def assert_near(a, b, dtype, what=""):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert torch.isfinite(a.float()).all(), f"{what}: non-finite values"
    err = _nerr(a, b)
    assert err <= TOL[dtype], f"{what}: normalised error {err:.3g} > {TOL[dtype]:.3g} ({dtype})"


@triton.jit
def _mma_kernel(
    a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr
):
    """C[:, :N] = A[M, K] @ B[K, :N] through ``common.mma`` (B and C have 64 columns)."""
    m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * 64 + n[None, :])
    tl.store(c_ptr + m[:, None] * 64 + n[None, :], common.mma(a, b, tl.zeros([M, N], tl.float32), UPCAST, PREC))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mma_bits_do_not_depend_on_the_tile_width(dtype):
    """A GEMM tile's output element sums over k in the same order at any tile width, so that tile options (e.g. gate
    and up in one accumulator or two) give the same bits. Under the interpreter tl.dot calls the CPU's BLAS, whose
    order changes with the shape on some CPUs; ``mma`` must not depend on it."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g).to(DEVICE, dtype)
    b = torch.randn(32, 64, generator=g).to(DEVICE, dtype)
    upcast, prec = common.prec(dtype)
    wide, narrow = (torch.zeros(16, 64, device=DEVICE) for _ in range(2))
    _mma_kernel[(1,)](a, b, wide, 16, 32, 64, upcast, prec)
    _mma_kernel[(1,)](a, b, narrow, 16, 32, 32, upcast, prec)
    assert torch.equal(wide[:, :32], narrow[:, :32])
    assert_near(wide, (a.double() @ b.double()).float(), torch.float32, "mma")


def make_experts(T, K, E, seed, empty=(), skew=0.0):
    """[T, K] distinct experts per token; experts in ``empty`` are never chosen (when E - len(empty) >= K);
    ``skew`` > 0 favours expert 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(T, E, generator=g)
    logits[:, 0] += skew
    if E - len(empty) >= K:
        for e in empty:
            logits[:, e] = -1.0
    return logits.topk(K, dim=-1).indices.to(DEVICE)


def make_weights(T, K, seed, dtype):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(T, K, generator=g).add_(0.05).to(DEVICE, dtype)


def randn(*shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def run_with_grads(fn, inputs, seed=123, probe_dtype=None):
    """fn(*inputs) and the gradients of <fn, probe> w.r.t. every input (None where it does not require grad).
    The probe is rounded to ``probe_dtype`` (default: the output's), so an fp32 oracle sees the same probe."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(out.shape, generator=g).to(out.device, probe_dtype or out.dtype).to(out.dtype)
    (out.float() * probe.float()).sum().backward()
    return out.detach(), [None if t is None or not t.requires_grad else t.grad for t in leaves]


def check_against_reference(name, fn_ours, fn_ref, inputs, dtype, names):
    """Ours vs the reference: in fp32 directly; in fp16/bf16 against the reference run in fp32 on the upcast inputs
    (see the module docstring), and at least as accurately as the reference run in ``dtype``."""
    out_a, grads_a = run_with_grads(fn_ours, inputs)
    out_b, grads_b = run_with_grads(fn_ref, inputs)
    ours, theirs = [out_a, *grads_a], [out_b, *grads_b]
    if dtype == torch.float32:
        oracle = theirs
    else:
        up = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
        out_c, grads_c = run_with_grads(fn_ref, up, probe_dtype=out_a.dtype)
        oracle = [out_c, *grads_c]
    for n, a, b, c in zip(["forward", *(f"grad {n}" for n in names)], ours, theirs, oracle, strict=True):
        if b is None:
            continue
        assert a is not None, f"{name}: no {n}"
        assert_near(a, c.to(a.dtype) if dtype != torch.float32 else c, dtype, f"{name} {n}")
        if dtype != torch.float32:
            ea, eb = _nerr(a, c), _nerr(b, c)
            assert ea <= 1.5 * eb + 1e-3, f"{name} {n}: error vs fp32 {ea:.3g}, the reference's {eb:.3g}"
    return ours, theirs


# --------------------------------------------------------------------------------------------------------------
# Routing metadata
# --------------------------------------------------------------------------------------------------------------

PLAN_CASES = [
    # T, K, E, capacity, empty experts, routing block override
    (1, 1, 1, None, (), None),
    (37, 2, 5, None, (3,), None),
    (37, 2, 5, 9, (), None),
    (37, 2, 5, 0, (), None),
    (37, 2, 5, 100, (), None),
    (12, 4, 4, None, (), None),  # k = E
    (12, 4, 4, 5, (), None),
    (50, 2, 64, None, (), None),  # E = 64: many empty and one-row experts
    (50, 2, 64, 1, (), None),
    (400, 2, 256, None, (), None),  # E = 256: the dW order's ties across several chunks of experts
    (400, 2, 256, 2, (), None),
    (300, 2, 8, None, (1,), 16),  # many routing blocks
    (300, 3, 8, 40, (), 32),
]


@pytest.mark.parametrize("T,K,E,cap,empty,block", PLAN_CASES)
def test_routing_plan_matches_reference(T, K, E, cap, empty, block):
    ex = make_experts(T, K, E, seed=T * 7 + E, empty=empty, skew=0.3)
    with ops.tile_overrides(route={"BLOCK": block} if block else {}):
        plan = ops.routing_plan(ex, E, cap)
    want = ref.routing_plan(ex, E, cap)
    assert isinstance(plan, ref.RoutingPlan) and plan.top_k == K
    for field in ("sorted_flat_R", "counts_E", "offsets_E1", "dropped"):
        a, b = getattr(plan, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(a, b), f"{field}: {a} != {b}"
    inv = plan.row_of_flat_R
    assert torch.equal(plan.sorted_flat_R[inv], torch.arange(T * K, device=DEVICE))
    check_kernel_tables(plan, K)


def check_kernel_tables(plan, K):
    """What the routing kernels make for the expert kernels: each permuted row's token, the dW's expert order."""
    assert torch.equal(plan.token_of_row_R, (plan.sorted_flat_R // K).int())
    assert torch.equal(plan.expert_order_E, torch.argsort(plan.counts_E, descending=True, stable=True).int())


def test_routing_plan_accepts_int32_and_noncontiguous():
    ex = make_experts(40, 2, 6, seed=3)
    ex_nc = ex.t().contiguous().t()  # column-major [T, 2]
    assert not ex_nc.is_contiguous()
    for e in (ex_nc, ex.int()):
        plan = ops.routing_plan(e, 6, 13)
        want = ref.routing_plan(e.long(), 6, 13)
        assert torch.equal(plan.sorted_flat_R, want.sorted_flat_R)
        assert torch.equal(plan.counts_E, want.counts_E) and torch.equal(plan.dropped, want.dropped)


# --------------------------------------------------------------------------------------------------------------
# Permute / unpermute
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,E,D,cap", [(37, 2, 5, 40, None), (9, 3, 3, 130, 4), (1, 1, 1, 8, None)])
def test_permute_unpermute(dtype, T, K, E, D, cap):
    ex = make_experts(T, K, E, seed=T + D)
    plan_ops, plan_ref = ops.routing_plan(ex, E, cap), ref.routing_plan(ex, E, cap)
    x = randn(T, 2 * D, seed=1, dtype=dtype)[:, ::2].requires_grad_()  # non-contiguous
    assert not x.is_contiguous()
    # permute is a copy: bitwise equal; its backward is a sum over the K copies
    check_against_reference(
        "permute", lambda x: ops.permute(x, plan_ops), lambda x: ref.permute(x, plan_ref), [x], dtype, ["x"]
    )
    assert torch.equal(ops.permute(x, plan_ops), ref.permute(x, plan_ref))
    y = randn(T * K, D, seed=2, dtype=dtype).requires_grad_()
    w = make_weights(T, 2 * K, seed=3, dtype=dtype)[:, ::2].requires_grad_()  # non-contiguous
    check_against_reference(
        "unpermute",
        lambda y, w: ops.unpermute(y, w, plan_ops),
        lambda y, w: ref.unpermute(y, w, plan_ref),
        [y, w],
        dtype,
        ["y", "weights"],
    )


def test_unpermute_fp32_weights_with_bf16_rows():
    """The layer may hand fp32 routing weights with bf16 activations: output in y's dtype, dw in w's."""
    T, K, E, D = 20, 2, 4, 24
    ex = make_experts(T, K, E, seed=5)
    plan_ops, plan_ref = ops.routing_plan(ex, E), ref.routing_plan(ex, E)
    y = randn(T * K, D, seed=2, dtype=torch.bfloat16).requires_grad_()
    w = make_weights(T, K, seed=3, dtype=torch.float32).requires_grad_()
    check_against_reference(
        "unpermute",
        lambda y, w: ops.unpermute(y, w, plan_ops),
        lambda y, w: ref.unpermute(y, w, plan_ref),
        [y, w],
        torch.bfloat16,
        ["y", "weights"],
    )


# --------------------------------------------------------------------------------------------------------------
# Grouped GEMM
# --------------------------------------------------------------------------------------------------------------

GMM_CASES = [
    # T, K, E, I, O, capacity, empty
    (37, 2, 5, 40, 72, None, (3,)),  # empty expert, I and O not multiples of the tiles
    (1, 1, 3, 24, 40, None, ()),  # one row in one expert
    (23, 1, 1, 64, 32, None, ()),  # E = 1, dims multiples of the tiles
    (12, 4, 4, 20, 36, 5, ()),  # k = E with drops
]


GMM_PARAMS = [(*c, torch.float32, bias) for c in GMM_CASES for bias in (False, True)]
GMM_PARAMS += [(*GMM_CASES[0], dt, True) for dt in (torch.bfloat16, torch.float16)]
GMM_PARAMS += [(*GMM_CASES[3], dt, False) for dt in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("T,K,E,I,O,cap,empty,dtype,bias", GMM_PARAMS)
def test_grouped_mm(T, K, E, I, O, cap, empty, dtype, bias):
    ex = make_experts(T, K, E, seed=I + O, empty=empty)
    plan_ops, plan_ref = ops.routing_plan(ex, E, cap), ref.routing_plan(ex, E, cap)
    x = randn(T * K, I, seed=1, dtype=dtype).requires_grad_()
    w = randn(E, I, O, seed=2, dtype=dtype, scale=I**-0.5).transpose(1, 2).requires_grad_()  # [E, O, I] strided
    b = randn(E, O, seed=3, dtype=dtype).requires_grad_() if bias else None
    ours, _ = check_against_reference(
        "grouped_mm",
        lambda x, w, b: ops.grouped_mm(x, w, plan_ops, b),
        lambda x, w, b: ref.grouped_mm(x, w, plan_ref, b),
        [x, w, b],
        dtype,
        ["x", "w", "bias"],
    )
    for e in empty:  # experts without rows: exactly zero dW and db
        assert torch.count_nonzero(ours[2][e]) == 0
        if bias:
            assert torch.count_nonzero(ours[3][e]) == 0


# --------------------------------------------------------------------------------------------------------------
# Fused experts
# --------------------------------------------------------------------------------------------------------------

EXPERT_CASES = [
    # T, K, E, D, F, capacity, empty
    (37, 2, 5, 40, 72, None, (3,)),  # empty expert, rows/D/F not multiples of the tiles
    (1, 1, 4, 24, 40, None, ()),  # a single token: experts with one row and with none
    (23, 1, 1, 32, 48, None, ()),  # E = 1
    (12, 4, 4, 20, 36, None, ()),  # k = E
    (40, 2, 64, 16, 32, None, ()),  # E = 64
    (37, 2, 5, 40, 72, 9, ()),  # capacity drops
]


def _expert_inputs(T, K, E, D, F, act, dtype, noncontig=False, seed=0):
    x = randn(T, D, seed=seed + 1, dtype=dtype)
    if noncontig:
        x = randn(T, 2 * D, seed=seed + 1, dtype=dtype)[:, D:]
    w = make_weights(T, K, seed=seed + 2, dtype=dtype)
    if act == "swiglu":
        gate_up = randn(E, 2 * F, D, seed=seed + 3, dtype=dtype, scale=D**-0.5)
        down = randn(E, D, F, seed=seed + 5, dtype=dtype, scale=F**-0.5)
        if noncontig:
            gate_up = randn(E, D, 2 * F, seed=seed + 3, dtype=dtype, scale=D**-0.5).transpose(1, 2)
            down = randn(E, F, D, seed=seed + 5, dtype=dtype, scale=F**-0.5).transpose(1, 2)
        params = [gate_up, down]
    else:
        fc1 = randn(E, F, D, seed=seed + 3, dtype=dtype, scale=D**-0.5)
        b1 = randn(E, F, seed=seed + 4, dtype=dtype, scale=0.1)
        fc2 = randn(E, D, F, seed=seed + 5, dtype=dtype, scale=F**-0.5)
        b2 = randn(E, D, seed=seed + 6, dtype=dtype, scale=0.1)
        if noncontig:
            fc1 = randn(E, D, F, seed=seed + 3, dtype=dtype, scale=D**-0.5).transpose(1, 2)
        params = [fc1, b1, fc2, b2]
    return [t.requires_grad_() for t in [x, w, *params]]


def _experts_fn(mod, act, plan):
    if act == "swiglu":
        return lambda x, w, gu, d: mod.swiglu_experts(x, w, plan, gu, d)
    return lambda x, w, f1, b1, f2, b2: mod.gelu_experts(x, w, plan, f1, b1, f2, b2)


NAMES = {
    "swiglu": ["x", "weights", "gate_up", "down"],
    "gelu": ["x", "weights", "fc1", "fc1_bias", "fc2", "fc2_bias"],
}


def check_experts(T, K, E, D, F, cap, empty, act, dtype, noncontig=False, seed=0):
    ex = make_experts(T, K, E, seed=seed + T + E, empty=empty, skew=0.2)
    plan_ops, plan_ref = ops.routing_plan(ex, E, cap), ref.routing_plan(ex, E, cap)
    inputs = _expert_inputs(T, K, E, D, F, act, dtype, noncontig, seed)
    ours, _ = check_against_reference(
        f"{act}_experts", _experts_fn(ops, act, plan_ops), _experts_fn(ref, act, plan_ref), inputs, dtype, NAMES[act]
    )
    counts = plan_ref.counts_E
    for i in range(3, len(ours)):  # experts without rows get exactly zero weight gradients
        for e in torch.nonzero(counts == 0).flatten().tolist():
            assert torch.count_nonzero(ours[i][e]) == 0, f"{NAMES[act][i - 1]} of empty expert {e}"


@pytest.mark.parametrize("gather", [0, 1])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_triton_experts_take_a_reference_plan(act, gather):
    """A plan made by ``reference.routing_plan`` lacks what the Triton routing kernels also write (inverse
    permutation, token table, dW order): the Triton experts make those themselves and give the same bits."""
    ex = make_experts(37, 2, 5, seed=4, empty=(3,), skew=0.3)
    grads = []
    with ops.tile_overrides(swiglu={"GATHER": gather}, gmm_epi={"GATHER": gather}):
        for plan in (ops.routing_plan(ex, 5, 9), ref.routing_plan(ex, 5, 9)):
            inputs = _expert_inputs(37, 2, 5, 24, 40, act, torch.float32, seed=2)
            out = _experts_fn(ops, act, plan)(*inputs)
            grads.append([out, *torch.autograd.grad(out, inputs, torch.ones_like(out))])
    for name, a, b in zip(["out", *NAMES[act]], *grads, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("biases", [(False, True), (True, False), (False, False)])
def test_gelu_experts_without_biases_train(biases):
    """The API takes None for either GELU bias (experts upcycled from a bias-free MLP); the backward returned a
    gradient for it all the same, which autograd refuses."""
    ex = make_experts(23, 2, 4, seed=5, empty=(), skew=0.2)
    x, w, fc1, b1, fc2, b2 = _expert_inputs(23, 2, 4, 16, 24, "gelu", torch.float32, seed=3)
    b1, b2 = (b if keep else None for b, keep in zip((b1, b2), biases, strict=True))
    grads = []
    for mod in (ops, ref):
        out = mod.gelu_experts(x, w, mod.routing_plan(ex, 4), fc1, b1, fc2, b2)
        wrt = [t for t in (x, w, fc1, b1, fc2, b2) if t is not None]
        grads.append([out, *torch.autograd.grad(out, wrt, torch.ones_like(out))])
    for ours, want in zip(*grads, strict=True):
        torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("T,K,E,D,F,cap,empty", EXPERT_CASES)
def test_experts_fp32(T, K, E, D, F, cap, empty, act):
    check_experts(T, K, E, D, F, cap, empty, act, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", [0, 5])
def test_experts_low_precision(case, act, dtype):
    check_experts(*EXPERT_CASES[case], act, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_bwd_pass(dtype):
    """The elementwise SwiGLU backward writes [dgate | dup] side by side and re-materialises h, with the torch
    formulas in fp32 rounded once to the dtype; zero rows (dropped pairs) stay zero."""
    R, F = 37, 72  # neither a multiple of the [BR, BC] tile
    dh = randn(R, F, seed=1, dtype=dtype)
    g, u = randn(R, F, seed=2, dtype=dtype, scale=3.0), randn(R, F, seed=3, dtype=dtype)
    dh[-5:], g[-5:], u[-5:] = 0, 0, 0
    dgu, h = ops._swiglu_bwd(dh, g, u)
    assert dgu.shape == (R, 2 * F) and h.shape == (R, F) and dgu.dtype == h.dtype == dtype
    d, gf, uf = dh.float(), g.float(), u.float()
    s = torch.sigmoid(gf)
    want_dg = d * uf * (s + gf * s * (1 - s))
    for name, got, want in [("h", h, gf * s * uf), ("dgate", dgu[:, :F], want_dg), ("dup", dgu[:, F:], d * gf * s)]:
        assert_near(got, want.to(dtype), dtype, name)
    assert torch.count_nonzero(dgu[-5:]) == 0 and torch.count_nonzero(h[-5:]) == 0


DW_OPTIONS = {
    "host-descriptors": {"TMA": 1},
    "kernel-descriptors": {"TMA": 2},
    "persistent": {"PERSIST": 1},
    "persistent-kernel-descriptors": {"TMA": 2, "PERSIST": 1},
    "warp-specialized": {"TMA": 2, "PERSIST": 1, "WS": 1, **({"num_warps": 4} if DEVICE.type == "cuda" else {})},
}


@pytest.mark.parametrize("option", list(DW_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_options_give_the_same_bits(dtype, option, monkeypatch):
    """dW under each tile option equals the one-tile-per-program pointer-load dW bit for bit: TMA = 1 (host-made
    descriptors; an expert's last partial chunk through masked pointer loads), TMA = 2 (descriptors each tile makes
    over its expert's rows: every chunk, rows past the expert read as zeros), PERSIST (a few programs loop over the
    tiles, 3 under the interpreter) and WS (that loop warp-specialized). Row counts below, at and past a multiple of
    BR (16 under the interpreter, 32 on GPUs), an empty expert, O and I not multiples of the tile, the bias
    gradient; the options must reach the kernel."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9 and "TMA" in DW_OPTIONS[option]:
        pytest.skip("TMA needs sm_90")
    E, O, I = 6, 40, 24
    experts = torch.cat([torch.full((n,), e) for e, n in enumerate([16, 0, 5, 33, 1, 32])])
    experts = experts[torch.randperm(len(experts), generator=torch.Generator().manual_seed(0))]
    plan = ops.routing_plan(experts.view(-1, 1).to(DEVICE), E)
    assert plan.counts_E.tolist() == [16, 0, 5, 33, 1, 32]
    meta = ops.plan_meta(plan)
    a = randn(len(experts), 2 * O, seed=4, dtype=dtype)
    b = randn(len(experts), I, seed=5, dtype=dtype)
    launches: list[dict] = []
    monkeypatch.setattr(dw_mod, "_gmm_dw_kernel", _Launches(dw_mod._gmm_dw_kernel, ("TMA", "PERSIST", "WS"), launches))
    opts = DW_OPTIONS[option]
    for kw in [{}, {"with_db": True}]:
        with ops.tile_overrides(dw={"TMA": 0, "PERSIST": 0}):
            want = ops._gmm_dw(a, b, meta, **kw)
        with ops.tile_overrides(dw=opts):
            got = ops._gmm_dw(a, b, meta, **kw)
        for i, (x, y) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(x, y), f"output {i} of dW {kw} differs with {option}"
        assert torch.count_nonzero(got[0][1]) == 0  # the empty expert
    reached = {"TMA": opts.get("TMA", 0), "PERSIST": bool(opts.get("PERSIST")), "WS": bool(opts.get("WS"))}
    assert launches == [{"TMA": 0, "PERSIST": False, "WS": False}, reached] * 2, launches


def test_dw_computes_the_orientation_with_fewer_tiles():
    """dW[e] = A^T B is computed as B^T A, stored transposed, when that takes fewer [BO, BI] tiles: the bf16 sm_90
    tiles (128x256) waste 8-33% of gate/up dW's work otherwise (its I = D is not a multiple of 256 at S, XL, G)."""
    for shape, (D, F, _) in {"S": (384, 1536, 8), "XL": (1152, 4608, 8), "G": (1408, 5632, 16)}.items():
        assert dw_mod.transposed(2 * F, D, 128, 256), f"gate/up dW at {shape}"
        assert not dw_mod.transposed(D, F, 128, 256), f"down dW at {shape}: no empty tile column either way"
    assert not dw_mod.transposed(100, 30, 64, 64)  # square tiles: the same count either way, keep dW's


@pytest.mark.parametrize("tma", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_in_either_orientation(dtype, tma, monkeypatch):
    """dW and db equal the per-expert products in fp32 whether the kernel computes dW (O = 40, I = 24 on 16x32
    tiles: 3 tiles, transposed 4) or dW^T (O = 24, I = 40: 4 tiles, transposed 3), with pointer loads or TMA;
    row counts around the 16-row chunk and an empty expert."""
    E = 5
    counts = [16, 0, 5, 33, 1]
    experts = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])
    experts = experts[torch.randperm(len(experts), generator=torch.Generator().manual_seed(1))]
    meta = ops.plan_meta(ops.routing_plan(experts.view(-1, 1).to(DEVICE), E))
    picked = []
    real = dw_mod.transposed
    monkeypatch.setattr(dw_mod, "transposed", lambda *args: picked.append(real(*args)) or picked[-1])
    for O, I in [(40, 24), (24, 40)]:
        a, b = randn(len(experts), O, seed=O, dtype=dtype), randn(len(experts), I, seed=I, dtype=dtype)
        with ops.tile_overrides(dw={"BO": 16, "BI": 32, "BR": 16, "TMA": tma}):
            got_w, got_b = ops._gmm_dw(a, b, meta, with_db=True)
        groups = list(itertools.pairwise(meta.offsets.tolist()))
        want_w = torch.stack([a[s:t].float().T @ b[s:t].float() for s, t in groups])
        want_b = torch.stack([a[s:t].float().sum(0) for s, t in groups])
        assert_near(got_w, want_w.to(dtype), dtype, f"dW, O={O} I={I}")
        assert_near(got_b, want_b.to(dtype), dtype, f"db, O={O} I={I}")
        assert torch.count_nonzero(got_w[1]) == 0 and torch.count_nonzero(got_b[1]) == 0  # the empty expert
    assert picked == [False, True]


# Bad inputs: every backend refuses them with the same ValueError, naming the argument and its value, before any
# kernel reads through them (the Triton kernels would read or write out of bounds: a permute with too few token rows
# crashed the interpreter, and out-of-range expert ids wrote past the routing buffers until the routing kernels sent
# them to the sentinel bucket).
BACKENDS = {"reference": ref, "naive": naive, "triton": ops}


@pytest.mark.parametrize(
    "case,match",
    [
        ("id >= E", r"experts_TK\[1, 0\] = 3 is not an expert id in \[0, 3\) \(1 of 18 ids out of range\)"),
        ("id < 0", r"experts_TK\[8, 1\] = -1 is not an expert id in \[0, 3\)"),
        # an int64 id that a 32-bit cast would wrap onto expert 1
        ("id 2**32 + 1", r"experts_TK\[2, 1\] = 4294967297 is not an expert id in \[0, 3\)"),
        ("id >= E, capacity 2", r"experts_TK\[5, 0\] = 7 is not an expert id in \[0, 3\)"),
        ("float ids", r"integer expert ids, got dtype torch.float32"),
        ("1-D ids", r"experts_TK must be a \[T, K\] tensor .* got \(9,\)"),
        ("no experts", r"num_experts must be a positive integer, got 0"),
        ("capacity < 0", r"capacity must be None \(dropless\) or an integer >= 0, got -2"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_routing_refuses_bad_expert_ids(backend, case, match):
    """Checked on the host for CPU tensors (also on GPU machines, before the Triton path asks for CUDA)."""
    ex = make_experts(9, 2, 3, seed=1).cpu()
    E, cap = 3, None
    if case == "id >= E":
        ex[1, 0] = 3
    elif case == "id < 0":
        ex[8, 1] = -1
    elif case == "id 2**32 + 1":
        ex[2, 1] = 2**32 + 1
    elif case == "id >= E, capacity 2":
        ex[5, 0], cap = 7, 2
    elif case == "float ids":
        ex = ex.float()
    elif case == "1-D ids":
        ex = ex[:, 0]
    elif case == "no experts":
        E = 0
    else:
        cap = -2
    with pytest.raises(ValueError, match=match):
        BACKENDS[backend].routing_plan(ex, E, cap)


@pytest.mark.parametrize("cap", [None, 2])
def test_routing_kernels_send_bad_ids_nowhere(cap):
    """The Triton routing kernels read every id once: one out of range goes to the sentinel bucket (with the dropped
    pairs), so the plan stays a permutation of in-range rows and nothing is written through the id; the kernels' flag
    says so, for ``check_ids``."""
    from ditmoe_kernels.triton_ops import routing

    ex = make_experts(9, 2, 3, seed=1)
    ex[1, 0], ex[4, 1] = 3, -5
    flat = ex.reshape(-1)
    rank = None if cap is None else routing._route_pass(flat, None, 0, 9, 2, 3, True, False, False, False).pos
    r = routing._route_pass(flat, rank, cap or 0, 9, 2, 3, False, cap is not None, True, True)
    assert int(r.ids_ok) == 0
    assert torch.equal(r.sorted_flat.sort().values, torch.arange(18, device=DEVICE))
    assert torch.equal(r.sorted_flat[r.pos], torch.arange(18, device=DEVICE))
    kept = r.offsets[-1]
    assert int(r.dropped) == 18 - int(kept) >= 2 and {2, 9} <= set(r.sorted_flat[kept:].tolist())
    ex[1, 0], ex[4, 1] = 0, 0
    r = routing._route_pass(flat, rank, cap or 0, 9, 2, 3, False, cap is not None, True, True)
    assert int(r.ids_ok) == 1


SHAPE_CASES = {
    "gate_up not 2F rows": r"gate_up \(3, 47, 16\) must be \[E, 2F, D\] = \[3, 48, 16\].*F = 24 columns of down",
    "x with another T": r"x_TD \(10, 16\) must be \[T, D\] = \[9, any\]: T = 9 tokens in the routing plan",
    "x with another D": r"down \(3, 16, 24\) must be \[E, D, F\] = \[3, 17, any\].*D = 17 columns of x",
    "weights_TK shape": r"weights_TK \(9, 1\) must be \[T, K\] = \[9, 2\]",
    "weights of 2 experts": r"down \(2, 16, 24\) must be \[E, D, F\] = \[3, 16, any\]: E = 3 experts",
    "gelu bias": r"fc1_bias \(3, 25\) must be \[E, F\] = \[3, 24\]",
    "permute rows": r"x_TD \(8, 16\) must be \[T, D\] = \[9, any\]",
    "unpermute rows": r"y_RD \(17, 16\) must be \[R, D\] = \[18, any\]: R = 18 rows .*\(9 tokens x 2\)",
    "grouped_mm columns": r"w_EOI \(3, 48, 16\) must be \[E, O, I\] = \[3, any, 15\]",
    "grouped_mm bias": r"bias_EO \(3, 47\) must be \[E, O\] = \[3, 48\]",
}


@pytest.mark.parametrize(
    "backend,case",
    # naive differs from the reference only in its experts: it has no grouped_mm
    [(b, c) for b in BACKENDS for c in SHAPE_CASES if not (b == "naive" and c.startswith("grouped_mm"))],
)
def test_dispatch_refuses_shapes_that_do_not_fit_the_plan(backend, case):
    """Shapes are checked against the routing plan and each other before anything runs."""
    mod = BACKENDS[backend]
    x, w, gu, d = _expert_inputs(9, 2, 3, 16, 24, "swiglu", torch.float32)
    _, _, fc1, b1, fc2, b2 = _expert_inputs(9, 2, 3, 16, 24, "gelu", torch.float32)
    plan = mod.routing_plan(make_experts(9, 2, 3, seed=1), 3)
    x_RD = torch.cat([x, x])
    calls = {
        "gate_up not 2F rows": lambda: mod.swiglu_experts(x, w, plan, gu[:, :47], d),
        "x with another T": lambda: mod.swiglu_experts(torch.cat([x, x[:1]]), w, plan, gu, d),
        "x with another D": lambda: mod.swiglu_experts(torch.cat([x, x[:, :1]], 1), w, plan, gu, d),
        "weights_TK shape": lambda: mod.swiglu_experts(x, w[:, :1], plan, gu, d),
        "weights of 2 experts": lambda: mod.swiglu_experts(x, w, plan, gu[:2], d[:2]),
        "gelu bias": lambda: mod.gelu_experts(x, w, plan, fc1, torch.cat([b1, b1[:, :1]], 1), fc2, b2),
        "permute rows": lambda: mod.permute(x[:8], plan),
        "unpermute rows": lambda: mod.unpermute(x_RD[:17], w, plan),
        "grouped_mm columns": lambda: mod.grouped_mm(x_RD[:, :15], gu, plan),
        "grouped_mm bias": lambda: mod.grouped_mm(x_RD, gu, plan, gu[:, :47, 0]),
    }
    with pytest.raises(ValueError, match=SHAPE_CASES[case]):
        calls[case]()


DTYPE_CASES = {
    "integer x": r"x_TD must be a floating-point tensor, got dtype torch.int64",
    "integer routing weights": r"weights_TK must be a floating-point tensor, got dtype torch.int32",
    "integer gelu bias": r"fc2_bias must be a floating-point tensor, got dtype torch.int16",
    "integer unpermute rows": r"y_RD must be a floating-point tensor, got dtype torch.int64",
    "integer grouped_mm weight": r"w_EOI must be a floating-point tensor, got dtype torch.int64",
}


@pytest.mark.parametrize(
    "backend,case",
    [(b, c) for b in BACKENDS for c in DTYPE_CASES if not (b == "naive" and "grouped_mm" in c)],
)
def test_dispatch_refuses_integer_tensors(backend, case):
    """Integer values would be multiplied and rounded back to integers (the Triton path returned int64 experts'
    outputs); every backend refuses them, naming the tensor."""
    mod = BACKENDS[backend]
    x, w, gu, d = (t.detach() for t in _expert_inputs(9, 2, 3, 16, 24, "swiglu", torch.float32))
    _, _, fc1, b1, fc2, b2 = (t.detach() for t in _expert_inputs(9, 2, 3, 16, 24, "gelu", torch.float32))
    plan = mod.routing_plan(make_experts(9, 2, 3, seed=1), 3)
    calls = {
        "integer x": lambda: mod.swiglu_experts(x.long(), w, plan, gu, d),
        "integer routing weights": lambda: mod.swiglu_experts(x, w.int(), plan, gu, d),
        "integer gelu bias": lambda: mod.gelu_experts(x, w, plan, fc1, b1, fc2, b2.short()),
        "integer unpermute rows": lambda: mod.unpermute(torch.cat([x, x]).long(), w, plan),
        "integer grouped_mm weight": lambda: mod.grouped_mm(torch.cat([x, x]), gu.long(), plan),
    }
    with pytest.raises(ValueError, match=DTYPE_CASES[case]):
        calls[case]()


def test_triton_refuses_dtypes_it_has_no_kernels_for():
    """float64 (or an autocast dtype outside fp32/bf16/fp16) would compile the bf16 tile table for it on a GPU: the
    Triton path refuses it and points to the torch backend, which takes it."""
    x, w, gu, d = (t.detach().double() for t in _expert_inputs(9, 2, 3, 16, 24, "swiglu", torch.float32))
    plan = ops.routing_plan(make_experts(9, 2, 3, seed=1), 3)
    with pytest.raises(ValueError, match=r"x_TD's dtype is torch.float64: use the 'torch' backend"):
        ops.swiglu_experts(x, w, plan, gu, d)
    with pytest.raises(ValueError, match=r"x_RI's dtype is torch.float64"):
        ops.grouped_mm(torch.cat([x, x]), gu, plan)
    ref_plan = ref.routing_plan(make_experts(9, 2, 3, seed=1).cpu(), 3)
    ref.swiglu_experts(x.cpu(), w.cpu(), ref_plan, gu.cpu(), d.cpu())  # the reference takes float64


@needs_cuda
def test_out_of_range_ids_assert_on_cuda():
    """On a GPU the id check runs on the device (no host sync): a bad id fails the next synchronising call with a
    device-side assert instead of writing past the routing buffers. In a subprocess: the assert ends its context."""
    code = (
        "import torch\n"
        "from ditmoe_kernels import triton_ops as ops\n"
        "ops.routing_plan(torch.tensor([[0, 1], [2, 7]], device='cuda'), 4)\n"
        "torch.cuda.synchronize()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "device-side assert" in r.stderr, r.stderr[-2000:]


TMA_ON = {kind: {"TMA": 1} for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu", "swiglu_bwd", "dw")}
TMA_CASES = [
    (37, 2, 5, 64, 96, 9, (3,)),  # widths multiples of BK (the dX weights go through TMA too), drops, empty expert
    (37, 2, 5, 40, 72, None, ()),  # widths not multiples of BK: forward weights and A rows only
    (40, 2, 64, 32, 64, None, ()),  # E = 64
]


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("case", range(len(TMA_CASES)))
def test_experts_tma(case, act, monkeypatch):
    """With TMA on (``tile_overrides``), weight tiles, and A tiles where A is not gathered, come through tensor
    descriptors; rows past a group and columns past N read other experts' data that is never stored. Equal to the
    reference like the pointer loads, and every descriptor requested is made (none falls back)."""
    made = []
    real = common.tma_desc
    monkeypatch.setattr(common, "tma_desc", lambda t, block: made.append(real(t, block)) or made[-1])
    with ops.tile_overrides(**TMA_ON):
        check_experts(*TMA_CASES[case], act, torch.float32)
        if case == 0:
            check_experts(*TMA_CASES[case], act, torch.bfloat16)
    assert made and all(d is not None for d in made)
    assert len(made) >= (8 if case == 1 else 10)  # cases 0 and 2 also the dX weights (widths multiples of BK)
    if act == "swiglu":  # the gate/up weight as [E*2, F, D], a box of gate and up rows
        assert any(len(d.block_shape) == 3 for d in made)


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_backward_uses_the_forward_tiles(act, monkeypatch):
    """Autograd runs CUDA backwards in a thread of its own, where the caller's ``tile_overrides`` are not set. The
    backward must still use the tiles the forward saw: here it runs in a new thread, after the block has closed."""
    T, K, E, D, F, cap, empty = TMA_CASES[1]
    plan = ops.routing_plan(make_experts(T, K, E, seed=1, empty=empty), E, cap)
    inputs = _expert_inputs(T, K, E, D, F, act, torch.float32)
    tiles = {kind: {"GROUP_M": 2} for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu", "swiglu_bwd", "dw")}
    with ops.tile_overrides(**tiles):
        out = _experts_fn(ops, act, plan)(*inputs)
    seen = []
    real = common.config
    monkeypatch.setattr(common, "config", lambda kind, dtype: seen.append((kind, real(kind, dtype))) or seen[-1][1])
    worker = threading.Thread(target=lambda: out.backward(torch.ones_like(out)))
    worker.start()
    worker.join()
    assert all(x.grad is not None for x in inputs if x.requires_grad)
    gemms = [(kind, cfg["GROUP_M"]) for kind, cfg in seen if kind in tiles]
    assert {"gmm_dx", "dw"} <= {kind for kind, _ in gemms}
    assert all(group_m == 2 for _, group_m in gemms), gemms


def test_tiles_tuned_for_one_table_reach_only_the_launches_that_read_it():
    """A tile file names the table it was tuned over (``"table"``): its tiles may not even compile on another (bf16
    tiles in an fp32 launch overflow shared memory), so launches that read another table keep their own."""
    here = common.table_name(torch.float32)
    assert here == ("fp32" if DEVICE.type == "cuda" else "interpret")
    other = next(name for name in tiles.TABLES if name != here)
    built_in = common.config("gmm", torch.float32)
    with ops.tile_overrides(table=other, gmm={"GROUP_M": 3}):
        assert common.config("gmm", torch.float32) == built_in
        with ops.tile_overrides(table=here, gmm={"BM": 8}):
            assert common.config("gmm", torch.float32) == {**built_in, "BM": 8}
    with ops.tile_overrides(gmm={"GROUP_M": 3}):  # no table: every launch
        assert common.config("gmm", torch.float32) == {**built_in, "GROUP_M": 3}
    with pytest.raises(ValueError, match="'bf16-sm75'"), ops.tile_overrides(table="bf16-sm75", gmm={"BM": 8}):
        pass


def _layer_out_and_grads(act, inputs, plan):
    out = _experts_fn(ops, act, plan)(*inputs)
    grads = torch.autograd.grad(out, inputs, randn(*out.shape, seed=9, dtype=out.dtype))
    return [out, *grads]


# Tile options that change how the work is done but must not change a bit of the result: (off, on). Both are set
# explicitly, since the bf16 defaults turn some of them on.
SMALL = {"BM": 16, "BN": 32, "num_warps": 4}  # the interpreter's row and column tiles, on a GPU too
SAME_BITS = {
    "permute-first": (
        {"swiglu": {"GATHER": 1}, "gmm_epi": {"GATHER": 1}},
        {"swiglu": {"GATHER": 0}, "gmm_epi": {"GATHER": 0}},
    ),
    "fused-swiglu-bwd": ({"swiglu_bwd": {"FUSED": 0}}, {"swiglu_bwd": {"FUSED": 1}}),
    "persistent": (
        {kind: {"PERSIST": 0} for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu")}
        | {"swiglu_bwd": {"PERSIST": 0, "FUSED": 1}},
        {kind: {"PERSIST": 1} for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu")}
        | {"swiglu_bwd": {"PERSIST": 1, "FUSED": 1}},
    ),
    "prefetch-epilogue": (
        {"swiglu_bwd": {"PRE": 0, "FUSED": 1}, "gmm_epi": {"PRE": 0}},
        {"swiglu_bwd": {"PRE": 1, "FUSED": 1}, "gmm_epi": {"PRE": 1}},
    ),
    "epilogue-reads-ahead": (
        {"swiglu_bwd": {"PRE": 0, "FUSED": 1}, "gmm_epi": {"PRE": 0}},
        {"swiglu_bwd": {"PRE": 2, "FUSED": 1}, "gmm_epi": {"PRE": 2}},
    ),
    "epilogue-pipelined": (
        {"swiglu_bwd": {"PRE": 0, "FUSED": 1}, "gmm_epi": {"PRE": 0}},
        {"swiglu_bwd": {"PRE": 3, "FUSED": 1}, "gmm_epi": {"PRE": 3}},
    ),
    # the forward's h kept for the down dW: the SwiGLU backward (pass, fused epilogue, pipelined epilogue) writes
    # no h; with KEEP_H = 2 the dW runs on a second stream on CUDA (elsewhere as 1)
    "keep-h-pass": ({"swiglu_bwd": {"KEEP_H": 0, "FUSED": 0}}, {"swiglu_bwd": {"KEEP_H": 1, "FUSED": 0}}),
    "keep-h-beside": ({"swiglu_bwd": {"KEEP_H": 0, "FUSED": 1}}, {"swiglu_bwd": {"KEEP_H": 2, "FUSED": 1}}),
    "keep-h-pipelined": (
        {"swiglu_bwd": {"KEEP_H": 0, "FUSED": 1, "PRE": 3}},
        {"swiglu_bwd": {"KEEP_H": 1, "FUSED": 1, "PRE": 3}},
    ),
}
SAME_BITS_CASES = [
    ("permute-first", "swiglu", 0),
    ("permute-first", "gelu", 0),
    ("fused-swiglu-bwd", "swiglu", 0),
    ("fused-swiglu-bwd", "swiglu", 1),  # F = 72: the last column quarter of a tile is partly outside
    ("persistent", "swiglu", 0),  # 3 programs share the tiles out (interpreter), incl. the dropped rows' blocks
    ("persistent", "swiglu", 2),  # E = 64
    ("persistent", "gelu", 0),
    ("prefetch-epilogue", "swiglu", 0),  # drops, an empty expert
    ("prefetch-epilogue", "swiglu", 1),  # F = 72: the last quarter partly outside
    ("prefetch-epilogue", "gelu", 0),
    ("epilogue-reads-ahead", "swiglu", 0),
    ("epilogue-reads-ahead", "swiglu", 1),
    ("epilogue-reads-ahead", "gelu", 1),
    ("epilogue-pipelined", "swiglu", 0),
    ("epilogue-pipelined", "swiglu", 1),
    ("epilogue-pipelined", "gelu", 1),
    ("keep-h-pass", "swiglu", 0),
    ("keep-h-beside", "swiglu", 1),
    ("keep-h-pipelined", "swiglu", 0),
]


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "tma"])
@pytest.mark.parametrize("option,act,case", SAME_BITS_CASES)
def test_tile_options_give_the_same_bits(option, act, case, tma, monkeypatch):
    """permute-first (``GATHER`` = 0: x is permuted before the first expert GEMM, whose A tiles then come through
    TMA when it is on), fused-swiglu-bwd (``swiglu_bwd`` FUSED = 1: the SwiGLU backward in dH's epilogue, in
    column quarters), persistent (``PERSIST``: a few programs loop over the used tiles), prefetch-epilogue
    (``PRE`` = 1: the backward epilogues' input tiles loaded before the K loop), epilogue-reads-ahead (``PRE`` = 2:
    each quarter's loaded before the stores of the one before) and epilogue-pipelined (``PRE`` = 3: the quarters as
    a software-pipelined loop) give the default path's output and every gradient bit for bit, with drops and an
    empty expert. Permute-first costs no extra permute pass: the backward reuses the copy instead of permuting x
    again."""
    T, K, E, D, F, cap, empty = TMA_CASES[case]
    plan = ops.routing_plan(make_experts(T, K, E, seed=5, empty=empty, skew=0.2), E, cap)
    scatters = []
    real = ops._scatter
    monkeypatch.setattr(ops, "_scatter", lambda *a, **kw: scatters.append(len(a) + len(kw)) or real(*a, **kw))
    tma_tiles = {kind: {"TMA": int(tma)} for kind in ("gmm", "gmm_dx", "gmm_epi", "swiglu", "swiglu_bwd")}
    off, on = ({kind: {**tma_tiles[kind], **opts} for kind, opts in side.items()} for side in SAME_BITS[option])
    for dtype in [torch.float32, torch.bfloat16] if tma else [torch.float32]:
        inputs = _expert_inputs(T, K, E, D, F, act, dtype, False, 0)
        with ops.tile_overrides(**{**tma_tiles, **off}):
            scatters.clear()
            want = _layer_out_and_grads(act, inputs, plan)
            n_default = sorted(scatters)
        with ops.tile_overrides(**{**tma_tiles, **on}):
            scatters.clear()
            got = _layer_out_and_grads(act, inputs, plan)
            assert sorted(scatters) == n_default, (scatters, n_default)
        for name, a, b in zip(["out", *NAMES[act]], got, want, strict=True):
            assert torch.equal(a, b), f"{name} ({dtype}) differs with {option}"


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_keep_h_saves_h_and_the_backward_writes_none(keep, monkeypatch):
    """KEEP_H >= 1: the forward saves h (R x F) beside g and u, and the SwiGLU backward is asked for no h; 0: it
    re-makes h. (The bits are test_tile_options_give_the_same_bits's.)"""
    T, K, E, D, F = 21, 2, 4, 24, 40
    x, w, gu, d = _expert_inputs(T, K, E, D, F, "swiglu", torch.float32)
    plan = ops.routing_plan(make_experts(T, K, E, seed=2), E)
    real, asked = ops._dh_swiglu_bwd, []
    monkeypatch.setattr(ops, "_dh_swiglu_bwd", lambda *a, **kw: asked.append(kw.get("save", True)) or real(*a, **kw))
    with ops.tile_overrides(swiglu_bwd={"KEEP_H": keep}):
        out = ops.swiglu_experts(x, w, plan, gu, d)
    kept = out.grad_fn.saved_tensors[-1]  # the Function's context: (a, weights, W_gu, W_down, g, u, y, h or None)
    assert (kept is not None) == (keep > 0)
    if keep:
        assert kept.shape == (T * K, F)
    out.sum().backward()
    assert asked == [keep == 0]


@pytest.mark.parametrize("tma", [0, 1], ids=["pointer-loads", "tma"])
def test_persistent_swiglu_writes_what_one_tile_per_program_writes(tma):
    """The gate/up GEMM's stores, not only the layer's results: h, g and u bit for bit, and zeros on dropped rows
    (which the persistent loop runs through expert 0's weights and must discard). 3 programs share the tiles."""
    T, K, E, D, F = 40, 2, 4, 64, 44
    plan = ops.routing_plan(make_experts(T, K, E, seed=2, empty=(1,)), E, 18)  # capacity 18: drops
    meta = ops.plan_meta(plan)
    a = randn(T * K, D, seed=3, dtype=torch.float32)
    w_gate_up = randn(E, 2 * F, D, seed=4, dtype=torch.float32)
    outs = []
    for persist in (0, 1):
        with ops.tile_overrides(swiglu={"PERSIST": persist, "TMA": tma, **SMALL}):
            outs.append(ops._gmm_swiglu(a, w_gate_up, meta, gather=False))
    kept = plan.counts_E.sum().item()
    assert kept < T * K
    for name, one, persistent in zip("hgu", *outs, strict=True):
        assert torch.equal(persistent, one), name
        assert not persistent[kept:].any(), f"{name}: dropped rows must be zero"


@pytest.mark.parametrize("persist", [0, 1], ids=["one-tile-per-program", "persistent"])
def test_fused_swiglu_bwd_writes_what_the_pass_writes(persist):
    """dH with the SwiGLU backward in its epilogue returns the separate pass's [dgate | dup] and h, bit for bit, and
    zeros for dropped pairs; 4 x 8-column quarters per interpreter tile, the last one partly past F. With
    ``PERSIST``, 3 programs share the tiles out."""
    T, K, E, D, F = 40, 2, 4, 24, 44
    plan = ops.routing_plan(make_experts(T, K, E, seed=2, empty=(1,)), E, 18)  # capacity 18: drops
    meta = ops.plan_meta(plan)
    dy = randn(T * K, D, seed=3, dtype=torch.float32)
    w_down = randn(E, D, F, seed=4, dtype=torch.float32)
    g, u = randn(T * K, F, seed=5, dtype=torch.float32, scale=3.0), randn(T * K, F, seed=6, dtype=torch.float32)
    kept = plan.counts_E.sum().item()
    assert kept < T * K
    g[kept:], u[kept:] = 0, 0  # the forward stores zeros for dropped rows
    with ops.tile_overrides(gmm_dx=SMALL):
        want = ops._swiglu_bwd(ops._gmm(dy, w_down, meta, transpose_w=False), g, u)
    with ops.tile_overrides(swiglu_bwd={"FUSED": 1, "PERSIST": persist, **SMALL}):
        got = ops._dh_swiglu_bwd(dy, w_down, g, u, meta)
    for name, a, b in zip(["dgu", "h"], got, want, strict=True):
        assert a.shape == b.shape and torch.equal(a, b), name
    assert torch.count_nonzero(got[0][kept:]) == 0 and torch.count_nonzero(got[1][kept:]) == 0


@pytest.mark.parametrize("mode", [1, 2], ids=["host-descriptors", "kernel-descriptors"])
def test_tma_falls_back_where_tma_cannot_address(mode):
    """Tensors TMA cannot address take the pointer path with TMA on, whoever makes the descriptors: transposed
    weights, rows whose stride is not 16-byte aligned (D = 18 fp32: 72 bytes), a base off 16-byte alignment."""
    with ops.tile_overrides(**{kind: {"TMA": mode} for kind in TMA_ON}):
        check_experts(*TMA_CASES[1], "swiglu", torch.float32, noncontig=True)
        check_experts(29, 2, 4, 18, 40, None, (), "gelu", torch.float32)
    w = randn(3, 8, 16, seed=0, dtype=torch.float32)
    assert common.descriptor(mode, w, [8, 8])[0] == mode
    assert common.descriptor(mode, w.transpose(1, 2), [8, 8])[0] == 0
    assert common.descriptor(mode, randn(8, 18, seed=1, dtype=torch.float32), [8, 8])[0] == 0
    assert common.descriptor(mode, randn(8, 20, seed=1, dtype=torch.float32)[:, 1:17], [8, 8])[0] == 0  # base + 4 B


class _Launches:
    """Stands in for a kernel: records some of each launch's arguments by name, then launches it."""

    def __init__(self, kernel, names: tuple[str, ...], log: list):
        self.kernel, self.names, self.log = kernel, names, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append({n: args[self.kernel.arg_names.index(n)] for n in self.names})
            return self.kernel[grid](*args, **kw)

        return launch


# The kinds of the grouped GEMMs with TMA, their options for the tests below (the first GEMM's A permuted first, so
# that it goes through TMA; the SwiGLU backward in dH's epilogue), and the tiles a warp-specialized kernel needs on
# sm_90 (on CPU the interpreter's own).
TMA_KINDS = {"gmm": {}, "gmm_dx": {}, "gmm_epi": {"GATHER": 0}, "swiglu": {"GATHER": 0}, "swiglu_bwd": {"FUSED": 1}}
WS_TILES = {"BM": 128, "BN": 64, "num_warps": 4} if DEVICE.type == "cuda" else {}
KERNEL_DESCRIPTORS = {
    "kernel-descriptors": {"TMA": 2},
    "warp-specialized": {"TMA": 2, "PERSIST": 1, "WS": 1, **WS_TILES},
}


@pytest.mark.parametrize("option", list(KERNEL_DESCRIPTORS))
@pytest.mark.parametrize("case,act", [(0, "swiglu"), (0, "gelu"), (1, "swiglu")])
def test_descriptors_made_in_the_kernel_give_the_same_bits(case, act, option, monkeypatch):
    """TMA = 2 (the kernels make their descriptors: no encoding on the host per launch) and with it WS (the
    persistent loop split into a loading and two computing warp groups; on CPU the interpreter runs it as one) give
    host-made descriptors' output and gradients bit for bit (fp32; case 0 bf16 too). Every GEMM that TMA can
    address takes the option (case 1: dX weights with widths not multiples of BK take pointer loads, and no WS)."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    from ditmoe_kernels.triton_ops import gemm, swiglu

    T, K, E, D, F, cap, empty = TMA_CASES[case]
    plan = ops.routing_plan(make_experts(T, K, E, seed=5, empty=empty, skew=0.2), E, cap)
    launches: list[dict] = []
    names = ("TMA_A", "TMA_B", "WS")
    monkeypatch.setattr(gemm, "_gmm_kernel", _Launches(gemm._gmm_kernel, names, launches))
    monkeypatch.setattr(swiglu, "_gmm_swiglu_kernel", _Launches(swiglu._gmm_swiglu_kernel, names, launches))
    host = {kind: {**opts, "TMA": 1} for kind, opts in TMA_KINDS.items()}
    kernel = {kind: {**opts, **KERNEL_DESCRIPTORS[option]} for kind, opts in TMA_KINDS.items()}
    for dtype in (torch.float32, torch.bfloat16) if case == 0 else (torch.float32,):
        inputs = _expert_inputs(T, K, E, D, F, act, dtype, False, 0)
        with ops.tile_overrides(**host):
            want = _layer_out_and_grads(act, inputs, plan)
        launches.clear()
        with ops.tile_overrides(**kernel):
            got = _layer_out_and_grads(act, inputs, plan)
        for name, a, b in zip(["out", *NAMES[act]], got, want, strict=True):
            assert torch.equal(a, b), f"{name} ({dtype}) differs with {option}"
    assert len(launches) >= 3 and all(x["TMA_A"] in (0, 2) and x["TMA_B"] in (0, 2) for x in launches), launches
    both = [x["TMA_A"] == 2 and x["TMA_B"] == 2 for x in launches]
    assert sum(both) >= 2 and (all(both) or case == 1), launches  # the forward GEMMs at least; case 0 every one
    assert [x["WS"] for x in launches] == (both if option == "warp-specialized" else [False] * len(launches))


def test_kernel_descriptors_lend_an_allocator_only_inside_the_block():
    """Descriptors made in a kernel need scratch from the allocator Triton reads at launch, a context variable that
    autograd's backward threads do not inherit: ``device_descriptors`` sets one for its block in whatever thread
    runs it, and puts back what was there (here, in a new thread: none)."""
    from triton.runtime import _allocation

    seen = []

    def body():
        before = _allocation._allocator.get()
        with common.device_descriptors(False):
            seen.append(_allocation._allocator.get() is before)
        with common.device_descriptors(True):
            seen.append(_allocation._allocator.get() is common._scratch)
        seen.append(_allocation._allocator.get() is before)
        seen.append(isinstance(before, _allocation.NullAllocator))

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    assert seen == [True, True, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_without_grad_the_forward_stores_no_pre_activations(act, dtype, monkeypatch):
    """Sampling (no_grad, inference_mode, or nothing that needs a gradient) runs the first expert GEMM without
    storing what only the backward reads (SwiGLU: g and u, two thirds of its epilogue's stores; GELU: z), with the
    same output bits as a training forward."""
    T, K, E, D, F = 37, 2, 5, 40, 72
    x, w, *params = _expert_inputs(T, K, E, D, F, act, dtype)
    plan = ops.routing_plan(make_experts(T, K, E, seed=3, empty=(2,)), E, 30)  # an empty expert and drops
    fn, name = (ops.swiglu_experts, "_gmm_swiglu") if act == "swiglu" else (ops.gelu_experts, "_gmm")
    inner, saves = getattr(ops, name), []

    def spy(*args, **kw):  # what the first expert GEMM was asked to save
        if act == "swiglu" or kw.get("epi") == ops.EPI_GELU:
            saves.append(kw["save"])
        return inner(*args, **kw)

    monkeypatch.setattr(ops, name, spy)
    trained = fn(x, w, plan, *params)
    with torch.no_grad():
        sampled = fn(x, w, plan, *params)
    with torch.inference_mode():
        inferred = fn(x, w, plan, *params)
    frozen = fn(*(t.detach() for t in (x, w)), plan, *(t.detach() for t in params))
    assert saves == [True, False, False, False]
    for out in (sampled, inferred, frozen):
        assert not out.requires_grad and torch.equal(out, trained.detach())
    if act == "swiglu":  # the kernel itself: h alone, the same h
        meta = ops.plan_meta(plan)
        a = ops._scatter(x.detach(), meta)
        h, g, u = inner(a, params[0].detach(), meta, gather=False)
        h2, g2, u2 = inner(a, params[0].detach(), meta, gather=False, save=False)
        assert g2 is None and u2 is None and torch.equal(h, h2)


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_experts_noncontiguous(act):
    check_experts(29, 2, 4, 40, 56, None, (), act, torch.float32, noncontig=True)


if given is not None:

    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(st.data())
    def test_experts_property(data):
        E = data.draw(st.integers(1, 9), label="E")
        K = data.draw(st.integers(1, min(E, 3)), label="K")
        T = data.draw(st.integers(1, 40), label="T")
        D = data.draw(st.integers(4, 48), label="D")
        F = data.draw(st.integers(4, 80), label="F")
        cap = data.draw(st.one_of(st.none(), st.integers(0, T * K)), label="capacity")
        act = data.draw(st.sampled_from(["swiglu", "gelu"]), label="act")
        seed = data.draw(st.integers(0, 1000), label="seed")
        check_experts(T, K, E, D, F, cap, (), act, torch.float32, seed=seed)

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(st.data())
    def test_routing_plan_property(data):
        E = data.draw(st.integers(1, 70), label="E")
        K = data.draw(st.integers(1, min(E, 4)), label="K")
        T = data.draw(st.integers(1, 200), label="T")
        cap = data.draw(st.one_of(st.none(), st.integers(0, T * K)), label="capacity")
        block = data.draw(st.sampled_from([0, 16, 64]), label="routing block")
        ex = make_experts(T, K, E, seed=data.draw(st.integers(0, 10**6), label="seed"), skew=1.0)
        with ops.tile_overrides(route={"BLOCK": block}):
            plan = ops.routing_plan(ex, E, cap)
        want = ref.routing_plan(ex, E, cap)
        for field in ("sorted_flat_R", "counts_E", "offsets_E1", "dropped"):
            assert torch.equal(getattr(plan, field), getattr(want, field)), field
        check_kernel_tables(plan, K)

else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_experts_property():
        pass

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_routing_plan_property():
        pass


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_autocast(act):
    """fp32 activations and master weights under bf16 autocast: computed and returned in bf16 by both (the
    reference's grouped GEMMs, torch.mm into preallocated rows, are outside autocast's reach: they cast to its
    dtype themselves), gradients in the parameters' fp32."""
    T, K, E, D, F = 29, 2, 4, 40, 56
    ex = make_experts(T, K, E, seed=4)
    plan_ops, plan_ref = ops.routing_plan(ex, E), ref.routing_plan(ex, E)
    inputs = _expert_inputs(T, K, E, D, F, act, torch.float32)
    results = []
    for mod, plan in ((ops, plan_ops), (ref, plan_ref)):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            results.append(run_with_grads(_experts_fn(mod, act, plan), inputs))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.dtype == out_b.dtype == torch.bfloat16
    assert_near(out_a, out_b, torch.bfloat16, "autocast forward")
    for n, a, b in zip(NAMES[act], grads_a, grads_b, strict=True):
        assert a.dtype == b.dtype == torch.float32, n
        assert_near(a, b, torch.bfloat16, f"autocast grad {n}")


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_reference_passes_gradcheck_in_float64(act):
    """The oracle's gradients against finite differences, float64 all through (its combine summed in float32)."""
    T, K, E, D, F = 5, 2, 3, 4, 6
    plan = ref.routing_plan(make_experts(T, K, E, seed=2).cpu(), E)
    inputs = [t.detach().cpu().double().requires_grad_() for t in _expert_inputs(T, K, E, D, F, act, torch.float32)]
    assert torch.autograd.gradcheck(_experts_fn(ref, act, plan), inputs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_second_derivative_is_refused(backend):
    """Their backwards record no graph (kernels, torch.mm into preallocated rows): a gradient penalty through them
    is an error, where it came back without the terms through the experts (Triton) or failed on torch.mm's out=."""
    mod = BACKENDS[backend]
    x, w, gu, d = _expert_inputs(6, 2, 3, 8, 12, "swiglu", torch.float32)
    plan = mod.routing_plan(make_experts(6, 2, 3, seed=1), 3)
    (dx,) = torch.autograd.grad(mod.swiglu_experts(x, w, plan, gu, d).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dx.square().sum().backward()


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_bitwise_deterministic(act):
    dtype = torch.bfloat16
    T, K, E, D, F = 45, 2, 4, 40, 72
    ex = make_experts(T, K, E, seed=11, skew=0.5)
    inputs = _expert_inputs(T, K, E, D, F, act, dtype)
    runs = []
    for _ in range(2):
        plan = ops.routing_plan(ex, E, 30)
        runs.append(run_with_grads(_experts_fn(ops, act, plan), inputs))
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# GPU-only checks
# --------------------------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_experts_bf16_medium_cuda(act):
    """Production tiles on several full blocks per expert, one expert at twice the average load."""
    check_experts(512, 2, 8, 256, 704, None, (5,), act, torch.bfloat16)


@needs_cuda
def test_no_host_sync_cuda():
    T, K, E, D, F = 256, 2, 8, 64, 128
    ex = make_experts(T, K, E, seed=1)
    x, w, gu, d = _expert_inputs(T, K, E, D, F, "swiglu", torch.bfloat16)
    for cap in (None, 40):  # compile outside the check
        ops.swiglu_experts(x, w, ops.routing_plan(ex, E, cap), gu, d).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cap in (None, 40):
            plan = ops.routing_plan(ex, E, cap)
            out = ops.swiglu_experts(x, w, plan, gu, d)
            out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------------------------------------------
# The model end to end
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act,capacity_factor", [("swiglu", None), ("gelu", 1.0)])
def test_dit_moe_triton_equals_torch(monkeypatch, act, capacity_factor):
    pytest.importorskip("ditmoe.models.dit")
    from ditmoe.config import ModelConfig, MoEConfig
    from ditmoe.models.dit import DiTMoE

    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=4,
        top_k=2,
        expert_act=act,
        shared_expert_ratio=1.0,
        capacity_factor=capacity_factor,
        backend="torch",
    )
    cfg = ModelConfig(
        name="tiny",
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        moe=moe,
    )
    model = DiTMoE(cfg).to(DEVICE)
    with torch.no_grad():  # leave DiT's zero init, so every parameter gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8, device=DEVICE)
    t = torch.tensor([3.0, 700.0], device=DEVICE)
    y = torch.tensor([1, 10], device=DEVICE)

    def run(backend):
        monkeypatch.setenv("DITMOE_MOE_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        out = model(x, t, y)
        (out.prediction.square().mean() + out.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    out_t, grads_t = run("torch")
    out_k, grads_k = run("triton")
    assert_near(out_k.prediction, out_t.prediction, torch.float32, "prediction")
    for a, b in zip(out_k.routing, out_t.routing, strict=True):
        assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E) and torch.equal(a.dropped, b.dropped)
    assert grads_k.keys() == grads_t.keys()
    assert any(n.endswith(("gate_up_proj", "fc1")) and ".experts." in n for n in grads_k)
    for n in grads_t:
        assert_near(grads_k[n], grads_t[n], torch.float32, f"grad {n}")
