"""Fused LayerNorm + adaLN shift (the block's norm1): y = LN_fp32(x) * w + b + shift[batch], one pass over x.

The model computes the float32 LayerNorm, casts it to the run dtype and then adds the shift (two more passes over
the activation); here the statistics, the affine and the shift stay in fp32 registers and are rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_support import check_kernel_inputs, next_power_of_2


def layernorm_shift_ref(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """x [B, N, D], weight/bias [D] (or None), shift [B, D] -> [B, N, D] in x's dtype; all maths in float32."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    normed = F.layer_norm(x.float(), x.shape[-1:], w, b, eps)
    return (normed + shift.float()[:, None, :]).to(x.dtype)


@triton.jit
def _layernorm_shift_kernel(
    X, W, Bias, Shift, Out, tokens, dim, stride_xb, stride_xn, stride_sb, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per token row (the whole row of D channels in one tile)."""
    row = tl.program_id(0)
    b = row // tokens
    n = row % tokens
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(X + b * stride_xb + n * stride_xn + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / dim
    centred = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / dim + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(Bias + cols, mask=ok, other=0.0).to(tl.float32)
    y = y + tl.load(Shift + b * stride_sb + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * dim + cols, y.to(Out.dtype.element_ty), mask=ok)


def layernorm_shift(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """The fused kernel with `layernorm_shift_ref`'s signature; x's last dim must be contiguous."""
    check_kernel_inputs(x, shift)
    batch, tokens, dim = x.shape
    if shift.shape != (batch, dim):
        raise ValueError(f"shift must be [B, D] = {[batch, dim]}, got {list(shift.shape)}")
    if x.stride(-1) != 1 or shift.stride(-1) != 1:
        raise ValueError("layernorm_shift needs x and shift contiguous in the channel dim")
    out = torch.empty(batch, tokens, dim, device=x.device, dtype=x.dtype)
    block = next_power_of_2(dim)
    _layernorm_shift_kernel[(batch * tokens,)](
        x, weight if weight is not None else x, bias if bias is not None else x, shift, out,
        tokens, dim, x.stride(0), x.stride(1), shift.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return out
