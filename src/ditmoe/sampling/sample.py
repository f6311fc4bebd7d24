"""Class-conditional sampling from a checkpoint with classifier-free guidance, and image grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from ditmoe.config import ConfigError, ModelConfig
from ditmoe.data.vae import DEFAULT_SCALING_FACTOR, Autoencoder, load_vae
from ditmoe.diffusion import Diffusion, create_diffusion, guided_model_fn
from ditmoe.models.dit import DiTMoE
from ditmoe.models.official import load_official
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.export import load_exported
from ditmoe.training.run_state import load_state_into, load_weights

GuideChannels = Literal["official", "all"] | int


@dataclass
class Sampler:
    model: DiTMoE
    diffusion: Diffusion
    checkpoint: Path
    data: dict  # the dataset manifest the model was trained on
    weights: str  # which of the checkpoint's weights the model holds: "ema" or "model" (raw)


def load_sampler(path: Path | str, *, ema: bool | None = None, device: str | None = None) -> Sampler:
    """Model and diffusion from a checkpoint, a run directory or an exported file. ``ema``: the EMA (True) or the
    raw (False) weights; None: the EMA of a checkpoint, whichever an exported file holds (it holds one)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        weights, saved = load_exported(path)
        kind = saved["weights"]
        if ema is not None and kind != ("ema" if ema else "model"):
            held, asked = ("EMA", "raw") if kind == "ema" else ("raw", "EMA")
            raise ConfigError(f"{path} holds the {held} weights alone, not the {asked} ones asked for")
        model = DiTMoE(ModelConfig.from_dict(saved["model"]))
        load_state_into(model, weights, kind, path)
        ckpt = path
    else:
        ckpt, kind = ckpt_io.resolve(path), "model" if ema is False else "ema"
        saved = ckpt_io.load_config(ckpt)
        model = DiTMoE(ModelConfig.from_dict(saved["model"]))
        load_weights(ckpt, kind, model)
    diffusion = create_diffusion(saved["train"]["diffusion"], learn_sigma=model.cfg.learn_sigma)
    return Sampler(_placed(model, device), diffusion, ckpt, saved.get("data", {}), kind)


def load_official_sampler(
    path: Path | str, cfg: ModelConfig, diffusion: str, *, ema: bool = True, device: str | None = None
) -> Sampler:
    """A checkpoint of the official DiT-MoE code (a ``.pt``, which carries no config) as ``cfg`` sampled by
    ``diffusion`` ("ddpm": the S and B releases, "rf": XL and G). Its samples are SD-VAE latents (scale 0.18215)."""
    try:
        model = load_official(path, cfg, prefer="ema" if ema else "model")
    except (KeyError, RuntimeError) as e:  # keys or shapes of another model
        first = str(e).strip().strip('"').splitlines()[0]
        raise ConfigError(
            f"{path} does not hold an official {cfg.name} at {cfg.input_size}x{cfg.input_size} latents: {first}"
        ) from None
    data, weights = {"format": "latent", "scaling_factor": DEFAULT_SCALING_FACTOR}, "ema" if ema else "model"
    return Sampler(
        _placed(model, device), create_diffusion(diffusion, learn_sigma=cfg.learn_sigma), Path(path), data, weights
    )


def _placed(model: DiTMoE, device: str | None) -> DiTMoE:
    """``model`` in eval mode on ``device`` (None: CUDA where there is one, else the CPU)."""
    return model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))).eval()


@torch.no_grad()
def generate(
    sampler: Sampler,
    labels: list[int],
    *,
    cfg_scale: float = 4.0,
    steps: str | int | None = None,
    seed: int = 0,
    guide_channels: GuideChannels = "official",
    progress: bool = True,
) -> torch.Tensor:
    """Samples [B, C, H, W] for ``labels``; ``steps`` is a respacing ("250", "ddim50") or Euler steps for RF.

    ``guide_channels``: the leading channels classifier-free guidance acts on; "official" as the official sampler of
    the diffusion (DDPM: the first 3, rectified flow: all), "all", or a count N >= 1 (the first N).
    """
    model, cfg = sampler.model, sampler.model.cfg
    if not labels:
        raise ValueError("no class labels given: nothing to sample")
    bad = sorted({c for c in labels if not 0 <= c < cfg.num_classes})
    if bad:
        raise ValueError(f"class id(s) {bad} out of range for a model with {cfg.num_classes} classes")
    if cfg_scale != 1 and cfg.class_dropout_prob == 0:
        raise ValueError(
            f"cfg_scale {cfg_scale} guides against the null class, which a model trained with "
            "class_dropout_prob 0 never learnt: sample it with cfg_scale 1"
        )
    if guide_channels == "official":
        guide_channels = sampler.diffusion.official_guide_channels
    elif guide_channels == "all":
        guide_channels = None
    elif isinstance(guide_channels, bool) or not isinstance(guide_channels, int):
        raise ValueError(f"guide_channels must be 'official', 'all' or a channel count, got {guide_channels!r}")
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(dev)
    y = torch.tensor(labels, dtype=torch.long, device=dev)

    def model_fn(x, t, y_):
        return model(x, t, y_).prediction

    fn = guided_model_fn(
        model_fn, y, model.null_class, cfg_scale, guide_channels=guide_channels, learn_sigma=cfg.learn_sigma
    )
    images = sampler.diffusion.sample(fn, noise, steps=steps, generator=gen, progress=progress)
    bad = int((~torch.isfinite(images).flatten(1).all(1)).sum())
    if bad:
        raise ValueError(f"{bad} of {len(labels)} samples hold NaN or infinite values (diverged weights?)")
    return images


def latent_decoder(sampler: Sampler, vae_dir: Path | str | None = None) -> Autoencoder | None:
    """The VAE that turns a latent model's samples into images, on the model's device; None for a pixel model.
    ``vae_dir`` None: the one the training data was encoded with (its manifest names it), with its scaling factor."""
    data, ckpt = sampler.data, sampler.checkpoint
    if data.get("format") != "latent":
        if vae_dir is not None:
            raise ConfigError(f"{ckpt} generates images, not VAE latents: it needs no --vae")
        return None
    trained_with = data.get("vae")
    vae_dir = Path(vae_dir or trained_with or "")
    if not (vae_dir / "config.json").is_file():
        where = f" (its data was encoded with {trained_with}, not found here)" if trained_with else ""
        raise ConfigError(
            f"{ckpt} generates VAE latents: pass --vae DIR, the diffusers AutoencoderKL they were encoded with{where}"
        )
    device = next(sampler.model.parameters()).device
    vae = load_vae(vae_dir, str(device), data.get("scaling_factor"))
    if vae.vae.config.latent_channels != sampler.model.cfg.in_channels:
        raise ConfigError(
            f"VAE {vae_dir} has {vae.vae.config.latent_channels} latent channels; the model in {ckpt} generates "
            f"{sampler.model.cfg.in_channels}"
        )
    return vae


def images_of(samples_BCHW: torch.Tensor, decoder: Autoencoder | None) -> torch.Tensor:
    """Images in [-1, 1] from a model's samples: decoded by the VAE for a latent model, else the samples."""
    return samples_BCHW if decoder is None else decoder.decode(samples_BCHW)


def check_image_path(path: Path | str) -> Path:
    """``path`` if PIL can write an image of its extension; ValueError naming it otherwise."""
    path = Path(path)
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"{path}: {path.suffix or 'no extension'!r} is not an image format PIL writes (e.g. .png)")
    return path


def to_uint8(images_BCHW: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> uint8 [B, H, W, C]."""
    x = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images_BCHW: torch.Tensor, path: Path | str, nrow: int, upscale: int = 1, pad: int = 1) -> Path:
    """Tile images row by row (``nrow`` per row) into one PNG."""
    imgs = to_uint8(images_BCHW)
    B, H, W, C = imgs.shape
    rows = -(-B // nrow)
    grid = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[pad + r * (H + pad) : pad + r * (H + pad) + H, pad + c * (W + pad) : pad + c * (W + pad) + W] = img
    path = check_image_path(path)
    pil = Image.fromarray(grid[..., 0] if C == 1 else grid)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil.save(path)
    return path
