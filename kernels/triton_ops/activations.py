"""Activation math in fp32 for the kernels' epilogues: SiLU's sigmoid, tanh-GELU and its derivative, and the SwiGLU
backward (one formula for the fused epilogue and the elementwise pass, so both give the same bits)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def gelu_tanh(z):
    # 0.5 z (1 + tanh(u)) = z * sigmoid(2u), u = sqrt(2/pi) (z + 0.044715 z^3)
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    return z * sigmoid(2.0 * u)


@triton.jit
def gelu_tanh_grad(z):
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
    s = sigmoid(2.0 * u)
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    return s + z * 2.0 * s * (1.0 - s) * du


@triton.jit
def swiglu_grads(dh, g, u):
    """fp32 SwiGLU backward from dH and the pre-activations: (h = silu(g) * u, dgate = dH * u * silu'(g),
    dup = dH * silu(g)). The one formula of the elementwise pass and of dH's fused epilogue: the same bits."""
    s = sigmoid(g)
    silu = g * s
    return silu * u, dh * u * (s + silu * (1.0 - s)), dh * silu
