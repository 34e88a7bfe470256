"""Conditioning inputs of the Ruyi transformer: timestep/size/style embedding, text projection, CLIP resampler.

These run once per forward, outside the blocks: `time_extra_emb` gives `temb` [B, D], `text_embedder`
projects the T5-like tokens to the text width, and `clip_projection` (a perceiver resampler) turns the
CLIP patch tokens into n_query tokens. Module names follow the released checkpoint.
See docs/ruyi-architecture.md section 2.6.

Precision follows the reference under CUDA autocast, with explicit casts: inputs may arrive in float32 (the CLIP
tokens, the stored T5 embeddings) and are rounded to the compute dtype where autocast would round them, at the
projections; the resampler's ln_q/ln_kv return float32, and its attention runs as nn.MultiheadAttention does
under autocast (scores in the compute dtype, softmax in float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .norms import LayerNorm
from .transformer_blocks import attention_scale

SINUSOID_DIM = 256  # width of the timestep and image-size sinusoids
META_VALUES = 6  # image_meta_size: original h, w, target h, w, crop top, left
POOL_HEADS = 8


def timestep_sinusoid(t: Tensor, dim: int = SINUSOID_DIM) -> Tensor:
    """[M] -> [M, dim] float32: [cos(t w_k), sin(t w_k)], w_k = exp(-ln(1e4) k / (dim/2)) (flip_sin_to_cos, shift 0)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (M, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2. With fp32_act the SiLU runs in float32 (diffusers FP32SiLU)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, fp32_act: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim)
        self.linear_2 = nn.Linear(hidden_dim, out_dim)
        self.fp32_act = fp32_act

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear_1(x)
        h = F.silu(h.float()).to(h.dtype) if self.fp32_act else F.silu(h)
        return self.linear_2(h)


class AttentionPool(nn.Module):
    """pooler: attention pooling of the T5 tokens with the mean token as the only query (no mask).

    The mean and the positional embedding are added in the input's dtype (the stored embeddings' dtype in the
    reference); the sum is rounded to `dtype` at the projections."""

    def __init__(self, seq_len: int, dim: int, out_dim: int, heads: int = POOL_HEADS):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim**0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads, self.head_dim = heads, dim // heads

    def forward(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """x [B, L, C] -> [B, out_dim] in `dtype`, the compute dtype."""
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+L, C)
        x = (x + self.positional_embedding[None].to(x.dtype)).to(dtype)
        heads = (self.heads, self.head_dim)
        q = self.q_proj(x[:, :1]).unflatten(-1, heads).transpose(1, 2)  # (B, h, 1, C/h)
        k = self.k_proj(x).unflatten(-1, heads).transpose(1, 2)  # (B, h, 1+L, C/h)
        v = self.v_proj(x).unflatten(-1, heads).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v, scale=attention_scale(self.head_dim))  # (B, h, 1, C/h)
        pooled = pooled.transpose(1, 2).flatten(1)  # (B, C)
        return self.c_proj(pooled)


class TimestepTextSizeStyleEmbedding(nn.Module):
    """time_extra_emb: temb = MLP(sinusoid(t)) + extra_embedder(cat[pool(t5), sinusoid(meta sizes), style])."""

    def __init__(self, dim: int, pooled_dim: int, t5_len: int, t5_dim: int):
        super().__init__()
        self.timestep_embedder = MLP(SINUSOID_DIM, dim, dim, fp32_act=False)
        self.pooler = AttentionPool(t5_len, t5_dim, pooled_dim)
        self.style_embedder = nn.Embedding(1, dim)
        self.extra_embedder = MLP(SINUSOID_DIM * META_VALUES + dim + pooled_dim, dim * 4, dim, fp32_act=True)

    def forward(
        self, timestep: Tensor, t5_states: Tensor, image_meta_size: Tensor, style: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """timestep [B] (float32: exact, or already rounded by the pipeline), t5_states [B, L5, C5] (raw, unmasked,
        any float dtype), image_meta_size [B, 6], style [B] -> [B, D] in `dtype`, the compute dtype."""
        batch = t5_states.shape[0]
        t_emb = self.timestep_embedder(timestep_sinusoid(timestep).to(dtype))  # (B, D)
        pooled = self.pooler(t5_states, dtype)  # (B, pooled_dim)
        meta = timestep_sinusoid(image_meta_size.reshape(-1)).to(dtype).reshape(batch, -1)  # (B, 6*256)
        style_emb = self.style_embedder(style)  # (B, D)
        return t_emb + self.extra_embedder(torch.cat([pooled, meta, style_emb], dim=1))


def sincos_2d_table(dim: int, grid_size: int) -> Tensor:
    """MAE 2-D sin-cos table [grid_size^2, dim], float32: first half encodes x (column), second half y,
    each as [sin, cos] of pos * 10000^(-k/(dim/4))."""

    def axis(pos: Tensor, axis_dim: int) -> Tensor:
        omega = torch.arange(axis_dim // 2, dtype=torch.float32) / (axis_dim / 2.0)
        omega = 1.0 / 10000.0**omega  # (axis_dim/2,)
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # each (grid, grid), row-major
    return torch.cat([axis(xs, dim // 2), axis(ys, dim // 2)], dim=1)


class ResamplerAttention(nn.Module):
    """nn.MultiheadAttention (in_proj_weight/bias, out_proj of torch's NonDynamicallyQuantizableLinear class),
    batch-first, computed as the reference's does under autocast (need_weights path): inputs rounded to the
    weights' dtype at the projections, scores q k^T / sqrt(d) in that dtype, softmax in float32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = NonDynamicallyQuantizableLinear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """query [B, Q, E], key/value [B, L, E] (any float dtype) -> [B, Q, E] in the weights' dtype."""
        dtype = self.in_proj_weight.dtype
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        heads = (self.heads, self.head_dim)
        q = F.linear(query.to(dtype), w_q, b_q).unflatten(-1, heads).transpose(1, 2)  # (B, h, Q, E/h)
        k = F.linear(key.to(dtype), w_k, b_k).unflatten(-1, heads).transpose(1, 2)  # (B, h, L, E/h)
        v = F.linear(value.to(dtype), w_v, b_v).unflatten(-1, heads).transpose(1, 2)
        scores = (q * attention_scale(self.head_dim)) @ k.transpose(-2, -1)  # (B, h, Q, L)
        weights = scores.float().softmax(dim=-1).to(dtype)
        out = (weights @ v).transpose(1, 2).flatten(2)  # (B, Q, E)
        return self.out_proj(out)


class Resampler(nn.Module):
    """clip_projection: n_query learned queries attend once to the CLIP patch tokens.

    Queries get the fixed grid x grid sin-cos table `pos_embed`; keys get it bicubically resized to the
    CLIP token grid (sqrt(L) x sqrt(L)), computed in float32.
    """

    def __init__(self, grid_size: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.grid_size = grid_size
        self.pos_embed = nn.Parameter(sincos_2d_table(dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.randn(grid_size**2, dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else None
        self.attn = ResamplerAttention(dim, heads)
        self.ln_q = LayerNorm(dim, eps=1e-5)
        self.ln_kv = LayerNorm(dim, eps=1e-5)

    def key_pos_embed(self, num_tokens: int) -> Tensor:
        """pos_embed resized to the int(sqrt(num_tokens))^2 key grid: [num_tokens, dim]."""
        target = int(math.sqrt(num_tokens))
        if target == self.grid_size:
            return self.pos_embed
        grid = self.pos_embed.float().reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(target, target), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, kv_dim] CLIP patch tokens (L a square; float32 from the image encoder) -> [B, n_query, dim].

        ln_q/ln_kv return float32, so queries, keys and values reach the attention's projections unrounded."""
        batch = x.shape[0]
        key_pos = self.key_pos_embed(x.shape[1])  # (L, E)
        if self.kv_proj is not None:
            x = self.kv_proj(x.to(self.attn.in_proj_weight.dtype))
        kv = self.ln_kv(x)  # (B, L, E) float32
        q = (self.ln_q(self.query) + self.pos_embed).expand(batch, -1, -1)  # (B, Q, E) float32
        return self.attn(q, kv + key_pos, kv)
