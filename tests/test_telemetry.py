"""Training telemetry: device peak lookup, throughput / MFU arithmetic, peak memory, routing loads over ranks."""

from __future__ import annotations

import pytest
import torch

from ditmoe.analysis.routing import RoutingAccumulator
from ditmoe.models.moe import RoutingStats
from ditmoe.parallel.launch import run_local_ranks
from ditmoe.training import metrics
from ditmoe.training.telemetry import PEAK_TFLOPS, Throughput, device_peak_flops, match_device, peak_memory


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA A10", None),
        ("NVIDIA GB200", None),
        ("NVIDIA GeForce RTX 3090", None),
        ("AMD Instinct MI300X", None),
        ("", None),
    ],
)
def test_match_device(name, key):
    assert match_device(name) == key


def test_peak_table():
    assert PEAK_TFLOPS["H100 SXM"]["bf16"] == 989.4
    assert PEAK_TFLOPS["H100 PCIe"]["bf16"] == 756
    assert PEAK_TFLOPS["H200"]["bf16"] == 989.4
    assert PEAK_TFLOPS["A100"]["bf16"] == 312
    assert PEAK_TFLOPS["V100"]["fp16"] == 125
    assert PEAK_TFLOPS["B200"]["bf16"] == 2250
    for row in PEAK_TFLOPS.values():
        assert set(row) <= {"bf16", "fp16", "tf32", "fp32"} and "fp32" in row
        assert all(v > 0 for v in row.values())


def test_device_peak_flops_override_and_unknown():
    assert device_peak_flops(torch.device("cpu"), "bf16", override_tflops=100.0) == 100e12
    assert device_peak_flops(torch.device("cpu"), "bf16") is None
    assert device_peak_flops("cpu", "fp32") is None


def test_device_peak_flops_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert device_peak_flops(cuda, "bf16") == pytest.approx(989.4e12)
    assert device_peak_flops(cuda, "bfloat16") == pytest.approx(989.4e12)
    assert device_peak_flops(cuda, "fp32") == pytest.approx(67e12)
    assert device_peak_flops(cuda, "fp8") is None
    assert device_peak_flops(cuda, "bf16", override_tflops=500) == 500e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    assert device_peak_flops(cuda, "bf16") is None  # no bf16 tensor cores
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert device_peak_flops(cuda, "bf16") is None


class _FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_throughput_arithmetic():
    clock = _FakeClock()
    tp = Throughput(clock=clock)
    assert tp.summary(4, 256, 1e9, 1e12) == {}  # empty window
    for _ in range(5):
        tp.add(32)
    clock.t += 2.0
    # local: 160 images / 2 s = 80 img/s; global x4 ranks = 320 img/s; tokens x256 = 81920 /s
    # achieved per device: 80 img/s x 3e9 FLOP/img = 2.4e11 FLOP/s = 0.24 TFLOP/s; MFU vs 1e12 = 0.24
    out = tp.summary(world_size=4, tokens_per_image=256, train_flops_per_image=3e9, peak_flops_per_device=1e12)
    assert out == pytest.approx(
        {
            "perf/images_per_s": 320.0,
            "perf/tokens_per_s": 81920.0,
            "perf/tflops_per_device": 0.24,
            "perf/mfu": 0.24,
        }
    )
    no_peak = tp.summary(4, 256, 3e9, None)
    assert "perf/mfu" not in no_peak and no_peak["perf/images_per_s"] == pytest.approx(320.0)
    tp.start()  # a new window
    assert tp.summary(4, 256, 3e9, 1e12) == {}
    tp.add(10)
    clock.t += 0.5
    assert tp.summary(1, 1, 1.0, None)["perf/images_per_s"] == pytest.approx(20.0)


def test_throughput_leaves_paused_time_out():
    clock = _FakeClock()
    tp = Throughput(clock=clock)
    tp.add(10)
    clock.t += 1.0
    with tp.paused():  # e.g. a checkpoint write
        clock.t += 30.0
    tp.add(10)
    clock.t += 1.0
    assert tp.summary(1, 1, 1.0, None)["perf/images_per_s"] == pytest.approx(10.0)  # 20 images / 2 s
    tp.start()  # a new window forgets the pause
    tp.add(5)
    clock.t += 0.5
    assert tp.summary(1, 1, 1.0, None)["perf/images_per_s"] == pytest.approx(10.0)


def test_peak_memory_cpu():
    mem = peak_memory(torch.device("cpu"))
    assert set(mem) == {"mem/peak_rss_gib"}
    assert 0 < mem["mem/peak_rss_gib"] < 1024


def _stats(tokens_E: list[int], entropy: float, dropped: int) -> RoutingStats:
    t = torch.tensor(tokens_E, dtype=torch.int64)
    zero = torch.zeros(())
    return RoutingStats(
        tokens_per_expert_E=t,
        router_entropy=torch.tensor(entropy),
        dropped=torch.tensor(dropped, dtype=torch.int64),
        balance_loss=zero,
        z_loss=zero,
        experts_BLK=torch.zeros(1, 1, 1, dtype=torch.int64),
    )


def _rank_stats(rank: int) -> list[list[RoutingStats]]:
    """Two steps of two layers with four experts; counts, entropy and drops depend on the rank."""
    return [
        [_stats([4 + rank, 2, 1, 1 + 3 * rank], 1.0 + rank, rank), _stats([1, 1, 5 * rank, 1], 0.5, 1)],
        [_stats([2, 2 * rank, 2, 2], 1.2 - rank * 0.4, 0), _stats([rank, 3, 3, 2], 0.25 + rank, 2 * rank)],
    ]


def _reference(world: int) -> dict:
    """One accumulator fed every rank's steps: the global counts; entropy averaged over ranks and steps."""
    acc = RoutingAccumulator()
    for r in range(world):
        for step in _rank_stats(r):
            acc.add(step)
    return acc.summary()


def _all_reduce_rank(rank: int, world: int) -> dict:
    acc = RoutingAccumulator()
    for step in _rank_stats(rank):
        acc.add(step)
    acc.all_reduce()
    return {"summary": acc.summary(), "fractions": acc.load_fractions(), "steps": acc.steps}


def test_routing_all_reduce_no_dist_is_noop():
    acc = RoutingAccumulator()
    for step in _rank_stats(1):
        acc.add(step)
    before = acc.summary()
    acc.all_reduce()
    assert acc.summary() == before
    # rank 1 alone: layer 0 [5,2,1,4]+[2,2,2,2] = [7,4,3,6], layer 1 [1,1,5,1]+[1,3,3,2] = [2,4,8,3]; max / mean load
    assert before["moe/layer0/imbalance"] == pytest.approx(7 / 20 * 4)
    assert before["moe/layer1/imbalance"] == pytest.approx(8 / 17 * 4)
    assert before["moe/max_imbalance"] == pytest.approx(32 / 17)
    assert before["moe/mean_imbalance"] == pytest.approx((1.4 + 32 / 17) / 2)


def test_routing_imbalance_is_max_over_mean_load():
    """One expert taking every token is E times its fair share; an even split is 1."""
    acc = RoutingAccumulator()
    acc.add([_stats([0, 12, 0, 0], 0.0, 0), _stats([3, 3, 3, 3], 1.0, 0)])
    summary = acc.summary()
    assert summary["moe/layer0/imbalance"] == 4.0 and summary["moe/layer1/imbalance"] == 1.0
    assert summary["moe/max_imbalance"] == 4.0 and summary["moe/mean_imbalance"] == 2.5


def test_routing_counts_idle_experts():
    """An expert that kept no token in the window is idle, though its layer's imbalance looks mild; one that kept
    none in one step but some in another is not."""
    acc = RoutingAccumulator()
    acc.add([_stats([0, 4, 4, 4], 1.0, 0), _stats([3, 3, 3, 3], 1.0, 0)])
    acc.add([_stats([0, 4, 4, 4], 1.0, 0), _stats([0, 12, 0, 0], 0.0, 0)])
    summary = acc.summary()
    assert summary["moe/idle_experts"] == 1
    assert summary["moe/layer0/imbalance"] == pytest.approx(4 / 3)


def test_routing_all_reduce_two_ranks():
    world = 2
    results = run_local_ranks(_all_reduce_rank, world, timeout_s=60)
    ref = _reference(world)  # steps are 2 x world here, so entropy = mean over ranks of per-rank means
    for res in results:
        assert res["steps"] == 2
        assert res["summary"].keys() == ref.keys()
        assert res["summary"] == pytest.approx(ref)
    assert results[0]["summary"] == results[1]["summary"]
    assert results[0]["summary"]["moe/dropped_tokens"] == (0 + 1 + 0 + 0) + (1 + 1 + 0 + 2)
    # layer 0 of the world: rank 0 [4,2,1,1]+[2,0,2,2], rank 1 [5,2,1,4]+[2,2,2,2] = [13, 6, 6, 9]
    expected_l0 = torch.tensor([13, 6, 6, 9], dtype=torch.float64) / 34
    assert torch.allclose(torch.from_numpy(results[0]["fractions"][0]), expected_l0)
    # layer 1: rank 0 [1,1,0,1]+[0,3,3,2], rank 1 [1,1,5,1]+[1,3,3,2] = [3, 8, 11, 6]; imbalance = max share x E
    imbalance = {"moe/layer0/imbalance": 13 / 34 * 4, "moe/layer1/imbalance": 11 / 28 * 4}
    assert {k: results[0]["summary"][k] for k in imbalance} == pytest.approx(imbalance)
    assert results[0]["summary"]["moe/max_imbalance"] == pytest.approx(11 / 28 * 4)


def _no_wandb_key(monkeypatch, home):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))


def test_wandb_finds_the_key_that_wandb_login_wrote(tmp_path, monkeypatch):
    """``wandb login`` keeps the key in ~/.netrc, not in the environment: such a run logs online."""
    _no_wandb_key(monkeypatch, tmp_path)
    assert not metrics.wandb_credentials()
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert metrics.wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a key for another host does not count
    assert not metrics.wandb_credentials()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert metrics.wandb_credentials()


@pytest.mark.parametrize(
    ("key", "mode", "expected"), [(False, None, "offline"), (True, None, None), (False, "online", None)]
)
def test_wandb_runs_offline_only_without_a_key_or_a_chosen_mode(tmp_path, monkeypatch, capsys, key, mode, expected):
    """No key and no WANDB_MODE: offline, and the console says so and how to upload; WANDB_MODE is the user's."""
    import wandb

    _no_wandb_key(monkeypatch, tmp_path)
    if key:
        monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw))
    metrics.MetricsLogger(tmp_path / "run", use_wandb=True, project="p", run_name="r", config={})
    assert seen["mode"] == expected
    assert ("logging offline" in capsys.readouterr().out) == (expected == "offline")
