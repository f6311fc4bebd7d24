"""Timestep respacing: keep a subset of a diffusion's steps and rebuild betas for it.

Spacing strings (as in IDDPM's ``space_timesteps``):
    ""            every step
    "250"         250 steps spread evenly over [0, T-1] (one section)
    "10,15,20"    T split into 3 equal sections, 10 / 15 / 20 steps spread evenly in each
    "ddim50"      a fixed integer stride s with len(range(0, T, s)) == 50 (DDIM paper style)
An int n is the same as the string "n".
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def space_timesteps(num_timesteps: int, spacing: str | int | None) -> set[int]:
    """Return the set of original step indices in [0, num_timesteps) to keep.

    Raises ValueError (naming ``spacing``) when the string is malformed or cannot be satisfied.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if spacing is None:
        spacing = ""
    if isinstance(spacing, bool) or not isinstance(spacing, str | int):
        raise ValueError(f"respacing must be a str or int, got {spacing!r}")
    text = str(spacing).strip()
    if text == "":
        return set(range(num_timesteps))

    if text.startswith("ddim"):
        count = _parse_count(text[len("ddim") :], spacing)
        for stride in range(1, num_timesteps + 1):
            kept = range(0, num_timesteps, stride)
            if len(kept) == count:
                return set(kept)
            if len(kept) < count:
                break
        raise ValueError(f"respacing {spacing!r}: no integer stride gives exactly {count} of {num_timesteps} steps")

    counts = [_parse_count(part, spacing) for part in text.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"respacing {spacing!r}: section {i} has {size} steps, cannot take {count}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # the stride is summed, not multiplied (j * stride), as IDDPM does: "21" keeps step 499 there, not 500
        index = 0.0
        for _ in range(count):
            kept.append(start + round(index))
            index += stride
        start += size
    return set(kept)


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that only visits ``use_timesteps``, and the map new index -> original index.

    The new process has alphas_cumprod equal to the original at the kept steps:
    beta'_k = 1 - abar[t_k] / abar[t_{k-1}] (abar[t_{-1}] = 1). Returns (betas float64 [K], timestep_map int64 [K]).
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    keep = sorted(set(int(t) for t in use_timesteps))
    if not keep:
        raise ValueError("respacing keeps no timesteps")
    if keep[0] < 0 or keep[-1] >= len(alphas_cumprod):
        raise ValueError(f"timesteps {keep[0]}..{keep[-1]} out of range [0, {len(alphas_cumprod)})")
    kept_ac = alphas_cumprod[keep]
    prev = np.concatenate([[1.0], kept_ac[:-1]])
    return 1.0 - kept_ac / prev, np.asarray(keep, dtype=np.int64)


def _parse_count(text: str, spacing: str | int) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"respacing {spacing!r}: {text!r} is not a positive integer step count")
    count = int(text)
    if count < 1:
        raise ValueError(f"respacing {spacing!r}: step counts must be >= 1")
    return count
