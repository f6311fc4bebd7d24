"""Benchmark the MoE dispatch kernels against dense cuBLAS, copy bandwidth and the other MoE implementations.

    python bench/bench_kernels.py                      # CUDA: S, XL, G and XL with one expert at 2x load
    python bench/bench_kernels.py --sweep              # also time bench/sweep_candidates.py at XL (prints the best)
    python bench/bench_kernels.py --sweep --sweep-shapes XL,G --sweep-kinds dw   # dW tiles at XL and at G
    python bench/bench_kernels.py --shapes XL --sweep --sweep-kinds gmm_dx,dw,ew   # backward kinds only
    python bench/bench_kernels.py --shapes XL --sweep --write-tiles tiles.json   # tune: ditmoe train --kernel-tiles
    TRITON_INTERPRET=1 python bench/bench_kernels.py   # CPU: tiny shapes, interpreter (correctness, not speed)

Peers: our torch reference, the official per-expert loop, torch._grouped_mm (sm90+), megatron-core's permute and
unpermute (and its layer around torch._grouped_mm), DeepSpeed AutoEP's Triton grouped GEMM, fused weighted restore
and whole local layer (with that GEMM, and with torch._grouped_mm as AutoEP runs on sm90; ``ditmoe_kernels.peers``),
DeepSpeed's CUTLASS MoE GEMM where prebuilt.

Every shape: 8192 tokens (32 images x 256 tokens), top-2, bf16 on CUDA. Timings: CUDA events, warmup, L2 flushed
between repetitions, median. Writes bench/results/<device-slug>-<YYYY-MM-DD>.json and prints a markdown table.

FLOP arithmetic (R = tokens * top_k permuted rows, D model width, F expert width; one GEMM of M x K by K x N is
2*M*N*K FLOPs):
    gate/up forward   two GEMMs [R, D] x [D, F]                 4 R D F
    down forward      [R, F] x [F, D]                           2 R D F
    down dX (dH)      [R, D] x [D, F]                           2 R D F   (+ the SwiGLU backward, which also
                                                                          re-makes h: a pass, or dH's epilogue)
    gate/up dX        [R, F] x [F, D] twice (summed)            4 R D F
    down dW           per expert [D, R_e] x [R_e, F]            2 R D F
    gate/up dW        per expert [2F, R_e] x [R_e, D]           4 R D F   (one K-reduction over [dgate | dup];
                                                                          ours permutes x first where the layer
                                                                          does: under gather-fused tiles)
    layer             forward 6 R D F, backward 12 R D F
The dense baseline of each grouped GEMM is one torch.mm with the same M, N, K (same FLOPs) timed in the same run.
Bytes: permute reads T*D and writes R*D elements; unpermute reads R*D and writes T*D (index and weight traffic is
not counted); unpermute backward reads T*D and R*D (the forward output, for dprobs) and writes R*D; the copy baseline
is a device-to-device copy of R*D elements (read + write).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from arguments import require_at_least  # bench/, the script's folder

from ditmoe_kernels.tiles import load_tiles

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument(
    "--shapes",
    default="S,XL,G,XL-skew",
    help="comma list of S, XL, G, tiny and their -skew variants (XL-skew: one expert at 2x load); on CPU tiny, and "
    "S if listed, scaled down",
)
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--top-k", type=int, default=2)
ap.add_argument("--reps", type=int, help="timed repetitions per measurement (default: 20 on CUDA, 3 on CPU)")
ap.add_argument("--warmup", type=int, help="untimed runs before them (default: 3 on CUDA, 1 on CPU)")
ap.add_argument("--sweep", action="store_true", help="try a few tile configs per kernel kind (at --sweep-shapes)")
ap.add_argument("--sweep-shapes", default="XL", help="comma list of shapes (S, XL, G) the sweep runs at")
ap.add_argument(
    "--sweep-kinds",
    default="swiglu,swiglu_bwd,gmm_dx,dw,gmm,ew,rows,gmm_epi",
    help="comma list of kinds for --sweep (backward: swiglu_bwd gmm_dx dw ew; GELU experts: gmm_epi)",
)
ap.add_argument(
    "--compare-tiles",
    action="append",
    default=[],
    metavar="FILE",
    help="a JSON file of tile overrides {kind: {key: value}}: each shape's layer is also timed under them, e.g. "
    "bench/tiles/run3-bf16.json (at --shapes tiny the layer time is mostly host overhead); repeatable",
)
ap.add_argument(
    "--layer-rounds",
    type=int,
    help="interleaved rounds of the layer timed under the tiles in use and under each other tile set (sweep "
    "winners, --compare-tiles), compared round by round (default: 3 on CUDA, 1 on CPU)",
)
ap.add_argument(
    "--write-tiles",
    metavar="FILE",
    help="with --sweep at one --sweep-shapes shape: write the tiles that made the whole layer fastest there (JSON, "
    "with the table they were tuned over; no kinds when the built-in tables won), for `ditmoe train --kernel-tiles`",
)
ap.add_argument(
    "--no-kernel-descriptors",
    action="store_true",
    help="leave out the sweep candidates whose kernels make their own TMA descriptors (TMA = 2, all the "
    "warp-specialized ones among them; gpu_final.sh passes it when their tests failed)",
)
ap.add_argument("--budget", type=float, default=300.0, help="seconds; later sections are skipped past it")
ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
ap.add_argument("--try-deepspeed-build", action="store_true", help="JIT-build DeepSpeed's CUTLASS MoE GEMM (slow)")
args = ap.parse_args()
try:
    COMPARE_TILES = {path: load_tiles(path) for path in args.compare_tiles}
except ValueError as exc:
    ap.error(f"--compare-tiles {exc}")
require_at_least(ap, args, tokens=1, top_k=1, reps=1, warmup=0, layer_rounds=1)

T0 = time.time()
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPE = torch.bfloat16 if CUDA else torch.float32

from shapes import SHAPES  # noqa: E402  (bench/, the script's folder)
from sweep_candidates import SWEEP, adopted, candidate  # noqa: E402

REPS = args.reps or (20 if CUDA else 3)
WARMUP = (3 if CUDA else 1) if args.warmup is None else args.warmup
SHAPE_NAMES = [s.strip() for s in args.shapes.split(",") if s.strip()]
KNOWN_SHAPES = [*SHAPES, *(f"{s}-skew" for s in SHAPES)]
if not set(SHAPE_NAMES) <= set(KNOWN_SHAPES):
    ap.error(f"--shapes: unknown {sorted(set(SHAPE_NAMES) - set(KNOWN_SHAPES))} (known: {', '.join(KNOWN_SHAPES)})")
SWEEP_SHAPES = [s.strip() for s in args.sweep_shapes.split(",") if s.strip()]
if not set(SWEEP_SHAPES) <= SHAPES.keys():
    ap.error(f"--sweep-shapes: unknown {sorted(set(SWEEP_SHAPES) - SHAPES.keys())} (known: {', '.join(SHAPES)})")
for name in SHAPE_NAMES + (SWEEP_SHAPES if args.sweep else []):
    if args.top_k > (experts := SHAPES[name.removesuffix("-skew")][2]):
        ap.error(f"--top-k {args.top_k} is more than the {experts} experts of {name}")
if args.budget <= 0:
    ap.error(f"--budget must be more than 0 seconds, got {args.budget}")
SWEEP_KINDS = [k.strip() for k in args.sweep_kinds.split(",") if k.strip()]
if not set(SWEEP_KINDS) <= SWEEP.keys():
    ap.error(f"--sweep-kinds: unknown {sorted(set(SWEEP_KINDS) - SWEEP.keys())} (known: {', '.join(SWEEP)})")
if args.write_tiles:
    if not args.sweep:
        ap.error("--write-tiles needs --sweep: the tiles it writes are the sweep's")
    if len(SWEEP_SHAPES) != 1:
        ap.error(f"--write-tiles: a tile file is tuned at one shape; --sweep-shapes gives {args.sweep_shapes!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.write_tiles))):
        ap.error(f"--write-tiles {args.write_tiles!r}: its folder does not exist")

rows: list[dict] = []
skipped: list[str] = []


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def skip(what: str, why: str) -> None:
    msg = f"{what}: {why}"
    if msg not in skipped:
        skipped.append(msg)
        log(f"skipped {msg}")


def over_budget(reserve: float = 0.0) -> bool:
    """Past the --budget, or within ``reserve`` seconds of it."""
    return time.time() - T0 > args.budget - reserve


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------

_flush = torch.empty(256 * 2**20 // 4, dtype=torch.float32, device=DEV) if CUDA else None


def _gpu_pad(issue_s: float) -> None:
    """Keep the GPU busy before the start event, so the host has queued fn's launches when the timed region starts:
    0.5 ms, or 1.5x the host's time to queue fn (``issue_s``; at most 50 ms). Without it the events also time the
    host's launch latency: tens of microseconds for a kernel (the ~20 us permute / unpermute / routing numbers of
    the H200 run 2 came out twice those of run 1 with identical kernels), and for a whole layer at S, whose host
    issues its kernels in ~1.9 ms (bench_issue.py), the host's pace: run 6 timed the same tiles there at 1.57 and
    2.36 ms. Host cost per tile set is bench_issue.py's to measure; these rows time the GPU."""
    if _sleep is not None:
        _sleep(int(2_000_000 * min(50.0, max(0.5, 1.5e3 * issue_s))))  # ~2e6 cycles per ms (H100/H200 clocks)


_sleep = getattr(torch.cuda, "_sleep", None) if CUDA else None


def bench(fn, reps=None) -> float:
    """Median milliseconds of fn()."""
    reps = reps or REPS
    for _ in range(WARMUP):
        fn()
    if not CUDA:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    issue_s = time.perf_counter() - t  # fn's launches queued (all of fn, where it waits for the GPU)
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        _flush.zero_()  # evict L2 so every repetition reads from HBM
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _gpu_pad(issue_s)
        s.record()
        fn()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def record(shape, op, impl, ms, flops=None, nbytes=None, base_ms=None, base_name="", note="", epilogue_ms=None):
    """One result row. ``epilogue_ms``: what a kernel's traffic beyond the plain dense GEMM's (SwiGLU inputs and
    outputs, a permuted copy, a grouped dW's other experts' gradients) takes at this run's copy bandwidth; the row
    then also compares against the baseline plus that time, the bound of doing the extra work without overlapping it
    with the GEMM."""
    r = {"shape": shape, "op": op, "impl": impl, "ms": round(ms, 4)}
    if flops:
        r["tflops"] = round(flops / ms / 1e9, 1)
    if nbytes:
        r["gbps"] = round(nbytes / ms / 1e6, 1)
    if base_ms:
        r["vs_baseline"] = round(base_ms / ms, 6)  # >1: faster than the baseline (same work); judged unrounded
        r["baseline"] = base_name
        if epilogue_ms:
            r["vs_baseline_plus_epilogue"] = round((base_ms + epilogue_ms) / ms, 3)
    if note:
        r["note"] = note
    rows.append(r)
    extra = f" {r.get('tflops', '')} TFLOP/s" if flops else (f" {r.get('gbps', '')} GB/s" if nbytes else "")
    log(f"{shape:8s} {op:18s} {impl:28s} {ms:9.4f} ms{extra}")
    return r


def reason(exc: Exception) -> str:
    """An exception in one line, for the skipped list: its type and the first line of its message."""
    first = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def attempt(shape, op, impl, fn, **kw):
    """Time fn and record it; failures are reported as skipped with their reason."""
    try:
        return record(shape, op, impl, bench(fn), **kw)
    except Exception as exc:
        skip(f"{shape} {op} {impl}", reason(exc))
        return None


def overlap_rows(shape: str, gemm, memory_pass) -> None:
    """Time the down dW GEMM (compute-bound) and the SwiGLU backward pass (memory-bound, independent of it once h
    is at hand) one after the other on one stream, then side by side on two: whether a pass's traffic hides under
    a GEMM's when their blocks share the SMs. The fused dH + pass hides none of it (run 6: fused = dH + pass to
    the microsecond); if two streams save most of the pass's time, a backward that keeps the forward's h (one R x F
    tensor more per layer) can run the pass beside down dW."""
    side = torch.cuda.Stream()

    def one_stream():
        gemm()
        memory_pass()

    def two_streams():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            memory_pass()
        gemm()
        main.wait_stream(side)

    one = attempt(shape, "down dW + swiglu pass", "one stream", one_stream)
    two = attempt(shape, "down dW + swiglu pass", "two streams", two_streams)
    if one and two:
        log(f"{shape:8s} two streams save {one['ms'] - two['ms']:.4f} ms of the pair")


# ---------------------------------------------------------------------------------------------------------------
# implementations under test
# ---------------------------------------------------------------------------------------------------------------

from bar import SKEW_BAR, judged, layer_speedups, ratio_text, skew_slowdowns  # noqa: E402  (bench/, the script's folder)

from ditmoe_kernels import peers  # noqa: E402
from ditmoe_kernels import reference as ref  # noqa: E402

ops = None
if CUDA or INTERPRET:
    try:
        from ditmoe_kernels import triton_ops as ops
    except Exception as exc:
        skip("triton kernels", f"import failed: {exc}")
else:
    skip("triton kernels", "no CUDA device and TRITON_INTERPRET is not set")
TABLE = ops.common.table_name(DTYPE) if ops is not None else None  # the tile table our launches read here

try:
    import megatron.core.transformer.moe.moe_utils  # noqa: F401  (the peer rows call it through kernels/peers.py)

    HAS_MCORE = True
except Exception as exc:
    HAS_MCORE = False
    skip("megatron-core permute/unpermute", f"import failed: {type(exc).__name__}: {exc}")

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
if not HAS_GROUPED_MM:
    skip("torch._grouped_mm", "not in this torch")
elif CUDA and torch.cuda.get_device_capability() < (9, 0):
    skip("torch._grouped_mm", "needs sm90+")
    HAS_GROUPED_MM = False

ds_triton = None  # DeepSpeed AutoEP's Triton ops (kernels/peers.py)
if CUDA or INTERPRET:
    try:
        ds_triton = peers.deepspeed_triton()
    except Exception as exc:
        skip("deepspeed AutoEP Triton ops", reason(exc))
else:
    skip("deepspeed AutoEP Triton ops", "no CUDA device and TRITON_INTERPRET is not set")

ds_moe_gemm = None
if CUDA:
    try:
        import deepspeed.git_version_info as ds_info

        prebuilt = ds_info.installed_ops.get("cutlass_ops", False)
        if prebuilt or args.try_deepspeed_build:
            from deepspeed.inference.v2.inference_utils import ActivationType, DtypeEnum
            from deepspeed.inference.v2.kernels.cutlass_ops import MoEGEMM

            ds_moe_gemm = MoEGEMM(DtypeEnum.bf16, ActivationType.IDENTITY)
        else:
            skip("deepspeed MoEGEMM", "cutlass_ops not prebuilt (JIT build takes minutes: --try-deepspeed-build)")
    except Exception as exc:
        skip("deepspeed MoEGEMM", reason(exc))
else:
    skip("deepspeed MoEGEMM", "CUDA only")


def first_gemm(x_TD, W, meta, kind, save=True, **kw):
    """The expert layer's first GEMM as the layer runs it: gather-fused, or x permuted first (tile key GATHER = 0,
    the permute then counts here; in the layer the backward reuses the copy). save=False: as sampling runs it,
    without storing the pre-activations for a backward."""
    a, gather = ops._expert_input(x_TD, meta, kind)
    if kind == "swiglu":
        return ops._gmm_swiglu(a, W, meta, gather=gather, save=save)
    return ops._gmm(a, W, meta, transpose_w=True, gather=gather, save=save, **kw)


def naive_layer(x_TD, experts_TK, w_TK, Wgu, Wd):
    """The official DiT-MoE algorithm: repeat each token k times, loop over experts with boolean masks."""
    T, D = x_TD.shape
    K = experts_TK.shape[1]
    Wg, Wu = Wgu.chunk(2, dim=1)  # the official experts' separate gate and up weights
    xr = x_TD.repeat_interleave(K, dim=0)
    flat = experts_TK.reshape(-1)
    y = torch.empty_like(xr)
    for e in range(Wg.shape[0]):
        m = flat == e
        xe = xr[m]
        y[m] = (F.silu(xe @ Wg[e].t()) * (xe @ Wu[e].t())) @ Wd[e].t()
    return (y.view(T, K, D) * w_TK.unsqueeze(-1)).sum(1)


# ---------------------------------------------------------------------------------------------------------------
# one shape
# ---------------------------------------------------------------------------------------------------------------


def make_routing(T, K, E, skew: bool, gen):
    """Exact per-expert loads: balanced (T*K/E each) or expert 0 at twice the average; K distinct experts/token."""
    R = T * K
    if skew:
        c0 = 2 * R // E
        counts = [c0] + [(R - c0) // (E - 1)] * (E - 1)
    else:
        counts = [R // E] * E
    counts[-1] += R - sum(counts)
    ids = torch.repeat_interleave(torch.arange(E), torch.tensor(counts))  # sorted by expert
    assert max(counts) <= R // K, "an expert cannot take more than one choice per token"
    ex = ids.view(K, T).t().contiguous()  # token t gets ids[t], ids[t + T], ... (distinct: counts <= T)
    ex = ex[torch.randperm(T, generator=gen)]
    return ex


def run_shape(name: str):
    base = name.split("-")[0]
    D, F_, E = SHAPES[base]
    skew = name.endswith("skew")
    T, K = (args.tokens, args.top_k) if CUDA else (256, args.top_k)
    if not CUDA and base != "tiny":
        D, F_ = min(D, 128), min(F_, 256)  # CPU: keep it quick
    if INTERPRET and not CUDA:
        T, D, F_ = 64, 32, 64
    R = T * K
    shape = f"{name}" if CUDA else f"{name}(cpu T={T} D={D} F={F_})"
    gen = torch.Generator().manual_seed(0)
    dt = DTYPE
    experts_TK = make_routing(T, K, E, skew, gen).to(DEV)
    probs = torch.rand(T, K, generator=gen).to(DEV, dt)
    x = (torch.randn(T, D, generator=gen)).to(DEV, dt)
    Wgu = (torch.randn(E, 2 * F_, D, generator=gen) * D**-0.5).to(DEV, dt)  # gate rows, then up rows
    Wd = (torch.randn(E, D, F_, generator=gen) * F_**-0.5).to(DEV, dt)
    el = x.element_size()
    log(f"== {shape}: T={T} K={K} E={E} D={D} F={F_} R={R} {dt}")

    # baselines measured in this run
    a_RD = torch.randn(R, D, device=DEV, dtype=dt)
    a_RF = torch.randn(R, F_, device=DEV, dtype=dt)
    w_D2F = torch.randn(D, 2 * F_, device=DEV, dtype=dt)
    w_FD = torch.randn(F_, D, device=DEV, dtype=dt)
    w_2FD = torch.randn(2 * F_, D, device=DEV, dtype=dt)
    w_DF = torch.randn(D, F_, device=DEV, dtype=dt)
    a_R2F = torch.randn(R, 2 * F_, device=DEV, dtype=dt)
    dense = {
        "gate/up fwd": record(shape, "gate/up fwd", "dense torch.mm", bench(lambda: a_RD @ w_D2F), 4 * R * D * F_),
        "down fwd": record(shape, "down fwd", "dense torch.mm", bench(lambda: a_RF @ w_FD), 2 * R * D * F_),
        "down dX": record(shape, "down dX", "dense torch.mm", bench(lambda: a_RD @ w_DF), 2 * R * D * F_),
        "gate/up dX": record(shape, "gate/up dX", "dense torch.mm", bench(lambda: a_R2F @ w_2FD), 4 * R * D * F_),
        "down dW": record(shape, "down dW", "dense torch.mm", bench(lambda: a_RD.t() @ a_RF), 2 * R * D * F_),
        "gate/up dW": record(shape, "gate/up dW", "dense torch.mm", bench(lambda: a_R2F.t() @ a_RD), 4 * R * D * F_),
    }
    dst = torch.empty_like(a_RD)
    copy = record(shape, "copy", "d2d copy (R*D)", bench(lambda: dst.copy_(a_RD)), nbytes=2 * R * D * el)
    copy_gbps = copy["gbps"]
    flops = {
        "gate/up fwd": 4 * R * D * F_,
        "down fwd": 2 * R * D * F_,
        "down dX": 2 * R * D * F_,
        "gate/up dX": 4 * R * D * F_,
        "down dW": 2 * R * D * F_,
        "gate/up dW": 4 * R * D * F_,
    }
    perm_bytes = (T * D + R * D) * el

    def vs_dense(op):
        return dict(flops=flops[op], base_ms=dense[op]["ms"], base_name="dense torch.mm")

    def vs_copy():
        return dict(nbytes=perm_bytes, base_ms=perm_bytes / (copy_gbps * 1e6), base_name="d2d copy GB/s")

    # reference path (torch)
    plan_ref = ref.routing_plan(experts_TK, E)
    attempt(shape, "routing", "reference", lambda: ref.routing_plan(experts_TK, E))
    attempt(shape, "permute", "reference", lambda: ref.permute(x, plan_ref), **vs_copy())
    xp = ref.permute(x, plan_ref)
    attempt(
        shape,
        "gate/up fwd",
        "reference",
        lambda: ref.grouped_mm(xp, Wgu, plan_ref),
        **vs_dense("gate/up fwd"),
    )
    g_ref, u_ref = ref.grouped_mm(xp, Wgu, plan_ref).chunk(2, dim=1)
    h_ref = F.silu(g_ref) * u_ref
    del g_ref, u_ref
    attempt(shape, "down fwd", "reference", lambda: ref.grouped_mm(h_ref, Wd, plan_ref), **vs_dense("down fwd"))
    y_ref = ref.grouped_mm(h_ref, Wd, plan_ref)
    attempt(shape, "unpermute", "reference", lambda: ref.unpermute(y_ref, probs, plan_ref), **vs_copy())

    # ours
    if ops is not None:
        try:
            plan = ops.routing_plan(experts_TK, E)
            meta = ops.plan_meta(plan)
            attempt(shape, "routing", "triton", lambda: ops.routing_plan(experts_TK, E))
            attempt(shape, "permute", "triton", lambda: ops._scatter(x, meta), **vs_copy())
            h, g, u = first_gemm(x, Wgu, meta, "swiglu")
            gathered = ops.common.config("swiglu", DTYPE).get("GATHER", 1)
            # beyond the dense [R, 2F] output: h (R x F), and without the gather the permuted copy of x
            epilogue_bytes = R * F_ * el + (0 if gathered else perm_bytes)
            attempt(
                shape,
                "gate/up fwd",
                f"triton ({'gather' if gathered else 'permute first'}+swiglu)",
                lambda: first_gemm(x, Wgu, meta, "swiglu"),
                epilogue_ms=epilogue_bytes / (copy_gbps * 1e6),
                **vs_dense("gate/up fwd"),
            )
            # sampling: h alone (R x F where the dense GEMM writes R x 2F); not an op of the bar, which is training's
            attempt(
                shape,
                "gate/up fwd (no grad)",
                f"triton ({'gather' if gathered else 'permute first'}+swiglu, h only)",
                lambda: first_gemm(x, Wgu, meta, "swiglu", save=False),
                **vs_dense("gate/up fwd"),
            )
            attempt(
                shape, "down fwd", "triton", lambda: ops._gmm(h, Wd, meta, transpose_w=True), **vs_dense("down fwd")
            )
            y = ops._gmm(h, Wd, meta, transpose_w=True)
            attempt(shape, "unpermute", "triton", lambda: ops._gather(y, meta, probs), **vs_copy())
            dout = torch.randn_like(x)
            dy, _ = ops._scatter(dout, meta, probs, y)
            bwd_bytes = (T * D + 2 * R * D) * el  # reads dout and y (for dprobs), writes dy
            attempt(
                shape,
                "unpermute bwd",
                "triton (+dprobs)",
                lambda: ops._scatter(dout, meta, probs, y),
                nbytes=bwd_bytes,
                base_ms=bwd_bytes / (copy_gbps * 1e6),
                base_name="d2d copy GB/s",
            )
            fused = ops.common.config("swiglu_bwd", DTYPE).get("FUSED", 0)
            # beyond dH: fused, reads g and u, writes h and [dgate | dup] in place of dH (4 R F); as a pass after
            # dH, reads dH, g, u and writes h, dgate, dup (6 R F)
            epilogue_bytes = (4 if fused else 6) * R * F_ * el
            attempt(
                shape,
                "down dX",
                "triton (dH, swiglu bwd in its epilogue)" if fused else "triton (dH + swiglu bwd pass)",
                lambda: ops._dh_swiglu_bwd(dy, Wd, g, u, meta),
                epilogue_ms=epilogue_bytes / (copy_gbps * 1e6),
                **vs_dense("down dX"),
            )
            dh = ops._gmm(dy, Wd, meta, transpose_w=False)
            attempt(
                shape,
                "down dX: dH part",
                "triton (plain dH only)",
                lambda: ops._gmm(dy, Wd, meta, transpose_w=False),
                **vs_dense("down dX"),
            )
            ew_bytes = 6 * R * F_ * el  # reads dH, g, u; writes dgate, dup, h
            attempt(
                shape,
                "swiglu bwd pass",
                "triton (elementwise)",
                lambda: ops._swiglu_bwd(dh, g, u),
                nbytes=ew_bytes,
                base_ms=ew_bytes / (copy_gbps * 1e6),
                base_name="d2d copy GB/s",
            )
            dgu, hb = ops._swiglu_bwd(dh, g, u)
            if CUDA:
                overlap_rows(shape, lambda: ops._gmm_dw(dy, hb, meta), lambda: ops._swiglu_bwd(dh, g, u))
            del dh
            attempt(
                shape,
                "gate/up dX",
                "triton ([dg|du] @ W_gu)",
                lambda: ops._gmm(dgu, Wgu, meta, transpose_w=False),
                **vs_dense("gate/up dX"),
            )
            # a grouped dW writes E weight gradients where the dense GEMM of the same FLOPs writes one: (E - 1) O I
            # more bytes (G: 16 experts, 238 MB for down dW, a quarter of the dense GEMM's time at copy bandwidth)
            attempt(
                shape,
                "down dW",
                "triton",
                lambda: ops._gmm_dw(dy, hb, meta),
                epilogue_ms=(E - 1) * D * F_ * el / (copy_gbps * 1e6),
                **vs_dense("down dW"),
            )
            # as the layer: permuted first, the forward saved x permuted for this dW; gather-fused, it permutes x here
            xp_saved = None if gathered else ops._scatter(x, meta)
            attempt(
                shape,
                "gate/up dW",
                "triton (permute x + one [dg|du] K-reduction)" if gathered else "triton (one [dg|du] K-reduction)",
                lambda: ops._gmm_dw(dgu, ops._scatter(x, meta) if xp_saved is None else xp_saved, meta),
                epilogue_ms=((E - 1) * 2 * F_ * D * el + (perm_bytes if gathered else 0)) / (copy_gbps * 1e6),
                **vs_dense("gate/up dW"),
            )
            del dgu, hb, xp_saved
        except Exception as exc:
            traceback.print_exc()
            skip(f"{shape} triton kernels", f"{type(exc).__name__}: {exc}")

    # torch._grouped_mm (sm90+) and DeepSpeed AutoEP's Triton grouped GEMM: the same six GEMMs
    offs = plan_ref.offsets_E1[1:].to(torch.int32)
    dy_ref = torch.randn_like(y_ref)
    dgu = torch.randn(R, 2 * F_, device=DEV, dtype=dt)
    if ds_triton is not None:
        # forward through its public function (weights in their [E, out, in] layout, trans_b); dX and dW through
        # the two functions its autograd backward calls
        g = ds_triton.gemm
        for op, fn in (
            ("gate/up fwd", lambda: g.group_gemm_triton(xp, Wgu, offs, trans_b=True)),
            ("down fwd", lambda: g.group_gemm_triton(h_ref, Wd, offs, trans_b=True)),
            ("down dX", lambda: g._group_gemm(dy_ref, Wd, offs)),
            ("gate/up dX", lambda: g._group_gemm(dgu, Wgu, offs)),
            ("down dW", lambda: g._grouped_dw(dy_ref, h_ref, offs, E)),
            ("gate/up dW", lambda: g._grouped_dw(dgu, xp, offs, E)),
        ):
            attempt(shape, op, "deepspeed group_gemm_triton", fn, **vs_dense(op))
    if HAS_GROUPED_MM and CUDA:
        Wgu_T = Wgu.transpose(1, 2)  # [E, D, 2F] column-major view
        attempt(
            shape,
            "gate/up fwd",
            "torch._grouped_mm",
            lambda: torch._grouped_mm(xp, Wgu_T, offs=offs),
            **vs_dense("gate/up fwd"),
        )
        attempt(
            shape,
            "down fwd",
            "torch._grouped_mm",
            lambda: torch._grouped_mm(h_ref, Wd.transpose(1, 2), offs=offs),
            **vs_dense("down fwd"),
        )
        attempt(
            shape,
            "down dX",
            "torch._grouped_mm",
            lambda: torch._grouped_mm(dy_ref, Wd, offs=offs),
            **vs_dense("down dX"),
        )
        attempt(
            shape,
            "gate/up dX",
            "torch._grouped_mm",
            lambda: torch._grouped_mm(dgu, Wgu, offs=offs),
            **vs_dense("gate/up dX"),
        )
        attempt(
            shape,
            "down dW",
            "torch._grouped_mm",
            lambda: torch._grouped_mm(dy_ref.t(), h_ref, offs=offs),
            **vs_dense("down dW"),
        )
        attempt(
            shape,
            "gate/up dW",
            "torch._grouped_mm",
            lambda: torch._grouped_mm(dgu.t(), xp, offs=offs),
            **vs_dense("gate/up dW"),
        )

    # megatron-core permute / unpermute
    routing_map = peers.routing_map(experts_TK, E)
    probs_TE = peers.probs_map(probs, experts_TK, E)
    if HAS_MCORE:
        attempt(shape, "permute", "megatron-core", lambda: peers.megatron_permute(x, routing_map, R), **vs_copy())
        try:
            xp_m, idx_m = peers.megatron_permute(x, routing_map, R)
            attempt(
                shape,
                "unpermute",
                "megatron-core",
                lambda: peers.megatron_unpermute(xp_m, idx_m, probs_TE, routing_map),
                **vs_copy(),
            )
        except Exception as exc:
            skip(f"{shape} megatron-core unpermute", str(exc)[:160])

    # DeepSpeed AutoEP's opt-in fused weighted restore (its combine); the interpreter refuses its kernel
    if ds_triton is not None and CUDA:
        attempt(
            shape,
            "unpermute",
            "deepspeed AutoEP fused restore",
            lambda: peers.deepspeed_combine(y_ref, probs, plan_ref.sorted_flat_R),
            **vs_copy(),
        )
    elif ds_triton is not None:
        skip("deepspeed AutoEP fused restore", "CUDA only: the interpreter refuses its kernel's mask")

    # DeepSpeed CUTLASS MoE GEMM (inference v2)
    if ds_moe_gemm is not None:
        rows_before = plan_ref.offsets_E1[1:].to(torch.int64)
        Wgu_ds = Wgu.transpose(1, 2).contiguous()  # [E, in, out]
        out_gu = torch.empty(R, 2 * F_, device=DEV, dtype=dt)
        attempt(
            shape,
            "gate/up fwd",
            "deepspeed MoEGEMM",
            lambda: ds_moe_gemm(out_gu, xp, Wgu_ds, rows_before),
            **vs_dense("gate/up fwd"),
        )

    # whole layer forward + backward (routing included)
    layer_flops = 18 * R * D * F_
    params = [t.detach().clone().requires_grad_() for t in (x, probs, Wgu, Wd)]
    grad_out = torch.randn(T, D, device=DEV, dtype=dt)

    def fwd_bwd(fn):
        def run():
            out = fn(*params)
            torch.autograd.grad(out, params, grad_out, allow_unused=True)

        return run

    layer = {}
    layer["reference"] = attempt(
        shape,
        "layer fwd+bwd",
        "reference",
        fwd_bwd(lambda x, p, gu, d: ref.swiglu_experts(x, p, ref.routing_plan(experts_TK, E), gu, d)),
        flops=layer_flops,
    )
    if ops is not None:
        layer["triton"] = attempt(
            shape,
            "layer fwd+bwd",
            "triton",
            fwd_bwd(lambda x, p, gu, d: ops.swiglu_experts(x, p, ops.routing_plan(experts_TK, E), gu, d)),
            flops=layer_flops,
        )
    layer["naive"] = attempt(
        shape,
        "layer fwd+bwd",
        "naive (official loop)",
        fwd_bwd(lambda x, p, gu, d: naive_layer(x, experts_TK, p, gu, d)),
        flops=layer_flops,
    )
    # the layer as sampling runs it (forward only, no autograd: ours store no pre-activations)
    sampling = {
        "reference": lambda x, p, gu, d: ref.swiglu_experts(x, p, ref.routing_plan(experts_TK, E), gu, d),
        "naive (official loop)": lambda x, p, gu, d: naive_layer(x, experts_TK, p, gu, d),
    }
    if ops is not None:
        sampling["triton"] = lambda x, p, gu, d: ops.swiglu_experts(x, p, ops.routing_plan(experts_TK, E), gu, d)
    for impl, fn in sampling.items():

        def no_grad_fwd(fn=fn):
            with torch.no_grad():
                fn(*params)

        attempt(shape, "layer fwd (no grad)", impl, no_grad_fwd, flops=6 * R * D * F_)
    if HAS_MCORE and HAS_GROUPED_MM and CUDA:

        def mg(x, p, gu, d):  # the router's [T, E] probabilities made from p inside, for p's gradient
            return peers.megatron_grouped_mm_swiglu_experts(
                x, peers.probs_map(p, experts_TK, E), routing_map, offs, gu, d
            )

        layer["megatron+grouped_mm"] = attempt(
            shape, "layer fwd+bwd", "megatron permute+_grouped_mm", fwd_bwd(mg), flops=layer_flops
        )
    # DeepSpeed AutoEP's local layer with its Triton grouped GEMM, and with torch._grouped_mm (what it picks on sm90)
    autoep_gemms = {"triton": "Triton grouped GEMM"} if ds_triton is not None else {}
    if ds_triton is not None and HAS_GROUPED_MM and CUDA:
        autoep_gemms["grouped_mm"] = "torch._grouped_mm"
    if autoep_gemms:
        # AutoEP holds gate and up as two weights: split once here, outside the timed region
        ds_params = [t.detach().clone().requires_grad_() for t in (x, probs, *Wgu.chunk(2, dim=1), Wd)]
    for gemm, name in autoep_gemms.items():

        def autoep(gemm=gemm):
            out = peers.autoep_swiglu_experts(ds_params[0], ds_params[1], experts_TK, *ds_params[2:], gemm=gemm)
            torch.autograd.grad(out, ds_params, grad_out)

        layer[f"deepspeed autoep {gemm}"] = attempt(
            shape, "layer fwd+bwd", f"deepspeed AutoEP ({name})", autoep, flops=layer_flops
        )
    if ops is not None and COMPARE_TILES:
        here = {path: tiles for path, tiles in COMPARE_TILES.items() if tiles.get("table", TABLE) == TABLE}
        for path, tiles in COMPARE_TILES.items():
            if path not in here:
                skip(f"--compare-tiles {path}", f"tuned for {tiles['table']} launches; here: {TABLE}")
        if here:
            layer_with_tiles(shape, here, x, probs, Wgu, Wd, experts_TK, E)
    if ops is not None:  # correctness at the real shape: ours vs the reference path, same dtype
        try:
            outs = {}
            for impl, mod in (("triton", ops), ("reference", ref)):
                p = [t.detach().clone().requires_grad_() for t in (x, probs, Wgu, Wd)]
                out = mod.swiglu_experts(p[0], p[1], mod.routing_plan(experts_TK, E), *p[2:])
                outs[impl] = [out.detach(), *torch.autograd.grad(out, p, grad_out)]
            errs = {}
            for n, a, b in zip(
                ["out", "x", "probs", "gate_up", "down"], outs["triton"], outs["reference"], strict=True
            ):
                errs[n] = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
            rows.append({"shape": shape, "op": "check", "impl": "triton vs reference", "ms": 0.0, "nerr": errs})
            log(f"{shape:8s} check (max err / max |ref|): " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        except Exception as exc:
            traceback.print_exc()
            skip(f"{shape} correctness check", f"{type(exc).__name__}: {exc}")
    if layer.get("triton"):
        for k, v in layer.items():
            if v and k != "triton":
                v["triton_speedup"] = round(v["ms"] / layer["triton"]["ms"], 2)


LAYER_RESERVE_S = 15.0  # the sweep stops trying tiles this long before the budget: the layer re-time needs it


def sweep(kinds, name: str):
    """A few tile configs per kernel kind at shape ``name`` (bf16); prints each time and the best per kind. Under
    the interpreter on CPU it runs a tiny shape instead: a check of this code, not of speed."""
    if ops is None:
        skip("sweep", "needs the Triton kernels (CUDA or TRITON_INTERPRET=1)")
        return
    D, F_, E = SHAPES[name] if CUDA else (32, 64, 8)
    T, K = (args.tokens if CUDA else 64), args.top_k
    shape = name if CUDA else "sweep(cpu T=64 D=32 F=64)"
    gen = torch.Generator().manual_seed(0)
    ex = make_routing(T, K, E, False, gen).to(DEV)
    x = torch.randn(T, D, device=DEV, dtype=DTYPE)
    Wgu = torch.randn(E, 2 * F_, D, device=DEV, dtype=DTYPE) * D**-0.5
    Wd = torch.randn(E, D, F_, device=DEV, dtype=DTYPE) * F_**-0.5
    probs = torch.rand(T, K, device=DEV, dtype=DTYPE)
    plan = ops.routing_plan(ex, E)
    meta = ops.plan_meta(plan)
    h, g, u = first_gemm(x, Wgu, meta, "swiglu")
    dy = torch.randn(T * K, D, device=DEV, dtype=DTYPE)
    dh = ops._gmm(dy, Wd, meta, transpose_w=False)
    dgu, hb = ops._swiglu_bwd(dh, g, u)
    xp = ops._scatter(x, meta)
    W1, b1 = Wgu[:, :F_].contiguous(), torch.zeros(E, F_, device=DEV, dtype=DTYPE)  # GELU experts' fc1
    R = T * K
    el = x.element_size()
    work = {  # kind: [(op, flops, bytes, fn)]
        "swiglu": [("gate/up fwd", 4 * R * D * F_, None, lambda: first_gemm(x, Wgu, meta, "swiglu"))],
        "gmm": [("down fwd", 2 * R * D * F_, None, lambda: ops._gmm(h, Wd, meta, transpose_w=True))],
        "gmm_dx": [
            (
                "gate/up dX",
                4 * R * D * F_,
                None,
                lambda: ops._gmm(dgu, Wgu, meta, transpose_w=False),
            ),
            ("down dX: dH part", 2 * R * D * F_, None, lambda: ops._gmm(dy, Wd, meta, transpose_w=False)),
        ],
        "dw": [
            ("down dW", 2 * R * D * F_, None, lambda: ops._gmm_dw(dy, hb, meta)),
            ("gate/up dW", 4 * R * D * F_, None, lambda: ops._gmm_dw(dgu, xp, meta)),  # x permuted: dw tiles alone
        ],
        "gmm_epi": [
            (
                "gelu fc1 fwd",
                2 * R * D * F_,
                None,
                lambda: first_gemm(x, W1, meta, "gmm_epi", bias=b1, epi=ops.EPI_GELU),
            ),
            (
                "gelu fc2 dX",
                2 * R * D * F_,
                None,
                lambda: ops._gmm(dy, Wd, meta, transpose_w=False, epi=ops.EPI_GELU_BWD, x0=g),
            ),
        ],
        "swiglu_bwd": [("down dX", 2 * R * D * F_, None, lambda: ops._dh_swiglu_bwd(dy, Wd, g, u, meta))],
        "ew": [("swiglu bwd pass", None, 6 * R * F_ * el, lambda: ops._swiglu_bwd(dh, g, u))],
        "rows": [("unpermute", None, (R * D + T * D) * el, lambda: ops._gather(dy, meta, probs))],
    }
    winners = {}
    for kind in kinds:
        keys, configs = SWEEP[kind]
        if args.no_kernel_descriptors:
            configs = [c for c in configs if candidate(keys, c).get("TMA") != 2]
        best = None
        for c in configs:
            if over_budget(reserve=LAYER_RESERVE_S):
                skip(f"sweep {kind} {c}", "over the time budget")
                continue
            total = 0.0
            with ops.tile_overrides(**{kind: candidate(keys, c)}):
                for op, fl, nbytes, fn in work[kind]:
                    r = attempt(shape, f"sweep {op}", f"{kind} {c}", fn, flops=fl, nbytes=nbytes)
                    total = total + r["ms"] if r and total is not None else None
            if total is not None and (best is None or total < best[0]):
                best = (total, c)
        if best:
            ops_timed = " + ".join(op for op, *_ in work[kind])
            in_use = ops.common.config(kind, DTYPE)
            log(f"best {kind}: {best[1]} {best[0]:.4f} ms ({ops_timed}; default now: {in_use})")
            chosen = candidate(keys, best[1])
            if any(in_use.get(k) != v for k, v in chosen.items()):  # not the tiles in use (on this device and dtype)
                winners[kind] = chosen
        write_results()
    winners.pop("gmm_epi", None)  # GELU experts only: the layer timed here is SwiGLU
    verdict = ("tiles now", {}) if not winners else None  # the tiles in use won every kind
    if winners and not over_budget():
        # together, and one kind at a time where several won: a kind's gain can hide behind another's loss
        variants = {"sweep winners": winners}
        if len(winners) > 1:
            variants |= {f"sweep winner {kind}": {kind: cfg} for kind, cfg in winners.items()}
        now, timed = layer_with_tiles(shape, variants, x, probs, Wgu, Wd, ex, E)
        verdict = adopted(now, timed) if now is not None else None
        write_results()
    if args.write_tiles:
        write_tiles(verdict, shape)


def write_tiles(verdict: tuple[str, dict] | None, shape: str) -> None:
    """``--write-tiles``: the adopted tiles as JSON that ``load_tiles`` reads; nothing when the layer was not
    re-timed."""
    if verdict is None:
        skip("--write-tiles", f"the layer was not re-timed under the winners at {shape}: nothing written")
        return
    label, tiles = verdict
    tiles = {"table": TABLE, **tiles}  # tuned over this table: they apply to the launches that read it
    with open(args.write_tiles, "w") as f:
        json.dump(tiles, f, indent=1)
        f.write("\n")
    note = "" if CUDA else " (interpreter timings: this checks the path, it tunes nothing)"
    log(f"wrote {args.write_tiles} ({label} at {shape}): {json.dumps(tiles)}{note}")


def layer_with_tiles(
    shape, variants: dict[str, dict], x, probs, Wgu, Wd, experts_TK, E
) -> tuple[float | None, dict[str, tuple[dict, float, float]]]:
    """The whole layer forward+backward with the tiles in use and under each variant's tiles ({label: tiles}: the
    sweep's winners, or a file's), on the same inputs: the layer-level gain of adopting them, and their largest
    output/gradient difference. The tile sets are timed in turn, ``--layer-rounds`` times over: one pass after
    another drifted by a few percent (run 6, G: 3.98 ms for the tiles in use, 4.23 for tiles that differed only in
    one kernel's stage count), so each variant's gain is the median of its ratios to the tiles in use timed in the
    same round. Returns the ms with the tiles in use (None if that failed) and {label: (tiles, ms, difference)} of
    the variants that ran, ms being the tiles-in-use median over that gain."""
    T, D = x.shape
    R, F_ = T * experts_TK.shape[1], Wd.shape[2]
    params = [t.detach().clone().requires_grad_() for t in (x, probs, Wgu, Wd)]
    grad_out = torch.randn_like(x)

    def run():
        out = ops.swiglu_experts(params[0], params[1], ops.routing_plan(experts_TK, E), *params[2:])
        return [out, *torch.autograd.grad(out, params, grad_out)]

    sets, diffs = {"tiles now": {}}, {}
    want = run()
    for label, tiles in variants.items():  # each variant's outputs (and its kernels compiled before any timing)
        if over_budget():
            skip(f"{shape} layer fwd+bwd triton ({label})", "over the time budget")
            continue
        try:
            with ops.tile_overrides(**tiles):
                got = run()
        except Exception as exc:
            skip(f"{shape} layer fwd+bwd triton ({label})", reason(exc))
            continue
        sets[label] = tiles
        diffs[label] = max(
            float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
            for a, b in zip(got, want, strict=True)
        )
    times: dict[str, list[float]] = {label: [] for label in sets}
    for r in range(args.layer_rounds or (3 if CUDA else 1)):
        if r and over_budget():
            skip(f"{shape} layer re-times after round {r}", "over the time budget")
            break
        for label in list(times):  # those that have not failed
            try:
                with ops.tile_overrides(**sets[label]):
                    times[label].append(bench(run))
            except Exception as exc:
                skip(f"{shape} layer fwd+bwd triton ({label})", reason(exc))
                del times[label]
    now = times.get("tiles now")
    now_ms = statistics.median(now) if now else None
    note = lambda n: f"median of {n} interleaved rounds"  # noqa: E731
    flops = 18 * R * D * F_
    if now:
        record(shape, "layer fwd+bwd", "triton (tiles now)", now_ms, flops=flops, note=note(len(now)))
    timed = {}
    for label, ms in times.items():
        if label == "tiles now" or not ms:
            continue
        row = record(
            shape, "layer fwd+bwd", f"triton ({label})", statistics.median(ms), flops=flops, note=note(len(ms))
        )
        if now:
            gain = statistics.median(a / b for a, b in zip(now, ms, strict=False))  # rounds both ran
            row["vs_tiles_now"] = round(gain, 3)
            timed[label] = (sets[label], now_ms / gain, diffs[label])
            log(
                f"{label} {sets[label]}: layer {now_ms:.4f} -> {row['ms']:.4f} ms "
                f"(x{gain:.3f} round by round); max normalised difference {diffs[label]:.2e}"
            )
    return now_ms, timed


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def write_results():
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{slug}-{datetime.date.today().isoformat()}.json")
    meta = {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "cuda": torch.version.cuda,
        "dtype": str(DTYPE),
        "tokens": args.tokens,
        "top_k": args.top_k,
        "interpret": INTERPRET,
        "elapsed_s": round(time.time() - T0, 1),
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "skipped": skipped}, f, indent=1)
    return path


def print_table():
    print("\n| shape | op | impl | ms | TFLOP/s | GB/s | vs baseline |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        if r["op"] == "check":
            continue
        vs = f"{r['vs_baseline']:.2f}x {r['baseline']}" if "vs_baseline" in r else ""
        if "triton_speedup" in r:
            vs = f"triton is {r['triton_speedup']:.2f}x faster"
        print(
            f"| {r['shape']} | {r['op']} | {r['impl']} | {r['ms']:.4f} | {r.get('tflops', '')} | "
            f"{r.get('gbps', '')} | {vs} |"
        )
    ours = judged(rows)
    if ours:
        # last column: against the baseline plus the extra traffic at copy bandwidth (see record): a fused
        # epilogue's, a permuted copy, a grouped dW's E outputs
        print("\n| shape | op | ours / baseline | bar | ok | ours / (baseline + epilogue bytes) |")
        print("|---|---|---:|---:|---|---:|")
        for j in ours:
            epi = f"{j['ratio_epilogue']:.2f}" if "ratio_epilogue" in j else ""
            ok = "yes" if j["ok"] else "NO"
            print(f"| {j['shape']} | {j['op']} | {ratio_text(j)} | {j['bar']:.2f} | {ok} | {epi} |")
    speedups = layer_speedups(rows)
    if speedups:
        print("\n| shape | layer fwd+bwd against | ours is x faster | bar | ok |\n|---|---|---:|---:|---|")
        for j in speedups:
            ok = "yes" if j["ok"] else "NO"
            print(f"| {j['shape']} | {j['peer']} | {j['speedup']:.2f} | {j['bar']:.1f} | {ok} |")
    for shape, slower in skew_slowdowns(rows).items():
        print(f"\n{shape}: layer fwd+bwd {slower:+.1%} vs balanced (bar: <= +{SKEW_BAR:.0%})")
    for r in rows:
        if r["op"] == "check":
            print(f"\n{r['shape']} triton vs reference, max err / max |ref|: {r['nerr']}")
    if skipped:
        print("\nskipped:")
        for s in skipped:
            print(f"- {s}")


def main():
    log(f"device {device_name()}, torch {torch.__version__}, interpret={INTERPRET}")
    shapes = SHAPE_NAMES if CUDA else ["tiny"] + [s for s in SHAPE_NAMES if s == "S"]
    for name in shapes:
        if over_budget():
            skip(f"shape {name}", "over the time budget")
            continue
        try:
            run_shape(name)
        except Exception as exc:
            traceback.print_exc()
            skip(f"shape {name}", f"{type(exc).__name__}: {exc}")
        write_results()
        if CUDA:
            torch.cuda.empty_cache()
    if args.sweep:
        for name in SWEEP_SHAPES if CUDA else ["XL"]:  # on CPU, one tiny interpreter shape
            sweep(SWEEP_KINDS, name)
    path = write_results()
    print_table()
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
