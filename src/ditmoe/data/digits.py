"""Embedded demo data: sklearn's 8x8 digits, upsampled and written as webdataset shards with a manifest."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

MANIFEST_NAME = "manifest.json"
ALLOWED_IMAGE_SIZES = (8, 16, 32, 64)
SPLITS = ("train", "val")
DIGITS_MAX_VALUE = 16  # sklearn digits pixels are integers in [0, 16]


def upsample_digits(images_N88: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear upsampling of [N, 8, 8] values in 0..16 to [N, S, S] uint8 in 0..255."""
    x_N1HW = torch.from_numpy(images_N88.astype(np.float32) * (255.0 / DIGITS_MAX_VALUE))[:, None]
    if image_size != x_N1HW.shape[-1]:
        x_N1HW = F.interpolate(x_N1HW, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x_N1HW[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def stratified_split(labels_N: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Indices per split: each class contributes round(count * val_fraction) (at least 1) to val; orders shuffled."""
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for cls in np.unique(labels_N):
        members = rng.permutation(np.flatnonzero(labels_N == cls))
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return {"train": rng.permutation(np.concatenate(train_parts)), "val": rng.permutation(np.concatenate(val_parts))}


def png_bytes(image_HW: np.ndarray) -> bytes:
    """Grayscale uint8 [H, W] -> PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image_HW).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split_shards(
    out_dir: Path, split: str, images_NHW: np.ndarray, labels_N: np.ndarray, shard_size: int
) -> list[str]:
    """Write samples {__key__, png, cls} as `<split>-000000.tar`, ...; returns the shard file names."""
    pattern = str(out_dir / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for index, (image_HW, label) in enumerate(zip(images_NHW, labels_N, strict=True)):
            writer.write({"__key__": f"{split}_{index:06d}", "png": png_bytes(image_HW), "cls": str(int(label))})
    return sorted(path.name for path in out_dir.glob(f"{split}-*.tar"))


def owned_files(data_dir: Path) -> list[str]:
    """Shard names listed by an existing manifest in data_dir (empty if there is none)."""
    manifest_path = data_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return []
    splits = json.loads(manifest_path.read_text()).get("splits", {})
    return [name for split in splits.values() for name in split.get("shards", [])]


def check_out_dir(out_dir: Path) -> None:
    """ValueError, before any work, unless ``out_dir`` is a directory or does not exist yet."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} is a file; a dataset needs a directory")


def install_dataset(staging_dir: Path, out_dir: Path, manifest: dict) -> None:
    """Move a finished staging dir into out_dir, replacing only the shards an old manifest owned.

    The manifest is removed first and written last, so an interruption leaves no readable half dataset. A new
    out_dir is made as mkdir makes folders (readable as the umask allows), not renamed from the staging dir, which
    tempfile.mkdtemp makes private to its owner.
    """
    out_dir.mkdir(exist_ok=True)
    new_files = [name for split in manifest["splits"].values() for name in split["shards"]]
    old_files = owned_files(out_dir)
    foreign = [name for name in new_files if (out_dir / name).exists() and name not in old_files]
    if foreign:
        raise ValueError(f"out_dir {out_dir} holds files its manifest does not list, refusing to overwrite: {foreign}")
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for name in old_files:
        (out_dir / name).unlink(missing_ok=True)
    for name in new_files:
        os.replace(staging_dir / name, out_dir / name)
    os.replace(staging_dir / MANIFEST_NAME, out_dir / MANIFEST_NAME)
    shutil.rmtree(staging_dir)


def prepare_digits(
    out_dir: Path, *, image_size: int = 16, val_fraction: float = 0.2, seed: int = 0, shard_size: int = 512
) -> dict:
    """Write sklearn digits as train/val webdataset shards plus `manifest.json` in out_dir; returns the manifest."""
    if image_size not in ALLOWED_IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {ALLOWED_IMAGE_SIZES}, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    digits = load_digits()
    images_NHW = upsample_digits(digits.images, image_size)
    labels_N = digits.target.astype(np.int64)
    classes = [str(name) for name in digits.target_names]
    split_indices = stratified_split(labels_N, val_fraction, seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        splits, per_class = {}, {}
        for split in SPLITS:
            indices = split_indices[split]
            shards = write_split_shards(staging_dir, split, images_NHW[indices], labels_N[indices], shard_size)
            splits[split] = {"count": len(indices), "shards": shards}
            counts = np.bincount(labels_N[indices], minlength=len(classes))
            per_class[split] = {name: int(count) for name, count in zip(classes, counts, strict=True)}
        manifest = {
            "format": "image",
            "dataset": "digits",
            "channels": 1,
            "image_size": image_size,
            "num_classes": len(classes),
            "classes": classes,
            "splits": splits,
            "per_class": per_class,
            "seed": seed,
            "val_fraction": val_fraction,
        }
        (staging_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        install_dataset(staging_dir, out_dir, manifest)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return manifest
