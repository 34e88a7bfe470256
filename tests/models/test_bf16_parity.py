"""bf16 parity with the original's precision regime: bf16 weights under CUDA autocast.

The original casts every model to bf16 and runs under `torch.autocast("cuda", bf16)`; we run bf16 weights with
explicit casts instead (so exported graphs carry the same precision). The reference here is the same bf16
modules run under `CudaAutocastPolicy` (autocast's CUDA cast lists, emulated on the CPU; CPU autocast has other
lists), with every module the original has as a plain torch class put back to that class, by path, from the
original's source: the q/k norms, the resampler's ln_q/ln_kv and norm_out's norm are nn.LayerNorm, every VAE
norm is nn.GroupNorm, the CLIP tower is transformers' own forward. Whatever precision our code keeps or drops at
those points therefore shows up as a difference. Ours and the reference agree bit for bit (dtype bfloat16 /
float32 as named); before the explicit casts the gap was 0.8% (transformer), 1.5% / 4.5% (VAE encode / decode)
and 0.7% (CLIP) of the output's largest magnitude.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ruyi_trt.models.image_encoder import build_random_image_encoder
from ruyi_trt.models.presets import random_denoiser_inputs
from ruyi_trt.models.transformer import RuyiTransformer3D, TransformerConfig
from ruyi_trt.models.vae import RuyiVAE
from ruyi_trt.models.vae_blocks import GroupNorm
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.runtime.backends.block_runner import BlockRunner, EnhanceAVideoSettings
from ruyi_trt.testing import CudaAutocastPolicy, assert_close_scaled

BF16 = torch.bfloat16
# Where the original has torch's plain nn.LayerNorm (diffusers Attention qk_norm, Resampler norm_layer, diffusers
# AdaLayerNormContinuous); its other transformer norms are its own FP32LayerNorm.
ORIGINAL_PLAIN_LAYERNORMS = ("norm_q", "norm_k", "clip_projection.ln_q", "clip_projection.ln_kv", "norm_out.norm")


class PlainGroupNorm(GroupNorm):
    """nn.GroupNorm as the original calls it (per frame when spatial_group_norm), dtype left to the policy, and the
    activation after it on its output, unrounded: the original's next conv casts under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.per_frame:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        b, c, t, h, w = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(b * t, c, h, w), self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(b, t, c, h, w).transpose(1, 2)

    def norm_act(self, x: torch.Tensor, act: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        return act(self(x))


def with_original_norm_classes(model: nn.Module) -> nn.Module:
    """A copy of `model` whose norms are the original's classes at the same paths (same weights)."""
    model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if name.endswith(ORIGINAL_PLAIN_LAYERNORMS):
            module.__class__ = nn.LayerNorm
        elif isinstance(module, GroupNorm):
            module.__class__ = PlainGroupNorm
    return model


@torch.no_grad()
def test_transformer_bf16_equals_the_autocast_regime() -> None:
    """The denoiser call (float32 T5 tokens, CLIP tokens and timestep kept as the pipeline hands them over,
    Enhance-A-Video on) in bf16 equals the original's regime exactly."""
    torch.manual_seed(0)
    cfg = TransformerConfig.tiny()
    model = RuyiTransformer3D(cfg).eval().requires_grad_(False).to(BF16)
    inputs = random_denoiser_inputs(cfg, batch=2, frames=3, height=4, width=6)
    enhance = EnhanceAVideoSettings(weight=1.0)
    ours = BlockRunner(model, "cpu", BF16, enhance_a_video=enhance)(**inputs)
    with CudaAutocastPolicy(BF16):
        reference = BlockRunner(with_original_norm_classes(model), "cpu", BF16, enhance_a_video=enhance)(**inputs)
    assert ours.dtype == BF16 and torch.equal(ours, reference)


@torch.no_grad()
def test_vae_bf16_equals_the_autocast_regime() -> None:
    torch.manual_seed(1)
    vae = RuyiVAE(VAEConfig.tiny()).eval().to(BF16)
    video = (torch.rand(1, 3, 8, 32, 48) * 2 - 1).to(BF16)
    latents = torch.randn(1, 16, 3, 4, 6).to(BF16)
    reference_vae = with_original_norm_classes(vae)
    with CudaAutocastPolicy(BF16):
        expected = reference_vae.encode_chunk(video), reference_vae.decode(latents)
    actual = vae.encode_chunk(video), vae.decode(latents)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == BF16 and torch.equal(got, want)


@torch.no_grad()
def test_clip_bf16_equals_transformers_forward_under_autocast() -> None:
    """float32 residual stream and output, as transformers' CLIP vision tower has under autocast."""
    clip = build_random_image_encoder(32, 56, 14, 2, 2, seed=0).to(BF16)
    pixels = torch.randn(2, 3, 56, 56)
    with CudaAutocastPolicy(BF16):
        expected = clip.vision_model.vision_model(pixel_values=pixels.to(BF16)).last_hidden_state[:, 1:]
    actual = clip(pixels)
    assert actual.dtype == torch.float32 and torch.equal(actual, expected)


@torch.no_grad()
def test_float32_at_the_original_points() -> None:
    """q/k norms, the resampler's ln_q/ln_kv and norm_out return float32 in a bf16 model; the VAE GroupNorm too."""
    cfg = TransformerConfig.tiny()
    model = RuyiTransformer3D(cfg).eval().to(BF16)
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        return lambda module, args, out: seen.__setitem__(name, out.dtype)

    hooks = [
        module.register_forward_hook(record(name))
        for name, module in model.named_modules()
        if name.endswith(ORIGINAL_PLAIN_LAYERNORMS + ("norm2", "gate_clip.norm"))
    ]
    BlockRunner(model, "cpu", BF16)(**random_denoiser_inputs(cfg, batch=1, frames=2, height=4, width=4))
    for hook in hooks:
        hook.remove()
    assert {n: d for n, d in seen.items() if n.endswith(ORIGINAL_PLAIN_LAYERNORMS)} and all(
        d == torch.float32 for n, d in seen.items() if n.endswith(ORIGINAL_PLAIN_LAYERNORMS)
    )
    assert seen["blocks.0.norm2"] == BF16 and seen["blocks.0.gate_clip.norm"] == BF16  # FP32LayerNorm: cast back
    norm = GroupNorm(2, 4, per_frame=True).to(BF16)
    assert norm(torch.randn(1, 4, 2, 3, 3, dtype=BF16)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_bf16_on_the_gpu_matches_real_cuda_autocast() -> None:
    """On a GPU the reference is torch.autocast itself (this checks the emulation too); tolerance 1e-2 of the
    output's largest magnitude (a few bf16 ulps: fused kernels may differ), against the former 0.8%-4.5% gaps."""
    torch.manual_seed(0)
    cfg = TransformerConfig.tiny()
    model = RuyiTransformer3D(cfg).eval().requires_grad_(False).to("cuda", BF16)
    inputs = {k: tuple(t.cuda() for t in v) if isinstance(v, tuple) else v.cuda()
              for k, v in random_denoiser_inputs(cfg, batch=2, frames=3, height=4, width=6).items()}  # fmt: skip
    ours = BlockRunner(model, "cuda", BF16)(**inputs)
    with torch.autocast("cuda", dtype=BF16):
        reference = BlockRunner(with_original_norm_classes(model), "cuda", BF16)(**inputs)
    assert_close_scaled(ours, reference, 1e-2, "transformer")
    clip = build_random_image_encoder(32, 56, 14, 2, 2, seed=0).to("cuda", BF16)
    pixels = torch.randn(2, 3, 56, 56, device="cuda")
    with torch.autocast("cuda", dtype=BF16):
        expected = clip.vision_model.vision_model(pixel_values=pixels.to(BF16)).last_hidden_state[:, 1:]
    assert_close_scaled(clip(pixels), expected, 1e-2, "clip")
