"""Presets, parameter counts against the paper's table, and clear errors for bad configuration."""

import pytest

from ditmoe.analysis.model_size import model_size
from ditmoe.cli import main
from ditmoe.config import ConfigError, model_config
from ditmoe.models.dit import DiTMoE


def test_s2_8e2a_has_exactly_the_official_parameter_count():
    assert model_size(model_config("DiT-MoE-S/2-8E2A")).total_params == 199_307_552


# (preset, total, activated, GFLOPs) from the paper's Table 1; counts there are truncated to the shown digits.
TABLE = [
    ("DiT-MoE-S/2-8E2A", 199e6, 71e6, 15.43),
    ("DiT-MoE-S/2-16E2A", 369e6, 71e6, 15.44),
    ("DiT-MoE-B/2-8E2A", 795e6, 286e6, 61.68),
    ("DiT-MoE-L/2-8E2A", 2.8e9, 1.0e9, 219.26),
    ("DiT-MoE-XL/2-8E2A", 4.1e9, 1.5e9, 323.74),
    ("DiT-MoE-G/2-16E2A", 16.5e9, 3.1e9, 690.94),
]


@pytest.mark.parametrize("name,total,active,gflops", TABLE)
def test_paper_table(name, total, active, gflops):
    s = model_size(model_config(name))
    assert s.total_params == pytest.approx(total, rel=0.03)
    assert s.activated_params == pytest.approx(active, rel=0.04)
    assert round(s.paper_gflops, 2) == gflops


def test_any_expert_count_parses():
    cfg = model_config("DiT-MoE-B/4-64E8A")
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.patch_size, cfg.hidden_size) == (64, 8, 4, 768)


def test_xl_and_g_use_qk_norm():
    assert model_config("DiT-MoE-XL/2-8E2A").qk_norm and not model_config("DiT-MoE-S/2-8E2A").qk_norm


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(name="DiT-MoE-Huge/2-8E2A"), "'Huge'"),
        (dict(name="ResNet-50"), "'ResNet-50'"),
        (dict(name="DiT-MoE-S/2-8E2A", num_heads=5), "384 is not divisible by num_heads 5"),
        (dict(name="DiT-MoE-S/2-8E2A", image_size=260), "image size 260 is not divisible by 8"),
        (dict(name="DiT-MoE-S/4-8E2A", image_size=18, latent=False), "input size 18 is not divisible by patch size 4"),
        (dict(name="DiT-MoE-S/2-4E5A"), "top_k=5"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(balance_loss_alpha=-0.1)), "-0.1"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(capacity_factor=0)), "capacity_factor"),
        (dict(name="DiT-MoE-S/2-8E2A", depthh=3), "depthh"),
        (dict(name="DiT-MoE-S/2-8E2A", image_size=-16), "image size must be >= 1, got -16"),
        (dict(name="DiT-MoE-S/0-8E2A", image_size=32, latent=False), "patch_size must be >= 1, got 0"),
        (dict(name="DiT-MoE-S/2-8E2A", num_heads=0), "num_heads must be >= 1, got 0"),
        (dict(name="DiT-MoE-S/2-8E2A", depth=0), "depth must be >= 1, got 0"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(mlp_ratio=0.001)), "mlp_ratio 0.001 x hidden_size 384"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(shared_expert_ratio=0.001)), "shared_expert_ratio 0.001"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=5), "moe must be a mapping of MoEConfig fields to values, got 5"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(num_experts="abc")), "num_experts must be an int, got 'abc'"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(top_k=2.0)), "top_k must be an int, got 2.0"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(capacity_factor="1.5")), "must be a float or None, got '1.5'"),
        (dict(name="DiT-MoE-S/2-8E2A", moe=dict(expert_act="relu")), "one of 'swiglu', 'gelu', got 'relu'"),
        (dict(name="DiT-MoE-S/2-8E2A", qk_norm="yes"), "qk_norm must be a bool, got 'yes'"),
        (dict(name="DiT-MoE-S/2-8E2A", depth=True), "depth must be an int, got True"),
    ],
)
def test_bad_model_config_names_the_value(kwargs, needle):
    kwargs = dict(kwargs)
    name = kwargs.pop("name")
    with pytest.raises(ConfigError) as e:
        model_config(name, **kwargs)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_model_options_take_ints_for_floats_and_none_where_optional():
    cfg = model_config("DiT-MoE-S/2-8E2A", class_dropout_prob=0, moe=dict(mlp_ratio=2, capacity_factor=None))
    assert (cfg.class_dropout_prob, cfg.moe.mlp_ratio, cfg.moe.capacity_factor) == (0, 2, None)


def test_info_command(capsys):
    assert main(["info", "--model", "DiT-MoE-S/2-8E2A", "--image-size", "256"]) == 0
    out = capsys.readouterr().out
    assert "199,307,552" in out and "15.43" in out
    # the demo's model sees 16 px digits themselves, 1 channel, 10 classes
    demo_argv = ["--model", "DiT-MoE-tiny/4-4E2A", "--image-size", "16", "--pixels", "--num-classes", "10"]
    assert main(["info", *demo_argv]) == 0
    out = capsys.readouterr().out
    assert "pixels 16x16x1, 16 tokens" in out
    demo = model_config("DiT-MoE-tiny/4-4E2A", image_size=16, latent=False, num_classes=10)
    assert f"{sum(p.numel() for p in DiTMoE(demo).parameters()):,} total" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "DiT-MoE-Z/2-8E2A"], "'Z'"),
        (["--model", "DiT-MoE-S/2-8E2A", "--image-size", "-16"], "image size must be >= 1, got -16"),
        (["--model", "DiT-MoE-S/0-8E2A"], "patch_size must be >= 1, got 0"),
        (
            ["--model", "DiT-MoE-tiny/4-4E2A", "--image-size", "16"],
            "image size 16 gives SD-VAE latents of 2x2 (image size / 8), not divisible by patch size 4",
        ),
        (["--model", "DiT-MoE-tiny/4-4E2A", "--pixels", "--in-channels", "0"], "in_channels must be >= 1, got 0"),
    ],
)
def test_info_command_bad_input_is_one_clear_line(capsys, args, needle):
    assert main(["info", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err
