"""Grouped GEMMs over expert row groups, forward (C = A W[e]^T) and dX (C = A W[e]), with their epilogues: bias,
GELU forward, GELU backward and the SwiGLU backward (on dH)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditmoe_kernels.triton_ops import common
from ditmoe_kernels.triton_ops.activations import gelu_tanh, gelu_tanh_grad, swiglu_grads
from ditmoe_kernels.triton_ops.common import group_block, mma, rows_read, to_dtype
from ditmoe_kernels.triton_ops.routing import Meta

EPI_NONE, EPI_GELU, EPI_GELU_BWD, EPI_SWIGLU_BWD = 0, 1, 2, 3


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
        acc = mma(a, b, acc, UPCAST, PREC)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk
    return acc


@triton.jit
def _gmm_kernel(
    a_ptr,
    tok_ptr,
    b_ptr,
    a_desc,
    b_desc,
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
    RA,
    s_ar,
    s_ak,
    s_be,
    s_bk,
    s_bn,
    s_biase,
    s_biasn,
    s_cr,
    s_cn,
    s_x0r,
    s_x0n,
    GATHER: tl.constexpr,
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
    WS: tl.constexpr,
    SAVE: tl.constexpr,
):
    """C[rows of group e] = A[rows] @ B[e] (+ bias[e]) with an epilogue.

    B[e] is addressed as a [Kdim, N] matrix through strides, so the forward (B = W[e]^T) and dX (B = W[e]) share this
    kernel. GATHER: A row r is token ``tok[r]`` of A (A is x itself, never permuted). C and C2 share strides. EPI_GELU:
    C = gelu(z), C2 = z (only where SAVE: without it no backward follows). EPI_GELU_BWD: X0 = z, C = acc * gelu'(z), C2
    = gelu(z) (the activation the forward produced, for the dW of the second weight). EPI_SWIGLU_BWD (acc = dH): X0 = g,
    X1 = u; C = dgate, C2 = dup, C3 = h = silu(g) * u, the math of ``swiglu._swiglu_bwd_kernel`` on dH rounded to C's
    dtype (the same bits as the separate pass); X0, X1 and C3 share strides. PRE (backward epilogues), when the X0 / X1
    tiles are loaded: 0, each column quarter's after the K loop, just before its math; 1, all before the K loop, so
    their reads overlap it; 2, the first quarter's after the K loop and each next one's before the stores of the one
    before, so that its reads overlap that quarter's math and stores (program order, because the compiler may not move
    loads above stores it cannot prove to be elsewhere); 3, the quarters as a loop the compiler software-pipelines: each
    quarter's tiles copied into shared memory (cp.async) two quarters ahead, holding no registers while in flight.

    TMA_A / TMA_B = 2: those descriptors are made here from the pointers (A as [RA, Kdim]; B as [E*N, Kdim] for the
    forward, [E*Kdim, N] for dX), not passed in. WS (with PERSIST, both descriptors made here, 4 warps): the tile
    loop is split into a producer warp group issuing the TMA loads and two consumer warp groups of BM/2 rows (as
    in ``swiglu._gmm_swiglu_kernel``); the backward epilogues then work on the whole tile, not in quarters (the
    compiler's data partitioning cannot reshape an accumulator, and a consumer holds half the rows).
    """
    if TMA_A == 2:
        a_desc = tl.make_tensor_descriptor(a_ptr, [RA, Kdim], [s_ar, 1], [BM, BK])
    if TMA_B == 2:
        if B_T:  # noqa: SIM108 (constexpr branches)
            b_desc = tl.make_tensor_descriptor(b_ptr, [NUM_E * N, Kdim], [s_bn, 1], [BN, BK])
        else:
            b_desc = tl.make_tensor_descriptor(b_ptr, [NUM_E * Kdim, N], [s_bk, 1], [BK, BN])
    # PERSIST: loop over the used blocks only (unused ones come last in the table), every tile running the full K
    # loop (a trip count that varies by tile stops the compiler from flattening the two loops into one pipelined
    # loop). Otherwise one tile per program.
    num_m = tl.load(tab_ptr + 3 * NMB) if PERSIST else NMB
    stop = num_m * tl.cdiv(N, BN) if PERSIST else tl.program_id(0) + 1
    step = tl.num_programs(0) if PERSIST else 1
    for tile in tl.range(tl.program_id(0), stop, step, flatten=PERSIST and not WS, warp_specialize=WS):
        _gmm_tile(
            tile,
            num_m,
            a_ptr,
            tok_ptr,
            b_ptr,
            a_desc,
            b_desc,
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
            s_be,
            s_bk,
            s_bn,
            s_biase,
            s_biasn,
            s_cr,
            s_cn,
            s_x0r,
            s_x0n,
            GATHER,
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
            WS,
            SAVE,
        )


@triton.jit
def _gmm_tile(
    tile,
    num_m,
    a_ptr,
    tok_ptr,
    b_ptr,
    a_desc,
    b_desc,
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
    s_be,
    s_bk,
    s_bn,
    s_biase,
    s_biasn,
    s_cr,
    s_cn,
    s_x0r,
    s_x0n,
    GATHER: tl.constexpr,
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
    WS: tl.constexpr,
    SAVE: tl.constexpr,
):
    """One output tile of ``_gmm_kernel``, numbered over the table's first ``num_m`` M-blocks. No early exits, so
    that a persistent loop can flatten over it: an unused block (e = -1) masks every row; the dropped rows' block
    (e = E) contributes a zero accumulator, so C gets zeros there (its epilogue inputs, the pre-activations of
    dropped rows, are zeros the forward wrote)."""
    e, rs, n0, rows, rmask, offs_n, nmask = group_block(tile, tab_ptr, NMB, num_m, N, BM, BN, GROUP_M)
    live = (e >= 0) & (e < NUM_E)
    # PERSIST: a K loop the same length for every tile (see _gmm_kernel); the dropped rows' products are discarded
    k_len = Kdim if PERSIST else tl.where(live, Kdim, 0)
    e = tl.where(live, e, 0)  # a valid expert for addressing (the dropped rows' block reads expert 0 only if PERSIST)
    cmask = rmask[:, None] & nmask[None, :]
    c_off = rows[:, None] * s_cr + offs_n[None, :] * s_cn
    e64 = e.to(tl.int64)
    b_row0 = e * (N if B_T else Kdim)
    # PRE = 1: the epilogue's inputs in the column quarters it works in, loaded now (bf16: a quarter of the registers
    # of the fp32 accumulator each); otherwise each quarter loads its own after the K loop
    if PRE == 1 and EPI >= 2:
        x0q = _epi_load_quarters(x0_ptr, rows, rmask, n0, N, s_x0r, s_x0n, BN // 4)
        x1q = _epi_load_quarters(x1_ptr, rows, rmask, n0, N, s_x0r, s_x0n, BN // 4) if EPI == 3 else x0q
    acc = tl.zeros([BM, BN], tl.float32)
    acc = _mainloop(
        acc,
        a_ptr,
        a_desc,
        rows_read(tok_ptr, rows, rmask, GATHER),
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
    if PERSIST:
        acc = tl.where(live, acc, 0.0)
    if HAS_BIAS:  # not on dropped rows
        bias = tl.load(bias_ptr + e64 * s_biase + offs_n * s_biasn, mask=nmask, other=0.0).to(tl.float32)
        acc += tl.where(live, bias, 0.0)[None, :]
    if EPI == 0:
        tl.store(c_ptr + c_off, to_dtype(acc, c_ptr.dtype.element_ty), mask=cmask)
    if EPI == 1:
        z = to_dtype(acc, c2_ptr.dtype.element_ty)
        if SAVE:
            tl.store(c2_ptr + c_off, z, mask=cmask)
        tl.store(c_ptr + c_off, to_dtype(gelu_tanh(z.to(tl.float32)), c_ptr.dtype.element_ty), mask=cmask)
    if EPI >= 2:
        # The backward epilogues load and store extra tiles; they work in column quarters so that a quarter of
        # them is live at a time. At 128x128 (sm_90) the SwiGLU one needed 255 registers and spilled 700 bytes in
        # one piece, 128 in quarters; the GELU one 255 and 20 bytes of spills, 121 in quarters. WS: in one piece
        # (a consumer warp group holds half the rows, and the compiler's data partitioning cannot split the tile).
        NQ: tl.constexpr = 1 if WS else 4
        pieces = (acc,) if WS else _quarters(acc)
        if PRE == 2:
            next0, next1 = _epi_load_pair(x0_ptr, x1_ptr, EPI, rows, rmask, n0, N, s_x0r, s_x0n, BN // NQ)
        if PRE == 3:
            _epi_pipelined(
                pieces, EPI, rows, rmask, n0, N, c_ptr, c2_ptr, c3_ptr, x0_ptr, x1_ptr, s_cr, s_cn, s_x0r, s_x0n, SAVE
            )
        else:
            for q in tl.static_range(NQ):
                x0, x1 = pieces[q], pieces[q]  # read only where loaded ahead (PRE 1 and 2)
                if PRE == 1:
                    x0, x1 = x0q[q], x1q[q]
                if PRE == 2:
                    x0, x1 = next0, next1
                    if q + 1 < NQ:
                        q0 = n0 + (q + 1) * (BN // NQ)
                        next0, next1 = _epi_load_pair(x0_ptr, x1_ptr, EPI, rows, rmask, q0, N, s_x0r, s_x0n, BN // NQ)
                _epi_tile(
                    pieces[q],
                    EPI,
                    rows,
                    rmask,
                    n0 + q * (BN // NQ),
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
                    x0,
                    x1,
                    PRE > 0,
                    SAVE,
                )


@triton.jit
def _epi_pipelined(
    pieces,
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
    SAVE: tl.constexpr,
):
    """``_epi_tile`` on each of the four column quarters ``pieces`` in a loop of 3 stages, which the compiler
    software-pipelines: quarter q+2's input tiles are copied into shared memory while quarter q computes and stores.
    The quarter is picked by selects on the loop index: a loop-carried rotation of the quarters would yield the
    loop's own arguments, and the pipeliner refuses such loops."""
    p0, p1, p2, p3 = pieces
    W: tl.constexpr = p0.shape[1]
    for q in tl.range(0, 4, num_stages=3):
        piece = tl.where(q == 0, p0, tl.where(q == 1, p1, tl.where(q == 2, p2, p3)))
        _epi_tile(
            piece,
            EPI,
            rows,
            rmask,
            n0 + q * W,
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
            piece,
            piece,
            False,
            SAVE,
        )


@triton.jit
def _halves(t):
    """The left and right column halves of a 2-D tile."""
    M: tl.constexpr = t.shape[0]
    W: tl.constexpr = t.shape[1] // 2
    return tl.split(tl.permute(tl.reshape(t, (M, 2, W)), (0, 2, 1)))


@triton.jit
def _quarters(t):
    """The four column quarters of a 2-D tile, left to right."""
    left, right = _halves(t)
    q0, q1 = _halves(left)
    q2, q3 = _halves(right)
    return q0, q1, q2, q3


@triton.jit
def _epi_load(x_ptr, rows, rmask, n0, N, s_xr, s_xn, W: tl.constexpr):
    """An epilogue input tile [rows, W columns from n0], zeros outside the matrix."""
    offs_n = n0 + tl.arange(0, W)
    m = rmask[:, None] & (offs_n < N)[None, :]
    return tl.load(x_ptr + rows[:, None] * s_xr + offs_n[None, :] * s_xn, mask=m, other=0.0)


@triton.jit
def _epi_load_pair(x0_ptr, x1_ptr, EPI: tl.constexpr, rows, rmask, n0, N, s_xr, s_xn, W: tl.constexpr):
    """The X0 tile and, for the SwiGLU backward, the X1 tile (else X0 again) at columns n0.. (``_epi_load``)."""
    x0 = _epi_load(x0_ptr, rows, rmask, n0, N, s_xr, s_xn, W)
    x1 = x0
    if EPI == 3:
        x1 = _epi_load(x1_ptr, rows, rmask, n0, N, s_xr, s_xn, W)
    return x0, x1


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
    LOADED: tl.constexpr,
    SAVE: tl.constexpr,
):
    """A backward epilogue on one [BM, W] fp32 tile whose columns start at n0 (see ``_gmm_kernel``).
    EPI_GELU_BWD: C = acc * gelu'(z), C2 = gelu(z) from X0 = z. EPI_SWIGLU_BWD: C = dgate, C2 = dup, C3 = h (only
    where SAVE) from dH = acc rounded to C's dtype, X0 = g and X1 = u. LOADED: ``x0`` (and ``x1``) are those tiles,
    already loaded."""
    W: tl.constexpr = acc.shape[1]
    offs_n = n0 + tl.arange(0, W)
    m = rmask[:, None] & (offs_n < N)[None, :]
    x_off = rows[:, None] * s_xr + offs_n[None, :] * s_xn
    c_off = rows[:, None] * s_cr + offs_n[None, :] * s_cn
    if not LOADED:
        x0 = _epi_load(x0_ptr, rows, rmask, n0, N, s_xr, s_xn, W)
        if EPI == 3:
            x1 = _epi_load(x1_ptr, rows, rmask, n0, N, s_xr, s_xn, W)
    if EPI == 2:
        z = x0.to(tl.float32)
        tl.store(c2_ptr + c_off, to_dtype(gelu_tanh(z), c2_ptr.dtype.element_ty), mask=m)
        tl.store(c_ptr + c_off, to_dtype(acc * gelu_tanh_grad(z), c_ptr.dtype.element_ty), mask=m)
    if EPI == 3:
        dh = to_dtype(acc, c_ptr.dtype.element_ty).to(tl.float32)
        h, dgate, dup = swiglu_grads(dh, x0.to(tl.float32), x1.to(tl.float32))
        if SAVE:
            tl.store(c3_ptr + x_off, to_dtype(h, c3_ptr.dtype.element_ty), mask=m)
        tl.store(c_ptr + c_off, to_dtype(dgate, c_ptr.dtype.element_ty), mask=m)
        tl.store(c2_ptr + c_off, to_dtype(dup, c2_ptr.dtype.element_ty), mask=m)


def _gmm(
    a,
    w,
    meta: Meta,
    *,
    transpose_w: bool,
    gather: bool = False,
    bias=None,
    epi: int = EPI_NONE,
    x0=None,
    x1=None,
    save: bool = True,
):
    """Grouped GEMM over the plan's expert groups.

    transpose_w=True (forward): C = A @ W[e]^T, W [E, N, Kdim]. False (dX): C = A @ W[e], W [E, Kdim, N].
    gather: A is [T, Kdim] and row r reads token ``sorted_flat[r] // K``. Returns C, [R, N] (rows of dropped
    pairs are zero), or for the epilogues a pair: EPI_GELU (h, z), EPI_GELU_BWD (dz, h), EPI_SWIGLU_BWD (dGU, h)
    with dGU = [dgate | dup] ([R, 2N]) from x0 = g, x1 = u. save=False: EPI_GELU (no backward follows: sampling)
    stores h alone and returns (h, None); EPI_SWIGLU_BWD (h kept from the forward) returns (dGU, None).
    """
    if not save and epi not in (EPI_GELU, EPI_SWIGLU_BWD):
        raise ValueError(f"save=False leaves out GELU's z or the SwiGLU backward's h; epilogue {epi} has neither")
    E = w.shape[0]
    if transpose_w:
        N, Kdim = w.shape[1], w.shape[2]
        s_bk, s_bn = w.stride(2), w.stride(1)
    else:
        Kdim, N = w.shape[1], w.shape[2]
        s_bk, s_bn = w.stride(1), w.stride(2)
    R = meta.R
    c3 = None
    if epi == EPI_SWIGLU_BWD:
        dgu = torch.empty(R, 2 * N, dtype=a.dtype, device=a.device)
        c, c2, c3 = dgu[:, :N], dgu[:, N:], torch.empty_like(x0) if save else None
        result = (dgu, c3)
    else:
        c = torch.empty(R, N, dtype=a.dtype, device=a.device)
        c2 = torch.empty_like(c) if epi != EPI_NONE and save else c  # c: unused
        result = (c, c2 if save else None) if epi != EPI_NONE else c
    if R == 0 or N == 0:
        return result
    kind = {EPI_NONE: "gmm" if transpose_w else "gmm_dx", EPI_SWIGLU_BWD: "swiglu_bwd"}.get(epi, "gmm_epi")
    cfg = common.config(kind, a.dtype)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    tab, nmb = meta.table(BM)
    upcast, prec = common.prec(a.dtype)
    dummy = c
    tma = cfg.get("TMA", 0)
    # dX tiles must not run into the next expert's rows
    tma_b, b_desc = common.descriptor(
        tma if transpose_w or Kdim % BK == 0 else 0, w, [BN, BK] if transpose_w else [BK, BN]
    )
    tma_a, a_desc = common.descriptor(0 if gather else tma, a, [BM, BK])
    n_tiles = nmb * common.cdiv(N, BN)
    persist = bool(cfg.get("PERSIST"))
    ws = bool(cfg.get("WS")) and persist and tma_a == 2 and tma_b == 2
    grid = (min(n_tiles, common.persistent_programs(a.device, cfg["PERSIST"])) if persist else n_tiles,)
    with common.device_descriptors(tma_a == 2 or tma_b == 2):
        _gmm_kernel[grid](
            a,
            meta.tok() if gather else dummy,
            w,
            a_desc,  # with pointer loads or descriptors made in the kernel: the tensor itself, unused
            b_desc,
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
            a.shape[0],
            a.stride(0),
            a.stride(1),
            w.stride(0),
            s_bk,
            s_bn,
            common.stride_or_zero(bias, 0),
            common.stride_or_zero(bias, 1),
            c.stride(0),
            c.stride(1),
            common.stride_or_zero(x0, 0),
            common.stride_or_zero(x0, 1),
            gather,
            bias is not None,
            epi,
            persist,
            tma_a,
            tma_b,
            transpose_w,
            upcast,
            prec,
            Kdim % BK == 0,
            BM,
            BN,
            BK,
            cfg["GROUP_M"],
            cfg.get("PRE", 0) if epi >= EPI_GELU_BWD and not ws else 0,  # WS: epilogue inputs after the K loop
            ws,
            save,
            **common.launch_opts(cfg),
        )
    return result
