"""Permute (rows into expert-sorted order, one copy per choice) and combine (each token's K rows, weighted, fp32
accumulation, no atomics): each other's backward; the combine's backward also yields the routing-weight gradient."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditmoe_kernels import tiles
from ditmoe_kernels.triton_ops import common
from ditmoe_kernels.triton_ops.common import to_dtype
from ditmoe_kernels.triton_ops.routing import Meta


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
                to_dtype(xf * w[:, None], out_ptr.dtype.element_ty),
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
    tl.store(out_ptr + t[:, None] * s_ot + d[None, :] * s_od, to_dtype(acc, out_ptr.dtype.element_ty), mask=m)


def _rows_cfg(dtype, D):
    cfg = common.config("rows", dtype)
    if "BD" not in tiles.override("rows", common.table_name(dtype)):
        cfg["BD"] = min(cfg["BD"], common.pow2(max(D, 16)))
    return cfg


def _scatter(x_TD, meta: Meta, w_TK=None, y_RD=None):
    """Permute rows (forward of permute / backward of unpermute when ``w_TK`` is given: also returns dw fp32)."""
    T, D = x_TD.shape
    K = meta.K
    out = torch.empty(meta.R, D, dtype=x_TD.dtype, device=x_TD.device)
    has_w = w_TK is not None
    cfg = _rows_cfg(x_TD.dtype, D)
    grid = (common.cdiv(T, cfg["BT"]), common.cdiv(D, cfg["BD"]))
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
            **common.launch_opts(cfg),
        )
    if not has_w:
        return out
    dw = dwp.sum(-1) if D > 0 else torch.zeros(T, K, dtype=torch.float32, device=x_TD.device)
    return out, dw


def _gather(y_RD, meta: Meta, w_TK=None):
    """Combine each token's K rows (weighted when ``w_TK`` is given): forward of unpermute / backward of permute."""
    D = y_RD.shape[1]
    T, K = meta.T, meta.K
    out = torch.empty(T, D, dtype=y_RD.dtype, device=y_RD.device)
    has_w = w_TK is not None
    w_arg = w_TK if has_w else out
    cfg = _rows_cfg(y_RD.dtype, D)
    if T > 0 and D > 0:
        grid = (common.cdiv(T, cfg["BT"]), common.cdiv(D, cfg["BD"]))
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
            **common.launch_opts(cfg),
        )
    return out
