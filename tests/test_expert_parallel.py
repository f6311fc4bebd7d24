"""Expert parallelism on local gloo ranks equals the single-process MoE layer and model, forward and backward.

Every distributed check runs in spawned processes under a deadline (``run_local_ranks``): a hang fails the test.
The ranks of one world size run all their cases in one launch (a module fixture); the tests compare the results.
Each rank builds the single-process reference from the same seed, so references and EP runs share global weights;
the global batch is split over the ranks, and replicated parameters' gradients are summed over the world (as data
parallelism would), expert gradients over the expert-data-parallel group.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from ditmoe.config import ConfigError, MoEConfig, model_config
from ditmoe.models.dit import DiTMoE
from ditmoe.models.moe import MoEFeedForward, StackedExperts
from ditmoe.parallel import (
    ExpertParallelGroups,
    ExpertShard,
    build_expert_parallel_groups,
    check_expert_parallel_size,
    local_state_dict,
)
from ditmoe.parallel.launch import RankFailure, run_local_ranks

TOL = {"atol": 2e-5, "rtol": 1e-4}
D, L, B_PER_RANK = 16, 5, 2


def _reduce_grads(model: torch.nn.Module, groups: ExpertParallelGroups) -> dict[str, torch.Tensor]:
    """Gradients summed as data parallelism would: experts over their replicas, everything else over the world."""
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad.clone()
        if getattr(p, "is_expert", False):
            if groups.expert_dp_group is not None:
                dist.all_reduce(g, group=groups.expert_dp_group)
        else:
            dist.all_reduce(g)
        grads[name] = g
    return grads


def _reference_grads(ref: torch.nn.Module, ep: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The single-process gradients, cut to the experts ``ep`` holds."""
    return local_state_dict(ep, {name: p.grad for name, p in ref.named_parameters() if p.requires_grad})


def _skew_router(layer: MoEFeedForward) -> None:
    """Send every positive input to the last two experts (held by the last EP rank of two)."""
    E = layer.cfg.num_experts
    with torch.no_grad():
        w = torch.full((E, layer.router.in_features), -1.0)
        w[E - 2], w[E - 1] = 1.0, 0.5
        layer.router.weight.copy_(w / layer.router.in_features)


def _layer_case(rank: int, world: int, cfg: MoEConfig, groups: ExpertParallelGroups, skew: bool = False) -> dict:
    torch.manual_seed(0)
    ref = MoEFeedForward(D, cfg)
    x_all = torch.randn(world * B_PER_RANK, L, D)
    probe_all = torch.randn_like(x_all)
    torch.manual_seed(0)
    ep = MoEFeedForward(D, cfg, groups.ep_group)
    same_init = {k: torch.equal(v, ep.state_dict()[k]) for k, v in local_state_dict(ep, ref.state_dict()).items()}
    if skew:
        x_all = x_all.abs() + 0.1
        _skew_router(ref)
        ep.load_state_dict(local_state_dict(ep, ref.state_dict()))

    x_ref = x_all.clone().requires_grad_(True)
    out_ref = ref(x_ref)
    (out_ref.out_BLD * probe_all).sum().backward()

    mine = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
    x = x_all[mine].clone().requires_grad_(True)
    out = ep(x)
    (out.out_BLD * probe_all[mine]).sum().backward()
    counts_E = out.stats.tokens_per_expert_E.clone()
    dist.all_reduce(counts_E)
    return {
        "same_init": same_init,
        "local_experts": list(ep.experts.global_expert_ids),
        "expert_rows": ep.experts.gate_up_proj.shape[0] if cfg.expert_act == "swiglu" else ep.experts.fc1.shape[0],
        "out": (out_ref.out_BLD[mine].detach(), out.out_BLD.detach()),
        "x_grad": (x_ref.grad[mine], x.grad),
        "tokens_per_expert": (out_ref.stats.tokens_per_expert_E, counts_E),
        "local_tokens_per_expert": out.stats.tokens_per_expert_E,
        "grads": (_reference_grads(ref, ep), _reduce_grads(ep, groups)),
    }


def _dit_case(rank: int, world: int, groups: ExpertParallelGroups) -> dict:
    cfg = model_config("DiT-MoE-micro/2-4E2A", image_size=8, latent=False, num_classes=5)
    torch.manual_seed(1)
    ref = DiTMoE(cfg)
    torch.manual_seed(1)
    ep = DiTMoE(cfg, ep_group=groups.ep_group)
    same_init = all(torch.equal(v, ep.state_dict()[k]) for k, v in local_state_dict(ep, ref.state_dict()).items())
    with torch.no_grad():  # leave the zero init (adaLN-Zero) so every parameter gets a gradient
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ep.load_state_dict(local_state_dict(ep, ref.state_dict()))

    n = world * B_PER_RANK
    x_all, t_all, y_all = torch.randn(n, 1, 8, 8), torch.rand(n) * 999, torch.arange(n) % 6
    probe_all = torch.randn(n, 2, 8, 8)
    pred_all = ref(x_all, t_all, y_all).prediction
    (pred_all * probe_all).sum().backward()
    mine = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
    pred_ref = pred_all[mine].detach()
    pred = ep(x_all[mine], t_all[mine], y_all[mine]).prediction
    (pred * probe_all[mine]).sum().backward()
    return {
        "same_init": same_init,
        "out": (pred_ref, pred.detach()),
        "grads": (_reference_grads(ref, ep), _reduce_grads(ep, groups)),
    }


def _error_message(fn) -> str:
    try:
        fn()
    except ConfigError as e:
        return str(e)
    return "no error"


def _two_rank_checks(rank: int, world: int) -> dict:
    groups = build_expert_parallel_groups(2, num_experts=4)
    shared = MoEConfig(num_experts=4, top_k=2)
    gelu = MoEConfig(num_experts=4, top_k=1, expert_act="gelu", shared_expert_ratio=0.0, norm_topk_prob=True)
    return {
        "swiglu": _layer_case(rank, world, shared, groups),
        "gelu": _layer_case(rank, world, gelu, groups),
        "skew": _layer_case(rank, world, shared, groups, skew=True),
        "dit": _dit_case(rank, world, groups),
        "err_world": _error_message(lambda: build_expert_parallel_groups(4, num_experts=8)),
        "err_experts": _error_message(lambda: MoEFeedForward(D, MoEConfig(num_experts=3), groups.ep_group)),
        "err_capacity": _error_message(
            lambda: MoEFeedForward(D, MoEConfig(num_experts=4, capacity_factor=1.25), groups.ep_group)
        ),
    }


def _four_rank_checks(rank: int, world: int) -> dict:
    cfg = MoEConfig(num_experts=4, top_k=2)
    return {
        "ep2_dp2": _layer_case(rank, world, cfg, build_expert_parallel_groups(2, num_experts=4)),
        "ep4": _layer_case(rank, world, cfg, build_expert_parallel_groups(4, num_experts=4)),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_local_ranks(_two_rank_checks, 2, timeout_s=90)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_local_ranks(_four_rank_checks, 4, timeout_s=120)


def _assert_case_matches(case: dict) -> None:
    torch.testing.assert_close(case["out"][1], case["out"][0], **TOL)
    if "x_grad" in case:
        torch.testing.assert_close(case["x_grad"][1], case["x_grad"][0], **TOL)
        torch.testing.assert_close(case["tokens_per_expert"][1], case["tokens_per_expert"][0])
    ref_grads, ep_grads = case["grads"]
    assert ref_grads.keys() == ep_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(ep_grads[name], ref_grads[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_ep2_layer_equals_single_process(two_ranks, act):
    for rank, result in enumerate(two_ranks):
        case = result[act]
        assert case["local_experts"] == [2 * rank, 2 * rank + 1] and case["expert_rows"] == 2
        assert all(case["same_init"].values()), "an EP rank's experts must equal its slice of the global init"
        _assert_case_matches(case)


def test_rank_receiving_nothing_and_sending_everything(two_ranks):
    for result in two_ranks:
        local_counts = result["skew"]["local_tokens_per_expert"]
        assert local_counts[:2].sum() == 0 and local_counts[2:].sum() == 2 * B_PER_RANK * L  # all to rank 1
        _assert_case_matches(result["skew"])


def test_ep2_dit_equals_single_process_model(two_ranks):
    for result in two_ranks:
        assert result["dit"]["same_init"]
        _assert_case_matches(result["dit"])


def test_ep_on_four_ranks(four_ranks):
    for rank, result in enumerate(four_ranks):
        assert result["ep2_dp2"]["local_experts"] == [2 * (rank % 2), 2 * (rank % 2) + 1]
        assert result["ep4"]["local_experts"] == [rank]
        _assert_case_matches(result["ep2_dp2"])
        _assert_case_matches(result["ep4"])


def test_ep_size_errors_name_the_values(two_ranks):
    assert two_ranks[0]["err_world"] == "expert-parallel size ep_size=4 must divide the world size 2"
    assert two_ranks[0]["err_experts"] == "expert-parallel size ep_size=2 must divide the number of experts 3"
    assert "capacity_factor=1.25 is not supported with expert parallelism" in two_ranks[0]["err_capacity"]
    with pytest.raises(ConfigError, match="ep_size=3 must divide the number of experts 8"):
        check_expert_parallel_size(3, num_experts=8, world_size=6)
    with pytest.raises(ConfigError, match="ep_size=4 must divide the world size 6"):
        check_expert_parallel_size(4, num_experts=8, world_size=6)
    with pytest.raises(ConfigError, match="ep_size=3 must divide the number of experts 4"):
        ExpertShard(num_experts=4, ep_size=3)


def test_expert_shard_slices():
    shard = ExpertShard(num_experts=8, ep_size=4, ep_rank=2)
    assert (shard.num_local, shard.first_expert, shard.global_expert_ids) == (2, 4, range(4, 6))
    assert ExpertShard(num_experts=8).global_expert_ids == range(8)


def test_local_state_dict_takes_a_state_of_the_layers_expert_count_only():
    """A state of 8 experts cut to a 4-expert model (or to EP rank 1's experts 2..3 of 4) loaded without a word."""
    eight = StackedExperts(8, 16, 32, "swiglu").state_dict()
    half = StackedExperts(4, 16, 32, "swiglu", local_experts=range(2, 4))
    four = StackedExperts(4, 16, 32, "swiglu").state_dict()
    assert all(torch.equal(v, four[k][2:4]) for k, v in local_state_dict(half, four).items())
    for model in (StackedExperts(4, 16, 32, "swiglu"), half):
        with pytest.raises(ValueError, match="gate_up_proj: holds 8 experts, the model's layer has 4"):
            local_state_dict(model, eight)


def _hang_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        time.sleep(120)  # never joins rank 0's collective
    dist.all_reduce(torch.ones(1))


def test_launcher_turns_a_hang_into_a_failure():
    with pytest.raises(RankFailure, match="rank"):  # gloo's timeout or the launcher's deadline, whichever first
        run_local_ranks(_hang_on_rank_one, 2, timeout_s=5)
