"""Many samples to one ``.npz`` laid out as ADM's evaluation suite reads it (FID, sFID, IS, precision/recall against
its reference batches): ``arr_0`` uint8 [N, H, W, 3] images (grey ones with their channel thrice), ``arr_1`` int64 [N]
class labels.

Samples are drawn in batches of ``batch_size``; batch b starts from a seed derived from (seed, b), so the file
depends on the seed and the batch size alone, not on how many processes share the work. Under a launcher (torchrun,
deepspeed, srun) rank r of W draws batches r, r + W, .... Each batch is saved on its own in a folder beside the
output (``.NAME.npz.batches``) and rank 0 joins them in order once all are there, then removes the folder. A run
stopped part way (a time limit, a preemption) goes on where it stopped when started again with the same arguments,
on any number of ranks; a folder left by other arguments is refused, not mixed in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import zipfile
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


def rgb(images_BHWC: np.ndarray) -> np.ndarray:
    """Grey images (1 channel) with the channel thrice, as the evaluators read RGB; others as they are."""
    return np.repeat(images_BHWC, 3, axis=-1) if images_BHWC.shape[-1] == 1 else images_BHWC


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
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else None
    if device:  # the current device too: Triton launches its kernels on that one
        torch.cuda.set_device(device)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
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
    work = out.with_name(f".{out.name}.batches")
    run = {"checkpoint": str(sampler.checkpoint), "weights": sampler.weights, "labels": _digest(labels)}
    run |= {"batch_size": batch_size, "seed": seed, "vae": str(decoder.source) if decoder else None, **generate_kwargs}
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        if not any(work.glob("batch*.npy")):  # nothing kept yet (a first try that failed): these arguments
            _save_atomic(work / RUN_FILE, lambda f: f.write(json.dumps(run, indent=1).encode()))
    _barrier()
    _check_same_run(work, run)
    starts = range(0, len(labels), batch_size)
    assigned = range(rank, len(starts), world)
    mine = [b for b in assigned if not _batch_file(work, b).exists()]
    done = len(assigned) - len(mine)
    if done:
        print(f"rank {rank}: {done} batches already sampled in {work}, going on")
    for b in tqdm(mine, desc=f"sampling (rank {rank} of {world})", unit="batch", disable=not progress):
        batch = labels[starts[b] : starts[b] + batch_size]
        samples = generate(sampler, batch, seed=batch_seed(seed, b), progress=False, **generate_kwargs)
        images = rgb(to_uint8(images_of(samples, decoder)))
        _save_atomic(_batch_file(work, b), lambda f, images=images: np.save(f, images))
    _barrier()  # every batch saved
    if rank == 0:
        parts = [_batch_file(work, b) for b in range(len(starts))]
        _save_atomic(out, lambda f: _write_joined(f, parts, np.asarray(labels, dtype=np.int64)))
        for part in parts:  # before the run record: a kill in between never leaves batches without it
            part.unlink()
        shutil.rmtree(work)
    _barrier()  # no rank returns before out exists
    return out


RUN_FILE = "run.json"  # what the batches in a work folder were sampled with


def _batch_file(work: Path, batch: int) -> Path:
    return work / f"batch{batch:07d}.npy"


def _write_joined(f, parts: list[Path], labels: np.ndarray) -> None:
    """The .npz np.savez(f, images, labels) writes, with ``images`` the batch files in ``parts`` one after the other,
    streamed a batch at a time: 50,000 ImageNet-256 samples are 9.8 GB, which the join must not hold in memory."""
    first = np.load(parts[0], mmap_mode="r")
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False}
    header["shape"] = (len(labels), *first.shape[1:])
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as arr:
            np.lib.format.write_array_header_1_0(arr, header)
            for part in parts:
                arr.write(np.load(part).tobytes())
        with zf.open("arr_1.npy", "w") as arr:
            np.lib.format.write_array(arr, labels)


def _digest(labels: list[int]) -> str:
    return hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()


def _check_same_run(work: Path, run: dict) -> None:
    """ValueError naming ``work`` when its batches were sampled with other arguments (same on every rank)."""
    saved, asked = json.loads((work / RUN_FILE).read_text()), json.loads(json.dumps(run))  # as JSON holds it
    if saved != asked:
        differ = sorted(k for k in {*saved, *asked} if saved.get(k) != asked.get(k))
        raise ValueError(
            f"{work} holds batches sampled with other {', '.join(differ)}: remove it to start afresh, or give the "
            "arguments it was started with to finish it"
        )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_atomic(path: Path, write) -> None:
    """``write(file)`` to a temporary name, then a rename: a reader (or a run started again) never sees half a file,
    and a write that fails (a full disk) leaves no half file behind to hold the space."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
