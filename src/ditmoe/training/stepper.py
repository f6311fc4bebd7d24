"""Forward, backward and optimizer step of one batch: plain torch for one process, the DeepSpeed engine otherwise.

Both steppers skip a step whose gradients are not finite on any rank, the same way on every rank: the torch one
checks the gradient norm, ZeRO-1/2 all-reduce their overflow flag over the whole world. A skipped step leaves the
parameters and the optimizer state untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ditmoe.training.config import TrainConfig


@dataclass
class StepResult:
    applied: bool  # False: gradients were not finite on some rank and every rank skipped the update
    grad_norm: float  # global gradient norm before clipping (inf / nan when skipped)


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch's AdamW, fused (one multi-tensor kernel for the whole update) where every parameter is a CUDA or CPU
    float tensor: the default foreach implementation issues about ten multi-tensor ops, each launched per chunk,
    which small models pay on the host every step."""
    fused = all(p.device.type in ("cuda", "cpu") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class TorchStepper:
    """AdamW on one process; ``precision="bf16"`` runs the forward under autocast with fp32 weights."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, cfg.lr, cfg.weight_decay)
        self.grad_clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.grad_accum = cfg.grad_accum
        device_type = next(model.parameters()).device.type
        bf16 = cfg.precision == "bf16"
        self.autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def forward(self, *inputs):
        with self.autocast:
            return self.module(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> StepResult:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if self.grad_clip < float("inf"):  # no scaling pass over every gradient when clipping is off (the default)
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(applied, float(norm))

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def close(self) -> None:
        """Nothing to release: the optimizer goes with its last reference."""


class DeepSpeedStepper:
    """The DeepSpeed engine (ZeRO-1/2, expert parameters reduced over their expert-data-parallel group).

    Build it after the model's weights are loaded: ZeRO copies them into its fp32 master partitions here.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, ds_config: dict, group_name: str):
        from ditmoe.parallel.ds_config import offloads_optimizer
        from ditmoe.parallel.engine import create_engine, optimizer_param_groups, tag_expert_parameters

        tag_expert_parameters(model, group_name)
        groups = optimizer_param_groups(model, cfg.weight_decay)
        if offloads_optimizer(ds_config):  # DeepSpeed refuses torch's AdamW with an offloaded optimizer
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.engine = create_engine(model, optimizer, ds_config)
        self.module = self.engine.module
        # DeepSpeed keeps bf16/fp16 weights; autocast brings the fp32 inputs and embeddings to them
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        device_type = next(self.module.parameters()).device.type
        self.autocast = torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext()

    def forward(self, *inputs):
        with self.autocast:
            return self.engine(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Scaled by 1/grad_accum inside; between accumulation boundaries DeepSpeed's step only counts."""
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()

    def step(self) -> StepResult:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return StepResult(bool(self.engine.was_step_applied()), float("nan") if norm is None else float(norm))

    def set_lr(self, lr: float) -> None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def state_dict(self) -> dict:
        return self.engine.optimizer.state_dict()

    def close(self) -> None:
        """Release the engine. ZeRO's gradient hooks sit on autograd nodes, out of the garbage collector's sight, and
        keep it, and the process groups its optimizer holds, alive otherwise (see ``leave_distributed``)."""
        self.engine.destroy()

    def load_state_dict(self, state: dict) -> None:
        """This rank's partition, saved by the same rank of a run with the same topology."""
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size()
        parts[dist.get_rank()] = state
        self.engine.optimizer.load_state_dict(parts, load_from_fp32_weights=True)
