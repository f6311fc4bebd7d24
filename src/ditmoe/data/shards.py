"""Reading manifest-described webdataset shards: a deterministic, rank-split, resumable batch loader.

Sample formats, chosen by which key a sample holds: `png` / `jpg` images (scaled to [-1, 1], [C, H, W]) or
`latent.npy` (optionally with `latent_flip.npy`, picked half the time when shuffling); every sample has `cls`.
Bad data (see `tario.SKIP_REASONS`) is skipped with a warning and counted in `ShardLoader.skipped`.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from ditmoe.data.digits import MANIFEST_NAME
from ditmoe.data.tario import iter_unique, missing_local, resolve_urls

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg")
LATENT_KEY = "latent.npy"
LATENT_FLIP_KEY = "latent_flip.npy"
STATE_VERSION = 1
MANIFEST_KEYS = ("channels", "num_classes", "splits")  # every reader needs these
SPLIT_KEYS = ("count", "shards")


def read_manifest(data_dir: Path) -> dict:
    """Load `data_dir/manifest.json`, with the keys its readers need (MANIFEST_KEYS, and SPLIT_KEYS in each split).

    FileNotFoundError naming data_dir when it, or its manifest, is missing; ValueError naming the manifest when it
    is not a JSON object or lacks one of those keys.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    if not any(data_dir.iterdir()):
        raise FileNotFoundError(f"data directory {data_dir} is empty (prepare a dataset into it first)")
    manifest_path = data_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise FileNotFoundError(f"data directory {data_dir} has no {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as e:
        raise ValueError(f"{manifest_path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} holds a {type(manifest).__name__}, not a JSON object")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"{manifest_path} lacks {', '.join(map(repr, missing))}")
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not all(isinstance(info, dict) for info in splits.values()):
        raise ValueError(f"'splits' in {manifest_path} must map split names to objects")
    for split, info in splits.items():
        missing = [key for key in SPLIT_KEYS if key not in info]
        if missing:
            raise ValueError(f"split {split!r} in {manifest_path} lacks {', '.join(map(repr, missing))}")
    return manifest


def split_urls(data_dir: Path, manifest: dict, split: str, shards: str | list[str] | None = None) -> list[str]:
    """Shard URLs of a split (or of `shards`, which overrides the manifest's list; braces and pipe: allowed).

    ValueError if there are none; missing local shards are warned about (the loader skips and counts them),
    FileNotFoundError naming them when every shard is missing.
    """
    names = shards if shards is not None else manifest.get("splits", {}).get(split, {}).get("shards", [])
    urls = resolve_urls(data_dir, names) if names else []
    if not urls:
        raise ValueError(f"manifest in {data_dir} lists no shards for split {split!r}")
    missing = missing_local(urls)
    if missing and len(missing) == len(urls):
        raise FileNotFoundError(f"every shard of split {split!r} of {data_dir} is missing: {missing}")
    if missing:
        logger.warning(
            "split %r of %s: %d shards are missing and will be skipped: %s", split, data_dir, len(missing), missing[:10]
        )
    return urls


def expected_shape(manifest: dict) -> tuple[int, int, int] | None:
    """[C, S, S] every sample must decode to, from the manifest (None when it does not say)."""
    channels = manifest.get("channels")
    size = manifest.get("latent_size") if manifest.get("format") == "latent" else manifest.get("image_size")
    return (int(channels), int(size), int(size)) if channels and size else None


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """PNG/JPEG bytes -> float32 [C, H, W] in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as image:
        array_HWC = np.asarray(image.convert("L" if channels == 1 else "RGB")).reshape(image.height, image.width, -1)
    return torch.from_numpy(array_HWC.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def decode_input(sample: dict, channels: int, flip: bool = False) -> torch.Tensor:
    """The model input of a sample, by which key is present; flip=True picks `latent_flip.npy` when present."""
    for key in IMAGE_KEYS:
        if key in sample:
            return decode_image(sample[key], channels)
    if LATENT_KEY in sample:
        use_flip = flip and LATENT_FLIP_KEY in sample
        array = np.load(io.BytesIO(sample[LATENT_FLIP_KEY if use_flip else LATENT_KEY]), allow_pickle=False)
        return torch.from_numpy(array.astype(np.float32))
    raise ValueError(f"sample {sample.get('__key__')!r} has none of {IMAGE_KEYS + (LATENT_KEY,)}: {sorted(sample)}")


def parse_label(sample: dict, num_classes: int) -> int | None:
    """The `cls` label as an int, or None (with a warning) if it is missing, malformed or outside [0, num_classes)."""
    text = sample.get("cls", b"")
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    try:
        label = int(text.strip())
    except ValueError:
        label = -1
    if 0 <= label < num_classes:
        return label
    logger.warning("skipping sample %r: label %r is not in [0, %d)", sample.get("__key__"), text, num_classes)
    return None


def coin(*parts: object) -> bool:
    """A fair, stable coin flip from its arguments (independent of process, order and hash seed)."""
    return hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=1).digest()[0] & 1 == 1


def decode_checked(
    sample: dict, *, channels: int, num_classes: int, shape: tuple | None, flip: bool, skipped: Counter
) -> tuple[torch.Tensor, int] | None:
    """(x [C, H, W] float32, label) or None, counting the reason in skipped: bad_label/undecodable/bad_shape."""
    label = parse_label(sample, num_classes)
    if label is None:
        skipped["bad_label"] += 1
        return None
    try:
        x = decode_input(sample, channels, flip)
    except Exception as e:  # noqa: BLE001 - PIL/numpy raise many types on corrupt bytes
        skipped["undecodable"] += 1
        logger.warning(
            "skipping sample %r of %s: cannot decode (%s: %s)",
            sample.get("__key__"),
            sample.get("__url__"),
            type(e).__name__,
            e,
        )
        return None
    if (shape is not None and tuple(x.shape) != shape) or not torch.isfinite(x).all():
        skipped["bad_shape"] += 1
        logger.warning(
            "skipping sample %r of %s: shape %s (expected %s) or non-finite values",
            sample.get("__key__"),
            sample.get("__url__"),
            tuple(x.shape),
            shape,
        )
        return None
    return x, label


def shuffled(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """A bounded-buffer shuffle: deterministic given rng; flushes the buffer (shuffled) at the end."""
    buffer: list = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= bufsize:
            j = rng.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def zero_position() -> dict:
    """Where a consumer starts: epoch 0, no samples read (raw) or used (good), reading its own share."""
    return {"epoch": 0, "raw": 0, "good": 0, "strided": None}


@dataclass
class Tally:
    """A consumer's progress in its current epoch: usable samples (in all, and in the current pass), and the pass
    from which it reads every k-th sample of all shards (None: not)."""

    good: int = 0
    pass_good: int = 0
    strided: int | None = None


@dataclass
class ShardStream(IterableDataset):
    """Batches of one consumer (rank x worker): (x [B, ...], y [B], keys, skipped, logical worker, position).

    Used through ShardLoader. `per_consumer` (samples per consumer per epoch) set: every consumer reads exactly
    that many usable samples each epoch (cutting its share or wrapping around it), so all ranks get the same
    number of batches; None: each sample of the split exactly once, shares may differ.
    """

    urls: list[str]
    channels: int
    num_classes: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    epochs: int | None
    drop_last: bool
    per_consumer: int | None = None
    resampled: bool = False
    shape: tuple[int, int, int] | None = None
    rotation: int = 0  # worker w plays logical worker (w + rotation) % num_workers (resume keeps the batch order)
    start: list[dict] = field(default_factory=list)  # start position per logical worker
    counts: dict[str, int] = field(default_factory=dict)  # samples per URL where the manifest records them

    def cycle_urls(self, epoch: int, consumer: int, num_consumers: int) -> Iterator[tuple[list[str], int, int]]:
        """(shard URLs, stride offset, stride) of each pass over this consumer's share, forever."""
        if self.resampled:
            rng = random.Random(f"resample:{self.seed}:{epoch}:{consumer}")
            while True:
                yield [rng.choice(self.urls) for _ in range(len(self.urls))], 0, 1
        order = list(self.urls)
        if self.shuffle_buffer > 1:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)  # same order on every consumer
        if len(order) >= num_consumers:
            share = (order[consumer::num_consumers], 0, 1)
        else:
            share = (order, consumer, num_consumers)  # fewer shards than consumers: every k-th sample
        while True:
            yield share

    def epoch_source(self, epoch: int, consumer: int, num_consumers: int, skipped: Counter, tally: Tally):
        """Raw samples of one epoch in consumption order: shuffled passes over the share; endless if wrapping.

        A pass without one usable sample (missing, broken or undecodable data: the caller counts usable ones in
        tally.pass_good) switches to a strided read of all shards, noting its pass in tally.strided; if a pass of
        that (or of a share that already is all shards) has none either, RuntimeError (never a hang). A resume
        replays the source without decoding: it counts each replayed sample as usable and presets tally.strided.
        """
        cycles = self.cycle_urls(epoch, consumer, num_consumers)
        for cycle in count():
            urls, offset, stride = next(cycles)
            read, tally.pass_good, before = 0, 0, Counter(skipped)
            samples = islice(iter_unique(urls, skipped, self.counts), offset, None, stride)
            if self.shuffle_buffer > 1:
                rng = random.Random(f"samples:{self.seed}:{epoch}:{consumer}:{cycle}")
                samples = shuffled(samples, self.shuffle_buffer, rng)
            for sample in samples:
                read += 1
                yield sample
            if self.per_consumer is None and not self.resampled:
                return  # exact pass: each sample once
            if tally.pass_good and cycle + 1 != tally.strided:  # equal: a resume replays the saved run's switch
                continue
            everything = (stride == num_consumers and len(urls) == len(self.urls)) or num_consumers == 1
            if everything or (tally.strided is not None and cycle >= tally.strided):
                what = f"no usable sample among the {read} read" if read else "no readable sample"
                raise RuntimeError(f"{what} in a pass over the shards {self.urls} (skipped: {dict(skipped - before)})")
            if tally.strided is None:
                logger.warning(
                    "consumer %d of %d found no usable sample in its shards %s; reading every %d-th sample of all "
                    "shards",
                    consumer,
                    num_consumers,
                    urls,
                    num_consumers,
                )
            tally.strided = cycle + 1
            cycles = iter(lambda: (self.urls, consumer, num_consumers), None)

    def consumer_batches(self, logical: int, num_workers: int) -> Iterator[tuple]:
        """Batches of logical worker `logical` of this rank, from its start position."""
        consumer, num_consumers = self.rank * num_workers + logical, self.world_size * num_workers
        start = self.start[logical] if self.start else zero_position()
        inputs, labels, keys, skipped = [], [], [], Counter()
        epochs = count(start["epoch"]) if self.epochs is None else range(start["epoch"], self.epochs)
        position = dict(start)
        for epoch in epochs:
            tally = Tally()
            source = self.epoch_source(epoch, consumer, num_consumers, skipped, tally)
            raw = 0
            if epoch == start["epoch"] and start["raw"]:
                tally.strided = start.get("strided")
                for _ in islice(source, start["raw"]):  # replay without decoding
                    raw += 1
                    tally.pass_good += 1
                tally.good = start["good"]
                skipped.clear()  # counted before the resume
            while self.per_consumer is None or tally.good < self.per_consumer:
                sample = next(source, None)
                if sample is None:
                    break
                raw += 1
                flip = self.shuffle_buffer > 1 and coin("flip", self.seed, epoch, sample["__key__"])
                decoded = decode_checked(
                    sample,
                    channels=self.channels,
                    num_classes=self.num_classes,
                    shape=self.shape,
                    flip=flip,
                    skipped=skipped,
                )
                if decoded is None:
                    continue
                tally.good += 1
                tally.pass_good += 1
                inputs.append(decoded[0])
                labels.append(decoded[1])
                keys.append(sample["__key__"])
                if len(inputs) == self.batch_size:
                    position = {"epoch": epoch, "raw": raw, "good": tally.good, "strided": tally.strided}
                    if self.per_consumer is not None and tally.good >= self.per_consumer:
                        position = zero_position() | {"epoch": epoch + 1}
                    yield torch.stack(inputs), torch.tensor(labels), keys, dict(skipped), logical, position
                    inputs, labels, keys = [], [], []
                    skipped.clear()  # in place: the epoch's shard reader counts into this one
            position = zero_position() | {"epoch": epoch + 1}
        if inputs and not self.drop_last:
            yield torch.stack(inputs), torch.tensor(labels), keys, dict(skipped), logical, position
        elif skipped or inputs:
            yield None, None, [], dict(skipped), logical, position

    def __iter__(self) -> Iterator[tuple]:
        worker_info = torch.utils.data.get_worker_info()
        worker, num_workers = (worker_info.id, worker_info.num_workers) if worker_info else (0, 1)
        return self.consumer_batches((worker + self.rotation) % num_workers, num_workers)


class ShardLoader:
    """Iterable of (x [B, C, H, W] float32, y [B] int64) (plus keys if return_keys); resumable.

    `skipped` counts skipped data by reason in the current pass (`skipped_labels`: bad labels only).
    `state_dict()` after any batch, then `load_state_dict(state)` on a new loader with the same arguments:
    its next pass continues with exactly the batches the old one would have produced next.
    """

    def __init__(self, stream: ShardStream, num_workers: int, return_keys: bool = False, worker_init_fn=None):
        self.stream = stream
        self.num_workers = num_workers
        self.worker_init_fn = worker_init_fn
        self.return_keys = return_keys
        self.skipped: Counter = Counter()
        self.batches = 0
        self.positions = [zero_position() for _ in range(max(num_workers, 1))]
        self.pending: dict | None = None

    @property
    def skipped_labels(self) -> int:
        """Samples skipped for a missing, malformed or out-of-range label in the current pass."""
        return self.skipped["bad_label"]

    def identity(self) -> dict:
        """The arguments a resumed loader must share with the saved one."""
        s = self.stream
        return {
            "seed": s.seed,
            "rank": s.rank,
            "world_size": s.world_size,
            "num_workers": max(self.num_workers, 1),
            "batch_size": s.batch_size,
            "num_shards": len(s.urls),
            "resampled": s.resampled,
            "per_consumer": s.per_consumer,
            "shuffle_buffer": s.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        """Position of the current pass: batches yielded and, per worker, {epoch, raw, good, strided}."""
        return {
            "version": STATE_VERSION,
            **self.identity(),
            "batches": self.batches,
            "positions": copy.deepcopy(self.positions),
        }

    def load_state_dict(self, state: dict) -> None:
        """Make the next pass continue from `state`; ValueError naming any argument that differs."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        differ = {k: (state.get(k), v) for k, v in self.identity().items() if state.get(k) != v}
        if differ:
            raise ValueError(f"loader state was saved with other arguments (saved, now): {differ}")
        self.pending = copy.deepcopy(state)

    def __iter__(self) -> Iterator[tuple]:
        state, self.pending = self.pending, None
        num_workers = max(self.num_workers, 1)
        self.batches = state["batches"] if state else 0
        self.positions = state["positions"] if state else [zero_position() for _ in range(num_workers)]
        self.skipped = Counter()
        stream = copy.copy(self.stream)
        stream.rotation, stream.start = self.batches % num_workers, copy.deepcopy(self.positions)
        if self.num_workers == 0:
            batches = iter(stream)
        else:
            batches = DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=self.worker_init_fn
            )
        yielded = 0
        for inputs, labels, keys, skipped, logical, position in batches:
            self.skipped.update(skipped)
            self.positions[logical] = position
            if inputs is None:
                continue
            self.batches += 1
            yielded += len(labels)
            yield (inputs, labels, keys) if self.return_keys else (inputs, labels)
        if not yielded and not state:
            raise RuntimeError(
                f"no readable sample in the shards {self.stream.urls} (skipped: {dict(self.skipped) or 'none'})"
            )


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
    shards: str | list[str] | None = None,
    resampled: bool = False,
    num_samples: int | None = None,
    state: dict | None = None,
    return_keys: bool = False,
    worker_init_fn: Callable[[int], None] | None = None,
) -> ShardLoader:
    """Batches of a split for this rank: infinite and reshuffled per epoch by default; `epochs=1` for one pass.

    Shards are shuffled with (seed, epoch) and dealt to the world_size * max(num_workers, 1) consumers; with fewer
    shards than consumers every consumer reads all shards and keeps every k-th sample. `shuffle_buffer <= 1`
    disables all shuffling (manifest order). Same arguments -> identical batches.
    drop_last=True (training): every consumer takes exactly num_samples // consumers usable samples per epoch
    (wrapping around its share when it is short), so every rank yields the same number of batches.
    drop_last=False (evaluation): every readable sample exactly once; a rank yields the batches its shards hold,
    which can differ between ranks by many (3 shards over 2 ranks: 2 to 1), so no collective may run per batch.
    resampled=True: consumers draw shards with replacement (endless; an epoch is nominal).
    shards: URLs overriding the manifest's list (braces, `pipe:`); num_samples: their sample count.
    state: a `state_dict()` to resume from; return_keys: yield (x, y, keys); worker_init_fn: run in each worker.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be None (infinite) or >= 1, got {epochs}")
    manifest = read_manifest(data_dir)
    urls = split_urls(data_dir, manifest, split, shards)
    if num_samples is None:
        num_samples = manifest_count(manifest, split, shards, urls)
    num_consumers = world_size * max(num_workers, 1)
    if num_samples < num_consumers:
        raise ValueError(f"split {split!r} of {data_dir} has {num_samples} samples for {num_consumers} consumers")
    if drop_last and not resampled and epochs is not None and batch_size > num_samples // num_consumers * epochs:
        raise ValueError(
            f"batch_size {batch_size} is more than the {num_samples // num_consumers * epochs} samples each of the "
            f"{num_consumers} consumers (ranks x workers) reads from split {split!r} of {data_dir} in {epochs} "
            "epoch(s): no whole batch would come"
        )
    stream = ShardStream(
        urls,
        channels=manifest["channels"],
        num_classes=manifest["num_classes"],
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
        epochs=epochs,
        drop_last=drop_last,
        per_consumer=num_samples // num_consumers if drop_last or resampled else None,
        resampled=resampled,
        shape=expected_shape(manifest),
        counts=shard_counts(manifest, urls),
    )
    loader = ShardLoader(stream, num_workers, return_keys, worker_init_fn)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def shard_counts(manifest: dict, urls: list[str]) -> dict[str, int]:
    """Samples per URL, for the URLs whose shard (by file name) the manifest counts in a split's `shard_info`."""
    per_shard = {
        Path(r["name"]).name: r["count"] for s in manifest.get("splits", {}).values() for r in s.get("shard_info", [])
    }
    names = {url: Path(url.split()[-1]).name for url in urls}
    return {url: int(per_shard[name]) for url, name in names.items() if name in per_shard}


def manifest_count(manifest: dict, split: str, shards: str | list[str] | None, urls: list[str]) -> int:
    """Samples in the split; for overriding shards, the sum of their per-shard counts in the manifest."""
    info = manifest.get("splits", {}).get(split, {})
    if shards is None:
        return int(info["count"])
    counts = shard_counts(manifest, urls)
    uncounted = [Path(url.split()[-1]).name for url in urls if url not in counts]
    if uncounted:
        raise ValueError(f"shards {uncounted[:5]} are not counted in the manifest; pass num_samples")
    return sum(counts[url] for url in urls)


def load_split_tensors(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in manifest order: x [N, C, H, W] float32 (images in [-1, 1]), y [N] int64; skips bad data."""
    manifest = read_manifest(data_dir)
    urls = split_urls(data_dir, manifest, split)
    shape, skipped = expected_shape(manifest), Counter()
    inputs, labels = [], []
    for sample in iter_unique(urls, skipped, shard_counts(manifest, urls)):
        decoded = decode_checked(
            sample,
            channels=manifest["channels"],
            num_classes=manifest["num_classes"],
            shape=shape,
            flip=False,
            skipped=skipped,
        )
        if decoded is not None:
            inputs.append(decoded[0])
            labels.append(decoded[1])
    if not inputs:
        raise ValueError(f"split {split!r} of {data_dir} has no usable sample (skipped: {dict(skipped)})")
    return torch.stack(inputs), torch.tensor(labels, dtype=torch.int64)
