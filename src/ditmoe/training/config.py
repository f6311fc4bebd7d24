"""Training configuration: a dataclass, a registry of presets, and model construction from data + preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ditmoe.config import ConfigError, ModelConfig, model_config
from ditmoe_kernels.tiles import load_tiles


class TrainingAborted(RuntimeError):
    """The run stopped itself: too many consecutive non-finite steps."""


@dataclass
class TrainConfig:
    data: str = "data/digits"  # shard directory holding manifest.json
    out: str = "runs/default"
    model: str = "DiT-MoE-S/2-8E2A"
    model_opts: dict = field(default_factory=dict)  # ModelConfig overrides; nested "moe" dict for MoEConfig
    diffusion: Literal["ddpm", "rf"] = "ddpm"
    steps: int = 400_000
    batch_size: int = 256  # global: summed over ranks and gradient-accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1+step)/(10+step)); for short runs
    grad_clip: float = 0.0  # 0 = no clipping (official)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs DeepSpeed (loss scaling)
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 5000
    keep_last: int = 3  # committed checkpoints kept; 0 keeps all
    num_workers: int = 0
    wandb: bool = False
    wandb_project: str = "ditmoe"
    resume: bool = False
    init_from: str = ""  # checkpoint whose model and EMA weights start a fresh run (any EP size / world size)
    ep_size: int = 1  # expert parallelism: ranks a layer's experts are split over
    deepspeed_config: str = ""  # DeepSpeed JSON (ds_configs/); default under a launcher: ZeRO-2 in `precision`
    max_skipped_steps: int = 10  # consecutive non-finite steps before the run aborts
    peak_tflops: float = 0.0  # per device, for MFU; 0: from the table of known devices
    # Triton tile overrides for the whole run, {kind: {setting: value}}: a JSON file (bench_kernels.py --sweep
    # --write-tiles tunes one on this GPU) or JSON text; "": the built-in tables
    kernel_tiles: str = ""

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "ep_size", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("keep_last", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.diffusion not in ("ddpm", "rf"):
            raise ConfigError(f"diffusion must be 'ddpm' or 'rf', got {self.diffusion!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.peak_tflops < 0:
            raise ConfigError("grad_clip, warmup_steps, weight_decay and peak_tflops must be >= 0")
        if self.resume and self.init_from:
            raise ConfigError("--resume continues this run's own checkpoints; --init-from starts a new run: pick one")
        kernel_tiles(self.kernel_tiles)

    def micro_batch(self, world_size: int) -> int:
        """Samples per rank per forward; ConfigError unless the global batch splits evenly."""
        per = world_size * self.grad_accum
        if self.batch_size % per:
            raise ConfigError(
                f"batch_size={self.batch_size} does not split over {world_size} ranks x grad_accum={self.grad_accum}"
            )
        return self.batch_size // per

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def kernel_tiles(spec: str) -> dict[str, dict]:
    """Tile overrides for ``tile_overrides(**tiles)`` from a ``kernel_tiles`` value ({} for ""); ConfigError naming
    the file and what is wrong in it."""
    try:
        return load_tiles(spec) if spec else {}
    except ValueError as exc:
        raise ConfigError(f"kernel_tiles {exc}") from None


TRAIN_PRESETS: dict[str, dict] = {
    # The paper's recipe for ImageNet-256 latents (data from `ditmoe prepare images --latents`).
    "imagenet256-S-8E2A": dict(model="DiT-MoE-S/2-8E2A", steps=400_000, batch_size=256),
    "imagenet256-XL-8E2A": dict(model="DiT-MoE-XL/2-8E2A", diffusion="rf", steps=700_000, batch_size=1024),
    # Minutes on 2 CPU cores: the embedded digits dataset (`make demo`).
    "digits-demo": dict(
        data="data/digits",
        out="runs/digits-demo",
        model="DiT-MoE-tiny/4-4E2A",
        diffusion="rf",  # learns the digits several times faster than DDPM here (see README)
        steps=2000,
        batch_size=64,
        lr=1e-3,
        warmup_steps=100,
        ema_decay=0.999,
        ema_warmup=True,
        grad_clip=1.0,
        log_every=100,
        ckpt_every=500,
    ),
    # Seconds: for tests.
    "digits-smoke": dict(
        model="DiT-MoE-micro/4-4E2A", steps=4, batch_size=8, lr=1e-3, ema_decay=0.9, log_every=2, ckpt_every=2
    ),
}


def train_config(preset: str | None = None, **overrides) -> TrainConfig:
    if preset is not None and preset not in TRAIN_PRESETS:
        raise ConfigError(f"unknown training preset {preset!r}; known: {', '.join(TRAIN_PRESETS)}")
    values = dict(TRAIN_PRESETS.get(preset, {}))
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def model_config_for_data(cfg: TrainConfig, manifest: dict) -> ModelConfig:
    """The preset's model shaped for the dataset: pixels (channels, size) or VAE latents, and its classes."""
    opts = dict(cfg.model_opts)
    size_key = "latent_size" if manifest.get("format") == "latent" else "image_size"
    if size_key not in manifest:
        raise ValueError(f"manifest in {cfg.data} lacks {size_key!r}, which sizes the model")
    # the model sees the stored images or latents, whatever the VAE's downsampling
    decided = dict(input_size=manifest[size_key], in_channels=manifest["channels"], num_classes=manifest["num_classes"])
    clash = sorted(set(opts) & {*decided, "name", "image_size", "latent"})
    if clash:
        raise ConfigError(
            f"model option(s) {', '.join(clash)} come from the dataset in {cfg.data} and the preset name "
            f"{cfg.model!r} ({', '.join(f'{k}={v}' for k, v in decided.items())}): they cannot be overridden"
        )
    return model_config(
        cfg.model,
        image_size=decided["input_size"],
        latent=False,
        in_channels=decided["in_channels"],
        num_classes=decided["num_classes"],
        **opts,
    )
