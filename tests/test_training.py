"""Training loop: resume equals an uninterrupted run, atomic checkpoints, clear errors."""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from ditmoe.cli import main
from ditmoe.config import ConfigError
from ditmoe.data.shards import read_manifest
from ditmoe.models.dit import DiTMoE
from ditmoe.parallel.distributed import leave_distributed
from ditmoe.training import checkpoint as ckpt_io
from ditmoe.training.config import model_config_for_data, train_config
from ditmoe.training.ema import EMA
from ditmoe.training.loop import drop_labels, train
from ditmoe.training.run_state import load_global_state
from ditmoe.training.signals import STOP_SIGNALS


def smoke(digits, out, **kw):
    return train_config("digits-smoke", data=str(digits), out=str(out), **kw)


@pytest.mark.parametrize("diffusion", ["ddpm", "rf"])
def test_resume_reproduces_the_uninterrupted_loss_sequence(digits, tmp_path, diffusion):
    full = train(
        smoke(digits, tmp_path / "full", steps=6, log_every=1, ckpt_every=3, diffusion=diffusion), progress=False
    )
    train(smoke(digits, tmp_path / "split", steps=3, log_every=1, ckpt_every=3, diffusion=diffusion), progress=False)
    resumed = train(
        smoke(digits, tmp_path / "split", steps=6, log_every=1, ckpt_every=3, diffusion=diffusion, resume=True),
        progress=False,
    )
    first = [json.loads(line)["loss"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert len(full.losses) == 6 and len(resumed.losses) == 3
    assert first[:3] + resumed.losses == full.losses  # bitwise: same floats
    a = load_global_state(ckpt_io.newest_valid(tmp_path / "full" / "checkpoints"), "model")
    b = load_global_state(ckpt_io.newest_valid(tmp_path / "split" / "checkpoints"), "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoints_without_resume_is_refused(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(smoke(digits, tmp_path / "run", steps=4), progress=False)


def test_resume_with_another_preset_is_refused(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    with pytest.raises(ConfigError, match="DiT-MoE-micro/4-8E2A"):
        train(smoke(digits, tmp_path / "run", steps=4, model="DiT-MoE-micro/4-8E2A", resume=True), progress=False)


@pytest.mark.parametrize("change", [dict(diffusion="rf"), dict(seed=1), dict(batch_size=16), dict(num_workers=2)])
def test_resume_with_another_objective_seed_batch_or_worker_count_is_refused(digits, tmp_path, change, capsys):
    """Another --num-workers deals the shards to other loader workers: it printed 'resumed from' and then died in
    the loader on internal values ('num_workers': (1, 2), 'per_consumer': ...); it is refused up front."""
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    ((key, value),) = change.items()
    saved = {"diffusion": "'ddpm'", "seed": "0", "batch_size": "8", "num_workers": "0"}[key]
    flag = f"--{key.replace('_', '-')} {saved.strip(chr(39))}"
    with pytest.raises(
        ConfigError, match=rf"trained with {key}={saved} \(now {value!r}\).*resume with {flag}\..*--init-from"
    ):
        train(smoke(digits, tmp_path / "run", steps=4, resume=True, **change), progress=False)
    assert "resumed" not in capsys.readouterr().out


def test_resume_with_one_loader_worker_where_there_were_none(digits, tmp_path):
    """0 workers (reading in the main process) and 1 worker read the same data order: the resume goes on."""
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    assert train(smoke(digits, tmp_path / "run", steps=3, resume=True, num_workers=1), progress=False).step == 3


def test_resume_under_another_optimizer_is_refused(digits, tmp_path):
    """A plain torch run resumed under DeepSpeed died in DeepSpeed's loader ("Empty ds_version in checkpoint"), and
    ZeRO resumed with optimizer offload died at its first step: the optimizer is part of the topology."""
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    config = Path(__file__).resolve().parents[1] / "ds_configs" / "zero1_fp32.json"
    try:
        with pytest.raises(ConfigError, match=r"optimizer=torch and this run has .*optimizer=zero: .*--init-from"):
            train(smoke(digits, tmp_path / "run", steps=4, resume=True, deepspeed_config=str(config)), progress=False)
    finally:
        leave_distributed()  # DeepSpeed joined a world of one in this process: later tests train without it


def test_checkpoint_saved_before_the_optimizer_was_recorded_still_resumes(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    ckpt = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["topology"] == {"world_size": 1, "ep_size": 1, "optimizer": "torch"}
    del config["topology"]["optimizer"]
    (ckpt / "config.json").write_text(json.dumps(config))
    marker = json.loads((ckpt / ckpt_io.MARKER).read_text())  # the commit lists each file's checksum
    marker["sha256"]["config.json"] = hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
    (ckpt / ckpt_io.MARKER).write_text(json.dumps(marker))
    assert train(smoke(digits, tmp_path / "run", steps=3, resume=True), progress=False).step == 3


def _logged(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_resumed_run_logs_the_same_records_as_an_uninterrupted_one(digits, tmp_path):
    """A checkpoint ends the log window (log_every 3, ckpt_every 2: windows end at 2, 3, 4, 6), and records logged
    after the checkpoint a run resumes from (by a process that crashed before its next save) are dropped, a line
    cut short by the crash too: metrics.jsonl holds each step once, in order, with the uninterrupted run's
    values."""
    kw = dict(log_every=3, ckpt_every=2)
    train(smoke(digits, tmp_path / "full", steps=6, **kw), progress=False)
    train(smoke(digits, tmp_path / "split", steps=6, **kw), progress=False)
    root = tmp_path / "split" / "checkpoints"
    shutil.rmtree(ckpt_io.step_dir(root, 6))  # the crash: steps 5 and 6 logged, step 6 never saved
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')
    train(smoke(digits, tmp_path / "split", steps=6, resume=True, **kw), progress=False)
    assert [s for s, _ in _logged(tmp_path / "full")] == [2, 3, 4, 6]
    assert _logged(tmp_path / "split") == _logged(tmp_path / "full")


def test_damaged_newest_checkpoint_falls_back_to_the_previous(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=4, ckpt_every=2), progress=False)
    root = tmp_path / "run" / "checkpoints"
    newest = ckpt_io.step_dir(root, 4)
    with open(newest / "model-experts-0of1.pt", "r+b") as f:  # flip bytes in the middle of the file
        f.seek(200)
        f.write(b"\x00\xff\x00\xff")
    (root / "latest").write_text("garbage")
    warnings = []
    assert ckpt_io.newest_valid(root, warn=warnings.append) == ckpt_io.step_dir(root, 2)
    assert "model-experts-0of1.pt" in warnings[0]
    resumed = train(smoke(digits, tmp_path / "run", steps=5, ckpt_every=2, resume=True), progress=False)
    assert resumed.step == 5 and len(resumed.losses) == 3  # steps 3, 4, 5


def test_interrupted_save_is_never_loaded(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    root = tmp_path / "run" / "checkpoints"
    # A save killed before its commit leaves a temporary dir or an uncommitted step dir.
    shutil.copytree(ckpt_io.step_dir(root, 2), root / ".tmp-step_00000004-123")
    partial = ckpt_io.step_dir(root, 4)
    shutil.copytree(ckpt_io.step_dir(root, 2), partial)
    (partial / ckpt_io.MARKER).unlink()
    assert ckpt_io.newest_valid(root) == ckpt_io.step_dir(root, 2)


def test_checkpoints_exist_but_none_intact_is_an_error(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=2, ckpt_every=2), progress=False)
    root = tmp_path / "run" / "checkpoints"
    (ckpt_io.step_dir(root, 2) / "ema-dense.pt").write_bytes(b"truncated")
    with pytest.raises(ckpt_io.CheckpointError, match="none is complete"):
        train(smoke(digits, tmp_path / "run", steps=4, resume=True), progress=False)


def test_keep_last(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=8, ckpt_every=2, keep_last=2), progress=False)
    names = [d.name for d in ckpt_io.committed_steps(tmp_path / "run" / "checkpoints")]
    assert names == ["step_00000006", "step_00000008"]


def test_keep_last_never_prunes_the_checkpoint_just_saved(tmp_path):
    """A newer, damaged checkpoint (the run resumed from an older one) counted towards keep_last: keep_last=1 pruned
    the save just made and the older intact one, leaving only the damaged one."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        ckpt_io.save_checkpoint(root, step, {"trainer-rank0": {"step": step}}, {}, keep_last=2)
    (ckpt_io.step_dir(root, 4) / "trainer-rank0.pt").write_bytes(b"damaged")
    assert ckpt_io.newest_valid(root, warn=lambda _: None) == ckpt_io.step_dir(root, 2)
    ckpt_io.save_checkpoint(root, 3, {"trainer-rank0": {"step": 3}}, {}, keep_last=1)  # e.g. on a stop signal
    assert ckpt_io.newest_valid(root, warn=lambda _: None) == ckpt_io.step_dir(root, 3)


def test_a_copy_of_a_checkpoint_beside_the_steps_is_not_one_of_them(tmp_path):
    """A backup ``step_00000002.bak`` (marker and all) made every later save fail after its commit, and a resume
    stop with a ValueError: its name was read as a step number."""
    root = tmp_path / "checkpoints"
    ckpt_io.save_checkpoint(root, 2, {"trainer-rank0": {"step": 2}}, {}, keep_last=1)
    shutil.copytree(ckpt_io.step_dir(root, 2), root / "step_00000002.bak")
    ckpt_io.save_checkpoint(root, 4, {"trainer-rank0": {"step": 4}}, {}, keep_last=1)
    assert ckpt_io.committed_steps(root) == [ckpt_io.step_dir(root, 4)]
    assert ckpt_io.newest_valid(root) == ckpt_io.step_dir(root, 4)
    assert (root / "step_00000002.bak" / ckpt_io.MARKER).is_file()  # the user's copy is left alone


def test_metrics_carry_per_layer_utilisation(digits, tmp_path):
    train(smoke(digits, tmp_path / "run", steps=2, log_every=2), progress=False)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    shares = [record[f"moe/layer0/expert{e}"] for e in range(4)]
    assert sum(shares) == pytest.approx(1.0) and record["moe/max_imbalance"] >= 1.0
    logged = ("loss", "diffusion_loss", "balance_loss", "perf/images_per_s", "mem/peak_rss_gib", "moe/router_entropy")
    for key in logged:
        assert key in record
    assert "z_loss" not in record  # the router z-loss is off by default


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _spy_routing(monkeypatch) -> list:
    """The RoutingStats of every MoE layer forward, in call order."""
    from ditmoe.models.moe import MoEFeedForward

    stats, forward = [], MoEFeedForward.forward

    def spy(self, x_BLD):
        out = forward(self, x_BLD)
        stats.append(out.stats)
        return out

    monkeypatch.setattr(MoEFeedForward, "forward", spy)
    return stats


def test_logged_routing_and_rates_match_a_hand_count(digits, tmp_path, monkeypatch):
    """Every micro-batch of a window counts, and only its own window's (grad_accum 2, capacity drops). On a fake
    clock the first step takes 5 s, which the rates leave out, and every other 1 s: images/s is the global batch."""
    from ditmoe.training import loop
    from ditmoe.training.stepper import TorchStepper
    from ditmoe.training.telemetry import Throughput

    stats = _spy_routing(monkeypatch)
    now, optimizer_step = [0.0], TorchStepper.step  # seconds on the fake clock

    def timed_step(self):
        now[0] += 1.0 if now[0] else 5.0  # the first step compiles
        return optimizer_step(self)

    monkeypatch.setattr(TorchStepper, "step", timed_step)
    monkeypatch.setattr(loop, "Throughput", lambda: Throughput(clock=lambda: now[0]))
    opts = {"moe": {"capacity_factor": 1.0}}
    train(smoke(digits, tmp_path / "run", steps=4, grad_accum=2, log_every=2, model_opts=opts), progress=False)
    records = _records(tmp_path / "run")
    per_window = len(stats) // len(records)
    layers = sum(key.endswith("/entropy") for key in records[0])
    for i, record in enumerate(records):
        window = stats[i * per_window : (i + 1) * per_window]
        for layer in range(layers):
            kept_E = sum(s.tokens_per_expert_E for s in window[layer::layers]).double()
            shares = [record[f"moe/layer{layer}/expert{e}"] for e in range(kept_E.numel())]
            assert shares == pytest.approx((kept_E / kept_E.sum()).tolist())
            entropy = sum(s.router_entropy.item() for s in window[layer::layers]) / (per_window // layers)
            assert record[f"moe/layer{layer}/entropy"] == pytest.approx(entropy)
        assert record["moe/dropped_tokens"] == sum(s.dropped.item() for s in window) > 0
        assert record["perf/images_per_s"] == pytest.approx(8.0)  # batch_size 8 per 1 s step


def test_balance_and_z_loss_are_logged_apart(digits, tmp_path, monkeypatch):
    """Each is the layers' own loss summed over the layers, averaged over the window's steps (2 steps of 2
    micro-batches here): the z-loss does not count as balance loss."""
    stats = _spy_routing(monkeypatch)
    opts = {"moe": {"router_z_loss": 0.01}}
    train(smoke(digits, tmp_path / "run", steps=4, grad_accum=2, log_every=2, model_opts=opts), progress=False)
    records = _records(tmp_path / "run")
    per_window = len(stats) // len(records)
    for i, record in enumerate(records):
        window = stats[i * per_window : (i + 1) * per_window]
        assert record["balance_loss"] == pytest.approx(sum(s.balance_loss.item() for s in window) / 4)
        assert record["z_loss"] == pytest.approx(sum(s.z_loss.item() for s in window) / 4)
        assert record["z_loss"] > 0.1 * record["balance_loss"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "DiT-MoE-Q/2-4E2A"], "'Q'"),
        (["--data", "/nonexistent/digits"], "/nonexistent/digits"),
        (["--steps", "0"], "steps must be >= 1, got 0"),
        (["--model-opt", "moe.top_k=9"], "top_k=9"),
        (["--model-opt", "moe=5"], "moe must be a mapping of MoEConfig fields to values, got 5"),
        (["--model-opt", "moe.num_experts=abc"], "num_experts must be an int, got 'abc'"),
        (["--model-opt", "qk_norm=yes"], "qk_norm must be a bool, got 'yes'"),
        (["--ep-size", "2"], "ep_size=2 needs several ranks or DeepSpeed"),
        (["--precision", "fp16"], "precision='fp16' needs several ranks or DeepSpeed"),
        (["--resume", "--init-from", "x"], "pick one"),
        (["--batch-size", "8", "--grad-accum", "3"], "batch_size=8 does not split over 1 ranks x grad_accum=3"),
        (["--kernel-tiles", "/nonexistent/tiles.json"], "kernel_tiles '/nonexistent/tiles.json'"),
        (["--kernel-tiles", '{"gmm": {"BX": 1}}'], "gmm has no setting 'BX'"),
        (["--keep-last", "-1"], "keep_last must be >= 0, got -1"),
        (["--model-opt", "num_classes=3"], "model option(s) num_classes come from the dataset"),
        (["--model-opt", "in_channels=3"], "in_channels come from the dataset"),
        (["--num-workers", "-1"], "num_workers must be >= 0, got -1"),
    ],
)
def test_train_cli_bad_input_is_one_clear_line(digits, tmp_path, capsys, argv, needle):
    base = ["train", "--preset", "digits-smoke", "--data", str(digits), "--out", str(tmp_path / "r")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0


def test_train_cli_out_that_is_a_file_is_one_clear_line(digits, tmp_path, capsys):
    (tmp_path / "afile").write_text("notes")
    argv = ["train", "--preset", "digits-smoke", "--data", str(digits), "--out", str(tmp_path / "afile")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"out {tmp_path / 'afile'} is a file" in err and err.count("\n") == 0
    assert (tmp_path / "afile").read_text() == "notes"


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda text: text.replace('"channels": 1,', ""), "manifest.json lacks 'channels'"),
        (lambda text: text.replace('"image_size": 16,', ""), "lacks 'image_size'"),
        (lambda text: text.replace('"channels"', "channels"), "manifest.json is not valid JSON"),
    ],
)
def test_train_cli_bad_manifest_is_one_clear_line(digits, tmp_path, capsys, edit, needle):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(edit((digits / "manifest.json").read_text()))
    assert main(["train", "--preset", "digits-smoke", "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(data) in err and err.count("\n") == 0
    assert not (tmp_path / "r").exists()


def test_a_stop_signal_saves_and_stops_a_single_process_run(digits, tmp_path, monkeypatch):
    """SIGUSR1 during step 3's forward: the run saves step 3, leaves the requeue marker and stops (the single-process
    path decides on the host, without the collective the distributed one needs)."""
    from ditmoe.training import loop

    real_model = loop.DiTMoE

    def build(*args, **kwargs):
        model, calls = real_model(*args, **kwargs), itertools.count(1)
        forward = model.forward

        def signalling_forward(*a, **kw):
            if next(calls) == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            return forward(*a, **kw)

        model.forward = signalling_forward
        return model

    monkeypatch.setattr(loop, "DiTMoE", build)
    out = tmp_path / "run"
    result = train(smoke(digits, out, steps=6, ckpt_every=100, log_every=100), progress=False)
    assert result.stopped_by_signal and result.step == 3
    assert ckpt_io.newest_valid(out / "checkpoints").name == ckpt_io.step_dir(Path(), 3).name
    assert (out / "REQUEUE").read_text().strip() == "3"
    assert [s for s, _ in _logged(out)] == [3]  # the steps since the last log are logged before the save


def test_a_stop_signal_during_start_up_is_honoured_at_the_first_step(digits, tmp_path, monkeypatch):
    """SIGUSR1 while the model is built (start-up takes minutes for G: DeepSpeed, checkpoint loading) is a stop
    request too: the run saves step 1 and stops. Without handlers yet, the signal's default action killed every
    task (exit 138), and the job script did not requeue."""
    from ditmoe.training import loop

    real_model = loop.DiTMoE

    def signalling_build(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real_model(*args, **kwargs)

    monkeypatch.setattr(loop, "DiTMoE", signalling_build)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # the signal must not end pytest
    try:
        result = train(smoke(digits, tmp_path / "run", steps=6, ckpt_every=100, log_every=100), progress=False)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert result.stopped_by_signal and result.step == 1
    assert (tmp_path / "run" / "REQUEUE").read_text().strip() == "1"


def _nan_predictions_at(monkeypatch, calls: set[int]) -> None:
    """The models ``train`` builds predict NaN at their forward calls numbered in ``calls`` (1-based)."""
    from ditmoe.training import loop

    real_model = loop.DiTMoE

    def build(*args, **kwargs):
        model, count = real_model(*args, **kwargs), itertools.count(1)
        forward = model.forward

        def nan_forward(*a, **kw):
            out = forward(*a, **kw)
            return dataclasses.replace(out, prediction=out.prediction * math.nan) if next(count) in calls else out

        model.forward = nan_forward
        return model

    monkeypatch.setattr(loop, "DiTMoE", build)


def test_a_resumed_run_counts_on_from_the_saved_skipped_steps(digits, tmp_path, monkeypatch):
    """Step 2's prediction is NaN, so it is skipped; the run resumed from step 2 reports and logs that skip too."""
    with monkeypatch.context() as patch:
        _nan_predictions_at(patch, {2})
        first = train(smoke(digits, tmp_path / "run", steps=2, log_every=1), progress=False)
    resumed = train(smoke(digits, tmp_path / "run", steps=3, log_every=1, resume=True), progress=False)
    assert first.skipped_steps == resumed.skipped_steps == 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1]


def test_only_consecutive_non_finite_steps_abort(digits, tmp_path, monkeypatch):
    """max_skipped_steps=2 with steps 1 and 3 skipped: an applied step between them starts the count again."""
    _nan_predictions_at(monkeypatch, {1, 3})
    result = train(smoke(digits, tmp_path / "run", steps=4, max_skipped_steps=2), progress=False)
    assert result.step == 4 and result.skipped_steps == 2


def test_a_run_makes_its_loader_workers_ignore_stop_signals(digits, tmp_path, monkeypatch):
    """Forked workers inherit the run's flag-only handlers, so the CLI's signal test passes without this; spawned or
    forkserver workers (Python 3.14's default) start with the default action and die of the signal."""
    from ditmoe.training import loop

    given, real_make_loader = [], loop.make_loader

    def make_loader(*args, **kwargs):
        given.append(kwargs.get("worker_init_fn"))
        return real_make_loader(*args, **kwargs)

    monkeypatch.setattr(loop, "make_loader", make_loader)
    train(smoke(digits, tmp_path / "run", steps=1), progress=False)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        given[0](0)  # as a worker runs it
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_kernel_tiles_are_in_force_for_every_step_and_only_during_the_run(digits, tmp_path, monkeypatch):
    """``kernel_tiles``: every training step (forward and backward: the kernels' autograd Functions carry the
    forward's tiles into backward) runs under the file's overrides, and they are gone once ``train`` returns."""
    from ditmoe.training import loop
    from ditmoe_kernels import tiles

    seen = []

    def recording_step(*args, **kwargs):
        seen.append(tiles.overrides())
        return real_step(*args, **kwargs)

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", recording_step)
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps({"table": "bf16-sm90", "swiglu": {"BN": 16}, "rows": {"BT": 8}}))
    train(smoke(digits, tmp_path / "run", steps=3, kernel_tiles=str(path)), progress=False)
    assert seen == [{"bf16-sm90": {"swiglu": {"BN": 16}, "rows": {"BT": 8}}}] * 3
    assert tiles.overrides() == {}


def test_ema_warmup_and_update():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, 0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.999
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)
    torch.testing.assert_close(ema.shadow["weight"], before + 0.9)
    assert EMA(model, 0.999).decay_at(0) == 0.999


def test_ema_update_is_the_formula_for_every_entry():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    ema = EMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update(model, step=5)
    assert set(ema.shadow) == {k for k, v in model.state_dict().items() if v.is_floating_point()}
    for k, v in model.state_dict().items():
        assert ema.shadow[k].dtype == torch.float32
        torch.testing.assert_close(ema.shadow[k], 0.9 * before[k] + 0.1 * v.float(), rtol=1e-6, atol=1e-6)


def test_bf16_autocast_training_runs_in_bf16_on_fp32_master_weights(digits, tmp_path):
    """The same steps as in fp32 (same data, noise, init) in bf16 autocast: losses differ by bf16 rounding alone
    (so autocast was in force, and nothing else changed), the weights stay fp32."""
    bf16 = train(smoke(digits, tmp_path / "bf16", steps=3, precision="bf16", log_every=1), progress=False)
    fp32 = train(smoke(digits, tmp_path / "fp32", steps=3, log_every=1), progress=False)
    assert len(bf16.losses) == 3 and all(math.isfinite(v) for v in bf16.losses)
    assert bf16.losses != fp32.losses and bf16.losses == pytest.approx(fp32.losses, rel=0.05)
    state = load_global_state(ckpt_io.newest_valid(tmp_path / "bf16" / "checkpoints"), "model")
    assert state["blocks.0.moe.experts.gate_up_proj"].dtype == torch.float32


def test_checkpoint_with_separate_gate_and_up_experts_loads(digits, tmp_path):
    """Checkpoints written before routed experts kept their gate and up weights in one tensor hold ``gate_proj`` and
    ``up_proj`` rows; their model and EMA weights still load (sampling, export, ``--init-from``)."""
    train(smoke(digits, tmp_path / "run", steps=2), progress=False)
    ckpt = ckpt_io.newest_valid(tmp_path / "run" / "checkpoints")
    want = {kind: load_global_state(ckpt, kind) for kind in ("model", "ema")}
    for f in ckpt.glob("*-experts-*.pt"):  # rewrite the expert files in the earlier layout
        rows = torch.load(f)
        for key in [k for k in rows if k.endswith(".gate_up_proj")]:
            base = key.removesuffix("gate_up_proj")
            halves = {gid: w.chunk(2) for gid, w in rows.pop(key).items()}
            rows[f"{base}gate_proj"] = {gid: g.clone() for gid, (g, _) in halves.items()}
            rows[f"{base}up_proj"] = {gid: u.clone() for gid, (_, u) in halves.items()}
        assert "blocks.0.moe.experts.gate_proj" in rows
        torch.save(rows, f)
    for kind in ("model", "ema"):
        got = load_global_state(ckpt, kind)
        assert got.keys() == want[kind].keys()
        assert all(torch.equal(got[k], want[kind][k]) for k in got), kind
    # its optimizer state had one more tensor per MoE layer: resuming says how to go on
    opt = torch.load(ckpt / "optimizer-rank0.pt")
    opt["param_groups"][0]["params"].append(max(opt["param_groups"][0]["params"]) + 1)
    torch.save(opt, ckpt / "optimizer-rank0.pt")
    marker = json.loads((ckpt / ckpt_io.MARKER).read_text())  # committed as written
    marker["sha256"] = {name: hashlib.sha256((ckpt / name).read_bytes()).hexdigest() for name in marker["sha256"]}
    (ckpt / ckpt_io.MARKER).write_text(json.dumps(marker))
    with pytest.raises(ConfigError, match=f"--init-from {ckpt}"):
        train(smoke(digits, tmp_path / "run", steps=3, resume=True), progress=False)


def _spy_wandb(monkeypatch) -> list[tuple[str, int, dict]]:
    """(run id, step, data) of every wandb ``run.log`` call, in an offline run."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logged, real_log = [], wandb.sdk.wandb_run.Run.log

    def spy(run, data, *args, **kwargs):
        logged.append((run.id, kwargs.get("step"), dict(data)))
        return real_log(run, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    return logged


def test_wandb_offline_run_logs_utilisation_heatmap(digits, tmp_path, monkeypatch):
    """What reaches wandb's run.log at each log step: the scalars, the per-layer expert shares and the heatmap image,
    which the offline run then holds as a media file."""
    import wandb

    logged = _spy_wandb(monkeypatch)
    train(smoke(digits, tmp_path / "run", steps=4, log_every=2, ckpt_every=4, wandb=True), progress=False)
    assert [step for _, step, _ in logged] == [2, 4]
    for _, _, data in logged:
        assert {"loss", "grad_norm", "moe/max_imbalance", "moe/layer0/expert0"} <= data.keys()
        assert isinstance(data["moe/utilisation_heatmap"], wandb.Image)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert len(list(runs[0].glob("files/media/images/moe/utilisation_heatmap_*.png"))) == 2
    assert (tmp_path / "run" / "utilisation_latest.png").is_file()


def test_resumed_run_logs_on_to_the_same_wandb_run(digits, tmp_path, monkeypatch):
    """Reliability 15: a resumed run logs to the wandb run it started, at the steps after its checkpoint's, even
    after a stretch resumed without --wandb."""
    logged = _spy_wandb(monkeypatch)
    kw = dict(log_every=1, ckpt_every=2)
    train(smoke(digits, tmp_path / "run", steps=2, wandb=True, **kw), progress=False)
    train(smoke(digits, tmp_path / "run", steps=4, resume=True, **kw), progress=False)
    train(smoke(digits, tmp_path / "run", steps=6, resume=True, wandb=True, **kw), progress=False)
    assert len({run_id for run_id, _, _ in logged}) == 1
    assert [step for _, step, _ in logged] == [1, 2, 5, 6]


def test_steps_logged_before_a_crash_are_not_logged_to_wandb_again(digits, tmp_path, monkeypatch):
    """Reliability 15: a crash after step 4's log, with the last checkpoint at step 2. The resumed run logs steps 3
    and 4 again to metrics.jsonl (which drops the old ones), but wandb's run already holds them: its steps go on
    rising."""
    logged = _spy_wandb(monkeypatch)
    run = tmp_path / "run"
    train(smoke(digits, run, steps=4, wandb=True, log_every=1, ckpt_every=2), progress=False)
    shutil.rmtree(ckpt_io.step_dir(run / "checkpoints", 4))  # the crash: step 4 was logged, never saved
    train(smoke(digits, run, steps=5, resume=True, wandb=True, log_every=1, ckpt_every=2), progress=False)
    assert len({run_id for run_id, _, _ in logged}) == 1
    assert [step for _, step, _ in logged] == [1, 2, 3, 4, 5]
    assert [record["step"] for record in _records(run)] == [1, 2, 3, 4, 5]


def test_label_dropout_replaces_a_p_share_of_labels_by_the_null_class():
    y = torch.arange(20_000) % 7
    dropped = drop_labels(y, 0.1, 7, torch.Generator().manual_seed(0)) != y
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert (drop_labels(y, 0.1, 7, torch.Generator().manual_seed(0))[dropped] == 7).all()


def test_warmup_learning_rate_and_ema_of_the_first_steps(digits, tmp_path):
    """lr ramps as lr * (step + 1) / warmup_steps; after step 1 the EMA is d * init + (1 - d) * weights."""
    cfg = smoke(digits, tmp_path / "run", steps=2, warmup_steps=4, log_every=1, ckpt_every=1, keep_last=0)
    train(cfg, progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([cfg.lr / 4, cfg.lr / 2])
    ckpt = ckpt_io.step_dir(tmp_path / "run" / "checkpoints", 1)
    torch.manual_seed(cfg.seed)
    init = DiTMoE(model_config_for_data(cfg, read_manifest(cfg.data))).state_dict()
    weights, ema = load_global_state(ckpt, "model"), load_global_state(ckpt, "ema")
    for k, v in ema.items():
        torch.testing.assert_close(v, cfg.ema_decay * init[k] + (1 - cfg.ema_decay) * weights[k], msg=k)
    assert any(not torch.equal(weights[k], init[k]) for k in init)
