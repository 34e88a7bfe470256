"""Tests for models/vae.py: golden parity with the reference AutoencoderKLMagvit, loading, sampling, chunking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ruyi_trt.models.checkpoint_io import CheckpointError, save_component
from ruyi_trt.models.vae import RuyiVAE
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.testing import assert_close_scaled

VARIANTS = ("cache", "slice", "slice_plain")
TAGS = ("even", "odd")


def _tiny_model(seed: int = 0, **overrides) -> RuyiVAE:
    torch.manual_seed(seed)
    cfg = VAEConfig.from_dict({**VAEConfig.tiny().to_dict(), **overrides})
    return RuyiVAE(cfg).eval().requires_grad_(False)


def _video(frames: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("tag", TAGS)
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_vae_golden(golden_dir: Path, variant: str, tag: str) -> None:
    """encode -> mean/logvar and decode(mean) match the reference, float32, max abs err <= 1e-4 x max(1, |expected|max).

    Every shape comes from the golden files (the held-out set uses other frame counts and sizes).
    """
    config = json.loads((golden_dir / f"vae_{variant}_config.json").read_text())["base_config_json"]
    model = RuyiVAE.from_config(config).eval()
    model.load_state_dict(load_file(golden_dir / f"vae_{variant}_state_dict.safetensors"), strict=True)
    io = load_file(golden_dir / f"vae_{variant}_io.safetensors")
    if f"{tag}.input_video" not in io:
        pytest.fail(f"vae_{variant}_io.safetensors has no '{tag}.*' tensors")
    video = io[f"{tag}.input_video"].float()

    posterior = model.encode(video)
    assert_close_scaled(posterior.mean, io[f"{tag}.latent_mean"], name=f"{variant}.{tag}.mean")
    assert_close_scaled(posterior.logvar, io[f"{tag}.latent_logvar"], name=f"{variant}.{tag}.logvar")
    decoded = model.decode(posterior.mean)
    assert_close_scaled(decoded, io[f"{tag}.decoded"], name=f"{variant}.{tag}.decoded")

    assert model.config.latent_frames(video.shape[2]) == posterior.mean.shape[2]
    assert model.config.decoded_frames(posterior.mean.shape[2]) == decoded.shape[2]


def test_golden_config_round_trip(golden_dir: Path) -> None:
    for variant in VARIANTS:
        data = json.loads((golden_dir / f"vae_{variant}_config.json").read_text())
        cfg = VAEConfig.from_dict(data["base_config_json"])
        assert VAEConfig.from_dict(data["config"]) == cfg
        assert VAEConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.spatial_factor == 2 ** (len(data["config"]["block_out_channels"]) - 1)


@torch.no_grad()
def test_tiny_save_and_from_pretrained(tmp_path: Path) -> None:
    model = _tiny_model()
    save_component(tmp_path, model.config.to_dict(), model.state_dict())
    loaded = RuyiVAE.from_pretrained(tmp_path)
    assert loaded.config == model.config
    video = _video(8)
    mean = model.encode(video).mean
    assert torch.equal(loaded.encode(video).mean, mean)
    assert torch.equal(loaded.decode(mean), model.decode(mean))


@pytest.mark.parametrize("change", ["missing", "misshaped"])
def test_from_pretrained_rejects_key_mismatch(tmp_path: Path, change: str) -> None:
    model = _tiny_model()
    state = dict(model.state_dict())
    if change == "missing":
        state.pop("decoder.conv_out.bias")
    else:
        state["quant_conv.bias"] = torch.zeros(3)
    save_component(tmp_path, model.config.to_dict(), state)
    with pytest.raises(CheckpointError, match=change.replace("misshaped", "mis-shaped")):
        RuyiVAE.from_pretrained(tmp_path)


def test_unexpected_keys_are_a_warning_that_names_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An extra tensor in a checkpoint never blocks loading (the original loads with strict=False)."""
    model = _tiny_model()
    state = {**model.state_dict(), "encoder.extra.weight": torch.zeros(1), "zz_unused": torch.ones(2)}
    save_component(tmp_path, model.config.to_dict(), state)
    with caplog.at_level("WARNING", logger="ruyi_trt.models.checkpoint_io"):
        loaded = RuyiVAE.from_pretrained(tmp_path)
    assert "2 tensor(s) not used by RuyiVAE, left out: encoder.extra.weight, zz_unused" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


@torch.no_grad()
def test_posterior_sample_is_seeded() -> None:
    posterior = _tiny_model().encode(_video(8))
    a = posterior.sample(torch.Generator().manual_seed(3))
    b = posterior.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == posterior.mean.shape
    assert not torch.equal(a, posterior.mode())
    assert posterior.logvar.min() >= -30 and posterior.logvar.max() <= 20


# bfloat16, CPU: GroupNorm + SiLU done a few groups at a time into the conv dtype equals the whole float32 norm and
# activation rounded once, bit for bit, per frame and over the whole clip (the float32 copies are per slice only).
@pytest.mark.parametrize("per_frame", [True, False])
@torch.no_grad()
def test_sliced_norm_act_equals_the_whole_float32_computation(per_frame: bool) -> None:
    from ruyi_trt.models.vae_blocks import NORM_SLICES, GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(32, 256, per_frame)
    norm.weight.normal_()
    norm.bias.normal_()
    norm = norm.to(torch.bfloat16)
    x = torch.randn(2, 256, 3, 9, 7).to(torch.bfloat16)
    act = torch.nn.SiLU()
    assert NORM_SLICES > 1
    assert torch.equal(norm.norm_act(x, act, torch.bfloat16), act(norm(x)).to(torch.bfloat16))


@pytest.mark.parametrize("mode", ["slice_compression_vae", "cache_compression_vae"])
@torch.no_grad()
def test_frame_counts_match_config(mode: str) -> None:
    model = _tiny_model(
        slice_compression_vae=mode == "slice_compression_vae", cache_compression_vae=mode == "cache_compression_vae"
    )
    for frames in (1, 8, 9, 12):
        latents = model.encode(_video(frames, size=8)).mean
        assert latents.shape[2] == model.config.latent_frames(frames)
        assert model.decode(latents).shape[2] == model.config.decoded_frames(latents.shape[2])


@torch.no_grad()
def test_cached_chunks_chain_like_decode() -> None:
    model = _tiny_model(slice_compression_vae=False, cache_compression_vae=True)
    latents = torch.randn(1, 16, 5, 1, 1, generator=torch.Generator().manual_seed(0))
    first, cache = model.decode_chunk_cached(latents[:, :, :2])
    second, cache = model.decode_chunk_cached(latents[:, :, 2:4], cache)
    third, _ = model.decode_chunk_cached(latents[:, :, 4:], cache)
    assert torch.equal(torch.cat([first, second, third], dim=2), model.decode(latents))
    with pytest.raises(ValueError, match="cache"):
        model.decode_chunk_cached(latents[:, :, :2], cache[:-1])


def test_config_rejects_unsupported_options() -> None:
    base = VAEConfig.tiny().to_dict()
    for key, value in [
        ("tile_overlap_factor", 1.5),  # tiling itself is supported (tests/models/test_vae_tiling.py)
        ("use_gc_blocks", [True] * 4),
        ("mid_block_attention_type", "temporal"),
        ("slice_compression_vae", False),
        ("block_out_channels", [8, 16, 32, 64]),
    ]:
        with pytest.raises(ValueError, match=key):
            VAEConfig.from_dict({**base, key: value})
    with pytest.raises(CheckpointError, match="down_block_types"):
        VAEConfig.from_dict({k: v for k, v in base.items() if k != "down_block_types"})


def test_full_config_builds_on_meta() -> None:
    cfg = VAEConfig.full()
    with torch.device("meta"):
        model = RuyiVAE(cfg)
    assert len(model.state_dict()) == 248
    assert not list(model.buffers())
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.latent_frames(120)) == (8, 4, 30)
    assert sum(p.numel() for p in model.parameters()) > 2e8
