"""A training step's forward and backward never make the host wait for the GPU.

Ops that read a device value back to the host (``.item()``, ``nonzero``, ``torch.bincount`` sizing its output, boolean
indexing...) stall the CPU until the GPU has caught up; it then issues the next kernels to an idle GPU. So does a
tensor made from host data inside the step (``torch.from_numpy``, ``torch.tensor``): moving it to the GPU is a
blocking copy. Small models are bound by the host's issue rate, so one such op per layer costs throughput. The check
records every aten op of a step after the first (which may build caches; any device: on CPU the Triton path runs in
the interpreter); on CUDA, ``torch.cuda.set_sync_debug_mode`` also catches waits inside kernels' host code.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditmoe.config import model_config
from ditmoe.diffusion import create_diffusion
from ditmoe.models.dit import DiTMoE
from ditmoe.training.config import TrainConfig
from ditmoe.training.loop import train_step
from ditmoe.training.stepper import TorchStepper

HOST_READS = {
    "aten._local_scalar_dense",  # .item(), int(t), float(t)
    "aten.is_nonzero",  # bool(t)
    "aten.equal",
    "aten.nonzero",
    "aten.masked_select",
    "aten.bincount",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.lift_fresh",  # a tensor made from host data (torch.tensor, torch.from_numpy): on CUDA, a blocking copy
}


class HostReadLog(TorchDispatchMode):
    """Records the ops of ``HOST_READS`` and boolean-mask indexing (which runs ``nonzero``)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        masks = args[1] if name in ("aten.index", "aten.index_put", "aten.index_put_") else ()
        if name in HOST_READS or any(m is not None and m.dtype == torch.bool for m in masks):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("diffusion_kind, capacity_factor", [("ddpm", None), ("ddpm", 1.0), ("rf", None)])
def test_training_step_reads_nothing_back_from_the_device(diffusion_kind, capacity_factor):
    """The trainer's forward + backward (``train_step``: label dropout, diffusion inputs, model, losses), Triton MoE
    path; bf16 autocast on CUDA as users train. The optimizer step after it decides on the host whether to skip a
    non-finite update: one wait per step, by design, not checked here."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    moe = {"backend": "triton", "capacity_factor": capacity_factor}
    cfg = model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, num_classes=5, moe=moe)
    torch.manual_seed(0)
    model = DiTMoE(cfg).to(device)
    stepper = TorchStepper(model, TrainConfig(precision="bf16" if device.type == "cuda" else "fp32"))
    diffusion = create_diffusion(diffusion_kind, learn_sigma=cfg.learn_sigma)
    gen = torch.Generator(device).manual_seed(0)
    x0, y = torch.randn(4, 1, 8, 8, device=device), torch.tensor([0, 1, 2, 3], device=device)
    for step in range(2):  # the first step compiles kernels and fills caches; the second is checked
        log = HostReadLog()
        catch_waits = _sync_debug_errors() if step and device.type == "cuda" else contextlib.nullcontext()
        with log, catch_waits:
            out = train_step(stepper, diffusion, x0, y, gen)
    assert log.reads == [], f"host reads in a training step: {log.reads}"
    kept = out.routing[0].tokens_per_expert_E.sum() + out.routing[0].dropped
    assert kept == x0.shape[0] * 16 * cfg.moe.top_k  # 16 tokens per image: every pair kept or dropped
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _sync_debug_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
