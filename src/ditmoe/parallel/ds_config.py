"""DeepSpeed config files: strict loading, and checking/filling them against the run's own flags.

The trainer owns batch sizes, precision, clipping and the optimizer; a config file may leave the first three as
``"auto"`` and must agree with the run where it does not.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from ditmoe.config import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO3_REFUSED = (
    "ZeRO-3 partitions parameters, and our MoE layers are not DeepSpeed MoE modules; "
    "use stage 1 or 2 (optionally with offload_optimizer)"
)
ZERO0_REFUSED = (
    "stage 0 has no ZeRO overflow check, which our non-finite-step skipping relies on; "
    "use stage 1 or 2 (optionally with offload_optimizer)"
)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed config as strict JSON: no duplicate keys, no NaN/Infinity, an object at the top."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {e}") from None
    try:
        ds = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: top level must be a JSON object, got {type(ds).__name__}")
    return ds


def offloads_optimizer(ds: dict) -> bool:
    """Whether a config (checked by ``resolve_ds_config``) keeps the optimizer on the CPU: DeepSpeed's CPU Adam."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def optimizer_kind(ds: dict | None) -> str:
    """What holds the optimizer state: "torch" (no DeepSpeed), "zero", or "zero+cpu_offload"."""
    if ds is None:
        return "torch"
    return "zero+cpu_offload" if offloads_optimizer(ds) else "zero"


def _enabled(ds: dict, *keys: str) -> bool:
    return any(isinstance(ds.get(k), dict) and ds[k].get("enabled") is True for k in keys)


def precision_of(ds: dict) -> str:
    """The mixed precision a config enables: "bf16", "fp16" or "fp32" (neither)."""
    if _enabled(ds, "bf16", "bfloat16"):
        return "bf16"
    return "fp16" if _enabled(ds, "fp16") else "fp32"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _autos(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _autos(v, f"{prefix}{k}.")]
    return [prefix[:-1]] if obj == "auto" else []


def resolve_ds_config(
    ds: dict,
    *,
    micro_batch: int,
    world_size: int,
    ep_size: int,
    grad_accum: int,
    precision: str,
    grad_clip: float,
    source: str,
) -> dict:
    """A copy of ``ds`` with "auto" fields filled from the run; ConfigError (naming ``source``) on contradictions."""

    def fail(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    for name, v in (
        ("micro_batch", micro_batch),
        ("world_size", world_size),
        ("ep_size", ep_size),
        ("grad_accum", grad_accum),
    ):
        if not _is_int(v) or v < 1:
            raise fail(f"{name} must be an integer >= 1, got {v!r}")
    if world_size % ep_size:
        raise fail(f"ep_size {ep_size} does not divide world_size {world_size}")
    if precision not in PRECISIONS:
        raise fail(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise fail(f"has an {section!r} section; the trainer builds its own AdamW and LR schedule, remove it")

    for key in ("bf16", "bfloat16", "fp16"):  # DeepSpeed reads any truthy "enabled" as on: only JSON booleans here
        section = ds.get(key, {})
        if not isinstance(section, dict) or not isinstance(section.get("enabled", False), bool):
            raise fail(f'{key} must be an object whose "enabled" is true or false, got {section!r}')
    if _enabled(ds, "bf16", "bfloat16") and _enabled(ds, "fp16"):
        raise fail("enables both bf16 and fp16; enable at most one")
    if precision_of(ds) != precision:
        raise fail(f"enables {precision_of(ds)} but the run's precision is {precision}")

    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage == 3:
        raise fail(f"zero_optimization.stage 3 is refused: {ZERO3_REFUSED}")
    if stage == 0:
        raise fail(f"zero_optimization.stage 0 (the default when unset) is refused: {ZERO0_REFUSED}")
    if not _is_int(stage) or stage not in (1, 2):
        raise fail(f"zero_optimization.stage must be 1 or 2, got {stage!r}")
    if "cpu_offload" in zero:
        raise fail('zero_optimization.cpu_offload is the old form; write "offload_optimizer": {"device": "cpu"}')
    offload = zero.get("offload_optimizer", {})
    if not isinstance(offload, dict) or offload.get("device", "none") not in ("none", "cpu"):
        raise fail(f'zero_optimization.offload_optimizer must be {{"device": "cpu"}} (or "none"), got {offload!r}')

    global_batch = micro_batch * grad_accum * world_size
    given = {
        "train_micro_batch_size_per_gpu": ds.get("train_micro_batch_size_per_gpu", "auto"),
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps", "auto"),
        "train_batch_size": ds.get("train_batch_size", "auto"),
    }
    for key, v in given.items():
        if v != "auto" and (not _is_int(v) or v < 1):
            raise fail(f"{key} must be a positive integer or 'auto', got {v!r}")
    mb, ga, tb = given.values()
    if "auto" not in (mb, ga, tb) and tb != mb * ga * world_size:
        raise fail(
            f"train_batch_size {tb} != train_micro_batch_size_per_gpu {mb} * gradient_accumulation_steps {ga}"
            f" * world_size {world_size} = {mb * ga * world_size}"
        )
    run = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": global_batch,
    }
    for key, v in given.items():
        if v != "auto" and v != run[key]:
            raise fail(
                f"{key} is {v} but the run's is {run[key]} (micro batch {micro_batch} * grad accum"
                f" {grad_accum} * world size {world_size} = {global_batch} samples per step)"
            )

    clip = ds.get("gradient_clipping", "auto")
    if clip != "auto":
        if isinstance(clip, bool) or not isinstance(clip, int | float) or not math.isfinite(clip):
            raise fail(f"gradient_clipping must be a number or 'auto', got {clip!r}")
        if float(clip) != float(grad_clip):
            raise fail(f"gradient_clipping is {clip} but the run's grad_clip is {grad_clip}")

    out = copy.deepcopy(ds)
    out.update(run)
    out["gradient_clipping"] = float(grad_clip)
    left = _autos(out)
    if left:
        raise fail(f"{', '.join(left)} is 'auto'; only batch sizes and gradient_clipping may be 'auto'")
    return out
