"""The training loop on several gloo ranks (DeepSpeed engine, expert parallelism) and under real launchers.

Every multi-rank run is a subprocess per rank with a deadline (``run_local_ranks``), so a hang fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditmoe.data.shards import load_split_tensors
from ditmoe.parallel.distributed import slurm_to_torch_env
from ditmoe.parallel.launch import free_port, run_local_ranks
from ditmoe.sampling.sample import generate, load_sampler
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.export import export_safetensors
from ditmoe.training.run_state import load_global_state

GLOBAL_BATCH, GRAD_ACCUM = 8, 2


def global_batch_slices(data: str, rank: int, world: int, seed: int = 0):
    """The same global batches whatever the world size: micro-step a of rank r gets rows (a * world + r) * micro
    onwards, the rows the training loop draws noise and label dropout for."""
    x, y = load_split_tensors(Path(data), "train")
    gen = torch.Generator().manual_seed(seed)
    micro = GLOBAL_BATCH // (world * GRAD_ACCUM)
    while True:
        idx = torch.randint(0, len(y), (GLOBAL_BATCH,), generator=gen)
        for accum in range(GRAD_ACCUM):
            first = (accum * world + rank) * micro
            yield x[idx[first : first + micro]], y[idx[first : first + micro]]


def train_rank(rank: int, world: int, data: str, out: str, ep_size: int, steps: int) -> list[float]:
    from ditmoe.training.config import train_config
    from ditmoe.training.loop import train

    cfg = train_config(
        "digits-smoke",
        data=data,
        out=out,
        steps=steps,
        batch_size=GLOBAL_BATCH,
        grad_accum=GRAD_ACCUM,  # DeepSpeed's engine steps between boundaries too: the runs must still agree
        ep_size=ep_size,
        # below every step's norm (~0.55), so the clip is in force; the norm it divides by must be the global one,
        # experts included: the logged norms are compared across topologies (Adam all but hides the clip itself)
        grad_clip=0.1,
        log_every=1,
        ckpt_every=steps,
        # per-image balance loss: its mean over ranks equals its mean over the global batch (the official
        # per-batch loss is computed per rank, as in the official DDP training, so it depends on the split)
        model_opts={"moe": {"balance_loss_type": "sequence"}},
    )
    return train(cfg, progress=False, batches=global_batch_slices(data, rank, world)).losses


def _grad_norms(run_dir: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """3 steps each: plain torch in this process (world 0: no launcher, no DeepSpeed), then under DeepSpeed EP=1
    on 1 rank, EP=2 on 2 ranks, EP=2 on 4 ranks (expert data parallelism 2)."""
    root = tmp_path_factory.mktemp("ep_runs")
    out = {(0, 1): (root / "torch", [train_rank(0, 1, str(digits), str(root / "torch"), 1, 3)])}
    for world, ep in [(1, 1), (2, 2), (4, 2)]:
        run_dir = root / f"world{world}_ep{ep}"
        losses = run_local_ranks(train_rank, world, timeout_s=240, args=(str(digits), str(run_dir), ep, 3))
        out[(world, ep)] = (run_dir, losses)
    return out


def test_expert_parallel_training_equals_single_rank(runs):
    base_dir, base_losses = runs[(0, 1)]
    base = {kind: load_global_state(ckpt_io.newest_valid(base_dir / "checkpoints"), kind) for kind in ("model", "ema")}
    base_norms = _grad_norms(base_dir)
    assert min(base_norms) > 0.2  # twice the clip at least: every step was clipped
    for (world, ep), (run_dir, losses) in runs.items():
        assert all(rank_losses == losses[0] for rank_losses in losses), "ranks must log the same (global) losses"
        assert losses[0] == pytest.approx(base_losses[0], rel=1e-5, abs=1e-6), (world, ep)
        assert _grad_norms(run_dir) == pytest.approx(base_norms, rel=1e-4), (world, ep)  # the global norm
        ckpt = ckpt_io.newest_valid(run_dir / "checkpoints")
        for kind in ("model", "ema"):
            state = load_global_state(ckpt, kind)
            assert state.keys() == base[kind].keys()
            for key, value in state.items():
                torch.testing.assert_close(value, base[kind][key], rtol=1e-5, atol=1e-6, msg=f"{world}/{ep} {key}")
    # the weights moved away from their average (EMA lags the trained weights), so the equality above is between
    # trained states, not two copies of the initial one
    trained = base["model"]
    assert any(not torch.equal(v, base["ema"][k]) for k, v in trained.items() if k in base["ema"])


def test_export_then_single_process_sampling_equals_the_multi_rank_checkpoint(runs, tmp_path):
    run_dir, _ = runs[(4, 2)]
    exported = export_safetensors(run_dir, tmp_path / "model.safetensors", ema=True)
    from_ckpt = generate(load_sampler(run_dir), [0, 3, 7], cfg_scale=1.5, steps=4, seed=1, progress=False)
    from_file = generate(load_sampler(exported), [0, 3, 7], cfg_scale=1.5, steps=4, seed=1, progress=False)
    assert torch.equal(from_ckpt, from_file)
    raw = export_safetensors(run_dir, tmp_path / "raw.safetensors", ema=False)
    raw_samples = generate(load_sampler(raw), [0, 3, 7], cfg_scale=1.5, steps=4, seed=1, progress=False)
    assert not torch.equal(raw_samples, from_file)  # --no-ema exports other weights


def test_export_cli(runs, tmp_path, capsys):
    from ditmoe.cli import main

    run_dir, _ = runs[(2, 2)]
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.safetensors"), "--ema"]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "raw.safetensors"), "--no-ema"]) == 0
    assert "raw weights" in capsys.readouterr().out
    ema, raw = load_sampler(tmp_path / "m.safetensors").model, load_sampler(tmp_path / "raw.safetensors").model
    assert not torch.equal(ema.blocks[0].moe.experts.gate_up_proj, raw.blocks[0].moe.experts.gate_up_proj)
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_srun_environment_maps_to_torch_variables():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "16",  # the job's tasks; this step runs 8 of them
        "SLURM_STEP_ID": "0",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5",
    }
    assert slurm_to_torch_env(env) == {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "10.0.0.5",
        "MASTER_PORT": str(29500 + 234),
    }
    assert slurm_to_torch_env({**env, "RANK": "3"}) == {}  # a launcher already set them
    one_task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert slurm_to_torch_env(one_task) == {}  # one task: no process group
    # a 2-task job's batch shell (no srun step): a plain `ditmoe train` there is one process, not rank 0 of 2 waiting
    # for a rank that never starts
    assert slurm_to_torch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}) == {}


def _launch(cmd: list[str], digits: Path, out: Path, extra: list[str] = ()) -> subprocess.CompletedProcess:
    args = [
        "--preset",
        "digits-smoke",
        "--data",
        str(digits),
        "--out",
        str(out),
        "--ep-size",
        "2",
        "--steps",
        "2",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)


def _job_id_with_free_port() -> int:
    """A SLURM job id whose derived MASTER_PORT (29500 + id % 1000) is free now."""
    import socket

    for job_id in range(100, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", 29500 + job_id))
            except OSError:
                continue
        return job_id
    raise RuntimeError("no free port in 29600-30499")


def _srun_like(digits: Path, out: Path) -> subprocess.CompletedProcess:
    """Two tasks with only the variables srun sets (SLURM_PROCID, ...), as `srun -n 2 python -m ditmoe.train`."""
    job_id = _job_id_with_free_port()
    slurm = {"SLURM_NTASKS": "2", "SLURM_JOB_ID": str(job_id), "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1"}
    slurm.update(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    args = ["--preset", "digits-smoke", "--data", str(digits), "--out", str(out), "--ep-size", "2", "--steps", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ditmoe.train", *args],
            env={**base, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    return subprocess.CompletedProcess("srun", max(p.returncode for p in procs), "\n".join(outputs), "")


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "srun-environment"])
def test_launchers_run_the_training_module_on_two_ranks(digits, tmp_path, launcher):
    if launcher == "deepspeed":
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "ditmoe.train",
        ]
        proc = _launch(cmd, digits, tmp_path / "run")
    elif launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "ditmoe.train",
        ]
        proc = _launch(cmd, digits, tmp_path / "run")
    else:
        proc = _srun_like(digits, tmp_path / "run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "step_00000002"
    assert {f.name for f in ckpt.glob("*-experts-*")} == {
        f"{k}-experts-{r}of2.pt" for k in ("model", "ema") for r in (0, 1)
    }
    assert ckpt_io.load_config(ckpt)["topology"] == {"world_size": 2, "ep_size": 2, "optimizer": "zero"}
    shutil.rmtree(tmp_path / "run")


def process_group_threads_after_training(rank: int, world: int, data: str, out: str) -> list[str]:
    from ditmoe.parallel.distributed import leave_distributed
    from ditmoe.training.config import train_config
    from ditmoe.training.loop import train

    train(train_config("digits-smoke", data=data, out=out, steps=1, ep_size=2), progress=False)
    leave_distributed()
    names = [(task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()]
    return sorted(n for n in names if "gloo" in n)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux /proc")
def test_no_process_group_thread_outlives_a_finished_run(digits, tmp_path):
    """A group still alive at interpreter exit runs its gloo threads while the process tears down, which now and
    then aborted a rank that had finished (SIGABRT, "terminate called without an active exception"). After the
    run and ``leave_distributed`` none may be left: not the engine's, not DeepSpeed's registries', not the world's."""
    threads = run_local_ranks(process_group_threads_after_training, 2, timeout_s=240, args=(str(digits), str(tmp_path)))
    assert threads == [[], []]


def test_joining_needs_deepspeed_only_where_it_is_installed(monkeypatch):
    """``run_local_ranks`` (plain gloo ranks: tests, ``bench_ep_cpu.py``) also runs where DeepSpeed is absent."""
    import importlib.util

    from ditmoe.parallel.distributed import import_before_joining

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else find_spec(name))
    monkeypatch.setitem(sys.modules, "deepspeed.comm.torch", None)  # importing it would now raise ImportError
    import_before_joining()


def offload_rank(rank: int, world: int, data: str, out: str, steps: int, resume: bool) -> list[float]:
    from ditmoe.training.config import train_config
    from ditmoe.training.loop import train

    config = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_offload_bf16.json"
    cfg = train_config(
        "digits-smoke",
        data=data,
        out=out,
        steps=steps,
        ep_size=2,
        precision="bf16",
        deepspeed_config=str(config),
        log_every=1,
        ckpt_every=2,
        resume=resume,
    )
    return train(cfg, progress=False).losses


def test_zero2_optimizer_offload_bf16_trains_and_resumes_exactly(digits, tmp_path):
    """DeepSpeedCPUAdam (compiled by DeepSpeed on first use) with bf16 weights and EP=2: a run split at step 2
    continues with the losses of an unbroken one."""
    args = (str(digits), str(tmp_path / "full"), 4, False)
    full = run_local_ranks(offload_rank, 2, timeout_s=420, args=args)[0]
    run_local_ranks(offload_rank, 2, timeout_s=240, args=(str(digits), str(tmp_path / "split"), 2, False))
    resumed = run_local_ranks(offload_rank, 2, timeout_s=240, args=(str(digits), str(tmp_path / "split"), 4, True))
    assert resumed[0] == full[2:]


def test_init_from_starts_a_single_process_run_from_expert_parallel_weights(runs, digits, tmp_path):
    from ditmoe.training.config import train_config
    from ditmoe.training.loop import train

    source = ckpt_io.newest_valid(runs[(2, 2)][0] / "checkpoints")
    cfg = train_config(
        "digits-smoke",
        data=str(digits),
        out=str(tmp_path / "new"),
        steps=1,
        lr=1e-12,
        init_from=str(source),
        ckpt_every=1,
        model_opts={"moe": {"balance_loss_type": "sequence"}},
    )
    train(cfg, progress=False)
    ckpt = ckpt_io.newest_valid(tmp_path / "new" / "checkpoints")
    assert ckpt.name == "step_00000001"  # a new run: its own step count, a fresh optimizer
    before, after = load_global_state(source, "model"), load_global_state(ckpt, "model")
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=1e-9, msg=key)  # lr 1e-12: one step moves nothing
