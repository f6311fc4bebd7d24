"""Atomic checkpoints: a directory per step, committed by a checksum manifest written last.

    run/checkpoints/step_00001000/{model,ema,optimizer,trainer}.pt, config.json, COMMITTED.json
    run/checkpoints/latest                  -> "step_00001000"

A step directory is written under a temporary name and renamed into place only after every file is fsynced;
``COMMITTED.json`` (sha256 of each file) is the commit marker. Loading takes the newest committed directory whose
checksums verify, so a crash mid-save or a damaged ``latest`` never yields a partial or silent fresh start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

MARKER = "COMMITTED.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names it."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def save_checkpoint(root: Path, step: int, tensors: dict[str, object], config: dict, keep_last: int) -> Path:
    """Write ``tensors`` (name -> torch-saveable object) and ``config`` as checkpoint ``step``; prune old ones."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, obj in tensors.items():
            torch.save(obj, tmp / f"{name}.pt")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        digests = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        for f in tmp.iterdir():
            _fsync(f)
        _write_atomic(tmp / MARKER, json.dumps({"step": step, "sha256": digests}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / "latest", final.name)
    _prune(root, keep_last)
    return final


def committed_steps(root: Path) -> list[Path]:
    """Committed step directories, oldest first (by step number, not by mtime)."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and (d / MARKER).is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX) :]))


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


def load_file(ckpt: Path, name: str) -> object:
    return torch.load(ckpt / f"{name}.pt", map_location="cpu", weights_only=True)


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


def _prune(root: Path, keep_last: int) -> None:
    for old in committed_steps(root)[:-keep_last] if keep_last > 0 else []:
        # Remove the marker first: an interrupted prune leaves an uncommitted directory, never a bad commit.
        (old / MARKER).unlink()
        shutil.rmtree(old)


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
