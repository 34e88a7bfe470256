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
the per-chunk callables: `RuyiVAE.encode`/`decode` pass their own, other backends pass theirs. Inside
`with after_each_chunk(hook):` both loops call `hook()` after every chunk, whichever backend runs them (progress
and cancel points for the pipeline).

Spatial tiling (`models.vae_tiling`): with `use_tiling` / `use_tiling_encoder` / `use_tiling_decoder` in the
config, or `enable_tiling(...)` (the memory plan's choice), every chunk whose frame is larger than one tile is
encoded or decoded tile by tile and blended. A tiled cache-mode decode keeps one causal cache per tile.

Unsupported (rejected by `VAEConfig` with a ValueError): global-context blocks, other block or attention types,
and configs with neither slice nor cache compression. `upcast_vae` has no effect:
the caller picks the dtype (the reference's upcast equals loading with dtype=torch.float32).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint_io import load_into, load_weights, read_config
from .vae_blocks import Decoder, Encoder, TimePadding
from .vae_config import VAEConfig
from .vae_tiling import SpatialTiling, is_tiled, run_tiled


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


_chunk_hook: ContextVar[Callable[[], None] | None] = ContextVar("ruyi_vae_chunk_hook", default=None)


@contextmanager
def after_each_chunk(hook: Callable[[], None] | None) -> Iterator[None]:
    """Call `hook()` after every chunk that `encode_in_chunks` / `decode_in_chunks` run in this context (this thread
    or task only); it may raise to stop. None: no hook."""
    token = _chunk_hook.set(hook)
    try:
        yield
    finally:
        _chunk_hook.reset(token)


def _chunk_done() -> None:
    hook = _chunk_hook.get()
    if hook is not None:
        hook()


def encode_in_chunks(config: VAEConfig, video: Tensor, encode_chunk: Callable[[Tensor], Tensor]) -> Tensor:
    """Moments of `video` [B, 3, F, H, W]: `encode_chunk` on every frame range of the plan, joined on time."""
    moments = []
    for a, b in config.encode_chunks(video.shape[2]):
        moments.append(encode_chunk(video[:, :, a:b]))
        _chunk_done()
    return torch.cat(moments, dim=2)


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
        _chunk_done()
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
        tiling = SpatialTiling(config.tile_sample_min_size, config.tile_overlap_factor)
        self.encoder_tiling = tiling if config.use_tiling or config.use_tiling_encoder else None
        self.decoder_tiling = tiling if config.use_tiling or config.use_tiling_decoder else None

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> RuyiVAE:
        """A randomly initialised model from a vae/config.json dict."""
        return cls(VAEConfig.from_dict(data))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        config: VAEConfig | None = None,
    ) -> RuyiVAE:
        """Load `folder/config.json` and its safetensors strictly (built on the meta device, no copy).
        `config` is the folder's config when the caller has read it already."""
        if config is None:
            config = VAEConfig.from_dict(read_config(folder), source=str(Path(folder) / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        return load_into(model, load_weights(folder), source=str(folder), dtype=dtype, device=device)

    def enable_tiling(self, tiling: SpatialTiling | None, encoder: bool = True, decoder: bool = True) -> None:
        """Tile the encoder and/or the decoder with `tiling` (None turns tiling off for them)."""
        if encoder:
            self.encoder_tiling = tiling
        if decoder:
            self.decoder_tiling = tiling

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def _check(self, x: Tensor, channels: int, name: str) -> None:
        if x.ndim != 5 or x.shape[1] != channels or x.shape[2] == 0:
            raise ValueError(f"{name} must be [B, {channels}, F>=1, H, W], got {tuple(x.shape)}")

    # 1. Encode -----------------------------------------------------------------------------------------------
    def encode_chunk(self, video: Tensor) -> Tensor:
        """Moments (mean | logvar, unclamped) [B, 2*latent, f', h, w] of one encoder chunk [B, 3, f, H, W]."""

        def encode(tile: Tensor) -> Tensor:
            return self.quant_conv(self.encoder(tile, TimePadding("zeros")))

        if self.encoder_tiling is None:
            return encode(video)
        return run_tiled(video, encode, self.encoder_tiling, self.config.spatial_factor, 1)

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
        z = torch.cat(parts, dim=2) if len(parts) > 1 else latents
        n_before = 0 if before is None else before.shape[2]
        n_after = 0 if after is None else after.shape[2]

        def decode(tile: Tensor) -> Tensor:
            pad = TimePadding("zeros", upsample_time=not one_frame)
            return self.decoder(self.post_quant_conv(tile), pad, n_before, n_after)

        if self.decoder_tiling is None:
            return decode(z)
        return run_tiled(z, decode, self.decoder_tiling, 1, self.config.spatial_factor)

    def decode_chunk_cached(self, latents: Tensor, cache: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """Cache-mode decode of one chunk: (video, new cache). `cache=None` starts a video (replicate padding).

        The cache holds one tensor per causal conv of the decoder, in call order: its last 2 input frames.
        A tiled decode (more than one tile) holds one such list per tile, in tile order.
        """
        caches: list[list[Tensor]] = []

        def decode(tile: Tensor) -> Tensor:
            tile_cache = None if cache is None else (cache[len(caches)] if tiled else cache)
            pad = TimePadding("cache", cache_in=None if tile_cache is None else list(tile_cache))
            video = self.decoder(self.post_quant_conv(tile), pad)
            if tile_cache is not None and pad.cache_read != len(tile_cache):
                raise ValueError(f"the decoder cache holds {len(tile_cache)} tensors, the decoder used {pad.cache_read}")
            caches.append(pad.cache_out)
            return video

        tiled = is_tiled(*latents.shape[-2:], self.decoder_tiling, 1, self.config.spatial_factor)
        if not tiled:
            return decode(latents), caches[0]
        return run_tiled(latents, decode, self.decoder_tiling, 1, self.config.spatial_factor), caches

    def decode(self, latents: Tensor) -> Tensor:
        """Video [B, 3, F, H*8, W*8] from unscaled latents (divide by scaling_factor first); not clamped."""
        self._check(latents, self.config.latent_channels, "latents")
        return decode_in_chunks(self.config, latents, self.decode_chunk, self.decode_chunk_cached)
