"""Joining the process group under any launcher, and the expert-parallel groups DeepSpeed keeps.

Launchers and what they set:
    deepspeed --num_gpus N --module ditmoe.train    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
    torchrun --nproc-per-node N -m ditmoe.train     the same
    srun python -m ditmoe.train                     SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID (mapped here)
A process started by none of them is a world of one. ``leave_distributed`` is the way out.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ditmoe.parallel.groups import ExpertParallelGroups, check_expert_parallel_size
from ditmoe.parallel.launch import free_port

DEFAULT_PORT = 29500


def slurm_to_torch_env(env: dict[str, str]) -> dict[str, str]:
    """The torch.distributed variables an ``srun`` task lacks, derived from SLURM's (nothing when not under srun).

    An srun task has a step (``SLURM_STEP_ID``) of ``SLURM_STEP_NUM_TASKS`` tasks. A job's batch shell also has
    ``SLURM_PROCID`` 0 and the job's ``SLURM_NTASKS``, but no step: what it runs without srun is a world of one."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or "RANK" in env:
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    if int(world) < 2:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in env:
        out["MASTER_ADDR"] = env.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1")
    # tasks agree on a port without talking: one per job id, the same for ids 1000 apart (a job sharing the node then
    # fails to listen); slurm/train_16b.sh sets MASTER_PORT to a port free on the node instead
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
    return out


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank in the world, its device, and its expert-parallel groups."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    groups: ExpertParallelGroups
    group_name: str  # DeepSpeed's name for the expert groups, tagged on expert parameters ("ep_size_2")

    @property
    def ep_rank(self) -> int:
        return self.rank % self.groups.ep_size

    @property
    def expert_dp_rank(self) -> int:
        return self.rank // self.groups.ep_size

    def __deepcopy__(self, memo: dict) -> DistContext:
        return self


def single_process(device: str | None = None) -> DistContext:
    """A world of one without a process group (plain torch training)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return DistContext(0, 1, 0, dev, ExpertParallelGroups(1, None, None), group_name="")


def launched_world_size(env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    env.update(slurm_to_torch_env(env))
    return int(env.get("WORLD_SIZE", "1"))


def import_before_joining() -> None:
    """Import the modules that bind the world group as a default argument (``group=GroupMember.WORLD``) at import.

    torch.distributed.nn.functional (ten collectives; torch._dynamo imports it, e.g. through the optimizer) and
    DeepSpeed's ``TorchBackend.barrier``: imported after the world exists, they hold its group, and its threads,
    past ``destroy_process_group`` (see ``leave_distributed``). Call before joining; later calls cost nothing.
    """
    import torch.distributed.nn.functional  # noqa: F401

    if importlib.util.find_spec("deepspeed") is not None:  # plain gloo ranks (run_local_ranks) run without it
        import deepspeed.comm.torch  # noqa: F401


def init_distributed(ep_size: int, num_experts: int, *, timeout_s: float = 1800.0) -> DistContext:
    """Join the world set up by the launcher (or the one a caller already initialised) and build DeepSpeed's EP groups.

    gloo on CPU, nccl on CUDA. Raises ``ConfigError`` when ``ep_size`` does not divide the experts or the world.
    """
    import deepspeed
    from deepspeed.utils import groups as ds_groups

    import_before_joining()
    os.environ.update(slurm_to_torch_env(dict(os.environ)))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    world = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    check_expert_parallel_size(ep_size, num_experts, world)
    if not dist.is_initialized() and "MASTER_ADDR" not in os.environ:  # a world of one: no launcher
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(
        dist_backend="nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
    )
    name = f"ep_size_{ep_size}"
    ds_groups._create_expert_and_data_parallel(ep_size)
    ep_group = ds_groups._get_expert_parallel_group(name) if ep_size > 1 else None
    groups = ExpertParallelGroups(ep_size, ep_group, ds_groups._get_expert_data_parallel_group(name))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, groups, name)


def leave_distributed() -> None:
    """Destroy every process group and drop DeepSpeed's references to them, so their threads end now.

    A group still referenced when the interpreter exits keeps its gloo threads running while the process tears
    down, which now and then aborts a rank that finished its work ("terminate called without an active
    exception"). Call it after the last collective (after ``DeepSpeedStepper.close``); a no-op without a world.
    """
    if not dist.is_initialized():
        return
    dist.destroy_process_group()
    ds_groups = sys.modules.get("deepspeed.utils.groups")  # DeepSpeed keeps its groups in module-level registries
    for name, value in list(vars(ds_groups).items() if ds_groups else ()):
        if isinstance(value, dict) and any(isinstance(v, dist.ProcessGroup) for v in value.values()):
            value.clear()
        elif isinstance(value, dist.ProcessGroup):
            setattr(ds_groups, name, None)
    gc.collect()
