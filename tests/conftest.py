"""Shared test setup.

Kernel tests run Triton on CPU through its interpreter when no GPU is present; ``TRITON_INTERPRET`` must be set
before Triton is first imported, so it is set here (it changes nothing for code that does not use Triton).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
