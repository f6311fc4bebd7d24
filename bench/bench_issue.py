"""The host's time to issue one MoE layer forward+backward of our Triton kernels, under several tile sets.

A small model's training step is paced by the host (bench_train's "host ms" equals its step time at S/2), and run 6
gave S/2 87 ms of host time per step under run 3's tiles against 96 ms under the tiles now. This times, per tile set,
the median time until the layer's forward and backward have queued their kernels ("issue ms", no synchronisation
inside) and until they finished ("done ms"), then profiles the issue of the tiles now with cProfile: where the host's
microseconds go (tensor descriptors, our wrappers, Triton's launcher, autograd).

    python bench/bench_issue.py                       # S (D=384, F=1536, 8 experts), 8192 tokens, top-2
    python bench/bench_issue.py --shape XL            # where the GPU sets the pace: done ms well above issue ms

On CPU the kernels run under the Triton interpreter (set TRITON_INTERPRET=1): that checks the script, not the host's
cost on a GPU. Prints a markdown table and writes nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from arguments import require_at_least  # bench/, the script's folder
from shapes import SHAPES  # bench/, the script's folder

from ditmoe_kernels import triton_ops as ops
from ditmoe_kernels.tiles import load_tiles

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--shape", default="S", choices=["S", "XL", "tiny"])
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--reps", type=int, default=50, help="timed runs per tile set (after 3 untimed), and profiled ones")
ap.add_argument(
    "--tiles",
    action="append",
    metavar="FILE",
    help="a tile file to time besides the built-in sets; repeatable (default: bench/tiles/run3-bf16.json, run 3's "
    "pointer-load tiles, and bench/tiles/ws-bf16.json, warp-specialized GEMMs)",
)
ap.add_argument("--no-kernel-descriptors", action="store_true", help="leave out the tile set with TMA = 2")
args = ap.parse_args()
require_at_least(ap, args, tokens=1, reps=1)
if args.tiles:
    TILE_FILES = {path: path for path in args.tiles}
else:  # bench/tiles/ beside this script, wherever it runs from
    TILES_DIR = Path(__file__).parent / "tiles"
    TILE_FILES = {f"bench/tiles/{name}": str(TILES_DIR / name) for name in ("run3-bf16.json", "ws-bf16.json")}
try:
    FILE_TILES = {label: load_tiles(path) for label, path in TILE_FILES.items()}
except ValueError as exc:
    ap.error(f"--tiles {exc}")

CUDA = torch.cuda.is_available()
if not CUDA and not os.environ.get("TRITON_INTERPRET"):
    sys.exit("bench_issue.py: no CUDA device; TRITON_INTERPRET=1 runs the script on CPU through the interpreter")
dev, dt = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
D, F, E = SHAPES[args.shape]
T, K = args.tokens, 2
gen = torch.Generator(device=dev).manual_seed(0)
x = torch.randn(T, D, device=dev, dtype=dt, generator=gen, requires_grad=True)
probs, experts_TK = torch.randn(T, E, device=dev, generator=gen).softmax(-1).topk(K, dim=-1)
probs = probs.to(dt).requires_grad_()
w_gu = (torch.randn(E, 2 * F, D, device=dev, dtype=dt, generator=gen) * D**-0.5).requires_grad_()
w_down = (torch.randn(E, D, F, device=dev, dtype=dt, generator=gen) * F**-0.5).requires_grad_()
grad_out = torch.randn(T, D, device=dev, dtype=dt, generator=gen)
params = [x, probs, w_gu, w_down]

TMA_KINDS = ("gmm", "gmm_dx", "swiglu", "swiglu_bwd")  # the kinds whose tiles now load through TMA
KERNEL_DESCRIPTORS = "tiles now, descriptors made in the kernels"
TILE_SETS = {
    "tiles now": {},
    **FILE_TILES,
    "tiles now, no TMA": {k: {"TMA": 0} for k in TMA_KINDS},
    KERNEL_DESCRIPTORS: {k: {"TMA": 2} for k in TMA_KINDS},
    "tiles now, gathered x": {"swiglu": {"GATHER": 1}},
    "tiles now, unfused SwiGLU backward": {"swiglu_bwd": {"FUSED": 0}},
}
if args.no_kernel_descriptors:
    del TILE_SETS[KERNEL_DESCRIPTORS]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def layer():
    out = ops.swiglu_experts(x, probs, ops.routing_plan(experts_TK, E), w_gu, w_down)
    return torch.autograd.grad(out, params, grad_out)


def time_layer() -> tuple[float, float]:
    """Median (issue ms, done ms) over --reps runs, after 3 that compile and warm up."""
    issue, done = [], []
    for i in range(3 + args.reps):
        sync()
        t0 = time.perf_counter()
        layer()
        t1 = time.perf_counter()
        sync()
        if i >= 3:
            issue.append(t1 - t0)
            done.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(issue), 1e3 * statistics.median(done)


print(f"{torch.cuda.get_device_name() if CUDA else 'CPU'}, {dt}, {args.shape} (D={D}, F={F}, E={E}), T={T}, top-{K}")
print("\n| tiles | issue ms | done ms |\n|---|---:|---:|")
for label, tiles in TILE_SETS.items():
    with ops.tile_overrides(**tiles):
        issue_ms, done_ms = time_layer()
    print(f"| {label} | {issue_ms:.3f} | {done_ms:.3f} |", flush=True)

# where the issue time of the tiles now goes: the functions that spend it themselves, and their callers' totals
prof = cProfile.Profile()
for _ in range(args.reps):
    sync()
    prof.enable()
    layer()
    prof.disable()
print(f"\ncProfile of {args.reps} issues under the tiles now (the kernels run in between, unprofiled):")
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
