"""The four stages of one run, called exactly as `RuyiPipeline.__call__` calls them, for memory measurements.

`run_pipeline_stages(pipeline, plan, measure)` feeds each stage inputs of the shapes the pipeline would give it
(random values: the numbers do not matter) and lets `measure(name, fn)` run it: tools/memory_check measures
fake CUDA storage, tools/streaming_check the real `torch.cuda.max_memory_allocated`. The denoise stage is the
last step of a run (`start(1)`: under model offload the transformer leaves the device after it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

STAGES = ("vae encode", "clip", "denoise", "vae decode")
GUIDANCE_SCALE = 7.0  # any value > 1: classifier-free guidance on (a batch of 2, or the CFG split)


def run_pipeline_stages(
    pipeline: Any, plan: Any, measure: Callable[[str, Callable[[], Any]], dict], until: str = STAGES[-1]
) -> dict[str, dict]:
    """{stage: what `measure` returned} for vae encode, clip, denoise and vae decode (or the stages up to `until`),
    in the pipeline's order."""
    from ..models.scheduler import load_scheduler, timesteps_for
    from ..runtime.denoising import denoise_step, transformer_conditioning

    comps, tcfg, vcfg = pipeline.components, pipeline.transformer_config, pipeline.vae_config
    r = plan.request
    t, lh, lw = plan.latent_shape
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    scheduler = load_scheduler("DDIM", pipeline.checkpoint.scheduler)
    with unset_fake_temporarily():  # a real Python int: fake tensors cannot index the scheduler's tables
        last_t = int(timesteps_for(scheduler, r.steps)[-1])
    generator = torch.Generator().manual_seed(0)
    results: dict[str, dict] = {}
    box: dict[str, Any] = {}

    def vae_encode() -> None:
        video = torch.rand(1, 3, r.frames, r.height, r.width)  # the conditioning video, float32 on the host
        box["inpaint"] = pipeline.encode_latents(video, generator).repeat(1, 2, 1, 1, 1)

    def clip() -> None:
        size = pipeline.checkpoint.image_processor.get("crop_size", {}).get("height", 336)
        box["clip"] = comps.image_encoder(pixel_values=torch.rand(1, 3, size, size))

    def denoise() -> None:
        positive, negative = pipeline.embeddings.select("auto", "auto")
        _, late = transformer_conditioning(positive, negative, box.pop("clip"), box.pop("inpaint").to(comps.dtype),
                                           r.height, r.width, tcfg, r.cfg)  # fmt: skip
        latents = torch.randn(1, vcfg.latent_channels, t, lh, lw).to(comps.device, comps.dtype)
        comps.denoiser.start(1)
        box["latents"] = denoise_step(comps.denoiser, scheduler, latents, last_t, late, GUIDANCE_SCALE,
                                      vcfg.latent_channels, {"eta": 0.0})  # fmt: skip

    def vae_decode() -> None:
        box["video"] = pipeline.decode_latents(box.pop("latents"))

    for name, fn in zip(STAGES[: STAGES.index(until) + 1], (vae_encode, clip, denoise, vae_decode)):
        results[name] = measure(name, fn)
    box.clear()
    return results
