"""FLOP counter against a hand count on the tiny config and the architecture doc's section 7 table."""

from __future__ import annotations

import pytest

from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.tools.environment import peak_rate
from ruyi_trt.tools.flops import transformer_flops

# Linear layers applied to every latent token in a block (attn2/attn_clip k,v see text/CLIP tokens only).
TOKEN_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
    "attn_clip.to_q", "attn_clip.to_out.0", "gate_clip.proj", "ff.net.0.proj", "ff.net.2", "skip_linear",
)  # fmt: skip


def test_tiny_config_matches_a_hand_count():
    # tiny: D = 32, Dff = int(32 * 4.3637) = 139, 4 layers, 1 skip block, 8 + 12 text + 16 CLIP tokens.
    # 2 latent frames of 8x8 -> 2 * 4 * 4 = 32 tokens; CFG batch 2.
    flops = transformer_flops(TransformerConfig.tiny(), frames=2, latent_h=8, latent_w=8, batch=2)
    per_token = 4 * (20 * 32**2 + 4 * 32 * 139) + 1 * 4 * 32**2  # 157,184
    assert flops.tokens == 32
    assert flops.linear == 2 * 32 * per_token == 10_059_776
    assert flops.self_attention == 2 * 4 * 4 * 32**2 * 32 == 1_048_576
    assert flops.cross_attention == 2 * 4 * 4 * 32 * (20 + 16) * 32 == 1_179_648
    assert flops.total == flops.linear + flops.self_attention + flops.cross_attention
    assert flops.to_dict()["total"] == flops.total


def test_linear_term_is_twice_the_weights_each_token_touches():
    model = tiny_transformer()
    modules = dict(model.named_modules())
    weights = sum(
        modules[f"blocks.{i}.{name}"].weight.numel()
        for i in range(len(model.blocks))
        for name in TOKEN_LINEARS
        if f"blocks.{i}.{name}" in modules
    )
    flops = transformer_flops(model.config, frames=1, latent_h=2, latent_w=2, batch=1)  # one token
    assert flops.linear == 2 * weights


@pytest.mark.parametrize(
    "height, width, frames, tokens, linear_tf, self_tf, cross_tf, total_pf",
    [
        (768, 768, 120, 69_120, 863, 2_153, 11, 6.05),
        (768, 768, 24, 13_824, 173, 86, 2, 0.52),
        (576, 1008, 120, 68_040, 849, 2_086, 11, 5.89),
        (384, 672, 120, 30_240, 378, 412, 5, 1.59),
        (384, 672, 24, 6_048, 76, 17, 1, 0.19),
    ],
)
def test_full_config_matches_the_architecture_doc(
    height, width, frames, tokens, linear_tf, self_tf, cross_tf, total_pf
):
    vae = VAEConfig.full()
    flops = transformer_flops(TransformerConfig.full(), vae.latent_frames(frames), height // 8, width // 8, batch=2)
    assert flops.tokens == tokens
    # The doc rounds per-sample TF (1e12) to integers (16.48 -> 17) and the CFG-batch total to 0.01 PFLOP.
    assert flops.linear / 2 / 1e12 == pytest.approx(linear_tf, rel=0.01, abs=0.55)
    assert flops.self_attention / 2 / 1e12 == pytest.approx(self_tf, rel=0.01, abs=0.55)
    assert flops.cross_attention / 2 / 1e12 == pytest.approx(cross_tf, abs=0.55)
    assert round(flops.total / 1e15, 2) == total_pf


def test_768_120_frames_is_about_6_05_pflop():
    flops = transformer_flops(TransformerConfig.full(), frames=30, latent_h=96, latent_w=96, batch=2)
    assert flops.tokens == 69_120
    assert flops.total == pytest.approx(6.05e15, rel=0.01)


def test_full_config_linear_flops_per_token():
    flops = transformer_flops(TransformerConfig.full(), frames=1, latent_h=2, latent_w=2, batch=1)
    assert flops.linear == pytest.approx(12.48e9, rel=1e-3)  # 2 x the 6.24e9 weights touched per token


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="patch_size"):
        transformer_flops(TransformerConfig.tiny(), 1, 7, 8)
    with pytest.raises(ValueError, match="frames"):
        transformer_flops(TransformerConfig.tiny(), 0, 8, 8)


@pytest.mark.parametrize(
    "name, dtype, expected",
    [
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H200 NVL", "bf16", 835.0),
        ("NVIDIA H100 80GB HBM3", "fp16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA L40S", "bf16", 362.05),
        ("NVIDIA GeForce RTX 4090", "fp16", 165.2),
        ("NVIDIA GeForce RTX 3090", "bf16", 71.0),
        ("NVIDIA GeForce RTX 4090 D", "bf16", None),
        ("NVIDIA H200", "fp32", None),
        ("Some Other GPU", "bf16", None),
    ],
)
def test_peak_table(name, dtype, expected):
    peak = peak_rate(name, dtype)
    if expected is None:
        assert peak is None
    else:
        assert peak.tflops == expected
        assert "datasheet" in peak.source or "whitepaper" in peak.source
