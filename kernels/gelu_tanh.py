"""GELU with the tanh approximation (the FFN's "gelu-approximate"), elementwise in float32, rounded once.

tanh is written from exp (tanh(u) = 1 - 2 / (exp(2u) + 1), with u clamped to +-20, where tanh is +-1 in fp32), so
the kernel needs no libdevice call (which the interpreter cannot run either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_support import check_kernel_inputs

BLOCK = 1024


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh") computed in float32, in x's dtype."""
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


@triton.jit
def _gelu_tanh_kernel(X, Out, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) * (x + 0.044715 x^3)
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)  # tanh is +-1 in fp32 beyond |u| = 9; keeps exp finite
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
    tl.store(Out + offs, (0.5 * x * (1.0 + tanh)).to(Out.dtype.element_ty), mask=ok)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The fused kernel with `gelu_tanh_ref`'s signature (any shape; a contiguous copy is made if needed)."""
    check_kernel_inputs(x)
    flat = x.contiguous()
    out = torch.empty_like(flat)
    n = flat.numel()
    _gelu_tanh_kernel[(triton.cdiv(n, BLOCK),)](flat, out, n, BLOCK=BLOCK, num_warps=4)
    return out.view(x.shape)
