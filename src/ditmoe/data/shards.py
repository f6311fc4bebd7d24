"""Reading manifest-described webdataset shards: a deterministic, rank-split batch loader and whole-split tensors.

Sample formats, chosen by which key a sample holds: `png` / `jpg` images (scaled to [-1, 1], [C, H, W]) or
`latent.npy` (optionally with `latent_flip.npy`, picked half the time when shuffling); every sample has `cls`.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from ditmoe.data.digits import MANIFEST_NAME

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg")
LATENT_KEY = "latent.npy"
LATENT_FLIP_KEY = "latent_flip.npy"


def read_manifest(data_dir: Path) -> dict:
    """Load `data_dir/manifest.json`; FileNotFoundError naming data_dir when it, or its manifest, is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    if not any(data_dir.iterdir()):
        raise FileNotFoundError(f"data directory {data_dir} is empty (prepare a dataset into it first)")
    manifest_path = data_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"data directory {data_dir} has no {MANIFEST_NAME}")
    return json.loads(manifest_path.read_text())


def split_shard_paths(data_dir: Path, manifest: dict, split: str) -> list[Path]:
    """Shard paths the manifest lists for split; ValueError if there are none, FileNotFoundError if one is gone."""
    names = manifest.get("splits", {}).get(split, {}).get("shards", [])
    if not names:
        raise ValueError(f"manifest in {data_dir} lists no shards for split {split!r}")
    paths = [Path(data_dir) / name for name in names]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in the manifest of {data_dir} are missing: {missing}")
    return paths


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> float32 [C, H, W] in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        array_HWC = np.asarray(image.convert("L" if channels == 1 else "RGB")).reshape(image.height, image.width, -1)
    return torch.from_numpy(array_HWC.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def decode_input(sample: dict, channels: int, flip_rng: random.Random | None) -> torch.Tensor:
    """The model input of a sample, by which key is present; flip_rng=None never picks the flipped latent."""
    for key in IMAGE_KEYS:
        if key in sample:
            return decode_image(sample[key], channels)
    if LATENT_KEY in sample:
        use_flip = flip_rng is not None and LATENT_FLIP_KEY in sample and flip_rng.random() < 0.5
        array = np.load(io.BytesIO(sample[LATENT_FLIP_KEY if use_flip else LATENT_KEY]))
        return torch.from_numpy(array.astype(np.float32))
    raise ValueError(f"sample {sample.get('__key__')!r} has none of {IMAGE_KEYS + (LATENT_KEY,)}: {sorted(sample)}")


def parse_label(sample: dict, num_classes: int) -> int | None:
    """The `cls` label as an int, or None (with a warning) if it is missing, malformed or outside [0, num_classes)."""
    text = sample.get("cls", b"")
    text = text.decode() if isinstance(text, bytes) else str(text)
    try:
        label = int(text.strip())
    except ValueError:
        label = -1
    if 0 <= label < num_classes:
        return label
    logger.warning("skipping sample %r: label %r is not in [0, %d)", sample.get("__key__"), text, num_classes)
    return None


class ShardStream(IterableDataset):
    """Batches of one consumer (rank x worker) as (x [B, ...], y [B], skipped_labels); used through ShardLoader."""

    def __init__(
        self,
        shards: list[Path],
        *,
        channels: int,
        num_classes: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle_buffer: int,
        epochs: int | None,
        drop_last: bool,
    ):
        self.shards = shards
        self.channels = channels
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.epochs = epochs
        self.drop_last = drop_last

    def epoch_samples(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[dict]:
        """Raw samples this consumer reads in one epoch: whole shards when there are enough, else every k-th sample."""
        shuffle = self.shuffle_buffer > 1
        shards = [str(path) for path in self.shards]
        if shuffle:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(shards)  # same order on every consumer
        split_by_shard = len(shards) >= num_consumers
        stages = [wds.SimpleShardList(shards[consumer::num_consumers] if split_by_shard else shards)]
        stages.append(wds.tarfile_to_samples())
        if not split_by_shard:
            stages.append(lambda samples: islice(samples, consumer, None, num_consumers))
        if shuffle:
            rng = random.Random(f"samples:{self.seed}:{epoch}:{consumer}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        return iter(wds.DataPipeline(*stages))

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int]]:
        worker_info = torch.utils.data.get_worker_info()
        worker, num_workers = (worker_info.id, worker_info.num_workers) if worker_info else (0, 1)
        consumer, num_consumers = self.rank * num_workers + worker, self.world_size * num_workers
        inputs, labels, skipped = [], [], 0
        for epoch in count() if self.epochs is None else range(self.epochs):
            flip_rng = random.Random(f"flip:{self.seed}:{epoch}:{consumer}") if self.shuffle_buffer > 1 else None
            for sample in self.epoch_samples(epoch, consumer, num_consumers):
                label = parse_label(sample, self.num_classes)
                if label is None:
                    skipped += 1
                    continue
                inputs.append(decode_input(sample, self.channels, flip_rng))
                labels.append(label)
                if len(inputs) == self.batch_size:
                    yield torch.stack(inputs), torch.tensor(labels, dtype=torch.int64), skipped
                    inputs, labels, skipped = [], [], 0
        if inputs and not self.drop_last:
            yield torch.stack(inputs), torch.tensor(labels, dtype=torch.int64), skipped
        elif skipped:
            yield None, None, skipped


class ShardLoader:
    """Iterable of (x [B, C, H, W] float32, y [B] int64); `skipped_labels` counts bad labels of the current pass."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream = stream
        self.num_workers = num_workers
        self.skipped_labels = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.skipped_labels = 0
        if self.num_workers == 0:
            batches = iter(self.stream)
        else:
            batches = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers)
        for inputs, labels, skipped in batches:
            self.skipped_labels += int(skipped)
            if inputs is not None:
                yield inputs, labels


def make_loader(
    data_dir: Path,
    split: str = "train",
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    epochs: int | None = None,
    drop_last: bool = True,
) -> ShardLoader:
    """Batches of a split for this rank: infinite and reshuffled per epoch by default; `epochs=1` for one pass.

    Shards are shuffled with (seed, epoch) and dealt to the world_size * max(num_workers, 1) consumers; with fewer
    shards than consumers every consumer reads all shards and keeps every k-th sample. `shuffle_buffer <= 1`
    disables all shuffling (manifest order). Same arguments -> identical batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be None (infinite) or >= 1, got {epochs}")
    manifest = read_manifest(data_dir)
    shards = split_shard_paths(data_dir, manifest, split)
    num_samples = manifest["splits"][split]["count"]
    num_consumers = world_size * max(num_workers, 1)
    if num_samples < num_consumers:
        raise ValueError(f"split {split!r} of {data_dir} has {num_samples} samples for {num_consumers} consumers")
    stream = ShardStream(
        shards,
        channels=manifest["channels"],
        num_classes=manifest["num_classes"],
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        epochs=epochs,
        drop_last=drop_last,
    )
    return ShardLoader(stream, num_workers)


def load_split_tensors(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in manifest order: x [N, C, H, W] float32 (images in [-1, 1]), y [N] int64; skips bad labels."""
    manifest = read_manifest(data_dir)
    shards = split_shard_paths(data_dir, manifest, split)
    inputs, labels = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList([str(path) for path in shards]), wds.tarfile_to_samples()):
        label = parse_label(sample, manifest["num_classes"])
        if label is not None:
            inputs.append(decode_input(sample, manifest["channels"], flip_rng=None))
            labels.append(label)
    if not inputs:
        raise ValueError(f"split {split!r} of {data_dir} has no sample with a valid label")
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.int64)
