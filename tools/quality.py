"""`ruyi-trt bench --quality`: how far each fast path's output is from the reference, from the same seed.

Every backend makes the same video (the bench's first shape, `steps` steps, seed 0, a synthetic start image);
the reference is the torch backend in bf16 on a GPU and fp32 on the CPU. Per backend: the cosine similarity of
the latents after the last denoising step (flattened, float64) and the PSNR of the decoded video in [0, 1]
(10 log10(1 / MSE); inf when identical). The latents are taken from the pipeline's first VAE-decoder call of
the run (the final latents over the scaling factor; the cosine does not see the scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REFERENCE_DTYPE = {"cuda": "bf16", "cpu": "fp32"}
SEED = 0


@dataclass
class QualityRun:
    latents: torch.Tensor  # float32, CPU
    video: torch.Tensor  # [1, 3, F, H, W] float32 in [0, 1], CPU


class _FirstDecode:
    """The VAE-decoder backend, recording the latents of its first call."""

    def __init__(self, decoder):
        self.decoder, self.latents = decoder, None

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latents is None:
            self.latents = latents.detach().float().cpu().clone()
        return self.decoder(latents=latents)

    def close(self) -> None:
        self.decoder.close()


def quality_request(height: int, width: int, frames: int, steps: int):
    from ..runtime.request import VideoRequest
    from ..testing import gradient_image

    return VideoRequest(start_images=[gradient_image(width, height)], frames=frames, size=(height, width), steps=steps,
                        seed=SEED)  # fmt: skip


def quality_run(pipeline, request) -> QualityRun:
    """Run `request` on a loaded RuyiPipeline, keeping the final latents and the decoded video."""
    components = pipeline.components
    decoder = components.vae_decoder
    recorder = components.vae_decoder = _FirstDecode(decoder)
    try:
        video, _ = pipeline.run(request, progress=False)
    finally:
        components.vae_decoder = decoder
    return QualityRun(recorder.latents, video.float().cpu())


def latent_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-300))


def psnr_db(video: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR of two videos in [0, 1]; inf when they are identical."""
    mse = float(((video.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def compare(run: QualityRun, reference: QualityRun) -> dict[str, float]:
    if run.latents.shape != reference.latents.shape or run.video.shape != reference.video.shape:
        raise ValueError(f"quality: shapes differ from the reference ({tuple(run.latents.shape)} vs "
                         f"{tuple(reference.latents.shape)})")  # fmt: skip
    return {"latent_cosine": latent_cosine(run.latents, reference.latents), "psnr_db": psnr_db(run.video, reference.video)}
