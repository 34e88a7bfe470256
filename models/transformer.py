"""The 3-D diffusion transformer of Ruyi-Mini-7B (reference: `HunyuanTransformer3DModel`, basic blocks).

A HunyuanDiT-style DiT over video latents: every frame is cut into 2-D patches, all frames' tokens go
through full 3-D self-attention with 2-D RoPE plus a temporal sin-cos table, and each block also
attends to text tokens and to CLIP image tokens. Parameter names equal the released checkpoint's keys,
so `load_state_dict(strict=True)` accepts it. See docs/ruyi-architecture.md section 2.

The forward is split for block streaming and per-block export: `embed` (patchify, conditioning, RoPE
tiling) -> `blocks[i](...)` with explicit tensors, long skips wired by `config.skip_sources` -> `unembed`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint_io import config_from_dict, config_to_dict, load_into, load_weights, read_config
from .rope import rotary_embedding
from .transformer_blocks import NORM_EPS, FP32LayerNorm, TransformerBlock, temporal_table
from .transformer_conditioning import MLP, Resampler, TimestepTextSizeStyleEmbedding, sincos_2d_table

_GELU_APPROXIMATION = {"gelu": "none", "gelu-approximate": "tanh"}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The checkpoint's `transformer/config.json`; field names equal its keys."""

    num_attention_heads: int
    attention_head_dim: int
    in_channels: int  # noisy latents + inpaint latents (16 + 32 = 48)
    out_channels: int | None  # None: derived as in the reference (see `output_channels`)
    patch_size: int
    n_query: int  # CLIP resampler queries, a square (4 x 4 grid)
    projection_dim: int  # width of the CLIP patch tokens fed to the resampler
    activation_fn: str  # FFN activation: "gelu-approximate" (tanh) or "gelu"
    sample_size: int  # unused: the patch embedding has no positional table
    hidden_size: int  # must equal num_attention_heads * attention_head_dim
    num_layers: int  # even: the first half feeds long skips into the second half
    mlp_ratio: float
    learn_sigma: bool
    cross_attention_dim: int  # width of the text tokens (and of the resampled CLIP tokens)
    norm_type: str
    cross_attention_dim_t5: int  # width of the T5-like tokens before text_embedder
    pooled_projection_dim: int
    text_len: int
    text_len_t5: int
    basic_block_type: str = "basic"
    after_norm: bool = False
    time_position_encoding: bool = True  # config/default.yaml override; the HF config agrees

    def __post_init__(self) -> None:
        problems = []
        if self.basic_block_type != "basic":
            problems.append(f"basic_block_type={self.basic_block_type!r} (only 'basic' is implemented)")
        if self.after_norm:
            problems.append("after_norm=True (only False is implemented)")
        if self.num_layers < 2 or self.num_layers % 2:
            problems.append(f"num_layers={self.num_layers} (must be even and >= 2 for the long-skip wiring)")
        if self.norm_type != "layer_norm":
            problems.append(f"norm_type={self.norm_type!r} (only 'layer_norm')")
        if self.activation_fn not in _GELU_APPROXIMATION:
            problems.append(f"activation_fn={self.activation_fn!r} (allowed: {sorted(_GELU_APPROXIMATION)})")
        if self.hidden_size != self.inner_dim:
            problems.append(
                f"hidden_size={self.hidden_size} != num_attention_heads*attention_head_dim={self.inner_dim}"
            )
        if self.attention_head_dim % 4:
            problems.append(f"attention_head_dim={self.attention_head_dim} (must be a multiple of 4 for 2-D RoPE)")
        if math.isqrt(self.n_query) ** 2 != self.n_query:
            problems.append(f"n_query={self.n_query} (must be a square)")
        if self.cross_attention_dim % self.num_attention_heads:
            problems.append(f"cross_attention_dim={self.cross_attention_dim} not divisible by the head count")
        if self.cross_attention_dim_t5 % 8:
            problems.append(f"cross_attention_dim_t5={self.cross_attention_dim_t5} not divisible by 8 pool heads")
        if not self.enable_inpaint:
            problems.append(
                f"in_channels={self.in_channels}, out_channels={self.output_channels}, learn_sigma={self.learn_sigma} "
                "disable the inpaint/CLIP branch, which Ruyi always uses"
            )
        if problems:
            raise ValueError("unsupported transformer config: " + "; ".join(problems))

    # Derived sizes
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_inner_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def output_channels(self) -> int:
        if self.out_channels is not None:
            return self.out_channels
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def enable_inpaint(self) -> bool:
        factor = 2 if self.learn_sigma else 1
        return self.in_channels * factor != self.output_channels

    @property
    def text_tokens(self) -> int:
        return self.text_len + self.text_len_t5

    @property
    def skip_blocks(self) -> tuple[int, ...]:
        """Blocks with skip_norm/skip_linear: num_layers//2 + 1 .. num_layers - 1."""
        return tuple(range(self.num_layers // 2 + 1, self.num_layers))

    @property
    def skip_sources(self) -> dict[int, int]:
        """Skip block -> the earlier block whose output it takes (LIFO: the last skip block gets block 0)."""
        return {i: self.num_layers - 1 - i for i in self.skip_blocks}

    # Construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "transformer config") -> TransformerConfig:
        return config_from_dict(cls, data, source)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def tiny(cls) -> TransformerConfig:
        """A small preset for tests and the CPU demo, with every structural feature of the real model."""
        return cls(
            num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=32, patch_size=2,
            n_query=16, projection_dim=32, activation_fn="gelu-approximate", sample_size=32, hidden_size=32,
            num_layers=4, mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=32, norm_type="layer_norm",
            cross_attention_dim_t5=48, pooled_projection_dim=24, text_len=8, text_len_t5=12,
        )  # fmt: skip

    @classmethod
    def full(cls) -> TransformerConfig:
        """Ruyi-Mini-7B's released transformer/config.json (7.19e9 parameters)."""
        return cls(
            num_attention_heads=16, attention_head_dim=176, in_channels=48, out_channels=32, patch_size=2,
            n_query=16, projection_dim=1024, activation_fn="gelu-approximate", sample_size=128, hidden_size=2816,
            num_layers=40, mlp_ratio=4.3637, learn_sigma=True, cross_attention_dim=1024, norm_type="layer_norm",
            cross_attention_dim_t5=2048, pooled_projection_dim=1024, text_len=77, text_len_t5=256,
        )  # fmt: skip


def computed_state(config: TransformerConfig) -> dict[str, Tensor]:
    """The deterministic, untrained checkpoint entries (fixed sin-cos tables), from the config alone."""
    state = {"clip_projection.pos_embed": sincos_2d_table(config.cross_attention_dim, math.isqrt(config.n_query))}
    if config.time_position_encoding:
        table = temporal_table(config.inner_dim)  # the same table in every block
        state.update({f"blocks.{i}.t_embed.pe": table for i in range(config.num_layers)})
    return state


class BlockInputs(NamedTuple):
    """What `embed` hands to the blocks (and `unembed` needs to restore the video layout)."""

    hidden: Tensor  # [B, F*hp*wp, D] patch tokens, frame-major
    temb: Tensor  # [B, D]
    text_states: Tensor  # [B, text_len + text_len_t5, cross_dim], padding rows substituted
    clip_states: Tensor  # [B, n_query, cross_dim], clip_padding where clip_attention_mask == 0
    rope_cos: Tensor  # [F*hp*wp, head_dim] float32, the per-frame table tiled over frames
    rope_sin: Tensor
    num_frames: int
    grid_height: int  # hp
    grid_width: int  # wp
    frame_index: Tensor | None = None  # [N] frame of each token when hidden holds a slice (sequence parallelism)


class PatchEmbed(nn.Module):
    """pos_embed: Conv2d(k = s = patch) per frame; no positional table."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """x [B*F, C, H, W] -> [B*F, hp*wp, D]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class AdaLayerNormContinuous(nn.Module):
    """norm_out: LN(x) * (1 + scale) + shift, with (scale, shift) = linear(SiLU(temb)), scale first."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = FP32LayerNorm(dim, eps=NORM_EPS, elementwise_affine=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb.float()).to(x.dtype)).chunk(2, dim=1)  # (B, D) each
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class RuyiTransformer3D(nn.Module):
    """Video latents + conditioning -> [B, out_channels, F, H, W] (v-prediction in the first 16 channels)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim, cross_dim = config.inner_dim, config.cross_attention_dim
        t5_dim = config.cross_attention_dim_t5
        self.text_embedder = MLP(t5_dim, t5_dim * 4, cross_dim, fp32_act=True)
        self.text_embedding_padding = nn.Parameter(torch.randn(config.text_tokens, cross_dim) * 0.02)
        self.pos_embed = PatchEmbed(config.in_channels, dim, config.patch_size)
        self.time_extra_emb = TimestepTextSizeStyleEmbedding(
            dim, config.pooled_projection_dim, config.text_len_t5, t5_dim
        )
        skip_blocks = set(config.skip_blocks)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                config.num_attention_heads,
                cross_dim,
                config.ff_inner_dim,
                _GELU_APPROXIMATION[config.activation_fn],
                has_skip=i in skip_blocks,
                time_position_encoding=config.time_position_encoding,
            )
            for i in range(config.num_layers)
        )
        self.clip_padding = nn.Parameter(torch.randn(config.n_query, cross_dim) * 0.02)
        self.clip_projection = Resampler(
            math.isqrt(config.n_query), cross_dim, config.num_attention_heads, config.projection_dim
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, config.patch_size**2 * config.output_channels)

    # Loading
    @classmethod
    def from_config(cls, config: dict[str, Any] | TransformerConfig) -> RuyiTransformer3D:
        """Build with fresh weights from a checkpoint's config.json dict (or a TransformerConfig)."""
        if not isinstance(config, TransformerConfig):
            config = TransformerConfig.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        config: TransformerConfig | None = None,
    ) -> RuyiTransformer3D:
        """Load a `transformer/` folder (config.json + safetensors) strictly; missing fixed tables are computed.
        `config` is the folder's config when the caller has read it already."""
        if config is None:
            config = TransformerConfig.from_dict(read_config(folder), source=str(Path(folder) / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        load_into(
            model,
            load_weights(folder),
            source=str(folder),
            computed=lambda: computed_state(config),
            dtype=dtype,
            device=device,
        )
        return model

    # Forward, in three public stages
    def embed(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        text_embedding_mask: Tensor,
        encoder_hidden_states_t5: Tensor,
        text_embedding_mask_t5: Tensor,
        image_meta_size: Tensor,
        style: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor],
        inpaint_latents: Tensor | None,
        clip_encoder_hidden_states: Tensor,
        clip_attention_mask: Tensor,
    ) -> BlockInputs:
        """Patchify the latents and build every per-call input of the blocks (section 2.6)."""
        # 1. Patchify each frame: (B, C, F, H, W) -> (B, F*hp*wp, D)
        if inpaint_latents is not None:
            hidden_states = torch.cat([hidden_states, inpaint_latents], dim=1)  # (B, 48, F, H, W)
        batch, channels, frames, height, width = hidden_states.shape
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent height/width {height}x{width} must be multiples of patch_size={p}")
        grid_height, grid_width = height // p, width // p
        frames_2d = hidden_states.transpose(1, 2).reshape(batch * frames, channels, height, width)  # (B*F, C, H, W)
        tokens = self.pos_embed(frames_2d)  # (B*F, hp*wp, D)
        hidden = tokens.reshape(batch, frames * grid_height * grid_width, -1)  # (B, F*hp*wp, D)

        # 2. Timestep + pooled T5 + image size + style -> temb (B, D)
        if timestep.ndim == 0:
            timestep = timestep.expand(batch)
        temb = self.time_extra_emb(timestep, encoder_hidden_states_t5, image_meta_size, style)

        # 3. Text tokens: cat[emb1, text_embedder(emb2)], masked rows replaced by learned padding
        t5_states = self.text_embedder(encoder_hidden_states_t5)  # (B, L5, cross_dim)
        text_states = torch.cat([encoder_hidden_states, t5_states], dim=1)  # (B, L1+L5, cross_dim)
        text_mask = torch.cat([text_embedding_mask, text_embedding_mask_t5], dim=-1).bool()  # (B, L1+L5)
        text_states = torch.where(text_mask[..., None], text_states, self.text_embedding_padding.to(text_states.dtype))

        # 4. CLIP tokens: resample to n_query tokens, masked samples replaced by clip_padding
        clip_states = self.clip_projection(clip_encoder_hidden_states)  # (B, n_query, cross_dim)
        clip_mask = clip_attention_mask.bool()[..., None]  # (B, n_query, 1)
        clip_states = torch.where(clip_mask, clip_states, self.clip_padding.to(clip_states.dtype))

        # 5. RoPE: the per-frame table [hp*wp, d], tiled over frames -> [F*hp*wp, d], float32
        rope_cos, rope_sin = (table.to(device=hidden.device, dtype=torch.float32) for table in image_rotary_emb)
        if frames != 1:
            rope_cos, rope_sin = rope_cos.repeat(frames, 1), rope_sin.repeat(frames, 1)

        return BlockInputs(hidden, temb, text_states, clip_states, rope_cos, rope_sin, frames, grid_height, grid_width)

    def run_blocks(self, inputs: BlockInputs) -> Tensor:
        """All blocks in order; block i > num_layers//2 takes the output of block num_layers-1-i as its skip."""
        sources = self.config.skip_sources
        kept = set(sources.values())
        skips: dict[int, Tensor] = {}
        x = inputs.hidden
        for i, block in enumerate(self.blocks):
            skip = skips.pop(sources[i]) if i in sources else None
            x = block(
                x, inputs.temb, inputs.text_states, inputs.clip_states,
                inputs.rope_cos, inputs.rope_sin, inputs.num_frames, skip,
            )  # fmt: skip
            if i in kept:
                skips[i] = x
        return x

    def unembed(self, x: Tensor, temb: Tensor, num_frames: int, grid_height: int, grid_width: int) -> Tensor:
        """Final adaLN, projection and unpatchify: (B, F*hp*wp, D) -> (B, out_channels, F, H, W)."""
        return self.unpatchify(self.proj_out(self.norm_out(x, temb)), num_frames, grid_height, grid_width)

    def unpatchify(self, x: Tensor, num_frames: int, grid_height: int, grid_width: int) -> Tensor:
        """(B, F*hp*wp, p*p*C) with feature = (py*p + px)*C + c -> (B, C, F, hp*p, wp*p)."""
        p, channels = self.config.patch_size, self.config.output_channels
        x = x.reshape(x.shape[0], num_frames, grid_height, grid_width, p, p, channels)  # (B, F, hp, wp, py, px, C)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)  # (B, C, F, hp, py, wp, px)
        return x.reshape(x.shape[0], channels, num_frames, grid_height * p, grid_width * p)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        text_embedding_mask: Tensor,
        encoder_hidden_states_t5: Tensor,
        text_embedding_mask_t5: Tensor,
        image_meta_size: Tensor,
        style: Tensor,
        image_rotary_emb: tuple[Tensor, Tensor],
        inpaint_latents: Tensor | None,
        clip_encoder_hidden_states: Tensor,
        clip_attention_mask: Tensor,
        return_dict: bool = False,
    ) -> tuple[Tensor]:
        """The reference call signature. Returns `(out,)`, out [B, out_channels, F, H, W]; `return_dict` is
        accepted for drop-in compatibility and ignored.

        hidden_states [B, 16, F, H, W] noisy latents; inpaint_latents [B, 32, F, H, W]; timestep [B];
        encoder_hidden_states [B, text_len, cross_dim] with text_embedding_mask [B, text_len];
        encoder_hidden_states_t5 [B, text_len_t5, cross_dim_t5] with its mask; image_meta_size [B, 6];
        style [B] int; image_rotary_emb = rotary_embedding(H, W, patch, head_dim);
        clip_encoder_hidden_states [B, L, projection_dim] (L a square); clip_attention_mask [B, n_query].
        """
        inputs = self.embed(
            hidden_states, timestep, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
            text_embedding_mask_t5, image_meta_size, style, image_rotary_emb, inpaint_latents,
            clip_encoder_hidden_states, clip_attention_mask,
        )  # fmt: skip
        x = self.run_blocks(inputs)
        return (self.unembed(x, inputs.temb, inputs.num_frames, inputs.grid_height, inputs.grid_width),)


__all__ = ["BlockInputs", "RuyiTransformer3D", "TransformerConfig", "computed_state", "rotary_embedding"]
