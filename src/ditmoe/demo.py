"""The embedded-digits demo: prepare -> train -> sample with guidance -> judge quality -> plot what the experts do."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ditmoe.analysis.heatmap import expert_choice_heatmaps, utilisation_heatmap
from ditmoe.analysis.specialisation import count_expert_choices
from ditmoe.data.digits import prepare_digits
from ditmoe.data.shards import load_split_tensors
from ditmoe.evaluation.digits_judge import (
    classifier_fid,
    judge_samples,
    load_judge,
    save_judge,
    train_judge,
)
from ditmoe.parallel.launch import free_port
from ditmoe.sampling.sample import generate, load_sampler, save_grid
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.config import TrainConfig, train_config
from ditmoe.training.loop import train


def launch_training(ranks: int, argv: list[str]) -> None:
    """``deepspeed --num_gpus ranks --module ditmoe.train argv`` (CPU ranks here), one torch thread per rank."""
    cores = os.cpu_count() or 1
    # one torch thread per core; DeepSpeed's deprecated-collective FutureWarnings are noise here
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)), "PYTHONWARNINGS": "ignore::FutureWarning"}
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--log_level", "warning"]
    cmd += ["--master_port", str(free_port()), "--module", "ditmoe.train", *argv]
    print("$ " + " ".join(["deepspeed", *cmd[3:]]), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"distributed training exited with code {rc}: {' '.join(cmd)}")


def train_demo(cfg: TrainConfig, ranks: int) -> None:
    """Train (or resume) the demo run: with the DeepSpeed launcher on ``ranks`` > 1 CPU ranks, experts split over
    them, else in this process."""
    if ranks <= 1:
        train(cfg)
        return
    args = ["--preset", "digits-demo", "--data", cfg.data, "--out", cfg.out, "--steps", str(cfg.steps)]
    launch_training(ranks, [*args, "--seed", str(cfg.seed), "--ep-size", str(ranks), "--resume"])


def run_demo(
    out: Path,
    *,
    steps: int | None = None,
    per_class: int = 50,
    cfg_scale: float = 1.5,
    seed: int = 0,
    ranks: int = 2,
) -> dict:
    """Run (or finish) the demo under ``out``; re-running resumes training and reuses the data and judge.

    ``ranks`` > 1 trains with the DeepSpeed launcher on that many CPU ranks, the experts split over them
    (expert parallelism); 1 trains in this process. Sampling takes the diffusion's default steps (50 Euler steps
    for rectified flow, DDPM 250).
    """
    if not math.isfinite(cfg_scale):  # found before training, not after
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    out = Path(out)
    t0 = time.perf_counter()
    data = out / "data"
    if not (data / "manifest.json").is_file():
        prepare_digits(data, image_size=16, seed=seed)

    cfg = train_config("digits-demo", data=str(data), out=str(out / "run"), steps=steps, seed=seed, resume=True)
    newest = ckpt_io.newest_valid(Path(cfg.out) / "checkpoints")
    if newest is None or ckpt_io.step_of(newest) < cfg.steps:  # else trained that far already, at any --ranks
        train_demo(cfg, ranks)

    sampler = load_sampler(out / "run")
    labels = [c for c in range(sampler.model.cfg.num_classes) for _ in range(per_class)]
    samples = generate(sampler, labels, cfg_scale=cfg_scale, seed=seed).cpu()
    grid_cols = min(per_class, 12)
    shown = torch.cat([samples[c * per_class : c * per_class + grid_cols] for c in range(10)])
    save_grid(shown, out / "samples.png", nrow=grid_cols, upscale=4)

    x_val, y_val = load_split_tensors(data, "val")
    choices = count_expert_choices(sampler.model, sampler.diffusion, x_val, y_val, seed=seed)
    load_LE = choices.shares(choices.by_level_LBE.sum(1))  # all noise levels together
    utilisation_heatmap(load_LE, out / "expert_utilisation.png", "Expert utilisation, held-out digits")
    expert_choice_heatmaps(choices, out)

    x_train, y_train = load_split_tensors(data, "train")
    judge_path = out / "judge.pt"
    if judge_path.is_file():
        judge = load_judge(judge_path)
    else:
        judge = train_judge(x_train, y_train, seed=seed)
        save_judge(judge, judge_path)
    y = torch.tensor(labels)
    real = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[: len(labels)]]
    report = {
        "judge_heldout_accuracy": judge_samples(judge, x_val, y_val),
        "sample_class_accuracy": judge_samples(judge, samples, y),
        "sample_fid_judge_features": classifier_fid(judge, samples, x_val),
        "real_train_fid_judge_features": classifier_fid(judge, real, x_val),  # the floor for this sample count
        "samples": len(labels),
        "cfg_scale": cfg_scale,
        "sampling": f"{cfg.diffusion}, default steps",
        "train_steps": ckpt_io.step_of(sampler.checkpoint),  # the run's, which may have gone past --steps before
        "model": cfg.model,
        "ranks": ranks,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict, out: Path) -> None:
    where = f"{report['ranks']} ranks, expert-parallel" if report["ranks"] > 1 else "1 process"
    print(f"\nDiT-MoE digits demo ({report['model']}, {report['train_steps']} steps on {where}, {report['wall_s']} s)")
    print(f"  judge CNN held-out accuracy     {report['judge_heldout_accuracy']:.1%}")
    print(
        f"  samples labelled as their class {report['sample_class_accuracy']:.1%}  "
        f"({report['samples']} samples, CFG {report['cfg_scale']}, {report['sampling']})"
    )
    print(
        f"  FID in the judge's features     {report['sample_fid_judge_features']:.2f}  vs held-out real digits "
        f"(real train digits score {report['real_train_fid_judge_features']:.2f})"
    )
    print(f"  images: {out / 'samples.png'}  {out / 'expert_utilisation.png'}")
    print(f"  expert specialisation: {out / 'experts_by_class.png'}  {out / 'experts_by_noise_level.png'}")
