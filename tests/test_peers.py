"""Our MoE ops against other projects' (``ditmoe_kernels.peers``), on the same inputs, forward and every gradient:
DeepSpeed AutoEP's Triton grouped GEMM and its whole local layer, megatron-core's permute and unpermute.

Our reference is ours too: a misreading shared by it and our kernels would pass every other kernel test, not these.
Both our backends are checked, the reference and the Triton kernels (through the interpreter on CPU). fp32, to
1e-5 of the largest entry on CPU (summation order); on CUDA DeepSpeed's fp32 GEMMs multiply in TF32 (``tl.dot``'s
default precision, about 1e-3 per GEMM), so 1e-2 there, where a gradient passes through several of them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("deepspeed", reason="DeepSpeed (a requirement) is not installed")
pytest.importorskip("megatron.core", reason="megatron-core (a requirement) is not installed")

from ditmoe_kernels import peers  # noqa: E402
from ditmoe_kernels import reference as ref  # noqa: E402
from ditmoe_kernels import triton_ops as ops  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not peers.INTERPRET:
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)
TOL = 1e-2 if DEVICE.type == "cuda" else 1e-5
pytestmark = pytest.mark.usefixtures("exact_fp32_matmuls")  # tests/conftest.py
BACKENDS = {"reference": ref, "triton": ops}

# T, K, E, D, F, experts left without tokens
CASES = [
    (37, 2, 5, 40, 24, (1,)),
    (16, 1, 1, 16, 32, ()),
    (20, 3, 3, 24, 40, ()),
    (33, 2, 8, 16, 16, (0, 7)),
    (40, 2, 16, 32, 32, (3,)),  # G's 16 experts
]


@pytest.fixture(autouse=True)
def _one_deepspeed_config(monkeypatch):
    """DeepSpeed's GEMMs try six tile configs per shape on a GPU, compiling each: as an oracle one config does (the
    interpreter already has one), which keeps a GPU run of these tests to seconds."""
    gemm = peers.deepspeed_triton().gemm
    for kernel in (gemm._group_gemm_kernel, gemm._group_gemm_dw_kernel):
        monkeypatch.setattr(kernel, "configs", kernel.configs[:1])


def experts(T: int, K: int, E: int, empty: tuple, seed: int) -> torch.Tensor:
    """[T, K] distinct experts per token, none in ``empty``."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:K]] for _ in range(T)]).to(DEVICE)


def randn(*shape, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()


def out_and_grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE, out.dtype)
    return [out.detach(), *torch.autograd.grad(out, inputs, probe)]


def assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor], names: list[str], tol: float = TOL) -> None:
    for name, a, b in zip(names, ours, theirs, strict=True):
        assert a.shape == b.shape, f"{name}: {tuple(a.shape)} vs {tuple(b.shape)}"
        a, b = a.float(), b.float()
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: normalised error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,D,F,empty", CASES)
def test_deepspeed_triton_grouped_gemm_agrees(T, K, E, D, F, empty, backend):
    """Forward, dX and dW of one grouped GEMM, an empty expert's dW (zeros) included."""
    mod = BACKENDS[backend]
    plan = mod.routing_plan(experts(T, K, E, empty, seed=T), E)
    x, w = randn(T * K, D, seed=1), randn(E, F, D, seed=2, scale=D**-0.5)
    ours = out_and_grads(lambda x, w: mod.grouped_mm(x, w, plan), [x, w])
    theirs = out_and_grads(lambda x, w: peers.deepspeed_grouped_mm(x, w, plan.counts_E), [x, w])
    assert_close(ours, theirs, ["out", "dX", "dW"])
    for e in empty:
        assert not ours[2][e].any() and not theirs[2][e].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,D,F,empty", CASES)
def test_deepspeed_autoep_layer_agrees(T, K, E, D, F, empty, backend):
    """The whole routed SwiGLU layer against AutoEP's local path: its routing, alignment padding, Triton grouped
    GEMMs and fused SwiGLU and its combine, with the gradients of x, the routing weights and every weight."""
    mod = BACKENDS[backend]
    ex = experts(T, K, E, empty, seed=T)
    x, weights = randn(T, D, seed=1), randn(T, K, seed=2)
    w_gate_up, w_down = randn(E, 2 * F, D, seed=3, scale=D**-0.5), randn(E, D, F, seed=4, scale=F**-0.5)
    inputs = [x, weights, w_gate_up, w_down]
    ours = out_and_grads(lambda x, p, gu, d: mod.swiglu_experts(x, p, mod.routing_plan(ex, E), gu, d), inputs)

    def autoep(x, p, gu, d):  # AutoEP keeps gate and up as two weights
        return peers.autoep_swiglu_experts(x, p, ex, gu[:, :F].contiguous(), gu[:, F:].contiguous(), d)

    theirs = out_and_grads(autoep, inputs)
    assert_close(ours, theirs, ["out", "d x", "d weights", "d gate_up", "d down"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,D,F,empty", CASES)
def test_megatron_core_dispatch_agrees(T, K, E, D, F, empty, backend):
    """megatron-core orders rows by expert, then token, as we do: the permuted rows agree bit for bit; the permute's
    backward (each token's K row gradients summed: in another order at K = 3) and the weighted combine with its
    gradients for the rows and the weights to rounding."""
    mod = BACKENDS[backend]
    ex = experts(T, K, E, empty, seed=T)
    plan, rmap = mod.routing_plan(ex, E), peers.routing_map(ex, E)
    x = randn(T, D, seed=1)
    ours = out_and_grads(lambda x: mod.permute(x, plan), [x])
    theirs = out_and_grads(lambda x: peers.megatron_permute(x, rmap, T * K)[0], [x])
    assert torch.equal(ours[0], theirs[0])
    assert_close(ours[1:], theirs[1:], ["d x"])
    sorted_indices = peers.megatron_permute(x.detach(), rmap, T * K)[1]
    y, weights = randn(T * K, D, seed=3), randn(T, K, seed=4)
    ours = out_and_grads(lambda y, p: mod.unpermute(y, p, plan), [y, weights])
    theirs = out_and_grads(
        lambda y, p: peers.megatron_unpermute(y, sorted_indices, peers.probs_map(p, ex, E), rmap), [y, weights]
    )
    assert_close(ours, theirs, ["out", "d rows", "d weights"])


needs_grouped_mm = pytest.mark.skipif(
    DEVICE.type != "cuda" or torch.cuda.get_device_capability() < (9, 0), reason="torch._grouped_mm needs sm90+"
)


def bf16_layer_inputs(T: int, K: int, E: int, D: int, F: int) -> list[torch.Tensor]:
    """x, routing weights, gate/up and down weights in bf16, the one dtype torch._grouped_mm takes on CUDA."""
    bf16 = torch.bfloat16
    inputs = [randn(T, D, seed=1, dtype=bf16), randn(T, K, seed=2, dtype=bf16)]
    return inputs + [
        randn(E, 2 * F, D, seed=3, scale=D**-0.5, dtype=bf16),
        randn(E, D, F, seed=4, scale=F**-0.5, dtype=bf16),
    ]


@needs_grouped_mm
@pytest.mark.parametrize("T,K,E,D,F,empty", CASES)
def test_deepspeed_autoep_grouped_mm_layer_agrees(T, K, E, D, F, empty):
    """AutoEP's local layer as it runs on sm90 (torch._grouped_mm), bf16 on both sides, every gradient (3e-2: a
    few bf16 steps of the largest entry, both sides rounding their intermediates)."""
    ex = experts(T, K, E, empty, seed=T)
    plan = ops.routing_plan(ex, E)
    inputs = bf16_layer_inputs(T, K, E, D, F)
    ours = out_and_grads(lambda x, p, gu, d: ops.swiglu_experts(x, p, plan, gu, d), inputs)

    def autoep(x, p, gu, d):
        return peers.autoep_swiglu_experts(x, p, ex, gu[:, :F].contiguous(), gu[:, F:].contiguous(), d, "grouped_mm")

    theirs = out_and_grads(autoep, inputs)
    assert_close(ours, theirs, ["out", "d x", "d weights", "d gate_up", "d down"], tol=3e-2)


def test_autoep_refuses_an_unknown_gemm():
    with pytest.raises(ValueError, match="gemm must be one of .* got 'cublas'"):
        w = torch.zeros(1, 8, 8, device=DEVICE)
        peers.autoep_swiglu_experts(
            torch.zeros(2, 8, device=DEVICE),
            torch.ones(2, 1, device=DEVICE),
            torch.zeros(2, 1, dtype=torch.long, device=DEVICE),
            w,
            w,
            w,
            gemm="cublas",
        )


@needs_grouped_mm
@pytest.mark.parametrize("T,K,E,D,F,empty", CASES)
def test_megatron_core_grouped_mm_layer_agrees(T, K, E, D, F, empty):
    """The layer megatron-core builds around torch._grouped_mm (the benchmark's peer), every gradient; bf16 as
    above."""
    ex = experts(T, K, E, empty, seed=T)
    plan, rmap = ops.routing_plan(ex, E), peers.routing_map(ex, E)
    offs = plan.offsets_E1[1:].to(torch.int32)
    inputs = bf16_layer_inputs(T, K, E, D, F)
    ours = out_and_grads(lambda x, p, gu, d: ops.swiglu_experts(x, p, plan, gu, d), inputs)
    theirs = out_and_grads(
        lambda x, p, gu, d: peers.megatron_grouped_mm_swiglu_experts(x, peers.probs_map(p, ex, E), rmap, offs, gu, d),
        inputs,
    )
    assert_close(ours, theirs, ["out", "d x", "d weights", "d gate_up", "d down"], tol=3e-2)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="DeepSpeed's fused restore runs on a GPU only (see peers)")
@pytest.mark.parametrize("T,K,E,D,F,empty", CASES)
def test_deepspeed_fused_restore_agrees(T, K, E, D, F, empty):
    """AutoEP's opt-in fused combine: fp32 sums in slot order, like ours, and the routing-weight gradient."""
    plan = ops.routing_plan(experts(T, K, E, empty, seed=T), E)
    y, weights = randn(T * K, D, seed=3), randn(T, K, seed=4)
    ours = out_and_grads(lambda y, p: ops.unpermute(y, p, plan), [y, weights])
    theirs = out_and_grads(lambda y, p: peers.deepspeed_combine(y, p, plan.sorted_flat_R), [y, weights])
    assert_close(ours, theirs, ["out", "d rows", "d weights"])
