"""Tile tables and overrides: bad overrides fail loudly, naming what is wrong, instead of being silently ignored."""

import json
import re
import sys
from pathlib import Path

import pytest

from ditmoe_kernels import tiles


def test_every_table_covers_every_kind_with_known_settings():
    for table in tiles.TABLES.values():
        assert set(table) == set(tiles.SETTINGS)
        tiles.check_tiles(table)


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"gmmm": {"BM": 64}}, "'gmmm'"),
        ({"gmm": {"BM": 64, "BX": 1}}, "'BX'"),
        ({"dw": {"GATHER": 1}}, "'GATHER'"),  # the dW kernel reads permuted rows only
        ({"dw": 3}, "'dw'"),
    ],
)
def test_unknown_kinds_and_settings_are_refused(bad, named):
    with pytest.raises(ValueError, match=named), tiles.tile_overrides(**bad):
        pass
    assert tiles.overrides() == {}


@pytest.mark.parametrize(
    "bad, said",
    [
        # GROUP_M 0 divided by zero in the tile order: the forward returned uninitialised memory, no error
        ({"gmm": {"GROUP_M": 0}}, "gmm.GROUP_M must be >= 1, got 0"),
        ({"dw": {"GROUP_M": 0}}, "dw.GROUP_M must be >= 1, got 0"),
        ({"rows": {"BD": 0}}, "rows.BD must be a power of two, got 0"),
        ({"gmm": {"BK": 96}}, "gmm.BK must be a power of two, got 96"),
        ({"gmm": {"TMA": 3}}, "gmm.TMA must be one of 0, 1, 2, got 3"),
        ({"gmm": {"PERSIST": -1}}, "gmm.PERSIST must be >= 0, got -1"),
        ({"swiglu": {"num_warps": 6}}, "swiglu.num_warps must be a power of two up to 32, got 6"),
        ({"swiglu_bwd": {"FUSED": True}}, "swiglu_bwd.FUSED must be an integer, got True"),
        ({"ew": {"BC": "64"}}, "ew.BC must be an integer, got '64'"),
        ({"route": {"BLOCK": 24}}, "route.BLOCK must be 0 (sized from the expert count) or a power of two, got 24"),
    ],
)
def test_settings_a_kernel_cannot_take_are_refused(bad, said):
    with pytest.raises(ValueError, match=re.escape(said)), tiles.tile_overrides(**bad):
        pass
    assert tiles.overrides() == {}


def test_every_sweep_candidate_holds_values_its_kernels_take():
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        from sweep_candidates import SWEEP, candidate
    finally:
        sys.path.pop(0)
    for kind, (keys, values) in SWEEP.items():
        for v in values:
            tiles.check_tiles({kind: candidate(keys, v)})


def test_overrides_nest_and_unwind():
    with tiles.tile_overrides(gmm={"BM": 64}):
        with tiles.tile_overrides(dw={"BR": 16}, gmm={"BN": 32}):
            assert tiles.overrides() == {"any": {"gmm": {"BN": 32}, "dw": {"BR": 16}}}
        assert tiles.overrides() == {"any": {"gmm": {"BM": 64}}}
    assert tiles.overrides() == {}


def test_overrides_for_a_table_add_to_those_for_every_table_there_only():
    with tiles.tile_overrides(gmm={"BM": 64, "BN": 64}), tiles.tile_overrides(table="fp32", gmm={"BN": 32}):
        assert tiles.override("gmm", "fp32") == {"BM": 64, "BN": 32}
        assert tiles.override("gmm", "bf16-sm90") == {"BM": 64, "BN": 64}
        assert tiles.override("dw", "fp32") == {}
    with pytest.raises(ValueError, match="'fp16'"), tiles.tile_overrides(table="fp16", gmm={"BM": 64}):
        pass


def test_load_tiles_reads_text_and_files(tmp_path):
    assert tiles.load_tiles('{"rows": {"BT": 8}}') == {"rows": {"BT": 8}}
    shipped = tiles.load_tiles(str(Path(__file__).parents[1] / "bench/tiles/run3-bf16.json"))
    assert shipped["gmm"]["BN"] == 128
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"ew": {"BQ": 2}}))
    with pytest.raises(ValueError, match=r"t\.json.*'BQ'"):
        tiles.load_tiles(str(path))
    with pytest.raises(ValueError, match="missing.json"):
        tiles.load_tiles(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="expected JSON"):
        tiles.load_tiles("[1, 2]")
    assert shipped["table"] == "bf16-sm90"  # run 3's H100 tiles, for the launches that read that table
    path.write_text(json.dumps({"table": "bf16_sm90", "ew": {"BR": 2}}))
    with pytest.raises(ValueError, match=r"t\.json.*'bf16_sm90'"):
        tiles.load_tiles(str(path))
