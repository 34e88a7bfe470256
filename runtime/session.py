"""A loaded pipeline kept between runs, for hosts that run many requests in one process (ComfyUI, a server).

`PipelineSpec` says what to load (a model name and the runtime options); `PipelineCache.get` returns the
`RuyiPipeline` for a spec, creating it on first use and keeping it until another spec is asked for. The pipeline
itself loads its weights and reloads when a video needs another memory plan (`RuyiPipeline.load`). One pipeline
at a time: a new one is made only after the old one is unloaded. A spec that differs only in the per-step
settings (TeaCache threshold and skipped steps, Enhance-A-Video) keeps the loaded pipeline: the torch block runner
reads them at each run, so trying another TeaCache threshold does not reload 17 GB of weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..models.checkpoint import Checkpoint
from .backends.block_runner import BlockRunner
from .loading import RuntimeOptions
from .pipeline import RuyiPipeline

STEP_OPTIONS = ("teacache_threshold", "teacache_skip_start", "teacache_skip_end", "teacache_offload_cpu",
                "enhance_a_video", "enhance_a_video_skip_start", "enhance_a_video_skip_end")


@dataclass(frozen=True)
class PipelineSpec:
    """A model (folder, `tiny` or `full-random`) and the options to run it with; hashable, so it keys the cache."""

    model: str
    options: RuntimeOptions


class PipelineCache:
    """Holds at most one pipeline; see the module docstring."""

    def __init__(self) -> None:
        self._spec: PipelineSpec | None = None
        self._pipeline: RuyiPipeline | None = None

    def get(self, spec: PipelineSpec) -> RuyiPipeline:
        """The pipeline for `spec` (not yet loaded when new: its first `generate` loads it)."""
        if self._pipeline is None or (spec != self._spec and not self._retune(spec)):
            self.clear()
            self._pipeline = RuyiPipeline(Checkpoint.resolve(spec.model, download=False), spec.options)
            self._spec = spec
        return self._pipeline

    def _retune(self, spec: PipelineSpec) -> bool:
        """Switch the cached pipeline to `spec` in place when only `STEP_OPTIONS` differ and TeaCache stays on or off
        (the memory plan counts TeaCache's cache); False when it has to be reloaded instead."""
        old = self._spec
        same_otherwise = replace(old.options, **{name: getattr(spec.options, name) for name in STEP_OPTIONS}) == spec.options
        teacache_kept = (old.options.teacache_threshold is None) == (spec.options.teacache_threshold is None)
        if old.model != spec.model or not same_otherwise or not teacache_kept:
            return False
        if self._pipeline.is_loaded:
            denoiser = self._pipeline.components.denoiser
            if not isinstance(denoiser, BlockRunner):
                return False
            denoiser.teacache, denoiser.enhance_a_video = spec.options.teacache, spec.options.enhance_a_video_settings
        self._pipeline.options, self._spec = spec.options, spec
        return True

    def clear(self) -> None:
        """Unload and drop the cached pipeline, returning its device memory."""
        if self._pipeline is not None:
            self._pipeline.unload()
        self._pipeline, self._spec = None, None
