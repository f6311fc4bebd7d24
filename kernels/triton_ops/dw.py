"""Weight gradients of the grouped GEMMs: a deterministic K-reduction over each expert's rows (zeros for an expert
without rows), largest experts first, with the bias gradient on request."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditmoe_kernels.triton_ops import common
from ditmoe_kernels.triton_ops.common import grouped_order, mma, to_dtype
from ditmoe_kernels.triton_ops.routing import Meta


@triton.jit
def _dw_chunk(acc, dbacc, a, b, DB: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One chunk of rows of a dW K-reduction: acc += a^T b, and dbacc += the column sums of a (DB = 1) or b (2)."""
    acc = mma(tl.trans(a), b, acc, UPCAST, PREC)
    if DB == 1:
        dbacc += tl.sum(a.to(tl.float32), 0)
    if DB == 2:
        dbacc += tl.sum(b.to(tl.float32), 0)
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
    db_ptr,
    O,
    I,
    NUM_E,
    s_ar,
    s_ao,
    s_br,
    s_bi,
    s_we,
    s_wo,
    s_wi,
    s_dbe,
    s_dbo,
    DB: tl.constexpr,
    TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BR: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSIST: tl.constexpr,
    WS: tl.constexpr,
):
    """dW[e] = A[rows e]^T @ B[rows e] ([O, I], stored through the strides s_wo / s_wi) as a K-reduction over the
    expert's rows; DB = 1: db[e] = the sum of A's rows ([O]), 2: of B's rows ([I]). Empty experts write zeros.
    One [BO, BI] tile of one expert per program (grid: tiles x experts, largest experts first), or PERSIST: a few
    programs loop over them in that order; WS (with PERSIST and TMA = 2, 4 warps) splits that loop into a warp
    group issuing the TMA loads and two computing, so the next tile's loads overlap a tile's store."""
    n_ot = tl.cdiv(O, BO) * tl.cdiv(I, BI)
    # tiles numbered expert slot by slot; one per program, or PERSIST every num_programs-th
    first = tl.program_id(0) if PERSIST else tl.program_id(1) * n_ot + tl.program_id(0)
    stop = n_ot * NUM_E if PERSIST else first + 1
    for t in tl.range(first, stop, tl.num_programs(0) if PERSIST else 1, flatten=False, warp_specialize=WS):
        _dw_tile(
            t % n_ot,
            t // n_ot,
            a_ptr,
            b_ptr,
            a_desc,
            b_desc,
            offs_ptr,
            order_ptr,
            dw_ptr,
            db_ptr,
            O,
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
            DB,
            TMA,
            UPCAST,
            PREC,
            BO,
            BI,
            BR,
            GROUP_M,
        )


@triton.jit
def _dw_tile(
    tile,
    slot,
    a_ptr,
    b_ptr,
    a_desc,
    b_desc,
    offs_ptr,
    order_ptr,
    dw_ptr,
    db_ptr,
    O,
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
    DB: tl.constexpr,
    TMA: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Output tile ``tile`` (grouped order) of the expert in ``slot`` of the order (see ``_gmm_dw_kernel``).

    The loop is a plain counted loop over [BR, BO] / [BR, BI] tiles whose pointers advance by BR rows: every
    load is row-contiguous (coalesced, 16-byte vectors) and feeds tl.dot directly (A through tl.trans), so the
    compiler pipelines it into shared memory; fp32 accumulation. TMA: the whole BR-row chunks come through the
    descriptors ``a_desc`` / ``b_desc`` over A and B ([R, O], [R, I]; columns past O or I read as zeros) and only
    the last, partial chunk, whose rows past the expert must not be read, through masked pointer loads: the same
    chunks in the same order, so the same bits. TMA = 2: each program makes descriptors over its expert's rows
    alone ([n_rows, O], [n_rows, I]), which read rows past them as zeros: every chunk, the last too, comes through
    them (the same bits again)."""
    pid_o, pid_i = grouped_order(tile, tl.cdiv(O, BO), I, BI, GROUP_M)
    e = tl.load(order_ptr + slot).to(tl.int64)
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
    dbacc = tl.zeros([BI if DB == 2 else BO], tl.float32)
    if TMA == 2:
        row0 = start.to(tl.int64)
        n_desc = tl.maximum(n_rows, 1)  # an empty expert loads nothing, but its descriptor needs a row
        a_desc = tl.make_tensor_descriptor(a_ptr + row0 * s_ar, [n_desc, O], [s_ar, 1], [BR, BO])
        b_desc = tl.make_tensor_descriptor(b_ptr + row0 * s_br, [n_desc, I], [s_br, 1], [BR, BI])
        for it in range(0, tl.cdiv(n_rows, BR)):
            a = a_desc.load([it * BR, pid_o * BO])
            b = b_desc.load([it * BR, pid_i * BI])
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, DB, UPCAST, PREC)
    elif TMA == 1:
        n_full = n_rows // BR
        for it in range(0, n_full):
            a = a_desc.load([start + it * BR, pid_o * BO])
            b = b_desc.load([start + it * BR, pid_i * BI])
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, DB, UPCAST, PREC)
        if n_rows > n_full * BR:
            tail = (n_full * BR).to(tl.int64)
            rm = offs_r < n_rows - n_full * BR
            a = tl.load(a_ptrs + tail * s_ar, mask=rm[:, None] & om[None, :], other=0.0)
            b = tl.load(b_ptrs + tail * s_br, mask=rm[:, None] & im[None, :], other=0.0)
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, DB, UPCAST, PREC)
    else:
        for it in range(0, tl.cdiv(n_rows, BR)):
            rm = offs_r < n_rows - it * BR
            a = tl.load(a_ptrs, mask=rm[:, None] & om[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=rm[:, None] & im[None, :], other=0.0)
            acc, dbacc = _dw_chunk(acc, dbacc, a, b, DB, UPCAST, PREC)
            a_ptrs += BR * s_ar
            b_ptrs += BR * s_br
    w_off = e * s_we + offs_o[:, None] * s_wo + offs_i[None, :] * s_wi
    tl.store(dw_ptr + w_off, to_dtype(acc, dw_ptr.dtype.element_ty), mask=om[:, None] & im[None, :])
    if DB == 1:  # by the programs of the first I-block
        db_m = offs_o < tl.where(pid_i == 0, O, 0)
        tl.store(db_ptr + e * s_dbe + offs_o * s_dbo, to_dtype(dbacc, db_ptr.dtype.element_ty), mask=db_m)
    if DB == 2:  # by those of the first O-block
        db_m = offs_i < tl.where(pid_o == 0, I, 0)
        tl.store(db_ptr + e * s_dbe + offs_i * s_dbo, to_dtype(dbacc, db_ptr.dtype.element_ty), mask=db_m)


def transposed(O: int, I: int, BO: int, BI: int) -> bool:
    """Whether to compute dW[e]^T = B^T A ([I, O] tiles, stored transposed) rather than dW[e]: when that takes fewer
    [BO, BI] tiles. A tile computes all its columns, so with BO != BI the orientation decides how much is wasted:
    gate/up dW at G (O = 2F = 11264, I = D = 1408) takes 88 x 6 tiles of 128x256, the last column of them half
    empty (8% of the work), and 11 x 44 transposed, none empty."""
    return common.cdiv(I, BO) * common.cdiv(O, BI) < common.cdiv(O, BO) * common.cdiv(I, BI)


def _gmm_dw(a, b, meta: Meta, *, with_db: bool = False, dtype=None) -> list:
    """dW[e] = A[rows e]^T @ B[rows e] for every expert: [dW] ([E, O, I]), or with_db [dW, db] (db [E, O])."""
    E = meta.E
    O, I = a.shape[1], b.shape[1]
    dtype = dtype or a.dtype
    dw = torch.empty(E, O, I, dtype=dtype, device=a.device)
    db = torch.empty(E, O, dtype=dtype, device=a.device) if with_db else dw
    if E > 0 and O > 0 and I > 0:
        cfg = common.config("dw", a.dtype)
        BO, BI, BR = cfg["BO"], cfg["BI"], cfg["BR"]
        upcast, prec = common.prec(a.dtype)
        s_wo, s_wi = dw.stride(1), dw.stride(2)
        db_of = 1  # db: the column sums of the kernel's A
        if transposed(O, I, BO, BI):  # the kernel's A is B: its [I, O] result lands in dW through swapped strides
            a, b, O, I, s_wo, s_wi, db_of = b, a, I, O, s_wi, s_wo, 2
        # both operands through TMA, or neither; with pointer loads or descriptors made in the kernel the tensors
        # stand in for the descriptor arguments
        (tma_a, a_desc), (tma_b, b_desc) = (
            common.descriptor(cfg.get("TMA", 0), t, blk) for t, blk in ((a, [BR, BO]), (b, [BR, BI]))
        )
        tma = tma_a if tma_a == tma_b else 0
        if tma == 0:
            a_desc, b_desc = a, b
        n_tiles = common.cdiv(O, BO) * common.cdiv(I, BI)
        persist = bool(cfg.get("PERSIST"))
        ws = bool(cfg.get("WS")) and persist and tma == 2
        grid = (min(n_tiles * E, common.persistent_programs(a.device, cfg["PERSIST"])),) if persist else (n_tiles, E)
        with common.device_descriptors(tma == 2):
            _gmm_dw_kernel[grid](
                a,
                b,
                a_desc,
                b_desc,
                meta.offsets,
                meta.order(),
                dw,
                db,
                O,
                I,
                E,
                a.stride(0),
                a.stride(1),
                b.stride(0),
                b.stride(1),
                dw.stride(0),
                s_wo,
                s_wi,
                db.stride(0) if with_db else 0,
                db.stride(1) if with_db else 0,
                db_of if with_db else 0,
                tma,
                upcast,
                prec,
                BO,
                BI,
                BR,
                cfg["GROUP_M"],
                persist,
                ws,
                **common.launch_opts(cfg),
            )
    else:
        for t in (dw, db):
            t.zero_()
    return [dw, db] if with_db else [dw]
