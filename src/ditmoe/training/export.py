"""Consolidate a (multi-rank, expert-parallel) checkpoint into one safetensors file a single process can load."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.run_state import load_global_state

META_KEY = "ditmoe"  # safetensors metadata entry: JSON {"model", "train", "data", "weights", "step"}


def export_safetensors(path: Path | str, out: Path | str, *, ema: bool = True) -> Path:
    """Every expert stacked under its global id, as a model without expert parallelism holds them."""
    ckpt = ckpt_io.resolve(Path(path))
    saved = ckpt_io.load_config(ckpt)
    kind = "ema" if ema else "model"
    state = {k: v.contiguous() for k, v in load_global_state(ckpt, kind).items()}
    meta = {k: saved.get(k, {}) for k in ("model", "train", "data")}
    meta.update(weights=kind, source=str(ckpt), step=ckpt_io.step_of(ckpt))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_with_umask_mode(state, tmp, {META_KEY: json.dumps(meta)})
    tmp.replace(out)
    return out


def save_with_umask_mode(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``save_file`` giving the file the mode any new file gets (the umask's), not the owner-only 0600 that
    safetensors creates it with, so that others the umask lets in can sample from it."""
    path.unlink(missing_ok=True)
    path.touch()
    mode = path.stat().st_mode
    save_file(state, str(path), metadata=metadata)
    path.chmod(mode)


def load_exported(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, metadata) of an exported file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(META_KEY)
    if meta is None:
        raise ckpt_io.CheckpointError(f"{path} is not a ditmoe export (no {META_KEY!r} metadata)")
    return load_file(str(path)), json.loads(meta)
