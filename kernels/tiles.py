"""Tile configurations of the Triton kernels: fixed tables per dtype and architecture, and overrides for benchmarks.

Kinds: ``gmm`` (single-accumulator grouped GEMM without epilogue: forward), ``gmm_dx`` (the same for dX GEMMs,
B = W[e] untransposed: dX, dH), ``gmm_epi`` (the same with a GELU epilogue, forward or backward, which loads and
stores extra tiles), ``swiglu`` (the gate/up GEMM: BN gate and BN up columns per tile), ``swiglu_bwd`` (``FUSED`` =
1: the SwiGLU backward runs in the dH GEMM's epilogue, with these tiles; 0: a plain dH on ``gmm_dx`` tiles, then
the elementwise pass on ``ew`` tiles), ``dw`` (per-expert K-reduction: every weight gradient), ``rows``
(permute/combine), ``ew`` (elementwise SwiGLU backward, [BR, BC] tiles), ``route`` (routing metadata).

Settings: ``TMA`` = 1 in a GEMM kind loads its tiles through tensor descriptors made on the host (``dw``: all but an
expert's last, partial chunk of rows), 2 through descriptors the kernel makes (no encoding on the host at each
launch; ``dw``: over each expert's rows, so its last chunk too); ``WS`` = 1 (with ``TMA`` = 2, ``PERSIST`` and 4
warps) warp-specializes the persistent loop: one warp group loads, two compute; ``PERSIST`` > 0 launches that many
persistent programs per SM; ``GATHER`` (``swiglu``, ``gmm_epi``; 1 where absent) picks gather-fused or permute-first
input (see ``triton_ops``); ``PRE`` (``swiglu_bwd``, ``gmm_epi``: the backward epilogues) = 1 loads the epilogue's
input tiles before the K loop (not with ``PERSIST``: sm_90 then spills), 2 each column quarter's while the one
before is computed and stored, 3 runs the quarters as a loop the compiler software-pipelines (each quarter's inputs
copied into shared memory two quarters ahead); ``KEEP_H`` (``swiglu_bwd``) = 1 keeps the forward's h for the down
dW (R x F more saved per layer) so that the SwiGLU backward writes no h, 2 also runs that dW on a second CUDA stream
beside dH and the SwiGLU backward, which no longer wait for each other (elsewhere 2 acts as 1); ``num_warps`` /
``num_stages`` / ``maxnreg`` (a cap on registers per thread, so that two blocks fit on an SM where the compiler
would take a few more than half the register file) are launch options.

Tables are fixed so results never depend on batch composition; ``tile_overrides`` lets a benchmark try others inside
a ``with`` block, and a run use a tuned file's (``--kernel-tiles``), for every table or for the one it was tuned on.
No Triton import here: benchmarks parse tile files before they know whether Triton runs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType

__all__ = [
    "INTERPRET",
    "FP32",
    "BF16_SM90",
    "BF16_SM80",
    "TABLES",
    "ANY",
    "SETTINGS",
    "LAUNCH_OPTIONS",
    "tile_overrides",
    "overrides",
    "override",
    "exactly",
    "check_table",
    "check_tiles",
    "load_tiles",
]

# Under ``TRITON_INTERPRET=1`` (CPU tests): small tiles.
INTERPRET = MappingProxyType(
    {
        "gmm": dict(BM=16, BN=32, BK=32, GROUP_M=4),
        "gmm_dx": dict(BM=16, BN=32, BK=32, GROUP_M=4),
        "gmm_epi": dict(BM=16, BN=32, BK=32, GROUP_M=4),
        "swiglu": dict(BM=16, BN=32, BK=32, GROUP_M=4),
        "swiglu_bwd": dict(BM=16, BN=32, BK=32, GROUP_M=4, FUSED=0, KEEP_H=0),
        "dw": dict(BO=32, BI=32, BR=16, GROUP_M=4),
        "rows": dict(BT=16, BD=64),
        "ew": dict(BR=4, BC=64),
        "route": dict(BLOCK=0),
    }
)
FP32 = MappingProxyType(
    {
        "gmm": dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3),
        "gmm_dx": dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3),
        "gmm_epi": dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3),
        "swiglu": dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3),
        "swiglu_bwd": dict(BM=64, BN=64, BK=32, GROUP_M=8, num_warps=4, num_stages=3, FUSED=0, KEEP_H=0),
        "dw": dict(BO=64, BI=64, BR=32, GROUP_M=8, num_warps=4, num_stages=3),
        "rows": dict(BT=8, BD=128, num_warps=4),
        "ew": dict(BR=2, BC=512, num_warps=4),
        "route": dict(BLOCK=0),
    }
)
# bf16/fp16 on sm90: the winners of run 4's sweep at XL (H100, bench/results/nvidia-h100-2026-11-26-run4), each
# against the tiles then in use: gate/up fwd 0.77 -> 0.65 ms (TMA, permute first, 128x64: two blocks per SM), dH +
# SwiGLU backward 0.64 -> 0.54 ms (fused), gate/up dX + dH 0.87 -> 0.78 ms, down fwd 0.32 -> 0.26 ms, dW 0.93 ->
# 0.84 ms. gmm_epi (GELU experts): 128x128 pointer loads, gather-fused, stay best.
BF16_SM90 = MappingProxyType(
    {
        "gmm": dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=1, PERSIST=1, WS=0),
        "gmm_dx": dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=1, PERSIST=0, WS=0),
        "gmm_epi": dict(
            BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, TMA=0, PERSIST=0, GATHER=1, PRE=0, WS=0
        ),
        "swiglu": dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=1, PERSIST=0, GATHER=0, WS=0),
        "swiglu_bwd": dict(
            BM=128,
            BN=128,
            BK=64,
            GROUP_M=8,
            num_warps=8,
            num_stages=3,
            TMA=1,
            PERSIST=0,
            FUSED=1,
            PRE=0,
            WS=0,
            KEEP_H=0,
        ),
        "dw": dict(BO=128, BI=256, BR=32, GROUP_M=8, num_warps=8, num_stages=4, TMA=0, PERSIST=0, WS=0),
        "rows": dict(BT=16, BD=128, num_warps=4),
        "ew": dict(BR=2, BC=1024, num_warps=8),
        "route": dict(BLOCK=0),
    }
)
# bf16/fp16 before Hopper (no TMA, no wgmma) and on consumer Blackwell (sm_120: mma.sync, 99 KiB of shared memory per
# block, where Hopper's 128x256 down forward needs 104 KiB): untimed. Compiled for sm_80 (``bench/inspect_kernels.py
# --arch 80``), the Hopper tiles lose their pipelining (descriptor loads become plain loads) and spill in the 128x256
# GEMMs; these pointer-load tiles pipeline through cp.async, spill nothing and need at most 96 KiB.
BF16_SM80 = MappingProxyType(
    {
        **BF16_SM90,
        "gmm": dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=0, PERSIST=0),
        "gmm_dx": dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, TMA=0, PERSIST=0),
        "swiglu": dict(BM=128, BN=64, BK=64, GROUP_M=8, num_warps=8, num_stages=3, TMA=0, PERSIST=0, GATHER=1),
        "swiglu_bwd": dict(
            BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, TMA=0, PERSIST=0, FUSED=0, KEEP_H=0
        ),
        "dw": dict(BO=128, BI=128, BR=32, GROUP_M=8, num_warps=8, num_stages=4),
    }
)
# Table names: the table a launch reads (``triton_ops.common.table_name``: dtype and architecture), and the launches
# a tile file's overrides are for (its "table" entry: those tuned on one table need not even compile on another).
TABLES = MappingProxyType({"interpret": INTERPRET, "fp32": FP32, "bf16-sm90": BF16_SM90, "bf16-sm80": BF16_SM80})
# Settings passed to the launch, not to the kernel; any kind may hold them.
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")
# kind -> the settings its config may hold: what ``tile_overrides`` accepts.
SETTINGS = MappingProxyType(
    {kind: frozenset(LAUNCH_OPTIONS).union(*(t[kind] for t in TABLES.values())) for kind in BF16_SM90}
)

ANY = "any"  # the scope of overrides for every table

# scope (a table name or ANY) -> {kind: settings replacing the table's}; set only inside ``tile_overrides`` blocks.
_OVERRIDES: ContextVar[Mapping[str, Mapping[str, Mapping]]] = ContextVar(
    "ditmoe_tile_overrides", default=MappingProxyType({})
)


def overrides() -> Mapping[str, Mapping[str, Mapping]]:
    """The overrides in force here, by scope: {table name or "any": {kind: {setting: value}}}."""
    return _OVERRIDES.get()


def override(kind: str, table: str) -> dict:
    """The settings replacing ``table``'s for ``kind`` here: those for any table, then those for this one."""
    scopes = _OVERRIDES.get()
    return {**scopes.get(ANY, {}).get(kind, {}), **scopes.get(table, {}).get(kind, {})}


@contextlib.contextmanager
def tile_overrides(table: str | None = None, **kinds: Mapping) -> Iterator[None]:
    """Replace the tile configs of some kinds inside the block, e.g. ``tile_overrides(route={"BLOCK": 16})``; with
    ``table`` (e.g. "bf16-sm90") only in the launches that read that table. An unknown table, kind or setting
    raises ValueError."""
    check_table(table)
    check_tiles(kinds)
    scopes, scope = _OVERRIDES.get(), table or ANY
    with exactly(MappingProxyType({**scopes, scope: MappingProxyType({**scopes.get(scope, {}), **kinds})})):
        yield


@contextlib.contextmanager
def exactly(saved: Mapping[str, Mapping]) -> Iterator[None]:
    """Put back overrides read earlier with ``overrides()`` (e.g. in another thread) for the block."""
    token = _OVERRIDES.set(saved)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


# What each setting may be: block sizes are powers of two (Triton's aranges), switches one of a few values.
BLOCKS = frozenset({"BM", "BN", "BK", "BO", "BI", "BR", "BT", "BD", "BC"})
CHOICES = MappingProxyType(
    {"TMA": (0, 1, 2), "WS": (0, 1), "GATHER": (0, 1), "PRE": (0, 1, 2, 3), "FUSED": (0, 1), "KEEP_H": (0, 1, 2)}
)
AT_LEAST = MappingProxyType({"GROUP_M": 1, "num_stages": 1, "maxnreg": 1, "PERSIST": 0})


def _value_error(name: str, value: object) -> str | None:
    """Why ``value`` cannot be setting ``name``, or None if it can (None itself: the setting left unset)."""
    if value is None and name == "maxnreg":
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return "an integer"
    power_of_two = value >= 1 and value & (value - 1) == 0
    if name in BLOCKS and not power_of_two:
        return "a power of two"
    if name == "BLOCK" and not (value == 0 or power_of_two):
        return "0 (sized from the expert count) or a power of two"
    if name == "num_warps" and not (power_of_two and value <= 32):
        return "a power of two up to 32"
    if name in CHOICES and value not in CHOICES[name]:
        return "one of " + ", ".join(map(str, CHOICES[name]))
    if name in AT_LEAST and value < AT_LEAST[name]:
        return f">= {AT_LEAST[name]}"
    return None


def check_tiles(kinds: Mapping) -> None:
    """Raise ValueError, naming the culprit, unless ``kinds`` is {kind: {setting: value}} of known kinds/settings
    and values each setting can take (a GROUP_M of 0, say, would make the kernels read past their tiles)."""
    for kind, cfg in kinds.items():
        if kind not in SETTINGS:
            raise ValueError(f"unknown kernel kind {kind!r} (known: {', '.join(SETTINGS)})")
        if not isinstance(cfg, Mapping):
            raise ValueError(f"tiles of {kind!r} must be a {{setting: value}} mapping, got {cfg!r}")
        unknown = sorted(set(cfg) - SETTINGS[kind])
        if unknown:
            known = ", ".join(sorted(SETTINGS[kind]))
            raise ValueError(f"{kind} has no setting {', '.join(map(repr, unknown))} (known: {known})")
        for name, value in cfg.items():
            if why := _value_error(name, value):
                raise ValueError(f"{kind}.{name} must be {why}, got {value!r}")


def check_table(table: str | None) -> None:
    """Raise ValueError unless ``table`` is None or a table's name."""
    if table is not None and table not in TABLES:
        raise ValueError(f"unknown tile table {table!r} (known: {', '.join(TABLES)})")


def load_tiles(spec: str) -> dict:
    """Overrides for ``tile_overrides(**tiles)`` from JSON text or a .json file of it, {kind: {setting: value}} and
    optionally "table": the table they were tuned over, so they apply only to launches that read it (as written by
    ``bench_kernels.py --write-tiles``; e.g. ``bench/tiles/run3-bf16.json``). Raises ValueError naming what is
    wrong."""
    try:
        tiles = json.loads(Path(spec).read_text() if spec.endswith(".json") else spec)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{spec!r}: {exc}") from exc
    if not isinstance(tiles, dict):
        raise ValueError(f"{spec!r}: expected JSON {{kind: {{setting: value}}}}, got {type(tiles).__name__}")
    try:
        check_table(tiles.get("table"))
        check_tiles({kind: cfg for kind, cfg in tiles.items() if kind != "table"})
    except ValueError as exc:
        raise ValueError(f"{spec!r}: {exc}") from None
    return tiles
