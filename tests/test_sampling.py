"""Sampling from checkpoints: the CLI, EMA weights, guidance wiring, and the demo pipeline end to end."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditmoe import demo
from ditmoe.cli import main
from ditmoe.config import ConfigError, model_config
from ditmoe.data.digits import prepare_digits
from ditmoe.data.shards import load_split_tensors
from ditmoe.data.vae import load_vae
from ditmoe.demo import run_demo
from ditmoe.diffusion import create_diffusion
from ditmoe.evaluation.digits_judge import classifier_fid, judge_samples, load_judge
from ditmoe.models.dit import DiTMoE
from ditmoe.parallel.launch import free_port, run_local_ranks
from ditmoe.sampling import npz
from ditmoe.sampling import sample as sample_module
from ditmoe.sampling.npz import batch_seed, write_npz
from ditmoe.sampling.sample import Sampler, generate, latent_decoder, load_sampler
from ditmoe.training.checkpoint import CheckpointError
from ditmoe.training.config import train_config
from ditmoe.training.export import META_KEY, export_safetensors, load_exported
from ditmoe.training.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    prepare_digits(root / "data", image_size=16, shard_size=400)
    train(train_config("digits-smoke", data=str(root / "data"), out=str(root / "run"), steps=2), progress=False)
    return root / "run"


def test_sample_cli_writes_one_row_per_class(run, tmp_path, capsys, monkeypatch):
    asked, real_generate = [], sample_module.generate

    def spy(sampler, labels, **kwargs):
        asked.append(list(labels))
        return real_generate(sampler, labels, **kwargs)

    monkeypatch.setattr(sample_module, "generate", spy)
    out = tmp_path / "grid.png"
    argv = [
        "sample",
        "--ckpt",
        str(run),
        "--classes",
        "0,3,7",
        "--per-class",
        "2",
        "--steps",
        "ddim5",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    w, h = Image.open(out).size
    assert (w, h) == (2 * 17 + 1, 3 * 17 + 1)  # 16 px tiles with 1 px padding
    assert "3 classes x 2 samples" in capsys.readouterr().out
    assert asked == [[0, 0, 3, 3, 7, 7]]  # row by row: a class per row (a 2-step model's rows look alike)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--classes", "0,12"], "[12]"),
        (["--classes", "10"], "[10]"),  # the null class of a 10-class model is not a class to sample
        (["--cfg-scale", "nan"], "guidance scale must be a finite number, got nan"),
        (["--guide-channels", "two"], "--guide-channels must be 'official', 'all' or a channel count >= 1, got 'two'"),
        (["--guide-channels", "0"], "got '0'"),
        (["--steps", "ddim0"], "ddim0"),
        (["--per-class", "0"], "--per-class must be at least 1, got 0"),
        (["--upscale", "0"], "--upscale must be at least 1, got 0"),
        (["--classes", "1,,2"], "--classes must be comma-separated class ids, got '1,,2'"),
        (["--kernel-tiles", '{"rows": {"BQ": 1}}'], "rows has no setting 'BQ'"),
        (["--num-samples", "5"], "samples for FID are written as .npz (ADM's layout), not .png"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--vae", "/models/sd-vae"], "generates images, not VAE latents: it needs no --vae"),
        (["--model", "DiT-MoE-S/2-8E2A"], "--model is for official .pt checkpoints;"),
        (["--model", "DiT-MoE-S/2-8E2A", "--diffusion", "rf"], "--model and --diffusion are for official .pt"),
    ],
)
def test_sample_cli_bad_input_is_one_clear_line(run, tmp_path, capsys, argv, needle):
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "g.png"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0


def test_sample_cli_refuses_an_image_format_before_sampling(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample_module, "generate", lambda *a, **kw: pytest.fail("sampled before checking --out"))
    assert main(["sample", "--ckpt", str(run), "--out", str(tmp_path / "grid.jpgx")]) == 2
    assert "'.jpgx' is not an image format PIL writes" in capsys.readouterr().err
    assert not (tmp_path / "grid.jpgx").exists()


def _random_sampler(kind: str, **model_opts) -> Sampler:
    """A 4-channel (latent-like) micro model with random weights, so that every output channel depends on x."""
    torch.manual_seed(0)
    cfg = model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, in_channels=4, num_classes=5, **model_opts)
    model = DiTMoE(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return Sampler(model, create_diffusion(kind, learn_sigma=cfg.learn_sigma), Path("random"), {}, "ema")


def test_guidance_acts_on_the_channels_the_official_sampler_guides_by_default():
    """The official DiT-MoE sampler guides eps[:, :3] of a 4-channel DDPM model (DiT's forward_with_cfg) and every
    velocity channel of a rectified-flow one: generate's default does the same; "all" and N choose otherwise."""
    for kind, official in (("ddpm", 3), ("rf", "all")):
        s = _random_sampler(kind)
        steps = 2 if kind == "rf" else "ddim2"
        samples = {
            g: generate(s, [0, 3], cfg_scale=4.0, steps=steps, guide_channels=g, progress=False)
            for g in ("official", "all", 3)
        }
        other = "all" if official == 3 else 3
        assert torch.equal(samples["official"], samples[official])
        assert not torch.equal(samples["official"], samples[other])
    with pytest.raises(ValueError, match="guide_channels must be 'official', 'all' or a channel count, got 'some'"):
        generate(s, [0], guide_channels="some", progress=False)


def test_guidance_against_a_null_class_never_trained_is_refused():
    s = _random_sampler("rf", class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="cfg_scale 4.0 guides against the null class.*class_dropout_prob 0"):
        generate(s, [0, 1], cfg_scale=4.0, steps=2, progress=False)
    assert generate(s, [0, 1], cfg_scale=1.0, steps=2, progress=False).shape == (2, 4, 8, 8)


def test_non_finite_samples_are_an_error_not_a_black_grid():
    s = _random_sampler("rf")
    with torch.no_grad():
        s.model.final_layer.linear.bias[0] = float("nan")  # diverged weights: NaN velocity in every sample
    with pytest.raises(ValueError, match="2 of 2 samples hold NaN or infinite values"):
        generate(s, [0, 1], steps=2, progress=False)


def test_sample_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_generate_refuses_no_labels(run):
    with pytest.raises(ValueError, match="no class labels given"):
        generate(load_sampler(run), [], steps="ddim2", progress=False)


def test_exported_file_is_readable_as_the_umask_allows(run, tmp_path):
    """safetensors makes its files 0600; an export, meant to be handed to sampling jobs, gets a new file's mode."""
    exported = export_safetensors(run, tmp_path / "ema.safetensors")
    probe = tmp_path / "probe"
    probe.touch()
    assert stat.S_IMODE(exported.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode)


def test_exported_file_loads_the_weights_it_holds_and_nothing_less(run, tmp_path):
    """An export holds one kind of weights: asking for the other is an error, not a silent swap; a file missing
    entries (truncated, or edited) is refused, not loaded into a partly random model."""
    ema_file = export_safetensors(run, tmp_path / "ema.safetensors", ema=True)
    raw_file = export_safetensors(run, tmp_path / "raw.safetensors", ema=False)
    raw = load_sampler(run, ema=False).model.state_dict()
    assert all(torch.equal(v, raw[k]) for k, v in load_sampler(raw_file, ema=False).model.state_dict().items())
    with pytest.raises(ConfigError, match="holds the EMA weights alone, not the raw ones"):
        load_sampler(ema_file, ema=False)
    with pytest.raises(ConfigError, match="holds the raw weights alone, not the EMA ones"):
        load_sampler(raw_file, ema=True)
    weights, meta = load_exported(ema_file)
    cut = {k: v for k, v in weights.items() if not k.startswith("blocks.0.")}
    save_file(cut, str(tmp_path / "cut.safetensors"), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"ema weights in .*cut.safetensors lack \d+ entries, e.g. \['blocks.0"):
        load_sampler(tmp_path / "cut.safetensors")
    extra = {**weights, "blocks.99.mlp.weight": weights["final_layer.linear.weight"].clone()}
    save_file(extra, str(tmp_path / "extra.safetensors"), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(ConfigError, match=r"hold 1 entries this model lacks, e.g. \['blocks.99.mlp.weight'\]"):
        load_sampler(tmp_path / "extra.safetensors")


def test_ema_and_raw_weights_differ_and_sampling_is_seeded(run):
    ema, raw = load_sampler(run), load_sampler(run, ema=False)
    a = generate(ema, [1, 2], steps="ddim4", seed=3, progress=False)
    b = generate(ema, [1, 2], steps="ddim4", seed=3, progress=False)
    c = generate(raw, [1, 2], steps="ddim4", seed=3, progress=False)
    d = generate(ema, [1, 2], steps="ddim4", seed=4, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_demo_pipeline_end_to_end(tmp_path, monkeypatch):
    report = run_demo(tmp_path / "demo", steps=2, per_class=3)
    saved = json.loads((tmp_path / "demo" / "demo_report.json").read_text())
    assert saved == report and report["samples"] == 30
    assert 0.0 <= report["sample_class_accuracy"] <= 1.0 and report["judge_heldout_accuracy"] > 0.9
    pngs = ("samples.png", "expert_utilisation.png", "experts_by_class.png", "experts_by_noise_level.png")
    for name in (*pngs, "judge.pt"):
        assert (tmp_path / "demo" / name).is_file()
    assert report["train_steps"] == 2
    # Again with known samples in place of the model's (held-out digits of each label, the first in class 3
    # swapped for a 5): the report's numbers are the judge's on them. The run is past step 1: no training (so the
    # 2-rank checkpoint does not meet the 1-rank topology check), and the report says where it is.
    x_val, y_val = load_split_tensors(tmp_path / "demo" / "data", "val")
    fake = torch.stack([x_val[y_val == (5 if (c, i) == (3, 0) else c)][i] for c in range(10) for i in range(2)])
    monkeypatch.setattr(demo, "generate", lambda sampler, labels, **kw: fake.clone())
    kept = [tmp_path / "demo" / "judge.pt", tmp_path / "demo" / "data" / "manifest.json"]
    written = [path.stat().st_mtime_ns for path in kept]
    again = run_demo(tmp_path / "demo", steps=1, per_class=2, ranks=1)
    assert again["train_steps"] == 2
    assert [path.stat().st_mtime_ns for path in kept] == written  # the data and the judge reused, not made again
    judge, labels = load_judge(tmp_path / "demo" / "judge.pt"), torch.arange(10).repeat_interleave(2)
    assert again["sample_class_accuracy"] == judge_samples(judge, fake, labels) < 1.0
    assert again["sample_fid_judge_features"] == classifier_fid(judge, fake, x_val)


def test_sample_cli_writes_num_samples_to_an_npz_as_adm_reads_it(run, tmp_path, capsys):
    """--num-samples N with an .npz --out: arr_0 uint8 [N, H, W, C], arr_1 the labels, the classes taking turns;
    batch b of --batch-size drawn from its own seed."""
    out = tmp_path / "fid" / "samples.npz"
    argv = ["sample", "--ckpt", str(run), "--num-samples", "7", "--batch-size", "3", "--steps", "ddim2"]
    assert main([*argv, "--classes", "2,5", "--out", str(out)]) == 0
    assert f"wrote 7 samples of 2 classes from {run}" in capsys.readouterr().out
    with np.load(out) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (7, 16, 16, 3)  # grey digits as RGB, as evaluators read
    assert labels.tolist() == [2, 5, 2, 5, 2, 5, 2]
    sampler = load_sampler(run)
    second = generate(sampler, [5, 2, 5], steps="ddim2", seed=batch_seed(0, 1), progress=False)  # samples 3-5
    np.testing.assert_array_equal(images[3:6], sample_module.to_uint8(second).repeat(3, axis=-1))
    assert not np.array_equal(images[0], images[2])  # same class, other noise
    assert list(out.parent.iterdir()) == [out]  # no part or temporary file left


def _npz_rank(rank: int, world: int, run: Path, out: Path) -> None:
    write_npz(load_sampler(run), list(range(10)) * 2, out, batch_size=3, seed=4, steps="ddim2", progress=False)


def test_ranks_share_the_batches_and_write_the_file_one_process_would(run, tmp_path):
    """2 ranks draw batches 0, 2, ... and 1, 3, ...; rank 0 joins the parts in sample order: the same bytes as one
    process."""
    run_local_ranks(_npz_rank, 2, timeout_s=120, args=(run, tmp_path / "two.npz"))
    _npz_rank(0, 1, run, tmp_path / "one.npz")
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
        np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
        assert one["arr_0"].shape[0] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npz", "two.npz"]


def test_a_latent_model_needs_the_vae_its_data_was_encoded_with(tmp_path):
    s = _random_sampler("rf")
    s.data = {"format": "latent", "vae": str(tmp_path / "sd-vae-ft-ema")}
    with pytest.raises(ConfigError, match=r"pass --vae DIR.*encoded with .*sd-vae-ft-ema, not found here"):
        latent_decoder(s)
    with pytest.raises(ConfigError, match="pass --vae DIR"):
        latent_decoder(s, tmp_path)  # no config.json there
    assert latent_decoder(_random_sampler("rf")) is None  # pixels: nothing to decode


def test_sample_cli_under_a_launcher_joins_its_ranks_parts(run, tmp_path):
    """As torchrun starts it: 2 processes with RANK, WORLD_SIZE and a master address; each draws its batches, rank 0
    writes the file one process writes."""
    port = free_port()
    argv = [sys.executable, "-m", "ditmoe.cli", "sample", "--ckpt", str(run), "--num-samples", "9"]
    argv += ["--batch-size", "2", "--steps", "ddim2", "--out"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out = subprocess.PIPE
        procs.append(subprocess.Popen([*argv, str(tmp_path / "two.npz")], env=env, stdout=out, stderr=out, text=True))
    said = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], said
    assert "to " + str(tmp_path / "two.npz") + " (2 ranks)" in said[0][0] and said[1][0] == ""  # rank 0 reports
    assert main([*argv[3:], str(tmp_path / "one.npz")]) == 0
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
        assert two["arr_1"].tolist() == [c % 10 for c in range(9)]


def test_a_stopped_npz_run_goes_on_where_it_stopped_and_refuses_other_arguments(run, tmp_path, monkeypatch, capsys):
    """A run killed after 2 of 4 batches keeps them; started again it samples only the other 2, and the file is the
    one an unbroken run writes. Other arguments meet the kept batches with an error naming what differs."""
    sampler, labels, calls = load_sampler(run), list(range(7)), []
    real = npz.generate

    def dies_after_two(sampler_, batch, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the time limit
        calls.append(batch)
        return real(sampler_, batch, **kw)

    kw = dict(batch_size=2, seed=3, steps="ddim2", progress=False)
    monkeypatch.setattr(npz, "generate", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_npz(sampler, labels, tmp_path / "s.npz", **kw)
    with pytest.raises(ValueError, match=r"\.s\.npz\.batches holds batches sampled with other seed: remove it"):
        write_npz(sampler, labels, tmp_path / "s.npz", **{**kw, "seed": 4})
    calls.clear()
    monkeypatch.setattr(
        npz, "generate", lambda sampler_, batch, **kw_: calls.append(batch) or real(sampler_, batch, **kw_)
    )
    write_npz(sampler, labels, tmp_path / "s.npz", **kw)
    assert calls == [[4, 5], [6]] and "2 batches already sampled" in capsys.readouterr().out
    write_npz(sampler, labels, tmp_path / "whole.npz", **kw)
    with np.load(tmp_path / "s.npz") as resumed, np.load(tmp_path / "whole.npz") as whole:
        np.testing.assert_array_equal(resumed["arr_0"], whole["arr_0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "whole.npz"]


def test_the_join_holds_one_batch_at_a_time_not_every_image_twice(tmp_path, monkeypatch):
    """50,000 ImageNet-256 samples are 9.8 GB: rank 0 streams the batch files into the .npz instead of loading them
    all and concatenating them (twice the images in memory). The arrays are stored as np.savez stores them."""
    fake = torch.rand(40, 4, 3, 64, 64) * 2 - 1
    batches = {batch_seed(0, b): images for b, images in enumerate(fake)}
    monkeypatch.setattr(npz, "generate", lambda sampler, labels, seed, **kw: batches[seed])
    images_bytes, sampler = fake.numel(), _random_sampler("rf")  # uint8 [160, 64, 64, 3]
    tracemalloc.start()
    try:
        write_npz(sampler, [0, 1, 2, 3] * 40, tmp_path / "s.npz", batch_size=4, seed=0, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images_bytes / 4, f"peak {peak} bytes for {images_bytes} bytes of images"
    expected = sample_module.to_uint8(fake.flatten(0, 1))
    np.savez(tmp_path / "ref.npz", expected, np.asarray([0, 1, 2, 3] * 40, dtype=np.int64))
    with zipfile.ZipFile(tmp_path / "s.npz") as ours, zipfile.ZipFile(tmp_path / "ref.npz") as ref:
        assert ours.namelist() == ref.namelist() == ["arr_0.npy", "arr_1.npy"]
        assert all(ours.read(name) == ref.read(name) for name in ref.namelist())


def test_a_stopped_npz_run_refuses_other_weights_or_another_vae(run, vae_dir, tmp_path, monkeypatch):
    """The kept batches were drawn with the EMA weights and decoded by one VAE: started again with --no-ema or
    another --vae, the run is refused, not finished with batches of other images."""
    real, calls = npz.generate, []

    def dies_after_one(sampler_, batch, **kw):
        if calls:
            raise TimeoutError("the time limit")
        calls.append(batch)
        return real(sampler_, batch, **kw)

    monkeypatch.setattr(npz, "generate", dies_after_one)
    kw = dict(batch_size=2, seed=0, steps="ddim2", progress=False)
    with pytest.raises(TimeoutError):
        write_npz(load_sampler(run), list(range(4)), tmp_path / "s.npz", **kw)
    with pytest.raises(ValueError, match=r"other weights: remove it"):
        write_npz(load_sampler(run, ema=False), list(range(4)), tmp_path / "s.npz", **kw)
    shutil.copytree(vae_dir, tmp_path / "other-vae")
    latent = _random_sampler("ddpm")
    calls.clear()
    with pytest.raises(TimeoutError):
        write_npz(latent, [0, 1, 2, 3], tmp_path / "l.npz", decoder=load_vae(vae_dir, "cpu"), **kw)
    with pytest.raises(ValueError, match=r"other vae: remove it"):
        write_npz(latent, [0, 1, 2, 3], tmp_path / "l.npz", decoder=load_vae(tmp_path / "other-vae", "cpu"), **kw)


def test_a_run_that_failed_before_its_first_batch_does_not_block_the_next(run, tmp_path):
    """A first try that kept no batch (a class id out of range, out of memory at its batch size) leaves nothing to
    finish: the corrected command samples afresh instead of being refused for "batches sampled with other labels"."""
    kw = dict(batch_size=2, seed=0, steps="ddim2", progress=False)
    with pytest.raises(ValueError, match=r"class id\(s\) \[11\] out of range"):
        write_npz(load_sampler(run), [3, 11], tmp_path / "s.npz", **kw)
    write_npz(load_sampler(run), [3, 1], tmp_path / "s.npz", **{**kw, "batch_size": 1})
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_1"].tolist() == [3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_full_disk_at_the_join_leaves_no_half_file_and_keeps_the_batches(run, tmp_path, monkeypatch):
    """The join needs room for every image once more: when the disk fills up, the half-written .npz (a hidden
    .tmp, gigabytes at 50,000 samples) is removed, and the kept batches let the run finish once there is room."""
    real = npz._write_joined

    def disk_full(f, parts, labels):
        f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npz, "_write_joined", disk_full)
    kw = dict(batch_size=2, seed=0, steps="ddim2", progress=False)
    with pytest.raises(OSError, match="No space left"):
        write_npz(load_sampler(run), [0, 1, 2], tmp_path / "s.npz", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.npz.batches"]
    monkeypatch.setattr(npz, "_write_joined", real)
    write_npz(load_sampler(run), [0, 1, 2], tmp_path / "s.npz", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_kill_while_the_batches_are_removed_leaves_none_without_their_record(run, tmp_path, monkeypatch):
    """Killed while the folder is removed after the join (rmtree goes in directory order, the run record maybe
    first), the next run, with other arguments, must not take the old batches as its own."""
    real_rmtree, kw = shutil.rmtree, dict(batch_size=2, steps="ddim2", progress=False)

    def killed_after_the_record(path):
        (Path(path) / npz.RUN_FILE).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(npz.shutil, "rmtree", killed_after_the_record)
    with pytest.raises(KeyboardInterrupt):
        write_npz(load_sampler(run), [0, 1, 2, 3], tmp_path / "s.npz", seed=0, **kw)
    monkeypatch.setattr(npz.shutil, "rmtree", real_rmtree)
    write_npz(load_sampler(run), [0, 1, 2, 3], tmp_path / "s.npz", seed=1, **kw)
    write_npz(load_sampler(run), [0, 1, 2, 3], tmp_path / "fresh.npz", seed=1, **kw)
    with np.load(tmp_path / "s.npz") as s, np.load(tmp_path / "fresh.npz") as fresh:
        np.testing.assert_array_equal(s["arr_0"], fresh["arr_0"])


def test_to_uint8_rounds_and_clamps_as_dit_sample_ddp_does():
    """Images in [-1, 1] to uint8 as DiT's (and DiT-MoE's) sample_ddp.py: clamp(127.5 x + 128, 0, 255) truncated,
    i.e. rounded to nearest; values past [-1, 1] (a pixel model is not clipped) clamp, never wrap."""
    x = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.003, 0.5, 0.999, 1.0, 1.5]).view(1, 1, 1, -1)
    dit = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    np.testing.assert_array_equal(sample_module.to_uint8(x)[0, 0, :, 0], dit.flatten().numpy())


def test_no_two_seed_batch_pairs_share_a_batch_seed():
    """Runs seeded 0 and 1 share no noise (seed + batch would give batch 1 of seed 0 the noise of batch 0 of
    seed 1)."""
    seeds = {batch_seed(seed, b) for seed in range(4) for b in range(50)}
    assert len(seeds) == 200
