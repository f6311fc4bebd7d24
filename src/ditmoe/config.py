"""Model configuration dataclasses and the preset registry.

Preset names follow the paper: ``DiT-MoE-{size}/{patch}-{E}E{A}A``, e.g. ``DiT-MoE-S/2-8E2A`` is the S backbone
with patch 2, 8 routed experts and 2 active per token. Any E and A parse; sizes come from ``SIZES``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

# size -> (depth, hidden, heads, qk_norm). XL and G were trained with the qk-norm flash-attention block.
SIZES: dict[str, tuple[int, int, int, bool]] = {
    "S": (12, 384, 6, False),
    "B": (12, 768, 12, False),
    "L": (24, 1024, 16, False),
    "XL": (28, 1152, 16, True),
    "G": (40, 1408, 16, True),
    # Small backbones for the CPU demo and tests.
    "tiny": (4, 64, 4, False),
    "micro": (2, 32, 2, False),
}

_PRESET_RE = re.compile(r"^DiT-MoE-(?P<size>[A-Za-z]+)/(?P<patch>\d+)-(?P<experts>\d+)E(?P<active>\d+)A$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value."""


def _fits(value: object, hint: object) -> bool:
    """Whether value has a field's type: one of a Literal's values, any member of a union, an int for a float."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def _describe(hint: object) -> str:
    """A field type in words: 'an int', 'a float or None', "one of 'swiglu', 'gelu'"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return "an int" if hint is int else f"a {hint.__name__}"


def _check_types(cfg: object) -> None:
    """ConfigError naming the first field of a config dataclass whose value does not have the field's type."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        value = getattr(cfg, name)
        if not _fits(value, hint):
            raise ConfigError(f"{name} must be {_describe(hint)}, got {value!r}")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 8
    top_k: int = 2
    mlp_ratio: float = 4.0  # routed expert intermediate = mlp_ratio * hidden
    shared_expert_ratio: float = 2.0  # shared expert intermediate = ratio * hidden ("2 shared experts"); 0 = none
    expert_act: Literal["swiglu", "gelu"] = "swiglu"
    norm_topk_prob: bool = False  # official: top-k weights are not renormalised (and never at top_k=1)
    balance_loss_alpha: float = 0.01  # official code default; the paper's ablation found 0.005 best
    balance_loss_type: Literal["expert", "sequence"] = "expert"
    router_z_loss: float = 0.0
    capacity_factor: float | None = None  # None = dropless
    # auto: triton on CUDA, torch reference on CPU; naive: the official per-expert loop (a baseline)
    backend: Literal["auto", "torch", "triton", "naive"] = "auto"

    def validate(self) -> None:
        _check_types(self)
        if self.num_experts < 1:
            raise ConfigError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k must be in [1, num_experts={self.num_experts}], got top_k={self.top_k}")
        if self.balance_loss_alpha < 0:
            raise ConfigError(f"balance_loss_alpha must be >= 0, got {self.balance_loss_alpha}")
        if self.router_z_loss < 0:
            raise ConfigError(f"router_z_loss must be >= 0, got {self.router_z_loss}")
        if self.shared_expert_ratio < 0:
            raise ConfigError(f"shared_expert_ratio must be >= 0, got {self.shared_expert_ratio}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"capacity_factor must be > 0 or None (dropless), got {self.capacity_factor}")

    def expert_width(self, hidden_size: int) -> int:
        """Intermediate width F of each routed expert."""
        return int(self.mlp_ratio * hidden_size)

    def shared_width(self, hidden_size: int) -> int:
        """Intermediate width of the shared expert (0: none)."""
        return int(self.shared_expert_ratio * hidden_size)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "DiT-MoE-S/2-8E2A"
    input_size: int = 32  # spatial size the model sees (latent size for latent models)
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    qk_norm: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def validate(self) -> None:
        _check_types(self)
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"input size {self.input_size} is not divisible by patch size {self.patch_size}")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos position embedding)")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        self.moe.validate()
        if self.moe.expert_width(self.hidden_size) < 1:
            raise ConfigError(
                f"mlp_ratio {self.moe.mlp_ratio} x hidden_size {self.hidden_size} leaves the routed experts no width"
            )
        if self.moe.shared_expert_ratio > 0 and self.moe.shared_width(self.hidden_size) < 1:
            raise ConfigError(
                f"shared_expert_ratio {self.moe.shared_expert_ratio} x hidden_size {self.hidden_size} leaves the "
                "shared expert no width (0 turns it off)"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        moe = MoEConfig(**d.pop("moe", {}))
        return cls(moe=moe, **d)


def model_config(
    name: str,
    *,
    image_size: int = 256,
    latent: bool = True,
    in_channels: int | None = None,
    num_classes: int = 1000,
    moe: dict | None = None,
    **overrides,
) -> ModelConfig:
    """Build a validated ModelConfig from a preset name.

    ``latent=True`` means the model sees SD-VAE latents: 4 channels at image_size / 8.
    ``moe`` overrides fields of MoEConfig; other keyword overrides replace ModelConfig fields.
    """
    m = _PRESET_RE.match(name)
    if m is None:
        sizes = ",".join(SIZES)
        raise ConfigError(f"unknown model preset {name!r}; expected DiT-MoE-{{{sizes}}}/{{2,4,8}}-{{E}}E{{A}}A")
    size = m["size"]
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r} in preset {name!r}; known sizes: {', '.join(SIZES)}")
    depth, hidden, heads, qk_norm = SIZES[size]
    if image_size < 1:
        raise ConfigError(f"image size must be >= 1, got {image_size}")
    if latent:
        if image_size % 8:
            raise ConfigError(f"image size {image_size} is not divisible by 8 (the SD-VAE downsampling factor)")
        input_size, channels = image_size // 8, 4
    else:
        input_size, channels = image_size, 1
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"moe must be a mapping of MoEConfig fields to values, got {moe!r}")
    moe_fields = {"num_experts": int(m["experts"]), "top_k": int(m["active"]), **(moe or {})}
    unknown = set(moe_fields) - {f.name for f in dataclasses.fields(MoEConfig)}
    if unknown:
        raise ConfigError(f"unknown MoE option(s): {', '.join(sorted(unknown))}")
    moe_cfg = MoEConfig(**moe_fields)
    fields = dict(
        name=name,
        input_size=input_size,
        patch_size=int(m["patch"]),
        in_channels=in_channels if in_channels is not None else channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        num_classes=num_classes,
        qk_norm=qk_norm,
        moe=moe_cfg,
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    fields.update(overrides)
    patch = fields["patch_size"]
    if latent and "input_size" not in overrides and isinstance(patch, int) and patch >= 1 and input_size % patch:
        raise ConfigError(
            f"image size {image_size} gives SD-VAE latents of {input_size}x{input_size} (image size / 8), "
            f"not divisible by patch size {patch}"
        )
    cfg = ModelConfig(**fields)
    cfg.validate()
    return cfg
