"""The loaded pipeline as ComfyUI's model management sees a model, so that ComfyUI can unload it.

`comfy.model_management` keeps the models it may unload in `current_loaded_models` and drives them through the
part of `ModelPatcher` that `LoadedModel` and `free_memory` call. `ManagedPipeline` is that part over a
`RuyiPipeline`: before each sample the sampler hands it to `load_models_gpu` (which frees the memory other models
hold when ours needs it, and lists ours); when ComfyUI frees memory ("Unload Models", the /free endpoint, or
another model needing room), `detach` unloads the pipeline, which loads again on the next sample. Loading itself
stays in the pipeline (it follows its memory plan, and its progress shows on the sampler's bar), so
`partially_load` moves nothing and a partial unload frees nothing: ComfyUI then unloads the whole pipeline.
"""

from __future__ import annotations

import logging

import torch

from ..runtime.loading import DTYPES
from ..runtime.memory.model import ClipSpec, clip_weight_bytes, transformer_weights, vae_weight_bytes
from ..runtime.pipeline import RuyiPipeline

log = logging.getLogger(__name__)


def weight_bytes(pipeline: RuyiPipeline) -> int:
    """Bytes of the pipeline's weights in its run dtype (fp8 storage included): what it asks ComfyUI to make room for."""
    checkpoint, options = pipeline.checkpoint, pipeline.options
    size = DTYPES[options.dtype].itemsize
    transformer = transformer_weights(checkpoint.transformer, size, options.fp8).total
    return transformer + vae_weight_bytes(checkpoint.vae, size) + clip_weight_bytes(ClipSpec.from_config(checkpoint.image_encoder), size)


class ManagedPipeline:
    """The `ModelPatcher` interface of comfy.model_management over one `RuyiPipeline` (see the module docstring)."""

    def __init__(self, pipeline: RuyiPipeline):
        self.model = pipeline  # LoadedModel keeps a weak reference to this (its "real model")
        self.load_device = torch.device(pipeline.options.device)
        self.offload_device = torch.device("cpu")
        self.parent = None
        self.size = weight_bytes(pipeline)

    def model_size(self) -> int:
        return self.size

    def loaded_size(self) -> int:
        return self.size if self.model.is_loaded else 0

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.model.is_loaded else self.offload_device

    def model_dtype(self) -> torch.dtype:
        return DTYPES[self.model.options.dtype]

    def model_patches_to(self, device_or_dtype: object) -> None:
        """No patches to move."""

    def model_patches_models(self) -> list:
        return []

    def lowvram_patch_counter(self) -> int:
        return 0

    def partially_load(self, device: torch.device, extra_memory: float = 0, force_patch_weights: bool = False) -> int:
        """Nothing moves here: the pipeline loads itself when it samples."""
        return 0

    def partially_unload(self, device: torch.device, memory_to_free: float = 0) -> int:
        """The pipeline unloads whole or not at all: 0 freed, so ComfyUI detaches (unloads) it."""
        return 0

    def detach(self, unpatch_all: bool = True) -> None:
        """ComfyUI freeing memory (`unpatch_all`) unloads the pipeline; re-listing it (load_models_gpu detaches the
        entry it replaces without unpatching, as for a ModelPatcher) keeps it loaded."""
        if not unpatch_all:
            return
        if self.model.is_loaded:
            log.info("Ruyi-TRT: ComfyUI freed memory, the pipeline is unloaded (it loads again on the next sample)")
        self.model.unload()

    def is_clone(self, other: object) -> bool:
        """Only itself: load_models_gpu then replaces its own entry instead of listing it twice."""
        return other is self


_managed: list[ManagedPipeline] = []  # the one for the cached pipeline; keeps it alive while ComfyUI lists it


def claim_memory(pipeline: RuyiPipeline) -> None:
    """Inside ComfyUI: list the pipeline with its model management (freeing other models' memory if it needs room)
    before it samples. Outside ComfyUI nothing happens."""
    from .host import comfy_module

    model_management = comfy_module("comfy.model_management")
    if model_management is None:
        return
    if not _managed or _managed[0].model is not pipeline:
        _managed[:] = [ManagedPipeline(pipeline)]
    model_management.load_models_gpu([_managed[0]])
