"""Routing metadata on device: per-expert counts, offsets and the stable permutation, with no host sync; and the
per-plan block tables the grouped GEMMs read (``Meta``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ditmoe_kernels import checks, reference
from ditmoe_kernels.reference import RoutingPlan
from ditmoe_kernels.triton_ops import common


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
    block = common.config("route", torch.int64)["BLOCK"]
    return block or max(16, min(1024, 8192 // nb_pad))


def _route_pass(flat, rank, cap, T, K, NB, prio, capped, add_start, write_meta):
    """histogram -> scan -> rank. Returns pos [R] (bucket start + rank when ``add_start``), sorted, meta."""
    dev, n = flat.device, flat.numel()
    nb_pad = common.pow2(max(NB, 2))
    BLOCK = _route_block(nb_pad)
    nblk = common.cdiv(n, BLOCK)
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
    checks.check_routing(experts_TK, num_experts, capacity)
    T, K = experts_TK.shape
    E = num_experts
    common.check_device(experts_TK)
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


class Meta:
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
            nmb = common.cdiv(self.R, BM) + self.E + 1
            tab = torch.empty(3 * nmb + 1, dtype=torch.int32, device=self.offsets.device)
            nb = self.E + 1
            _block_table_kernel[(1,)](self.offsets, tab, self.R, nb, nmb, BM, common.pow2(nb), 64)
            self._tables[BM] = (tab, nmb)
        return self._tables[BM]

    def order(self) -> torch.Tensor:
        """Experts by decreasing row count (stable): the dW grid visits big groups first."""
        if self._order is None:
            self._order = torch.argsort(self.counts, descending=True, stable=True).to(torch.int32)
        return self._order


def plan_meta(plan: RoutingPlan) -> Meta:
    common.check_device(plan.sorted_flat_R)
    if isinstance(plan, TritonRoutingPlan):
        m = plan._cache.get("meta")
        if m is None:
            m = plan._cache["meta"] = Meta(plan)
        return m
    return Meta(plan)
