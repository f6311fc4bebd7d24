"""What every Triton kernel module here shares: the tile config of a kernel kind on this device, launch options,
host-side arithmetic and tensor descriptors, and the device-side helpers for casting, MMA, tile order and a
grouped GEMM block's rows.

Host helpers are called through this module (``common.config(...)``) so that tools and tests can substitute them
in one place (``bench/inspect_kernels.py`` sets ``arch`` to the target it compiles for); ``@triton.jit`` helpers
are imported by name, as Triton resolves them."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # the allocator context variable (see device_descriptors)
from triton.tools.tensor_descriptor import TensorDescriptor

from ditmoe_kernels import tiles

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host; ``triton.cdiv`` is a constexpr function whose call costs microseconds per use."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), on the host (as ``cdiv``: not ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length()


def config(kind: str, dtype: torch.dtype) -> dict:
    """Tile configuration of one kernel kind (see ``tiles``) for this dtype and device, with any overrides."""
    table = table_name(dtype)
    return {**tiles.TABLES[table][kind], **tiles.override(kind, table)}


def table_name(dtype: torch.dtype) -> str:
    """The name of the tile table (``tiles.TABLES``) that launches on ``dtype`` tensors read on this device."""
    if INTERPRET:
        return "interpret"
    if dtype == torch.float32:
        return "fp32"
    return bf16_table(arch())


def bf16_table(cc: int) -> str:
    """The bf16/fp16 tiles of compute capability ``cc`` x 10: Hopper's on Hopper and datacenter Blackwell (227 KiB of
    shared memory per block, wgmma / tcgen05 MMAs); the pre-Hopper ones elsewhere, consumer Blackwell (sm_120)
    included: like Ada it has 99 KiB per block and mma.sync, and Hopper's down forward needs 104 KiB there."""
    return "bf16-sm90" if 90 <= cc < 120 else "bf16-sm80"


def arch() -> int:
    """Compute capability x 10 of the current CUDA device: it picks the bf16 tiles (``bf16_table``)."""
    return _device_arch(torch.cuda.current_device())


@functools.cache
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def launch_opts(cfg: dict) -> dict:
    """num_warps / num_stages / maxnreg of a config: launch options on the GPU, meaningless to the interpreter."""
    if INTERPRET:
        return {}
    return {k: cfg[k] for k in tiles.LAUNCH_OPTIONS if cfg.get(k) is not None}


def prec(dtype: torch.dtype):
    """(UPCAST, PREC) constexprs for ``mma``."""
    if INTERPRET:
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return False, None


def check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "ditmoe_kernels.triton_ops needs CUDA tensors, or TRITON_INTERPRET=1 set before Triton is imported to run "
            "on CPU through the interpreter; use the 'torch' backend (ditmoe_kernels.reference) on CPU"
        )


_EMULATE_RTNE = tl.constexpr(INTERPRET)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """Cast for stores. The 3.9 interpreter truncates fp32 -> bf16 (GPUs round to nearest even): there, round the
    fp32 bits to nearest even first so CPU tests see the GPU's numerics."""
    if _EMULATE_RTNE:  # noqa: SIM102 (constexpr branches)
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # exactly representable in bf16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b ([M, K] x [K, N]), fp32 accumulation. UPCAST (the interpreter, see ``prec``): in fp32, as a sum
    over k in order, so an output element's bits do not depend on the tile's width or height (the GPU tests ask the
    same of the MMA instructions). The interpreter's tl.dot calls numpy's BLAS, whose summation order changes with
    the matrix shape on some CPUs (OpenBLAS on AMD Zen 4), so tile options would differ in the last bit there."""
    if UPCAST:
        acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def grouped_order(pid, num_m, N, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) order: GROUP_M M-blocks share each N-tile sweep."""
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def group_block(tile, tab_ptr, NMB, num_m, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile ``tile`` of a grouped GEMM over the first ``num_m`` of the table's NMB M-blocks: group ``e``
    (-1: unused block, E: dropped rows), its first row and column, its row indices (int64) and N offsets, with
    their masks; read from the block table."""
    pid_m, pid_n = grouped_order(tile, num_m, N, BN, GROUP_M)
    e = tl.load(tab_ptr + pid_m)
    rs = tl.load(tab_ptr + NMB + pid_m)
    re = tl.load(tab_ptr + 2 * NMB + pid_m)
    rows = (rs + tl.arange(0, BM)).to(tl.int64)
    n0 = pid_n * BN
    offs_n = n0 + tl.arange(0, BN)
    return e, rs, n0, rows, rows < re, offs_n, offs_n < N


@triton.jit
def rows_read(tok_ptr, rows, rmask, GATHER: tl.constexpr):
    """The A rows a block reads: its own rows, or (GATHER) the tokens they were permuted from."""
    if GATHER:  # noqa: SIM108 (constexpr branches)
        read = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
    else:
        read = rows
    return read


def stride_or_zero(t, i):
    return t.stride(i) if t is not None else 0


def persistent_programs(device: torch.device, per_sm: int) -> int:
    """Programs of a persistent launch: ``per_sm`` per SM (3 under the interpreter, so tiles are shared out)."""
    if INTERPRET:
        return 3
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def tma_view(t: torch.Tensor, ndim: int) -> torch.Tensor | None:
    """``t`` with its leading dimensions merged down to ``ndim`` ([E, X, Y] -> [E*X, Y] for 2), as a TMA descriptor
    addresses it, or None where TMA cannot: dimensions that do not merge, a last stride other than 1, a base or
    other stride not 16-byte aligned, or no elements."""
    while t.dim() > ndim:
        if t.stride(0) != t.shape[1] * t.stride(1):
            return None
        t = t.flatten(0, 1)
    aligned = all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
    if t.numel() == 0 or t.stride(-1) != 1 or not aligned:
        return None
    return t


def tma_desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor | None:
    """A host-made TMA descriptor loading ``block`` tiles from ``tma_view(t, len(block))``, or None where TMA cannot
    address ``t``."""
    view = tma_view(t, len(block))
    return None if view is None else TensorDescriptor(view, list(view.shape), list(view.stride()), block)


def descriptor(mode: int, t: torch.Tensor, block: list[int]) -> tuple[int, object]:
    """How a kernel reads ``t`` in ``block`` tiles under the tile setting TMA = ``mode``, as (its TMA constexpr, the
    argument for its descriptor): (0, t) pointer loads (mode 0, or TMA cannot address ``t``); (1, a host-made
    descriptor), which Triton's launcher encodes on the host at every launch; (2, t) the kernel makes the
    descriptor itself from the tensor's pointer, shape and strides (``tl.make_tensor_descriptor``: no host
    encoding, a device-side scratch instead; launch inside ``device_descriptors()``)."""
    if mode == 1:
        desc = tma_desc(t, block)
        return (0, t) if desc is None else (1, desc)
    if mode == 2 and tma_view(t, len(block)) is not None:
        return 2, t
    return 0, t


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


class device_descriptors:  # noqa: N801 (used as a ``with`` block, like a context manager function)
    """Launches inside this block may make TMA descriptors on the device. Those need global scratch, which Triton
    asks for at launch from the allocator in a context variable (``triton.set_allocator``); autograd runs backward
    in threads that do not inherit the caller's. Here torch's caching allocator serves it; whatever allocator was
    set before is back after the block. ``used`` False (no descriptor made on the device): nothing is set."""

    def __init__(self, used: bool):
        self._used = used

    def __enter__(self):
        if self._used:
            self._token = _allocation._allocator.set(_scratch)

    def __exit__(self, *exc):
        if self._used:
            _allocation._allocator.reset(self._token)
