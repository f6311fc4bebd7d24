"""SwiGLU experts' own kernels: the gate/up GEMM (one accumulator over the gate and up rows of the stacked weight,
h = silu(g) * u in its epilogue, g and u stored for the backward) and the elementwise SwiGLU backward that follows
a plain dH GEMM."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditmoe_kernels.triton_ops import common
from ditmoe_kernels.triton_ops.activations import sigmoid, swiglu_grads
from ditmoe_kernels.triton_ops.common import group_block, mma, rows_read, to_dtype
from ditmoe_kernels.triton_ops.routing import Meta


@triton.jit
def _gmm_swiglu_kernel(
    a_ptr,
    tok_ptr,
    w_ptr,
    a_desc,
    w_desc,
    tab_ptr,
    h_ptr,
    g_ptr,
    u_ptr,
    N,
    Kdim,
    NMB,
    NUM_E,
    RA,
    s_ar,
    s_ak,
    s_we,
    s_wn,
    s_wk,
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
    WS: tl.constexpr,
    SAVE: tl.constexpr,
):
    """[G | U] = A W_gu[e]^T for output columns n0..n0+BN of both halves of W_gu ([E, 2N, Kdim]: gate rows, then
    up rows) in one accumulator [BM, 2*BN]: each K step is one [BM, BK] x [BK, 2*BN] product, so on sm_90 one wgmma of
    width 2*BN (two products of width BN re-read A from shared memory for each and need its bandwidth at full rate). H =
    silu(G) * U. SAVE: G and U are stored (rounded to the output dtype) for backward; H is computed from the rounded
    values either way, so the backward can recompute it bit for bit. GATHER: x read through the permutation, else the
    permuted copy. TMA_A: A tiles through a descriptor over the permuted copy from the block's first row (as in
    ``gemm._mainloop``); TMA_B: the weight tile through one 3-D descriptor over W_gu as [E*2, N, Kdim], a [2, BN, BK]
    box (gate and up rows; rows past N read as zeros). PERSIST: programs loop over the used tiles, as in
    ``gemm._gmm_kernel``, so one tile's stores of H, G and U overlap the next tile's loads. TMA_A / TMA_B = 2: those
    descriptors are made here from the pointers (A as [RA, Kdim]), not passed in.

    WS (with PERSIST, both descriptors made here, 4 warps): the compiler splits the tile loop into a producer warp
    group that issues the TMA loads and two consumer warp groups of BM/2 rows each that run the products and the
    epilogue, with the register file shifted to the consumers. Its data partitioning (Triton 3.6) cannot reshape
    an accumulator, so this path keeps gate and up in two accumulators of BN columns, their weight tiles loaded
    apart through a 2-D descriptor over W_gu as [E*2N, Kdim]."""
    if TMA_A == 2:
        a_desc = tl.make_tensor_descriptor(a_ptr, [RA, Kdim], [s_ar, 1], [BM, BK])
    if TMA_B == 2:
        if WS:  # noqa: SIM108 (constexpr branches)
            w_desc = tl.make_tensor_descriptor(w_ptr, [2 * NUM_E * N, Kdim], [s_wn, 1], [BN, BK])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [2 * NUM_E, N, Kdim], [N * s_wn, s_wn, 1], [2, BN, BK])
    num_m = tl.load(tab_ptr + 3 * NMB) if PERSIST else NMB
    stop = num_m * tl.cdiv(N, BN) if PERSIST else tl.program_id(0) + 1
    step = tl.num_programs(0) if PERSIST else 1
    for tile in tl.range(tl.program_id(0), stop, step, flatten=PERSIST and not WS, warp_specialize=WS):
        # no early exits (see gemm._gmm_tile): an unused block masks every row, the dropped rows' block stores zeros
        e, rs, n0, rows, rmask, offs_n, nmask = group_block(tile, tab_ptr, NMB, num_m, N, BM, BN, GROUP_M)
        live = (e >= 0) & (e < NUM_E)
        k_len = Kdim if PERSIST else tl.where(live, Kdim, 0)  # PERSIST: one trip count for every tile
        e = tl.where(live, e, 0)
        cmask = rmask[:, None] & nmask[None, :]
        o = rows[:, None] * s_r + offs_n[None, :] * s_n
        offs_k = tl.arange(0, BK)
        # column j of the [BK, 2*BN] weight tile: gate row n0 + j for j < BN, up row N + n0 + j - BN after
        offs_j = tl.arange(0, 2 * BN)
        col = n0 + offs_j % BN
        jmask = col < N
        a_ptrs = a_ptr + rows_read(tok_ptr, rows, rmask, GATHER)[:, None] * s_ar + offs_k[None, :] * s_ak
        w_ptrs = w_ptr + e.to(tl.int64) * s_we + (col + (offs_j // BN) * N)[None, :] * s_wn + offs_k[:, None] * s_wk
        if WS:
            acc_g = tl.zeros([BM, BN], tl.float32)
            acc_u = tl.zeros([BM, BN], tl.float32)
            w_row = 2 * N * e + n0  # gate rows of the tile; its up rows are N further
            for k0 in range(0, k_len, BK):
                a = a_desc.load([rs, k0])
                acc_g = mma(a, tl.trans(w_desc.load([w_row, k0])), acc_g, UPCAST, PREC)
                acc_u = mma(a, tl.trans(w_desc.load([w_row + N, k0])), acc_u, UPCAST, PREC)
        else:
            acc = tl.zeros([BM, 2 * BN], tl.float32)
            for k0 in range(0, k_len, BK):
                km = offs_k < Kdim - k0
                if TMA_A:
                    a = a_desc.load([rs, k0])
                elif EVEN_K:
                    a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
                if TMA_B:
                    w = tl.trans(tl.reshape(w_desc.load([2 * e, n0, k0]), (2 * BN, BK)))
                elif EVEN_K:
                    w = tl.load(w_ptrs, mask=jmask[None, :], other=0.0)
                else:
                    w = tl.load(w_ptrs, mask=km[:, None] & jmask[None, :], other=0.0)
                acc = mma(a, w, acc, UPCAST, PREC)
                a_ptrs += BK * s_ak
                w_ptrs += BK * s_wk
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN)), (0, 2, 1)))
        if PERSIST:  # the dropped rows' products are discarded
            acc_g = tl.where(live, acc_g, 0.0)
            acc_u = tl.where(live, acc_u, 0.0)
        g = to_dtype(acc_g, h_ptr.dtype.element_ty)
        u = to_dtype(acc_u, h_ptr.dtype.element_ty)
        if SAVE:
            tl.store(g_ptr + o, g, mask=cmask)
            tl.store(u_ptr + o, u, mask=cmask)
        gf = g.to(tl.float32)
        h = to_dtype(gf * sigmoid(gf) * u.to(tl.float32), h_ptr.dtype.element_ty)
        tl.store(h_ptr + o, h, mask=cmask)


@triton.jit
def _swiglu_bwd_kernel(
    dh_ptr, g_ptr, u_ptr, dgu_ptr, h_ptr, R, F, s_r, s_gur, BR: tl.constexpr, BC: tl.constexpr, SAVE: tl.constexpr
):
    """Elementwise SwiGLU backward on [BR, BC] tiles: with dH, gate and up pre-activations ([R, F], row stride
    s_r), dgate = dH * u * silu'(g) into columns [0, F) of dGU ([R, 2F], row stride s_gur), dup = dH * silu(g)
    into columns [F, 2F), and (SAVE) h = silu(g) * u (fp32 math)."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    m = (r < R)[:, None] & (c < F)[None, :]
    off = r[:, None] * s_r + c[None, :]
    dh = tl.load(dh_ptr + off, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=m, other=0.0).to(tl.float32)
    h, dgate, dup = swiglu_grads(dh, g, u)
    if SAVE:
        tl.store(h_ptr + off, to_dtype(h, h_ptr.dtype.element_ty), mask=m)
    gu_off = r[:, None] * s_gur + c[None, :]
    tl.store(dgu_ptr + gu_off, to_dtype(dgate, dgu_ptr.dtype.element_ty), mask=m)
    tl.store(dgu_ptr + gu_off + F, to_dtype(dup, dgu_ptr.dtype.element_ty), mask=m)


def _swiglu_bwd(dh, g, u, save: bool = True):
    """(dGU [R, 2F] = [dgate | dup], h [R, F]) from dH = dy W_down and the saved pre-activations ([R, F] each):
    one elementwise pass after the plain dH GEMM. Rows of dropped pairs have dH = g = u = 0 and come out zero.
    save=False (h kept from the forward): h is not written, and None comes back in its place."""
    dh, g, u = dh.contiguous(), g.contiguous(), u.contiguous()
    R, F = dh.shape
    dgu = torch.empty(R, 2 * F, dtype=dh.dtype, device=dh.device)
    h = torch.empty_like(dh) if save else None
    if dh.numel():
        cfg = common.config("ew", dh.dtype)
        grid = (common.cdiv(R, cfg["BR"]), common.cdiv(F, cfg["BC"]))
        _swiglu_bwd_kernel[grid](
            dh, g, u, dgu, h if save else dgu, R, F, F, 2 * F, cfg["BR"], cfg["BC"], save, **common.launch_opts(cfg)
        )
    return dgu, h


def _gmm_swiglu(a, w_gate_up, meta: Meta, *, gather: bool, save: bool = True):
    """h, g, u [R, F] with [g | u] = A @ W_gu[e]^T per expert (W_gu [E, 2F, D]: gate rows, then up rows) and
    h = silu(g) * u. gather: A is x [T, D], row r reads token ``sorted_flat[r] // K``; else A is the permuted copy
    [R, D]. save=False (no backward to follow: sampling) writes h alone, a third of the epilogue's stores, and
    returns None for g and u."""
    E, N2, Kdim = w_gate_up.shape
    N = N2 // 2
    R = meta.R
    h = torch.empty(R, N, dtype=a.dtype, device=a.device)
    g, u = (torch.empty_like(h), torch.empty_like(h)) if save else (None, None)
    if R == 0 or N == 0:
        return h, g, u
    cfg = common.config("swiglu", a.dtype)
    BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
    tab, nmb = meta.table(BM)
    upcast, prec = common.prec(a.dtype)
    n_tiles = nmb * common.cdiv(N, BN)
    persist = bool(cfg.get("PERSIST"))
    tma_a, a_desc = common.descriptor(0 if gather else cfg.get("TMA", 0), a, [BM, BK])
    ws = bool(cfg.get("WS")) and persist and tma_a == 2  # gate and up tiles apart: W_gu as [E*2N, Kdim]
    w_view, w_block = (w_gate_up, [BN, BK]) if ws else (w_gate_up.unflatten(1, (2, N)), [2, BN, BK])
    tma_b, w_desc = common.descriptor(cfg.get("TMA", 0), w_view, w_block)
    ws = ws and tma_b == 2
    grid = (min(n_tiles, common.persistent_programs(a.device, cfg["PERSIST"])) if persist else n_tiles,)
    with common.device_descriptors(tma_a == 2 or tma_b == 2):
        _gmm_swiglu_kernel[grid](
            a,
            meta.tok() if gather else h,
            w_gate_up,
            a_desc,
            w_desc,
            tab,
            h,
            g if save else h,  # unused without save
            u if save else h,
            N,
            Kdim,
            nmb,
            E,
            a.shape[0],
            a.stride(0),
            a.stride(1),
            w_gate_up.stride(0),
            w_gate_up.stride(1),
            w_gate_up.stride(2),
            h.stride(0),
            h.stride(1),
            gather,
            persist,
            tma_a,
            tma_b,
            upcast,
            prec,
            Kdim % BK == 0,
            BM,
            BN,
            BK,
            cfg["GROUP_M"],
            ws,
            save,
            **common.launch_opts(cfg),
        )
    return h, g, u
