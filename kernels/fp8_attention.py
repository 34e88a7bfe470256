"""FP8 attention for head size 176 (any head size >= 16): Q.K^T in e4m3 with per-block scales, online softmax in
fp32, P.V in fp16/bf16 or e4m3, never an N x N tensor in memory. With `fp8_attention_ref`, its torch reference.

Public engines stop short of Ruyi's head size (SageAttention <= 128, TensorRT's FP8 fused attention on Ada <= 64,
FA3 pads to 192/256). Triton tiles must be powers of two, so the head is cut into two lanes instead of being
padded whole: 176 = 128 + 48, the second lane a 64-wide tile with 16 masked columns (9% padding, not 45%).

Quantization (torch, before the kernel; the kernel only loads e4m3), in the manner of SageAttention:
- Q: one scale per block of `q_block` tokens per (batch, head), amax / 448; the softmax scale d^-0.5 and log2(e)
  are folded into it, so the kernel's exp2 needs no multiply.
- K: smoothed first (the per-channel mean over tokens is subtracted: it adds the same constant q.mean(k) to every
  score of a row, which softmax cancels, and it removes the shared offset that wastes e4m3's range), then one
  scale per block of `k_block` tokens.
- V: for pv="e4m3" one scale per channel (amax over tokens / 448); P in [0, 1] is multiplied by 448 and cast to
  e4m3 in the kernel. Otherwise V and P are in fp16/bf16.
The reference computes the same dequantized Q and K with an exact fp32 softmax, so kernel and reference differ only
by the online softmax and the rounding of P.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .triton_support import check_kernel_inputs, interpreting, next_power_of_2

FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634
PV_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
Q_BLOCK, K_BLOCK = 128, 64  # quantization granularity (tokens per scale), independent of the kernel tiles
MIN_LANE = 32


@dataclass(frozen=True)
class QuantizedQKV:
    """What the kernel reads: e4m3 q/k [B, H, N, d] with fp32 per-block scales [B, H, ceil(N / block)] (the q scale
    carries d^-0.5 * log2 e), v in the P.V dtype and, for e4m3, its per-channel scale [B, H, d]."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    q_block: int
    k_block: int


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, d] -> (e4m3 [B, H, N, d], fp32 scales [B, H, ceil(N / block)]) with x ~ e4m3 * scale per block."""
    batch, heads, tokens, dim = x.shape
    blocks = -(-tokens // block)
    xf = x.float()
    padded = F.pad(xf, (0, 0, 0, blocks * block - tokens)).view(batch, heads, blocks, block, dim)
    scale = padded.abs().amax(dim=(-1, -2)).clamp(min=1e-12) / FP8_MAX  # (B, H, nb)
    per_token = scale.repeat_interleave(block, dim=-1)[..., :tokens, None]  # (B, H, N, 1)
    return (xf / per_token).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, N, d] -> (e4m3 [B, H, N, d], fp32 scales [B, H, d]): one scale per channel over all tokens."""
    xf = x.float()
    scale = xf.abs().amax(dim=-2).clamp(min=1e-12) / FP8_MAX  # (B, H, d)
    return (xf / scale[..., None, :]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp16", q_block: int = Q_BLOCK, k_block: int = K_BLOCK
) -> QuantizedQKV:
    """Quantize q [B, H, N, d], k and v [B, H, L, d] for `fp8_attention` (see the module docstring)."""
    if pv not in PV_DTYPES:
        raise ValueError(f"pv: {pv!r} is not supported; use one of {tuple(PV_DTYPES)}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"expected q [B, H, N, d] and k, v [B, H, L, d]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    head_dim = q.shape[-1]
    q8, q_scale = quantize_blocks(q, q_block)
    k_smooth = k.float() - k.float().mean(dim=-2, keepdim=True)
    k8, k_scale = quantize_blocks(k_smooth, k_block)
    if pv == "e4m3":
        v_q, v_scale = quantize_channels(v)
    else:
        v_q, v_scale = v.to(PV_DTYPES[pv]).contiguous(), None
    return QuantizedQKV(q8, q_scale * (head_dim**-0.5 * LOG2E), k8, k_scale, v_q, v_scale, q_block, k_block)


def fp8_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str = "fp16", q_block: int = Q_BLOCK, k_block: int = K_BLOCK
) -> torch.Tensor:
    """The torch reference of `fp8_attention`: the same dequantized Q, K (and V) with an exact fp32 softmax.
    Materializes [B, H, N, L]: small shapes only. Returns [B, H, N, d] in q's dtype."""
    quant = quantize_qkv(q, k, v, pv, q_block, k_block)
    tokens, context = q.shape[2], k.shape[2]
    q_deq = quant.q.float() * quant.q_scale.repeat_interleave(q_block, dim=-1)[..., :tokens, None]
    k_deq = quant.k.float() * quant.k_scale.repeat_interleave(k_block, dim=-1)[..., :context, None]
    v_deq = quant.v.float() if quant.v_scale is None else quant.v.float() * quant.v_scale[..., None, :]
    scores = q_deq @ k_deq.transpose(-1, -2)  # log2 units: d^-0.5 * log2 e is in the q scale
    probs = torch.softmax(scores * math.log(2.0), dim=-1)
    return (probs @ v_deq).to(q.dtype)


@triton.jit
def _fp8_attention_kernel(
    Q, K, V, QS, KS, VS, Out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    heads, n_q, n_kv, n_qs, n_ks,
    HEAD_DIM: tl.constexpr, LANE0: tl.constexpr, LANE1: tl.constexpr,
    Q_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, PV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head), streaming over all keys in BLOCK_N tiles.
    The head dim is two lanes: columns [0, LANE0) and [LANE0, LANE0 + LANE1), masked at HEAD_DIM (LANE1 = 0: none)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    d0 = tl.arange(0, LANE0)
    d0_ok = d0 < HEAD_DIM  # all true unless head_dim < MIN_LANE
    row_ok = offs_m < n_q
    q_base = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    q0 = tl.load(q_base + d0[None, :] * stride_qd, mask=row_ok[:, None] & d0_ok[None, :], other=0.0)
    q_scale = tl.load(QS + pid_bh * n_qs + offs_m // Q_BLOCK, mask=row_ok, other=0.0)
    if LANE1 > 0:
        d1 = LANE0 + tl.arange(0, LANE1)
        d1_ok = d1 < HEAD_DIM
        q1 = tl.load(q_base + d1[None, :] * stride_qd, mask=row_ok[:, None] & d1_ok[None, :], other=0.0)
        acc1 = tl.zeros([BLOCK_M, LANE1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, LANE0], dtype=tl.float32)
    for start in range(0, n_kv, BLOCK_N):
        kn = start + offs_n
        col_ok = kn < n_kv
        k0 = tl.load(k_base + kn[None, :] * stride_kn + d0[:, None] * stride_kd,
                     mask=col_ok[None, :] & d0_ok[:, None], other=0.0)  # fmt: skip
        scores = tl.dot(q0, k0)  # (M, N) fp32 accumulation of e4m3 products
        if LANE1 > 0:
            k1 = tl.load(k_base + kn[None, :] * stride_kn + d1[:, None] * stride_kd,
                         mask=col_ok[None, :] & d1_ok[:, None], other=0.0)  # fmt: skip
            scores += tl.dot(q1, k1)
        k_scale = tl.load(KS + pid_bh * n_ks + kn // K_BLOCK, mask=col_ok, other=0.0)
        scores = scores * q_scale[:, None] * k_scale[None, :]
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_FP8:
            p_lo = (p * 448.0).to(tl.float8e4nv)
        else:
            p_lo = p.to(V.dtype.element_ty)
        v0 = tl.load(v_base + kn[:, None] * stride_vn + d0[None, :] * stride_vd,
                     mask=col_ok[:, None] & d0_ok[None, :], other=0.0)  # fmt: skip
        acc0 = acc0 * alpha[:, None] + tl.dot(p_lo, v0)
        if LANE1 > 0:
            v1 = tl.load(v_base + kn[:, None] * stride_vn + d1[None, :] * stride_vd,
                         mask=col_ok[:, None] & d1_ok[None, :], other=0.0)  # fmt: skip
            acc1 = acc1 * alpha[:, None] + tl.dot(p_lo, v1)
        m_i = m_new
    norm = 1.0 / l_i
    if PV_FP8:
        norm = norm / 448.0
    out_base = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
    out0 = acc0 * norm[:, None]
    if PV_FP8:
        out0 = out0 * tl.load(VS + pid_bh * HEAD_DIM + d0, mask=d0_ok, other=0.0)[None, :]
    tl.store(out_base + d0[None, :] * stride_od, out0.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d0_ok[None, :])  # fmt: skip
    if LANE1 > 0:
        out1 = acc1 * norm[:, None]
        if PV_FP8:
            out1 = out1 * tl.load(VS + pid_bh * HEAD_DIM + d1, mask=d1_ok, other=0.0)[None, :]
        tl.store(out_base + d1[None, :] * stride_od, out1.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & d1_ok[None, :])  # fmt: skip


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
_INTERPRETER_TILES = {"BLOCK_M": 32, "BLOCK_N": 32}  # no autotuning under the interpreter; small tiles keep it quick
_tuned_kernel = triton.autotune(configs=_GPU_CONFIGS, key=["n_kv", "HEAD_DIM", "PV_FP8"])(_fp8_attention_kernel)


def head_lanes(head_dim: int) -> tuple[int, int]:
    """The two power-of-two lanes covering head_dim: (largest power of 2 <= d, the rest rounded up; 0 if none),
    each at least MIN_LANE wide (e4m3 tensor-core dots need K >= 32); columns past head_dim are masked."""
    if head_dim < 16:
        raise ValueError(f"head_dim {head_dim} < 16 is not supported")
    lane0 = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - lane0
    return max(MIN_LANE, lane0), (max(MIN_LANE, next_power_of_2(rest)) if rest else 0)


def fp8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pv: str | None = None, q_block: int = Q_BLOCK,
    k_block: int = K_BLOCK,
) -> torch.Tensor:  # fmt: skip
    """softmax(q k^T / sqrt(d)) v with FP8 Q.K^T, for q [B, H, N, d], k and v [B, H, L, d] (no mask).

    pv: "fp16", "bf16" or "e4m3" (default: v's dtype when it is fp16/bf16, else fp16). Returns [B, H, N, d] in q's
    dtype, as a view of a [B, N, H, d] buffer (so the model's transpose + reshape to [B, N, H*d] copies nothing).
    """
    check_kernel_inputs(q, k, v)
    if pv is None:
        pv = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(v.dtype, "fp16")
    quant = quantize_qkv(q, k, v, pv, q_block, k_block)
    batch, heads, tokens, head_dim = q.shape
    lane0, lane1 = head_lanes(head_dim)
    out = torch.empty(batch, tokens, heads, head_dim, device=q.device, dtype=q.dtype).permute(0, 2, 1, 3)
    v_scale = quant.v_scale if quant.v_scale is not None else quant.k_scale  # an unused pointer when not e4m3
    args = (
        quant.q, quant.k, quant.v, quant.q_scale, quant.k_scale, v_scale, out,
        *quant.q.stride(), *quant.k.stride(), *quant.v.stride(), *out.stride(),
        heads, tokens, k.shape[2], quant.q_scale.shape[-1], quant.k_scale.shape[-1],
    )  # fmt: skip
    constants = {"HEAD_DIM": head_dim, "LANE0": lane0, "LANE1": lane1, "Q_BLOCK": q_block, "K_BLOCK": k_block,
                 "PV_FP8": pv == "e4m3"}  # fmt: skip
    if interpreting():
        tiles = _INTERPRETER_TILES
        grid = (triton.cdiv(tokens, tiles["BLOCK_M"]), batch * heads)
        _fp8_attention_kernel[grid](*args, **constants, **tiles)
    else:
        _tuned_kernel[lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)](*args, **constants)
    return out
