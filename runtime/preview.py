"""Latent previews: a cheap latent -> RGB projection for showing a video while it is denoised.

ComfyUI's Latent2RGB previewer multiplies each latent pixel by fixed per-model factors. Ruyi publishes none, so
`LatentPreview.fit` derives them for each run from the VAE's own encoding of the conditioning video (which the
pipeline makes anyway): a ridge-regularised least-squares fit of [latent channels, 1] -> the mean RGB of the video
pixels each latent pixel covers. It works for any checkpoint, the tiny random one included, and costs one small
solve per run. `image(latents)` then projects the middle latent frame to a uint8 image, one pixel per latent pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.vae_config import VAEConfig

RIDGE = 1e-3  # relative to the mean diagonal of the normal equations: keeps the fit stable on flat images


def frame_groups(config: VAEConfig, num_frames: int, num_latents: int) -> list[torch.Tensor]:
    """For each latent frame, the video frames it encodes: the encoder's chunks, each split evenly over its latents
    (an even split of all frames if the counts do not add up, e.g. for a VAE config this module does not know)."""
    groups = []
    for start, stop in config.encode_chunks(num_frames):
        groups += list(torch.arange(start, stop).tensor_split(config.latent_frames(stop - start)))
    if len(groups) != num_latents:
        groups = list(torch.arange(num_frames).tensor_split(num_latents))
    return groups


@dataclass(frozen=True)
class LatentPreview:
    """RGB = latent_pixel @ weight + bias, in [-1, 1]; weight [C, 3], bias [3] (float32, CPU)."""

    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, latents: torch.Tensor, video: torch.Tensor, config: VAEConfig) -> LatentPreview:
        """Fit to `latents` [1, C, T, h, w] (the scaled encoding of `video`) and `video` [1, 3, F, H, W] in [-1, 1]."""
        latents, video = latents[0].float().cpu(), video[0].float().cpu()
        channels, num_latents, height, width = latents.shape
        means = torch.stack([video[:, frames].mean(dim=1) for frames in frame_groups(config, video.shape[1], num_latents)])
        targets = F.adaptive_avg_pool2d(means, (height, width))  # [T, 3, h, w]
        x = torch.cat([latents.permute(1, 2, 3, 0).reshape(-1, channels), torch.ones(num_latents * height * width, 1)], 1)
        y = targets.permute(0, 2, 3, 1).reshape(-1, 3)
        gram = x.T @ x
        ridge = RIDGE * gram.diagonal().mean() * torch.eye(channels + 1)
        ridge[-1, -1] = 0  # the bias is not shrunk
        solution = torch.linalg.solve(gram + ridge, x.T @ y)
        return cls(weight=solution[:-1].contiguous(), bias=solution[-1].contiguous())

    def image(self, latents: torch.Tensor) -> torch.Tensor:
        """The middle latent frame of `latents` [1, C, T, h, w] as uint8 RGB [h, w, 3] on the CPU."""
        frame = latents[0, :, latents.shape[2] // 2].float().cpu()  # [C, h, w]
        rgb = frame.permute(1, 2, 0) @ self.weight + self.bias
        return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
