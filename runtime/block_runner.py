"""The torch denoiser that runs the transformer block by block: memory modes and TeaCache live here.

- skip offload (the reference's GPU_offload_steps = k): the long-skip activations, the largest activation
  cost, go to the host in groups of k as they are produced and come back when a later block pops them.
- block streaming (low_gpu): block weights stay on the host and each block visits the device only while it
  runs (the reference's sequential offload, at block granularity).
- TeaCache: when the timestep-modulated input of block 0 has changed little since the last computed step,
  skip every block and reuse the cached residual (reference `TeaCacheParameters`).
None of these change the numbers, except TeaCache, which trades accuracy for skipped steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..models.transformer import BlockInputs, RuyiTransformer3D

log = logging.getLogger(__name__)

# Polynomial (highest degree first) mapping the raw relative L1 change to the reference's rescaled distance.
TEACACHE_COEFFICIENTS = (-7.51185620e03, 2.32931511e03, -2.25610663e02, 9.39902237e00, -7.43067848e-02)


@dataclass(frozen=True)
class TeaCacheSettings:
    """threshold: larger skips more steps (0.10 skips about 6-8 of 25). The first `skip_start_steps` and last
    `skip_end_steps` calls are always computed (each at least 1)."""

    threshold: float = 0.10
    skip_start_steps: int = 3
    skip_end_steps: int = 1


class _TeaCacheState:
    """Per-run state of TeaCache, following the reference's update rules step by step."""

    def __init__(self, settings: TeaCacheSettings, num_calls: int):
        self.settings, self.num_calls = settings, num_calls
        self.start = max(1, settings.skip_start_steps)
        self.end = max(1, settings.skip_end_steps)
        self.count = 0
        self.skipped = 0
        self.accumulated = 0.0
        self.previous_modulated: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.rescale = np.poly1d(TEACACHE_COEFFICIENTS)

    def decide(self, modulated: torch.Tensor) -> bool:
        """Record this call's modulated input; True when the blocks must be computed."""
        compute = True
        if self.count == self.start - 1:
            self.accumulated = 0.0
            self.previous_modulated = modulated
        elif self.start - 1 < self.count < self.num_calls - self.end and self.previous_modulated is not None:
            prev = self.previous_modulated
            change = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            self.accumulated += float(self.rescale(change))
            if self.accumulated < self.settings.threshold and self.residual is not None:
                compute = False
            else:
                self.accumulated = 0.0
                self.previous_modulated = modulated
        self.count += 1
        if not compute:
            self.skipped += 1
        return compute


class BlockRunner:
    """A denoiser `Backend` over a RuyiTransformer3D; with default settings it equals `model(**inputs)[0]`."""

    def __init__(
        self,
        model: RuyiTransformer3D,
        device: torch.device | str,
        dtype: torch.dtype,
        stream_blocks: bool = False,
        skip_offload_group: int = 0,
        teacache: TeaCacheSettings | None = None,
    ):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.stream_blocks, self.skip_offload_group, self.teacache = stream_blocks, skip_offload_group, teacache
        self.host = torch.device("cpu")
        self._state: _TeaCacheState | None = None
        self._place_weights()

    def _place_weights(self) -> None:
        if self.stream_blocks:
            for name, child in self.model.named_children():
                child.to(self.host if name == "blocks" else self.device)
        else:
            self.model.to(self.device)

    def start(self, num_calls: int) -> None:
        """Called before a run with the number of denoiser calls to come (resets TeaCache)."""
        self._state = _TeaCacheState(self.teacache, num_calls) if self.teacache else None

    @property
    def skipped_calls(self) -> int:
        """How many calls TeaCache answered from its cache in the current run."""
        return self._state.skipped if self._state else 0

    def _prepare(self, value):
        if isinstance(value, tuple):
            return tuple(v.to(self.device) for v in value)
        if isinstance(value, torch.Tensor):
            value = value.to(self.device)
            return value.to(self.dtype) if value.is_floating_point() else value
        return value

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = {name: self._prepare(value) for name, value in inputs.items()}
        inputs.pop("return_dict", None)
        model = self.model
        embedded = model.embed(**inputs)
        x_in = embedded.hidden
        compute = True
        if self._state is not None:
            compute = self._state.decide(self._modulated_input(embedded))
        if compute:
            x = model.norm_out(self._run_blocks(embedded), embedded.temb)
            if self._state is not None:
                self._state.residual = x - x_in
        else:
            x = x_in + self._state.residual
        return model.unpatchify(model.proj_out(x), embedded.num_frames, embedded.grid_height, embedded.grid_width)

    def _modulated_input(self, embedded: BlockInputs) -> torch.Tensor:
        """Block 0's norm1 output for this call (temporal PE included), the TeaCache change signal."""
        block = self.model.blocks[0]
        if self.stream_blocks:
            block.to(self.device)
        x = embedded.hidden
        if embedded.num_frames != 1 and block.t_embed is not None:
            x = block.t_embed(x, embedded.num_frames)
        modulated = block.norm1(x, embedded.temb)
        if self.stream_blocks:
            block.to(self.host)
        return modulated

    def _run_blocks(self, embedded: BlockInputs) -> torch.Tensor:
        sources = self.model.config.skip_sources
        kept = set(sources.values())
        group = self.skip_offload_group
        on_device: dict[int, torch.Tensor] = {}
        on_host: dict[int, torch.Tensor] = {}
        x = embedded.hidden
        for i, block in enumerate(self.model.blocks):
            skip = None
            if i in sources:
                j = sources[i]
                skip = on_device.pop(j) if j in on_device else on_host.pop(j).to(self.device, non_blocking=True)
            if self.stream_blocks:
                block.to(self.device)
            x = block(
                x, embedded.temb, embedded.text_states, embedded.clip_states,
                embedded.rope_cos, embedded.rope_sin, embedded.num_frames, skip,
            )  # fmt: skip
            if self.stream_blocks:
                block.to(self.host)
            if i in kept:
                on_device[i] = x
                if group and len(on_device) >= group:
                    on_host.update({k: v.to(self.host) for k, v in on_device.items()})
                    on_device.clear()
        return x

    def close(self) -> None:
        self.model.to(self.host)
