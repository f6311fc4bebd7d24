"""Data at scale: class-folder trees -> image / VAE-latent shards, bad data, equal rank steps, exact resume."""

import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ditmoe.cli import main
from ditmoe.data.imagefolder import center_crop_arr
from ditmoe.data.prepare_images import prepare_images
from ditmoe.data.shard_writer import ShardSink, file_sha256
from ditmoe.data.shards import load_split_tensors, make_loader, read_manifest
from ditmoe.data.tario import iter_unique

CLASSES = ("eel", "cat", "dog")  # created unsorted: ids follow the sorted names
PER_CLASS = 7
SIZE = 16


def make_image(rng: np.random.Generator, cid: int, width: int, height: int) -> Image.Image:
    """A noisy image whose mean color tells its class."""
    base = np.zeros(3)
    base[cid] = 200
    array = np.clip(base + rng.integers(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """3 class folders x 7 images of odd sizes (png, jpg, grayscale), one corrupt file, one non-image."""
    root = tmp_path_factory.mktemp("tree") / "imagenet"
    rng = np.random.default_rng(0)
    for name in CLASSES:
        cid = sorted(CLASSES).index(name)
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            image = make_image(rng, cid, 17 + 13 * i, 23 + 7 * i)
            image.save(root / name / f"img{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "dog" / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def pixels(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pixels") / "shards"
    prepare_images(tree, out, image_size=SIZE, shard_size=8, workers=2, image_format="png", progress=False)
    return out


@pytest.fixture(scope="module")
def latents(tree, vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "shards"
    prepare_images(
        tree,
        out,
        image_size=SIZE,
        shard_size=8,
        latents=True,
        vae_dir=vae_dir,
        device="cpu",
        batch_size=8,
        progress=False,
    )
    return out


def raw_samples(data_dir: Path) -> list[dict]:
    urls = [str(data_dir / n) for n in read_manifest(data_dir)["splits"]["train"]["shards"]]
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def all_keys(loader) -> list[str]:
    return [key for _, _, keys in loader for key in keys]


def adm_center_crop(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center_crop_arr (guided-diffusion, image_datasets.py) as written there, for an RGB image."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def test_center_crop_is_adm():
    """Sizes where rounding (not truncating) the bicubic size and flooring the crop offset matter: 17x23 and 43x37
    scale to x.5 and above, 37x53 and 53x37 leave an odd margin to crop."""
    rng = np.random.default_rng(1)
    for width, height in ((17, 23), (43, 37), (37, 53), (53, 37), (82, 58), (16, 16)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        assert np.array_equal(center_crop_arr(image, 16), adm_center_crop(image, 16)), (width, height)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = image.resize((32, 32), Image.BOX).resize((16, 16), Image.BOX)  # two halvings, no bicubic step
    assert np.array_equal(center_crop_arr(image, 16), np.asarray(expected))
    wide = np.zeros((50, 150, 3), np.uint8)
    wide[:, 50:100] = 255  # white centre square, black sides
    crop = center_crop_arr(Image.fromarray(wide), 20)  # 150x50 -> bicubic to 60x20 -> centre 20 columns
    assert crop.shape == (20, 20, 3) and crop[:, 2:-2].min() > 240


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_grayscale_deeper_than_8_bits_is_rescaled_not_clipped(tmp_path, mode):
    """A 16-bit grayscale PNG was stored near-white: convert("RGB") clips values above 255."""
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1))  # black to white, left to right
    if mode == "I;16":
        Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "ramp.png")
        image = Image.open(tmp_path / "ramp.png")
    else:
        image = Image.fromarray(ramp.astype(np.int32) if mode == "I" else (ramp / 65535).astype(np.float32))
    assert image.mode == mode
    crop = center_crop_arr(image, 16).astype(int)
    assert abs(crop.mean() - 127.5) < 2 and (np.diff(crop[..., 0], axis=1) > 0).all() and (crop[0] == crop).all()
    assert crop[0, 0, 0] < 10 and crop[0, -1, 0] > 245


def test_image_manifest_and_class_index(pixels, tree):
    manifest = read_manifest(pixels)
    assert json.loads((pixels / "classes.json").read_text()) == {"cat": 0, "dog": 1, "eel": 2}
    assert manifest["classes"] == ["cat", "dog", "eel"] and manifest["num_classes"] == 3
    assert (manifest["format"], manifest["channels"], manifest["image_size"]) == ("image", 3, SIZE)
    train = manifest["splits"]["train"]
    assert train["count"] == 3 * PER_CLASS and manifest["per_class"]["train"] == {c: PER_CLASS for c in CLASSES}
    assert [r["count"] for r in train["shard_info"]] == [8, 8, 5] and train["shards"][0] == "train-000000.tar"
    assert all(file_sha256(pixels / r["name"]) == r["sha256"] for r in train["shard_info"])
    assert [Path(s["path"]).name for s in manifest["skipped"]] == ["broken.jpg"]


def test_image_shards_decode_to_center_crops(pixels, tree):
    from ditmoe.data.imagefolder import class_index, scan_images
    from ditmoe.data.prepare_images import split_items

    sources = split_items(scan_images(tree, class_index(tree)), 0.0, 0)["train"]  # train_<i> is item i
    for sample in raw_samples(pixels):
        path = sources[int(sample["__key__"].removeprefix("train_"))][0]
        with Image.open(path) as image, Image.open(io.BytesIO(sample["png"])) as stored:
            assert np.array_equal(np.asarray(stored), adm_center_crop(image.convert("RGB"), SIZE)), path
    x, y = load_split_tensors(pixels, "train")
    assert x.shape == (21, 3, SIZE, SIZE) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x.mean(dim=(2, 3)).argmax(dim=1), y)  # the dominant color is the class
    sample = raw_samples(pixels)[0]
    assert set(sample) >= {"__key__", "png", "cls"} and sample["__key__"].startswith("train_")
    loader = make_loader(pixels, batch_size=4, seed=0, num_workers=2, shuffle_buffer=10)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, SIZE, SIZE) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_latent_shards(latents, vae_dir, tree):
    from ditmoe.data.vae import load_vae

    manifest = read_manifest(latents)
    assert (manifest["format"], manifest["channels"], manifest["image_size"]) == ("latent", 4, SIZE)
    assert manifest["latent_size"] == SIZE // 2 and manifest["scaling_factor"] == pytest.approx(0.18215)
    assert manifest["splits"]["train"]["count"] == 21 and manifest["num_classes"] == 3
    samples = {s["__key__"]: s for s in raw_samples(latents)}
    assert len(samples) == 21 and all(set(s) >= {"latent.npy", "latent_flip.npy", "cls"} for s in samples.values())
    latent = np.load(io.BytesIO(samples["train_00000000"]["latent.npy"]))
    flipped = np.load(io.BytesIO(samples["train_00000000"]["latent_flip.npy"]))
    assert latent.dtype == np.float16 and latent.shape == (4, SIZE // 2, SIZE // 2)
    assert not np.array_equal(latent, flipped)
    # the stored latent is the scaled posterior mean of the center crop (same order as the pixel shards: seed 0)
    first_path = manifest_first_path(tree)
    with Image.open(first_path) as image:
        crop = center_crop_arr(image, SIZE)
    encoder = load_vae(vae_dir, "cpu")
    expected = encoder.encode(np.stack([crop, crop[:, ::-1]]))
    assert np.allclose(latent, expected[0], atol=2e-3) and np.allclose(flipped, expected[1], atol=2e-3)
    x, y = next(iter(make_loader(latents, batch_size=5, seed=0, num_workers=2, shuffle_buffer=10)))
    assert x.shape == (5, 4, SIZE // 2, SIZE // 2) and y.shape == (5,)


def manifest_first_path(tree: Path) -> Path:
    """The file written as train_00000000: the first item of the seeded permutation (broken file included)."""
    from ditmoe.data.imagefolder import class_index, scan_images
    from ditmoe.data.prepare_images import split_items

    return Path(split_items(scan_images(tree, class_index(tree)), 0.0, 0)["train"][0][0])


def test_cli_prepare_images_with_val_and_byte_shards(tree, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "prepare",
                "images",
                "--src",
                str(tree),
                "--out",
                str(out),
                "--image-size",
                str(SIZE),
                "--shard-bytes",
                "3000",
                "--val-fraction",
                "0.3",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    manifest = read_manifest(out)
    assert manifest["image_format"] == "jpg" and len(manifest["splits"]["train"]["shards"]) > 1
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 21
    assert all(manifest["per_class"]["val"][c] == 2 for c in CLASSES)
    assert load_split_tensors(out, "val")[0].shape == (6, 3, SIZE, SIZE)
    assert "wrote image shards of 3 classes" in capsys.readouterr().out
    assert main(["prepare", "images", "--out", str(tmp_path / "x")]) == 2  # no --src: clear error
    assert main(["prepare", "images", "--src", str(tree), "--out", str(tmp_path / "y"), "--latents"]) == 2


def test_cli_prepare_latents_with_a_vae_without_weights_is_one_clear_line(tree, vae_dir, tmp_path, capsys):
    """A --vae folder with a config.json but no weights ended in a diffusers OSError traceback."""
    (tmp_path / "vae").mkdir()
    shutil.copy(vae_dir / "config.json", tmp_path / "vae")
    argv = ["--src", str(tree), "--out", str(tmp_path / "out"), "--latents", "--vae", str(tmp_path / "vae")]
    assert main(["prepare", "images", *argv, "--image-size", str(SIZE), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"VAE directory {tmp_path / 'vae'}" in err and "no file named" in err and err.count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_cli_prepare_images_empty_val_split_is_refused_before_encoding(tmp_path, capsys, monkeypatch):
    from ditmoe.data import prepare_images as module

    def no_encoding(*args, **kwargs):
        raise AssertionError("images were encoded")

    rng = np.random.default_rng(0)
    for cid, name in enumerate(("cat", "dog")):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        make_image(rng, cid, SIZE, SIZE).save(tmp_path / "imgs" / name / "only.png")
    monkeypatch.setattr(module, "load_item", no_encoding)
    argv = ["--src", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--val-fraction", "0.1"]
    assert main(["prepare", "images", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "val_fraction 0.1 leaves the val split empty: 2 images in 2 classes" in err and err.count("\n") == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["imgs"]


def test_prepare_images_nothing_readable_names_the_split(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / name / f"broken{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="no image under .*imgs could be read for split 'train'"):
        prepare_images(tmp_path / "imgs", tmp_path / "out", image_size=SIZE, val_fraction=0.5, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["imgs"]


def test_byte_limited_shards_end_within_one_sample_of_the_limit(tmp_path):
    """--shard-bytes counted 512 header bytes a field where webdataset writes PAX headers (1536 bytes and more):
    shards of small samples came out twice the limit."""
    limit = 20_000
    sink = ShardSink(tmp_path, "train", max_bytes=limit)
    for i in range(40):
        sink.write({"__key__": f"k{i:03d}", "png": png(SIZE), "cls": "1"})
    records = sink.close()
    assert len(records) > 2 and sum(r["count"] for r in records) == 40
    for i, record in enumerate(records):
        with tarfile.open(tmp_path / record["name"]) as tar:
            members = tar.getmembers()  # per sample: cls, png
        end = members[-1].offset_data + -(-members[-1].size // 512) * 512
        assert members[-2].offset < limit, f"{record['name']}: its last sample began past the limit"
        assert end >= limit or i == len(records) - 1, f"{record['name']}: a new shard began below the limit"


def write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def png(size: int, color: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (color, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def damaged(pixels, tmp_path) -> Path:
    """The pixel shards with one truncated, one duplicated, one missing, and one shard of bad samples."""
    out = tmp_path / "damaged"
    shutil.copytree(pixels, out)
    manifest = read_manifest(out)
    names = manifest["splits"]["train"]["shards"]  # 8, 8, 5 samples
    data = (out / names[0]).read_bytes()
    (out / names[0]).write_bytes(data[: len(data) * 5 // 8])  # truncated mid-sample
    shutil.copy(out / names[1], out / "copy-000000.tar")  # 8 duplicate keys
    (out / names[2]).unlink()  # missing
    write_shard(
        out / "bad-000000.tar",
        [
            {"__key__": "bad_undecodable", "png": b"\x89PNG garbage", "cls": "1"},
            {"__key__": "bad_label", "png": png(SIZE), "cls": "7"},
            {"__key__": "bad_shape", "png": png(SIZE + 3), "cls": "1"},
            {"__key__": "good_extra", "png": png(SIZE), "cls": "2"},
        ],
    )
    manifest["splits"]["train"]["shards"] = names + ["copy-000000.tar", "bad-000000.tar"]
    manifest["splits"]["train"]["count"] = 21 + 8 + 4
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def truncated_keep(path: Path) -> int:
    """Samples of a truncated shard whose members (cls and png) were read in full before the damage."""
    fields: Counter = Counter()
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                tar.extractfile(member).read()
                fields[member.name.split(".")[0]] += 1
    except tarfile.TarError:
        pass
    return sum(1 for n in fields.values() if n == 2)


def test_a_key_repeated_in_place_is_one_duplicate_and_the_shard_reads_on(tmp_path):
    """key a written twice in a row (a.cls, a.png, a.cls, a.png): the second is a duplicate key, skipped and
    counted; it used to end the shard as damaged, losing every sample after it."""
    shard = tmp_path / "dup-000000.tar"
    write_shard(shard, [{"__key__": k, "png": png(SIZE), "cls": "1"} for k in ("a", "a", "b", "c")])
    skipped: Counter = Counter()
    assert [s["__key__"] for s in iter_unique([str(shard)], skipped)] == ["a", "b", "c"]
    assert skipped == Counter(duplicate_key=1)


def test_a_shard_cut_anywhere_is_counted_and_keeps_the_samples_before_the_cut(tmp_path):
    """A cut at a member boundary or inside a header lost the rest of the shard silently (Python's tarfile takes
    a short or empty header for the end); only a cut inside the zero blocks after the end marker is harmless."""
    shard = tmp_path / "whole.tar"
    write_shard(shard, [{"__key__": f"k{i}", "png": png(SIZE), "cls": "1"} for i in range(4)])
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        members = tar.getmembers()  # k0.cls, k0.png, k1.cls, ...
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512  # the end-of-archive marker
    headers = [m.offset for m in members[1:]]  # member boundaries, within and between samples
    cuts = [*headers, *(o + 300 for o in headers), members[3].offset_data + 10, end, end + 256]
    for cut in cuts:
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        skipped: Counter = Counter()
        keys = [s["__key__"] for s in iter_unique([str(tmp_path / "cut.tar")], skipped)]
        whole = sum(1 for m in members if m.name.endswith(".png") and m.offset_data + m.size <= cut)
        assert skipped == Counter(bad_shard=1), f"cut at byte {cut}"
        assert keys == [f"k{i}" for i in range(len(keys))] and whole - 1 <= len(keys) <= whole, f"cut at byte {cut}"
    for cut in (end + 512, len(data)):  # inside the padding after the marker: the shard is whole
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        skipped = Counter()
        assert len(list(iter_unique([str(tmp_path / "cut.tar")], skipped))) == 4 and not skipped


def test_a_shard_with_fewer_samples_than_the_manifest_records_is_counted(pixels, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(pixels, short)
    last = read_manifest(short)["splits"]["train"]["shards"][-1]  # 5 samples, rewritten whole with 4
    write_shard(short / last, raw_samples(pixels)[-5:-1])
    loader = make_loader(short, batch_size=4, seed=0, epochs=1, drop_last=False, return_keys=True)
    assert len(all_keys(loader)) == 20 and loader.skipped == Counter(bad_shard=1)
    assert load_split_tensors(short, "train")[0].shape[0] == 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle_buffer", [1000, 1])  # 1: damage is met after the first batch was yielded
def test_fault13_bad_data_skipped_and_counted(damaged, num_workers, shuffle_buffer):
    """Shard-level skips met after an epoch's first batch went uncounted (into a counter no batch reported)."""
    loader = make_loader(
        damaged,
        batch_size=4,
        seed=0,
        num_workers=num_workers,
        epochs=1,
        drop_last=False,
        return_keys=True,
        shuffle_buffer=shuffle_buffer,
    )
    batches = list(loader)
    keys = [k for _, _, ks in batches for k in ks]
    assert len(keys) == len(set(keys))  # duplicates never reach the model
    assert all(x.shape[1:] == (3, SIZE, SIZE) for x, _, _ in batches)
    assert all(((y >= 0) & (y < 3)).all() for _, y, _ in batches)
    skipped = loader.skipped
    assert skipped["missing_shard"] == 1 and skipped["bad_shard"] == 1 and skipped["duplicate_key"] == 8
    assert skipped["undecodable"] == 1 and skipped["bad_label"] == 1 and skipped["bad_shape"] == 1
    assert loader.skipped_labels == 1
    assert "good_extra" in keys and len(keys) == 8 + 1 + truncated_keep(damaged / "train-000000.tar")


@pytest.mark.timeout(60)
def test_fault13_training_mode_and_latent_shapes(damaged, latents, tmp_path):
    loaders = [
        make_loader(damaged, batch_size=4, seed=1, rank=r, world_size=2, num_workers=2, epochs=2) for r in range(2)
    ]
    counts = [sum(1 for _ in loader) for loader in loaders]
    assert counts[0] == counts[1] > 0
    bad = tmp_path / "bad-latents"
    shutil.copytree(latents, bad)
    manifest = read_manifest(bad)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, SIZE, SIZE), np.float16))  # pixel-sized: wrong shape
    write_shard(bad / "odd.tar", [{"__key__": "wrong", "latent.npy": buffer.getvalue(), "cls": "0"}])
    manifest["splits"]["train"]["shards"].append("odd.tar")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    loader = make_loader(bad, batch_size=4, seed=0, epochs=1, drop_last=False, return_keys=True)
    assert "wrong" not in all_keys(loader) and loader.skipped["bad_shape"] == 1


@pytest.mark.timeout(60)
def test_nothing_readable_is_a_clear_error(pixels, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pixels, broken)
    names = read_manifest(broken)["splits"]["train"]["shards"]
    for name in names:
        (broken / name).write_bytes(b"this is no tar file" * 10)
    for kwargs in ({"epochs": 1, "drop_last": False}, {"num_workers": 2}, {"resampled": True}):
        with pytest.raises(RuntimeError, match="no readable sample.*train-000000.tar"):
            next(iter(make_loader(broken, batch_size=4, seed=0, **kwargs)))
    for name in names:
        (broken / name).unlink()
    with pytest.raises(FileNotFoundError, match="train-000002.tar"):
        make_loader(broken, batch_size=4, seed=0)


def two_shards(root: Path, bad: tuple[int, ...]) -> Path:
    """2 shards of 10 samples each; in the shards numbered in `bad` every PNG is cut to 40 bytes (undecodable)."""
    root.mkdir()
    names = [f"train-{i:06d}.tar" for i in range(2)]
    for i, name in enumerate(names):
        image = png(SIZE)[:40] if i in bad else png(SIZE)
        write_shard(root / name, [{"__key__": f"s{i}_{j}", "png": image, "cls": "1"} for j in range(10)])
    manifest = {"format": "image", "channels": 3, "image_size": SIZE, "num_classes": 3}
    (root / "manifest.json").write_text(json.dumps(manifest | {"splits": {"train": {"count": 20, "shards": names}}}))
    return root


@pytest.mark.timeout(60)
def test_a_shard_of_undecodable_samples_falls_back_like_a_missing_one(tmp_path):
    """The rank whose shard held only undecodable samples raised "no usable sample" (the other ranks would then
    hang in a collective); it reads every 2nd sample of all shards instead, as for a missing shard, and a resume
    replays that switch. The error, when nothing at all is usable, counts one pass."""
    data = two_shards(tmp_path / "one_bad", bad=(1,))

    def loader(rank: int, state=None):
        return make_loader(data, batch_size=5, seed=0, rank=rank, world_size=2, epochs=3, return_keys=True, state=state)

    for rank in range(2):
        full = [keys for _, _, keys in loader(rank)]
        assert len(full) == 3 * 2 and all(key.startswith("s0_") for keys in full for key in keys)
        first = loader(rank)
        head = [keys for _, (_, _, keys) in zip(range(3), first, strict=False)]
        tail = [keys for _, _, keys in loader(rank, json.loads(json.dumps(first.state_dict())))]
        assert head + tail == full, f"rank {rank}: resume diverged"
    data = two_shards(tmp_path / "all_bad", bad=(0, 1))
    with pytest.raises(RuntimeError, match=r"no usable sample among the 10 read .*'undecodable': 10\}"):
        next(iter(make_loader(data, batch_size=5, seed=0, rank=1, world_size=2)))
    with pytest.raises(RuntimeError, match=r"no usable sample among the 20 read .*'undecodable': 20\}"):
        next(iter(make_loader(data, batch_size=5, seed=0)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_fault14_three_shards_two_ranks_same_steps(pixels, num_workers):
    assert len(read_manifest(pixels)["splits"]["train"]["shards"]) == 3  # 8, 8, 5 samples
    for epochs in (1, 3):
        loaders = [
            make_loader(
                pixels,
                batch_size=2,
                seed=5,
                rank=r,
                world_size=2,
                num_workers=num_workers,
                epochs=epochs,
                shuffle_buffer=8,
                return_keys=True,
            )
            for r in range(2)
        ]
        keys = [all_keys(loader) for loader in loaders]
        consumers = 2 * max(num_workers, 1)
        per_rank = epochs * (21 // consumers) // 2 * 2 * max(num_workers, 1)
        assert len(keys[0]) == len(keys[1]) == per_rank
        if epochs == 1:
            # a rank with the short share wraps around it: repeats, never more than twice in an epoch
            assert all(max(Counter(k).values()) <= 2 for k in keys) and len(set(keys[0]) | set(keys[1])) >= 13


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", [3, 7, 12])  # odd, within the 2nd epoch, later
def test_fault7_mid_epoch_resume_continues_keys_exactly(pixels, stop):
    def loader(rank: int, state=None):
        return make_loader(
            pixels,
            batch_size=2,
            seed=3,
            rank=rank,
            world_size=2,
            num_workers=2,
            epochs=4,
            shuffle_buffer=6,
            return_keys=True,
            state=state,
        )

    for rank in range(2):
        full = [keys for _, _, keys in loader(rank)]
        first = loader(rank)
        head = []
        for _, _, keys in first:
            head.append(keys)
            if len(head) == stop:
                break
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        tail = [keys for _, _, keys in loader(rank, state)]
        assert head + tail == full, f"rank {rank}: resume at batch {stop} diverged"
    with pytest.raises(ValueError, match="world_size"):
        make_loader(pixels, batch_size=2, seed=3, rank=0, world_size=4, num_workers=2, state=state)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_skipped_samples_continues_keys_exactly(damaged, num_workers):
    """A resume replays the samples read (raw), skipped ones included, not only the usable ones (good)."""

    def loader(state=None):
        return make_loader(
            damaged,
            batch_size=2,
            seed=3,
            num_workers=num_workers,
            epochs=2,
            shuffle_buffer=4,
            return_keys=True,
            state=state,
        )

    full = [keys for _, _, keys in loader()]
    for stop in (5, 9):
        first = loader()
        head = [keys for _, (_, _, keys) in zip(range(stop), first, strict=False)]
        state = json.loads(json.dumps(first.state_dict()))
        assert any(p["raw"] > p["good"] for p in state["positions"])  # bad samples before the resume point
        assert head + [keys for _, _, keys in loader(state)] == full, f"resume at batch {stop} diverged"


@pytest.mark.timeout(60)
def test_resume_without_workers_and_resampled(pixels):
    for kwargs in ({"num_workers": 0}, {"num_workers": 2, "resampled": True}):

        def run(state=None, n=9, kwargs=kwargs):
            loader = make_loader(pixels, batch_size=3, seed=0, return_keys=True, state=state, **kwargs)
            out = []
            for _, _, keys in loader:
                out.append(keys)
                if len(out) == n:
                    return out, loader.state_dict()

        full, _ = run(n=9)
        head, state = run(n=4)
        tail, _ = run(state=state, n=5)
        assert head + tail == full


@pytest.mark.timeout(60)
def test_brace_and_pipe_urls(pixels):
    reference = sorted(all_keys(make_loader(pixels, batch_size=4, seed=0, epochs=1, drop_last=False, return_keys=True)))
    braces = make_loader(
        pixels, batch_size=4, seed=0, epochs=1, drop_last=False, return_keys=True, shards="train-{000000..000002}.tar"
    )
    assert sorted(all_keys(braces)) == reference
    pipes = [f"pipe:cat {pixels / name}" for name in read_manifest(pixels)["splits"]["train"]["shards"]]
    piped = make_loader(pixels, batch_size=4, seed=0, epochs=1, drop_last=False, return_keys=True, shards=pipes)
    assert sorted(all_keys(piped)) == reference
    missing = make_loader(
        pixels,
        batch_size=4,
        seed=0,
        epochs=1,
        drop_last=False,
        return_keys=True,
        shards=pipes + ["pipe:cat /nonexistent.tar"],
        num_samples=21,
    )
    assert sorted(all_keys(missing)) == reference and sum(missing.skipped.values()) == 1
    with pytest.raises(ValueError, match="num_samples"):
        make_loader(pixels, batch_size=4, seed=0, shards=["pipe:cat /elsewhere/x.tar"])


@pytest.mark.timeout(60)
def test_latent_loader_is_deterministic_per_rank(latents):
    def keys(rank: int) -> list:
        return all_keys(
            make_loader(
                latents,
                batch_size=2,
                seed=9,
                rank=rank,
                world_size=2,
                num_workers=2,
                epochs=2,
                shuffle_buffer=5,
                return_keys=True,
            )
        )

    a, b = keys(0), keys(1)
    assert a == keys(0) and len(a) == len(b) and not set(a[:5]) & set(b[:5])
    assert Counter(a + b).most_common(1)[0][1] <= 2 * 2  # 2 epochs: at most a few repeats of any key


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_train_a_few_steps_from_prepared_shards(kind, request, tmp_path):
    from ditmoe.training.config import train_config
    from ditmoe.training.loop import train

    data = request.getfixturevalue(kind)
    manifest = read_manifest(data)
    cfg = train_config("digits-smoke", data=str(data), out=str(tmp_path / "run"), steps=2, batch_size=4)
    result = train(cfg, progress=False)
    assert result.step == 2 and all(np.isfinite(result.losses))
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "config.json").read_text())["model"]
    expected = manifest["latent_size"] if kind == "latents" else SIZE
    assert (saved["input_size"], saved["in_channels"], saved["num_classes"]) == (
        expected,
        4 if kind == "latents" else 3,
        3,
    )


@pytest.fixture(scope="module")
def latent_run(latents, tmp_path_factory) -> Path:
    from ditmoe.training.config import train_config
    from ditmoe.training.loop import train

    out = tmp_path_factory.mktemp("latent-run") / "run"
    train(train_config("digits-smoke", data=str(latents), out=str(out), steps=2, batch_size=4), progress=False)
    return out


def test_vae_decode_undoes_the_scaling_of_encode(vae_dir):
    """decode(z) is the VAE's decoding of z / scaling factor, clamped to [-1, 1], at the VAE's resolution."""
    from ditmoe.data.vae import load_vae

    vae = load_vae(vae_dir, "cpu", scaling_factor=0.5)
    z = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    images = vae.decode(z)
    with torch.no_grad():
        expected = vae.vae.decode(z / 0.5).sample.clamp(-1, 1)
    assert images.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(images, expected)


def test_sample_cli_decodes_a_latent_model_with_the_vae_of_its_data(latent_run, vae_dir, tmp_path, monkeypatch):
    """A latent model's samples go through the VAE its training data was encoded with (the manifest names it) to
    RGB images of the data's resolution: in a grid, and in an .npz for FID."""
    from ditmoe.data.vae import Autoencoder

    decoded, decode = [], Autoencoder.decode

    def spy(self, latents):
        decoded.append((tuple(latents.shape), self.scaling_factor))
        return decode(self, latents)

    monkeypatch.setattr(Autoencoder, "decode", spy)
    common = ["sample", "--ckpt", str(latent_run), "--per-class", "2", "--steps", "ddim2"]
    assert main([*common, "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "RGB" and grid.size == (2 * (SIZE + 1) + 1, 3 * (SIZE + 1) + 1)  # 3 classes, 2 each
    assert main([*common, "--vae", str(vae_dir), "--batch-size", "4", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_0"].shape == (6, SIZE, SIZE, 3) and z["arr_1"].tolist() == [0, 0, 1, 1, 2, 2]
    latent = (4, SIZE // 2, SIZE // 2)
    assert decoded == [((6, *latent), pytest.approx(0.18215)), ((4, *latent), 0.18215), ((2, *latent), 0.18215)]
