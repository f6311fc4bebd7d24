"""Expert specialisation analysis: counting routed choices by class and noise level, and ``ditmoe analyze``."""

from __future__ import annotations

import json
import subprocess
import sys

import matplotlib.axes
import matplotlib.colors
import numpy as np
import pytest
import torch
from PIL import Image

from ditmoe.analysis.heatmap import choice_heatmaps, level_names, utilisation_heatmap
from ditmoe.analysis.specialisation import ExpertChoices, count_expert_choices
from ditmoe.cli import main
from ditmoe.config import model_config
from ditmoe.data.digits import prepare_digits
from ditmoe.diffusion import create_diffusion
from ditmoe.models.dit import DiTMoE
from ditmoe.training.config import train_config
from ditmoe.training.loop import train


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, num_classes=5)
    return DiTMoE(cfg).eval()


@pytest.mark.parametrize("kind", ["ddpm", "rf"])
def test_noised_levels_span_clean_to_noise(kind):
    diffusion = create_diffusion(kind, learn_sigma=False)
    x0 = torch.randn(3, 2, 4, 4)
    level = torch.tensor([0.0, 0.5, 1.0])
    x_t, t = diffusion.noised(x0, level, generator=torch.Generator().manual_seed(0))
    assert x_t.shape == x0.shape
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    if kind == "ddpm":
        assert t.tolist() == [0, 500, 999]  # round(level * 999)
        assert torch.equal(x_t, diffusion.q_sample(x0, t, noise))
    else:
        assert t.tolist() == [0.0, 0.5, 1.0]
        assert torch.equal(x_t[0], x0[0]) and torch.allclose(x_t[2], noise[2])


@pytest.mark.parametrize("kind", ["ddpm", "rf"])
def test_counts_are_the_routers_choices(kind):
    """One image, three buckets: bucket b counts exactly the experts its tokens chose per layer at a noise level
    drawn inside [b/3, (b+1)/3), and its class the sum over buckets; everything else stays zero."""
    model, diffusion = tiny_model(), create_diffusion(kind, learn_sigma=False)
    cfg = model.cfg
    x0, y = torch.randn(1, cfg.in_channels, 8, 8), torch.tensor([3])
    got = count_expert_choices(model, diffusion, x0, y, level_buckets=3, seed=7, progress=False)

    gen = torch.Generator().manual_seed(7)  # replays the draws: per bucket, level, then noise
    E, wants, edges = cfg.moe.num_experts, [], np.linspace(0, 1, 4)
    for b in range(3):
        level = edges[b] + (edges[b + 1] - edges[b]) * torch.rand(1, generator=gen, dtype=torch.float64)
        x_t, t = diffusion.noised(x0, level.float(), generator=gen)
        with torch.no_grad():
            routing = model(x_t, t, y).routing
        wants.append(np.stack([np.bincount(r.experts_BLK.flatten().numpy(), minlength=E) for r in routing]))
        assert np.array_equal(got.by_level_LBE[:, b], wants[b]), b
    assert not np.array_equal(wants[0], wants[2])  # the levels matter to the router here
    assert np.array_equal(got.by_class_LCE[:, 3], sum(wants))
    assert got.by_class_LCE[:, [0, 1, 2, 4]].sum() == 0


def test_count_totals_and_shares():
    model, diffusion = tiny_model(), create_diffusion("ddpm", learn_sigma=False)
    cfg = model.cfg
    N, levels = 11, 4
    x, y = torch.randn(N, cfg.in_channels, 8, 8), torch.arange(N) % 4  # class 4 never appears
    got = count_expert_choices(model, diffusion, x, y, level_buckets=levels, batch_size=4, progress=False)
    L, tokens, K = cfg.depth, cfg.num_tokens, cfg.moe.top_k
    assert got.by_class_LCE.shape == (L, 5, cfg.moe.num_experts) and got.by_level_LBE.shape[:2] == (L, levels)
    assert (got.by_level_LBE.sum((1, 2)) == N * levels * tokens * K).all()
    assert (got.by_level_LBE.sum(2) == N * tokens * K).all()  # every image once per bucket
    assert np.array_equal(got.by_class_LCE.sum(2)[0], [3 * levels * tokens * K] * 3 + [2 * levels * tokens * K, 0])
    shares = ExpertChoices.shares(got.by_class_LCE)
    assert np.allclose(shares[:, :4].sum(-1), 1.0) and (shares[:, 4] == 0).all()
    assert np.array_equal(got.level_edges, np.linspace(0, 1, levels + 1)) and got.images == N
    again = count_expert_choices(model, diffusion, x, y, level_buckets=levels, batch_size=4, progress=False)
    assert np.array_equal(again.by_class_LCE, got.by_class_LCE)  # same seed, same counts
    assert len(got.most_specialised()) == L


def test_most_specialised_is_the_highest_lift():
    """Lift, not share: in layer 1 every class sends most choices to expert 0, but class 2 sends 40% to expert 1,
    which the layer picks 1/6 of the time. A class without images (3) never wins."""
    counts = np.array(
        [
            [[50, 50], [90, 10], [50, 50], [0, 0]],  # overall [190, 110]: class 1 at 0.9 / (190/300) = 1.42
            [[95, 5], [95, 5], [60, 40], [0, 0]],  # overall [250, 50]: class 2 at 0.4 / (50/300) = 2.4
        ]
    )
    choices = ExpertChoices(counts, np.zeros((2, 1, 2), dtype=np.int64), np.array([0.0, 1.0]), images=3)
    assert choices.most_specialised() == [
        (1, 0, pytest.approx(0.9), pytest.approx(190 / 300)),
        (2, 1, pytest.approx(0.4), pytest.approx(50 / 300)),
    ]


def test_count_rejects_bad_input():
    model, diffusion = tiny_model(), create_diffusion("ddpm", learn_sigma=False)
    x = torch.randn(2, model.cfg.in_channels, 8, 8)
    with pytest.raises(ValueError, match=r"\[7\]"):
        count_expert_choices(model, diffusion, x, torch.tensor([1, 7]), progress=False)
    with pytest.raises(ValueError, match="level_buckets"):
        count_expert_choices(model, diffusion, x, torch.tensor([1, 2]), level_buckets=0, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    prepare_digits(root / "data", image_size=16, shard_size=400)
    train(train_config("digits-smoke", data=str(root / "data"), out=str(root / "run"), steps=2), progress=False)
    return root


def spy_on_imshow(monkeypatch) -> list[tuple[matplotlib.axes.Axes, np.ndarray]]:
    """(axes, array) of every ``Axes.imshow`` call from now on, in call order."""
    shown, real_imshow = [], matplotlib.axes.Axes.imshow
    monkeypatch.setattr(
        matplotlib.axes.Axes, "imshow", lambda ax, X, **kw: shown.append((ax, np.array(X))) or real_imshow(ax, X, **kw)
    )
    return shown


def test_analyze_cli_writes_heatmaps_and_counts(run, tmp_path, capsys, monkeypatch):
    out, shown = tmp_path / "ana", spy_on_imshow(monkeypatch)
    argv = ["analyze", "--ckpt", str(run / "run"), "--data", str(run / "data"), "--max-images", "30"]
    assert main([*argv, "--levels", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "routed 30 val images x 3 noise levels" in text
    saved = json.loads((out / "expert_choices.json").read_text())
    by_class, by_level = np.array(saved["by_class_LCE"]), np.array(saved["by_level_LBE"])
    assert by_class.shape[1] == 10 and by_level.shape[1] == 3 and saved["images"] == 30
    assert (by_class.sum((1, 2)) == by_level.sum((1, 2))).all()
    for name in ("experts_by_class.png", "experts_by_noise_level.png"):
        assert Image.open(out / name).size[0] > 300
    # the panels plot each row's share of its choices per expert: by class, then by noise level, layer by layer
    L = by_class.shape[0]
    assert len(shown) == 2 * L
    for layer in range(L):
        for (_, panel), counts in ((shown[layer], by_class[layer]), (shown[L + layer], by_level[layer])):
            tokens = counts.sum(-1, keepdims=True)
            want = np.where(tokens > 0, counts / np.maximum(tokens, 1), np.nan)  # no images of a class: masked
            assert np.allclose(panel, want, equal_nan=True)
    choices = ExpertChoices(by_class, by_level, np.array(saved["level_edges"]), saved["images"])
    for layer, (c, e, share, avg) in enumerate(choices.most_specialised()):
        assert (
            f"layer {layer:2d}: class {c} sends {share:.0%} of its choices to expert {e} (layer average {avg:.0%})"
            in text
        )


def test_class_heatmap_stays_readable_at_1000_classes(tmp_path, monkeypatch):
    """ImageNet-sized, 12 layers x 1000 classes: each panel shows its layer's 20 classes of highest lift, labelled,
    most specialised first, and the PNG stays a readable size (it was 1715 x 72,963 px)."""
    shown = spy_on_imshow(monkeypatch)
    rng = np.random.default_rng(0)
    counts = rng.integers(50, 150, size=(12, 1000, 8))
    counts[5, 777] = [0, 0, 0, 0, 0, 0, 0, 1000]  # class 777 uses only expert 7 in layer 5: the top lift there
    counts[:, 4] = 0  # a class without images
    path = choice_heatmaps(
        counts, tmp_path / "c.png", row_label="class", row_names=[str(c) for c in range(1000)], title="t"
    )
    width, height = Image.open(path).size
    assert width < 2500 and height < 2500
    top = np.argsort(-ExpertChoices.lift(counts).max(-1), axis=1, kind="stable")[:, :20]
    assert top[5, 0] == 777 and 4 not in top
    assert len(shown) == 12
    for layer, (ax, panel) in enumerate(shown):
        assert np.allclose(panel, ExpertChoices.shares(counts[layer, top[layer]]))
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(c) for c in top[layer]]
    assert "20 of 1000" in shown[0][0].figure.get_suptitle()


def test_classes_without_images_are_grey_and_named(run, tmp_path, capsys, monkeypatch):
    """A class with no images has no share to draw: its row is NaN (grey), not a row of 0s ("uses no expert"), and
    both the figure and analyze's output name it."""
    shown = spy_on_imshow(monkeypatch)
    argv = ["analyze", "--ckpt", str(run / "run"), "--data", str(run / "data"), "--max-images", "4", "--levels", "1"]
    assert main([*argv, "--out", str(tmp_path / "ana")]) == 0
    saved = json.loads((tmp_path / "ana" / "expert_choices.json").read_text())
    missing = [c for c, n in enumerate(np.array(saved["by_class_LCE"]).sum((0, 2))) if n == 0]
    assert len(missing) >= 6  # 4 images, 10 classes
    names = ", ".join(map(str, missing))
    assert f"no val images of class {names}: their rows in experts_by_class.png are grey" in capsys.readouterr().out
    ax, panel = shown[0]
    assert np.isnan(panel[missing]).all() and np.isfinite(np.delete(panel, missing, axis=0)).all()
    assert ax.images[0].cmap.get_bad() == pytest.approx(matplotlib.colors.to_rgba("lightgrey"))
    assert f"grey: no tokens from class {names}" in ax.figure.get_suptitle()


def test_analyze_cli_bad_input_is_one_clear_line(run, tmp_path, capsys):
    base = ["analyze", "--ckpt", str(run / "run"), "--out", str(tmp_path / "a")]
    other = tmp_path / "digits8"
    prepare_digits(other, image_size=8)
    assert main([*base, "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "(1, 8, 8)" in err and "(1, 16, 16)" in err and err.count("\n") == 0
    for flag, value in (("--max-images", "0"), ("--batch-size", "0"), ("--levels", "-1")):
        assert main([*base, "--data", str(run / "data"), flag, value]) == 2
        assert f"{flag} must be at least 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing written on bad input


@pytest.mark.parametrize("levels", [1, 3, 10, 20, 30, 100, 101, 3000])
def test_noise_level_names_tell_the_buckets_apart(levels):
    names = level_names(np.linspace(0, 1, levels + 1))
    assert len(set(names)) == levels and float(names[0].split("-")[0]) == 0 and float(names[-1].split("-")[1]) == 1
    assert level_names(np.linspace(0, 1, 11))[:2] == ["0.0-0.1", "0.1-0.2"]  # ten buckets as before


@pytest.mark.parametrize(
    ("levels", "names"),
    [
        (4, ["0.00-0.25", "0.25-0.50", "0.50-0.75", "0.75-1.00"]),
        (8, ["0.000-0.125", "0.125-0.250", "0.250-0.375", "0.375-0.500"]),  # first four of eight
        (6, ["0.000-0.167", "0.167-0.333", "0.333-0.500", "0.500-0.667"]),  # sixths: no exact decimals, three
        (10, ["0.0-0.1", "0.1-0.2", "0.2-0.3", "0.3-0.4"]),
        (20, ["0.00-0.05", "0.05-0.10", "0.10-0.15", "0.15-0.20"]),
    ],
)
def test_noise_level_names_write_the_edges(levels, names):
    assert level_names(np.linspace(0, 1, levels + 1))[:4] == names


def test_plotting_leaves_the_matplotlib_backend_alone(tmp_path):
    """A notebook's backend survives importing the training loop and the demo and drawing heatmaps (no pyplot)."""
    code = f"""
import sys, matplotlib
matplotlib.use("svg")
import ditmoe.training.loop, ditmoe.demo
from ditmoe.analysis.heatmap import utilisation_heatmap
utilisation_heatmap([[0.5, 0.5]], {str(tmp_path / "u.png")!r})
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert "matplotlib.pyplot" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "u.png").is_file()


def test_utilisation_numbers_are_readable_on_their_cells(tmp_path, monkeypatch):
    """White numbers on dark cells, black on light ones, wherever the share sits relative to 1/E."""
    written = []
    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "text",
        lambda ax, x, y, s, **kw: written.append((s, kw["color"])) or real_text(ax, x, y, s, **kw),
    )
    fractions = [[1.0, 0, 0, 0, 0, 0, 0, 0], [0.14, 0.13, 0.13, 0.12, 0.12, 0.12, 0.12, 0.12]]  # viridis, vmax 1
    utilisation_heatmap(np.array(fractions), tmp_path / "u.png")
    assert len(written) == 16 and written[0] == ("1.00", "k")  # bright yellow
    assert {colour for _, colour in written[1:]} == {"w"}  # dark purple, also 0.14 and 0.13 above 1/E = 0.125
