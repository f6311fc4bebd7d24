"""The Stable Diffusion VAE (diffusers AutoencoderKL): images -> scaled latents for training data, and back for
samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_SCALING_FACTOR = 0.18215  # SD-VAE (sd-vae-ft-ema / ft-mse)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; anything else as torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Autoencoder:
    """A loaded VAE: ``encode`` maps uint8 [B, H, W, 3] images to scaled latents [B, 4, H/f, W/f] (posterior mean),
    ``decode`` scaled latents back to images."""

    vae: torch.nn.Module
    device: torch.device
    scaling_factor: float
    downsample: int
    source: Path  # the folder it was loaded from

    @torch.no_grad()
    def encode(self, images_BHWC: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float32 [B, C, H/f, W/f] = posterior mean * scaling_factor."""
        x = torch.from_numpy(np.ascontiguousarray(images_BHWC)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(x.to(dtype)).latent_dist.mean * self.scaling_factor
        return latents.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Scaled latents [B, C, h, w] -> images [B, 3, h*f, w*f] in [-1, 1], float32 on the VAE's device."""
        dtype = next(self.vae.parameters()).dtype
        z = latents_BCHW.to(self.device, dtype) / self.scaling_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def load_vae(vae_dir: Path, device: str = "auto", scaling_factor: float | None = None) -> Autoencoder:
    """AutoencoderKL.from_pretrained(vae_dir) in eval mode on device; FileNotFoundError naming vae_dir when it, its
    config.json or its weights are missing (or diffusers cannot read them)."""
    from diffusers import AutoencoderKL  # imported here: only latent data and latent samples need diffusers

    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"VAE directory {vae_dir} has no config.json (expected a diffusers AutoencoderKL)")
    dev = resolve_device(device)
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir))
    except OSError as e:  # diffusers: no weights file, unreadable config
        raise FileNotFoundError(f"cannot load a diffusers AutoencoderKL from VAE directory {vae_dir}: {e}") from None
    vae = vae.to(dev).eval()
    factor = scaling_factor if scaling_factor is not None else getattr(vae.config, "scaling_factor", None)
    downsample = 2 ** (len(vae.config.block_out_channels) - 1)
    return Autoencoder(vae, dev, float(factor or DEFAULT_SCALING_FACTOR), downsample, vae_dir)
