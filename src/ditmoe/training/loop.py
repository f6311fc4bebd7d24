"""The training loop: data -> diffusion loss + MoE balance loss -> optimizer step -> EMA, logs, checkpoints.

One loop for one process (plain torch) and for many (the DeepSpeed engine, expert parallelism), started by
``ditmoe train`` or by a launcher (``deepspeed``, ``torchrun``, ``srun``) around ``python -m ditmoe.train``.
The global batch and its noise do not depend on how it is split over ranks, so a run's losses do not depend on
the expert-parallel size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ditmoe.analysis.model_size import model_size
from ditmoe.analysis.routing import RoutingAccumulator
from ditmoe.config import ConfigError, ModelConfig
from ditmoe.data.shards import make_loader, read_manifest
from ditmoe.diffusion import create_diffusion
from ditmoe.models.dit import DiTMoE
from ditmoe.parallel.distributed import DistContext, init_distributed, launched_world_size, single_process
from ditmoe.parallel.ds_config import optimizer_kind
from ditmoe.parallel.expert_state import expert_slices
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training import run_state
from ditmoe.training.config import TrainConfig, TrainingAborted, kernel_tiles, model_config_for_data
from ditmoe.training.ema import EMA
from ditmoe.training.metrics import MetricsLogger
from ditmoe.training.signals import REQUEUE_MARKER, StopRequest, ignore_stop_signals
from ditmoe.training.stepper import DeepSpeedStepper, TorchStepper
from ditmoe.training.telemetry import Throughput, device_peak_flops, peak_memory
from ditmoe_kernels.tiles import tile_overrides


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    losses: list[float] = field(default_factory=list)  # per step of this process, mean total loss over ranks
    skipped_steps: int = 0
    stopped_by_signal: bool = False  # saved after SIGUSR1/SIGTERM; the caller exits with EXIT_REQUEUE


@dataclass
class StepOutput:
    loss: torch.Tensor  # [] total: diffusion + aux
    diffusion_loss: torch.Tensor
    routing: list  # per layer: its balance and z-loss (the aux loss is their sum), its routing counts


def drop_labels(
    y_B: torch.Tensor, p: float, null_class: int, gen: torch.Generator, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Replace each label by the null class with probability p; ``rows=(first, total)`` as in training_inputs."""
    if p <= 0:
        return y_B
    first, total = rows or (0, y_B.shape[0])
    drop = (torch.rand((total,), generator=gen, device=gen.device) < p)[first : first + y_B.shape[0]]
    return torch.where(drop.to(y_B.device), torch.full_like(y_B, null_class), y_B)


def train_step(stepper, diffusion, x0, y, gen: torch.Generator, rows: tuple[int, int] | None = None) -> StepOutput:
    """Forward and backward of one (micro) batch; the optimizer step is the caller's."""
    model = stepper.module
    y = drop_labels(y, model.cfg.class_dropout_prob, model.null_class, gen, rows)
    x_t, t_model, ctx = diffusion.training_inputs(x0, generator=gen, rows=rows)
    out = stepper.forward(x_t, t_model, y)
    diff_loss = diffusion.loss(out.prediction.float(), ctx)["loss"].mean()
    loss = diff_loss + out.aux_loss
    stepper.backward(loss)
    return StepOutput(loss.detach(), diff_loss.detach(), out.routing)


def logged_losses(out: StepOutput) -> torch.Tensor:
    """[4] total, diffusion, balance and router z-loss of one (micro) batch, the last two summed over the layers.

    The aux loss is their sum; they are logged apart so that a z-loss does not read as a balance loss."""
    moe_L2 = torch.stack([torch.stack([r.balance_loss, r.z_loss]) for r in out.routing])
    return torch.cat([torch.stack([out.loss, out.diffusion_loss]), moe_L2.sum(0)])


def check_same_model(saved: dict, current: ModelConfig, where: Path) -> None:
    if saved != current.to_dict():
        diff = {k: (saved.get(k), v) for k, v in current.to_dict().items() if saved.get(k) != v}
        raise ConfigError(
            f"checkpoint {where} was trained with model {saved.get('name')!r}, this run builds {current.name!r}; "
            f"differing fields (saved, requested): {diff}"
        )


def check_same_topology(saved: dict, now: dict, where: Path) -> None:
    """``saved`` and ``now`` from ``run_state.topology``; a checkpoint written before a key existed is not held
    to it."""
    if any(saved[k] != v for k, v in now.items() if k in saved):
        said = ", ".join(f"{k}={saved.get(k)}" for k in now)
        this = ", ".join(f"{k}={v}" for k, v in now.items())
        raise ConfigError(
            f"checkpoint {where} was saved with {said} and this run has {this}: its optimizer state resumes only "
            "at the same world size, ep_size and optimizer. To go on from its weights with a fresh optimizer, "
            f"start a new run with --init-from {where} (weights load at any world size and ep_size)"
        )


# What a resumed run must keep: the objective, and what lays out its batches, noise and data order (each loader
# worker reads its own share of the shards)
RESUME_KEEPS = ("diffusion", "seed", "batch_size", "grad_accum", "num_workers")


def recipe_value(key: str, value: object) -> object:
    """A RESUME_KEEPS value as it lays out the run: num_workers 0 (reading in the main process) reads as 1 does."""
    return max(value, 1) if key == "num_workers" else value


def check_same_recipe(saved: dict, cfg: TrainConfig, where: Path) -> None:
    now = cfg.to_dict()
    keys = [k for k in RESUME_KEEPS if k in saved and recipe_value(k, saved[k]) != recipe_value(k, now[k])]
    if keys:
        diff = ", ".join(f"{k}={saved[k]!r} (now {now[k]!r})" for k in keys)
        flags = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in keys)
        raise ConfigError(
            f"checkpoint {where} was trained with {diff}: a resumed run keeps its {', '.join(RESUME_KEEPS)}; "
            f"resume with {flags}. To go on from its weights with other settings, start a new run with "
            f"--init-from {where}"
        )


def uses_deepspeed(cfg: TrainConfig) -> bool:
    return bool(cfg.deepspeed_config) or launched_world_size() > 1 or dist.is_initialized()


def single_process_context(cfg: TrainConfig, device: str | None) -> DistContext:
    """A world of one for plain torch training; ConfigError for what only the DeepSpeed path can do."""
    needs = [f for f, bad in (("ep_size", cfg.ep_size > 1), ("precision", cfg.precision == "fp16")) if bad]
    if needs:
        values = ", ".join(f"{f}={getattr(cfg, f)!r}" for f in needs)
        raise ConfigError(
            f"{values} needs several ranks or DeepSpeed: run under a launcher (deepspeed --module ditmoe.train, "
            "torchrun -m ditmoe.train, srun) or pass --deepspeed-config"
        )
    return single_process(device)


def deepspeed_config(cfg: TrainConfig, ctx: DistContext) -> dict:
    from ditmoe.parallel.ds_config import load_ds_config, resolve_ds_config

    if cfg.deepspeed_config:
        ds, source = load_ds_config(cfg.deepspeed_config), cfg.deepspeed_config
    else:
        zero = {"stage": 2, "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False}
        ds = {"zero_optimization": zero, "bf16": {"enabled": cfg.precision == "bf16"}, "steps_per_print": 1 << 30}
        ds["fp16"] = {"enabled": cfg.precision == "fp16", "loss_scale": 0}
        source = "the default DeepSpeed config (ZeRO-2)"
    return resolve_ds_config(
        ds,
        micro_batch=cfg.micro_batch(ctx.world_size),
        world_size=ctx.world_size,
        ep_size=cfg.ep_size,
        grad_accum=cfg.grad_accum,
        precision=cfg.precision,
        grad_clip=cfg.grad_clip,
        source=source,
    )


def restore_weights(model: DiTMoE, cfg: TrainConfig, ctx: DistContext, topo: dict, found: Path | None) -> EMA:
    """Model and EMA weights from the run's newest checkpoint ``found``, else from ``--init-from`` (any topology).

    Returns the EMA (fresh when there is nothing to load). The optimizer's state is the stepper's business.
    """
    source = found or (ckpt_io.resolve(Path(cfg.init_from)) if cfg.init_from else None)
    if source is not None:
        saved = ckpt_io.load_config(source)
        check_same_model(saved["model"], model.cfg, source)
        if found is not None:
            check_same_recipe(saved.get("train", {}), cfg, found)
            check_same_topology(saved.get("topology", {}), topo, found)
        run_state.load_weights(source, "model", model, ctx)
    ema = EMA(model, cfg.ema_decay, warmup=cfg.ema_warmup)
    if source is not None:
        ema.load_state_dict(run_state.load_state(source, "ema", expert_slices(model), ctx))
    return ema


def train(
    cfg: TrainConfig, *, device: str | None = None, progress: bool = True, batches: Iterator | None = None
) -> TrainResult:
    """Train (or resume) ``cfg``, with its ``kernel_tiles`` in force throughout. ``batches``: this rank's (x, y)
    micro-batches instead of the shard loader. A stop signal from here on, start-up included, ends the run at the
    first step boundary."""
    cfg.validate()
    stop = StopRequest()  # before start-up (minutes for G): a signal's default action would kill the process
    try:
        with tile_overrides(**kernel_tiles(cfg.kernel_tiles)):
            return _train(cfg, device, progress, batches, stop)
    finally:
        stop.restore()


def _train(
    cfg: TrainConfig, device: str | None, progress: bool, batches: Iterator | None, stop: StopRequest
) -> TrainResult:
    out_dir = Path(cfg.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out {out_dir} is a file; the run's folder (checkpoints, metrics) must be a directory")
    ckpt_root = out_dir / "checkpoints"
    manifest = read_manifest(cfg.data)
    mcfg = model_config_for_data(cfg, manifest)
    use_ds = uses_deepspeed(cfg)
    ctx = init_distributed(cfg.ep_size, mcfg.moe.num_experts) if use_ds else single_process_context(cfg, device)
    micro = cfg.micro_batch(ctx.world_size)
    is_main = ctx.rank == 0

    torch.manual_seed(cfg.seed)  # every rank draws the same global init, then keeps its experts
    model = DiTMoE(mcfg, ep_group=ctx.groups.ep_group).to(ctx.device)
    diffusion = create_diffusion(cfg.diffusion, learn_sigma=mcfg.learn_sigma)
    # timesteps, noise and label dropout of the whole global batch, drawn on every rank where the model runs
    gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed + 1)
    step, data_state, wandb_id, skipped_total = 0, None, None, 0

    if is_main:
        (out_dir / REQUEUE_MARKER).unlink(missing_ok=True)  # this run is the requeued one
    found = ckpt_io.agree_on_newest(ckpt_root)
    if found is not None and not cfg.resume:
        raise ConfigError(f"{ckpt_root} already holds checkpoints; pass --resume to continue or choose another --out")
    ds = deepspeed_config(cfg, ctx) if use_ds else None
    topo = run_state.topology(ctx, optimizer_kind(ds))
    ema = restore_weights(model, cfg, ctx, topo, found)
    stepper = DeepSpeedStepper(model, cfg, ds, ctx.group_name) if ds is not None else TorchStepper(model, cfg)
    if found is not None:
        try:
            stepper.load_state_dict(ckpt_io.load_file(found, f"optimizer-rank{ctx.rank}", trusted=True))
        except ValueError as e:  # e.g. saved before the experts' gate and up weights became one tensor
            raise ConfigError(
                f"the optimizer state in {found} does not fit this model ({e}); its weights still load: start a "
                f"new run with --init-from {found}"
            ) from e
        state = ckpt_io.load_file(found, f"trainer-rank{ctx.rank}")
        step, data_state, wandb_id = state["step"], state["data"], state.get("wandb_id")
        skipped_total = state.get("skipped_steps", 0)
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if is_main:
            tqdm.write(f"resumed from {found} at step {step}")

    run_config = {"train": cfg.to_dict(), "model": mcfg.to_dict(), "topology": topo}
    logger = MetricsLogger(
        out_dir,
        use_wandb=cfg.wandb and is_main,
        project=cfg.wandb_project,
        run_name=out_dir.name,
        config=run_config,
        resume_id=wandb_id,
        enabled=is_main,
        start_step=step,
    )
    loader = None
    if batches is None:
        loader = make_loader(
            cfg.data,
            "train",
            batch_size=micro,
            seed=cfg.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_workers=cfg.num_workers,
            state=data_state,
            worker_init_fn=ignore_stop_signals,
        )
        batches = iter(loader)  # continues where the checkpoint's data position left off

    size = model_size(mcfg)
    peak = device_peak_flops(ctx.device, cfg.precision, cfg.peak_tflops or None)
    throughput = Throughput()
    routing = RoutingAccumulator()
    result = TrainResult(out_dir, step, skipped_steps=skipped_total)
    window: list[torch.Tensor] = []  # [4] per micro-batch: total, diffusion, balance, router z-loss
    consecutive_skips, grad_norm = 0, float("nan")

    def save() -> None:
        trainer_state = {
            "step": step,
            "data": None if loader is None else loader.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "wandb_id": logger.wandb_id or wandb_id,  # a stretch resumed without --wandb keeps the id
            "skipped_steps": result.skipped_steps,
        }
        slices = expert_slices(stepper.module)
        files = {
            **run_state.weight_files(ctx, "model", stepper.module.state_dict(), slices),
            **run_state.weight_files(ctx, "ema", ema.state_dict(), slices),
            f"optimizer-rank{ctx.rank}": stepper.state_dict(),
            f"trainer-rank{ctx.rank}": trainer_state,
        }
        ckpt_io.save_checkpoint(ckpt_root, step, files, {**run_config, "data": manifest}, keep_last=cfg.keep_last)

    stepper.module.train()
    first_step = step
    throughput.start()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (progress and is_main), desc="train", dynamic_ncols=True)
    try:
        while step < cfg.steps:
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            stepper.set_lr(lr)
            for accum in range(cfg.grad_accum):
                x0, y = next(batches)
                x0, y = x0.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
                first = (accum * ctx.world_size + ctx.rank) * micro
                out = train_step(stepper, diffusion, x0, y, gen, rows=(first, cfg.batch_size))
                routing.add(out.routing)
                window.append(logged_losses(out) / cfg.grad_accum)
            applied = stepper.step()
            grad_norm = applied.grad_norm
            if applied.applied:
                ema.update(stepper.module, step)
                consecutive_skips = 0
            else:
                result.skipped_steps += 1
                consecutive_skips += 1
                if is_main:
                    tqdm.write(f"step {step + 1}: non-finite loss or gradient on some rank; every rank skipped it")
                if consecutive_skips >= cfg.max_skipped_steps:
                    raise TrainingAborted(
                        f"{consecutive_skips} consecutive steps had non-finite losses or gradients (last: step "
                        f"{step + 1}); stopping. Lower the learning rate or check the data; the last good checkpoint "
                        f"is in {ckpt_root}"
                    )
            step += 1
            if step == first_step + 1:  # this process's first step: kernel compilation, caches, loader start-up
                throughput.start()
            else:
                throughput.add(cfg.batch_size // ctx.world_size)
            bar.update(1)

            # every rank agrees on stopping; a checkpoint step also ends the log window, so that a resumed run
            # logs every step and the same windows as an uninterrupted one
            stop_now = stop.agreed(ctx.device)
            save_now = step % cfg.ckpt_every == 0 or step == cfg.steps or stop_now
            if step % cfg.log_every == 0 or save_now:
                losses_S4 = _mean_over_ranks(torch.stack(window).view(-1, cfg.grad_accum, 4).sum(1))
                result.losses.extend(losses_S4[:, 0].tolist())
                routing.all_reduce()
                scalars = {
                    "loss": losses_S4[:, 0].mean().item(),
                    "diffusion_loss": losses_S4[:, 1].mean().item(),
                    "balance_loss": losses_S4[:, 2].mean().item(),
                    **({"z_loss": losses_S4[:, 3].mean().item()} if mcfg.moe.router_z_loss > 0 else {}),
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "skipped_steps": result.skipped_steps,
                    **throughput.summary(ctx.world_size, mcfg.num_tokens, size.train_flops, peak),
                    **peak_memory(ctx.device),
                    **({} if loader is None else {f"data/skipped_{r}": n for r, n in loader.skipped.items()}),
                }
                logger.log(step, scalars, routing)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                routing.reset()
                window = []
                throughput.start()

            if save_now:
                with throughput.paused():
                    save()
            if stop_now:
                result.stopped_by_signal = True
                if is_main:
                    (out_dir / REQUEUE_MARKER).write_text(f"{step}\n")
                    tqdm.write(f"stop requested (signal): saved step {step}; exit to be requeued")
                break
    finally:
        bar.close()
        logger.close()
        stepper.close()
    result.step = step
    return result


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x
