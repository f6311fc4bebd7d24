"""The digits judge: held-out accuracy, sample agreement, Frechet distance against hand computations, caching."""

from pathlib import Path

import numpy as np
import pytest
import torch

from ditmoe.data.digits import prepare_digits
from ditmoe.data.shards import load_split_tensors
from ditmoe.evaluation.digits_judge import (
    DigitsJudge,
    classifier_fid,
    frechet_distance,
    judge_samples,
    load_judge,
    save_judge,
    train_judge,
)


@pytest.fixture(scope="module")
def digits_splits(tmp_path_factory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    data_dir = tmp_path_factory.mktemp("judge") / "digits"
    prepare_digits(data_dir, image_size=16)
    return {split: load_split_tensors(data_dir, split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def judge(digits_splits) -> DigitsJudge:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: oversubscribed intra-op threads slow training several-fold
    try:
        return train_judge(*digits_splits["train"], epochs=12, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_held_out_accuracy(judge, digits_splits):
    x_val, y_val = digits_splits["val"]
    accuracy = judge_samples(judge, x_val, y_val)
    print(f"judge held-out accuracy: {accuracy:.4f}")
    assert accuracy >= 0.95


def test_judge_samples_is_label_agreement(judge, digits_splits):
    x_val, y_val = digits_splits["val"]
    with torch.no_grad():
        predictions = judge(x_val).argmax(dim=1)
    assert judge_samples(judge, x_val, y_val) == pytest.approx((predictions == y_val).float().mean().item())
    assert judge_samples(judge, x_val, (y_val + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="labels"):
        judge_samples(judge, x_val, y_val[:-1])
    with pytest.raises(ValueError, match="judge expects images"):
        judge_samples(judge, x_val[:, :, :8, :8], y_val)


def test_classifier_fid_separates_real_from_noise(judge, digits_splits):
    x_train, _ = digits_splits["train"]
    x_val, _ = digits_splits["val"]
    noise = torch.rand(x_val.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    self_fid, real_fid, noise_fid = (classifier_fid(judge, x, x_val) for x in (x_val, x_train, noise))
    assert self_fid < 1e-4
    assert noise_fid > 20 * real_fid > 0


def test_non_finite_samples_are_refused_not_scored():
    """Diverged samples: NaN logits argmax to class 0 (a chance-level 'accuracy') and NaN features crash sqrtm."""
    judge = DigitsJudge(1, 16, 10).eval()
    samples, labels = torch.zeros(20, 1, 16, 16), torch.arange(20) % 10
    samples[3, 0, 5, 5], samples[7] = float("nan"), float("inf")
    real = torch.rand(40, 1, 16, 16) * 2 - 1
    with pytest.raises(ValueError, match="2 of 20 samples are not finite"):
        judge_samples(judge, samples, labels)
    with pytest.raises(ValueError, match="2 of 20 samples are not finite"):
        classifier_fid(judge, samples, real)
    with pytest.raises(ValueError, match="1 of 40 real images are not finite"):
        classifier_fid(judge, real[:20], torch.cat([real[:39], samples[3:4]]))
    with pytest.raises(ValueError, match="5 of 5 feature vectors of the first set are not finite"):
        frechet_distance(np.full((5, 3), np.nan), np.ones((5, 3)))


def hand_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Same quantity via eigenvalues: Tr sqrt(C_a C_b) = sum sqrt(eig(C_a C_b)) (real, >= 0 for PSD C_a, C_b)."""
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    mean_term = np.sum((a.mean(0) - b.mean(0)) ** 2)
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eigenvalues).sum())


def test_frechet_distance_matches_hand_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 3))
    b = rng.normal(size=(300, 3)) @ rng.normal(size=(3, 3)) + np.array([1.0, -2.0, 0.5])
    assert frechet_distance(a, b) == pytest.approx(hand_frechet(a, b), rel=1e-8)
    assert frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(hand_frechet(a, b), rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians():
    """For diagonal covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2, with sample statistics."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5000, 2)) * np.array([1.0, 2.0])
    b = rng.normal(size=(5000, 2)) * np.array([3.0, 0.5]) + np.array([1.0, 1.0])
    expected = 1.0 + 1.0 + (1.0 - 3.0) ** 2 + (2.0 - 0.5) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a[:1], b)


def test_save_and_load_round_trip(judge, digits_splits, tmp_path: Path):
    x_val, _ = digits_splits["val"]
    path = tmp_path / "cache" / "judge.pt"
    save_judge(judge, path)
    restored = load_judge(path)
    with torch.no_grad():
        assert torch.equal(restored(x_val), judge(x_val))
    assert restored.config == judge.config == {"in_channels": 1, "image_size": 16, "num_classes": 10}
