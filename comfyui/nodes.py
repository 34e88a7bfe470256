"""The ComfyUI nodes: Load Model, Load LoRA and Sampler (Image to Video), as plain node classes.

Importing this module is cheap: the library (torch, the models) is imported inside the node methods, and
ComfyUI's own modules only through `host` at call time. Loading is lazy: Load Model checks the options and
the checkpoint and returns a `PipelineSpec`; the sampler gets its `RuyiPipeline` from one process-wide
`PipelineCache` and the pipeline loads on its first video, so re-queuing a workflow reuses the loaded pipeline.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from . import host

if TYPE_CHECKING:
    import torch

    from ..runtime.session import PipelineCache, PipelineSpec

log = logging.getLogger(__name__)

CATEGORY = "Ruyi-TRT"
PIPELINE = "RUYI_TRT_PIPELINE"


def _choice(options: tuple | list, default: str, tooltip: str = "") -> tuple:
    return (list(options), {"default": default, **({"tooltip": tooltip} if tooltip else {})})


def _number(kind: str, default: float, low: float, high: float, step: float, tooltip: str = "") -> tuple:
    spec = {"default": default, "min": low, "max": high, "step": step}
    return (kind, {**spec, **({"tooltip": tooltip} if tooltip else {})})


@functools.cache
def pipelines() -> PipelineCache:
    """The process-wide cache of the loaded pipeline (created on first use)."""
    from ..runtime.session import PipelineCache

    return PipelineCache()


class RuyiTRTLoadModel:
    DISPLAY_NAME = "Ruyi-TRT Load Model"
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        from ..runtime.loading import BACKENDS, DTYPES, MEMORY_MODES
        from ..weights.fp8_storage import FP8_MODES, FP8_STORAGE_CHOICES

        model_tip = "A folder name under models/Ruyi, a checkpoint path, 'tiny' or 'full-random' (random weights)."
        return {
            "required": {
                "model": ("STRING", {"default": "Ruyi-Mini-7B", "tooltip": model_tip}),
                "backend": _choice(BACKENDS, "torch", "trt needs engines built with `ruyi-trt build`."),
                "dtype": _choice(("auto", *DTYPES), "auto", "auto: bf16 on a GPU (fp16 with ort), fp32 on the CPU."),
                "memory_mode": _choice(MEMORY_MODES, "auto", "auto plans offload/streaming for the free GPU memory."),
                "fp8": _choice(FP8_MODES, "none", "Store transformer weights in fp8 (torch backend)."),
                "fp8_storage": _choice(FP8_STORAGE_CHOICES, "auto", "auto: fp8_e4m3fn, as the original."),
            },
            "optional": {
                "teacache_threshold": _number("FLOAT", 0.0, 0.0, 1.0, 0.01, "0: off; 0.1 skips about 6-8 of 25 steps."),
                "teacache_skip_start": _number("INT", 3, 1, 200, 1, "TeaCache: the first n steps are always computed."),
                "teacache_skip_end": _number("INT", 1, 1, 200, 1, "TeaCache: the last n steps are always computed."),
                "teacache_offload_cpu": ("BOOLEAN", {"default": True, "tooltip": "Keep TeaCache's tensors on the CPU."}),
                "enhance_a_video": _number("FLOAT", 0.0, 0.0, 100.0, 0.01, "Enhance-A-Video weight; 0: off (torch)."),
                "enhance_a_video_skip_start": _number("INT", 0, 0, 200, 1, "Enhance-A-Video: not on the first n steps."),
                "enhance_a_video_skip_end": _number("INT", 0, 0, 200, 1, "Enhance-A-Video: not on the last n steps."),
            },
        }

    def load(self, model: str, backend: str, dtype: str, memory_mode: str, fp8: str, fp8_storage: str,
             teacache_threshold: float = 0.0, teacache_skip_start: int = 3, teacache_skip_end: int = 1,
             teacache_offload_cpu: bool = True, enhance_a_video: float = 0.0, enhance_a_video_skip_start: int = 0,
             enhance_a_video_skip_end: int = 0) -> tuple[PipelineSpec]:  # fmt: skip
        from ..runtime.loading import RuntimeOptions
        from ..runtime.session import PipelineSpec

        tea = {"teacache": teacache_threshold, "teacache_skip_start": teacache_skip_start,
               "teacache_skip_end": teacache_skip_end, "teacache_offload_cpu": teacache_offload_cpu}
        eav = {"enhance_a_video": enhance_a_video, "enhance_a_video_skip_start": enhance_a_video_skip_start,
               "enhance_a_video_skip_end": enhance_a_video_skip_end}  # fmt: skip
        options = RuntimeOptions.make(backend=backend, device=host.device(), dtype=None if dtype == "auto" else dtype,
                                      memory_mode=memory_mode, fp8=fp8, fp8_storage=fp8_storage,
                                      **(tea if teacache_threshold else {}), **(eav if enhance_a_video else {}))  # fmt: skip
        return (PipelineSpec(host.model_folder(model), options),)


class RuyiTRTLoadLora:
    DISPLAY_NAME = "Ruyi-TRT Load LoRA"
    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    FUNCTION = "load_lora"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "lora": host.lora_widget(),
                "strength": _number("FLOAT", 1.0, -100.0, 100.0, 0.01),
            }
        }

    def load_lora(self, pipeline: PipelineSpec, lora: str, strength: float) -> tuple[PipelineSpec]:
        """Chain a LoRA after the pipeline's others (merged in order, each with its strength, as the original)."""
        from dataclasses import replace

        options = replace(pipeline.options, loras=(*pipeline.options.loras, (host.lora_path(lora), float(strength))))
        options.validate()
        return (replace(pipeline, options=options),)


class RuyiTRTSampler:
    DISPLAY_NAME = "Ruyi-TRT Sampler (Image to Video)"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        from ..runtime.request import CAMERAS, MAX_FRAMES, MOTIONS, RESOLUTIONS, SCHEDULER_NAMES

        size_tip = "Explicit size, a multiple of 16; 0 (with the other 0 too) picks the aspect bucket."
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "start_image": ("IMAGE", {"tooltip": "A batch of up to 5 images fixes that many leading frames."}),
                "video_length": _number("INT", 72, 8, MAX_FRAMES, 8),
                "base_resolution": _number("INT", 512, RESOLUTIONS[0], RESOLUTIONS[-1], RESOLUTIONS[1] - RESOLUTIONS[0]),
                "seed": _number("INT", 42, 0, 2**64 - 1, 1),
                "steps": _number("INT", 25, 1, 200, 1),
                "cfg": _number("FLOAT", 7.0, 1.0, 20.0, 0.01, "1 turns classifier-free guidance off (faster)."),
                "scheduler": _choice(SCHEDULER_NAMES, "DDIM"),
                "motion": _choice(MOTIONS, "2"),
                "camera": _choice(CAMERAS, "static"),
            },
            "optional": {
                "end_image": ("IMAGE", {"tooltip": "A batch of up to 5 images fixes that many trailing frames."}),
                "height": _number("INT", 0, 0, 2048, 16, size_tip),
                "width": _number("INT", 0, 0, 2048, 16, size_tip),
            },
        }

    def sample(self, pipeline: PipelineSpec, start_image: torch.Tensor, video_length: int, base_resolution: int,
               seed: int, steps: int, cfg: float, scheduler: str, motion: str, camera: str,
               end_image: torch.Tensor | None = None, height: int = 0, width: int = 0) -> tuple[torch.Tensor]:  # fmt: skip
        from ..runtime.request import VideoRequest
        from .convert import images_to_pil, video_to_images

        request = VideoRequest(
            start_images=images_to_pil(start_image, "start_image"),
            end_images=images_to_pil(end_image, "end_image") if end_image is not None else (),
            frames=video_length, resolution=int(base_resolution), size=(height, width) if height or width else None,
            camera=camera, motion=motion, steps=steps, guidance_scale=cfg, seed=seed, scheduler=scheduler,
        )  # fmt: skip
        video = pipelines().get(pipeline).generate(request, callback=host.step_callback(steps))
        log.info("Ruyi-TRT: %s", video.stats.summary())
        return (video_to_images(video.frames),)


NODES = (RuyiTRTLoadModel, RuyiTRTLoadLora, RuyiTRTSampler)
