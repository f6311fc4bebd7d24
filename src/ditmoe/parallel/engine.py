"""The DeepSpeed engine around a DiT-MoE whose experts DeepSpeed did not build.

DeepSpeed reduces a parameter over the expert-data-parallel group, instead of the whole data-parallel world, when
the parameter carries ``allreduce = False`` and ``group_name``; its ZeRO-1/2 optimizers partition such parameters
in their own groups. It only switches that machinery on when it finds its own ``deepspeed.moe.layer.MoE`` modules,
so ``ExpertAwareEngine`` switches it on for a model whose expert parameters are tagged (``is_expert``).
"""

from __future__ import annotations

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from torch import nn


class ExpertAwareEngine(DeepSpeedEngine):
    """A ``DeepSpeedEngine`` that treats parameters tagged ``allreduce = False`` as expert-parallel."""

    def _configure_distributed_model(self, model: nn.Module) -> None:
        super()._configure_distributed_model(model)
        if any(getattr(p, "allreduce", True) is False for p in self.module.parameters()):
            self.has_moe_layers = True
            experts = {getattr(m, "num_global_experts", None) for m in self.module.modules()} - {None}
            self.num_experts = sorted(experts)


def tag_expert_parameters(model: nn.Module, group_name: str) -> None:
    """Mark every ``is_expert`` parameter for reduction over DeepSpeed's expert-data-parallel group ``group_name``."""
    for p in model.parameters():
        if getattr(p, "is_expert", False):
            p.allreduce = False
            p.group_name = group_name


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Dense and per-expert-group parameter groups, as DeepSpeed's ZeRO expects them ("moe": True groups)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": params, "name": "dense", "weight_decay": weight_decay}
    )
    return list(groups)


def create_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict) -> ExpertAwareEngine:
    """Wrap ``model`` and ``optimizer`` (built over ``optimizer_param_groups``) in the DeepSpeed engine."""
    from deepspeed.runtime.zero import partition_parameters

    partition_parameters.shutdown_init_context()
    engine = ExpertAwareEngine(
        args=None,
        model=model,
        optimizer=optimizer,
        model_parameters=None,
        dist_init_required=False,
        config=ds_config,
        config_class=DeepSpeedConfig(ds_config),
    )
    partition_parameters.restore_init_context()
    return engine
