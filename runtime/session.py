"""A loaded pipeline kept between runs, for hosts that run many requests in one process (ComfyUI, a server).

`PipelineSpec` says what to load (a model name and the runtime options); `PipelineCache.get` returns the
`RuyiPipeline` for a spec, creating it on first use and keeping it until another spec is asked for. The pipeline
itself loads its weights and reloads when a video needs another memory plan (`RuyiPipeline.load`). One pipeline
at a time: a new one is made only after the old one is unloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.checkpoint import Checkpoint
from .loading import RuntimeOptions
from .pipeline import RuyiPipeline


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
        if self._pipeline is None or spec != self._spec:
            self.clear()
            self._pipeline = RuyiPipeline(Checkpoint.resolve(spec.model, download=False), spec.options)
            self._spec = spec
        return self._pipeline

    def clear(self) -> None:
        """Unload and drop the cached pipeline, returning its device memory."""
        if self._pipeline is not None:
            self._pipeline.unload()
        self._pipeline, self._spec = None, None
