"""Single-process training loop: data -> diffusion loss + MoE balance loss -> AdamW -> EMA, logs, checkpoints.

Engine-agnostic on purpose: the step (``train_step``) only needs a model, an optimizer and a diffusion process,
so the DeepSpeed entry can reuse it with its own engine.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ditmoe.analysis.routing import RoutingAccumulator
from ditmoe.config import ConfigError, ModelConfig
from ditmoe.data.shards import make_loader, read_manifest
from ditmoe.diffusion import create_diffusion
from ditmoe.models.dit import DiTMoE
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.config import TrainConfig, model_config_for_data
from ditmoe.training.ema import EMA
from ditmoe.training.metrics import MetricsLogger


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per step of this process, total loss


@dataclass
class StepOutput:
    loss: torch.Tensor  # [] total: diffusion + aux
    diffusion_loss: torch.Tensor
    aux_loss: torch.Tensor
    routing: list


def drop_labels(y_B: torch.Tensor, p: float, null_class: int, gen: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    if p <= 0:
        return y_B
    drop = torch.rand(y_B.shape, generator=gen) < p
    return torch.where(drop.to(y_B.device), torch.full_like(y_B, null_class), y_B)


def train_step(model: DiTMoE, diffusion, x0, y, gen: torch.Generator, autocast) -> StepOutput:
    """Forward and backward of one batch (the optimizer step is the caller's)."""
    cfg = model.cfg
    y = drop_labels(y, cfg.class_dropout_prob, model.null_class, gen)
    x_t, t_model, ctx = diffusion.training_inputs(x0, generator=gen)
    with autocast:
        out = model(x_t, t_model, y)
    diff_loss = diffusion.loss(out.prediction.float(), ctx)["loss"].mean()
    loss = diff_loss + out.aux_loss
    loss.backward()
    return StepOutput(loss.detach(), diff_loss.detach(), out.aux_loss.detach(), out.routing)


def check_same_model(saved: dict, current: ModelConfig, where: Path) -> None:
    if saved != current.to_dict():
        diff = {k: (saved.get(k), v) for k, v in current.to_dict().items() if saved.get(k) != v}
        raise ConfigError(
            f"checkpoint {where} was trained with model {saved.get('name')!r}, this run builds {current.name!r}; "
            f"differing fields (saved, requested): {diff}"
        )


def train(cfg: TrainConfig, *, device: str | None = None, progress: bool = True) -> TrainResult:
    cfg.validate()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(cfg.out)
    ckpt_root = out_dir / "checkpoints"
    manifest = read_manifest(cfg.data)
    mcfg = model_config_for_data(cfg, manifest)

    torch.manual_seed(cfg.seed)
    model = DiTMoE(mcfg).to(dev)
    diffusion = create_diffusion(cfg.diffusion, learn_sigma=mcfg.learn_sigma)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # timesteps, noise, label dropout
    step, data_state, wandb_id = 0, None, None

    found = ckpt_io.newest_valid(ckpt_root) if ckpt_root.exists() else None
    if found is not None and not cfg.resume:
        raise ConfigError(f"{ckpt_root} already holds checkpoints; pass --resume to continue or choose another --out")
    if found is not None:
        check_same_model(ckpt_io.load_config(found)["model"], mcfg, found)
        model.load_state_dict(ckpt_io.load_file(found, "model"))
        ema.load_state_dict(ckpt_io.load_file(found, "ema"))
        opt.load_state_dict(ckpt_io.load_file(found, "optimizer"))
        state = ckpt_io.load_file(found, "trainer")
        step, data_state, wandb_id = state["step"], state["data"], state.get("wandb_id")
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        tqdm.write(f"resumed from {found} at step {step}")

    logger = MetricsLogger(
        out_dir,
        use_wandb=cfg.wandb,
        project=cfg.wandb_project,
        run_name=out_dir.name,
        config={"train": cfg.to_dict(), "model": mcfg.to_dict()},
        resume_id=wandb_id,
    )
    loader = make_loader(
        cfg.data, "train", batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, state=data_state
    )
    batches = iter(loader)  # continues where the checkpoint's data position left off

    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else contextlib.nullcontext()
    routing = RoutingAccumulator()
    result = TrainResult(out_dir, step)
    window_loss, window_diff, window_aux, window_start, window_images = [], [], [], time.perf_counter(), 0
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train", dynamic_ncols=True)
    while step < cfg.steps:
        x0, y = next(batches)
        x0, y = x0.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        opt.zero_grad(set_to_none=True)
        out = train_step(model, diffusion, x0, y, gen, autocast)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        opt.step()
        ema.update(model, step)
        step += 1
        bar.update(1)
        routing.add(out.routing)
        window_loss.append(out.loss)
        window_diff.append(out.diffusion_loss)
        window_aux.append(out.aux_loss)
        window_images += x0.shape[0]

        if step % cfg.log_every == 0 or step == cfg.steps:
            losses = torch.stack(window_loss).tolist()
            result.losses.extend(losses)
            elapsed = time.perf_counter() - window_start
            scalars = {
                "loss": sum(losses) / len(losses),
                "diffusion_loss": torch.stack(window_diff).mean().item(),
                "balance_loss": torch.stack(window_aux).mean().item(),
                "grad_norm": float(grad_norm),
                "lr": opt.param_groups[0]["lr"],
                "images_per_s": window_images / elapsed,
                **{f"data/skipped_{reason}": n for reason, n in loader.skipped.items()},
            }
            logger.log(step, scalars, routing)
            bar.set_postfix(loss=f"{scalars['loss']:.4f}")
            routing.reset()
            window_loss, window_diff, window_aux, window_start, window_images = [], [], [], time.perf_counter(), 0

        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            trainer_state = {
                "step": step,
                "data": loader.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "wandb_id": logger.wandb_id,
            }
            ckpt_io.save_checkpoint(
                ckpt_root,
                step,
                {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "trainer": trainer_state,
                },
                {"train": cfg.to_dict(), "model": mcfg.to_dict(), "data": manifest},
                keep_last=cfg.keep_last,
            )
    bar.close()
    logger.close()
    result.step = step
    return result
