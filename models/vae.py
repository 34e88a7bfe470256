"""Ruyi's causal 3D video VAE (EasyAnimate `AutoencoderKLMagvit`), see docs/ruyi-architecture.md section 3.

Video [B, 3, F, H, W] in [-1, 1] <-> latents [B, 16, F', H/8, W/8]. Time is processed in chunks, exactly as
the reference does it:

* Encode: an odd frame count encodes frame 0 alone, then chunks of `mini_batch_encoder` frames; every chunk
  zero-pads time on both sides, so 8 frames give 2 latents and 1 frame gives 1 latent.
* Decode, slice mode (`slice_compression_vae`): an odd latent count decodes latent 0 alone to one frame. Then
  chunks of `mini_batch_decoder` latents; conv_in and the mid block also see the previous and the next chunk,
  and that context is cropped off before the up blocks. Each latent gives 4 frames.
* Decode, cache mode (`cache_compression_vae`, which wins if both flags are set): chunks of
  `mini_batch_decoder` latents with causal convs; the first chunk replicates its first frame, later chunks
  read the last two input frames of every conv from the previous chunk (a cache of one tensor per conv).
  A single latent in total decodes to one frame; otherwise each latent gives 4 frames (3 latents -> 12).

The per-chunk computations (`encode_chunk`, `decode_chunk`, `decode_chunk_cached`) take and return plain
tensors, so one chunk can be exported as a graph. The Python loops over the chunk plans of
`VAEConfig.encode_chunks` / `VAEConfig.decode_chunks` are `encode_in_chunks` / `decode_in_chunks`, which take
the per-chunk callables: `RuyiVAE.encode`/`decode` pass their own, other backends pass theirs.

Unsupported (rejected by `VAEConfig` with a ValueError): tiling (`use_tiling*`), global-context blocks, other
block or attention types, and configs with neither slice nor cache compression. `upcast_vae` has no effect:
the caller picks the dtype (the reference's upcast equals loading with dtype=torch.float32).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import config_from_dict, config_to_dict, load_into, load_weights, read_config
from .vae_blocks import ACTIVATIONS, DOWN_BLOCKS, UP_BLOCKS, Decoder, Encoder, TimePadding

DECODE_MODES = ("one_frame", "slice", "cache_first", "cache_next")


@dataclass(frozen=True)
class DecodeChunk:
    """One decoder call: latents [start, stop), `before`/`after` context latents, and the padding mode."""

    start: int
    stop: int
    mode: str  # one of DECODE_MODES
    before: int = 0
    after: int = 0


def _as_tuple(value: Any, name: str) -> Any:
    if isinstance(value, str):  # the reference accepts block type lists written as a Python string
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{name}={value!r} is not a list") from exc
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class VAEConfig:
    """vae/config.json; field names equal the JSON keys, defaults are the reference's `__init__` defaults."""

    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    block_out_channels: tuple[int, ...] | None = None  # ch * ch_mult; only the pipeline reads it
    use_gc_blocks: tuple[bool, ...] | None = None
    mid_block_type: str = "MidBlock3D"
    mid_block_use_attention: bool = True
    mid_block_attention_type: str = "3d"
    mid_block_num_attention_heads: int = 1
    layers_per_block: int = 2
    act_fn: str = "silu"
    num_attention_heads: int = 1  # only used by attention down/up block types, which are not supported
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.1825
    slice_mag_vae: bool = True
    slice_compression_vae: bool = False
    cache_compression_vae: bool = False
    use_tiling: bool = False
    use_tiling_encoder: bool = False
    use_tiling_decoder: bool = False
    upcast_vae: bool = False
    mini_batch_encoder: int = 9
    mini_batch_decoder: int = 3
    spatial_group_norm: bool = False
    tile_sample_min_size: int = 384
    tile_overlap_factor: float = 0.25

    def __post_init__(self) -> None:
        for name in ("down_block_types", "up_block_types", "ch_mult", "block_out_channels", "use_gc_blocks"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name), name))
        channels = tuple(self.ch * m for m in self.ch_mult)
        if self.block_out_channels is None:
            object.__setattr__(self, "block_out_channels", channels)
        object.__setattr__(self, "act_fn", self.act_fn.lower())
        self._validate(channels)

    def _validate(self, channels: tuple[int, ...]) -> None:
        n = len(self.ch_mult)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types need {n} entries (one per ch_mult entry)")
        if self.block_out_channels != channels:
            raise ValueError(f"block_out_channels={list(self.block_out_channels)} != ch * ch_mult = {list(channels)}")
        unknown = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
        unknown += [t for t in self.up_block_types if t not in UP_BLOCKS]
        if unknown:
            raise ValueError(f"block types {unknown} are not supported; use {list(DOWN_BLOCKS) + list(UP_BLOCKS)}")
        if self.use_gc_blocks is not None and any(self.use_gc_blocks):
            raise ValueError("use_gc_blocks: global-context blocks are not supported; use null")
        if self.mid_block_type != "MidBlock3D":
            raise ValueError(f"mid_block_type={self.mid_block_type!r} is not supported; use 'MidBlock3D'")
        if self.mid_block_use_attention and self.mid_block_attention_type not in ("spatial", "3d"):
            raise ValueError(f"mid_block_attention_type={self.mid_block_attention_type!r}: use 'spatial' or '3d'")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; use one of {sorted(ACTIVATIONS)}")
        if not (self.slice_compression_vae or self.cache_compression_vae):
            raise ValueError(
                "set slice_compression_vae or cache_compression_vae; other chunking modes are not supported"
            )
        if self.use_tiling or self.use_tiling_encoder or self.use_tiling_decoder:
            raise ValueError(
                "use_tiling, use_tiling_encoder and use_tiling_decoder must be false: tiling is not supported"
            )
        if any(c % self.norm_num_groups for c in channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width {list(channels)}")
        if self.mini_batch_encoder < 1 or self.mini_batch_decoder < 1 or self.layers_per_block < 1:
            raise ValueError("mini_batch_encoder, mini_batch_decoder and layers_per_block must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "vae config") -> VAEConfig:
        return config_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def full(cls) -> VAEConfig:
        """The assumed Ruyi-Mini-7B values (architecture doc section 3; the real config.json is unverified)."""
        return cls(
            down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
            up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
            ch=128, ch_mult=(1, 2, 4, 4), layers_per_block=2, norm_num_groups=32, latent_channels=16,
            mid_block_attention_type="spatial", spatial_group_norm=True, slice_mag_vae=False,
            slice_compression_vae=True, mini_batch_encoder=8, mini_batch_decoder=2,
            scaling_factor=0.7125,  # EasyAnimate V5's value; read the real one from vae/config.json
        )  # fmt: skip

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Small test preset: the full layout with 8 base channels and 4 norm groups (as the golden slice VAE)."""
        return dataclasses.replace(cls.full(), ch=8, norm_num_groups=4, block_out_channels=None)

    @property
    def mid_attention(self) -> str | None:
        return self.mid_block_attention_type if self.mid_block_use_attention else None

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(DOWN_BLOCKS[t] for t in self.down_block_types[:-1])

    def encode_chunks(self, num_frames: int) -> list[tuple[int, int]]:
        """Frame ranges [start, stop) that the encoder processes separately."""
        first = [(0, 1)] if num_frames % 2 else []
        start = len(first)
        step = self.mini_batch_encoder
        return first + [(i, min(i + step, num_frames)) for i in range(start, num_frames, step)]

    def decode_chunks(self, num_latents: int) -> list[DecodeChunk]:
        """The decoder calls for `num_latents` latent frames, in order."""
        n, step = num_latents, self.mini_batch_decoder
        if self.cache_compression_vae:
            if n == 1:
                return [DecodeChunk(0, 1, "one_frame")]
            return [
                DecodeChunk(i, min(i + step, n), "cache_first" if i == 0 else "cache_next") for i in range(0, n, step)
            ]
        chunks = [DecodeChunk(0, 1, "one_frame")] if n % 2 else []
        first = len(chunks)
        for i in range(first, n, step):
            before = step if i > first else 0
            after = min(i + 2 * step, n) - (i + step) if i + step < n else 0
            chunks.append(DecodeChunk(i, min(i + step, n), "slice", before, after))
        return chunks

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames that `encode` gives for `num_frames` video frames."""
        downs = sum(DOWN_BLOCKS[t] for t in self.down_block_types[:-1])
        total = 0
        for start, stop in self.encode_chunks(num_frames):
            t = stop - start
            for _ in range(downs):
                t = (t + 1) // 2  # stride-2 conv over the chunk zero-padded by one frame each side
            total += t
        return total

    def decoded_frames(self, num_latents: int) -> int:
        """Video frames that `decode` gives for `num_latents` latent frames."""
        up = 2 ** sum(UP_BLOCKS[t] for t in self.up_block_types[:-1])
        return sum((c.stop - c.start) * (1 if c.mode == "one_frame" else up) for c in self.decode_chunks(num_latents))


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element; logvar is clamped to [-30, 20]."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise. The noise is float32 from `generator` (the global CPU RNG when None, as in the reference)."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)


# decode_chunk(latents, before, after, one_frame) -> video; decode_chunk_cached(latents, cache) -> (video, cache)
DecodeChunkFn = Callable[[Tensor, Tensor | None, Tensor | None, bool], Tensor]
DecodeCachedFn = Callable[[Tensor, list[Tensor] | None], tuple[Tensor, list[Tensor]]]


def encode_in_chunks(config: VAEConfig, video: Tensor, encode_chunk: Callable[[Tensor], Tensor]) -> Tensor:
    """Moments of `video` [B, 3, F, H, W]: `encode_chunk` on every frame range of the plan, joined on time."""
    chunks = config.encode_chunks(video.shape[2])
    return torch.cat([encode_chunk(video[:, :, a:b]) for a, b in chunks], dim=2)


def decode_in_chunks(
    config: VAEConfig, latents: Tensor, decode_chunk: DecodeChunkFn, decode_chunk_cached: DecodeCachedFn | None = None
) -> Tensor:
    """Video from `latents` [B, C, T, h, w]: one call per chunk of the plan, joined on time.

    Slice chunks call `decode_chunk(chunk, before, after, one_frame)` with the neighbour latents (None when there
    are none); cache chunks call `decode_chunk_cached(chunk, cache)` and pass the returned cache on.
    """
    frames, cache = [], None
    for c in config.decode_chunks(latents.shape[2]):
        chunk = latents[:, :, c.start : c.stop]
        if c.mode in ("cache_first", "cache_next"):
            if decode_chunk_cached is None:
                raise ValueError("this VAE uses cache_compression_vae, which this backend cannot decode; use torch.")
            video, cache = decode_chunk_cached(chunk, cache if c.mode == "cache_next" else None)
        else:
            before = latents[:, :, c.start - c.before : c.start] if c.before else None
            after = latents[:, :, c.stop : c.stop + c.after] if c.after else None
            video = decode_chunk(chunk, before, after, c.mode == "one_frame")
        frames.append(video)
    return torch.cat(frames, dim=2)


class RuyiVAE(nn.Module):
    """AutoencoderKLMagvit with the checkpoint's state-dict keys (`encoder.*`, `decoder.*`, `quant_conv`, ...)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv3d(latent, latent, 1)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> RuyiVAE:
        """A randomly initialised model from a vae/config.json dict."""
        return cls(VAEConfig.from_dict(data))

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> RuyiVAE:
        """Load `folder/config.json` and its safetensors strictly (built on the meta device, no copy)."""
        config = VAEConfig.from_dict(read_config(folder), source=str(Path(folder) / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        return load_into(model, load_weights(folder), source=str(folder), dtype=dtype, device=device)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check(self, x: Tensor, channels: int, name: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels or x.shape[2] == 0:
            raise ValueError(f"{name} must be [B, {channels}, F>=1, H, W], got {tuple(x.shape)}")

    # 1. Encode -----------------------------------------------------------------------------------------------
    def encode_chunk(self, video: Tensor) -> Tensor:
        """Moments (mean | logvar, unclamped) [B, 2*latent, f', h, w] of one encoder chunk [B, 3, f, H, W]."""
        return self.quant_conv(self.encoder(video, TimePadding("zeros")))

    def encode(self, video: Tensor) -> DiagonalGaussian:
        """The posterior of `video` [B, 3, F, H, W] in [-1, 1]; latents are [B, latent, F', H/8, W/8]."""
        self._check(video, self.config.in_channels, "video")
        return DiagonalGaussian.from_moments(encode_in_chunks(self.config, video, self.encode_chunk))

    # 2. Decode -----------------------------------------------------------------------------------------------
    def decode_chunk(
        self, latents: Tensor, before: Tensor | None = None, after: Tensor | None = None, one_frame: bool = False
    ) -> Tensor:
        """Slice-mode decode of one chunk, with optional neighbour-chunk context latents.

        `one_frame` is the single-latent chunk of an odd latent count: no temporal upsampling, 1 frame out.
        """
        parts = [t for t in (before, latents, after) if t is not None]
        z = self.post_quant_conv(torch.cat(parts, dim=2) if len(parts) > 1 else latents)
        n_before = 0 if before is None else before.shape[2]
        n_after = 0 if after is None else after.shape[2]
        return self.decoder(z, TimePadding("zeros", upsample_time=not one_frame), n_before, n_after)

    def decode_chunk_cached(self, latents: Tensor, cache: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Cache-mode decode of one chunk: (video, new cache). `cache=None` starts a video (replicate padding).

        The cache holds one tensor per causal conv of the decoder, in call order: its last 2 input frames.
        """
        pad = TimePadding("cache", cache_in=None if cache is None else list(cache))
        video = self.decoder(self.post_quant_conv(latents), pad)
        if cache is not None and pad.cache_read != len(cache):
            raise ValueError(f"the decoder cache holds {len(cache)} tensors, the decoder used {pad.cache_read}")
        return video, pad.cache_out

    def decode(self, latents: Tensor) -> Tensor:
        """Video [B, 3, F, H*8, W*8] from unscaled latents (divide by scaling_factor first); not clamped."""
        self._check(latents, self.config.latent_channels, "latents")
        return decode_in_chunks(self.config, latents, self.decode_chunk, self.decode_chunk_cached)
