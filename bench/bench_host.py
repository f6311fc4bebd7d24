"""The host's share of a training step: aten ops issued and milliseconds per phase, at a depth where it matters.

Small models on a GPU are paced by how fast the host issues their kernels (bench_train's "host ms" column shows it).
This measures that cost without a GPU: the trainer's own step (``train_step``, ``TorchStepper.step``, ``EMA.update``)
on a model of a preset's depth and block structure but width 32 and 4 tokens per image, on CPU, so that the time is
dispatch and Python, not arithmetic. Op counts are exact and machine-independent; times are CPU dispatch, a lower
bound for CUDA's per-op launch cost.

    python bench/bench_host.py                             # DiT-MoE-S/2-8E2A, torch MoE backend
    python bench/bench_host.py --model DiT-MoE-XL/2-8E2A --steps 30
    TRITON_INTERPRET=1 python bench/bench_host.py --backend triton --steps 1

The Triton backend runs here under the interpreter: its counts (aten ops and Triton launches, the interpreter's own
tensor work left out) are what a GPU host issues, its times are the interpreter's. Prints a markdown table and writes
nothing.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

import torch
from arguments import require_at_least  # bench/, the script's folder
from torch.utils._python_dispatch import TorchDispatchMode

from ditmoe.config import ConfigError, model_config
from ditmoe.diffusion import create_diffusion
from ditmoe.models.dit import DiTMoE
from ditmoe.training.config import TrainConfig
from ditmoe.training.ema import EMA
from ditmoe.training.loop import train_step
from ditmoe.training.stepper import TorchStepper

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", default="DiT-MoE-S/2-8E2A")
ap.add_argument("--steps", type=int, default=40, help="timed steps (after 3 untimed)")
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--backend", choices=["torch", "triton"], default="torch", help="the MoE layers' kernels")
args = ap.parse_args()
if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
    ap.error("--backend triton runs the kernels on CPU under the interpreter: set TRITON_INTERPRET=1")
require_at_least(ap, args, steps=1, batch=1)
try:
    cfg = model_config(args.model, image_size=32, moe={"backend": args.backend}, hidden_size=32, num_heads=2)
except ConfigError as exc:
    ap.error(f"--model: {exc}")


class OpCount(TorchDispatchMode):
    """aten ops, and Triton launches under the interpreter (whose own tensor ops are not the host's: not counted)."""

    def __init__(self):
        super().__init__()
        self.n = self.launches = self._inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not self._inside
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        run = self._run = InterpretedFunction.run

        def counted(fn, *a, **kw):
            self.launches += 1
            self._inside += 1
            try:
                return run(fn, *a, **kw)
            finally:
                self._inside -= 1

        InterpretedFunction.run = counted
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self._run
        return super().__exit__(*exc)


torch.set_num_threads(1)
torch.manual_seed(0)
model = DiTMoE(cfg)
stepper, ema = TorchStepper(model, TrainConfig()), EMA(model, 0.9999)
diffusion = create_diffusion("ddpm", learn_sigma=cfg.learn_sigma)
gen = torch.Generator().manual_seed(0)
x0 = torch.randn(args.batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
y = torch.randint(0, cfg.num_classes, (args.batch,), generator=gen)
PHASES = {
    "forward + backward": lambda: train_step(stepper, diffusion, x0, y, gen),
    "optimizer step": lambda: stepper.step(),
    "EMA update": lambda: ema.update(model, 0),
}

ops, times = {}, collections.defaultdict(list)
for step in range(3 + args.steps):
    for name, phase in PHASES.items():
        if step == 1:  # op counts of a step after the first (which creates the optimizer state)
            count = OpCount()
            with count:
                phase()
            ops[name] = (count.n, count.launches)
            continue
        t0 = time.perf_counter()
        phase()
        if step >= 3:
            times[name].append(time.perf_counter() - t0)

tokens = args.batch * cfg.num_tokens
print(f"{args.model}: depth {cfg.depth}, width 32, {tokens} tokens, {args.backend} MoE backend, CPU, 1 thread\n")
print("| phase | aten ops | Triton launches | ms (median) | ms (min) |")
print("|---|---:|---:|---:|---:|")
for name in PHASES:
    t = times[name]
    n, launches = ops[name]
    print(f"| {name} | {n} | {launches} | {1e3 * statistics.median(t):.2f} | {1e3 * min(t):.2f} |")
total = [sum(ts) for ts in zip(*times.values(), strict=True)]
n, launches = (sum(c) for c in zip(*ops.values(), strict=True))
print(f"| step | {n} | {launches} | {1e3 * statistics.median(total):.2f} | {1e3 * min(total):.2f} |")
if args.backend == "triton":
    print("\n(times are the Triton interpreter's, not a GPU host's; the counts are what a GPU host issues)")
