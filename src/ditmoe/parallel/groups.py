"""Expert-parallel process groups and the slice of experts each EP rank holds.

With expert parallelism of size ``ep`` the E routed experts of a layer are split into ``ep`` consecutive blocks of
``E/ep``; EP rank ``r`` holds global experts ``r*E/ep ... (r+1)*E/ep - 1``. EP groups are consecutive world ranks
(``[0..ep-1], [ep..2ep-1], ...``), the DeepSpeed convention; the expert-data-parallel group of a rank holds the
ranks with the same EP rank in the other EP groups (they hold the same experts and reduce their gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup

from ditmoe.config import ConfigError


def check_expert_parallel_size(ep_size: int, num_experts: int, world_size: int | None = None) -> None:
    """Raise ``ConfigError`` unless ``ep_size`` >= 1 divides the expert count (and the world size when given)."""
    if ep_size < 1:
        raise ConfigError(f"expert-parallel size must be >= 1, got ep_size={ep_size}")
    if num_experts % ep_size:
        raise ConfigError(f"expert-parallel size ep_size={ep_size} must divide the number of experts {num_experts}")
    if world_size is not None and world_size % ep_size:
        raise ConfigError(f"expert-parallel size ep_size={ep_size} must divide the world size {world_size}")


@dataclass(frozen=True)
class ExpertShard:
    """Which global experts of a layer this rank holds, and the EP group that holds the others (None: no EP)."""

    num_experts: int  # global E
    ep_size: int = 1
    ep_rank: int = 0
    group: ProcessGroup | None = None

    def __post_init__(self) -> None:
        check_expert_parallel_size(self.ep_size, self.num_experts)
        if not 0 <= self.ep_rank < self.ep_size:
            raise ConfigError(f"ep_rank={self.ep_rank} out of range for ep_size={self.ep_size}")

    def __deepcopy__(self, memo: dict) -> ExpertShard:
        return self  # immutable; a process group cannot (and must not) be copied

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local

    @property
    def global_expert_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local)


def expert_shard(num_experts: int, group: ProcessGroup | None) -> ExpertShard:
    """The shard of ``num_experts`` this rank holds in ``group`` (all experts when ``group`` is None)."""
    if group is None:
        return ExpertShard(num_experts)
    return ExpertShard(num_experts, dist.get_world_size(group), dist.get_rank(group), group)


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's EP group (experts split across it) and expert-data-parallel group (same experts replicated)."""

    ep_size: int
    ep_group: ProcessGroup | None  # None when ep_size == 1
    expert_dp_group: ProcessGroup | None  # None when every rank is in one EP group

    def __deepcopy__(self, memo: dict) -> ExpertParallelGroups:
        return self


def build_expert_parallel_groups(ep_size: int, num_experts: int) -> ExpertParallelGroups:
    """Create the EP and expert-data-parallel groups over the default world. Every rank must call this, in order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    check_expert_parallel_size(ep_size, num_experts, world)
    ep_group = expert_dp_group = None
    for start in range(0, world, ep_size):
        ranks = list(range(start, start + ep_size))
        group = dist.new_group(ranks) if ep_size > 1 else None
        if rank in ranks:
            ep_group = group
    dp_size = world // ep_size
    for ep_rank in range(ep_size):
        ranks = list(range(ep_rank, world, ep_size))
        group = dist.new_group(ranks) if dp_size > 1 else None
        if rank in ranks:
            expert_dp_group = group
    return ExpertParallelGroups(ep_size, ep_group, expert_dp_group)
