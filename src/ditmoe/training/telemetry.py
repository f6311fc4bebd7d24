"""Training performance telemetry: throughput, model FLOPs utilisation (MFU) and peak memory.

Expert load across ranks is gathered by ``RoutingAccumulator.all_reduce`` (``ditmoe.analysis.routing``).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator

import torch

# Dense (no 2:4 sparsity) peak tensor-core TFLOP/s per dtype; "fp32" is the plain (non-tensor-core) FP32 rate,
# "tf32" the TF32 tensor-core rate. Source: the vendors' datasheets (NVIDIA data-center datasheets: H100, H200,
# H100/H200 NVL, A100, L4, L40S, V100 SXM2, HGX B200 divided by its 8 GPUs; AWS's NVIDIA A10G datasheet; NVIDIA's
# Ada architecture whitepaper for the RTX 4090, FP16/BF16 with FP32 accumulation). Datasheets quote tensor rates
# with sparsity: the dense rate is half. A dtype missing from a row is not supported by that device's tensor cores.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1125.0, "fp32": 75.0},
}

# (pattern searched in torch.cuda.get_device_name, PEAK_TFLOPS key), most specific first; the first match wins.
# Word boundaries keep "L4" from matching "L40S" and "H200"/"B200" from matching "GH200"/"GB200" (other parts).
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bA100\b", "A100"),
    (r"\bA10G\b", "A10G"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
    (r"\bV100\b", "V100"),
    (r"\bRTX 4090\b", "RTX 4090"),
    (r"\bB200\b", "B200"),
)

_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def match_device(name: str) -> str | None:
    """The ``PEAK_TFLOPS`` key of a CUDA device name (case-insensitive), or None for an unknown device."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return key
    return None


def device_peak_flops(device: torch.device | str, dtype: str, override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s of one ``device`` for matmuls in ``dtype`` ("bf16", "fp16", "tf32", "fp32").

    ``override_tflops`` (TFLOP/s) wins; otherwise a CUDA device is looked up in ``PEAK_TFLOPS`` by name. None for
    an unknown device or dtype and for CPU, so MFU is simply not reported.
    """
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    key = match_device(torch.cuda.get_device_name(device))
    if key is None:
        return None
    tflops = PEAK_TFLOPS[key].get(_DTYPE_ALIASES.get(dtype, dtype))
    return None if tflops is None else tflops * 1e12


class Throughput:
    """Images and wall time of one log window on this rank: ``start()``, ``add(batch)`` per step, ``summary(...)``.

    Call ``summary`` after a host sync (e.g. ``loss.item()``) so the time includes the queued GPU work, then
    ``start()`` for the next window. Work that is not training (checkpoint writes) runs inside ``paused()`` and
    does not count. ``clock`` is injectable for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.start()

    def start(self) -> None:
        self._t0 = self._clock()
        self._images = 0
        self._paused_s = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside the block out of the window."""
        t = self._clock()
        try:
            yield
        finally:
            self._paused_s += self._clock() - t

    def add(self, images: int) -> None:
        """Images this rank trained on in one step (its local batch)."""
        self._images += images

    def summary(
        self,
        world_size: int,
        tokens_per_image: int,
        train_flops_per_image: float,
        peak_flops_per_device: float | None,
    ) -> dict:
        """Rates of the window so far; ``{}`` when it is empty.

        Every rank trains the same local batch in lockstep, so with r = local images / elapsed seconds:
          images/s (global)      = r x world_size
          tokens/s (global)      = images/s x tokens_per_image
          achieved FLOP/s/device = r x train_flops_per_image
          MFU                    = r x train_flops_per_image / peak_flops_per_device
        ``train_flops_per_image`` (``ModelSize.train_flops``: forward + backward = 3 x forward, 2 FLOPs per
        multiply-accumulate) counts activated FLOPs only: K routed experts per token, not all E. With expert
        parallelism a device computes other ranks' tokens in its experts, but the world's total is the same, so
        the per-device average holds.
        """
        elapsed = self._clock() - self._t0 - self._paused_s
        if self._images == 0 or elapsed <= 0:
            return {}
        local_images_per_s = self._images / elapsed
        images_per_s = local_images_per_s * world_size
        achieved_flops = local_images_per_s * train_flops_per_image
        out = {
            "perf/images_per_s": images_per_s,
            "perf/tokens_per_s": images_per_s * tokens_per_image,
            "perf/tflops_per_device": achieved_flops / 1e12,
        }
        if peak_flops_per_device:
            out["perf/mfu"] = achieved_flops / peak_flops_per_device
        return out


def peak_memory(device: torch.device | str) -> dict:
    """Peak memory so far, in GiB: CUDA allocator peaks on a CUDA device, the process's max RSS otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            "mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    import resource  # POSIX only

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_bytes = max_rss if sys.platform == "darwin" else max_rss * 1024
    return {"mem/peak_rss_gib": rss_bytes / 2**30}
