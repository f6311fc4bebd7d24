"""Tile tables and overrides: bad overrides fail loudly, naming what is wrong, instead of being silently ignored."""

import json
from pathlib import Path

import pytest

from ditmoe_kernels import tiles


def test_every_table_covers_every_kind_with_known_settings():
    for table in (tiles.INTERPRET, tiles.FP32, tiles.BF16_SM90, tiles.BF16_SM80):
        assert set(table) == set(tiles.SETTINGS)
        tiles.check_tiles(table)


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"gmmm": {"BM": 64}}, "'gmmm'"),
        ({"gmm": {"BM": 64, "BX": 1}}, "'BX'"),
        ({"dw": {"PERSIST": 1}}, "'PERSIST'"),  # the dW kernel has no persistent launch
        ({"dw": 3}, "'dw'"),
    ],
)
def test_unknown_kinds_and_settings_are_refused(bad, named):
    with pytest.raises(ValueError, match=named), tiles.tile_overrides(**bad):
        pass
    assert tiles.overrides() == {}


def test_overrides_nest_and_unwind():
    with tiles.tile_overrides(gmm={"BM": 64}):
        with tiles.tile_overrides(dw={"BR": 16}, gmm={"BN": 32}):
            assert tiles.overrides() == {"gmm": {"BN": 32}, "dw": {"BR": 16}}
        assert tiles.overrides() == {"gmm": {"BM": 64}}
    assert tiles.overrides() == {}


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
