"""Atomic multi-rank checkpoints: a directory per step, committed by a checksum manifest written last.

    run/checkpoints/step_00001000/<files of every rank>.pt, config.json, COMMITTED.json
    run/checkpoints/latest                  -> "step_00001000"

Every rank writes its files into one temporary directory; rank 0 renames it into place only after all ranks report
their files written and fsynced. ``COMMITTED.json`` (sha256 of each file) is the commit marker. Loading takes the
newest committed directory whose checksums verify, so a crash mid-save, a failed rank or a damaged ``latest`` never
yields a partial checkpoint or a silent fresh start. What the files hold is the training loop's business.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMMITTED.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def is_step_dir(path: Path) -> bool:
    """Named as ``step_dir`` names them: a copy such as ``step_00000002.bak`` is not one of the run's steps."""
    return path.name.startswith(PREFIX) and path.name.removeprefix(PREFIX).isdecimal()


def step_of(ckpt: Path) -> int:
    """The training step a checkpoint directory (``step_dir``) holds."""
    return int(ckpt.name.removeprefix(PREFIX))


def save_checkpoint(root: Path, step: int, files: dict[str, object], config: dict, keep_last: int) -> Path:
    """Write this rank's ``files`` (name -> torch-saveable object) into checkpoint ``step``; every rank calls this.

    Rank 0 also writes ``config``. The checkpoint is committed (marker, rename, ``latest``, pruning to ``keep_last``)
    only after every rank reports its files written and fsynced; if any rank fails (disk full, ...) all ranks
    raise ``CheckpointError`` naming the failures and nothing is committed.
    """
    rank = _rank()
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    error = _broadcast(_prepare(root, tmp) if rank == 0 else None)  # every rank waits for rank 0's folder
    if error:
        raise CheckpointError(f"checkpoint {final} was not saved (nothing committed): {error}")
    try:
        written = []
        for name, obj in files.items():
            torch.save(obj, tmp / f"{name}.pt")
            written.append(tmp / f"{name}.pt")
        if rank == 0:
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            written.append(tmp / "config.json")
        for f in written:
            _fsync(f)
        mine = (True, {f.name: _sha256(f) for f in written})
    except Exception as e:  # reported to every rank below, so that all of them stop the same way
        mine = (False, f"rank {rank}: {type(e).__name__}: {e}")
    results = _all_gather(mine)
    failures = [msg for ok, msg in results if not ok]
    if failures:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointError(f"checkpoint {final} was not saved (nothing committed): {'; '.join(failures)}")
    error = None
    if rank == 0:
        try:
            digests = {name: d for _, part in results for name, d in part.items()}
            _commit(root, tmp, final, step, digests, keep_last)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"rank 0 could not commit {final}: {type(e).__name__}: {e}"
    error = _broadcast(error)
    if error:
        raise CheckpointError(error)
    return final


def _prepare(root: Path, tmp: Path) -> str | None:
    """Rank 0: an empty ``tmp`` under ``root``; what went wrong (read-only or full disk, ...), else None."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        return f"rank 0 could not create {tmp}: {type(e).__name__}: {e}"
    return None


def _commit(root: Path, tmp: Path, final: Path, step: int, digests: dict[str, str], keep_last: int) -> None:
    _write_atomic(tmp / MARKER, json.dumps({"step": step, "sha256": dict(sorted(digests.items()))}, indent=2))
    if final.exists():
        (final / MARKER).unlink(missing_ok=True)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", final.name)
    try:
        _prune(root, keep_last, step)
    except OSError as e:  # the new checkpoint is committed: a failed cleanup must not fail the save
        print(f"warning: checkpoint {final} saved, but removing old checkpoints failed: {e}")


def committed_steps(root: Path) -> list[Path]:
    """Committed step directories, oldest first (by step number, not by mtime)."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and is_step_dir(d) and (d / MARKER).is_file()]
    return sorted(dirs, key=step_of)


def verify(ckpt: Path) -> None:
    """Raise CheckpointError naming the first file whose checksum does not match the commit manifest."""
    try:
        manifest = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {MARKER}: {e}") from e
    for name, digest in manifest["sha256"].items():
        f = ckpt / name
        if not f.is_file() or _sha256(f) != digest:
            raise CheckpointError(f"checkpoint file {f} is missing or does not match its checksum")


def newest_valid(root: Path, warn=print) -> Path | None:
    """The newest committed checkpoint that verifies; damaged ones are reported and skipped.

    Returns None only when no step directory exists at all; raises if some exist but none verifies.
    """
    candidates = committed_steps(root)
    for ckpt in reversed(candidates):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            warn(f"warning: skipping damaged checkpoint: {e}")
    started = [d for d in root.glob(f"{PREFIX}*") if d.is_dir()] if root.is_dir() else []
    if candidates or started:
        raise CheckpointError(f"checkpoints exist under {root} but none is complete and intact")
    return None


def agree_on_newest(root: Path) -> Path | None:
    """``newest_valid`` decided by rank 0 (it verifies the checksums) and shared, so every rank loads the same one."""
    found: Path | str | None = None
    if _rank() == 0:
        try:
            found = newest_valid(root) if root.exists() else None
        except CheckpointError as e:
            found = f"error: {e}"
    found = _broadcast(found)
    if isinstance(found, str):
        raise CheckpointError(found.removeprefix("error: "))
    return found


def load_file(ckpt: Path, name: str, trusted: bool = False) -> object:
    """``trusted``: the file holds Python objects (DeepSpeed's optimizer state); only for our own checkpoints."""
    return torch.load(ckpt / f"{name}.pt", map_location="cpu", weights_only=not trusted)


def load_config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def resolve(path: Path) -> Path:
    """A checkpoint directory, or a run / checkpoints directory whose newest valid checkpoint is taken."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / MARKER).is_file():
        verify(path)
        return path
    for root in (path / "checkpoints", path):
        if root.is_dir() and any(root.glob(f"{PREFIX}*")):
            found = newest_valid(root)
            if found is not None:
                return found
    raise CheckpointError(f"no checkpoint found at {path}")


def _prune(root: Path, keep_last: int, step: int) -> None:
    """Keep the ``keep_last`` newest commits up to ``step``, the one just made. A newer one failed its checksums
    (the run resumed from an older one): it is not counted, or it would leave the only intact ones to be pruned."""
    committed = [d for d in committed_steps(root) if step_of(d) <= step]
    newest = step_of(committed[-1]) if committed else -1
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    for d in root.glob(f"{PREFIX}*"):  # uncommitted and older than a commit: left by an interrupted prune
        if d.is_dir() and is_step_dir(d) and step_of(d) < newest and not (d / MARKER).exists():
            shutil.rmtree(d, ignore_errors=True)
    for old in committed[:-keep_last] if keep_last > 0 else []:
        # Remove the marker first: an interrupted prune leaves an uncommitted directory, never a bad commit.
        (old / MARKER).unlink()
        shutil.rmtree(old)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(obj: object) -> list:
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: object) -> object:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
