"""`ditmoe prepare images`: a class-per-folder tree -> center-cropped image (or VAE latent) webdataset shards."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ditmoe.data.digits import MANIFEST_NAME, check_out_dir, install_dataset, stratified_split
from ditmoe.data.imagefolder import (
    CLASSES_NAME,
    center_crop_arr,
    class_index,
    read_class_index,
    scan_images,
    write_class_index,
)
from ditmoe.data.shard_writer import ShardSink

logger = logging.getLogger(__name__)

IMAGE_FORMATS = ("jpg", "png")
JPEG_QUALITY = 95

# (split key index, label, uint8 [S, S, 3] array or encoded bytes, None) or (..., None, error message)
Loaded = tuple[int, int, "np.ndarray | bytes | None", "str | None"]


def encode_image(array_HWC: np.ndarray, image_format: str) -> bytes:
    """uint8 [H, W, 3] -> JPEG (quality 95, 4:4:4) or PNG bytes."""
    buffer = io.BytesIO()
    if image_format == "jpg":
        Image.fromarray(array_HWC).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
        Image.fromarray(array_HWC).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy file bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def load_item(item: tuple[int, str, int], image_size: int, image_format: str | None) -> Loaded:
    """Worker job: open, center-crop and (if image_format) encode one file; errors come back as text."""
    index, path, label = item
    try:
        with Image.open(path) as image:
            array_HWC = center_crop_arr(image, image_size)
        return index, label, (encode_image(array_HWC, image_format) if image_format else array_HWC), None
    except Exception as e:  # noqa: BLE001 - any unreadable file is skipped and reported, never fatal
        return index, label, None, f"{type(e).__name__}: {e}"


def parallel_map(fn: Callable, items: list, workers: int, desc: str, progress: bool) -> Iterator:
    """fn over items in order, in `workers` processes (0: in this process), with a tqdm bar."""
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 0:
            for item in items:
                yield fn(item)
                bar.update(1)
            return
        with multiprocessing.get_context().Pool(workers) as pool:
            for result in pool.imap(fn, items, chunksize=max(1, min(64, len(items) // (8 * workers)))):
                yield result
                bar.update(1)
    finally:
        bar.close()


def batched(results: Iterable[Loaded], size: int) -> Iterator[list[Loaded]]:
    """Consecutive lists of `size` results (the last may be shorter)."""
    batch = []
    for result in results:
        batch.append(result)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def split_items(items: list[tuple[str, int]], val_fraction: float, seed: int) -> dict[str, list[tuple[str, int]]]:
    """Shuffled (seeded) train items, and a stratified val split when val_fraction > 0."""
    labels_N = np.array([label for _, label in items], dtype=np.int64)
    if val_fraction <= 0:
        return {"train": [items[i] for i in np.random.default_rng(seed).permutation(len(items))]}
    indices = stratified_split(labels_N, val_fraction, seed)
    return {split: [items[i] for i in order] for split, order in indices.items()}


def prepare_images(
    src: Path,
    out_dir: Path,
    *,
    image_size: int = 256,
    shard_size: int | None = None,
    shard_bytes: int | None = None,
    workers: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
    image_format: str = "jpg",
    class_index_path: Path | None = None,
    latents: bool = False,
    vae_dir: Path | None = None,
    device: str = "auto",
    batch_size: int = 32,
    scaling_factor: float | None = None,
    progress: bool = True,
) -> dict:
    """Write src/<class>/<image> as `<split>-NNNNNN.tar` shards + `manifest.json` + `classes.json`; the manifest.

    Pixels: samples {__key__, jpg|png, cls} of ADM-center-cropped RGB images (format "image", channels 3).
    Latents: {__key__, latent.npy, latent_flip.npy, cls}, fp16 [C, S/f, S/f] = VAE posterior mean * scaling factor
    of the image and of its horizontal flip (format "latent"). Unreadable images are skipped and listed.
    Default shard size: 1000 samples unless shard_bytes is given.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if latents and vae_dir is None:
        raise ValueError("latents=True needs vae_dir (a diffusers AutoencoderKL directory)")
    if shard_size is None and shard_bytes is None:
        shard_size = 1000
    src, out_dir = Path(src), Path(out_dir)
    check_out_dir(out_dir)
    index = read_class_index(class_index_path) if class_index_path else class_index(src)
    classes = [name for name, _ in sorted(index.items(), key=lambda kv: kv[1])]
    items = scan_images(src, index)
    splits = split_items(items, val_fraction, seed)
    if val_fraction > 0 and not splits["val"]:  # every class has one image, which train keeps
        raise ValueError(
            f"val_fraction {val_fraction} leaves the val split empty: {len(items)} images in "
            f"{len({label for _, label in items})} classes under {src}, and a class needs 2 images to give one to val"
        )

    encoder = None
    if latents:
        from ditmoe.data.vae import load_vae

        encoder = load_vae(vae_dir, device, scaling_factor)
        if image_size % encoder.downsample:
            raise ValueError(f"image_size {image_size} is not divisible by the VAE downsampling {encoder.downsample}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        split_info, per_class, skipped, latent_size = {}, {}, [], None
        for split, items in splits.items():
            sink = ShardSink(staging, split, max_count=shard_size, max_bytes=shard_bytes)
            counts = np.zeros(len(classes), dtype=np.int64)
            jobs = [(i, path, label) for i, (path, label) in enumerate(items)]
            load = partial(load_item, image_size=image_size, image_format=None if latents else image_format)
            results = parallel_map(load, jobs, workers, f"{split} {'latents' if latents else 'images'}", progress)
            for batch in batched(results, batch_size if latents else 1):
                good = []
                for i, label, payload, error in batch:
                    if error is None:
                        good.append((i, label, payload))
                    else:
                        logger.warning("skipping unreadable image %s: %s", items[i][0], error)
                        skipped.append({"path": items[i][0], "error": error})
                if not good:
                    continue
                if encoder is None:
                    payloads = [{image_format: payload} for _, _, payload in good]
                else:
                    images_BHWC = np.stack([payload for _, _, payload in good])
                    both = encoder.encode(np.concatenate([images_BHWC, images_BHWC[:, :, ::-1]]))
                    latent_size = both.shape[-1]
                    payloads = [
                        {
                            "latent.npy": npy_bytes(both[j].astype(np.float16)),
                            "latent_flip.npy": npy_bytes(both[len(good) + j].astype(np.float16)),
                        }
                        for j in range(len(good))
                    ]
                for (i, label, _), payload in zip(good, payloads, strict=True):
                    sink.write({"__key__": f"{split}_{i:08d}", **payload, "cls": str(label)})
                    counts[label] += 1
            records = sink.close()
            if not records:
                raise ValueError(f"no image under {src} could be read for split {split!r}")
            split_info[split] = {
                "count": int(counts.sum()),
                "shards": [r["name"] for r in records],
                "shard_info": records,
            }
            per_class[split] = {name: int(n) for name, n in zip(classes, counts, strict=True)}
        manifest = {
            "format": "latent" if latents else "image",
            "dataset": "imagefolder",
            "source": str(src),
            "channels": 3,
            "image_size": image_size,
            "num_classes": len(classes),
            "classes": classes,
            "splits": split_info,
            "per_class": per_class,
            "skipped": skipped,
            "seed": seed,
            "val_fraction": val_fraction,
        }
        if latents:
            manifest.update(
                channels=int(encoder.vae.config.latent_channels),
                latent_size=int(latent_size),
                scaling_factor=encoder.scaling_factor,
                vae=str(vae_dir),
                vae_downsample=encoder.downsample,
                latent_dtype="float16",
                latent_stat="posterior mean",
            )
        else:
            manifest["image_format"] = image_format
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        install_dataset(staging, out_dir, manifest)
        write_class_index(out_dir / CLASSES_NAME, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
