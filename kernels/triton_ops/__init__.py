"""Triton MoE dispatch: the same API as ``reference`` (routing plan, permute, grouped GEMM, unpermute, fused experts).

Modules: ``routing`` (routing metadata, block tables), ``rows`` (permute / combine), ``gemm`` (grouped GEMMs forward
and dX, with their epilogues), ``swiglu`` (the gate/up GEMM, the elementwise SwiGLU backward), ``dw`` (weight
gradients), ``activations`` (their math), ``common`` (tile configs, launch options, descriptors, shared device
helpers); this package holds the autograd Functions and the public API.

Shape suffixes follow ``reference``: T tokens, K top-k, E experts, R = T*K permuted rows, D model width, F expert
width; a weight is stored like nn.Linear, ``[E, O(ut), I(n)]``. A "flat" id is ``token * K + slot``.

Design (see /work/shared/notes/kernels.md):
- Routing metadata on device, no host sync, stable: per-block histogram -> one-program scan -> rank within block.
  With a capacity, a first pass ranks pairs in priority order (slot-major, then token) to decide which are kept;
  the second pass places kept pairs per expert in flat order and dropped pairs in a sentinel group E at the end.
  The same three kernels write each permuted row's token and the dW's expert order and flag ids outside [0, E)
  (routed to the sentinel), in place of eight torch ops per plan.
- Grouped GEMMs launch a static grid over ``cdiv(R, BM) + E + 1`` M-blocks (the upper bound) x N-tiles. A block
  table computed on device gives each M-block one group (expert) and its row range: indices are padded, tensors
  are not. The sentinel group's blocks write zeros (dropped rows), unused blocks do no work. Tile key ``PERSIST``
  (every GEMM kind but ``dw``) launches PERSIST programs per SM instead, which loop over the used tiles (the table
  also holds their count); every tile then runs the same K loop, so the compiler flattens tile and K loops into one
  pipelined loop whose loads for the next tile overlap this tile's epilogue.
- The first expert GEMM gathers its A rows through the permutation (an int32 token table ``sorted_flat // K``
  computed once per plan): no permuted copy of x. Tile key ``GATHER`` = 0 (kinds ``swiglu``, ``gmm_epi``) permutes
  x first instead: the GEMM's A tiles can then load through TMA, and the backward reuses the copy for the first
  weight's dW, which needs it permuted anyway (so the copy costs no extra pass, only R x D of saved activations
  in place of T x D). Both give the same bits; bf16 permutes first (run 4, H100, XL: 0.65 ms against 0.77).
- SwiGLU / GELU run in the epilogue of the first GEMM, which also stores the pre-activations where a backward may
  follow (autograd records the call): sampling's forward stores h alone, a third of the SwiGLU epilogue's stores (g
  and u are the other two). Backward re-materialises the activation h from the saved pre-activations (h is not kept
  from the forward, unless tile setting ``KEEP_H`` of ``swiglu_bwd`` trades R x F of saved activations for not writing
  it again, and with 2 runs the down dW on a second CUDA stream beside the SwiGLU backward), so the dW of the second
  weight is a plain K-reduction dy^T h: no elementwise work inside any GEMM main loop, where it would stall the
  pipelining. SwiGLU: dH = dy W2 is a plain grouped GEMM and one elementwise pass writes h and
  [dgate | dup] side by side in one [R, 2F] buffer. Fusing that pass into dH's epilogue (kind ``swiglu_bwd``,
  FUSED = 1) saves writing and re-reading dH. Run 2 timed a fused version at 0.75 vs 0.54 ms (XL): its 128x128
  epilogue spilled (255 registers) and one block per SM left it unhidden. The epilogue now works in column
  quarters (128 registers; with TMA and 3 stages two blocks fit per SM): run 4 timed it at 0.54 ms against
  0.64 for dH and the pass, so bf16 fuses.
  The gate and up weights are one stacked tensor W_gu [E, 2F, D] (gate rows, then up rows; the column order of
  [dgate | dup]). The gate/up GEMM takes a [BK, 2*BN] tile of both halves per K step into one [BM, 2*BN]
  accumulator, split in the epilogue: on sm_90 one wgmma 2*BN wide where two accumulators over separate weights
  issued two BN wide ones, each re-reading the A tile from shared memory (at BN = 64 that needs 128 bytes per
  clock per SM at full tensor rate: all the shared memory bandwidth there is). Its dX is one GEMM
  [dgate | dup] @ W_gu[e] over K = 2F, its dW one K-reduction into W_gu's gradient.
  GELU: the dX GEMM of the second weight runs the backward in its own 128x128-tile epilogue (``gmm_epi``).
  The combine is a gather with fp32 accumulation that also yields the routing-weight gradient in backward.
  No atomics anywhere: bitwise deterministic.
- dW: one program per (expert, O-tile, I-tile) walks the expert's rows in a counted loop of [BR, BO] x [BR, BI]
  row-contiguous tiles (A enters tl.dot through tl.trans), fp32 accumulate, largest experts first; an expert with
  no rows writes zeros. Bias gradients are fp32 row sums. The gate/up dW is one K-reduction over the
  [dgate | dup] buffer (O = 2F) against the permuted x: a single accumulator and no gathered rows, the shape of
  the down dW that ran at 0.95 of dense (a dual-accumulator kernel over gathered x reached 0.47, run 3).
  Where it takes fewer tiles the kernel computes dW[e]^T = B^T A and stores it transposed: with 128x256 tiles
  the gate/up dW (I = D, not a multiple of 256 at S, XL or G) otherwise computes 8-33% empty columns.
- fp32/bf16/fp16 inputs, fp32 accumulation. fp32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.
- TMA (tile key ``TMA`` of the GEMM kinds; on in bf16 except ``gmm_epi`` and ``dw``, from run 4's sweep): weight
  tiles, and A tiles where A is not gathered, load through host-made tensor descriptors over 2-D views ([E, X, Y] ->
  [E*X, Y]; W_gu as [E*2, F, D] in 3-D, so a gate/up box stops at row F of each half). A tile that runs past its
  group reads another group's rows or columns, which only reach outputs that are never stored; the dX weights use
  TMA only when Kdim is a multiple of BK, where that would reach the accumulator. In dW, where rows are the
  reduction, only whole chunks of an expert's rows come through descriptors and the last partial chunk through
  masked pointer loads. Tensors TMA cannot address (strided, misaligned) take the pointer loads. Output tiles leave
  through masked stores: TMA stores of full blocks (run 6, H200) were slower in every tile set tried. ``TMA`` = 2:
  the kernels make those descriptors themselves (``tl.make_tensor_descriptor``, from the pointer, shape and strides,
  with scratch from torch's allocator), so Triton's launcher does not encode one on the host at every launch (run 6:
  ~0.3 ms of host time per S layer). dW's descriptors then span one expert's rows, and TMA reads the rows past them
  as zeros: its last partial chunk comes through them too. ``bench/inspect_kernels.py`` shows the sm_90 code.
- Warp specialization (tile key ``WS``; with ``TMA`` = 2, ``PERSIST`` and 4 warps): the persistent tile loop is
  split by the compiler into a producer warp group that issues the TMA loads and two consumer warp groups of BM/2
  rows that run the wgmma products and the epilogue, registers moved to the consumers (``setmaxnreg``). Triton 3.6
  and 3.9 build it for sm_90 only that way: with 8 warps or flattened loops they make no partitions, with host-made
  descriptors at BM = 128 the pass fails, and 3.6 cannot reshape a split accumulator, so the gate/up GEMM keeps
  gate and up in two accumulators there and the backward epilogues work on whole tiles. Untimed as yet
  (``bench/tiles/ws-bf16.json``).

Tile configs (``tiles``) are fixed per (kind, dtype, architecture) so results never depend on batch composition;
``tile_overrides`` lets a benchmark try others inside a ``with`` block (``bench/bench_kernels.py --sweep`` covers
every GEMM kind, forward and backward). Under ``TRITON_INTERPRET=1`` (CPU tests) tiles are small and dot operands
are upcast to fp32 (the 3.9 interpreter multiplies bf16 bit patterns as integers); products of bf16/fp16 values are
exact in fp32, so this matches the GPU's fp32-accumulating MMA up to summation order.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from ditmoe_kernels import checks, tiles
from ditmoe_kernels.reference import RoutingPlan, compute_dtype
from ditmoe_kernels.tiles import check_tiles, load_tiles, tile_overrides
from ditmoe_kernels.triton_ops import common
from ditmoe_kernels.triton_ops.dw import _gmm_dw
from ditmoe_kernels.triton_ops.gemm import EPI_GELU, EPI_GELU_BWD, EPI_SWIGLU_BWD, _gmm
from ditmoe_kernels.triton_ops.routing import Meta, TritonRoutingPlan, plan_meta, routing_plan
from ditmoe_kernels.triton_ops.rows import _gather, _scatter
from ditmoe_kernels.triton_ops.swiglu import _gmm_swiglu, _swiglu_bwd

__all__ = [
    "RoutingPlan",
    "TritonRoutingPlan",
    "routing_plan",
    "permute",
    "grouped_mm",
    "unpermute",
    "swiglu_experts",
    "gelu_experts",
    "tile_overrides",
    "check_tiles",
    "load_tiles",
]


def _backward_under_forward_tiles(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: the Function's backward runs under the ``tile_overrides`` its forward saw. Autograd runs CUDA
    backwards in its own thread, where the caller's context variables are not set. The backward's kernels record no
    graph, so it is marked once-differentiable: a second derivative is refused instead of coming back without
    the terms that pass through it."""
    forward, backward = cls.forward, cls.backward

    @functools.wraps(forward)
    def forward_recording_tiles(ctx, *args):
        ctx.tiles = tiles.overrides()
        return forward(ctx, *args)

    @functools.wraps(backward)
    def backward_under_tiles(ctx, *grads):
        with tiles.exactly(ctx.tiles):
            return backward(ctx, *grads)

    cls.forward = staticmethod(forward_recording_tiles)
    cls.backward = staticmethod(once_differentiable(backward_under_tiles))
    return cls


def _expert_input(x_TD: torch.Tensor, meta: Meta, kind: str) -> tuple[torch.Tensor, bool]:
    """A of an expert layer's first GEMM and whether that GEMM gathers it: x itself, read through the permutation
    (``GATHER`` = 1 in the kind's config: no copy), or a permuted copy [R, D] (0: its A tiles can load through TMA,
    and the backward reuses the copy for the first weight's dW instead of permuting x again)."""
    if common.config(kind, x_TD.dtype).get("GATHER", 1):
        return x_TD, True
    return _scatter(x_TD, meta), False


def _dh_swiglu_bwd(dy, w_down, g, u, meta: Meta, save: bool = True):
    """(dGU [R, 2F] = [dgate | dup], h [R, F]) from dy and the saved pre-activations: dH = dy W_down in a grouped
    GEMM whose epilogue runs the SwiGLU backward (``swiglu_bwd`` FUSED = 1), or a plain dH GEMM and then the
    elementwise pass (0). Both give the same bits. save=False (h kept from the forward): no h, None in its place."""
    if common.config("swiglu_bwd", dy.dtype).get("FUSED", 0):
        g, u = g.contiguous(), u.contiguous()
        return _gmm(dy, w_down, meta, transpose_w=False, epi=EPI_SWIGLU_BWD, x0=g, x1=u, save=save)
    return _swiglu_bwd(_gmm(dy, w_down, meta, transpose_w=False), g, u, save=save)


def _beside(first, second, side: bool):
    """(first(), second()): in turn, or (side) first on a second CUDA stream (from torch's pool) while second runs
    on this one, which then waits for it. What first reads must outlive this call: this stream's wait for the
    other is queued before any of it can be freed, so the allocator cannot hand its memory out early. first's
    result, made on the other stream, is marked as used on this one."""
    if not side:
        return first(), second()
    here = torch.cuda.current_stream()
    other = torch.cuda.Stream()
    other.wait_stream(here)
    with torch.cuda.stream(other):
        out_first = first()
    out_second = second()
    here.wait_stream(other)
    out_first.record_stream(here)
    return out_first, out_second


def _swiglu_backward(dy, w_down, g, u, h, meta: Meta, want_dw: bool):
    """([dgate | dup], the down weight's dW or None) from dy and the forward's g and u. h None: the SwiGLU backward
    re-makes h and the dW follows it. h kept (``swiglu_bwd`` KEEP_H >= 1): the dW needs nothing of the SwiGLU
    backward; with KEEP_H = 2 on CUDA it runs on a second stream beside it (a compute-bound GEMM beside dH's
    memory-bound epilogue or pass)."""
    if h is None:
        dgu, h = _dh_swiglu_bwd(dy, w_down, g, u, meta)
        return dgu, _gmm_dw(dy, h, meta)[0] if want_dw else None
    if not want_dw:
        return _dh_swiglu_bwd(dy, w_down, g, u, meta, save=False)[0], None
    side = dy.is_cuda and common.config("swiglu_bwd", dy.dtype).get("KEEP_H", 0) == 2
    meta.order()  # the dW's expert order, cached in the plan: made on this stream, before the other reads it
    dw_down, (dgu, _) = _beside(
        lambda: _gmm_dw(dy, h, meta)[0], lambda: _dh_swiglu_bwd(dy, w_down, g, u, meta, save=False), side
    )
    return dgu, dw_down


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


@_backward_under_forward_tiles
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, meta):
        ctx.meta = meta
        return _scatter(x_TD, meta)

    @staticmethod
    def backward(ctx, g_RD):
        return _gather(g_RD, ctx.meta), None


@_backward_under_forward_tiles
class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, weights_TK, meta):
        ctx.meta = meta
        ctx.save_for_backward(y_RD, weights_TK)
        return _gather(y_RD, meta, weights_TK)

    @staticmethod
    def backward(ctx, g_TD):
        y_RD, w_TK = ctx.saved_tensors
        dy, dw = _scatter(g_TD, ctx.meta, w_TK, y_RD)
        return dy, dw.to(w_TK.dtype), None


@_backward_under_forward_tiles
class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RI, w_EOI, bias_EO, meta):
        ctx.meta = meta
        ctx.has_bias = bias_EO is not None
        ctx.save_for_backward(x_RI, w_EOI)
        return _gmm(x_RI, w_EOI, meta, transpose_w=True, bias=bias_EO)

    @staticmethod
    def backward(ctx, dy_RO):
        x_RI, w_EOI = ctx.saved_tensors
        meta = ctx.meta
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _gmm(dy_RO, w_EOI, meta, transpose_w=False)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            res = _gmm_dw(dy_RO, x_RI, meta, with_db=ctx.has_bias, dtype=w_EOI.dtype)
            dw = res[0]
            db = res[1] if ctx.has_bias else None
        return dx, dw, db, None


@_backward_under_forward_tiles
class _SwigluExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_gate_up, w_down, meta, train):
        # train False (no backward will run: sampling): the gate/up epilogue stores h alone, not g and u
        a, ctx.gathered = _expert_input(x_TD, meta, "swiglu")
        h, g, u = _gmm_swiglu(a, w_gate_up, meta, gather=ctx.gathered, save=train)
        y = _gmm(h, w_down, meta, transpose_w=True)
        ctx.meta = meta
        if train:  # h too with KEEP_H: the backward then does not re-make it
            keep = common.config("swiglu_bwd", a.dtype).get("KEEP_H", 0)
            ctx.save_for_backward(a, weights_TK, w_gate_up, w_down, g, u, y, h if keep else None)
        return _gather(y, meta, weights_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        a, w_TK, w_gate_up, w_down, g, u, y, h = ctx.saved_tensors
        meta = ctx.meta
        dy, dw_TK = _scatter(dout_TD.to(y.dtype), meta, w_TK, y)
        # dH = dy W_down and the SwiGLU backward make [dgate | dup]; they re-materialise h = silu(g) * u unless the
        # forward kept it (KEEP_H), so the down dW is a plain K-reduction dy^T h.
        dgu, dw_down = _swiglu_backward(dy, w_down, g, u, h, meta, ctx.needs_input_grad[3])
        # [dgate | dup] has the column order of W_gu's rows: its dW and dX are single GEMMs over K = 2F
        dw_gate_up = None
        if ctx.needs_input_grad[2]:
            dw_gate_up = _gmm_dw(dgu, _scatter(a, meta) if ctx.gathered else a, meta)[0]
        dx = _gather(_gmm(dgu, w_gate_up, meta, transpose_w=False), meta) if ctx.needs_input_grad[0] else None
        return dx, dw_TK.to(w_TK.dtype), dw_gate_up, dw_down, None, None


@_backward_under_forward_tiles
class _GeluExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1, b1, w2, b2, meta, train):
        # train False (sampling): the first GEMM's epilogue stores h alone, not the pre-activation z
        a, ctx.gathered = _expert_input(x_TD, meta, "gmm_epi")
        h, z = _gmm(a, w1, meta, transpose_w=True, gather=ctx.gathered, bias=b1, epi=EPI_GELU, save=train)
        y = _gmm(h, w2, meta, transpose_w=True, bias=b2)
        ctx.meta, ctx.biases = meta, (b1 is not None, b2 is not None)
        if train:
            ctx.save_for_backward(a, weights_TK, w1, w2, z, y)
        return _gather(y, meta, weights_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        a, w_TK, w1, w2, z, y = ctx.saved_tensors
        meta = ctx.meta
        dy, dw_TK = _scatter(dout_TD.to(y.dtype), meta, w_TK, y)
        dz, h = _gmm(dy, w2, meta, transpose_w=False, epi=EPI_GELU_BWD, x0=z)  # h = gelu(z) re-materialised
        has_b1, has_b2 = ctx.biases  # a bias left out (None) gets no gradient, and none is computed
        dw2, db2 = (*_gmm_dw(dy, h, meta, with_db=has_b2), None)[:2]
        del h
        dw1, db1 = (*_gmm_dw(dz, _scatter(a, meta) if ctx.gathered else a, meta, with_db=has_b1), None)[:2]
        dx = _gather(_gmm(dz, w1, meta, transpose_w=False), meta) if ctx.needs_input_grad[0] else None
        return dx, dw_TK.to(w_TK.dtype), dw1, db1, dw2, db2, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API (same names and signatures as ``reference``)
# ----------------------------------------------------------------------------------------------------------------


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _compute_dtype(name: str, x: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in: ``x``'s, or the autocast dtype under autocast. ValueError for any but
    ``KERNEL_DTYPES`` (the tile tables and MMAs exist for those alone)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dt = compute_dtype(x)
    if dt not in KERNEL_DTYPES:
        source = f"the autocast dtype (with {name} in {x.dtype})" if autocast else f"{name}'s dtype"
        raise ValueError(
            f"the Triton kernels compute in float32, bfloat16 or float16, but {source} is {dt}: use the 'torch' "
            "backend (DITMOE_MOE_BACKEND=torch) for it"
        )
    return dt


def _cast(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


def _training(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record this call: a backward may follow, so the forward saves what it needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def permute(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather one copy of each token per choice into expert-sorted order: [R, D]."""
    checks.check_permute(x_TD, plan)
    return _Permute.apply(x_TD, plan_meta(plan))


def unpermute(y_RD: torch.Tensor, weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs, accumulated in fp32, in the dtype of y. [T, D]."""
    checks.check_unpermute(y_RD, weights_TK, plan)
    return _Unpermute.apply(y_RD, weights_TK, plan_meta(plan))


def grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, plan: RoutingPlan, bias_EO: torch.Tensor | None = None):
    """Per-expert ``x @ w[e].T (+ b[e])`` on contiguous row groups; rows past the kept ones are zero. [R, O].
    Weights and bias are cast to the dtype of x (to the autocast dtype under autocast)."""
    checks.check_grouped_mm(x_RI, w_EOI, plan, bias_EO)
    dt = _compute_dtype("x_RI", x_RI)
    with torch.autocast(x_RI.device.type, enabled=False):
        return _GroupedMM.apply(_cast(x_RI, dt), _cast(w_EOI, dt), _cast(bias_EO, dt), plan_meta(plan))


def swiglu_experts(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF) -> torch.Tensor:
    """Routed SwiGLU experts: ``down(silu(gate(x)) * up(x))`` per expert (``gate_up`` [E, 2F, D]: the gate rows,
    then the up rows), combined with the routing weights."""
    checks.check_swiglu(x_TD, weights_TK, plan, gate_up_E2FD, down_EDF)
    dt = _compute_dtype("x_TD", x_TD)
    with torch.autocast(x_TD.device.type, enabled=False):
        train = _training(x_TD, weights_TK, gate_up_E2FD, down_EDF)
        return _SwigluExperts.apply(
            _cast(x_TD, dt), weights_TK, _cast(gate_up_E2FD, dt), _cast(down_EDF, dt), plan_meta(plan), train
        )


def gelu_experts(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED) -> torch.Tensor:
    """Routed GELU (tanh) experts as in DiT's MLP, for upcycling a dense DiT."""
    checks.check_gelu(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED)
    dt = _compute_dtype("x_TD", x_TD)
    with torch.autocast(x_TD.device.type, enabled=False):
        return _GeluExperts.apply(
            _cast(x_TD, dt),
            weights_TK,
            _cast(fc1_EFD, dt),
            _cast(fc1_bias_EF, dt),
            _cast(fc2_EDF, dt),
            _cast(fc2_bias_ED, dt),
            plan_meta(plan),
            _training(x_TD, weights_TK, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED),
        )
