"""Fault injection on 2 gloo ranks with expert parallelism (EP=2): saves, resumes, signals, non-finite steps.

Faults are injected from the tests' rank functions (patching ``torch.save``, ``shutil.rmtree``, the model's
forward, a gradient hook, the router) inside the spawned rank processes, never through hooks in the product.
Every multi-rank run goes through ``run_local_ranks`` (a deadline: a hang fails). A DeepSpeed rank costs seconds
to start, so each launch runs several scenarios, each in its own run directory, and the tests inspect the results
and the files left behind:

    launch 1  continuous run, first half of a split run, SIGUSR1 mid-step and mid-save, a run to damage later,
              then rank 1 dies inside its torch.save of step 4 (the launch fails)
    launch 2  (a new process group) resumes: split, after the crash, past a damaged checkpoint, past damaged
              ``latest`` files; refused fresh start; ENOSPC; NaN / Inf skips and abort; router collapse; bad
              configurations; then ENOSPC left to fail the launch
    launch 3  pruning fails (raises), then rank 0 dies while pruning (the launch fails)
    launch 4  4 ranks load the EP=2 checkpoint at EP=4 and run a forward pass
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ditmoe.config import ModelConfig
from ditmoe.models.dit import DiTMoE
from ditmoe.parallel.launch import RankFailure, run_local_ranks
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.run_state import expert_files, load_global_state, load_rows, load_weights

STEP = ckpt_io.step_dir
LAUNCH_TIMEOUT_S = 150


# ---------------------------------------------------------------------------------------------------------------
# Helpers that run inside the rank processes


@contextlib.contextmanager
def _patched(owner, name: str, make):
    """Replace ``owner.name`` by ``make(real)`` for the duration (this process only)."""
    real = getattr(owner, name)
    setattr(owner, name, make(real))
    try:
        yield
    finally:
        setattr(owner, name, real)


def _model_hook(hook):
    """Let ``hook(model)`` alter the DiTMoE that ``train`` builds (before DeepSpeed wraps it)."""
    from ditmoe.training import loop

    def make(real):
        def build(*args, **kwargs):
            model = real(*args, **kwargs)
            hook(model)
            return model

        return build

    return _patched(loop, "DiTMoE", make)


def _on_forward(calls, action):
    """Model hook: ``action(output)`` replaces the output of the forward calls numbered in ``calls`` (1-based)."""

    def hook(model):
        real, counter = model.forward, itertools.count(1)

        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            return action(out) if (calls == "all" or next(counter) in calls) else out

        model.forward = forward

    return hook


def _nan_prediction(out):
    return dataclasses.replace(out, prediction=out.prediction * float("nan"))


def _signal_self(out=None):
    os.kill(os.getpid(), signal.SIGUSR1)
    return out


def _cfg(data, out, **kw):
    from ditmoe.training.config import train_config

    kw = {"ep_size": 2, "log_every": 1, **kw}
    return train_config("digits-smoke", data=str(data), out=str(out), **kw)


def _run(data, out, **kw) -> dict:
    """Train and summarise; an exception is recorded (type, message) instead of raised."""
    from ditmoe.training.loop import train

    try:
        r = train(_cfg(data, out, **kw), progress=False)
    except Exception as e:
        return {"error": (type(e).__name__, str(e))}
    return {"losses": r.losses, "step": r.step, "skipped": r.skipped_steps, "stopped": r.stopped_by_signal}


def _resume(data, out, **kw) -> dict:
    """Resume ``out``, recording which checkpoint every rank agreed on first."""
    found = ckpt_io.agree_on_newest(Path(out) / "checkpoints")
    return {"found": found.name if found else None, **_run(data, out, resume=True, **kw)}


def _save_on(rank: int, rank_now: int, match: str, action):
    """A ``torch.save`` replacement that calls ``action(real, obj, path)`` for paths containing ``match``."""

    def make(real):
        def save(obj, f, *args, **kwargs):
            if rank_now == rank and match in str(f):
                return action(real, obj, f, *args, **kwargs)
            return real(obj, f, *args, **kwargs)

        return save

    return make


def _enospc(real, obj, f, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))


# ---------------------------------------------------------------------------------------------------------------
# Launch 1


def _launch1(rank: int, world: int, data: str, root: str) -> None:
    root = Path(root)
    res = {}
    res["cont"] = _run(data, root / "cont", steps=6, ckpt_every=3)
    res["split"] = _run(data, root / "split", steps=3, ckpt_every=3)
    res["damaged"] = _run(data, root / "damaged", steps=4, ckpt_every=2)
    # SIGUSR1 to rank 1 in the middle of step 3 (inside its forward).
    with _model_hook(_on_forward({3} if rank == 1 else set(), _signal_self)):
        res["sig_step"] = _run(data, root / "sig_step", steps=6, ckpt_every=2)
    # SIGUSR1 to rank 1 while it writes its files of step 2.
    fired = []

    def signal_during_save(real, obj, f, *args, **kwargs):
        if not fired:
            fired.append(str(f))
            _signal_self()
        return real(obj, f, *args, **kwargs)

    with _patched(torch, "save", _save_on(1, rank, ".tmp-step_00000002", signal_during_save)):
        res["sig_save"] = _run(data, root / "sig_save", steps=6, ckpt_every=2)
    res["sig_save"]["fired_in"] = fired
    torch.save(res, root / f"launch1-rank{rank}.pt")

    # Rank 1 dies while writing its files of step 4: half a file written, then the process is gone.
    def die(real, obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
        os._exit(1)

    with _patched(torch, "save", _save_on(1, rank, ".tmp-step_00000004/ema-experts", die)):
        from ditmoe.training.loop import train

        train(_cfg(data, root / "crash", steps=6, ckpt_every=2), progress=False)


def _launch_ending_in_failure(fn, name: str, digits, root) -> dict:
    """Run ``fn`` on 2 ranks; it saves its results to ``{name}-rank{r}.pt`` and then fails on purpose."""
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_local_ranks(fn, 2, timeout_s=LAUNCH_TIMEOUT_S, args=(str(digits), str(root)))
    elapsed = time.monotonic() - t0
    results = [torch.load(root / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
    return {"root": root, "results": results, "failure": str(failure.value), "elapsed": elapsed}


@pytest.fixture(scope="module")
def launch1(digits, tmp_path_factory):
    return _launch_ending_in_failure(_launch1, "launch1", digits, tmp_path_factory.mktemp("faults"))


# ---------------------------------------------------------------------------------------------------------------
# Launch 2

LATEST_VARIANTS = {"missing": None, "empty": "", "garbage": "\x00garbage\n", "dangling": "step_00000099"}


def _launch2(rank: int, world: int, data: str, root: str, ds_bf16: str) -> None:
    from ditmoe.parallel import expert_parallel

    root = Path(root)
    res = {}
    res["split"] = _resume(data, root / "split", steps=6, ckpt_every=3)
    res["crash"] = _resume(data, root / "crash", steps=4, ckpt_every=2)
    res["damaged"] = _resume(data, root / "damaged", steps=4, ckpt_every=2)
    for name in LATEST_VARIANTS:
        res[f"latest_{name}"] = _resume(data, root / f"latest_{name}", steps=4, ckpt_every=2)
    res["fresh_over_existing"] = _run(data, root / "cont", steps=7)

    with _patched(torch, "save", _save_on(1, rank, ".tmp-step_", _enospc)):
        res["enospc"] = _run(data, root / "enospc", steps=2, ckpt_every=2)

    # NaN prediction on rank 1 at step 2 only; then NaN at every step with max_skipped_steps=2.
    with _model_hook(_on_forward({2} if rank == 1 else set(), _nan_prediction)):
        res["nan"] = _run(data, root / "nan", steps=3, ckpt_every=1, keep_last=10)
    with _model_hook(_on_forward("all" if rank == 1 else set(), _nan_prediction)):
        res["abort"] = _run(data, root / "abort", steps=6, ckpt_every=1, max_skipped_steps=2)

    # Inf in the gradient of one expert (global expert 2, rank 1's first) at step 2, on rank 1 only.
    def inf_grad(model):
        if rank != 1:
            return
        counter = itertools.count(1)

        def hook(grad):
            if next(counter) == 2:
                grad = grad.clone()
                grad[0] = float("inf")
            return grad

        model.blocks[0].moe.experts.gate_up_proj.register_hook(hook)

    with _model_hook(inf_grad):
        res["inf"] = _run(data, root / "inf", steps=3, ckpt_every=1, keep_last=10)

    # Router collapse: every token picks experts 0 and 1, both held by EP rank 0; rank 1 receives no rows.
    def collapse(model):
        for block in model.blocks:
            router = block.moe.router
            bias = torch.tensor([30.0, 30.0, -30.0, -30.0])
            router.forward = lambda x, real=router.forward, bias=bias: real(x) + bias

    received = []

    def count_rows(real):
        def run(ops, experts, recv_x_RD, *args, **kwargs):
            received.append(recv_x_RD.shape[0])
            return real(ops, experts, recv_x_RD, *args, **kwargs)

        return run

    with _model_hook(collapse), _patched(expert_parallel, "_run_local_experts", count_rows):
        res["collapse"] = _run(data, root / "collapse", steps=2, log_every=2, ckpt_every=2)
    res["collapse"]["received_rows"] = received

    res["bad_ep3"] = _run(data, root / "bad_ep3", ep_size=3)
    res["bad_ep4"] = _run(data, root / "bad_ep4", ep_size=4)
    res["bad_batch"] = _run(data, root / "bad_batch", batch_size=6, grad_accum=2)
    res["bad_ds"] = _run(data, root / "bad_ds", deepspeed_config=ds_bf16, precision="fp32")
    torch.save(res, root / f"launch2-rank{rank}.pt")

    with _patched(torch, "save", _save_on(1, rank, ".tmp-step_", _enospc)):
        from ditmoe.training.loop import train

        train(_cfg(data, root / "enospc_raised", steps=2, ckpt_every=2), progress=False)


def _damage(path: Path, how: str) -> bytes:
    original = path.read_bytes()
    if how == "truncate":
        path.write_bytes(original[: len(original) // 2])
    else:
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
    return original


@pytest.fixture(scope="module")
def launch2(launch1, digits):
    root = launch1["root"]
    seen = {}
    # Fault 2: a file of the newest checkpoint truncated, then bit-flipped (left so for the resume).
    ckpts = root / "damaged" / "checkpoints"
    victim = STEP(ckpts, 4) / "model-experts-1of2.pt"
    for how in ("truncate", "flip"):
        warnings = []
        original = _damage(victim, how)
        seen[how] = (ckpt_io.newest_valid(ckpts, warn=warnings.append), warnings)
        if how == "truncate":
            victim.write_bytes(original)
    (ckpts / "latest").write_text(STEP(ckpts, 4).name)  # `latest` names the damaged one
    # Fault 3: `latest` missing / empty / garbage / naming a missing step, on copies of the split run (step 3).
    for name, text in LATEST_VARIANTS.items():
        copy = root / f"latest_{name}"
        shutil.copytree(root / "split", copy)
        latest = copy / "checkpoints" / "latest"
        latest.unlink()
        if text is not None:
            latest.write_text(text)
        seen[f"latest_{name}"] = ckpt_io.newest_valid(copy / "checkpoints")
    (root / "crash" / "checkpoints" / "latest").unlink()
    seen["crash_before"] = sorted(p.name for p in (root / "crash" / "checkpoints").iterdir())
    seen["crash_newest"] = ckpt_io.newest_valid(root / "crash" / "checkpoints")

    ds_bf16 = root / "ds_bf16.json"
    ds_bf16.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        run_local_ranks(_launch2, 2, timeout_s=LAUNCH_TIMEOUT_S, args=(str(digits), str(root), str(ds_bf16)))
    elapsed = time.monotonic() - t0
    results = [torch.load(root / f"launch2-rank{r}.pt", weights_only=False) for r in range(2)]
    return {"root": root, "results": results, "failure": str(failure.value), "elapsed": elapsed, "seen": seen}


# ---------------------------------------------------------------------------------------------------------------
# Launch 3: pruning interrupted


def _prune_fault(rank: int, exit_process: bool):
    def make(real):
        def rmtree(path, *args, **kwargs):
            p = Path(path)
            if rank == 0 and p.name == "step_00000002" and p.is_dir():
                # half-way through the directory: a file other than the marker, which the prune must remove first
                next(f for f in sorted(p.iterdir()) if f.name != ckpt_io.MARKER).unlink()
                if exit_process:
                    os._exit(1)
                raise OSError(errno.EIO, "simulated I/O error while pruning", str(p))
            return real(path, *args, **kwargs)

        return rmtree

    return make


def _launch3(rank: int, world: int, data: str, root: str) -> None:
    root = Path(root)
    res = {}
    with _patched(shutil, "rmtree", _prune_fault(rank, exit_process=False)):
        res["prune_raises"] = _run(data, root / "prune_raises", steps=4, ckpt_every=2, keep_last=1)
    torch.save(res, root / f"launch3-rank{rank}.pt")
    with _patched(shutil, "rmtree", _prune_fault(rank, exit_process=True)):
        from ditmoe.training.loop import train

        train(_cfg(data, root / "prune_killed", steps=4, ckpt_every=2, keep_last=1), progress=False)


@pytest.fixture(scope="module")
def launch3(digits, tmp_path_factory):
    return _launch_ending_in_failure(_launch3, "launch3", digits, tmp_path_factory.mktemp("prune"))


# ---------------------------------------------------------------------------------------------------------------
# Launch 4: EP=4 loads the EP=2 checkpoint


def _probe_batch(mcfg: ModelConfig):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=g)
    t = torch.rand(8, generator=g) * 999
    y = torch.randint(0, mcfg.num_classes, (8,), generator=g)
    return x, t, y


def _launch4(rank: int, world: int, ckpt: str) -> dict:
    from ditmoe.parallel import build_expert_parallel_groups
    from ditmoe.parallel.distributed import DistContext
    from ditmoe.parallel.expert_state import expert_slices

    ckpt = Path(ckpt)
    mcfg = ModelConfig.from_dict(ckpt_io.load_config(ckpt)["model"])
    groups = build_expert_parallel_groups(4, num_experts=mcfg.moe.num_experts)
    ctx = DistContext(rank, world, rank, torch.device("cpu"), groups, "ep_size_4")
    torch.manual_seed(1000 + rank)  # a different init per rank: everything must come from the checkpoint
    model = DiTMoE(mcfg, ep_group=groups.ep_group).eval()
    load_weights(ckpt, "model", model, ctx)
    state = model.state_dict()
    slices = expert_slices(model)
    experts = {key: {gid: state[key][i].clone() for i, gid in enumerate(ids)} for key, ids in slices.items()}
    dense = {key: v.clone() for key, v in state.items() if key not in slices}
    x, t, y = _probe_batch(mcfg)
    mine = slice(2 * rank, 2 * rank + 2)
    with torch.no_grad():
        pred = model(x[mine], t[mine], y[mine]).prediction
    return {"experts": experts, "dense": dense, "pred": pred}


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _state(run: Path, step: int, kind: str) -> dict:
    return load_global_state(STEP(run / "checkpoints", step), kind)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tensors(obj, prefix=""):
    """Every tensor in a nested optimizer state, by path."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the timing and memory entries."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "mem/"))} for r in records]


def test_fault1_rank_dies_mid_save_restart_loads_previous(launch1, launch2):
    assert "still running" not in launch1["failure"] and launch1["elapsed"] < LAUNCH_TIMEOUT_S - 10  # no hang
    assert "rank0 failed" in launch1["failure"]  # rank 0 saw its peer vanish in the save's collective
    seen = launch2["seen"]
    assert ".tmp-step_00000004" in seen["crash_before"] and "step_00000004" not in seen["crash_before"]
    assert seen["crash_newest"] == STEP(launch1["root"] / "crash" / "checkpoints", 2)
    cont = launch1["results"][0]["cont"]["losses"]
    for r in launch2["results"]:
        crash = r["crash"]
        assert crash["found"] == "step_00000002"
        assert crash["step"] == 4 and crash["losses"] == cont[2:4]  # steps 3-4 as the uninterrupted run
    ckpts = launch1["root"] / "crash" / "checkpoints"
    assert ckpt_io.newest_valid(ckpts) == STEP(ckpts, 4) and not list(ckpts.glob(".tmp-*"))


def test_fault2_damaged_newest_checkpoint_is_skipped_naming_the_file(launch2):
    ckpts = launch2["root"] / "damaged" / "checkpoints"
    for how in ("truncate", "flip"):
        found, warnings = launch2["seen"][how]
        assert found == STEP(ckpts, 2), how
        assert len(warnings) == 1 and "model-experts-1of2.pt" in warnings[0] and "checksum" in warnings[0], how
    for r in launch2["results"]:
        assert r["damaged"]["found"] == "step_00000002" and r["damaged"]["step"] == 4
    # The damaged step 4 was overwritten by the resumed run's save, and verifies now.
    assert ckpt_io.newest_valid(ckpts) == STEP(ckpts, 4)


def test_fault3_latest_is_never_trusted_and_no_silent_fresh_start(launch1, launch2):
    root = launch2["root"]
    cont = launch1["results"][0]["cont"]["losses"]
    for name in LATEST_VARIANTS:
        assert launch2["seen"][f"latest_{name}"] == STEP(root / f"latest_{name}" / "checkpoints", 3), name
        for r in launch2["results"]:
            assert r[f"latest_{name}"]["found"] == "step_00000003", name
            assert r[f"latest_{name}"]["losses"] == cont[3:4], name
    for r in launch2["results"]:
        kind, msg = r["fresh_over_existing"]["error"]
        assert kind == "ConfigError" and "already holds checkpoints" in msg and "--resume" in msg


def test_fault4_enospc_on_one_rank_fails_the_save_on_every_rank(launch2):
    ckpts = launch2["root"] / "enospc" / "checkpoints"
    for r in launch2["results"]:
        kind, msg = r["enospc"]["error"]
        assert kind == "CheckpointError" and "nothing committed" in msg
        assert "rank 1: OSError" in msg and "No space left on device" in msg and "rank 0" not in msg
    assert not list(ckpts.glob("step_*")) and not list(ckpts.glob(".tmp-*")) and not (ckpts / "latest").exists()
    failure = launch2["failure"]  # the same fault left to escape: the launcher reports it, no hang
    assert "CheckpointError" in failure and "rank 1: OSError" in failure and "still running" not in failure
    assert not list((launch2["root"] / "enospc_raised" / "checkpoints").glob("*step_*"))


def test_fault5_interrupted_pruning_keeps_the_last_commit(launch3):
    root = launch3["root"]
    for name in ("prune_raises", "prune_killed"):
        ckpts = root / name / "checkpoints"
        assert ckpt_io.committed_steps(ckpts) == [STEP(ckpts, 4)], name
        ckpt_io.verify(STEP(ckpts, 4))
        assert ckpt_io.newest_valid(ckpts) == STEP(ckpts, 4), name
        assert (ckpts / "latest").read_text() == "step_00000004", name
        assert not (STEP(ckpts, 2) / ckpt_io.MARKER).exists(), name  # the half-removed one is no longer committed
    assert "still running" not in launch3["failure"] and "rank1 failed" in launch3["failure"]
    for r in launch3["results"]:
        assert r["prune_raises"].get("step") == 4, r["prune_raises"]  # a failed prune does not fail the save


def test_fault6_split_run_equals_continuous_bitwise(launch1, launch2):
    root = launch1["root"]
    for r1, r2 in zip(launch1["results"], launch2["results"], strict=True):
        assert len(r1["cont"]["losses"]) == 6
        assert r2["split"]["found"] == "step_00000003"
        assert r1["split"]["losses"] + r2["split"]["losses"] == r1["cont"]["losses"]
    for kind in ("model", "ema"):
        assert _same_state(_state(root / "cont", 6, kind), _state(root / "split", 6, kind)), kind
    # grad norm, balance loss, per-layer expert shares, entropy of every step
    assert _metrics(root / "split") == _metrics(root / "cont")


def test_fault8_weights_load_at_ep1_and_ep4(launch1):
    ckpt = STEP(launch1["root"] / "cont" / "checkpoints", 6)
    rows = load_rows(ckpt, "model")
    mcfg = ModelConfig.from_dict(ckpt_io.load_config(ckpt)["model"])
    for key, by_id in rows.items():  # experts differ from each other
        for i, j in itertools.combinations(sorted(by_id), 2):
            assert not torch.equal(by_id[i], by_id[j]), (key, i, j)

    torch.manual_seed(1234)
    single = DiTMoE(mcfg).eval()
    load_weights(ckpt, "model", single)
    state = single.state_dict()
    for key, by_id in rows.items():
        assert sorted(by_id) == list(range(mcfg.moe.num_experts))
        for gid, saved in by_id.items():
            assert torch.equal(state[key][gid], saved), (key, gid)
    x, t, y = _probe_batch(mcfg)
    with torch.no_grad():
        pred = single(x, t, y).prediction

    ranks = run_local_ranks(_launch4, 4, timeout_s=LAUNCH_TIMEOUT_S, args=(str(ckpt),))
    for rank, r in enumerate(ranks):
        for key, by_id in r["experts"].items():
            assert sorted(by_id) == [rank]
            assert torch.equal(by_id[rank], rows[key][rank]), (key, rank)
        assert sorted(r["dense"]) == sorted(set(state) - set(rows))
        for key, v in r["dense"].items():
            assert torch.equal(v, state[key]), (key, rank)
        # Each rank runs 2 of the 8 samples: other GEMM shapes, whose CPU BLAS kernels may round the last bit
        # differently (MKL on AMD Zen: 1 ulp). A weight loaded wrong would be off by orders of magnitude more.
        torch.testing.assert_close(r["pred"], pred[2 * rank : 2 * rank + 2], rtol=1e-5, atol=1e-6)


def test_fault9_every_expert_saved_once_without_bloat(launch1):
    ckpt = STEP(launch1["root"] / "cont" / "checkpoints", 6)
    mcfg = ModelConfig.from_dict(ckpt_io.load_config(ckpt)["model"])
    E = mcfg.moe.num_experts
    for kind in ("model", "ema"):
        files = expert_files(ckpt, kind)
        assert [f.name for f in files] == [f"{kind}-experts-0of2.pt", f"{kind}-experts-1of2.pt"]
        seen: dict[str, list[int]] = {}
        for f in files:
            part = torch.load(f, weights_only=True)
            nbytes = sum(t.numel() * t.element_size() for rows in part.values() for t in rows.values())
            n = sum(len(rows) for rows in part.values())
            assert f.stat().st_size < 1.2 * nbytes + 1024 * n, (f.name, f.stat().st_size, nbytes)
            for key, rows in part.items():
                seen.setdefault(key, []).extend(rows)
        layers = {key.split(".")[1] for key in seen}
        assert len(layers) == mcfg.depth
        for key, ids in seen.items():
            assert sorted(ids) == list(range(E)), key  # each expert exactly once
        per_layer = {(key.split(".")[1], gid) for key, ids in seen.items() for gid in ids}
        assert len(per_layer) == mcfg.depth * E
    dense = torch.load(ckpt / "model-dense.pt", weights_only=True)
    nbytes = sum(t.numel() * t.element_size() for t in dense.values())
    assert (ckpt / "model-dense.pt").stat().st_size < 1.2 * nbytes + 1024 * len(dense)


def test_fault10_sigusr1_on_one_rank_saves_the_same_step_everywhere(launch1):
    root = launch1["root"]
    for name in ("sig_step", "sig_save"):
        ckpts = root / name / "checkpoints"
        for rank, r in enumerate(launch1["results"]):
            assert r[name]["stopped"] and r[name]["step"] == 3, (name, rank, r[name])
            assert len(r[name]["losses"]) == 3
            state = ckpt_io.load_file(STEP(ckpts, 3), f"trainer-rank{rank}")
            assert state["step"] == 3
        assert [d.name for d in ckpt_io.committed_steps(ckpts)] == ["step_00000002", "step_00000003"]
        assert ckpt_io.newest_valid(ckpts) == STEP(ckpts, 3)
    assert ".tmp-step_00000002" in launch1["results"][1]["sig_save"]["fired_in"][0]


def test_fault10_cli_exits_75_after_sigusr1_with_workers(digits, tmp_path):
    out = tmp_path / "cli"
    log = tmp_path / "cli.log"
    cmd = [sys.executable, "-m", "ditmoe.train", "--preset", "digits-smoke", "--data", str(digits)]
    cmd += ["--out", str(out), "--steps", "100000", "--ckpt-every", "2", "--log-every", "1", "--num-workers", "2"]
    ckpts = out / "checkpoints"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while not (ckpts / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (ckpts / "latest").exists(), log.read_text()[-2000:]
            os.killpg(proc.pid, signal.SIGUSR1)  # the whole process group: the DataLoader workers get it too
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 75, text[-2000:]
    step = int(re.search(r"stopped by a signal at step (\d+)", text).group(1))
    assert ckpt_io.newest_valid(ckpts) == STEP(ckpts, step)
    assert ckpt_io.load_file(STEP(ckpts, step), "trainer-rank0")["step"] == step
    assert "Traceback" not in text and "DataLoader worker" not in text


def test_fault11_nan_on_one_rank_is_skipped_everywhere(launch2):
    root = launch2["root"]
    for r in launch2["results"]:
        assert r["nan"]["skipped"] == 1 and r["nan"]["step"] == 3
        assert torch.isnan(torch.tensor(r["nan"]["losses"][1]))
    for kind in ("model", "ema"):
        assert _same_state(_state(root / "nan", 1, kind), _state(root / "nan", 2, kind)), kind
        assert not _same_state(_state(root / "nan", 2, kind), _state(root / "nan", 3, kind)), kind
    for rank in range(2):  # the optimizer state (fp32 partitions, Adam moments) is untouched too
        before, after = (
            dict(_tensors(ckpt_io.load_file(STEP(root / "nan" / "checkpoints", s), f"optimizer-rank{rank}", True)))
            for s in (1, 2)
        )
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    logged = [m["skipped_steps"] for m in _metrics(root / "nan")]
    assert logged == [0, 1, 1]


def test_fault11_inf_in_one_expert_gradient_is_skipped_everywhere(launch2):
    root = launch2["root"]
    for r in launch2["results"]:
        assert r["inf"]["skipped"] == 1 and r["inf"]["step"] == 3, r["inf"]
    for kind in ("model", "ema"):
        assert _same_state(_state(root / "inf", 1, kind), _state(root / "inf", 2, kind)), kind
        assert not _same_state(_state(root / "inf", 2, kind), _state(root / "inf", 3, kind)), kind


def test_fault11_consecutive_non_finite_steps_abort_every_rank(launch2):
    for r in launch2["results"]:
        kind, msg = r["abort"]["error"]
        assert kind == "TrainingAborted" and "2 consecutive steps" in msg and "step 2" in msg


def test_fault12_router_collapse_runs_and_the_monitor_fires(launch2):
    r0, r1 = (r["collapse"] for r in launch2["results"])
    assert r0["step"] == r1["step"] == 2
    assert r1["received_rows"] and set(r1["received_rows"]) == {0}  # rank 1's experts got nothing
    assert min(r0["received_rows"]) > 0
    record = json.loads((launch2["root"] / "collapse" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["moe/max_imbalance"] == 2.0 and record["moe/mean_imbalance"] == 2.0
    assert record["moe/layer0/expert2"] == record["moe/layer0/expert3"] == 0.0


@pytest.mark.parametrize(
    "name,needle",
    [
        ("bad_ep3", "ep_size=3 must divide the number of experts 4"),
        ("bad_ep4", "ep_size=4 must divide the world size 2"),
        ("bad_batch", "batch_size=6 does not split over 2 ranks x grad_accum=2"),
        ("bad_ds", "enables bf16 but the run's precision is fp32"),
    ],
)
def test_bad_configurations_name_the_values(launch2, name, needle):
    for r in launch2["results"]:
        kind, msg = r[name]["error"]
        assert kind == "ConfigError" and needle in msg, msg
    if name == "bad_ds":
        assert "ds_bf16.json" in msg


def _cause_on_rank1(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("the cause, on rank 1")
    torch.distributed.barrier()  # cut short when rank 1 dies: rank 0's own error follows


def test_the_rank_that_failed_first_is_reported():
    """Rank 0's knock-on error (gloo: connection closed) came first by name and hid the cause."""
    with pytest.raises(RankFailure) as failure:
        run_local_ranks(_cause_on_rank1, 2, timeout_s=60)
    assert str(failure.value).startswith("rank1 failed first")
    assert "ValueError: the cause, on rank 1" in str(failure.value)


def _killed_on_rank1(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does: no traceback, no error file
    torch.distributed.barrier()


def test_a_rank_killed_by_a_signal_is_named_with_its_exit_code():
    """Only rank 0's knock-on gloo error was reported; rank 1, killed, was never named."""
    with pytest.raises(RankFailure) as failure:
        run_local_ranks(_killed_on_rank1, 2, timeout_s=60)
    assert str(failure.value).startswith("rank1 died with exit code -9, no traceback; of the ranks with a traceback")


def _save_with_read_only_root_on_rank0(rank: int, world: int, root: str) -> str:
    """Rank 0 cannot create the checkpoint's temporary folder; every rank returns the error its save raised."""

    def make(real):
        def mkdir(self, *args, **kwargs):
            if rank == 0 and self.name.startswith(".tmp-"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real(self, *args, **kwargs)

        return mkdir

    with _patched(Path, "mkdir", make), pytest.raises(ckpt_io.CheckpointError) as failure:
        ckpt_io.save_checkpoint(Path(root), 2, {f"trainer-rank{rank}": {"step": 2}}, {}, keep_last=3)
    return str(failure.value)


def test_a_checkpoint_folder_rank0_cannot_create_fails_the_save_on_every_rank(tmp_path):
    """Rank 0 raised before the save's first collective: its peers waited there, never told the save failed."""
    errors = run_local_ranks(_save_with_read_only_root_on_rank0, 2, timeout_s=60, args=(str(tmp_path),))
    for msg in errors:
        assert "nothing committed" in msg and "rank 0 could not create" in msg and "Read-only file system" in msg
    assert not list(tmp_path.glob("*step_*"))
