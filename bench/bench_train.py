"""Single-device training throughput of a whole DiT-MoE step, per model preset and MoE backend.

One step = forward (bf16 autocast on CUDA), diffusion loss + balance loss, backward, AdamW step (the trainer's fused
``ditmoe.training.stepper.adamw``), on random latents and labels: what ``ditmoe.training.loop.train_step`` and
``TorchStepper.step`` do (no grad clipping: the default).

    python bench/bench_train.py                          # CUDA: S/2 and XL/2-8E2A at 256px; triton, torch, naive
                                                         # (XL only where its optimizer state leaves room: H200)
    python bench/bench_train.py --models DiT-MoE-XL/2-8E2A --batch 16 --backends triton,naive --iters 20
    python bench/bench_train.py --tiny                   # the CPU configuration (also on CUDA: a smoke test)

Backends (``DITMOE_MOE_BACKEND`` and the config's ``moe.backend`` are both set per case):
    triton  ours: fused Triton grouped GEMMs (CUDA only)
    torch   the pure-torch reference: grouped GEMMs over expert-sorted rows
    naive   the official DiT-MoE training loop: every token repeated K times, one expert at a time on a boolean mask
On CPU (no CUDA) it runs DiT-MoE-micro/4-4E2A at 16px, 1 channel, batch 16, backends torch and naive, in fp32: a
check that the script works, not a measurement of anything that matters; triton and the S/XL shapes are skipped.

FLOP arithmetic (``ditmoe.analysis.model_size.model_size(cfg).train_flops``, FLOPs per image, forward + backward;
one multiply-accumulate = 2 FLOPs, backward = 2x forward, so train = 3 x 2 x forward MACs). Per image, L tokens
(256 for /2 at 256px: 32x32x4 latents in 2x2 patches), D width, E experts, K active, F = 4D routed, F_s = 2D shared:
    per block   adaLN 6 D^2 + L (4 D^2 qkv/proj + D E router + K 3 D F routed SwiGLU + 3 D F_s shared) + 2 L^2 D attn
    S/2-8E2A    D=384, 12 blocks:  1.34 GMAC per block, 16.0 GMAC forward -> 0.096 TFLOP per image trained
                (batch 64: 6.2 TFLOP per step)
    XL/2-8E2A   D=1152, 28 blocks: 11.7 GMAC per block, 328 GMAC forward  -> 1.97 TFLOP per image trained
                (batch 32: 63 TFLOP per step)
Only activated experts count (K of E per token), so every backend does the same FLOPs:
    TFLOP/s = images/s x train_flops / 1e12       MFU = TFLOP/s / peak (datasheet dense bf16, telemetry.PEAK_TFLOPS)
Timing: ``--warmup`` untimed steps, then ``--iters`` steps each between ``torch.cuda.synchronize()`` calls; the median
step time gives images/s. "host ms" is the median time until the step's Python returns, its kernels queued: close to
the step time, the host's issuing sets the pace (small models), far below it, the GPU does. ``--rounds N`` runs every
case N times in turn and reports the median round with the range; ``--compare-tiles FILE`` adds the triton backend
under other tiles to the rotation, an A/B within one process (e.g. ``--models DiT-MoE-S/2-8E2A --backends triton
--compare-tiles bench/tiles/run3-bf16.json --rounds 3``). Peak memory: the CUDA allocator's peak of the case (reset
before it), or on CPU the process's peak RSS (reset per case where /proc/self/clear_refs allows). Writes
bench/results/<device-slug>-<YYYY-MM-DD>-train.json and prints a markdown table, also when stopped early (SIGTERM,
as from ``timeout``, or Ctrl-C): then with the cases that finished, the others listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from arguments import require_at_least  # bench/, the script's folder

from ditmoe.analysis.model_size import model_size
from ditmoe.config import ConfigError, model_config
from ditmoe.diffusion import create_diffusion
from ditmoe.models.dit import DiTMoE
from ditmoe.training.stepper import adamw
from ditmoe.training.telemetry import device_peak_flops, peak_memory
from ditmoe_kernels import select_backend
from ditmoe_kernels.tiles import load_tiles, tile_overrides

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
DEFAULT_BATCH = {"S": 64, "XL": 32}  # by preset size; others 32 on CUDA, 16 in the tiny configuration

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--models", help="comma list of presets (default: S/2 and XL/2-8E2A on CUDA, micro/4-4E2A on CPU)")
ap.add_argument("--backends", help="comma list of triton, torch, naive (default: all that can run here)")
ap.add_argument("--batch", help="images per step: one number for every model, or a comma list, one per model")
ap.add_argument("--image-size", type=int, help="pixels (default 256 on CUDA: 32x32x4 latents; 16 tiny)")
ap.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on CUDA, fp32 on CPU)")
ap.add_argument("--warmup", type=int, help="untimed steps (default 3; 2 on CPU)")
ap.add_argument("--iters", type=int, help="timed steps (default 10)")
ap.add_argument("--tiny", action="store_true", help="the CPU configuration: micro/4-4E2A at 16px, 1 channel")
ap.add_argument(
    "--tiles",
    help="triton tile overrides, JSON {kind: {key: value}} or a .json file of it (e.g. bench/tiles/run3-bf16.json: "
    "the bf16 table before run 4)",
)
ap.add_argument(
    "--compare-tiles",
    help="also run the triton backend under these tile overrides (same formats as --tiles), interleaved with the "
    "other cases: an A/B in one process",
)
ap.add_argument(
    "--rounds", type=int, default=1, help="run every case this many times in turn; report the median (and spread)"
)
ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
args = ap.parse_args()
require_at_least(ap, args, rounds=1, iters=1, warmup=0, image_size=1)

TINY = args.tiny or not CUDA
try:
    tiles = load_tiles(args.tiles) if args.tiles else {}
except ValueError as exc:
    ap.error(f"--tiles {exc}")
try:
    compare_tiles = load_tiles(args.compare_tiles) if args.compare_tiles else None
except ValueError as exc:
    ap.error(f"--compare-tiles {exc}")
models = (
    args.models.split(",")
    if args.models
    else (["DiT-MoE-micro/4-4E2A"] if TINY else ["DiT-MoE-S/2-8E2A", "DiT-MoE-XL/2-8E2A"])
)
backends = args.backends.split(",") if args.backends else ["triton", "torch", "naive"]
if set(backends) - {"triton", "torch", "naive"}:
    ap.error(f"--backends: expected a comma list of triton, torch, naive; got {args.backends!r}")
try:
    batches = [int(b) for b in args.batch.split(",")] if args.batch else []
except ValueError:
    ap.error(f"--batch: expected a number or a comma list of numbers, got {args.batch!r}")
if batches and min(batches) < 1:
    ap.error(f"--batch: images per step must be at least 1, got {args.batch!r}")
if len(batches) > 1 and len(batches) != len(models):
    ap.error(f"--batch {args.batch!r}: {len(batches)} values for {len(models)} models (give one, or one per model)")
image_size = args.image_size or (16 if TINY else 256)
dtype = args.dtype or ("bf16" if CUDA else "fp32")
warmup = args.warmup if args.warmup is not None else (3 if CUDA else 2)
iters = args.iters if args.iters is not None else 10
skipped: list[str] = []
if not CUDA:
    if not args.models:
        skipped.append(
            "DiT-MoE-S/2-8E2A, DiT-MoE-XL/2-8E2A at 256px: no CUDA device (ran DiT-MoE-micro/4-4E2A at 16px)"
        )
    if not args.dtype:
        skipped.append("bf16 autocast: no CUDA device (CPU runs fp32)")


def batch_of(i: int, name: str) -> int:
    if batches:
        return batches[i] if len(batches) > 1 else batches[0]
    if TINY:
        return 16
    return DEFAULT_BATCH.get(re.match(r"DiT-MoE-([A-Za-z]+)/", name)[1], 32)


def build_config(name: str, backend: str):
    moe = {"backend": backend}
    if TINY:
        return model_config(name, image_size=image_size, latent=False, in_channels=1, num_classes=10, moe=moe)
    return model_config(name, image_size=image_size, moe=moe)


for name in models:  # an unknown preset, or an image size it cannot take: before any case runs
    try:
        build_config(name, "torch")
    except ConfigError as exc:
        ap.error(f"--models {name} at {image_size}px: {exc}")


def backend_unavailable(backend: str) -> str | None:
    if backend == "triton" and not CUDA:
        return "no CUDA device (the Triton interpreter checks correctness, not speed)"
    try:
        select_backend(backend, DEV)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def too_big_for_device(name: str) -> str | None:
    """Why a default model is skipped on this device: fp32 weights, gradients and the two AdamW moments (16 bytes
    per parameter) over 70% of its memory leave too little for activations (XL/2-8E2A: 62 GiB of the H100's 79,
    out of memory at batch 32 in run 4). Models named with --models are always tried."""
    if not CUDA or args.models:
        return None
    state = 16 * model_size(build_config(name, "torch")).total_params
    total = torch.cuda.get_device_properties(DEV).total_memory
    if state <= 0.7 * total:
        return None
    return (
        f"weights, gradients and AdamW states need {state / 2**30:.1f} GiB of this device's {total / 2**30:.1f} GiB "
        "(train it with ZeRO and expert parallelism; --models forces a try)"
    )


def reset_peak_memory() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEV)
        return
    with contextlib.suppress(OSError):  # peak RSS (VmHWM, which getrusage reports) back to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run_case(name: str, backend: str, batch: int, tiles: dict) -> dict:
    cfg = build_config(name, backend)
    module = select_backend(cfg.moe.backend, DEV).__name__
    torch.manual_seed(0)
    model = DiTMoE(cfg).to(DEV)
    model.train()
    optimizer = adamw(list(model.parameters()), lr=1e-4, weight_decay=0.0)  # the trainer's optimizer and defaults
    diffusion = create_diffusion("ddpm", learn_sigma=cfg.learn_sigma)
    autocast = torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    gen = torch.Generator(DEV).manual_seed(0)
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=DEV, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), device=DEV, generator=gen)

    def step() -> None:
        x_t, t_model, ctx = diffusion.training_inputs(x0, generator=gen)
        with autocast:
            out = model(x_t, t_model, y)
        loss = diffusion.loss(out.prediction.float(), ctx)["loss"].mean() + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory()
    with tile_overrides(**tiles) if backend == "triton" else contextlib.nullcontext():
        for _ in range(warmup):
            step()
        times, issued = [], []
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            step()
            issued.append(time.perf_counter() - t0)  # the host's part: queued, not yet run, on CUDA
            sync()
            times.append(time.perf_counter() - t0)
    mem = peak_memory(DEV)
    step_s = statistics.median(times)
    size = model_size(cfg)
    images_per_s = batch / step_s
    tflops = images_per_s * size.train_flops / 1e12
    peak = device_peak_flops(
        DEV, dtype if dtype == "bf16" else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    )
    return {
        "status": "ok",
        "module": module,
        "step_s": step_s,
        "step_s_all": [round(t, 5) for t in times],
        "host_s": statistics.median(issued),
        "images_per_s": images_per_s,
        "tokens_per_s": images_per_s * cfg.num_tokens,
        "tflops": tflops,
        "mfu": tflops * 1e12 / peak if peak else None,
        "peak_mem_gib": mem.get("mem/peak_allocated_gib", mem.get("mem/peak_rss_gib")),
        "memory": mem,
        "train_flops_per_image": size.train_flops,
        "params": size.total_params,
        "activated_params": size.activated_params,
        "tokens_per_image": cfg.num_tokens,
    }


def device_name() -> str:  # as bench/bench_kernels.py
    if CUDA:
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


cases = []  # (model, batch, backend, label, tiles), in the order every round runs them
for i, name in enumerate(models):
    why = too_big_for_device(name)
    if why:
        skipped.append(f"{name}: {why}")
        continue
    for backend in backends:
        why = backend_unavailable(backend)
        if why:
            skipped.append(f"{backend} backend: {why}")
            continue
        cases.append((name, batch_of(i, name), backend, backend, tiles if backend == "triton" else {}))
        if backend == "triton" and compare_tiles is not None:
            cases.append((name, batch_of(i, name), backend, f"triton ({args.compare_tiles})", compare_tiles))

if compare_tiles is not None and not any(label != backend for _, _, backend, label, _ in cases):
    skipped.append(f"--compare-tiles {args.compare_tiles}: the triton backend does not run here")


class Stopped(BaseException):
    """SIGTERM: not an Exception, so that no case's error handling takes it for a failure of that case."""


def stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


signal.signal(signal.SIGTERM, stop)
runs: dict[tuple, list[dict]] = {}
T0 = time.time()
try:
    for rnd, (name, batch, backend, label, case_tiles) in itertools.product(range(args.rounds), cases):
        row = {"model": name, "backend": label, "batch": batch, "image_size": image_size, "dtype": dtype}
        os.environ["DITMOE_MOE_BACKEND"] = backend  # wins over the config; both say the same
        try:
            row.update(run_case(name, backend, batch, case_tiles))
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as exc:
            traceback.print_exc()
            row.update(
                status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
        gc.collect()  # the failed case's tensors went with its frame; give their memory back before the next
        if CUDA:
            torch.cuda.empty_cache()
        runs.setdefault((name, label), []).append(row)
        rate = f"{row['images_per_s']:.1f} images/s" if row["status"] == "ok" else row["status"]
        if row["status"] == "ok":
            rate += f", step {1e3 * row['step_s']:.1f} ms, host {1e3 * row['host_s']:.1f} ms"
        done = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
        print(f"[{time.time() - T0:6.1f}s] {name} {label} batch {batch}: {rate}{done}", flush=True)
except (Stopped, KeyboardInterrupt) as exc:
    left = args.rounds * len(cases) - sum(len(r) for r in runs.values())
    skipped.append(f"{left} case runs: stopped ({exc or 'SIGINT'}) after {time.time() - T0:.0f} s")
    print(f"\nstopped ({exc or 'SIGINT'}): the table has the {sum(len(r) for r in runs.values())} runs that finished")
signal.signal(signal.SIGTERM, signal.SIG_DFL)


def median_round(results: list[dict]) -> dict:
    """The round with the median images/s, with every round's images/s; the first failure if any round failed."""
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        return failed[0]
    ordered = sorted(results, key=lambda r: r["images_per_s"])
    rates = [r["images_per_s"] for r in results]
    return {**ordered[(len(ordered) - 1) // 2], "images_per_s_rounds": rates}


rows: list[dict] = [median_round(results) for results in runs.values()]
os.environ.pop("DITMOE_MOE_BACKEND", None)
skipped = list(dict.fromkeys(skipped))

for r in rows:  # speedup vs the official loop of the same model and batch
    base = next((b for b in rows if b["model"] == r["model"] and b["backend"] == "naive" and b["status"] == "ok"), None)
    if r["status"] == "ok" and base:
        r["speedup_vs_naive"] = r["images_per_s"] / base["images_per_s"]

mem_col = "peak alloc GiB" if CUDA else "peak RSS GiB"
rounds = f", median round of {args.rounds}" if args.rounds > 1 else ""
print(
    f"\nDiT-MoE training step, {device_name()}, {dtype}, {image_size}px, median of {iters} steps after {warmup}"
    f"{rounds}\n"
)
# host ms: until the step's Python returned (its kernels queued); near the step time, the host sets the pace
print(f"| model | backend | batch | images/s | step ms | host ms | TFLOP/s | MFU | {mem_col} | vs naive |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    if r["status"] != "ok":
        print(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['status']} | | | | | | |")
        continue
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    vs = f"{r['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in r else "-"
    rate = f"{r['images_per_s']:,.1f}"
    if len(r["images_per_s_rounds"]) > 1:
        rate += f" ({min(r['images_per_s_rounds']):,.0f}-{max(r['images_per_s_rounds']):,.0f})"
    print(
        f"| {r['model']} | {r['backend']} | {r['batch']} | {rate} | {1e3 * r['step_s']:.1f} | "
        f"{1e3 * r['host_s']:.1f} | {r['tflops']:.4g} | {mfu} | {r['peak_mem_gib']:.2f} | {vs} |"
    )
for s in skipped:
    print(f"skipped {s}")

try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
out = Path(args.out) / f"{slug}-{datetime.date.today().isoformat()}-train.json"
out.parent.mkdir(parents=True, exist_ok=True)
meta = {
    "device": device_name(),
    "torch": torch.__version__,
    "triton": getattr(sys.modules.get("triton"), "__version__", None),
    "cuda": torch.version.cuda,
    "threads": torch.get_num_threads(),
    "dtype": dtype,
    "image_size": image_size,
    "tiny": TINY,
    "warmup": warmup,
    "iters": iters,
    "rounds": args.rounds,
    "commit": commit,
    "tiles": tiles,
    "compare_tiles": {"file": args.compare_tiles, "tiles": compare_tiles} if compare_tiles is not None else None,
    "elapsed_s": round(time.time() - T0, 1),
}
out.write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=1))
print(f"wrote {out}")
