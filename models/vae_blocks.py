"""Layers of the causal 3D VAE (EasyAnimate `AutoencoderKLMagvit`): causal convs, resnets, attention, blocks.

Every layer works on video tensors (B, C, T, H, W). How the causal convs treat time is decided per chunk by
one `TimePadding` object that the encoder/decoder passes down to every layer, instead of the reference's
`padding_flag` attributes that are mutated on the modules:

* ``"zeros"`` (reference flags 1 and 2): each conv zero-pads one frame on both sides of time.
* ``"cache"`` (flags 5 and 6): each conv puts its last two input frames of the previous chunk in front;
  the first chunk (no cache) replicates its first frame twice instead. Every conv appends its own new
  cache to `TimePadding.cache_out`, in call order, so one chunk's computation has explicit tensor inputs
  and outputs (ONNX-exportable).

`TimePadding.upsample_time` is False only for the single-latent "one frame" chunk (flag 1): the
SpatialTemporal upsamplers then leave time alone, so one latent decodes to one frame.

The reference pads in float32 and casts back; zero and replicate padding copy values exactly, so only
replicate padding (which has no half-precision CPU kernel) goes through float32 here. Results are identical.

Precision is the reference's under CUDA autocast, made explicit: GroupNorm runs and returns float32 (as
autocast makes nn.GroupNorm), the activation after it runs on that float32 output, and every conv and linear
rounds its input to its weight dtype. So GroupNorm + SiLU are rounded once, at the next conv. That rounding is
done right after the activation (`GroupNorm.norm_act`; padding copies values, so the conv sees the same numbers),
a few whole groups at a time for half-precision inputs: the float32 temporaries are then 1/NORM_SLICES of the
tensor instead of three float32 copies of it (the statistics are per group, the rest elementwise: same values).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .vae_config import DOWN_BLOCKS, UP_BLOCKS, VAEConfig

NORM_EPS = 1e-6
NORM_SLICES = 8  # a half-precision GroupNorm + activation runs on this many slices of whole groups
ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "elu": nn.ELU, "mish": nn.Mish}


@dataclass
class TimePadding:
    """Temporal padding of every causal conv for one chunk, and the causal cache read and written."""

    mode: str = "zeros"  # "zeros" | "cache"
    upsample_time: bool = True
    cache_in: list[Tensor] | None = None  # mode "cache": None for the first chunk, else the previous cache_out
    cache_out: list[Tensor] = field(default_factory=list)
    cache_read: int = 0  # how many cache_in tensors the convs have taken

    def take_cache(self) -> Tensor | None:
        if self.cache_in is None:
            return None
        if self.cache_read >= len(self.cache_in):
            raise ValueError(f"the decoder cache holds {len(self.cache_in)} tensors, but more convs need one")
        self.cache_read += 1
        return self.cache_in[self.cache_read - 1]


class CausalConv3d(nn.Conv3d):
    """Conv3d with spatial zero padding inside the conv and temporal padding chosen by `TimePadding`."""

    def __init__(self, in_channels: int, out_channels: int, stride=(1, 1, 1), spatial_padding: int = 1):
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=(0, spatial_padding, spatial_padding))
        self.causal_frames = 2  # (kernel_t - 1) * dilation_t
        # The reference computes the symmetric pad from the *width* stride: ceil((2 + 1 - stride_w) / 2) = 1.
        self.symmetric_frames = 1

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        """x in any float dtype (float32 after GroupNorm + activation): padded as it is, rounded to the weight
        dtype at the conv; the cache keeps x's dtype, as the reference's `prev_features` do."""
        if pad.mode == "zeros":
            p = self.symmetric_frames
            return super().forward(F.pad(x, (0, 0, 0, 0, p, p)).to(self.weight.dtype))
        if self.stride[0] != 1:
            raise ValueError("the causal cache is only defined for convs with temporal stride 1 (decoder convs)")
        prev = pad.take_cache()
        if prev is None:
            x = F.pad(x.float(), (0, 0, 0, 0, self.causal_frames, 0), mode="replicate").to(x.dtype)
        else:
            x = torch.cat([prev.to(x.dtype), x], dim=2)
        pad.cache_out.append(x[:, :, -self.causal_frames :])
        return super().forward(x.to(self.weight.dtype))


class GroupNorm(nn.GroupNorm):
    """GroupNorm on (B, C, T, H, W) (or (B, C, L)), computed and returned in float32 as nn.GroupNorm runs under
    autocast; `per_frame` normalises every frame alone, as (B*T, C, H, W)."""

    def __init__(self, num_groups: int, num_channels: int, per_frame: bool):
        super().__init__(num_groups, num_channels, eps=NORM_EPS)
        self.per_frame = per_frame

    def normalize(self, x: Tensor, channels: slice | None = None) -> Tensor:
        """float32 GroupNorm of x: all the layer's channels, or the slice `channels` of whole groups."""
        weight, bias, groups = self.weight.float(), self.bias.float(), self.num_groups
        if channels is not None:  # plain ints, so a traced graph keeps num_groups constant
            weight, bias = weight[channels], bias[channels]
            groups = (channels.stop - channels.start) * self.num_groups // self.num_channels
        if not self.per_frame:
            return F.group_norm(x.float(), groups, weight, bias, self.eps)
        b, c, t, h, w = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(b * t, c, h, w).float(), groups, weight, bias, self.eps)
        return y.reshape(b, t, c, h, w).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)

    def norm_act(self, x: Tensor, act: nn.Module, dtype: torch.dtype) -> Tensor:
        """act(GroupNorm(x)) in float32, rounded once to `dtype` (the next conv's); see the module docstring."""
        if x.dtype == torch.float32 or torch.onnx.is_in_onnx_export():
            return act(self.normalize(x)).to(dtype)
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        step = -(-self.num_groups // NORM_SLICES) * (self.num_channels // self.num_groups)
        for start in range(0, self.num_channels, step):
            part = slice(start, min(start + step, self.num_channels))
            out[:, part] = act(self.normalize(x[:, part], part))
        return out


@dataclass(frozen=True)
class LayerSpec:
    """What every layer needs besides channel counts."""

    groups: int
    act_fn: str
    per_frame_norm: bool

    def norm(self, channels: int) -> GroupNorm:
        return GroupNorm(self.groups, channels, self.per_frame_norm)

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.act_fn]()


class ResidualBlock3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, spec: LayerSpec):
        super().__init__()
        self.norm1 = spec.norm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = spec.norm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.nonlinearity = spec.act()
        self.shortcut = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        h = self.conv1(self.norm1.norm_act(x, self.nonlinearity, self.conv1.weight.dtype), pad)
        h = self.conv2(self.norm2.norm_act(h, self.nonlinearity, self.conv2.weight.dtype), pad)
        return h + self.shortcut(x)


class Attention(nn.Module):
    """Single-block self-attention with GroupNorm and residual: per frame ("spatial") or over all frames ("3d")."""

    def __init__(self, channels: int, num_heads: int, groups: int, kind: str):
        super().__init__()
        if kind not in ("spatial", "3d"):
            raise ValueError(f"mid_block_attention_type={kind!r} is not supported; use 'spatial' or '3d'")
        self.kind = kind
        self.head_dim = channels // num_heads
        self.heads = channels // self.head_dim
        inner = self.head_dim * self.heads
        self.group_norm = GroupNorm(groups, channels, per_frame=False)
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        self.to_out = nn.Linear(inner, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        seqs, length = (b * t, h * w) if self.kind == "spatial" else (b, t * h * w)
        tokens = x.permute(0, 2, 3, 4, 1).reshape(seqs, length, c)  # (B*T, H*W, C) or (B, T*H*W, C)
        y = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2).to(self.to_q.weight.dtype)
        q, k, v = (
            proj(y).view(seqs, length, self.heads, self.head_dim).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )  # (seqs, heads, L, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        y = self.to_out(y.transpose(1, 2).reshape(seqs, length, self.heads * self.head_dim)) + tokens
        return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Downsampler(nn.Module):
    """Pad right/bottom by one pixel, then a stride-2 conv: (1,2,2) spatial or (2,2,2) spatio-temporal."""

    def __init__(self, channels: int, temporal: bool):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, stride=(2 if temporal else 1, 2, 2), spatial_padding=0)

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)), pad)


class Upsampler(nn.Module):
    """Nearest x2 in H and W, a conv, then (spatio-temporal only) x2 in time, nearest or linear."""

    def __init__(self, channels: int, temporal: bool, time_mode: str):
        super().__init__()
        self.conv = CausalConv3d(channels, channels)
        self.temporal = temporal
        self.time_mode = time_mode

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        x = self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"), pad)
        if self.temporal and pad.upsample_time:
            x = F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode=self.time_mode)
        return x


class DownBlock(nn.Module):
    """`num_layers` resnets, then an optional downsampler (Spatial/SpatialTemporalDownBlock3D)."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, num_layers: int, spec: LayerSpec, downsample: bool):
        super().__init__()
        self.convs = nn.ModuleList(
            ResidualBlock3D(in_ch if i == 0 else out_ch, out_ch, spec) for i in range(num_layers)
        )
        self.downsampler = Downsampler(out_ch, DOWN_BLOCKS[kind]) if downsample else None

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        for conv in self.convs:
            x = conv(x, pad)
        return x if self.downsampler is None else self.downsampler(x, pad)


class UpBlock(nn.Module):
    """`num_layers` resnets, then an optional upsampler (Spatial/SpatialTemporalUpBlock3D)."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, num_layers: int, spec: LayerSpec, upsample: bool):
        super().__init__()
        temporal = UP_BLOCKS[kind]
        self.convs = nn.ModuleList(
            ResidualBlock3D(in_ch if i == 0 else out_ch, out_ch, spec) for i in range(num_layers)
        )
        # The reference sizes the SpatialUpBlock3D upsampler by the block's *input* channels.
        up_ch = out_ch if temporal else in_ch
        time_mode = "nearest" if spec.per_frame_norm else "trilinear"
        self.upsampler = Upsampler(up_ch, temporal, time_mode) if upsample else None

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        for conv in self.convs:
            x = conv(x, pad)
        return x if self.upsampler is None else self.upsampler(x, pad)


class MidBlock3D(nn.Module):
    """resnet, then (attention, resnet) x (num_layers - 1); attention may be disabled."""

    def __init__(self, channels: int, num_layers: int, spec: LayerSpec, attention: str | None, num_heads: int):
        super().__init__()
        self.convs = nn.ModuleList(ResidualBlock3D(channels, channels, spec) for _ in range(num_layers))
        self.attentions = nn.ModuleList(
            Attention(channels, num_heads, spec.groups, attention) for _ in range(num_layers - 1) if attention
        )

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        x = self.convs[0](x, pad)
        for i, conv in enumerate(self.convs[1:]):
            if len(self.attentions):
                x = self.attentions[i](x)
            x = conv(x, pad)
        return x


class Encoder(nn.Module):
    """conv_in -> down blocks -> mid block -> GroupNorm/act -> conv_out (2 * latent channels), for one chunk."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        spec = LayerSpec(cfg.norm_num_groups, cfg.act_fn, cfg.spatial_group_norm)
        chans = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, chans[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(kind, chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, spec, i < len(chans) - 1)
            for i, kind in enumerate(cfg.down_block_types)
        )
        self.mid_block = MidBlock3D(
            chans[-1], cfg.layers_per_block, spec, cfg.mid_attention, cfg.mid_block_num_attention_heads
        )
        self.conv_norm_out = spec.norm(chans[-1])
        self.conv_act = spec.act()
        self.conv_out = CausalConv3d(chans[-1], 2 * cfg.latent_channels)

    def forward(self, x: Tensor, pad: TimePadding) -> Tensor:
        x = self.conv_in(x, pad)
        for block in self.down_blocks:
            x = block(x, pad)
        x = self.mid_block(x, pad)
        return self.conv_out(self.conv_norm_out.norm_act(x, self.conv_act, self.conv_out.weight.dtype), pad)


class Decoder(nn.Module):
    """conv_in -> mid block (with context frames) -> crop -> up blocks -> GroupNorm/act -> conv_out."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        spec = LayerSpec(cfg.norm_num_groups, cfg.act_fn, cfg.spatial_group_norm)
        chans = cfg.block_out_channels[::-1]
        self.conv_in = CausalConv3d(cfg.latent_channels, chans[0])
        self.mid_block = MidBlock3D(
            chans[0], cfg.layers_per_block, spec, cfg.mid_attention, cfg.mid_block_num_attention_heads
        )
        self.up_blocks = nn.ModuleList(
            UpBlock(kind, chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, spec, i < len(chans) - 1)
            for i, kind in enumerate(cfg.up_block_types)
        )
        self.conv_norm_out = spec.norm(chans[-1])
        self.conv_act = spec.act()
        self.conv_out = CausalConv3d(chans[-1], cfg.out_channels)

    def forward(self, z: Tensor, pad: TimePadding, before: int = 0, after: int = 0) -> Tensor:
        """`z` holds `before` context frames, the chunk, then `after` context frames (post_quant_conv applied)."""
        x = self.mid_block(self.conv_in(z, pad), pad)
        x = x[:, :, before : x.shape[2] - after]  # context only feeds conv_in and the mid block
        for block in self.up_blocks:
            x = block(x, pad)
        return self.conv_out(self.conv_norm_out.norm_act(x, self.conv_act, self.conv_out.weight.dtype), pad)
