"""Device-memory estimates for one run, from configs alone (no weights are read): the planner's cost model.

- Weights: the transformer's parameter inventory (docs/ruyi-architecture.md section 2.2-2.3) with the FP8
  storage rules of `weights.fp8_storage`, the VAE's parameters (counted on the meta device) and the CLIP tower's.
- Transformer activations per call, in units of one hidden state h = b*N*D elements (b samples per call):
  the embed output and the running hidden state, the long-skip tensors, and the largest transient of a
  block, as measured inside one full-size block with tools/fake_cuda: self-attention at q's RoPE (3 h: the
  norm1 output, v and the negated half of q; 6 h in float32: q and k as their LayerNorms return them, the
  rotated copy, the two RoPE products and their sum), the FFN (3 h: norm3 output and running states, plus
  inner and GELU output, b*N*Dff each), or the skip fuse (cat[x, skip], its fp32 copy and fp32 LayerNorm
  output). SDPA runs as flash/memory-efficient attention, so no N x N matrix is counted.
- VAE encode/decode: the largest tensor of one chunk (the first down block's / last up block's width at
  full resolution over one chunk's frames, or over one spatial tile) times a measured live set, plus the
  video tensors the pipeline's decode stage keeps (fp32 copies during the seam smoothing).
These are estimates of `torch.cuda.max_memory_allocated`; tools/streaming_check.py prints them beside
measured peaks so the coefficients can be checked on a GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from ...models.transformer import TransformerConfig
from ...models.vae_config import VAEConfig
from .host import FLAT_ALIGN

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP8_BYTES = 1
TEMPORAL_PE_LEN = 512  # rows of each block's t_embed.pe buffer
SINUSOID_DIM = 256  # timestep/meta sinusoid width
META_VALUES = 6  # image_meta_size entries
# Live set of a VAE call in units of its largest tensor, measured with tools/memory_check (fake CUDA, the full VAE,
# bf16, 384/512 px tiles and untiled at 768x768 and 576x1008: 3.63-3.74 decode, 6.27-6.33 encode).
VAE_DECODE_LIVE = 3.75
VAE_ENCODE_LIVE = 6.35
VIDEO_FP32_COPIES = 5  # seam-smoothing blend: old video, re-decoded frames, the clone and two temporaries


@dataclass(frozen=True)
class ClipSpec:
    """The CLIP vision tower's sizes (image_encoder/config.json, `vision_config` of a full CLIPConfig)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> ClipSpec:
        vision = data.get("vision_config", data)
        defaults = cls()
        return cls(**{name: vision.get(name, getattr(defaults, name)) for name in defaults.__dataclass_fields__})

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def parameters(self) -> int:
        """CLIPVisionModelWithProjection's parameter count."""
        h, i = self.hidden_size, self.intermediate_size
        embeddings = h + 3 * self.patch_size**2 * h + self.tokens * h
        layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
        return embeddings + 4 * h + self.num_hidden_layers * layer + h * self.projection_dim


def _linear(out_dim: int, in_dim: int, bias: bool = True) -> tuple[str, int, int]:
    return ("linear", out_dim * in_dim, out_dim * in_dim + (out_dim if bias else 0))


def _norm(dim: int) -> tuple[str, int, int]:
    return ("norm", 0, 2 * dim)  # FP32LayerNorm with affine weight and bias


def _fixed(numel: int) -> tuple[str, int, int]:
    # never stored in fp8: top-level parameters, embeddings, the patch conv, the plain (q/k, resampler) LayerNorms,
    # the resampler's attention
    return ("fixed", 0, numel)


def _block_inventory(cfg: TransformerConfig, has_skip: bool) -> list[tuple[str, int, int]]:
    d, c, ff, hd = cfg.inner_dim, cfg.cross_attention_dim, cfg.ff_inner_dim, cfg.attention_head_dim
    attn_self = [_linear(d, d)] * 4 + [_fixed(2 * hd)] * 2
    attn_cross = [_linear(d, d), _linear(d, c), _linear(d, c), _linear(d, d)] + [_fixed(2 * hd)] * 2
    items = [_linear(d, d), _norm(d), *attn_self, _norm(d), *attn_cross, _norm(d), *attn_cross]
    items += [_norm(d), _linear(2 * d, d), _norm(d), _norm(d), _linear(ff, d), _linear(d, ff)]
    if has_skip:
        items += [("norm", 0, 4 * d), _linear(d, 2 * d)]
    return items


def _other_inventory(cfg: TransformerConfig) -> list[tuple[str, int, int]]:
    d, c, t5, p = cfg.inner_dim, cfg.cross_attention_dim, cfg.cross_attention_dim_t5, cfg.patch_size
    pooled = cfg.pooled_projection_dim
    resampler = [_fixed(2 * cfg.n_query * c + 3 * c * c + 3 * c + 4 * c + c * c + c)]
    if cfg.projection_dim != c:
        resampler.append(_linear(c, cfg.projection_dim, bias=False))
    return [
        _linear(4 * t5, t5), _linear(c, 4 * t5), _fixed(cfg.text_tokens * c),
        _fixed(d * cfg.in_channels * p * p + d),
        _linear(d, SINUSOID_DIM), _linear(d, d),
        _fixed((cfg.text_len_t5 + 1) * t5), _linear(t5, t5), _linear(t5, t5), _linear(t5, t5), _linear(pooled, t5),
        _fixed(d),
        _linear(4 * d, SINUSOID_DIM * META_VALUES + d + pooled), _linear(d, 4 * d),
        _fixed(cfg.n_query * c), *resampler,
        _linear(2 * d, d), _linear(p * p * cfg.output_channels, d),
    ]  # fmt: skip


def _bytes(items: list[tuple[str, int, int]], dtype_bytes: int, fp8: str, hidden: int) -> int:
    total = 0
    for kind, matrix, numel in items:
        if kind == "linear" and fp8 in ("lite", "strong"):
            stored = matrix > hidden**2 - (1 if fp8 == "strong" else 0)
        else:
            stored = fp8 == "extreme" and kind in ("linear", "norm")
        total += numel * (FP8_BYTES if stored else dtype_bytes)
    return total


@dataclass(frozen=True)
class TransformerWeights:
    """Bytes of the transformer's non-block parts, one plain block and one long-skip block, as stored."""

    other: int
    plain_block: int
    skip_block: int
    num_blocks: int
    skip_blocks: frozenset[int]

    def block(self, index: int) -> int:
        return self.skip_block if index in self.skip_blocks else self.plain_block

    @property
    def total(self) -> int:
        return self.other + sum(self.block(i) for i in range(self.num_blocks))


def transformer_weights(cfg: TransformerConfig, dtype_bytes: int, fp8: str = "none") -> TransformerWeights:
    """Stored weight bytes of the transformer in the run dtype with FP8 storage mode `fp8` (weights.fp8_storage rules)."""
    d = cfg.inner_dim
    pe = TEMPORAL_PE_LEN * d * dtype_bytes if cfg.time_position_encoding else 0
    return TransformerWeights(
        other=_bytes(_other_inventory(cfg), dtype_bytes, fp8, d),
        plain_block=_bytes(_block_inventory(cfg, False), dtype_bytes, fp8, d) + pe,
        skip_block=_bytes(_block_inventory(cfg, True), dtype_bytes, fp8, d) + pe,
        num_blocks=cfg.num_layers,
        skip_blocks=frozenset(cfg.skip_blocks),
    )


def flat_block_bytes(cfg: TransformerConfig, weights: TransformerWeights, index: int) -> int:
    """At most the bytes of block `index`'s flat host buffer: its weights plus each tensor's alignment padding
    (`runtime.memory.streaming.FlatLayout`; every inventory item counted as weight and bias)."""
    items = _block_inventory(cfg, index in weights.skip_blocks)
    tensors = 2 * len(items) + (1 if cfg.time_position_encoding else 0)
    return weights.block(index) + FLAT_ALIGN * tensors


@functools.lru_cache(maxsize=8)
def _vae_parameters(cfg: VAEConfig) -> int:
    from ...models.vae import RuyiVAE

    with torch.device("meta"):
        return sum(p.numel() for p in RuyiVAE(cfg).parameters())


def vae_weight_bytes(cfg: VAEConfig, dtype_bytes: int) -> int:
    return _vae_parameters(cfg) * dtype_bytes


def clip_weight_bytes(clip: ClipSpec, dtype_bytes: int) -> int:
    return clip.parameters * dtype_bytes


@dataclass(frozen=True)
class CallShape:
    """One denoiser call: `batch` samples of `tokens` tokens each."""

    batch: int
    tokens: int


def hidden_bytes(cfg: TransformerConfig, call: CallShape, dtype_bytes: int) -> int:
    """One hidden state [b, N, D] in the run dtype."""
    return call.batch * call.tokens * cfg.inner_dim * dtype_bytes


def block_transient_bytes(cfg: TransformerConfig, call: CallShape, dtype_bytes: int) -> dict[str, int]:
    """The largest temporaries inside one block, by sub-step (see the module docstring)."""
    h = hidden_bytes(cfg, call, dtype_bytes)
    h32 = call.batch * call.tokens * cfg.inner_dim * 4
    ff = call.batch * call.tokens * cfg.ff_inner_dim * dtype_bytes
    return {
        "self-attention (fp32 q/k after their LayerNorms, fp32 RoPE temporaries)": 3 * h + 6 * h32,
        "FFN inner + GELU output": 3 * h + 2 * ff,
        "long-skip fuse (cat + fp32 LayerNorm)": 2 * h + 4 * h32,
    }


def conditioning_bytes(cfg: TransformerConfig, batch: int, call: CallShape, latent_elems: int, dtype_bytes: int) -> int:
    """Per-call inputs that stay live over the blocks: text/CLIP states, temb, fp32 RoPE tables, latents."""
    text = batch * cfg.text_tokens * cfg.cross_attention_dim
    clip = batch * cfg.n_query * cfg.cross_attention_dim
    raw = batch * (cfg.text_len * cfg.cross_attention_dim + cfg.text_len_t5 * cfg.cross_attention_dim_t5)
    latents = batch * latent_elems * (cfg.in_channels + cfg.output_channels)
    rope = 2 * call.tokens * cfg.attention_head_dim * 4
    return (text + clip + raw + latents + batch * cfg.inner_dim) * dtype_bytes + rope


def _tile_extent(size: int, tile: int | None) -> int:
    return size if tile is None else min(size, tile)


def vae_decode_call_bytes(
    cfg: VAEConfig, height: int, width: int, frames: int, dtype_bytes: int, tile: int | None = None
) -> int:
    """One `RuyiVAE.decode` of a whole video: the largest chunk tensor (the last up block's input, one chunk's
    frames, one tile) times the measured live set, the decoded video, and the fp32 blend accumulators of a
    tiled chunk."""
    chunk_frames = cfg.mini_batch_decoder * cfg.temporal_factor
    channels = cfg.block_out_channels[1] if len(cfg.block_out_channels) > 1 else cfg.block_out_channels[0]
    th, tw = _tile_extent(height, tile), _tile_extent(width, tile)
    largest = channels * chunk_frames * th * tw * dtype_bytes
    blend = 0 if (th, tw) == (height, width) else 2 * 3 * chunk_frames * height * width * 4
    return int(VAE_DECODE_LIVE * largest) + blend + 3 * frames * height * width * dtype_bytes


def vae_encode_call_bytes(
    cfg: VAEConfig, height: int, width: int, frames: int, dtype_bytes: int, tile: int | None = None
) -> int:
    """One `RuyiVAE.encode` of a whole video on the device: its largest chunk tensor (the first down block's
    width over one encoder chunk, one tile) times the measured live set, plus the input video."""
    th, tw = _tile_extent(height, tile), _tile_extent(width, tile)
    largest = cfg.block_out_channels[0] * cfg.mini_batch_encoder * th * tw * dtype_bytes
    return int(VAE_ENCODE_LIVE * largest) + 3 * frames * height * width * dtype_bytes


def vae_decode_bytes(
    cfg: VAEConfig, height: int, width: int, frames: int, dtype_bytes: int, tile: int | None = None
) -> int:
    """The pipeline's decode stage (`RuyiPipeline.decode_latents`): the decode call, then in slice mode the seam
    smoothing, which keeps the fp32 video while it re-encodes and re-decodes the middle frames and then blends
    (old video, re-decoded frames, the clone and two temporaries: 5 fp32 copies at once)."""
    pixels = 3 * frames * height * width
    call = vae_decode_call_bytes(cfg, height, width, frames, dtype_bytes, tile)
    if cfg.cache_compression_vae:  # no seam smoothing: the bf16 output, its fp32 copy and the clamped copy
        return max(call, pixels * (dtype_bytes + 2 * 4))
    encode = vae_encode_call_bytes(cfg, height, width, frames, dtype_bytes, tile)
    return max(call, 4 * pixels + encode, 4 * pixels + call, VIDEO_FP32_COPIES * 4 * pixels)


def vae_encode_bytes(
    cfg: VAEConfig, height: int, width: int, frames: int, dtype_bytes: int, tile: int | None = None
) -> int:
    """The pipeline's encode stage: one encode call of the conditioning video (the posterior sample is small)."""
    return vae_encode_call_bytes(cfg, height, width, frames, dtype_bytes, tile)


def clip_activation_bytes(clip: ClipSpec, dtype_bytes: int) -> int:
    """A few [1, tokens, intermediate] temporaries: tiny next to everything else."""
    return 8 * clip.tokens * clip.intermediate_size * dtype_bytes


def step_flops(cfg: TransformerConfig, samples: int, tokens: int) -> float:
    """FLOPs of one denoising step (docs section 7): linear layers plus N x N self-attention, per sample."""
    d, dff, layers = cfg.inner_dim, cfg.ff_inner_dim, cfg.num_layers
    linear = tokens * 2 * (layers * (10 * d * d + 2 * d * dff) + len(cfg.skip_blocks) * 2 * d * d)
    attention = layers * 4 * tokens * tokens * d
    cross = layers * 4 * tokens * (cfg.text_tokens + cfg.n_query) * d
    return samples * float(linear + attention + cross)


def gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


__all__ = [
    "DTYPE_BYTES",
    "CallShape",
    "ClipSpec",
    "GiB",
    "TransformerWeights",
    "block_transient_bytes",
    "clip_activation_bytes",
    "clip_weight_bytes",
    "conditioning_bytes",
    "flat_block_bytes",
    "gib",
    "hidden_bytes",
    "step_flops",
    "transformer_weights",
    "vae_decode_bytes",
    "vae_decode_call_bytes",
    "vae_encode_bytes",
    "vae_encode_call_bytes",
    "vae_weight_bytes",
]  # fmt: skip
