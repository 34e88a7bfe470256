"""The ComfyUI nodes: Load Model, Load LoRA, TeaCache, Enhance-A-Video and Sampler (Image to Video).

Importing this module is cheap: the library (torch, the models) is imported inside the node methods, and
ComfyUI's own modules only through `host` at call time. Loading is lazy: Load Model checks the options and
the checkpoint and returns a `PipelineSpec`; LoRA, TeaCache and Enhance-A-Video return it with their options
changed; the sampler gets its `RuyiPipeline` from one process-wide `PipelineCache` and the pipeline loads on its
first video, so re-queuing a workflow reuses the loaded pipeline (and so does another TeaCache or Enhance-A-Video
setting). Every node method goes through `errors.node_errors`: messages name node inputs, types read as classes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from . import host
from .errors import node_errors

if TYPE_CHECKING:
    import torch

    from ..runtime.session import PipelineCache, PipelineSpec

log = logging.getLogger(__name__)

CATEGORY = "Ruyi-TRT"
PIPELINE = "RUYI_TRT_PIPELINE"
OFFLOAD_STEPS = ("auto", "0", "1", "2", "5", "7", "10")  # the original's GPU_offload_steps choices, plus auto
HIDDEN = {"unique_id": "UNIQUE_ID"}  # the node's id, for its progress text
VIDEO_OUTPUT = host.has_video_type()  # a VIDEO output where this ComfyUI has the type (0.3.4x and later)


def _choice(options: tuple | list, default: str, tooltip: str = "") -> tuple:
    return (list(options), {"default": default, **({"tooltip": tooltip} if tooltip else {})})


def _number(kind: str, default: float, low: float, high: float, step: float, tooltip: str = "") -> tuple:
    spec = {"default": default, "min": low, "max": high, "step": step}
    return (kind, {**spec, **({"tooltip": tooltip} if tooltip else {})})


def _toggle(tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": True, "tooltip": tooltip})


@functools.cache
def pipelines() -> PipelineCache:
    """The process-wide cache of the loaded pipeline (created on first use)."""
    from ..runtime.session import PipelineCache

    return PipelineCache()


def _skip_steps(start: int, end: int, low: int, what: str) -> dict[str, tuple]:
    return {"skip_start_steps": _number("INT", start, low, 200, 1, f"The first n steps are {what}."),
            "skip_end_steps": _number("INT", end, low, 200, 1, f"The last n steps are {what}.")}  # fmt: skip


class _PipelineEdit:
    """A node that takes a pipeline and returns it with some of its options changed (`edit`)."""

    RETURN_TYPES = (PIPELINE,)
    RETURN_NAMES = ("pipeline",)
    CATEGORY = CATEGORY

    @staticmethod
    def edit(pipeline: PipelineSpec, **changes: object) -> tuple[PipelineSpec]:
        options = replace(pipeline.options, **changes)
        options.validate()
        return (replace(pipeline, options=options),)


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

        model_tip = (f"Checkpoint folders in models/{host.RUYI_FOLDER} (and extra_model_paths.yaml's "
                     f"'{host.RUYI_FOLDER}:' entries); {host.DEFAULT_MODEL} is downloaded (17 GB) when missing; tiny "
                     "and full-random have random weights.")  # fmt: skip
        return {
            "required": {
                "model": _choice(host.model_choices(), host.DEFAULT_MODEL, model_tip),
                "backend": _choice(BACKENDS, "torch", "trt needs engines built with `ruyi-trt build`."),
                "dtype": _choice(("auto", *DTYPES), "auto", "auto: bf16 on a GPU (fp16 with ort), fp32 on the CPU."),
                "memory_mode": _choice(MEMORY_MODES, "auto", "auto plans offload/streaming for the free GPU memory."),
                "offload_steps": _choice(OFFLOAD_STEPS, "auto", "The original's GPU_offload_steps: long-skip "
                                         "activations move to the host in groups of k (0: never; auto: the plan)."),
                "fp8": _choice(FP8_MODES, "none", "Store transformer weights in fp8 (torch backend)."),
                "fp8_storage": _choice(FP8_STORAGE_CHOICES, "auto", "auto: fp8_e4m3fn, as the original."),
            },
            "hidden": HIDDEN,
        }  # fmt: skip

    @node_errors
    def load(self, model: str, backend: str, dtype: str, memory_mode: str, fp8: str, fp8_storage: str,
             offload_steps: str = "auto", unique_id: str | None = None) -> tuple[PipelineSpec]:  # fmt: skip
        from ..runtime.loading import RuntimeOptions
        from ..runtime.session import PipelineSpec

        options = RuntimeOptions.make(backend=backend, device=host.device(), dtype=None if dtype == "auto" else dtype,
                                      memory_mode=memory_mode, fp8=fp8, fp8_storage=fp8_storage,
                                      offload_steps=None if offload_steps == "auto" else int(offload_steps))  # fmt: skip
        return (PipelineSpec(host.model_folder(model, unique_id), options),)


class RuyiTRTLoadLora(_PipelineEdit):
    DISPLAY_NAME = "Ruyi-TRT Load LoRA"
    FUNCTION = "load_lora"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "lora": host.lora_widget(),
                "strength": _number("FLOAT", 1.0, -100.0, 100.0, 0.01),
            }
        }

    @node_errors
    def load_lora(self, pipeline: PipelineSpec, lora: str, strength: float) -> tuple[PipelineSpec]:
        """Chain a LoRA after the pipeline's others (merged in order, each with its strength, as the original)."""
        return self.edit(pipeline, loras=(*pipeline.options.loras, (host.lora_path(lora), float(strength))))


class RuyiTRTTeaCache(_PipelineEdit):
    DISPLAY_NAME = "Ruyi-TRT TeaCache"
    FUNCTION = "tea_cache"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "enable": _toggle("Reuse the transformer's last output on steps whose input barely changed."),
                "threshold": _number("FLOAT", 0.10, 0.01, 1.0, 0.01, "0.10 skips about 6-8 of 25 steps, 0.15 about 10-12."),
                **_skip_steps(3, 1, 1, "always computed"),
                "offload_cpu": ("BOOLEAN", {"default": True, "tooltip": "Keep TeaCache's tensors on the CPU."}),
            }
        }  # fmt: skip

    @node_errors
    def tea_cache(self, pipeline: PipelineSpec, enable: bool, threshold: float, skip_start_steps: int,
                  skip_end_steps: int, offload_cpu: bool = True) -> tuple[PipelineSpec]:  # fmt: skip
        return self.edit(pipeline, teacache_threshold=threshold if enable else None, teacache_skip_start=skip_start_steps,
                         teacache_skip_end=skip_end_steps, teacache_offload_cpu=offload_cpu)  # fmt: skip


class RuyiTRTEnhanceAVideo(_PipelineEdit):
    DISPLAY_NAME = "Ruyi-TRT Enhance-A-Video"
    FUNCTION = "enhance_a_video"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict[str, tuple]]:
        return {
            "required": {
                "pipeline": (PIPELINE,),
                "enable": _toggle("Scale self-attention by a temporal score: more consistent motion (torch backend)."),
                "weight": _number("FLOAT", 1.0, 0.0, 100.0, 0.01, "Below 5-10 looks best (below 5 for short videos)."),
                **_skip_steps(0, 0, 0, "not enhanced"),
            }
        }  # fmt: skip

    @node_errors
    def enhance_a_video(self, pipeline: PipelineSpec, enable: bool, weight: float, skip_start_steps: int,
                        skip_end_steps: int) -> tuple[PipelineSpec]:  # fmt: skip
        return self.edit(pipeline, enhance_a_video=weight if enable else None,
                         enhance_a_video_skip_start=skip_start_steps, enhance_a_video_skip_end=skip_end_steps)  # fmt: skip


class RuyiTRTSampler:
    DISPLAY_NAME = "Ruyi-TRT Sampler (Image to Video)"
    RETURN_TYPES = ("IMAGE", "FLOAT", *(("VIDEO",) if VIDEO_OUTPUT else ()))
    RETURN_NAMES = ("images", "fps", *(("video",) if VIDEO_OUTPUT else ()))
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
                "video_length": _number("INT", 72, 8, MAX_FRAMES, 8, "Frames, a multiple of 8 (others are rounded down)."),
                "base_resolution": _choice([str(r) for r in RESOLUTIONS], "512", "The aspect bucket's base: 512 and 768 "
                                           "as the original; any of 384..1024 in steps of 16."),
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
            "hidden": HIDDEN,
        }  # fmt: skip

    @node_errors
    def sample(self, pipeline: PipelineSpec, start_image: torch.Tensor, video_length: int, base_resolution: str,
               seed: int, steps: int, cfg: float, scheduler: str, motion: str, camera: str,
               end_image: torch.Tensor | None = None, height: int = 0, width: int = 0,
               unique_id: str | None = None) -> tuple:  # fmt: skip
        from ..runtime.request import VideoRequest
        from .convert import images_to_pil, video_to_images
        from .managed import claim_memory

        request = VideoRequest(
            start_images=images_to_pil(start_image, "start_image"),
            end_images=images_to_pil(end_image, "end_image") if end_image is not None else (),
            frames=video_length, resolution=int(base_resolution), size=(height, width) if height or width else None,
            camera=camera, motion=motion, steps=steps, guidance_scale=cfg, seed=seed, scheduler=scheduler,
        )  # fmt: skip
        pipe = pipelines().get(pipeline)
        claim_memory(pipe)
        chunk = pipe.vae_config.mini_batch_encoder
        frames, note = request.geometry(chunk)[2], ""
        if frames != request.frames:
            note = f"video_length {request.frames} is not a multiple of {chunk}: making {frames} frames"
            log.warning("Ruyi-TRT: %s", note)
            host.show_text(note, unique_id)
        progress = host.JobProgress.make(pipe.progress_totals(request), unique_id, note)
        preview = progress.preview if progress is not None and host.previews_enabled() else None
        video = pipe.generate(request, callback=progress, preview=preview)
        log.info("Ruyi-TRT: %s", video.stats.summary())
        images = video_to_images(video.frames)
        return (images, float(video.fps), *((host.comfy_video(images, video.fps),) if VIDEO_OUTPUT else ()))


NODES = (RuyiTRTLoadModel, RuyiTRTLoadLora, RuyiTRTTeaCache, RuyiTRTEnhanceAVideo, RuyiTRTSampler)
