"""What a training checkpoint holds, and loading weights from one at any expert-parallel size.

    config.json                      rank 0: train and model config, data manifest, topology
    {model,ema}-dense.pt             rank 0: the replicated entries (everything but routed experts)
    {model,ema}-experts-{s}of{S}.pt  EP rank s of S (its first replica): {key: {global expert id: tensor}}
    optimizer-rank{r}.pt             every rank: its optimizer state (a ZeRO partition under DeepSpeed)
    trainer-rank{r}.pt               every rank: step, data position, RNG states

Each routed expert is stored once, under its global id, so weights load at any EP size and world size; the
optimizer state only resumes at the topology that saved it (world size, EP size, torch or ZeRO, offloaded or not).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ditmoe.config import ConfigError
from ditmoe.parallel.distributed import DistContext
from ditmoe.parallel.expert_state import (
    ExpertRows,
    expert_slices,
    join_gate_up,
    merge_expert_rows,
    split_expert_rows,
    stack_expert_rows,
)
from ditmoe.training import checkpoint as ckpt_io

EXPERT_FILE = re.compile(r"(model|ema)-experts-(\d+)of(\d+)\.pt")


def topology(ctx: DistContext, optimizer: str) -> dict:
    """What an optimizer state's layout depends on: ranks, expert-parallel size and what holds the state
    (``optimizer_kind``: "torch", "zero" or "zero+cpu_offload")."""
    return {"world_size": ctx.world_size, "ep_size": ctx.groups.ep_size, "optimizer": optimizer}


def weight_files(ctx: DistContext, kind: str, state: dict[str, torch.Tensor], slices: dict[str, range]) -> dict:
    """The files this rank writes for a model-shaped state dict (``kind`` "model" or "ema")."""
    dense, rows = split_expert_rows(state, slices)
    files = {}
    if ctx.rank == 0:
        files[f"{kind}-dense"] = dense
    if ctx.expert_dp_rank == 0:  # one replica of each EP rank's experts
        files[f"{kind}-experts-{ctx.ep_rank}of{ctx.groups.ep_size}"] = rows
    return files


def expert_files(ckpt: Path, kind: str) -> list[Path]:
    return sorted(f for f in ckpt.iterdir() if (m := EXPERT_FILE.fullmatch(f.name)) and m.group(1) == kind)


def load_rows(ckpt: Path, kind: str, only: Path | None = None) -> ExpertRows:
    files = [only] if only is not None else expert_files(ckpt, kind)
    if not files:
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} holds no {kind} expert files")
    return join_gate_up(merge_expert_rows([ckpt_io.load_file(ckpt, f.stem) for f in files]))


def load_state(
    ckpt: Path, kind: str, slices: dict[str, range], ctx: DistContext | None = None
) -> dict[str, torch.Tensor]:
    """``kind`` ("model" or "ema") entries for a model holding the experts ``slices`` (from ``expert_slices``)."""
    dense = ckpt_io.load_file(ckpt, f"{kind}-dense")
    saved_ep = ckpt_io.load_config(ckpt).get("topology", {}).get("ep_size")
    own = None
    if ctx is not None and saved_ep == ctx.groups.ep_size:  # same split: this rank's file holds exactly its experts
        own = ckpt / f"{kind}-experts-{ctx.ep_rank}of{saved_ep}.pt"
    return {**dense, **stack_expert_rows(load_rows(ckpt, kind, own), slices)}


def load_weights(ckpt: Path, kind: str, model: nn.Module, ctx: DistContext | None = None) -> None:
    """Load ``kind`` weights into ``model``, which may hold a slice of the experts (any EP size)."""
    load_state_into(model, load_state(ckpt, kind, expert_slices(model), ctx), kind, ckpt)


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], kind: str, source: Path) -> None:
    """Load ``kind`` ("model" or "ema") weights read from ``source`` into ``model``: every entry the model holds
    (EMA: every floating-point one) must be there, and nothing else."""
    strict = kind == "model"  # EMA holds the floating-point entries only
    held = model.state_dict()
    missing = {k for k, v in held.items() if strict or v.is_floating_point()} - state.keys()
    if missing:
        example = sorted(missing)[:3]
        raise ckpt_io.CheckpointError(f"{kind} weights in {source} lack {len(missing)} entries, e.g. {example}")
    unexpected = state.keys() - held.keys()
    if unexpected:
        example = sorted(unexpected)[:3]
        raise ConfigError(f"{kind} weights in {source} hold {len(unexpected)} entries this model lacks, e.g. {example}")
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise ConfigError(f"{kind} weights in {source} do not fit this model: {e}") from e


def load_global_state(ckpt: Path, kind: str = "ema") -> dict[str, torch.Tensor]:
    """Every entry of ``kind`` weights with all experts stacked, as a single process without EP holds them."""
    return {**ckpt_io.load_file(ckpt, f"{kind}-dense"), **stack_expert_rows(load_rows(ckpt, kind))}
