"""vae/config.json as a dataclass, and the chunk plans that follow from it (no modules: the VAE blocks import it)."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .checkpoint_io import config_from_dict, config_to_dict

DOWN_BLOCKS = {"SpatialDownBlock3D": False, "SpatialTemporalDownBlock3D": True}  # type -> downsamples time
UP_BLOCKS = {"SpatialUpBlock3D": False, "SpatialTemporalUpBlock3D": True}  # type -> upsamples time
ACTIVATION_NAMES = ("silu", "swish", "gelu", "relu", "elu", "mish")
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
        if self.act_fn not in ACTIVATION_NAMES:
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; use one of {sorted(ACTIVATION_NAMES)}")
        if not (self.slice_compression_vae or self.cache_compression_vae):
            raise ValueError(
                "set slice_compression_vae or cache_compression_vae; other chunking modes are not supported"
            )
        if self.tile_sample_min_size % self.spatial_factor or self.tile_sample_min_size <= 0:
            raise ValueError(f"tile_sample_min_size={self.tile_sample_min_size} must be a positive multiple of "
                             f"the spatial factor {self.spatial_factor}")
        if not 0.0 <= self.tile_overlap_factor < 1.0:
            raise ValueError(f"tile_overlap_factor={self.tile_overlap_factor} must be within [0, 1)")
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

    def chunk_latent_frames(self, chunk_frames: int) -> int:
        """Latent frames that one encoder chunk of `chunk_frames` video frames gives."""
        t = chunk_frames
        for _ in range(sum(DOWN_BLOCKS[t] for t in self.down_block_types[:-1])):
            t = (t + 1) // 2  # stride-2 conv over the chunk zero-padded by one frame each side
        return t

    def chunk_video_frames(self, chunk: DecodeChunk) -> int:
        """Video frames that one decoder call gives."""
        up = 2 ** sum(UP_BLOCKS[t] for t in self.up_block_types[:-1])
        return (chunk.stop - chunk.start) * (1 if chunk.mode == "one_frame" else up)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames that `encode` gives for `num_frames` video frames."""
        return sum(self.chunk_latent_frames(stop - start) for start, stop in self.encode_chunks(num_frames))

    def decoded_frames(self, num_latents: int) -> int:
        """Video frames that `decode` gives for `num_latents` latent frames."""
        return sum(self.chunk_video_frames(c) for c in self.decode_chunks(num_latents))
