"""The digits demo's judge: a small CNN classifier, class agreement of samples, a Frechet distance in its features."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

FEATURE_DIM = 128
POOLED_SIZE = 8  # feature maps are pooled to 8x8 whatever the input size, so 16/32/64 pixel inputs share one head


class DigitsJudge(nn.Module):
    """conv 32 -> max-pool /2 -> conv 64 -> pool to 8x8 -> fc 128 -> fc num_classes, for [B, C, S, S] in [-1, 1]."""

    def __init__(self, in_channels: int = 1, image_size: int = 16, num_classes: int = 10):
        super().__init__()
        self.config = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.fc = nn.Linear(64 * POOLED_SIZE * POOLED_SIZE, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def check_images(self, x_BCHW: torch.Tensor) -> None:
        """ValueError unless x is [B, in_channels, image_size, image_size]."""
        expected = (self.config["in_channels"], self.config["image_size"], self.config["image_size"])
        if x_BCHW.ndim != 4 or tuple(x_BCHW.shape[1:]) != expected:
            raise ValueError(f"judge expects images [B, {', '.join(map(str, expected))}], got {list(x_BCHW.shape)}")

    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, 128]."""
        self.check_images(x_BCHW)
        h = F.max_pool2d(F.relu(self.conv1(x_BCHW)), 2)
        h = F.adaptive_avg_pool2d(F.relu(self.conv2(h)), POOLED_SIZE)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]."""
        return self.head(self.dropout(self.features(x_BCHW)))


def random_shift(x_BCHW: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to max_shift pixels per axis, filling with background (-1)."""
    size = x_BCHW.shape[-1]
    padded = F.pad(x_BCHW, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (x_BCHW.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets)])


def train_judge(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    epochs: int = 12,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> DigitsJudge:
    """Train a judge on x [N, C, S, S] in [-1, 1], y [N] int64, with random shifts of S/16 pixels.

    Returns it in eval mode. Deterministic given seed (global RNG state is left untouched).
    """
    if x_train.ndim != 4 or x_train.shape[-1] != x_train.shape[-2] or len(x_train) != len(y_train):
        raise ValueError(f"expected x [N, C, S, S] and y [N], got {list(x_train.shape)} and {list(y_train.shape)}")
    generator = torch.Generator().manual_seed(seed)
    max_shift = max(1, x_train.shape[-1] // 16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = DigitsJudge(x_train.shape[1], x_train.shape[-1], int(y_train.max()) + 1)
        optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        judge.train()
        for _ in tqdm(range(epochs), desc="judge training", unit="epoch", leave=False):
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(x_train), batch_size):
                batch = order[start : start + batch_size]
                loss = F.cross_entropy(judge(random_shift(x_train[batch], max_shift, generator)), y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    return judge.eval()


@torch.no_grad()
def batched_outputs(fn, x_BCHW: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """fn applied to x in chunks, concatenated."""
    return torch.cat([fn(x_BCHW[start : start + batch_size]) for start in range(0, len(x_BCHW), batch_size)])


def check_finite(x_N: np.ndarray | torch.Tensor, what: str) -> None:
    """ValueError naming how many of the N rows of x (samples, feature vectors) hold a NaN or an infinity."""
    bad = int((~torch.isfinite(torch.as_tensor(x_N)).flatten(1).all(1)).sum())
    if bad:
        raise ValueError(f"{bad} of {len(x_N)} {what} are not finite (NaN or inf)")


def judge_samples(judge: DigitsJudge, samples: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples [N, C, S, S] the judge classifies as their label [N] (accuracy, for real images);
    ValueError for non-finite samples (a diverged sampler's), which have no class to agree with."""
    if len(samples) != len(labels) or len(samples) == 0:
        raise ValueError(f"need as many labels as samples (> 0), got {len(samples)} samples and {len(labels)} labels")
    check_finite(samples, "samples")  # NaN logits would argmax to class 0 and score as a guess
    judge.eval()
    predictions = batched_outputs(judge, samples).argmax(dim=1)
    return (predictions == labels.to(predictions.device)).float().mean().item()


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets [N, D] and [M, D] (N, M >= 2)."""
    a, b = (np.asarray(torch.as_tensor(feats).detach().cpu(), dtype=np.float64) for feats in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need feature sets [N >= 2, D] and [M >= 2, D], got {a.shape} and {b.shape}")
    check_finite(a, "feature vectors of the first set")
    check_finite(b, "feature vectors of the second set")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    with warnings.catch_warnings():  # dead ReLU features make the covariances singular; sqrtm still copes
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # regularise as in the reference FID code
            offset = np.eye(len(cov_a)) * 1e-6
            covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = covmean.real  # imaginary parts are numerical noise for PSD covariances
    distance = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean)
    return max(float(distance), 0.0)  # clamp rounding noise around 0


def classifier_fid(judge: DigitsJudge, samples: torch.Tensor, real_images: torch.Tensor) -> float:
    """Frechet distance between judge features of samples [N, C, S, S] and of real images [M, C, S, S]; ValueError
    if either holds non-finite images."""
    check_finite(samples, "samples")
    check_finite(real_images, "real images")
    judge.eval()
    return frechet_distance(batched_outputs(judge.features, samples), batched_outputs(judge.features, real_images))


def save_judge(judge: DigitsJudge, path: Path) -> None:
    """Write the judge's config and weights to path."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": judge.config, "state_dict": judge.state_dict()}, path)


def load_judge(path: Path) -> DigitsJudge:
    """Rebuild a judge saved by save_judge, in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    judge = DigitsJudge(**payload["config"])
    judge.load_state_dict(payload["state_dict"])
    return judge.eval()
