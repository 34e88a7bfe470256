"""The main job end to end: image files -> validated request -> pipeline -> mp4 (and optional PNG frames).

Everything cheap is checked before any model is loaded (images, options, output folder), and the
video is written atomically, so a failed run leaves no file behind. `plan_video` makes the memory plan
from configs alone, so it also works without the weights (`ruyi-trt run --plan-only`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint_io import CheckpointError
from ..models.geometry import closest_bucket, round_video_length
from .loading import RuntimeOptions, load_pipeline, load_random_pipeline
from .memory.plan import MemoryPlan, PlanRequest, device_budget_bytes, plan_memory
from .model_source import FULL_RANDOM, model_configs, resolve_model
from .parallel import ParallelError, prepare_run
from .pipeline import RunStats
from .request import VideoRequest, load_image
from .video import write_frames, write_video

log = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """A run that cannot go ahead; the message says what to change."""


def check_writable(path: Path, argument: str) -> None:
    """Fail early when the folder that will hold `path` cannot be written."""
    folder = path.parent if path.suffix else path
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise GenerationError(f"{argument}: cannot write into {existing} (for {path}); choose another location.")


def plan_video(
    model: str | Path | None,
    images: Sequence[str | Path],
    request_args: dict[str, Any],
    options: RuntimeOptions = RuntimeOptions(),
    plan_only: bool = False,
) -> MemoryPlan | None:
    """The memory plan of this job, from config.json files only (no weights are read).

    None when there is nothing to plan for: memory_mode auto with neither a CUDA GPU nor --vram-budget
    (the run then stays in host memory); with `plan_only` that case raises instead."""
    try:
        options.validate()
        request = VideoRequest(start_images=[load_image(p, "--image") for p in images], **request_args)
        return plan_for_request(model, request, options, plan_only)
    except (ValueError, TypeError, CheckpointError) as exc:
        raise GenerationError(str(exc)) from exc


def plan_for_request(
    model: str | Path | None, request: VideoRequest, options: RuntimeOptions, plan_only: bool = False
) -> MemoryPlan | None:
    """`plan_video` for a request already made (ComfyUI passes images, not files); same None case."""
    budget = device_budget_bytes(options.device, options.vram_budget_gb)
    if budget is None and options.memory_mode == "auto":
        if plan_only:
            raise GenerationError("no CUDA GPU is present to plan for: pass --vram-budget GB (e.g. 24) to plan for a card.")
        log.info("no CUDA GPU and no --vram-budget: running without a memory plan, in host memory")
        return None
    tcfg, vcfg, clip = model_configs(model)
    if options.parallel is not None:
        options.parallel.check_heads(tcfg.num_attention_heads)
        options.parallel.check_guidance(request.guidance_scale > 1.0)
    if request.size is not None:
        height, width = request.size
    else:
        height, width = closest_bucket(*request.start_images[0].size, request.resolution)
    plan_request = PlanRequest(
        height=height, width=width, frames=round_video_length(request.frames, vcfg.mini_batch_encoder),
        cfg=request.guidance_scale > 1.0, dtype=options.dtype, fp8=options.fp8,
        teacache=options.teacache_threshold is not None, steps=request.steps,
        memory_mode=options.memory_mode, offload_steps=options.offload_steps, budget_bytes=budget,
        sequence_parallel=options.parallel.sequence if options.parallel else 1,
        cfg_parallel=bool(options.parallel and options.parallel.cfg > 1),
    )  # fmt: skip
    return plan_memory(tcfg, vcfg, clip, plan_request)


def generate_video(
    model: str | Path | None,
    images: Sequence[str | Path],
    end_images: Sequence[str | Path],
    out: str | Path,
    request_args: dict[str, Any],
    options: RuntimeOptions = RuntimeOptions(),
    frames_dir: str | Path | None = None,
    progress: bool = True,
    on_plan: Callable[[MemoryPlan], None] | None = None,
) -> tuple[Path, RunStats]:
    """Run the whole image-to-video job and write the video; returns its path and the run statistics.

    The memory plan is made here (see `plan_for_request`) and handed to `on_plan` before any weight loads.
    With `options.parallel` every process of the torchrun job calls this; each plans for and runs its own part
    on its own device, and rank 0 writes the files once every rank has its copy of the video."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise GenerationError(f"--out: {out} must end in .mp4")
    check_writable(out, "--out")
    if frames_dir is not None:
        check_writable(Path(frames_dir), "--frames-dir")
    try:
        request = VideoRequest(
            start_images=[load_image(p, "--image") for p in images],
            end_images=[load_image(p, "--end-image") for p in end_images],
            **request_args,
        )
        options.validate()
        context = None
        if options.parallel is not None:
            context = prepare_run(options.parallel, options.device, model_configs(model)[0], request.guidance_scale > 1)
            options = dataclasses.replace(options, device=str(context.device))
        plan = plan_for_request(model, request, options)
        if plan is not None and on_plan is not None:
            on_plan(plan)
        if model is not None and str(model) == FULL_RANDOM:
            pipeline = load_random_pipeline(options, plan)
        else:
            pipeline = load_pipeline(resolve_model(model), options, plan)
        video, stats = pipeline(request, progress=progress and (context is None or context.is_main))
    except (ValueError, TypeError, CheckpointError, ParallelError) as exc:
        raise GenerationError(str(exc)) from exc
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise GenerationError(
            f"out of memory ({exc}). Try --memory-mode auto (with a smaller --vram-budget), --memory-mode low_gpu, "
            "--offload-steps 1, --fp8 lite, --dtype bf16, or fewer --frames / a lower --resolution."
        ) from exc
    if context is None or context.is_main:
        write_video(video, out, fps=24)
        if frames_dir is not None:
            write_frames(video, frames_dir, overwrite=True)
    if context is not None:
        try:
            context.barrier()  # the other ranks return once the files exist
        except ParallelError as exc:
            raise GenerationError(str(exc)) from exc
    return out, stats
