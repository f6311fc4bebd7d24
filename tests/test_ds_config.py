"""The shipped DeepSpeed configs, their strict loading, and their resolution against the run's flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ditmoe.config import ConfigError
from ditmoe.parallel.ds_config import load_ds_config, optimizer_kind, precision_of, resolve_ds_config

DS_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
SHIPPED = sorted(DS_DIR.glob("*.json"))
# A plausible run per file: G on 2 nodes of 8 GPUs with ep_size 8.
G_RUN = dict(micro_batch=16, world_size=16, ep_size=8, grad_accum=2, grad_clip=0.0)
RUN = dict(micro_batch=4, world_size=8, ep_size=4, grad_accum=2, grad_clip=1.0)


def _run_for(path: Path) -> dict:
    run = G_RUN if path.stem == "g2_16e2a" else RUN
    precision = "bf16" if path.stem == "g2_16e2a" else path.stem.rsplit("_", 1)[1]
    return dict(run, precision=precision, source=str(path))


def _base(**extra) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
    }
    ds.update(extra)
    return ds


def _resolve(ds: dict, **kw):
    args = dict(RUN, precision="bf16", source="cfg.json")
    args.update(kw)
    return resolve_ds_config(ds, **args)


def _raises(match: str, ds: dict, **kw) -> str:
    with pytest.raises(ConfigError, match=match) as e:
        _resolve(ds, **kw)
    assert "cfg.json" in str(e.value)
    return str(e.value)


def test_shipped_set():
    names = {p.stem for p in SHIPPED}
    assert {
        "zero1_fp32",
        "zero1_bf16",
        "zero1_fp16",
        "zero2_bf16",
        "zero2_fp16",
        "zero2_offload_bf16",
        "zero2_offload_fp16",
        "g2_16e2a",
    } <= names
    assert not any(n.startswith("zero3") for n in names), "ZeRO-3 is refused; do not ship configs for it"
    assert (DS_DIR / "README.md").is_file()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_resolves(path: Path):
    ds = load_ds_config(path)
    assert "optimizer" not in ds and "scheduler" not in ds
    run = _run_for(path)
    assert precision_of(ds) == run["precision"]
    if run["precision"] == "fp16":
        assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    if "offload" in path.stem:
        assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    out = resolve_ds_config(ds, **run)
    m, a, w = run["micro_batch"], run["grad_accum"], run["world_size"]
    assert out["train_micro_batch_size_per_gpu"] == m and out["gradient_accumulation_steps"] == a
    assert out["train_batch_size"] == m * a * w and out["gradient_clipping"] == run["grad_clip"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_deepspeed_accepts_resolved(path: Path, monkeypatch):
    """DeepSpeed's own parser accepts each resolved file (its pydantic models forbid unknown zero keys).

    Without a process group DeepSpeedConfig falls back to world size 1, so the run's world size is supplied by
    patching deepspeed.comm's rank/world-size queries instead of initialising a group (which could hang).
    """
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    from deepspeed import comm

    run = _run_for(path)
    monkeypatch.setattr(comm, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(comm, "get_world_size", lambda group=None: run["world_size"])
    out = resolve_ds_config(load_ds_config(path), **run)
    cfg = ds_config.DeepSpeedConfig(out)
    assert cfg.world_size == run["world_size"]
    assert cfg.train_batch_size == run["micro_batch"] * run["grad_accum"] * run["world_size"]
    assert cfg.zero_optimization_stage in (1, 2)
    assert cfg.bfloat16_config.enabled == (run["precision"] == "bf16")
    assert cfg.float16_config.enabled == (run["precision"] == "fp16")
    assert cfg.gradient_clipping == run["grad_clip"]


def test_resolve_does_not_mutate_and_accepts_matching_explicit_values():
    ds = _base(
        train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=64, gradient_clipping=1
    )
    before = json.dumps(ds)
    out = _resolve(ds)
    assert json.dumps(ds) == before
    assert out["train_batch_size"] == 64 and out["gradient_clipping"] == 1.0
    assert _resolve(_base(train_batch_size="auto"), world_size=4, ep_size=4)["train_batch_size"] == 32


def test_precision_of():
    assert precision_of({}) == "fp32"
    assert precision_of({"bf16": {"enabled": False}, "fp16": {"enabled": False}}) == "fp32"
    assert precision_of({"bfloat16": {"enabled": True}}) == "bf16"
    assert precision_of({"fp16": {"enabled": True}}) == "fp16"


# ---- load errors ---------------------------------------------------------------------------------------------


def test_load_missing(tmp_path: Path):
    p = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json"):
        load_ds_config(p)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ('{"gradient_clipping": NaN}', "NaN"),
        ('{"gradient_clipping": Infinity}', "Infinity"),
        ('{"gradient_clipping": -Infinity}', "-Infinity"),
        ("[1, 2]", "top level must be a JSON object, got list"),
        ('{\n  // comment\n  "a": 1\n}', "line 2 column 3"),
        ('{\n  "a": 1,\n}', "line 3 column 1"),
    ],
)
def test_load_rejects(tmp_path: Path, text: str, match: str):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_ds_config(p)
    assert str(p) in str(e.value)


# ---- resolve errors ------------------------------------------------------------------------------------------


def test_batch_sizes_that_do_not_multiply_out():
    ds = _base(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2, train_batch_size=100)
    msg = _raises("train_batch_size 100", ds)
    assert "= 64" in msg


@pytest.mark.parametrize(
    "key, value, run_value",
    [
        ("train_micro_batch_size_per_gpu", 8, 4),
        ("gradient_accumulation_steps", 3, 2),
        ("train_batch_size", 128, 64),
    ],
)
def test_batch_size_differs_from_run(key: str, value: int, run_value: int):
    _raises(f"{key} is {value} but the run's is {run_value}", _base(**{key: value}))


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "4"])
def test_batch_size_not_a_positive_int(value):
    _raises(
        f"train_micro_batch_size_per_gpu must be a positive integer or 'auto', got {value!r}",
        _base(train_micro_batch_size_per_gpu=value),
    )


@pytest.mark.parametrize(
    "ds, precision, match",
    [
        (_base(), "fp32", "enables bf16 but the run's precision is fp32"),
        (
            _base(bf16={"enabled": False}, fp16={"enabled": True}),
            "bf16",
            "enables fp16 but the run's precision is bf16",
        ),
        (_base(bf16={"enabled": False}), "bf16", "enables fp32 but the run's precision is bf16"),
        (_base(fp16={"enabled": True}), "bf16", "enables both bf16 and fp16"),
    ],
)
def test_precision_conflicts(ds: dict, precision: str, match: str):
    _raises(match, ds, precision=precision)


@pytest.mark.parametrize(
    "section, value",
    [("bf16", {"enabled": 1}), ("fp16", {"enabled": "true"}), ("bf16", True), ("fp16", None)],
)
def test_precision_switch_that_is_not_a_json_bool_is_refused(section: str, value):
    """DeepSpeed reads a truthy "enabled" (1, "true") as on, where a check for `true` alone would read fp32."""
    _raises(f'{section} must be an object whose "enabled" is true or false, got {value!r}', _base(**{section: value}))


def test_unknown_precision():
    _raises("precision must be one of fp32, bf16, fp16, got 'fp8'", _base(), precision="fp8")


def test_gradient_clipping_conflict():
    _raises("gradient_clipping is 0.5 but the run's grad_clip is 1.0", _base(gradient_clipping=0.5))
    _raises("gradient_clipping must be a number or 'auto', got 'none'", _base(gradient_clipping="none"))


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_sections_refused(section: str):
    ds = _base(**{section: {"type": "AdamW", "params": {}}})
    _raises(f"'{section}' section; the trainer builds its own", ds)


def test_zero3_refused():
    msg = _raises("zero_optimization.stage 3", _base(zero_optimization={"stage": 3}))
    assert "not DeepSpeed MoE modules" in msg and "use stage 1 or 2" in msg


@pytest.mark.parametrize("zero", [{"stage": 0}, None])
def test_zero0_refused(zero):
    ds = (
        _base(zero_optimization=zero)
        if zero is not None
        else {k: v for k, v in _base().items() if k != "zero_optimization"}
    )
    msg = _raises("zero_optimization.stage 0", ds)
    assert "overflow check" in msg


@pytest.mark.parametrize("stage", [4, "2", 1.5])
def test_bad_zero_stage(stage):
    _raises(f"zero_optimization.stage must be 1 or 2, got {stage!r}", _base(zero_optimization={"stage": stage}))


@pytest.mark.parametrize(
    "zero, match",
    [
        ({"stage": 2, "cpu_offload": True}, 'cpu_offload is the old form; write "offload_optimizer"'),
        ({"stage": 2, "offload_optimizer": None}, "offload_optimizer must be .* got None"),
        ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, "got {'device': 'nvme'}"),
    ],
)
def test_offload_forms_the_trainer_cannot_serve_are_refused(zero: dict, match: str):
    """The trainer hands DeepSpeed its CPU Adam only for offload_optimizer.device "cpu"; other spellings of
    offload crashed inside DeepSpeed."""
    _raises(match, _base(zero_optimization=zero))


def test_optimizer_kind():
    offload = _resolve(_base(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"}}))
    assert (optimizer_kind(None), optimizer_kind(_resolve(_base())), optimizer_kind(offload)) == (
        "torch",
        "zero",
        "zero+cpu_offload",
    )


def test_ep_size_must_divide_world_size():
    _raises("ep_size 3 does not divide world_size 8", _base(), ep_size=3)


def test_other_auto_fields_refused():
    ds = _base(zero_optimization={"stage": 2, "reduce_bucket_size": "auto"})
    _raises("zero_optimization.reduce_bucket_size is 'auto'", ds)
