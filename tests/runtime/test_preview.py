"""Latent previews (runtime/preview.py): the fitted projection recovers a linear latent -> RGB map, and the frame
groups follow the VAE's encoder chunks."""

from __future__ import annotations

import torch

from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.runtime.preview import LatentPreview, frame_groups


def test_frame_groups_follow_the_encoder_chunks() -> None:
    config = VAEConfig.tiny()
    for frames in (1, 8, 9, 24):
        latents = config.latent_frames(frames)
        groups = frame_groups(config, frames, latents)
        assert len(groups) == latents and torch.equal(torch.cat(groups), torch.arange(frames))
    assert frame_groups(config, 9, config.latent_frames(9))[0].tolist() == [0]  # frame 0 alone
    assert len(frame_groups(config, 8, 3)) == 3  # counts that do not add up: an even split


def test_fit_recovers_a_linear_projection() -> None:
    """Video pixels made from the latents by a known map (each latent pixel -> an 8x8 block of its frames): the
    fitted preview reproduces that map's image to within 1 level of 255 (float32; the ridge term is small)."""
    config = VAEConfig.tiny()
    frames, height, width = 16, 6, 10
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, config.latent_frames(frames), height, width, generator=generator)
    weight, bias = torch.randn(16, 3, generator=generator) * 0.05, torch.tensor([0.1, -0.2, 0.05])
    rgb = latents[0].permute(1, 2, 3, 0) @ weight + bias  # [T, h, w, 3], within [-1, 1] here
    assert rgb.abs().max() <= 1
    video = torch.empty(3, frames, height * 8, width * 8)
    for latent, group in enumerate(frame_groups(config, frames, latents.shape[2])):
        block = rgb[latent].permute(2, 0, 1).repeat_interleave(8, 1).repeat_interleave(8, 2)
        video[:, group] = block[:, None]
    preview = LatentPreview.fit(latents, video[None], config)
    expected = ((rgb[latents.shape[2] // 2] + 1) * 127.5).round()
    image = preview.image(latents)
    assert image.dtype == torch.uint8 and image.shape == (height, width, 3)
    assert (image.float() - expected).abs().max() <= 1
