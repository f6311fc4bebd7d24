"""Digits preparation into webdataset shards, the manifest, and the deterministic rank-split loader."""

import io
import json
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from ditmoe.cli import main
from ditmoe.data.digits import prepare_digits
from ditmoe.data.shards import load_split_tensors, make_loader, read_manifest

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    """16x16 digits in shards of 256 (6 train shards, 2 val shards)."""
    out_dir = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(out_dir, image_size=16, shard_size=256)
    return out_dir


def shard_keys(data_dir: Path, split: str) -> list[str]:
    manifest = read_manifest(data_dir)
    urls = [str(data_dir / name) for name in manifest["splits"][split]["shards"]]
    return [sample["__key__"] for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples())]


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def sample_multiset(x: torch.Tensor, y: torch.Tensor) -> Counter:
    return Counter((x_i.numpy().tobytes(), int(y_i)) for x_i, y_i in zip(x, y, strict=True))


def test_manifest_counts_and_classes(digits_dir):
    manifest = read_manifest(digits_dir)
    splits = manifest["splits"]
    assert splits["train"]["count"] + splits["val"]["count"] == NUM_DIGITS
    assert manifest["classes"] == [str(c) for c in range(10)] and manifest["num_classes"] == 10
    assert manifest["channels"] == 1 and manifest["image_size"] == 16 and manifest["format"] == "image"
    assert len(splits["train"]["shards"]) == 6 and splits["val"]["shards"] == ["val-000000.tar", "val-000001.tar"]
    for split in ("train", "val"):
        assert sum(manifest["per_class"][split].values()) == splits[split]["count"]
    for cls in manifest["classes"]:  # stratified: each class has about 20% in val
        train_n, val_n = manifest["per_class"]["train"][cls], manifest["per_class"]["val"][cls]
        assert abs(val_n / (train_n + val_n) - 0.2) < 0.01
    _, y_val = load_split_tensors(digits_dir, "val")
    assert np.bincount(y_val.numpy()).tolist() == list(manifest["per_class"]["val"].values())


def test_train_val_disjoint(digits_dir):
    train_keys, val_keys = shard_keys(digits_dir, "train"), shard_keys(digits_dir, "val")
    assert len(set(train_keys)) == len(train_keys) and len(set(val_keys)) == len(val_keys)
    assert train_keys[0].startswith("train_") and val_keys[0].startswith("val_")
    x_train, y_train = load_split_tensors(digits_dir, "train")
    x_val, y_val = load_split_tensors(digits_dir, "val")
    assert len(x_train) + len(x_val) == NUM_DIGITS
    train_images, val_images = sample_multiset(x_train, y_train), sample_multiset(x_val, y_val)
    assert len(train_images) + len(val_images) == NUM_DIGITS  # all 1797 digits are distinct images
    assert not set(train_images) & set(val_images)


def test_shards_decode_to_images(digits_dir):
    x, y = load_split_tensors(digits_dir, "val")
    assert x.shape == (read_manifest(digits_dir)["splits"]["val"]["count"], 1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_prepare_is_deterministic_and_overwrites(digits_dir, tmp_path):
    other = tmp_path / "digits"
    prepare_digits(other, image_size=16, shard_size=256)
    assert torch.equal(load_split_tensors(other, "val")[0], load_split_tensors(digits_dir, "val")[0])
    (other / "notes.txt").write_text("keep me")
    manifest = prepare_digits(other, image_size=8)
    names = sorted(path.name for path in other.iterdir())
    assert names == [
        "manifest.json",
        "notes.txt",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]  # default shard_size 512: the old 6 + 2 shards are gone, notes.txt stays
    assert manifest["image_size"] == 8 and load_split_tensors(other, "train")[0].shape[-1] == 8
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".digits")]  # no staging left


def test_prepared_dataset_folder_is_readable_as_the_umask_allows(tmp_path):
    """A new dataset folder gets mkdir's mode (0755 under umask 022), not the staging dir's private 0700: teammates
    and jobs running as another user read a dataset that one user prepared."""
    out_dir = tmp_path / "digits"
    prepare_digits(out_dir, image_size=8)
    probe = tmp_path / "probe"
    probe.mkdir()
    assert stat.S_IMODE(out_dir.stat().st_mode) == stat.S_IMODE(probe.stat().st_mode)


@pytest.mark.parametrize("kwargs", [{"image_size": 12}, {"val_fraction": 0.0}, {"val_fraction": 1.0}])
def test_prepare_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        prepare_digits(tmp_path / "digits", **kwargs)


def test_cli_prepare_digits_takes_its_options(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = ["--image-size", "8", "--val-fraction", "0.5", "--shard-size", "300", "--seed", "1"]
    assert main(["prepare", "digits", "--out", str(out), *argv]) == 0
    manifest = read_manifest(out)
    splits = manifest["splits"]
    assert (manifest["image_size"], manifest["val_fraction"], manifest["seed"]) == (8, 0.5, 1)
    assert abs(splits["val"]["count"] - NUM_DIGITS / 2) < 10
    assert [len(splits[split]["shards"]) for split in ("train", "val")] == [3, 3]
    assert main(["prepare", "digits", "--out", str(out)]) == 0  # the defaults (make demo)
    manifest = read_manifest(out)
    assert (manifest["image_size"], manifest["val_fraction"], manifest["seed"]) == (16, 0.2, 0)
    assert [manifest["splits"][split]["count"] for split in ("train", "val")] == [1438, 359]
    assert [len(manifest["splits"][split]["shards"]) for split in ("train", "val")] == [3, 1]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--workers", "4"], "does not take --workers"),
        (["--image-format", "png", "--shard-bytes", "9000"], "does not take --shard-bytes, --image-format"),
        (["--src", "imgs", "--class-index", "classes.json"], "does not take --src, --class-index"),
        (["--latents", "--vae", "vae", "--device", "cpu"], "does not take --latents, --vae, --device"),
        (["--batch-size", "4", "--scaling-factor", "0.2"], "does not take --batch-size, --scaling-factor"),
        (["--val-fraction", "1.5"], "val_fraction must lie in (0, 1), got 1.5"),
        (["--shard-size", "0"], "shard_size must be >= 1, got 0"),
        (["--image-size", "0"], "got 0"),
    ],
)
def test_cli_prepare_digits_bad_input_is_one_clear_line(tmp_path, capsys, argv, needle):
    assert main(["prepare", "digits", "--out", str(tmp_path / "digits"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.count("\n") == 0
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_loader_batches_and_determinism(digits_dir):
    def first_batches(seed: int, n: int = 30) -> list:
        loader = make_loader(digits_dir, "train", batch_size=64, seed=seed, shuffle_buffer=300)
        return [batch for batch, _ in zip(loader, range(n), strict=False)]  # 30 x 64 > one epoch: repeats

    run_a, run_b, run_c = first_batches(0), first_batches(0), first_batches(1)
    x, y = run_a[0]
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32 and y.shape == (64,) and y.dtype == torch.int64
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(run_a, run_b, strict=True))
    assert not torch.equal(run_a[0][1], run_c[0][1])


def test_eval_pass_covers_split_once(digits_dir):
    loader = make_loader(digits_dir, "val", batch_size=64, seed=0, epochs=1, drop_last=False, shuffle_buffer=0)
    x, y = collect(loader)
    x_ref, y_ref = load_split_tensors(digits_dir, "val")
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("split", ["train", "val"])  # 6 shards: by shard; 2 shards for 4 consumers: by sample
def test_ranks_partition_an_epoch(digits_dir, split):
    world_size = 2 if split == "train" else 4
    parts = [
        collect(
            make_loader(
                digits_dir,
                split,
                batch_size=32,
                seed=3,
                rank=r,
                world_size=world_size,
                epochs=1,
                drop_last=False,
                shuffle_buffer=100,
            )
        )
        for r in range(world_size)
    ]
    seen = [sample_multiset(x, y) for x, y in parts]
    assert all(len(s) > 0 for s in seen)
    assert sum(seen, Counter()) == sample_multiset(*load_split_tensors(digits_dir, split))


def test_worker_processes_match_themselves(digits_dir):
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return collect(
            make_loader(digits_dir, "train", batch_size=64, seed=0, num_workers=2, epochs=1, drop_last=False)
        )

    (xa, ya), (xb, yb) = run(), run()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(ya) == read_manifest(digits_dir)["splits"]["train"]["count"]


def test_missing_or_empty_directory_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        make_loader(missing, batch_size=8, seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        load_split_tensors(empty, "train")
    (empty / "stray.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(empty)


@pytest.mark.parametrize(
    "text,needle",
    [
        ('{\n  "channels": 1,\n}', "is not valid JSON: Expecting property name"),
        ("[1, 2]", "holds a list, not a JSON object"),
        ('{"num_classes": 10, "splits": {}}', "lacks 'channels'"),
        ('{"format": "image"}', "lacks 'channels', 'num_classes', 'splits'"),
        ('{"channels": 1, "num_classes": 10, "splits": ["train-000000.tar"]}', "must map split names to objects"),
        ('{"channels": 1, "num_classes": 10, "splits": {"train": {"shards": []}}}', "split 'train' in"),
    ],
)
def test_bad_manifest_names_the_file_and_the_problem(tmp_path, text, needle):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError) as e:
        read_manifest(tmp_path)
    assert needle in str(e.value) and str(tmp_path / "manifest.json") in str(e.value)


def write_custom_dataset(data_dir: Path, samples: list[dict]) -> None:
    """One train shard with the given samples and a manifest for 10 one-channel classes."""
    data_dir.mkdir()
    with wds.TarWriter(str(data_dir / "train-000000.tar")) as writer:
        for sample in samples:
            writer.write(sample)
    manifest = {
        "format": "image",
        "channels": 1,
        "num_classes": 10,
        "splits": {"train": {"count": len(samples), "shards": ["train-000000.tar"]}},
    }
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def test_bad_labels_are_skipped_and_counted(digits_dir, tmp_path):
    png = next(
        iter(wds.DataPipeline(wds.SimpleShardList([str(digits_dir / "val-000000.tar")]), wds.tarfile_to_samples()))
    )["png"]
    labels = ["3", "42", "-1", "seven", "9"]
    write_custom_dataset(tmp_path / "bad", [{"__key__": f"s{i}", "png": png, "cls": c} for i, c in enumerate(labels)])
    loader = make_loader(tmp_path / "bad", batch_size=8, seed=0, epochs=1, drop_last=False)
    _, y = collect(loader)
    assert y.tolist() in ([3, 9], [9, 3]) and loader.skipped_labels == 3
    with pytest.raises(ValueError, match="no shards for split 'val'"):
        make_loader(tmp_path / "bad", "val", batch_size=8, seed=0)


def test_latent_samples_dispatch(tmp_path):
    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    latent, flipped = np.zeros((4, 2, 2), np.float32), np.ones((4, 2, 2), np.float32)
    samples = [
        {"__key__": f"s{i}", "latent.npy": npy(latent), "latent_flip.npy": npy(flipped), "cls": "1"} for i in range(64)
    ]
    write_custom_dataset(tmp_path / "latents", samples)
    x, y = load_split_tensors(tmp_path / "latents", "train")
    assert x.shape == (64, 4, 2, 2) and torch.all(x == 0) and torch.all(y == 1)  # no flips outside training
    x_train, _ = collect(make_loader(tmp_path / "latents", batch_size=64, seed=0, epochs=1))
    assert 0 < x_train.mean(dim=(1, 2, 3)).sum() < 64  # both versions appear


def test_prepare_refuses_to_overwrite_unlisted_shards(tmp_path):
    out_dir = tmp_path / "digits"
    out_dir.mkdir()
    (out_dir / "val-000000.tar").write_text("someone else's")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        prepare_digits(out_dir)
    assert (out_dir / "val-000000.tar").read_text() == "someone else's"


def test_a_batch_larger_than_a_consumers_samples_is_refused_up_front(digits_dir):
    """359 val samples over 2 ranks: 179 each in one epoch, so a batch of 200 never fills (it was 'no readable
    sample', though every sample reads)."""
    with pytest.raises(ValueError, match=r"batch_size 200 is more than the 179 samples each of the 2 consumers"):
        make_loader(digits_dir, "val", batch_size=200, seed=0, rank=0, world_size=2, epochs=1)
    assert len(list(make_loader(digits_dir, "val", batch_size=200, seed=0, world_size=2, epochs=2))) == 1


@pytest.mark.parametrize("dataset", ["digits", "images"])
def test_cli_prepare_into_a_file_is_one_clear_line(tmp_path, capsys, dataset):
    (tmp_path / "afile").write_text("notes")
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    src = ["--src", str(tmp_path / "imgs")] if dataset == "images" else []
    assert main(["prepare", dataset, "--out", str(tmp_path / "afile"), *src]) == 2
    err = capsys.readouterr().err.strip()
    assert f"out_dir {tmp_path / 'afile'} is a file" in err and err.count("\n") == 0
    assert (tmp_path / "afile").read_text() == "notes" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile",
        "imgs",
    ]
