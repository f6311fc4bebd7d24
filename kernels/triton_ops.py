"""Triton MoE dispatch: the same API as ``reference`` (routing plan, permute, grouped GEMM, unpermute, fused experts).

Shape suffixes follow ``reference``: T tokens, K top-k, E experts, R = T*K permuted rows, D model width, F expert
width; a weight is stored like nn.Linear, ``[E, O(ut), I(n)]``. A "flat" id is ``token * K + slot``.

Design (see /work/shared/notes/kernels.md):
- Routing metadata on device, no host sync, stable: per-block histogram -> one-program scan -> rank within block.
  With a capacity, a first pass ranks pairs in priority order (slot-major, then token) to decide which are kept;
  the second pass places kept pairs per expert in flat order and dropped pairs in a sentinel group E at the end.
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
- SwiGLU / GELU run in the epilogue of the first GEMM, which also stores the pre-activations. Backward
  re-materialises the activation h from the saved pre-activations (h is not kept from the forward), so the dW of
  the second weight is a plain K-reduction dy^T h: no elementwise work inside any GEMM main loop, where it would
  stall the pipelining. SwiGLU: dH = dy W2 is a plain grouped GEMM and one elementwise pass writes h and
  [dgate | dup] side by side in one [R, 2F] buffer. Fusing that pass into dH's epilogue (kind ``swiglu_bwd``,
  FUSED = 1) saves writing and re-reading dH. Run 2 timed a fused version at 0.75 vs 0.54 ms (XL): its 128x128
  epilogue spilled (255 registers) and one block per SM left it unhidden. The epilogue now works in column
  quarters (128 registers; with TMA and 3 stages two blocks fit per SM): run 4 timed it at 0.54 ms against
  0.64 for dH and the pass, so bf16 fuses.
  GELU: the dX GEMM of the second weight runs the backward in its own 128x128-tile epilogue (``gmm_epi``).
  The combine is a gather with fp32 accumulation that also yields the routing-weight gradient in backward.
  No atomics anywhere: bitwise deterministic.
- dW: one program per (expert, O-tile, I-tile) walks the expert's rows in a counted loop of [BR, BO] x [BR, BI]
  row-contiguous tiles (A enters tl.dot through tl.trans), fp32 accumulate, largest experts first; an expert with
  no rows writes zeros. Bias gradients are fp32 row sums. The gate and up dW are one K-reduction over the
  [dgate | dup] buffer (O = 2F, the output split in the store) against the permuted x: a single accumulator and
  no gathered rows, the shape of the down dW that ran at 0.95 of dense (the dual-accumulator kernel over
  gathered x reached 0.47, run 3).
- fp32/bf16/fp16 inputs, fp32 accumulation. fp32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32``.
- TMA (tile key ``TMA`` of the GEMM kinds; on in bf16 except ``gmm_epi`` and ``dw``, from run 4's sweep): weight
  tiles, and A tiles where A is not gathered, load through host-made tensor descriptors over 2-D views ([E, X, Y]
  -> [E*X, Y]). A tile that runs past its group reads another group's rows or columns, which only reach outputs
  that are never stored; the dX weights use TMA only when Kdim is a multiple of BK, where that would reach the
  accumulator. In dW, where rows are the reduction, only whole chunks of an expert's rows come through descriptors
  and the last partial chunk through masked pointer loads. Tensors TMA cannot address (strided, misaligned) take
  the pointer loads.
  ``bench/inspect_kernels.py`` shows the sm_90 code.

Tile configs (``tiles``) are fixed per (kind, dtype, architecture) so results never depend on batch composition;
``tile_overrides`` lets a benchmark try others inside a ``with`` block (``bench/bench_kernels.py --sweep`` covers
every GEMM kind, forward and backward). Under ``TRITON_INTERPRET=1`` (CPU tests) tiles are small and dot operands
are upcast to fp32 (the 3.9 interpreter multiplies bf16 bit patterns as integers); products of bf16/fp16 values are
exact in fp32, so this matches the GPU's fp32-accumulating MMA up to summation order.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ditmoe_kernels import reference, tiles
from ditmoe_kernels.reference import RoutingPlan
from ditmoe_kernels.tiles import check_tiles, load_tiles, tile_overrides

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

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _backward_under_forward_tiles(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator: the Function's backward runs under the ``tile_overrides`` its forward saw. Autograd runs CUDA
    backwards in its own thread, where the caller's context variables are not set."""
    forward, backward = cls.forward, cls.backward

    @functools.wraps(forward)
    def forward_recording_tiles(ctx, *args):
        ctx.tiles = tiles.overrides()
        return forward(ctx, *args)

    @functools.wraps(backward)
    def backward_under_tiles(ctx, *grads):
        with tiles.exactly(ctx.tiles):
            return backward(ctx, *grads)

    cls.forward, cls.backward = staticmethod(forward_recording_tiles), staticmethod(backward_under_tiles)
    return cls


EPI_NONE, EPI_GELU, EPI_GELU_BWD, EPI_SWIGLU_BWD = 0, 1, 2, 3


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host; ``triton.cdiv`` is a constexpr function whose call costs microseconds per use."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host (as ``_cdiv``: not ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length()


def _config(kind: str, dtype: torch.dtype) -> dict:
    """Tile configuration of one kernel kind (see ``tiles``) for this dtype and device, with any overrides."""
    if INTERPRET:
        table = tiles.INTERPRET
    elif dtype == torch.float32:
        table = tiles.FP32
    else:
        table = tiles.BF16_SM90 if _arch() >= 90 else tiles.BF16_SM80
    return {**table[kind], **tiles.overrides().get(kind, {})}


def _arch() -> int:
    """Compute capability x 10 of the current CUDA device: the bf16 tiles differ before Hopper (90)."""
    return _device_arch(torch.cuda.current_device())


@functools.cache
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _launch_opts(cfg: dict) -> dict:
    """num_warps / num_stages / maxnreg of a config: launch options on the GPU, meaningless to the interpreter."""
    if INTERPRET:
        return {}
    return {k: cfg[k] for k in tiles.LAUNCH_OPTIONS if cfg.get(k) is not None}


def _prec(dtype: torch.dtype):
    """(UPCAST, PREC) constexprs for tl.dot."""
    if INTERPRET:
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, None


# ----------------------------------------------------------------------------------------------------------------
# Routing metadata
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _route_ids(exp_ptr, rank_ptr, cap, i, n, T, K, NB, PRIO: tl.constexpr, CAPPED: tl.constexpr):
    """Bucket of processing index ``i``. PRIO: ``i`` walks slot-major (GShard priority) instead of flat order.
    CAPPED: pairs whose priority rank reached the capacity go to the sentinel bucket NB - 1."""
    m = i < n
    if PRIO:  # noqa: SIM108 (constexpr branches)
        f = (i % T) * K + i // T
    else:
        f = i
    e = tl.load(exp_ptr + f, mask=m, other=0).to(tl.int32)
    if CAPPED:
        r = tl.load(rank_ptr + f, mask=m, other=0)
        e = tl.where(r < cap, e, NB - 1)
    e = tl.where(m, e, NB)  # masked lanes fall outside every bucket
    return f, e, m


@triton.jit
def _route_hist_kernel(
    exp_ptr,
    rank_ptr,
    hist_ptr,
    cap,
    n,
    T,
    K,
    NB,
    PRIO: tl.constexpr,
    CAPPED: tl.constexpr,
    BLOCK: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    f, e, m = _route_ids(exp_ptr, rank_ptr, cap, i, n, T, K, NB, PRIO, CAPPED)
    b = tl.arange(0, NB_PAD)
    onehot = (e[:, None] == b[None, :]).to(tl.int32)
    tl.store(hist_ptr + pid * NB + b, tl.sum(onehot, 0), mask=b < NB)


@triton.jit
def _route_scan_kernel(
    hist_ptr,
    base_ptr,
    counts_ptr,
    offsets_ptr,
    dropped_ptr,
    nblk,
    NB,
    ADD_START: tl.constexpr,
    WRITE_META: tl.constexpr,
    CH: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    """One program: per-bucket exclusive prefix over blocks (+ the bucket's start), bucket totals and starts."""
    b = tl.arange(0, NB_PAD)
    bm = b < NB
    c = tl.arange(0, CH)
    tot = tl.zeros([NB_PAD], tl.int32)
    for c0 in range(0, nblk, CH):
        hm = ((c0 + c)[:, None] < nblk) & bm[None, :]
        tot += tl.sum(tl.load(hist_ptr + (c0 + c)[:, None] * NB + b[None, :], mask=hm, other=0), 0)
    if ADD_START:  # noqa: SIM108
        carry = tl.cumsum(tot, 0) - tot
    else:
        carry = tl.zeros([NB_PAD], tl.int32)
    start = carry
    for c0 in range(0, nblk, CH):
        hm = ((c0 + c)[:, None] < nblk) & bm[None, :]
        h = tl.load(hist_ptr + (c0 + c)[:, None] * NB + b[None, :], mask=hm, other=0)
        tl.store(base_ptr + (c0 + c)[:, None] * NB + b[None, :], tl.cumsum(h, 0) - h + carry[None, :], mask=hm)
        carry += tl.sum(h, 0)
    if WRITE_META:
        tl.store(counts_ptr + b, tot.to(tl.int64), mask=b < NB - 1)
        tl.store(offsets_ptr + b, start.to(tl.int64), mask=bm)
        tl.store(dropped_ptr, tl.sum(tl.where(b == NB - 1, tot, 0), 0).to(tl.int64))


@triton.jit
def _route_rank_kernel(
    exp_ptr,
    rank_ptr,
    base_ptr,
    pos_ptr,
    sorted_ptr,
    cap,
    n,
    T,
    K,
    NB,
    PRIO: tl.constexpr,
    CAPPED: tl.constexpr,
    WRITE_SORTED: tl.constexpr,
    BLOCK: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    f, e, m = _route_ids(exp_ptr, rank_ptr, cap, i, n, T, K, NB, PRIO, CAPPED)
    b = tl.arange(0, NB_PAD)
    onehot = (e[:, None] == b[None, :]).to(tl.int32)
    within = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # earlier pairs of the same bucket in this block
    pos = tl.load(base_ptr + pid * NB + e, mask=m, other=0) + within
    tl.store(pos_ptr + f, pos.to(tl.int64), mask=m)
    if WRITE_SORTED:
        tl.store(sorted_ptr + pos, f.to(tl.int64), mask=m)


@triton.jit
def _block_table_kernel(offsets_ptr, tab_ptr, R, NB, NMB, BM: tl.constexpr, NB_PAD: tl.constexpr, CH: tl.constexpr):
    """M-block -> (group, row start, row end), and after the 3 x NMB entries the number of used blocks. Groups are
    the E experts and the sentinel (dropped rows), in that order; unused blocks come last, with group -1. One
    program; reads the offsets on device."""
    g = tl.arange(0, NB_PAD)
    gm = g < NB
    start = tl.load(offsets_ptr + g, mask=gm, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + g + 1, mask=g < NB - 1, other=R).to(tl.int32)
    cnt = tl.where(gm, end - start, 0)
    nblk = (cnt + BM - 1) // BM
    cum = tl.cumsum(nblk, 0)
    first = cum - nblk
    tl.store(tab_ptr + 3 * NMB, tl.sum(nblk, 0))
    for b0 in range(0, NMB, CH):
        b = b0 + tl.arange(0, CH)
        grp = tl.sum((cum[None, :] <= b[:, None]).to(tl.int32), 1)
        sel = g[None, :] == grp[:, None]
        s = tl.sum(tl.where(sel, start[None, :], 0), 1)
        fb = tl.sum(tl.where(sel, first[None, :], 0), 1)
        cg = tl.sum(tl.where(sel, cnt[None, :], 0), 1)
        valid = grp < NB
        rs = s + (b - fb) * BM
        re = tl.minimum(rs + BM, s + cg)
        bmask = b < NMB
        tl.store(tab_ptr + b, tl.where(valid, grp, -1), mask=bmask)
        tl.store(tab_ptr + NMB + b, tl.where(valid, rs, 0), mask=bmask)
        tl.store(tab_ptr + 2 * NMB + b, tl.where(valid, re, 0), mask=bmask)


@dataclass
class TritonRoutingPlan(RoutingPlan):
    """A ``RoutingPlan`` that also carries the inverse permutation and caches kernel metadata."""

    row_of_flat_R: torch.Tensor | None = None  # int64 [R]: permuted row of each flat pair
    _cache: dict = field(default_factory=dict, repr=False, compare=False)


def _route_block(nb_pad: int) -> int:
    """Pairs per routing program (0 in the config: sized so the one-hot block stays ~8K elements)."""
    block = _config("route", torch.int64)["BLOCK"]
    return block or max(16, min(1024, 8192 // nb_pad))


def _route_pass(flat, rank, cap, T, K, NB, prio, capped, add_start, write_meta):
    """histogram -> scan -> rank. Returns pos [R] (bucket start + rank when ``add_start``), sorted, meta."""
    dev, n = flat.device, flat.numel()
    nb_pad = _pow2(max(NB, 2))
    BLOCK = _route_block(nb_pad)
    nblk = _cdiv(n, BLOCK)
    hist = torch.empty(nblk, NB, dtype=torch.int32, device=dev)
    base = torch.empty_like(hist)
    rank_arg = rank if rank is not None else flat
    _route_hist_kernel[(nblk,)](flat, rank_arg, hist, cap, n, T, K, NB, prio, capped, BLOCK, nb_pad)
    counts = torch.empty(NB - 1 if write_meta else 1, dtype=torch.int64, device=dev)
    offsets = torch.empty(NB if write_meta else 1, dtype=torch.int64, device=dev)
    dropped = torch.empty((), dtype=torch.int64, device=dev)
    _route_scan_kernel[(1,)](hist, base, counts, offsets, dropped, nblk, NB, add_start, write_meta, 16, nb_pad)
    pos = torch.empty(n, dtype=torch.int64, device=dev)
    sorted_flat = torch.empty(n, dtype=torch.int64, device=dev) if write_meta else pos
    _route_rank_kernel[(nblk,)](
        flat, rank_arg, base, pos, sorted_flat, cap, n, T, K, NB, prio, capped, write_meta, BLOCK, nb_pad
    )
    return pos, sorted_flat, counts, offsets, dropped


def routing_plan(experts_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> TritonRoutingPlan:
    """Same contract as ``reference.routing_plan``; computed by Triton kernels without host synchronisation."""
    T, K = experts_TK.shape
    E = num_experts
    _check_device(experts_TK)
    if T * K == 0:
        p = reference.routing_plan(experts_TK, num_experts, capacity)  # nothing to route
        return TritonRoutingPlan(
            p.sorted_flat_R,
            p.counts_E,
            p.offsets_E1,
            p.dropped,
            p.top_k,
            row_of_flat_R=torch.empty_like(p.sorted_flat_R),
        )
    flat = experts_TK.reshape(-1)
    rank = None
    if capacity is not None:
        rank = _route_pass(flat, None, 0, T, K, E, True, False, False, False)[0]
    cap = 0 if capacity is None else int(capacity)
    pos, sorted_flat, counts, offsets, dropped = _route_pass(
        flat, rank, cap, T, K, E + 1, False, capacity is not None, True, True
    )
    return TritonRoutingPlan(sorted_flat, counts, offsets, dropped, K, row_of_flat_R=pos)


class _Meta:
    """Kernel-side view of a plan: int64 index tensors plus cached per-BM block tables."""

    def __init__(self, plan: RoutingPlan):
        self.sorted_flat = plan.sorted_flat_R
        self.R = plan.sorted_flat_R.numel()
        self.K = plan.top_k
        self.T = self.R // self.K
        self.E = plan.counts_E.numel()
        self.offsets = plan.offsets_E1.to(torch.int64).contiguous()
        self.counts = plan.counts_E
        row = getattr(plan, "row_of_flat_R", None)
        if row is None:
            s = self.sorted_flat
            row = torch.empty_like(s).scatter_(0, s, torch.arange(self.R, device=s.device, dtype=s.dtype))
        self.row_of_flat = row
        self._tables: dict[int, tuple[torch.Tensor, int]] = {}
        self._order = None
        self._tok = None

    def tok(self) -> torch.Tensor:
        """int32 [R]: the token each permuted row reads (``sorted_flat // K``), so gathering GEMMs do no 64-bit
        division in their loops."""
        if self._tok is None:
            self._tok = torch.div(self.sorted_flat, self.K, rounding_mode="floor").to(torch.int32)
        return self._tok

    def table(self, BM: int) -> tuple[torch.Tensor, int]:
        if BM not in self._tables:
            nmb = _cdiv(self.R, BM) + self.E + 1
            tab = torch.empty(3 * nmb + 1, dtype=torch.int32, device=self.offsets.device)
            nb = self.E + 1
            _block_table_kernel[(1,)](self.offsets, tab, self.R, nb, nmb, BM, _pow2(nb), 64)
            self._tables[BM] = (tab, nmb)
        return self._tables[BM]

    def order(self) -> torch.Tensor:
        """Experts by decreasing row count (stable): the dW grid visits big groups first."""
        if self._order is None:
            self._order = torch.argsort(self.counts, descending=True, stable=True).to(torch.int32)
        return self._order


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "ditmoe_kernels.triton_ops needs CUDA tensors, or TRITON_INTERPRET=1 set before Triton is imported to run "
            "on CPU through the interpreter; use the 'torch' backend (ditmoe_kernels.reference) on CPU"
        )


def _meta(plan: RoutingPlan) -> _Meta:
    _check_device(plan.sorted_flat_R)
    if isinstance(plan, TritonRoutingPlan):
        m = plan._cache.get("meta")
        if m is None:
            m = plan._cache["meta"] = _Meta(plan)
        return m
    return _Meta(plan)


# ----------------------------------------------------------------------------------------------------------------
# Permute / combine
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _scatter_kernel(
    x_ptr,
    row_ptr,
    out_ptr,
    w_ptr,
    y_ptr,
    dwp_ptr,
    T,
    D,
    s_xt,
    s_xd,
    s_or,
    s_od,
    s_wt,
    s_wk,
    s_yr,
    s_yd,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """Each [BT, BD] tile of token rows is read once and written to its K permuted rows. HAS_W (the backward of
    the combine): rows are scaled by the routing weight and the tile's share of dw[t, k] = <x[t], y[row(t, k)]>
    is stored (fp32) to dwp[t, k, tile]; the caller sums the tiles in a fixed order (no atomics). K is a constexpr
    so the loop over it unrolls and the K row-index loads (and HAS_W: the K row loads) are in flight together."""
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    pid_d = tl.program_id(1)
    d = pid_d * BD + tl.arange(0, BD)
    tm = t < T
    m = tm[:, None] & (d < D)[None, :]
    x = tl.load(x_ptr + t[:, None] * s_xt + d[None, :] * s_xd, mask=m, other=0.0)
    for k in tl.static_range(K):
        rows = tl.load(row_ptr + t * K + k, mask=tm, other=0)
        if HAS_W:
            w = tl.load(w_ptr + t * s_wt + k * s_wk, mask=tm, other=0.0).to(tl.float32)
            xf = x.to(tl.float32)
            y = tl.load(y_ptr + rows[:, None] * s_yr + d[None, :] * s_yd, mask=m, other=0.0).to(tl.float32)
            tl.store(dwp_ptr + (t * K + k) * tl.num_programs(1) + pid_d, tl.sum(xf * y, 1), mask=tm)
            tl.store(
                out_ptr + rows[:, None] * s_or + d[None, :] * s_od,
                _to(xf * w[:, None], out_ptr.dtype.element_ty),
                mask=m,
            )
        else:
            tl.store(out_ptr + rows[:, None] * s_or + d[None, :] * s_od, x, mask=m)


@triton.jit
def _gather_kernel(
    y_ptr,
    row_ptr,
    w_ptr,
    out_ptr,
    T,
    D,
    s_yr,
    s_yd,
    s_wt,
    s_wk,
    s_ot,
    s_od,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    """out[t] = sum_k (w[t, k] *) y[row(t, k)], fp32 accumulation in slot order (deterministic, no atomics). The
    loop over the constexpr K unrolls: all K row-index loads, then all K row loads, are in flight together (a
    runtime loop waited for each k's index, then its row, in turn)."""
    t = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    tm = t < T
    m = tm[:, None] & (d < D)[None, :]
    acc = tl.zeros([BT, BD], tl.float32)
    for k in tl.static_range(K):
        rows = tl.load(row_ptr + t * K + k, mask=tm, other=0)
        y = tl.load(y_ptr + rows[:, None] * s_yr + d[None, :] * s_yd, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + t * s_wt + k * s_wk, mask=tm, other=0.0).to(tl.float32)
            y = y * w[:, None]
        acc += y
    tl.store(out_ptr + t[:, None] * s_ot + d[None, :] * s_od, _to(acc, out_ptr.dtype.element_ty), mask=m)


def _rows_cfg(dtype, D):
    cfg = _config("rows", dtype)
    if "BD" not in tiles.overrides().get("rows", {}):
        cfg["BD"] = min(cfg["BD"], _pow2(max(D, 16)))
    return cfg


def _scatter(x_TD, meta: _Meta, w_TK=None, y_RD=None):
    """Permute rows (forward of permute / backward of unpermute when ``w_TK`` is given: also returns dw fp32)."""
    T, D = x_TD.shape
    K = meta.K
    out = torch.empty(meta.R, D, dtype=x_TD.dtype, device=x_TD.device)
    has_w = w_TK is not None
    cfg = _rows_cfg(x_TD.dtype, D)
    grid = (_cdiv(T, cfg["BT"]), _cdiv(D, cfg["BD"]))
    dwp = torch.empty(T, K, grid[1], dtype=torch.float32, device=x_TD.device) if has_w else out
    w_arg = w_TK if has_w else out
    y_arg = y_RD if has_w else out
    if T > 0 and D > 0:
        _scatter_kernel[grid](
            x_TD,
            meta.row_of_flat,
            out,
            w_arg,
            y_arg,
            dwp,
            T,
            D,
            x_TD.stride(0),
            x_TD.stride(1),
            out.stride(0),
            out.stride(1),
            w_arg.stride(0) if has_w else 0,
            w_arg.stride(1) if has_w else 0,
            y_arg.stride(0),
            y_arg.stride(1),
            K,
            has_w,
            cfg["BT"],
            cfg["BD"],
            **_launch_opts(cfg),
        )
    if not has_w:
        return out
    dw = dwp.sum(-1) if D > 0 else torch.zeros(T, K, dtype=torch.float32, device=x_TD.device)
    return out, dw


def _gather(y_RD, meta: _Meta, w_TK=None):
    """Combine each token's K rows (weighted when ``w_TK`` is given): forward of unpermute / backward of permute."""
    D = y_RD.shape[1]
    T, K = meta.T, meta.K
    out = torch.empty(T, D, dtype=y_RD.dtype, device=y_RD.device)
    has_w = w_TK is not None
    w_arg = w_TK if has_w else out
    cfg = _rows_cfg(y_RD.dtype, D)
    if T > 0 and D > 0:
        grid = (_cdiv(T, cfg["BT"]), _cdiv(D, cfg["BD"]))
        _gather_kernel[grid](
            y_RD,
            meta.row_of_flat,
            w_arg,
            out,
            T,
            D,
            y_RD.stride(0),
            y_RD.stride(1),
            w_arg.stride(0) if has_w else 0,
            w_arg.stride(1) if has_w else 0,
            out.stride(0),
            out.stride(1),
            K,
            has_w,
            cfg["BT"],
            cfg["BD"],
            **_launch_opts(cfg),
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Grouped GEMM
# ----------------------------------------------------------------------------------------------------------------


_EMULATE_RTNE = tl.constexpr(INTERPRET)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """Cast for stores. The 3.9 interpreter truncates fp32 -> bf16 (GPUs round to nearest even): there, round the
    fp32 bits to nearest even first so CPU tests see the GPU's numerics."""
    if _EMULATE_RTNE:  # noqa: SIM102 (constexpr branches)
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # exactly representable in bf16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu_tanh(z):
    # 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z * _sigmoid(2.0 * u)


@triton.jit
def _gelu_tanh_grad(z):
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    s = _sigmoid(2.0 * u)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return s + z * 2.0 * s * (1.0 - s) * du


@triton.jit
def _swiglu_grads(dh, g, u):
    """fp32 SwiGLU backward from dH and the pre-activations: (h = silu(g) * u, dgate = dH * u * silu'(g),
    dup = dH * silu(g)). The one formula of the elementwise pass and of dH's fused epilogue: the same bits."""
    s = _sigmoid(g)
    silu = g * s
    return silu * u, dh * u * (s + silu * (1.0 - s)), dh * silu


@triton.jit
def _tile(pid, num_m, N, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order: GROUP_M M-blocks share each N-tile sweep."""
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _group_block(tile, tab_ptr, NMB, num_m, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile ``tile`` of a grouped GEMM over the first ``num_m`` of the table's NMB M-blocks: group ``e``
    (-1: unused block, E: dropped rows), its first row and column, its row indices (int64) and N offsets, with
    their masks, read from the block table."""
    pid_m, pid_n = _tile(tile, num_m, N, BN, GROUP_M)
    e = tl.load(tab_ptr + pid_m)
    rs = tl.load(tab_ptr + NMB + pid_m)
    re = tl.load(tab_ptr + 2 * NMB + pid_m)
    rows = (rs + tl.arange(0, BM)).to(tl.int64)
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    return e, rs, n0, rows, rows < re, offs_n, offs_n < N


@triton.jit
def _a_rows(tok_ptr, rows, rmask, GATHER: tl.constexpr):
    """The A rows a block reads: its own rows, or (GATHER) the tokens they were permuted from."""
    if GATHER:  # noqa: SIM108 (constexpr branches)
        a_rows = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        a_rows = rows
    return a_rows


@triton.jit
def _mainloop(
    acc,
    a_ptr,
    a_desc,
    a_rows,
    a_row0,
    s_ar,
    s_ak,
    b_ptr,
    b_desc,
    b_row0,
    n0,
    s_bk,
    s_bn,
    offs_n,
    nmask,
    rmask,
    Kdim,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
    B_T: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    EVEN_K: tl.constexpr,
    BK: tl.constexpr,
):
    """acc += A[a_rows, :] @ B over Kdim. TMA_A: A tiles come through the 2-D descriptor ``a_desc`` from row
    ``a_row0`` (rows past the block's group are other groups' rows: their outputs are never stored). TMA_B: B tiles
    through ``b_desc`` over the weights as one 2-D matrix, from row ``b_row0`` (the expert's first row); B_T: that
    matrix is [E*N, Kdim] (the forward's W, transposed in the dot), else [E*Kdim, N] (dX; needs EVEN_K)."""
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + a_rows[:, None] * s_ar + offs_k[None, :] * s_ak
    b_ptrs = b_ptr + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn
    for k0 in range(0, Kdim, BK):
        if TMA_A:
            a = a_desc.load([a_row0, k0])
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=rmask[:, None] & (offs_k < Kdim - k0)[None, :], other=0.0)
        if TMA_B:
            if B_T:  # noqa: SIM108 (constexpr branches)
                b = tl.trans(b_desc.load([b_row0 + n0, k0]))
            else:
                b = b_desc.load([b_row0 + k0, n0])
        elif EVEN_K:
            b = tl.load(b_ptrs, mask=nmask[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=(offs_k < Kdim - k0)[:, None] & nmask[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PREC)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk
    return acc


@triton.jit
def _gmm_kernel(
    a_ptr,
    tok_ptr,
    b_ptr,
    a2_ptr,
    b2_ptr,
    a_desc,
    b_desc,
    a2_desc,
    b2_desc,
    bias_ptr,
    tab_ptr,
    c_ptr,
    c2_ptr,
    c3_ptr,
    x0_ptr,
    x1_ptr,
    N,
    Kdim,
    NMB,
    NUM_E,
    s_ar,
    s_ak,
    s_a2r,
    s_a2k,
    s_be,
    s_bk,
    s_bn,
    s_b2e,
    s_b2k,
    s_b2n,
    s_biase,
    s_biasn,
    s_cr,
    s_cn,
    s_x0r,
    s_x0n,
    GATHER: tl.constexpr,
    TWO_TERMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,
    PERSIST: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
    B_T: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    PRE: tl.constexpr,
):
    """C[rows of group e] = A[rows] @ B[e] (+ A2[rows] @ B2[e]) (+ bias[e]) with an epilogue.

    B[e] is addressed as a [Kdim, N] matrix through strides, so the forward (B = W[e]^T) and dX (B = W[e]) share
    this kernel. GATHER: A row r is token ``tok[r]`` of A (A is x itself, never permuted). C and C2 share strides.
    EPI_GELU: C = gelu(z), C2 = z.  EPI_GELU_BWD: X0 = z, C = acc * gelu'(z), C2 = gelu(z) (the activation the
    forward produced, for the dW of the second weight). EPI_SWIGLU_BWD (acc = dH): X0 = g, X1 = u; C = dgate,
    C2 = dup, C3 = h = silu(g) * u, the math of ``_swiglu_bwd_kernel`` on dH rounded to C's dtype (the same bits as
    the separate pass); X0, X1 and C3 share strides. PRE (backward epilogues): X0 / X1 tiles are loaded before the
    K loop, so their reads overlap it instead of following it.
    """
    # PERSIST: loop over the used blocks only (unused ones come last in the table), every tile running the full K
    # loop (a trip count that varies by tile stops the compiler from flattening the two loops into one pipelined
    # loop). Otherwise one tile per program.
    num_m = tl.load(tab_ptr + 3 * NMB) if PERSIST else NMB
    stop = num_m * tl.cdiv(N, BN) if PERSIST else tl.program_id(0) + 1
    for tile in tl.range(tl.program_id(0), stop, tl.num_programs(0) if PERSIST else 1, flatten=PERSIST):
        _gmm_tile(
            tile,
            num_m,
            a_ptr,
            tok_ptr,
            b_ptr,
            a2_ptr,
            b2_ptr,
            a_desc,
            b_desc,
            a2_desc,
            b2_desc,
            bias_ptr,
            tab_ptr,
            c_ptr,
            c2_ptr,
            c3_ptr,
            x0_ptr,
            x1_ptr,
            N,
            Kdim,
            NMB,
            NUM_E,
            s_ar,
            s_ak,
            s_a2r,
            s_a2k,
            s_be,
            s_bk,
            s_bn,
            s_b2e,
            s_b2k,
            s_b2n,
            s_biase,
            s_biasn,
            s_cr,
            s_cn,
            s_x0r,
            s_x0n,
            GATHER,
            TWO_TERMS,
            HAS_BIAS,
            EPI,
            TMA_A,
            TMA_B,
            B_T,
            UPCAST,
            PREC,
            EVEN_K,
            BM,
            BN,
            BK,
            GROUP_M,
            PERSIST,
            PRE,
        )


@triton.jit
def _gmm_tile(
    tile,
    num_m,
    a_ptr,
    tok_ptr,
    b_ptr,
    a2_ptr,
    b2_ptr,
    a_desc,
    b_desc,
    a2_desc,
    b2_desc,
    bias_ptr,
    tab_ptr,
    c_ptr,
    c2_ptr,
    c3_ptr,
    x0_ptr,
    x1_ptr,
    N,
    Kdim,
    NMB,
    NUM_E,
    s_ar,
    s_ak,
    s_a2r,
    s_a2k,
    s_be,
    s_bk,
    s_bn,
    s_b2e,
    s_b2k,
    s_b2n,
    s_biase,
    s_biasn,
    s_cr,
    s_cn,
    s_x0r,
    s_x0n,
    GATHER: tl.constexpr,
    TWO_TERMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
    B_T: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSIST: tl.constexpr,
    PRE: tl.constexpr,
):
    """One output tile of ``_gmm_kernel``, numbered over the table's first ``num_m`` M-blocks. No early exits, so
    that a persistent loop can flatten over it: an unused block (e = -1) masks every row; the dropped rows' block
    (e = E) contributes a zero accumulator, so C gets zeros there (its epilogue inputs, the pre-activations of
    dropped rows, are zeros the forward wrote)."""
    e, rs, n0, rows, rmask, offs_n, nmask = _group_block(tile, tab_ptr, NMB, num_m, N, BM, BN, GROUP_M)
    live = (e >= 0) & (e < NUM_E)
    # PERSIST: a K loop the same length for every tile (see _gmm_kernel); the dropped rows' products are discarded
    k_len = Kdim if PERSIST else tl.where(live, Kdim, 0)
    e = tl.where(live, e, 0)  # a valid expert for addressing (the dropped rows' block reads expert 0 only if PERSIST)
    cmask = rmask[:, None] & nmask[None, :]
    c_off = rows[:, None] * s_cr + offs_n[None, :] * s_cn
    e64 = e.to(tl.int64)
    b_row0 = e * (N if B_T else Kdim)
    # PRE: the epilogue's inputs in the column quarters it works in, loaded now (bf16: a quarter of the registers
    # of the fp32 accumulator each); otherwise each quarter loads its own after the K loop (placeholders here)
    x0q0, x0q1, x0q2, x0q3 = rows, rows, rows, rows
    x1q0, x1q1, x1q2, x1q3 = rows, rows, rows, rows
    if PRE and EPI >= 2:
        x0q0, x0q1, x0q2, x0q3 = _epi_load_quarters(x0_ptr, rows, rmask, n0, N, s_x0r, s_x0n, BN // 4)
        if EPI == 3:
            x1q0, x1q1, x1q2, x1q3 = _epi_load_quarters(x1_ptr, rows, rmask, n0, N, s_x0r, s_x0n, BN // 4)
    acc = tl.zeros([BM, BN], tl.float32)
    acc = _mainloop(
        acc,
        a_ptr,
        a_desc,
        _a_rows(tok_ptr, rows, rmask, GATHER),
        rs,
        s_ar,
        s_ak,
        b_ptr + e64 * s_be,
        b_desc,
        b_row0,
        n0,
        s_bk,
        s_bn,
        offs_n,
        nmask,
        rmask,
        k_len,
        TMA_A and not GATHER,
        TMA_B,
        B_T,
        UPCAST,
        PREC,
        EVEN_K,
        BK,
    )
    if TWO_TERMS:
        acc = _mainloop(
            acc,
            a2_ptr,
            a2_desc,
            rows,
            rs,
            s_a2r,
            s_a2k,
            b2_ptr + e64 * s_b2e,
            b2_desc,
            b_row0,
            n0,
            s_b2k,
            s_b2n,
            offs_n,
            nmask,
            rmask,
            k_len,
            TMA_A,
            TMA_B,
            B_T,
            UPCAST,
            PREC,
            EVEN_K,
            BK,
        )
    if PERSIST:
        acc = tl.where(live, acc, 0.0)
    if HAS_BIAS:  # not on dropped rows
        bias = tl.load(bias_ptr + e64 * s_biase + offs_n * s_biasn, mask=nmask, other=0.0).to(tl.float32)
        acc += tl.where(live, bias, 0.0)[None, :]
    if EPI == 0:
        tl.store(c_ptr + c_off, _to(acc, c_ptr.dtype.element_ty), mask=cmask)
    if EPI == 1:
        z = _to(acc, c2_ptr.dtype.element_ty)
        tl.store(c2_ptr + c_off, z, mask=cmask)
        tl.store(c_ptr + c_off, _to(_gelu_tanh(z.to(tl.float32)), c_ptr.dtype.element_ty), mask=cmask)
    if EPI >= 2:
        # The backward epilogues load and store extra tiles; they work in column quarters so that a quarter of
        # them is live at a time. At 128x128 (sm_90) the SwiGLU one needed 255 registers and spilled 700 bytes in
        # one piece, 128 in quarters; the GELU one 255 and 20 bytes of spills, 121 in quarters.
        left, right = _halves(acc)
        _epi_two(
            left,
            EPI,
            rows,
            rmask,
            n0,
            N,
            c_ptr,
            c2_ptr,
            c3_ptr,
            x0_ptr,
            x1_ptr,
            s_cr,
            s_cn,
            s_x0r,
            s_x0n,
            x0q0,
            x0q1,
            x1q0,
            x1q1,
            PRE,
        )
        _epi_two(
            right,
            EPI,
            rows,
            rmask,
            n0 + BN // 2,
            N,
            c_ptr,
            c2_ptr,
            c3_ptr,
            x0_ptr,
            x1_ptr,
            s_cr,
            s_cn,
            s_x0r,
            s_x0n,
            x0q2,
            x0q3,
            x1q2,
            x1q3,
            PRE,
        )


@triton.jit
def _halves(t):
    """The left and right column halves of a 2-D tile."""
    M: tl.constexpr = t.shape[0]
    W: tl.constexpr = t.shape[1] // 2
    return tl.split(tl.permute(tl.reshape(t, (M, 2, W)), (0, 2, 1)))


@triton.jit
def _epi_two(
    acc,
    EPI: tl.constexpr,
    rows,
    rmask,
    n0,
    N,
    c_ptr,
    c2_ptr,
    c3_ptr,
    x0_ptr,
    x1_ptr,
    s_cr,
    s_cn,
    s_xr,
    s_xn,
    x0a,
    x0b,
    x1a,
    x1b,
    PRE: tl.constexpr,
):
    """``_epi_tile`` on the two column halves of ``acc`` in turn (with their prefetched inputs when PRE)."""
    W: tl.constexpr = acc.shape[1] // 2
    left, right = _halves(acc)
    _epi_tile(
        left, EPI, rows, rmask, n0, N, c_ptr, c2_ptr, c3_ptr, x0_ptr, x1_ptr, s_cr, s_cn, s_xr, s_xn, x0a, x1a, PRE
    )
    _epi_tile(
        right, EPI, rows, rmask, n0 + W, N, c_ptr, c2_ptr, c3_ptr, x0_ptr, x1_ptr, s_cr, s_cn, s_xr, s_xn, x0b, x1b, PRE
    )


@triton.jit
def _epi_load(x_ptr, rows, rmask, n0, N, s_xr, s_xn, W: tl.constexpr):
    """An epilogue input tile [rows, W columns from n0], zeros outside the matrix."""
    offs_n = n0 + tl.arange(0, W)
    m = rmask[:, None] & (offs_n < N)[None, :]
    return tl.load(x_ptr + rows[:, None] * s_xr + offs_n[None, :] * s_xn, mask=m, other=0.0)


@triton.jit
def _epi_load_quarters(x_ptr, rows, rmask, n0, N, s_xr, s_xn, Q: tl.constexpr):
    """The four [rows, Q] column quarters of an epilogue input tile from column n0 (``_epi_load`` each)."""
    return (
        _epi_load(x_ptr, rows, rmask, n0, N, s_xr, s_xn, Q),
        _epi_load(x_ptr, rows, rmask, n0 + Q, N, s_xr, s_xn, Q),
        _epi_load(x_ptr, rows, rmask, n0 + 2 * Q, N, s_xr, s_xn, Q),
        _epi_load(x_ptr, rows, rmask, n0 + 3 * Q, N, s_xr, s_xn, Q),
    )


@triton.jit
def _epi_tile(
    acc,
    EPI: tl.constexpr,
    rows,
    rmask,
    n0,
    N,
    c_ptr,
    c2_ptr,
    c3_ptr,
    x0_ptr,
    x1_ptr,
    s_cr,
    s_cn,
    s_xr,
    s_xn,
    x0,
    x1,
    PRE: tl.constexpr,
):
    """A backward epilogue on one [BM, W] fp32 tile whose columns start at n0 (see ``_gmm_kernel``).
    EPI_GELU_BWD: C = acc * gelu'(z), C2 = gelu(z) from X0 = z. EPI_SWIGLU_BWD: C = dgate, C2 = dup, C3 = h from
    dH = acc rounded to C's dtype, X0 = g and X1 = u. PRE: ``x0`` (and ``x1``) are those tiles, already loaded."""
    W: tl.constexpr = acc.shape[1]
    offs_n = n0 + tl.arange(0, W)
    m = rmask[:, None] & (offs_n < N)[None, :]
    x_off = rows[:, None] * s_xr + offs_n[None, :] * s_xn
    c_off = rows[:, None] * s_cr + offs_n[None, :] * s_cn
    if not PRE:
        x0 = _epi_load(x0_ptr, rows, rmask, n0, N, s_xr, s_xn, W)
        if EPI == 3:
            x1 = _epi_load(x1_ptr, rows, rmask, n0, N, s_xr, s_xn, W)
    if EPI == 2:
        z = x0.to(tl.float32)
        tl.store(c2_ptr + c_off, _to(_gelu_tanh(z), c2_ptr.dtype.element_ty), mask=m)
        tl.store(c_ptr + c_off, _to(acc * _gelu_tanh_grad(z), c_ptr.dtype.element_ty), mask=m)
    if EPI == 3:
        dh = _to(acc, c_ptr.dtype.element_ty).to(tl.float32)
        h, dgate, dup = _swiglu_grads(dh, x0.to(tl.float32), x1.to(tl.float32))
        tl.store(c3_ptr + x_off, _to(h, c3_ptr.dtype.element_ty), mask=m)
        tl.store(c_ptr + c_off, _to(dgate, c_ptr.dtype.element_ty), mask=m)
        tl.store(c2_ptr + c_off, _to(dup, c2_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gmm_swiglu_kernel(
    a_ptr,
    tok_ptr,
    bg_ptr,
    bu_ptr,
    a_desc,
    bg_desc,
    bu_desc,
    tab_ptr,
    h_ptr,
    g_ptr,
    u_ptr,
    N,
    Kdim,
    NMB,
    NUM_E,
    s_ar,
    s_ak,
    s_bge,
    s_bgk,
    s_bgn,
    s_bue,
    s_buk,
    s_bun,
    s_r,
    s_n,
    GATHER: tl.constexpr,
    PERSIST: tl.constexpr,
    TMA_A: tl.constexpr,
    TMA_B: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """G = A Wg^T, U = A Wu^T in one pass over A (GATHER: x read through the permutation, else the permuted copy);
    H = silu(G) * U. G and U are stored (rounded to the output dtype) for backward; H is computed from the rounded
    values so the backward can recompute it bit for bit. TMA_A: A tiles through a descriptor over the permuted copy
    from the block's first row (as in ``_mainloop``); TMA_B: weight tiles through descriptors over W as [E*N, Kdim].
    PERSIST: programs loop over the used tiles, as in ``_gmm_kernel``, so one tile's stores of H, G and U overlap the
    next tile's loads."""
    num_m = tl.load(tab_ptr + 3 * NMB) if PERSIST else NMB
    stop = num_m * tl.cdiv(N, BN) if PERSIST else tl.program_id(0) + 1
    for tile in tl.range(tl.program_id(0), stop, tl.num_programs(0) if PERSIST else 1, flatten=PERSIST):
        # no early exits (see _gmm_tile): an unused block masks every row, the dropped rows' block stores zeros
        e, rs, n0, rows, rmask, offs_n, nmask = _group_block(tile, tab_ptr, NMB, num_m, N, BM, BN, GROUP_M)
        live = (e >= 0) & (e < NUM_E)
        k_len = Kdim if PERSIST else tl.where(live, Kdim, 0)  # PERSIST: one trip count for every tile
        e = tl.where(live, e, 0)
        cmask = rmask[:, None] & nmask[None, :]
        o = rows[:, None] * s_r + offs_n[None, :] * s_n
        e64 = e.to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = a_ptr + _a_rows(tok_ptr, rows, rmask, GATHER)[:, None] * s_ar + offs_k[None, :] * s_ak
        bg_ptrs = bg_ptr + e64 * s_bge + offs_k[:, None] * s_bgk + offs_n[None, :] * s_bgn
        bu_ptrs = bu_ptr + e64 * s_bue + offs_k[:, None] * s_buk + offs_n[None, :] * s_bun
        acc_g = tl.zeros([BM, BN], tl.float32)
        acc_u = tl.zeros([BM, BN], tl.float32)
        b_row = e * N + n0
        for k0 in range(0, k_len, BK):
            km = offs_k < Kdim - k0
            if TMA_A:
                a = a_desc.load([rs, k0])
            elif EVEN_K:
                a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            if TMA_B:
                bg = tl.trans(bg_desc.load([b_row, k0]))
                bu = tl.trans(bu_desc.load([b_row, k0]))
            elif EVEN_K:
                bg = tl.load(bg_ptrs, mask=nmask[None, :], other=0.0)
                bu = tl.load(bu_ptrs, mask=nmask[None, :], other=0.0)
            else:
                bg = tl.load(bg_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
                bu = tl.load(bu_ptrs, mask=km[:, None] & nmask[None, :], other=0.0)
            acc_g = _mma(a, bg, acc_g, UPCAST, PREC)
            acc_u = _mma(a, bu, acc_u, UPCAST, PREC)
            a_ptrs += BK * s_ak
            bg_ptrs += BK * s_bgk
            bu_ptrs += BK * s_buk
        if PERSIST:  # the dropped rows' products are discarded
            acc_g = tl.where(live, acc_g, 0.0)
            acc_u = tl.where(live, acc_u, 0.0)
        g = _to(acc_g, h_ptr.dtype.element_ty)
        u = _to(acc_u, h_ptr.dtype.element_ty)
        tl.store(g_ptr + o, g, mask=cmask)
        tl.store(u_ptr + o, u, mask=cmask)
        gf = g.to(tl.float32)
        tl.store(h_ptr + o, _to(gf * _sigmoid(gf) * u.to(tl.float32), h_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _dw_chunk(acc, dbacc, a, b, HAS_DB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One chunk of rows of a dW K-reduction: acc += a^T b, and (HAS_DB) dbacc += the column sums of a."""
    acc = _mma(tl.trans(a), b, acc, UPCAST, PREC)
    if HAS_DB:
        dbacc += tl.sum(a.to(tl.float32), 0)
    return acc, dbacc


@triton.jit
def _gmm_dw_kernel(
    a_ptr,
    b_ptr,
    a_desc,
    b_desc,
    offs_ptr,
    order_ptr,
    dw_ptr,
    dw2_ptr,
    db_ptr,
    O,
    O1,
    I,
    s_ar,
    s_ao,
    s_br,
    s_bi,
    s_we,
    s_wo,
    s_wi,
    s_dbe,
    s_dbo,
    SPLIT: tl.constexpr,
    HAS_DB: tl.constexpr,
    TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dW[e] = A[rows e]^T @ B[rows e] ([O, I]) as a K-reduction over the expert's rows; HAS_DB: db[e] = sum of
    A's rows. SPLIT: result rows o >= O1 go to row o - O1 of dW2 (same strides), the rest to dW. Empty experts
    write zeros.

    The loop is a plain counted loop over [BR, BO] / [BR, BI] tiles whose pointers advance by BR rows: every
    load is row-contiguous (coalesced, 16-byte vectors) and feeds tl.dot directly (A through tl.trans), so the
    compiler pipelines it into shared memory; fp32 accumulation. TMA: the whole BR-row chunks come through the
    descriptors ``a_desc`` / ``b_desc`` over A and B ([R, O], [R, I]; columns past O or I read as zeros) and only
    the last, partial chunk, whose rows past the expert must not be read, through masked pointer loads: the same
    chunks in the same order, so the same bits."""
    pid_o, pid_i = _tile(tl.program_id(0), tl.cdiv(O, BO), I, BI, GROUP_M)
    e = tl.load(order_ptr + tl.program_id(1)).to(tl.int64)
    start = tl.load(offs_ptr + e).to(tl.int32)
    n_rows = tl.load(offs_ptr + e + 1).to(tl.int32) - start
    offs_o = pid_o * BO + tl.arange(0, BO)
    offs_i = pid_i * BI + tl.arange(0, BI)
    offs_r = tl.arange(0, BR)
    om = offs_o < O
    im = offs_i < I
    rows = (start + offs_r).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * s_ar + offs_o[None, :] * s_ao
    b_ptrs = b_ptr + rows[:, None] * s_br + offs_i[None, :] * s_bi
    acc = tl.zeros([BO, BI], tl.float32)
    dbacc = tl.zeros([BO], tl.float32)
    if TMA:
        n_full = n_rows // BR
        for it in range(0, n_full):
            a = a_desc.load([start + it * BR, pid_o * BO])
            b = b_desc.load([start + it * BR, pid_i * BI])
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, HAS_DB, UPCAST, PREC)
        if n_rows > n_full * BR:
            tail = (n_full * BR).to(tl.int64)
            rm = offs_r < n_rows - n_full * BR
            a = tl.load(a_ptrs + tail * s_ar, mask=rm[:, None] & om[None, :], other=0.0)
            b = tl.load(b_ptrs + tail * s_br, mask=rm[:, None] & im[None, :], other=0.0)
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, HAS_DB, UPCAST, PREC)
    else:
        for it in range(0, tl.cdiv(n_rows, BR)):
            rm = offs_r < n_rows - it * BR
            a = tl.load(a_ptrs, mask=rm[:, None] & om[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=rm[:, None] & im[None, :], other=0.0)
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, HAS_DB, UPCAST, PREC)
            a_ptrs += BR * s_ar
            b_ptrs += BR * s_br
    wmask = om[:, None] & im[None, :]
    dw = _to(acc, dw_ptr.dtype.element_ty)
    if SPLIT:
        first = offs_o < O1
        o_local = tl.where(first, offs_o, offs_o - O1)
        w_off = e * s_we + o_local[:, None] * s_wo + offs_i[None, :] * s_wi
        tl.store(dw_ptr + w_off, dw, mask=wmask & first[:, None])
        tl.store(dw2_ptr + w_off, dw, mask=wmask & ~first[:, None])
    else:
        tl.store(dw_ptr + e * s_we + offs_o[:, None] * s_wo + offs_i[None, :] * s_wi, dw, mask=wmask)
    if HAS_DB:
        tl.store(
            db_ptr + e * s_dbe + offs_o * s_dbo,
            _to(dbacc, db_ptr.dtype.element_ty),
            mask=offs_o < tl.where(pid_i == 0, O, 0),
        )


def _s(t, i):
    return t.stride(i) if t is not None else 0


def _persistent_programs(device: torch.device, per_sm: int) -> int:
    """Programs of a persistent launch: ``per_sm`` per SM (3 under the interpreter, so tiles are shared out)."""
    if INTERPRET:
        return 3
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _tma_desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor | None:
    """A TMA descriptor over ``t`` as one 2-D matrix ([E, X, Y] -> [E*X, Y]) loading ``block`` tiles, or None where
    TMA cannot address it: rows that do not flatten, a last stride other than 1, a base or row stride not 16-byte
    aligned, or no elements."""
    if t.dim() == 3:
        if t.stride(0) != t.shape[1] * t.stride(1):
            return None
        t = t.flatten(0, 1)
    if t.numel() == 0 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _tma_descs(pairs: list) -> list | None:
    """Descriptors for every (tensor, block) pair, or None unless all of them can be made."""
    descs = [_tma_desc(t, block) for t, block in pairs]
    return None if any(d is None for d in descs) else descs


def _gmm(
    a,
    w,
    meta: _Meta,
    *,
    transpose_w: bool,
    gather: bool = False,
    bias=None,
    epi: int = EPI_NONE,
    a2=None,
    w2=None,
    x0=None,
    x1=None,
    out_dtype=None,
):
    """Grouped GEMM over the plan's expert groups.

    transpose_w=True (forward): C = A @ W[e]^T, W [E, N, Kdim]. False (dX): C = A @ W[e], W [E, Kdim, N].
    gather: A is [T, Kdim] and row r reads token ``sorted_flat[r] // K``. Returns C, [R, N] (rows of dropped
    pairs are zero), or for the epilogues a pair: EPI_GELU (h, z), EPI_GELU_BWD (dz, h), EPI_SWIGLU_BWD (dGU, h)
    with dGU = [dgate | dup] ([R, 2N]) from x0 = g, x1 = u.
    """
    E = w.shape[0]
    if transpose_w:
        N, Kdim = w.shape[1], w.shape[2]
        s_bk, s_bn = w.stride(2), w.stride(1)
        s_b2k, s_b2n = (_s(w2, 2), _s(w2, 1))
    else:
        Kdim, N = w.shape[1], w.shape[2]
        s_bk, s_bn = w.stride(1), w.stride(2)
        s_b2k, s_b2n = (_s(w2, 1), _s(w2, 2))
    dtype = out_dtype or a.dtype
    R = meta.R
    c3 = None
    if epi == EPI_SWIGLU_BWD:
        dgu = torch.empty(R, 2 * N, dtype=dtype, device=a.device)
        c, c2, c3 = dgu[:, :N], dgu[:, N:], torch.empty_like(x0)
        result = (dgu, c3)
    else:
        c = torch.empty(R, N, dtype=dtype, device=a.device)
        c2 = torch.empty_like(c) if epi != EPI_NONE else c
        result = (c, c2) if epi != EPI_NONE else c
    if R == 0 or N == 0:
        return result
    kind = {EPI_NONE: "gmm" if transpose_w else "gmm_dx", EPI_SWIGLU_BWD: "swiglu_bwd"}.get(epi, "gmm_epi")
    cfg = _config(kind, a.dtype)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    tab, nmb = meta.table(BM)
    upcast, prec = _prec(a.dtype)
    dummy = c
    b_descs = a_descs = None
    if cfg.get("TMA") and (transpose_w or Kdim % BK == 0):  # dX tiles must not run into the next expert's rows
        b_block = [BN, BK] if transpose_w else [BK, BN]
        b_descs = _tma_descs([(t, b_block) for t in (w, w2) if t is not None])
    if cfg.get("TMA") and not gather:
        a_descs = _tma_descs([(t, [BM, BK]) for t in (a, a2) if t is not None])
    a_desc, a2_desc = (a_descs + [a])[:2] if a_descs else (a, a)  # tensors stand in where unused
    b_desc, b2_desc = (b_descs + [w])[:2] if b_descs else (w, w)
    n_tiles = nmb * _cdiv(N, BN)
    persist = bool(cfg.get("PERSIST"))
    grid = (min(n_tiles, _persistent_programs(a.device, cfg["PERSIST"])) if persist else n_tiles,)
    _gmm_kernel[grid](
        a,
        meta.tok() if gather else dummy,
        w,
        a2 if a2 is not None else dummy,
        w2 if w2 is not None else dummy,
        a_desc,
        b_desc,
        a2_desc,
        b2_desc,
        bias if bias is not None else dummy,
        tab,
        c,
        c2,
        c3 if c3 is not None else dummy,
        x0 if x0 is not None else dummy,
        x1 if x1 is not None else dummy,
        N,
        Kdim,
        nmb,
        E,
        a.stride(0),
        a.stride(1),
        _s(a2, 0),
        _s(a2, 1),
        w.stride(0),
        s_bk,
        s_bn,
        _s(w2, 0),
        s_b2k,
        s_b2n,
        _s(bias, 0),
        _s(bias, 1),
        c.stride(0),
        c.stride(1),
        _s(x0, 0),
        _s(x0, 1),
        gather,
        a2 is not None,
        bias is not None,
        epi,
        persist,
        a_descs is not None,
        b_descs is not None,
        transpose_w,
        upcast,
        prec,
        Kdim % BK == 0,
        BM,
        BN,
        BK,
        cfg["GROUP_M"],
        epi >= EPI_GELU_BWD and bool(cfg.get("PRE")),
        **_launch_opts(cfg),
    )
    return result


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dgu_ptr, h_ptr, R, F, s_r, s_gur, BR: tl.constexpr, BC: tl.constexpr):
    """Elementwise SwiGLU backward on [BR, BC] tiles: with dH, gate and up pre-activations ([R, F], row stride
    s_r), dgate = dH * u * silu'(g) into columns [0, F) of dGU ([R, 2F], row stride s_gur), dup = dH * silu(g)
    into columns [F, 2F), and h = silu(g) * u (fp32 math)."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r < R)[:, None] & (c < F)[None, :]
    off = r[:, None] * s_r + c[None, :]
    dh = tl.load(dh_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=m, other=0.0).to(tl.float32)
    h, dgate, dup = _swiglu_grads(dh, g, u)
    tl.store(h_ptr + off, _to(h, h_ptr.dtype.element_ty), mask=m)
    gu_off = r[:, None] * s_gur + c[None, :]
    tl.store(dgu_ptr + gu_off, _to(dgate, dgu_ptr.dtype.element_ty), mask=m)
    tl.store(dgu_ptr + gu_off + F, _to(dup, dgu_ptr.dtype.element_ty), mask=m)


def _swiglu_bwd(dh, g, u):
    """(dGU [R, 2F] = [dgate | dup], h [R, F]) from dH = dy W_down and the saved pre-activations ([R, F] each):
    one elementwise pass after the plain dH GEMM. Rows of dropped pairs have dH = g = u = 0 and come out zero."""
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    R, F = dh.shape
    dgu = torch.empty(R, 2 * F, dtype=dh.dtype, device=dh.device)
    h = torch.empty_like(dh)
    if dh.numel():
        cfg = _config("ew", dh.dtype)
        grid = (_cdiv(R, cfg["BR"]), _cdiv(F, cfg["BC"]))
        _swiglu_bwd_kernel[grid](dh, g, u, dgu, h, R, F, F, 2 * F, cfg["BR"], cfg["BC"], **_launch_opts(cfg))
    return dgu, h


def _expert_input(x_TD: torch.Tensor, meta: _Meta, kind: str) -> tuple[torch.Tensor, bool]:
    """A of an expert layer's first GEMM and whether that GEMM gathers it: x itself, read through the permutation
    (``GATHER`` = 1 in the kind's config: no copy), or a permuted copy [R, D] (0: its A tiles can load through TMA,
    and the backward reuses the copy for the first weight's dW instead of permuting x again)."""
    if _config(kind, x_TD.dtype).get("GATHER", 1):
        return x_TD, True
    return _scatter(x_TD, meta), False


def _dh_swiglu_bwd(dy, w_down, g, u, meta: _Meta):
    """(dGU [R, 2F] = [dgate | dup], h [R, F]) from dy and the saved pre-activations: dH = dy W_down in a grouped
    GEMM whose epilogue runs the SwiGLU backward (``swiglu_bwd`` FUSED = 1), or a plain dH GEMM and then the
    elementwise pass (0). Both give the same bits."""
    if _config("swiglu_bwd", dy.dtype).get("FUSED", 0):
        g, u = g.contiguous(), u.contiguous()
        return _gmm(dy, w_down, meta, transpose_w=False, epi=EPI_SWIGLU_BWD, x0=g, x1=u)
    return _swiglu_bwd(_gmm(dy, w_down, meta, transpose_w=False), g, u)


def _gmm_swiglu(a, w_gate, w_up, meta: _Meta, *, gather: bool):
    """h, g, u [R, F] with g/u = A @ W^T per expert and h = silu(g) * u. gather: A is x [T, D], row r reads token
    ``sorted_flat[r] // K``; else A is the permuted copy [R, D]."""
    E, N, Kdim = w_gate.shape
    R = meta.R
    h = torch.empty(R, N, dtype=a.dtype, device=a.device)
    g, u = torch.empty_like(h), torch.empty_like(h)
    if R == 0 or N == 0:
        return h, g, u
    cfg = _config("swiglu", a.dtype)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    tab, nmb = meta.table(BM)
    upcast, prec = _prec(a.dtype)
    b_descs = _tma_descs([(w_gate, [BN, BK]), (w_up, [BN, BK])]) if cfg.get("TMA") else None
    a_descs = _tma_descs([(a, [BM, BK])]) if cfg.get("TMA") and not gather else None
    n_tiles = nmb * _cdiv(N, BN)
    persist = bool(cfg.get("PERSIST"))
    grid = (min(n_tiles, _persistent_programs(a.device, cfg["PERSIST"])) if persist else n_tiles,)
    _gmm_swiglu_kernel[grid](
        a,
        meta.tok() if gather else h,
        w_gate,
        w_up,
        *(a_descs or [a]),
        *(b_descs or [w_gate, w_up]),
        tab,
        h,
        g,
        u,
        N,
        Kdim,
        nmb,
        E,
        a.stride(0),
        a.stride(1),
        w_gate.stride(0),
        w_gate.stride(2),
        w_gate.stride(1),
        w_up.stride(0),
        w_up.stride(2),
        w_up.stride(1),
        h.stride(0),
        h.stride(1),
        gather,
        persist,
        a_descs is not None,
        b_descs is not None,
        upcast,
        prec,
        Kdim % BK == 0,
        BM,
        BN,
        BK,
        cfg["GROUP_M"],
        **_launch_opts(cfg),
    )
    return h, g, u


def _gmm_dw(a, b, meta: _Meta, *, split: int | None = None, with_db: bool = False, dtype=None) -> list:
    """dW[e] = A[rows e]^T @ B[rows e] for every expert: [E, O, I] (+ db [E, O]). ``split`` = O / 2: the two
    halves of the result's rows come back as two tensors (the gate and up dW from one K-reduction over [dg | du])."""
    E = meta.E
    O, I = a.shape[1], b.shape[1]
    if split is not None and 2 * split != O:
        raise ValueError(f"split={split} must be half of the {O} columns of A")
    O1 = O if split is None else split
    dtype = dtype or a.dtype
    dw = torch.empty(E, O1, I, dtype=dtype, device=a.device)
    dw2 = torch.empty(E, O - O1, I, dtype=dtype, device=a.device) if split is not None else dw
    db = torch.empty(E, O, dtype=dtype, device=a.device) if with_db else dw
    if E > 0 and O > 0 and I > 0:
        cfg = _config("dw", a.dtype)
        BO, BI, BR = cfg["BO"], cfg["BI"], cfg["BR"]
        upcast, prec = _prec(a.dtype)
        descs = _tma_descs([(a, [BR, BO]), (b, [BR, BI])]) if cfg.get("TMA") else None
        grid = (_cdiv(O, BO) * _cdiv(I, BI), E)
        _gmm_dw_kernel[grid](
            a,
            b,
            *(descs or [a, b]),  # tensors stand in where unused
            meta.offsets,
            meta.order(),
            dw,
            dw2,
            db,
            O,
            O1,
            I,
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            dw.stride(0),
            dw.stride(1),
            dw.stride(2),
            db.stride(0) if with_db else 0,
            db.stride(1) if with_db else 0,
            split is not None,
            with_db,
            descs is not None,
            upcast,
            prec,
            BO,
            BI,
            BR,
            cfg["GROUP_M"],
            **_launch_opts(cfg),
        )
    else:
        for t in (dw, dw2, db):
            t.zero_()
    out = [dw]
    if split is not None:
        out.append(dw2)
    if with_db:
        out.append(db)
    return out


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
    def forward(ctx, x_TD, weights_TK, w_gate, w_up, w_down, meta):
        a, ctx.gathered = _expert_input(x_TD, meta, "swiglu")
        h, g, u = _gmm_swiglu(a, w_gate, w_up, meta, gather=ctx.gathered)
        y = _gmm(h, w_down, meta, transpose_w=True)
        ctx.meta = meta
        ctx.save_for_backward(a, weights_TK, w_gate, w_up, w_down, g, u, y)
        return _gather(y, meta, weights_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        a, w_TK, w_gate, w_up, w_down, g, u, y = ctx.saved_tensors
        meta = ctx.meta
        F = g.shape[1]
        dy, dw_TK = _scatter(dout_TD.to(y.dtype), meta, w_TK, y)
        # dH = dy W_down and the SwiGLU backward make [dgate | dup] and re-materialise h = silu(g) * u (not kept
        # from the forward: only g and u are saved), so the down dW is a plain K-reduction dy^T h.
        dgu, h = _dh_swiglu_bwd(dy, w_down, g, u, meta)
        dw_down = _gmm_dw(dy, h, meta)[0] if ctx.needs_input_grad[4] else None
        del h
        dw_gate = dw_up = dx = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw_gate, dw_up = _gmm_dw(dgu, _scatter(a, meta) if ctx.gathered else a, meta, split=F)
        if ctx.needs_input_grad[0]:
            dx_RD = _gmm(dgu[:, :F], w_gate, meta, transpose_w=False, a2=dgu[:, F:], w2=w_up)
            dx = _gather(dx_RD, meta)
        return dx, dw_TK.to(w_TK.dtype), dw_gate, dw_up, dw_down, None


@_backward_under_forward_tiles
class _GeluExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1, b1, w2, b2, meta):
        a, ctx.gathered = _expert_input(x_TD, meta, "gmm_epi")
        h, z = _gmm(a, w1, meta, transpose_w=True, gather=ctx.gathered, bias=b1, epi=EPI_GELU)
        y = _gmm(h, w2, meta, transpose_w=True, bias=b2)
        ctx.meta = meta
        ctx.save_for_backward(a, weights_TK, w1, w2, z, y)
        return _gather(y, meta, weights_TK)

    @staticmethod
    def backward(ctx, dout_TD):
        a, w_TK, w1, w2, z, y = ctx.saved_tensors
        meta = ctx.meta
        dy, dw_TK = _scatter(dout_TD.to(y.dtype), meta, w_TK, y)
        dz, h = _gmm(dy, w2, meta, transpose_w=False, epi=EPI_GELU_BWD, x0=z)  # h = gelu(z) re-materialised
        dw2, db2 = _gmm_dw(dy, h, meta, with_db=True)
        del h
        dw1, db1 = _gmm_dw(dz, _scatter(a, meta) if ctx.gathered else a, meta, with_db=True)
        dx = _gather(_gmm(dz, w1, meta, transpose_w=False), meta) if ctx.needs_input_grad[0] else None
        return dx, dw_TK.to(w_TK.dtype), dw1, db1, dw2, db2, None


# ----------------------------------------------------------------------------------------------------------------
# Public API (same names and signatures as ``reference``)
# ----------------------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


def permute(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Gather one copy of each token per choice into expert-sorted order: [R, D]."""
    return _Permute.apply(x_TD, _meta(plan))


def unpermute(y_RD: torch.Tensor, weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """Weighted sum of each token's K expert outputs, accumulated in fp32, in the dtype of y. [T, D]."""
    return _Unpermute.apply(y_RD, weights_TK, _meta(plan))


def grouped_mm(x_RI: torch.Tensor, w_EOI: torch.Tensor, plan: RoutingPlan, bias_EO: torch.Tensor | None = None):
    """Per-expert ``x @ w[e].T (+ b[e])`` on contiguous row groups; rows past the kept ones are zero. [R, O].
    Weights and bias are cast to the dtype of x (to the autocast dtype under autocast)."""
    dt = _compute_dtype(x_RI)
    with torch.autocast(x_RI.device.type, enabled=False):
        return _GroupedMM.apply(_cast(x_RI, dt), _cast(w_EOI, dt), _cast(bias_EO, dt), _meta(plan))


def swiglu_experts(x_TD, weights_TK, plan, gate_EFD, up_EFD, down_EDF) -> torch.Tensor:
    """Routed SwiGLU experts: ``down(silu(gate(x)) * up(x))`` per expert, combined with the routing weights."""
    dt = _compute_dtype(x_TD)
    with torch.autocast(x_TD.device.type, enabled=False):
        return _SwigluExperts.apply(
            _cast(x_TD, dt), weights_TK, _cast(gate_EFD, dt), _cast(up_EFD, dt), _cast(down_EDF, dt), _meta(plan)
        )


def gelu_experts(x_TD, weights_TK, plan, fc1_EFD, fc1_bias_EF, fc2_EDF, fc2_bias_ED) -> torch.Tensor:
    """Routed GELU (tanh) experts as in DiT's MLP, for upcycling a dense DiT."""
    dt = _compute_dtype(x_TD)
    with torch.autocast(x_TD.device.type, enabled=False):
        return _GeluExperts.apply(
            _cast(x_TD, dt),
            weights_TK,
            _cast(fc1_EFD, dt),
            _cast(fc1_bias_EF, dt),
            _cast(fc2_EDF, dt),
            _cast(fc2_bias_ED, dt),
            _meta(plan),
        )
