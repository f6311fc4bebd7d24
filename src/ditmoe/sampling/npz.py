"""Many samples to one ``.npz`` laid out as ADM's evaluation suite reads it (FID, sFID, IS, precision/recall against
its reference batches): ``arr_0`` uint8 [N, H, W, C] images, ``arr_1`` int64 [N] class labels.

Samples are drawn in batches of ``batch_size``; batch b starts from a seed derived from (seed, b), so the file
depends on the seed and the batch size alone, not on how many processes share the work. Under a launcher (torchrun,
deepspeed, srun) rank r of W draws batches r, r + W, ...: each writes its part beside the output, and rank 0 joins
the parts in sample order once every rank has written its own."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ditmoe.data.vae import Autoencoder
from ditmoe.parallel.distributed import leave_distributed, slurm_to_torch_env
from ditmoe.sampling.sample import Sampler, generate, images_of, to_uint8

# how long a rank that finished its batches waits for the others before the parts are joined
JOIN_TIMEOUT = timedelta(hours=6)


def balanced_labels(num_samples: int, classes: list[int]) -> list[int]:
    """Sample i is of class ``classes[i % len(classes)]``: every class as often as the others, within one."""
    return [classes[i % len(classes)] for i in range(num_samples)]


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch`` of a run seeded ``seed``: no two (seed, batch) pairs share one, as seed + batch
    would (batch 1 of seed 0 would be batch 0 of seed 1)."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def check_npz_path(path: Path | str) -> Path:
    """``path`` if it names an .npz file; ValueError naming it otherwise (numpy would append .npz)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(
            f"{path}: samples for FID are written as .npz (ADM's layout), not {path.suffix or 'no suffix'}"
        )
    return path


@contextlib.contextmanager
def launcher_world() -> Iterator[tuple[int, int, str | None]]:
    """(rank, world size, device) of this process: under a launcher (WORLD_SIZE > 1 in the environment, or an srun
    step) joined into a gloo group for the join of the parts, with CUDA device LOCAL_RANK where there is CUDA;
    alone (0, 1, None)."""
    if dist.is_initialized():  # already in a world (tests, a caller's own group)
        yield dist.get_rank(), dist.get_world_size(), None
        return
    os.environ.update(slurm_to_torch_env(dict(os.environ)))
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        yield 0, 1, None
        return
    dist.init_process_group("gloo", timeout=JOIN_TIMEOUT)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        yield dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if torch.cuda.is_available() else None
    finally:
        leave_distributed()


def write_npz(
    sampler: Sampler,
    labels: list[int],
    out: Path | str,
    *,
    batch_size: int,
    seed: int,
    decoder: Autoencoder | None = None,
    progress: bool = True,
    **generate_kwargs,
) -> Path:
    """Sample ``labels`` (one image each, in order) into ``out`` (see the module docstring); in a world of ranks
    every rank calls it, and rank 0 writes ``out``. ``generate_kwargs``: cfg_scale, steps, guide_channels."""
    out = check_npz_path(out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    starts = range(0, len(labels), batch_size)
    mine = list(range(rank, len(starts), world))
    images, index = [], []
    for b in tqdm(mine, desc=f"sampling (rank {rank} of {world})", unit="batch", disable=not progress):
        first = starts[b]
        batch = labels[first : first + batch_size]
        samples = generate(sampler, batch, seed=batch_seed(seed, b), progress=False, **generate_kwargs)
        images.append(to_uint8(images_of(samples, decoder)))
        index.append(np.arange(first, first + len(batch)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if world == 1:
        _save(out, np.concatenate(images), np.asarray(labels, dtype=np.int64))
        return out
    part = out.with_name(f".{out.name}.part{rank:05d}-of-{world:05d}.npz")
    _save(part, np.concatenate(images) if images else np.zeros((0, 0, 0, 0), np.uint8), np.concatenate(index or [[]]))
    dist.barrier()  # every part written
    if rank == 0:
        _join(out, [out.with_name(f".{out.name}.part{r:05d}-of-{world:05d}.npz") for r in range(world)], labels)
    dist.barrier()  # no rank returns before out exists
    return out


def _save(path: Path, arr_0: np.ndarray, arr_1: np.ndarray) -> None:
    """np.savez to a temporary name, then a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0, arr_1)
    tmp.replace(path)


def _join(out: Path, parts: list[Path], labels: list[int]) -> None:
    """The ranks' parts (arr_0 images, arr_1 sample indices) in sample order into ``out``; the parts removed."""
    loaded = [np.load(p) for p in parts]
    held = [(z["arr_0"], z["arr_1"]) for z in loaded if len(z["arr_1"])]
    images = np.concatenate([i for i, _ in held])
    order = np.argsort(np.concatenate([idx for _, idx in held]), kind="stable")
    _save(out, images[order], np.asarray(labels, dtype=np.int64))
    for p in parts:
        p.unlink()
