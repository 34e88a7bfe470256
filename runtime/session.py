"""A loaded pipeline kept between runs, for hosts that run many requests in one process (ComfyUI).

`PipelineSpec` says what to load; `PipelineCache.get` loads it on the first request and reuses it until the
spec changes or, under memory_mode auto with a budget, the video the memory plan was made for changes
(size, frames, CFG). The plan is not remade for a reused pipeline: the device's free memory then counts
the pipeline itself. One pipeline at a time: a new one is loaded only after the old one is closed.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.geometry import closest_bucket
from .generate import plan_for_request
from .loading import RuntimeOptions, load_pipeline, load_random_pipeline
from .memory.plan import MemoryPlan
from .model_source import FULL_RANDOM
from .pipeline import RuyiPipeline
from .request import VideoRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineSpec:
    """A checkpoint folder (or `full-random`) and the options to run it with; hashable, so it keys the cache."""

    model: str
    options: RuntimeOptions


def plan_key(spec: PipelineSpec, request: VideoRequest) -> tuple | None:
    """What a memory plan for `request` depends on besides `spec`: None when no plan depends on the video
    (fixed memory modes, ONNX Runtime, or auto without a CUDA GPU or budget)."""
    options = spec.options
    planned = options.vram_budget_gb is not None or torch.device(options.device).type == "cuda"
    if options.memory_mode != "auto" or options.backend == "ort" or not planned:
        return None
    size = request.size or closest_bucket(*request.start_images[0].size, request.resolution)
    return size, request.frames, request.guidance_scale > 1.0


class PipelineCache:
    """Holds at most one loaded pipeline; see the module docstring for when it reloads."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._pipeline: RuyiPipeline | None = None

    def get(self, spec: PipelineSpec, request: VideoRequest) -> RuyiPipeline:
        """The pipeline for `spec`, loaded (with a memory plan for `request`) unless the cached one fits."""
        key = (spec, plan_key(spec, request))
        if self._pipeline is None or key != self._key:
            self.clear()
            plan = plan_for_request(spec.model, request, spec.options)
            if plan is not None:
                log.info("%s", plan.describe())
            self._pipeline = load_spec(spec, plan)
            self._key = key
        return self._pipeline

    def clear(self) -> None:
        """Close and drop the cached pipeline, returning its device memory."""
        if self._pipeline is not None:
            self._pipeline.components.close()
        self._pipeline, self._key = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_spec(spec: PipelineSpec, plan: MemoryPlan | None = None) -> RuyiPipeline:
    """Load the pipeline `spec` names, following `plan` when given."""
    if spec.model == FULL_RANDOM:
        return load_random_pipeline(spec.options, plan)
    return load_pipeline(Path(spec.model), spec.options, plan)
