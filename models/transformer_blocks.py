"""The repeated block of the Ruyi transformer (HunyuanDiTBlock, basic type) and its layers.

Submodule names follow the released checkpoint (`attn1.to_q`, `ff.net.0.proj`, `t_embed.pe`, ...).
Numerics follow the reference under bf16: every LayerNorm runs in float32, the adaLN SiLU runs in
float32, and RoPE is applied in float32. See docs/ruyi-architecture.md sections 2.3-2.4 and 8.

Shape letters: B batch, N = F*S tokens (F frames, S = hp*wp patches per frame), D model width,
H heads, d head width, L context length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rope import apply_rotary

NORM_EPS = 1e-6
TEMPORAL_PE_LEN = 512  # frames covered by the temporal sin-cos table

# The self-attention core: (q, k, v) [B, H, N, d] after QK-norm and RoPE -> [B, H, N, d], scale d^-0.5, no mask.
# None means F.scaled_dot_product_attention; a sequence-parallel runner passes one that sees the whole sequence.
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (input, weight and bias upcast), cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def temporal_table(dim: int, length: int = TEMPORAL_PE_LEN) -> Tensor:
    """Sin-cos table [1, length, dim]: even channels sin(f * w_i), odd channels cos(f * w_i),
    w_i = 10000^(-2i/dim). Same float32 arithmetic as the reference buffer."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(1, length, dim)
    table[0, :, 0::2] = torch.sin(position * div_term)
    table[0, :, 1::2] = torch.cos(position * div_term)
    return table


class TemporalPositionalEncoding(nn.Module):
    """Holds the fixed temporal table as the persistent buffer `pe` (a checkpoint key)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("pe", temporal_table(dim))

    def forward(self, x: Tensor, num_frames: int, frame_index: Tensor | None = None) -> Tensor:
        """x [B, F*S, D] -> x + pe[f] for the frame f of each token.

        frame_index [n] (int64): x holds only n tokens of the sequence (a sequence-parallel slice), token i
        belonging to frame frame_index[i]; None: x holds all F*S tokens, frame-major."""
        if frame_index is not None:
            return x + self.pe[0, frame_index]
        batch, tokens, dim = x.shape
        x = x.view(batch, num_frames, tokens // num_frames, dim)  # (B, F, S, D)
        x = x + self.pe[0, :num_frames, None, :]
        return x.view(batch, tokens, dim)


class AdaLayerNormShift(nn.Module):
    """norm1: LN_fp32(x) + Linear(SiLU(temb)); shift only (no scale, no gate)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = FP32LayerNorm(dim, eps=NORM_EPS)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        shift = self.linear(F.silu(temb.float()).to(temb.dtype))  # (B, D)
        return self.norm(x) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head attention with per-head LayerNorm on q and k, RoPE, and no mask.

    Self-attention rotates q and k; cross-attention (context_dim given) rotates q only.
    `attention_fn` is the local attention kernel (an `AttentionFn`): SDPA unless a backend plugs in another one
    (the FP8 attention of kernels/, runtime/backends/fast_compute.py). A per-call `attend` (sequence
    parallelism) takes precedence over it.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.rotate_keys = context_dim is None
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.norm_q = FP32LayerNorm(self.head_dim, eps=NORM_EPS)
        self.norm_k = FP32LayerNorm(self.head_dim, eps=NORM_EPS)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.attention_fn: AttentionFn = F.scaled_dot_product_attention

    def forward(
        self,
        x: Tensor,
        context: Tensor | None,
        cos: Tensor,
        sin: Tensor,
        enhance_weight: float | None = None,
        num_frames: int = 1,
        attend: AttentionFn | None = None,
    ) -> Tensor:
        """x [B, N, D], context [B, L, C] (None: x itself), cos/sin [N, d] float32 -> [B, N, D].

        attend replaces F.scaled_dot_product_attention on (q, k, v) after QK-norm and RoPE (see `AttentionFn`).

        enhance_weight (self-attention only; None: off): Enhance-A-Video. The output is multiplied by
        `enhance_a_video_score(q, k, num_frames, enhance_weight)`, taken from q and k after the QK LayerNorm
        and before RoPE (reference `HunyuanAttnProcessor2_0_EnhanceAVideo`)."""
        context = x if context is None else context
        batch = x.shape[0]
        q = self.to_q(x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, N, d)
        k = self.to_k(context).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, L, d)
        v = self.to_v(context).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, L, d)
        q = self.norm_q(q)
        k = self.norm_k(k)
        score = None
        if enhance_weight is not None:
            if not self.rotate_keys:
                raise ValueError("Enhance-A-Video applies to self-attention only.")
            score = enhance_a_video_score(q, k, num_frames, enhance_weight)
        q = apply_rotary(q, cos, sin)
        if self.rotate_keys:
            k = apply_rotary(k, cos, sin)
        out = (attend or self.attention_fn)(q, k, v)  # (B, H, N, d), scale d^-0.5
        out = out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim)  # (B, N, D)
        out = self.to_out[0](out)
        if score is not None:
            out = out * score  # a 0-dim float32 tensor: out keeps its dtype
        return out


def enhance_a_video_score(q: Tensor, k: Tensor, num_frames: int, weight: float) -> Tensor | None:
    """Enhance-A-Video's temperature score, a 0-dim float32 tensor (reference `enhance_score`).

    q, k [B, H, F*S, d] (frame-major tokens, after the QK LayerNorm, before RoPE). For every batch
    entry, spatial position and head, the frame-to-frame attention softmax((q_f * d^-0.5) k_f^T) in
    float32 ([B*S, H, F, F]; the product itself in the input dtype, as in the reference) gives the mean
    of its F*F - F off-diagonal entries. The score is the mean of those means over the whole batch, heads
    and positions, times (F + weight), clamped to >= 1. With a single frame there is no off-diagonal
    entry (the reference divides by zero and yields NaN): None, i.e. no scaling.
    """
    if num_frames < 2:
        return None
    batch, heads, tokens, head_dim = q.shape
    spatial = tokens // num_frames
    q_frames = q.reshape(batch, heads, num_frames, spatial, head_dim).permute(0, 3, 1, 2, 4)  # (B, S, H, F, d)
    k_frames = k.reshape(batch, heads, num_frames, spatial, head_dim).permute(0, 3, 1, 2, 4)
    attn = (q_frames * head_dim**-0.5) @ k_frames.transpose(-2, -1)  # (B, S, H, F, F)
    attn = attn.float().softmax(dim=-1).reshape(-1, num_frames, num_frames)
    diagonal = torch.eye(num_frames, dtype=torch.bool, device=attn.device)
    off_diagonal_sum = attn.masked_fill(diagonal, 0).sum(dim=(1, 2))
    mean = off_diagonal_sum / (num_frames * num_frames - num_frames)
    return (mean.mean() * (num_frames + weight)).clamp(min=1)


class GEGLU(nn.Module):
    """gate_clip: a * gelu(g) with a, g = proj(LN(x)).chunk(2).

    The reference builds this LayerNorm as FP32LayerNorm(dim, dim, affine), which puts dim in the
    eps slot: eps = dim (2816 in Ruyi-Mini-7B). The trained weights expect it, so it is kept.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps=float(dim))
        self.proj = nn.Linear(dim, dim * 2)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(self.norm(x)).chunk(2, dim=-1)
        return a * F.gelu(gate)


class GELUProjection(nn.Module):
    """ff.net.0: Linear then GELU (tanh approximation for "gelu-approximate")."""

    def __init__(self, dim: int, inner_dim: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """ff: net.0 (Linear + GELU), net.1 (dropout slot, no weights), net.2 (Linear)."""

    def __init__(self, dim: int, inner_dim: int, approximate: str):
        super().__init__()
        self.net = nn.ModuleList(
            [GELUProjection(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, dim)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """One DiT block: [long skip] -> [temporal PE] -> self-attn -> text cross-attn -> CLIP branch -> FFN."""

    def __init__(
        self,
        dim: int,
        heads: int,
        context_dim: int,
        ff_inner_dim: int,
        gelu_approximate: str,
        has_skip: bool,
        time_position_encoding: bool,
    ):
        super().__init__()
        self.norm1 = AdaLayerNormShift(dim)
        self.t_embed = TemporalPositionalEncoding(dim) if time_position_encoding else None
        self.attn1 = Attention(dim, heads)
        self.norm2 = FP32LayerNorm(dim, eps=NORM_EPS)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm_clip = FP32LayerNorm(dim, eps=NORM_EPS)
        self.attn_clip = Attention(dim, heads, context_dim)
        self.gate_clip = GEGLU(dim)
        self.norm_clip_out = FP32LayerNorm(dim, eps=NORM_EPS)
        self.norm3 = FP32LayerNorm(dim, eps=NORM_EPS)
        self.ff = FeedForward(dim, ff_inner_dim, gelu_approximate)
        if has_skip:
            self.skip_norm = FP32LayerNorm(2 * dim, eps=NORM_EPS)
            self.skip_linear = nn.Linear(2 * dim, dim)
        else:
            self.skip_norm = None
            self.skip_linear = None

    @property
    def has_skip(self) -> bool:
        return self.skip_linear is not None

    def forward(
        self,
        x: Tensor,
        temb: Tensor,
        text_states: Tensor,
        clip_states: Tensor,
        rope_cos: Tensor,
        rope_sin: Tensor,
        num_frames: int,
        skip: Tensor | None = None,
        enhance_weight: float | None = None,
        frame_index: Tensor | None = None,
        attend: AttentionFn | None = None,
    ) -> Tensor:
        """x [B, N, D], temb [B, D], text_states [B, L_text, C], clip_states [B, n_query, C],
        rope_cos/rope_sin [N, d] float32 (already tiled over frames), skip [B, N, D] in skip blocks.
        enhance_weight: Enhance-A-Video on the self-attention output (None: off, the exported default);
        the torch `BlockRunner` passes it on the steps where it is active.
        frame_index, attend (sequence parallelism; None: off): x, rope and skip hold a slice of the tokens,
        frame_index [N] gives each token's frame for the temporal PE, and `attend` runs the self-attention core
        over the whole sequence (cross-attention, the FFN and the skip fuse are token-local)."""
        # 0. Long skip: x = Linear(LN_fp32(cat[x, skip]))
        if self.has_skip:
            if skip is None:
                raise ValueError("this block has a long skip connection; pass skip=[B, N, D]")
            x = self.skip_linear(self.skip_norm(torch.cat([x, skip], dim=-1)))  # (B, N, D)

        # 1. Temporal sin-cos PE, added in every block when there is more than one frame
        if num_frames != 1 and self.t_embed is not None:
            x = self.t_embed(x, num_frames, frame_index)

        # 2. Self-attention over all frames and patches (RoPE on q and k)
        x = x + self.attn1(self.norm1(x, temb), None, rope_cos, rope_sin, enhance_weight, num_frames, attend)

        # 3. Cross-attention to the text tokens (RoPE on q only)
        x = x + self.attn2(self.norm2(x), text_states, rope_cos, rope_sin)

        # 4. Cross-attention to the CLIP image tokens, gated (RoPE on q only)
        clip_out = self.attn_clip(self.norm_clip(x), clip_states, rope_cos, rope_sin)
        x = x + self.norm_clip_out(self.gate_clip(clip_out))

        # 5. Feed-forward
        return x + self.ff(self.norm3(x))
