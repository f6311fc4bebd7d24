"""ImageNet-style class-per-folder trees: scanning, the stable class index, and the ADM center crop."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
CLASSES_NAME = "classes.json"


def class_index(src: Path) -> dict[str, int]:
    """Sorted non-hidden sub-folder names of src -> ids 0..K-1; ValueError naming src if it has none."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist")
    names = sorted(entry.name for entry in src.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise ValueError(f"image folder {src} has no class sub-folders (expected SRC/<class>/<image>)")
    return {name: index for index, name in enumerate(names)}


def read_class_index(path: Path) -> dict[str, int]:
    """A `classes.json` (name -> id, ids 0..K-1 without gaps); ValueError naming the file if it is malformed."""
    index = json.loads(Path(path).read_text())
    if not isinstance(index, dict) or sorted(index.values()) != list(range(len(index))):
        raise ValueError(f"class index {path} must map class names to ids 0..K-1, got {str(index)[:200]}")
    return {str(name): int(cid) for name, cid in index.items()}


def write_class_index(path: Path, index: dict[str, int]) -> None:
    """Write name -> id JSON atomically (temp file then rename)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)


def scan_images(src: Path, index: dict[str, int]) -> list[tuple[str, int]]:
    """(path, class id) of every image file under src/<class>/ (recursive, sorted); folders not in index -> error."""
    src = Path(src)
    unknown = sorted(set(class_index(src)) - set(index))
    if unknown:
        raise ValueError(f"image folder {src} has class folders missing from the class index: {unknown[:10]}")
    items = []
    for name, cid in sorted(index.items(), key=lambda kv: kv[1]):
        folder = src / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((str(p), cid) for p in files)
    if not items:
        raise ValueError(f"image folder {src} holds no images with suffixes {IMAGE_SUFFIXES}")
    return items


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB: image.convert("RGB"), which clips grayscale deeper than 8 bits at 255 (near-white).

    Such grayscale (modes I;16*, I, F) is first taken as 16-bit: v -> round(v * 255 / 65535), v clipped to
    [0, 65535]; an F image whose values all lie in [0, 1] is taken as [0, 1] instead: v -> round(v * 255).
    """
    if image.mode == "F" or image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" and values.max(initial=0) <= 1 else 65535.0
        image = Image.fromarray(np.rint(np.clip(values, 0, top) * (255 / top)).astype(np.uint8))
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/DiT center crop: halve with BOX while the short side >= 2*size, BICUBIC to short side = size, crop.

    Returns uint8 [size, size, 3] RGB (see to_rgb for images deeper than 8 bits).
    """
    image = to_rgb(image)
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array_HWC = np.asarray(image)
    top = (array_HWC.shape[0] - image_size) // 2
    left = (array_HWC.shape[1] - image_size) // 2
    return np.ascontiguousarray(array_HWC[top : top + image_size, left : left + image_size])
