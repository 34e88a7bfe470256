"""Fused per-head QK LayerNorm + 2-D RoPE: the projection output [B, N, H*d] -> normalized, rotated [B, H, N, d].

The model runs the fp32 LayerNorm (cast back), then the rotation in fp32 (cast back), each a full pass over q and
k. Here one program normalizes a tile of (token, head) rows and rotates them in registers: the pair partner of
channel c is channel c ^ 1, loaded a second time and normalized with the same row statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..models.rope import apply_rotary
from .triton_support import check_kernel_inputs, next_power_of_2


def qk_norm_rope_ref(
    x: torch.Tensor, heads: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """x [B, N, H*d] -> LN_fp32 over each head's d channels, then (cos/sin [N, d] given) the rotation of adjacent
    channel pairs; [B, H, N, d] in x's dtype, maths in float32 (no rounding between the norm and the rotation)."""
    heads_x = x.float().unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, N, d)
    head_dim = heads_x.shape[-1]
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    y = F.layer_norm(heads_x, (head_dim,), w, b, eps)
    if cos is not None:
        y = apply_rotary(y, cos, sin)  # float32 in, float32 out
    return y.to(x.dtype)


@triton.jit
def _qk_norm_rope_kernel(
    X, W, Bias, Cos, Sin, Out, rows, tokens, heads, head_dim, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROTATE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """ROWS (token, head) rows per program; row r = (b * N + n) * H + h, both x and out laid out [B, N, H, d]."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK)
    row_ok = r < rows
    col_ok = c < head_dim
    ok = row_ok[:, None] & col_ok[None, :]
    offs = r[:, None] * head_dim + c[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / head_dim
    centred = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / head_dim + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROTATE:
        partner = c ^ 1
        xp = tl.load(X + r[:, None] * head_dim + partner[None, :], mask=ok, other=0.0).to(tl.float32)
        yp = (xp - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            yp = yp * tl.load(W + partner, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            yp = yp + tl.load(Bias + partner, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sign = tl.where(c % 2 == 0, -1.0, 1.0)  # even channel: real*cos - imag*sin; odd: imag*cos + real*sin
        n = (r // heads) % tokens
        table = n[:, None] * head_dim + c[None, :]
        cos = tl.load(Cos + table, mask=ok, other=0.0)
        sin = tl.load(Sin + table, mask=ok, other=0.0)
        y = y * cos + sign[None, :] * yp * sin
    tl.store(Out + offs, y.to(Out.dtype.element_ty), mask=ok)


def qk_norm_rope(
    x: torch.Tensor, heads: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    cos: torch.Tensor | None, sin: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """The fused kernel with `qk_norm_rope_ref`'s signature. x [B, N, H*d] contiguous; cos/sin float32 [N, d] or
    None (no rotation: the cross-attention keys). Returns [B, H, N, d] as a view of a [B, N, H, d] buffer."""
    check_kernel_inputs(x, *(t for t in (cos, sin) if t is not None))
    batch, tokens, width = x.shape
    head_dim = width // heads
    if width != heads * head_dim or head_dim % 2:
        raise ValueError(f"width {width} is not heads {heads} x an even head size")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    if cos is not None and (cos.shape != (tokens, head_dim) or sin.shape != (tokens, head_dim)):
        raise ValueError(f"cos/sin must be [N, d] = {[tokens, head_dim]}, got {list(cos.shape)}, {list(sin.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = batch * tokens * heads
    block = next_power_of_2(head_dim)
    rows_per_program = max(1, 4096 // block)
    rotate = cos is not None
    cos = cos.float().contiguous() if rotate else x
    sin = sin.float().contiguous() if rotate else x
    _qk_norm_rope_kernel[(triton.cdiv(rows, rows_per_program),)](
        x, weight if weight is not None else x, bias if bias is not None else x, cos, sin, out,
        rows, tokens, heads, head_dim, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROTATE=rotate,
        ROWS=rows_per_program, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out.view(batch, tokens, heads, head_dim).transpose(1, 2)
