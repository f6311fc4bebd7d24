"""Loader throughput on this machine: samples/s of make_loader over 256px image shards and 32x32x4 latent shards.

Builds a synthetic class-folder tree (JPEG photos-sized noise), prepares image shards with `prepare_images`,
writes latent shards of the SD-VAE shape (fp16 [4, 32, 32] + flip) directly, then times the loader.
Usage: python bench/bench_loader.py [--images 512] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from arguments import require_at_least  # bench/, the script's folder
from PIL import Image

from ditmoe.data.prepare_images import npy_bytes, prepare_images
from ditmoe.data.shard_writer import ShardSink
from ditmoe.data.shards import make_loader

NUM_CLASSES = 8


def make_tree(root: Path, num_images: int, seed: int = 0) -> Path:
    """num_images smooth-noise JPEGs of 500x375 (ImageNet's typical size) in NUM_CLASSES folders."""
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        folder = root / f"n{i % NUM_CLASSES:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"img{i:06d}.JPEG", quality=90)
    return root


def write_latent_shards(out: Path, num_samples: int, shard_size: int, seed: int = 0) -> Path:
    """Latent shards of the SD-VAE 256px shape with a manifest, without running a VAE."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    sink = ShardSink(out, "train", max_count=shard_size)
    for i in range(num_samples):
        latent = rng.standard_normal((2, 4, 32, 32)).astype(np.float16)
        sink.write(
            {
                "__key__": f"train_{i:08d}",
                "latent.npy": npy_bytes(latent[0]),
                "latent_flip.npy": npy_bytes(latent[1]),
                "cls": str(i % NUM_CLASSES),
            }
        )
    records = sink.close()
    manifest = {
        "format": "latent",
        "channels": 4,
        "image_size": 256,
        "latent_size": 32,
        "num_classes": NUM_CLASSES,
        "scaling_factor": 0.18215,
        "splits": {"train": {"count": num_samples, "shards": [r["name"] for r in records], "shard_info": records}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def time_loader(data_dir: Path, num_workers: int, batch_size: int, num_samples: int) -> float:
    """Samples/s of two shuffled epochs (worker start-up included)."""
    loader = make_loader(data_dir, batch_size=batch_size, seed=0, num_workers=num_workers, epochs=2, shuffle_buffer=256)
    start, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += x.shape[0]
    elapsed = time.perf_counter() - start
    assert seen >= num_samples, (seen, num_samples)
    return seen / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder of the JSON result")
    args = parser.parse_args()
    require_at_least(parser, args, images=1, batch_size=1)
    torch.set_num_threads(1)
    rows, results = (
        [],
        {
            "date": str(date.today()),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "images": args.images,
            "batch_size": args.batch_size,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tree = make_tree(tmp / "tree", args.images)
        for workers in (0, 2):
            start = time.perf_counter()
            prepare_images(tree, tmp / f"img{workers}", image_size=256, shard_size=128, workers=workers, progress=False)
            rate = args.images / (time.perf_counter() - start)
            rows.append((f"prepare images 256px jpg, {workers} workers", rate))
        size_mb = sum(p.stat().st_size for p in (tmp / "img0").glob("*.tar")) / 2**20
        latents = write_latent_shards(tmp / "lat", args.images * 4, shard_size=512)
        for workers in (0, 2):
            rows.append(
                (
                    f"load image shards 256px, {workers} workers",
                    time_loader(tmp / "img0", workers, args.batch_size, args.images),
                )
            )
            rows.append(
                (
                    f"load latent shards 4x32x32, {workers} workers",
                    time_loader(latents, workers, args.batch_size, args.images * 4),
                )
            )
    results["image_shard_mb_per_1k"] = round(size_mb * 1000 / args.images, 1)
    results["samples_per_s"] = {name: round(rate, 1) for name, rate in rows}
    print(f"{'case':<44} {'samples/s':>10}")
    for name, rate in rows:
        print(f"{name:<44} {rate:>10.1f}")
    print(f"image shards: {results['image_shard_mb_per_1k']} MB per 1000 images (jpg q95)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"loader-cpu-{results['date']}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
