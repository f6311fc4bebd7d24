"""Shared test setup: the Triton interpreter on CPU, exact fp32 matmuls for the kernel tests' oracles, and the digits
dataset and the tiny VAE the tests share.

Kernel tests run Triton on CPU through its interpreter when no GPU is present; ``TRITON_INTERPRET`` must be set
before Triton is first imported, so it is set here (it changes nothing for code that does not use Triton).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """16x16 digits as shards of 400 samples (train + val), prepared once per session."""
    from ditmoe.data.digits import prepare_digits

    out = tmp_path_factory.mktemp("digits")
    prepare_digits(out, image_size=16, shard_size=400)
    return out


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny random diffusers AutoencoderKL folder (one downsampling: latents are [4, S/2, S/2])."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture
def exact_fp32_matmuls():
    """fp32 oracles must not use TF32 on GPUs (our kernels follow the same flag): kernel test modules use it."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
