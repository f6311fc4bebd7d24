"""Expert parallelism: EP process groups, the rank's expert slice, and the all-to-all MoE dispatch."""

from ditmoe.parallel.expert_parallel import all_to_all_rows, exchange_counts, expert_parallel_experts
from ditmoe.parallel.expert_state import expert_slices, local_state_dict
from ditmoe.parallel.groups import (
    ExpertParallelGroups,
    ExpertShard,
    build_expert_parallel_groups,
    check_expert_parallel_size,
    expert_shard,
)

__all__ = [
    "ExpertParallelGroups",
    "ExpertShard",
    "all_to_all_rows",
    "build_expert_parallel_groups",
    "check_expert_parallel_size",
    "exchange_counts",
    "expert_parallel_experts",
    "expert_shard",
    "expert_slices",
    "local_state_dict",
]
