"""Routing metadata on device: per-expert counts, offsets and the stable permutation, with no host sync; and the
per-plan block tables the grouped GEMMs read (``Meta``).

The three routing kernels also make what the expert kernels read besides the permutation (the token of each permuted
row, the dW's expert order) and check the ids: torch ops would each cost a launch per layer, and the host's launch
rate paces small models. An id outside [0, E) goes to the last bucket, where dropped pairs go, so nothing is read or
written through it, and the plan's check fails (``checks.check_ids``)."""

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
    """Bucket of processing index ``i`` among NB = E + 1: the E experts, then the sentinel. PRIO: ``i`` walks
    slot-major (GShard priority) instead of flat order. CAPPED: pairs whose priority rank reached the capacity go to
    the sentinel, as do ids outside [0, E) (``bad``, compared before any narrowing cast)."""
    m = i < n
    if PRIO:  # noqa: SIM108 (constexpr branches)
        f = (i % T) * K + i // T
    else:
        f = i
    raw = tl.load(exp_ptr + f, mask=m, other=0)
    bad = m & ((raw < 0) | (raw >= NB - 1))
    e = tl.where(bad, NB - 1, raw.to(tl.int32))
    if CAPPED:
        r = tl.load(rank_ptr + f, mask=m, other=0)
        e = tl.where(r < cap, e, NB - 1)
    e = tl.where(m, e, NB)  # masked lanes fall outside every bucket
    return f, e, m, bad


@triton.jit
def _route_hist_kernel(
    exp_ptr,
    rank_ptr,
    hist_ptr,
    bad_ptr,
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
    f, e, m, bad = _route_ids(exp_ptr, rank_ptr, cap, i, n, T, K, NB, PRIO, CAPPED)
    b = tl.arange(0, NB_PAD)
    onehot = (e[:, None] == b[None, :]).to(tl.int32)
    tl.store(hist_ptr + pid * NB + b, tl.sum(onehot, 0), mask=b < NB)
    tl.store(bad_ptr + pid, tl.sum(bad.to(tl.int32), 0))


@triton.jit
def _route_scan_kernel(
    hist_ptr,
    bad_ptr,
    base_ptr,
    counts_ptr,
    offsets_ptr,
    dropped_ptr,
    order_ptr,
    ok_ptr,
    nblk,
    NB,
    ADD_START: tl.constexpr,
    WRITE_META: tl.constexpr,
    CH: tl.constexpr,
    NB_PAD: tl.constexpr,
):
    """One program: per-bucket exclusive prefix over blocks (+ the bucket's start), bucket totals and starts. With
    WRITE_META also whether every id was in range and the experts in the dW's order."""
    b = tl.arange(0, NB_PAD)
    bm = b < NB
    c = tl.arange(0, CH)
    tot = tl.zeros([NB_PAD], tl.int32)
    bad = tl.zeros([CH], tl.int32)
    for c0 in range(0, nblk, CH):
        hm = ((c0 + c)[:, None] < nblk) & bm[None, :]
        tot += tl.sum(tl.load(hist_ptr + (c0 + c)[:, None] * NB + b[None, :], mask=hm, other=0), 0)
        bad += tl.load(bad_ptr + c0 + c, mask=c0 + c < nblk, other=0)
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
        tl.store(ok_ptr, tl.sum(bad, 0) == 0)
        # the dW's order: experts by decreasing row count, ties by id (a stable descending sort of the E counts).
        # Each expert's place counts the experts ahead of it, CH of them at a time read back from the counts just
        # stored: an [NB_PAD, NB_PAD] comparison in one piece spilled from E = 128 on (sm_90).
        tl.debug_barrier()  # the counts stored above by this program's threads, visible to all of them
        place = tl.zeros([NB_PAD], tl.int32)
        for j0 in range(0, NB - 1, CH):
            j = j0 + c
            tj = tl.load(counts_ptr + j, mask=j < NB - 1, other=-1).to(tl.int32)
            ahead = (tj[None, :] > tot[:, None]) | ((tj[None, :] == tot[:, None]) & (j[None, :] < b[:, None]))
            place += tl.sum(ahead.to(tl.int32), 1)
        tl.store(order_ptr + place, b, mask=b < NB - 1)


@triton.jit
def _route_rank_kernel(
    exp_ptr,
    rank_ptr,
    base_ptr,
    pos_ptr,
    sorted_ptr,
    tok_ptr,
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
    f, e, m, _ = _route_ids(exp_ptr, rank_ptr, cap, i, n, T, K, NB, PRIO, CAPPED)
    b = tl.arange(0, NB_PAD)
    onehot = (e[:, None] == b[None, :]).to(tl.int32)
    within = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1  # earlier pairs of the same bucket in this block
    pos = tl.load(base_ptr + pid * NB + e, mask=m, other=0) + within
    tl.store(pos_ptr + f, pos.to(tl.int64), mask=m)
    if WRITE_SORTED:
        tl.store(sorted_ptr + pos, f.to(tl.int64), mask=m)
        tl.store(tok_ptr + pos, (f // K).to(tl.int32), mask=m)


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
    """A ``RoutingPlan`` that also carries the inverse permutation, what the expert kernels read, and caches kernel
    metadata."""

    row_of_flat_R: torch.Tensor | None = None  # int64 [R]: permuted row of each flat pair
    token_of_row_R: torch.Tensor | None = None  # int32 [R]: the token each permuted row reads (sorted_flat // K)
    expert_order_E: torch.Tensor | None = None  # int32 [E]: experts by decreasing row count, ties by id
    _cache: dict = field(default_factory=dict, repr=False, compare=False)


def _route_block(nb_pad: int) -> int:
    """Pairs per routing program (0 in the config: sized so the one-hot block stays ~8K elements)."""
    block = common.config("route", torch.int64)["BLOCK"]
    return block or max(16, min(1024, 8192 // nb_pad))


@dataclass
class _Pass:
    """What one histogram -> scan -> rank pass made; all but ``pos`` only when it wrote the plan (``write_meta``)."""

    pos: torch.Tensor  # int64 [R]: bucket start + rank when ``add_start``, else the rank within the bucket
    sorted_flat: torch.Tensor
    tok: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    dropped: torch.Tensor
    order: torch.Tensor
    ids_ok: torch.Tensor  # bool []: every id was in [0, E)


def _route_pass(flat, rank, cap, T, K, E, prio, capped, add_start, write_meta) -> _Pass:
    """histogram -> scan -> rank over E + 1 buckets (the experts, then the sentinel)."""
    dev, n, NB = flat.device, flat.numel(), E + 1
    nb_pad = common.pow2(NB)
    BLOCK = _route_block(nb_pad)
    nblk = common.cdiv(n, BLOCK)
    hist = torch.empty(nblk, NB, dtype=torch.int32, device=dev)
    base = torch.empty_like(hist)
    bad = torch.empty(nblk, dtype=torch.int32, device=dev)
    rank_arg = rank if rank is not None else flat
    _route_hist_kernel[(nblk,)](flat, rank_arg, hist, bad, cap, n, T, K, NB, prio, capped, BLOCK, nb_pad)

    def plan_out(size, dtype=torch.int64):  # a plan tensor, or a 1-element stand-in when this pass writes none
        return torch.empty(size if write_meta else 1, dtype=dtype, device=dev)

    counts, offsets, dropped = plan_out(E), plan_out(NB), plan_out(())
    order, ok = plan_out(E, torch.int32), plan_out((), torch.bool)
    _route_scan_kernel[(1,)](
        hist, bad, base, counts, offsets, dropped, order, ok, nblk, NB, add_start, write_meta, 16, nb_pad
    )
    pos = torch.empty(n, dtype=torch.int64, device=dev)
    sorted_flat = torch.empty(n, dtype=torch.int64, device=dev) if write_meta else pos
    tok = plan_out(n, torch.int32)
    _route_rank_kernel[(nblk,)](
        flat, rank_arg, base, pos, sorted_flat, tok, cap, n, T, K, NB, prio, capped, write_meta, BLOCK, nb_pad
    )
    return _Pass(pos, sorted_flat, tok, counts, offsets, dropped, order, ok)


def routing_plan(experts_TK: torch.Tensor, num_experts: int, capacity: int | None = None) -> TritonRoutingPlan:
    """Same contract as ``reference.routing_plan``; computed by Triton kernels without host synchronisation."""
    checks.check_routing_args(experts_TK, num_experts, capacity)
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
            token_of_row_R=torch.empty(0, dtype=torch.int32, device=experts_TK.device),
            expert_order_E=torch.arange(E, dtype=torch.int32, device=experts_TK.device),
        )
    flat = experts_TK.reshape(-1)
    rank = None
    if capacity is not None:
        rank = _route_pass(flat, None, 0, T, K, E, True, False, False, False).pos
    cap = 0 if capacity is None else int(capacity)
    r = _route_pass(flat, rank, cap, T, K, E, False, capacity is not None, True, True)
    checks.check_ids(experts_TK, E, r.ids_ok)
    return TritonRoutingPlan(
        r.sorted_flat,
        r.counts,
        r.offsets,
        r.dropped,
        K,
        row_of_flat_R=r.pos,
        token_of_row_R=r.tok,
        expert_order_E=r.order,
    )


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
        self._order = getattr(plan, "expert_order_E", None)
        self._tok = getattr(plan, "token_of_row_R", None)

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
