"""The torch denoiser that runs the transformer block by block: memory settings and TeaCache live here.

- skip offload (the reference's GPU_offload_steps = k): the long-skip activations, the largest activation
  cost, go to page-locked host buffers in groups of k on a copy stream and are prefetched one block before a
  later block pops them (`runtime.memory.skip_offload`), overlapped with compute.
- block streaming: the first `resident_blocks` blocks stay on the device, the rest stream from one flat
  page-locked host buffer per block through double-buffered device slots (`runtime.memory.streaming`).
- CFG split: a batch of 2 runs its blocks as two batch-1 passes (about half the activation memory).
- offload between runs (normal mode): the transformer leaves the device after the last call of a run.
- TeaCache: when the timestep-modulated input of block 0 has changed little since the last computed step,
  skip every block and reuse the cached residual (reference `TeaCacheParameters`).
- Enhance-A-Video (optional, off by default): scales every block's self-attention output by a temporal score
  (`models.transformer_blocks.enhance_a_video_score`) on the calls its step rule selects (reference
  `EnhanceAVideoParameters`).
None of these change the numbers, except TeaCache (skipped steps), Enhance-A-Video and the CFG split (batch-1
GEMMs may round differently from batch-2 ones).

Sequence/CFG parallelism (`runtime.parallel.runner`) subclasses the runner through four hooks that are
identities here: `_local` (this rank's part of the embedded inputs), `_gather` (the whole output back),
`_relative_change` (TeaCache's change signal over every rank) and `attend` (the self-attention core).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...models.transformer import BlockInputs, RuyiTransformer3D
from ...models.transformer_blocks import AttentionFn
from ..memory.skip_offload import SkipOffload
from ..memory.streaming import BlockStreamer
from .protocol import move_inputs

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


@dataclass(frozen=True)
class EnhanceAVideoSettings:
    """Enhance-A-Video (reference defaults: weight 1.0, no skipped steps). Call c (0-based, counted over every
    denoiser call of the run, TeaCache-skipped ones included) is enhanced when
    skip_start_steps <= c < num_calls - skip_end_steps. The reference suggests weight < 10 (< 5 for short or
    low-resolution videos).

    The score is one scalar per block over the whole batch (both CFG halves together), so on enhanced calls
    the CFG split is not used: the batch runs whole, as in the reference."""

    weight: float = 1.0
    skip_start_steps: int = 0
    skip_end_steps: int = 0

    def active(self, call: int, num_calls: int | None) -> bool:
        end = None if num_calls is None else num_calls - max(0, self.skip_end_steps)
        return call >= max(0, self.skip_start_steps) and (end is None or call < end)


class _TeaCacheState:
    """Per-run state of TeaCache, following the reference's update rules step by step."""

    def __init__(
        self,
        settings: TeaCacheSettings,
        num_calls: int,
        relative_change: Callable[[torch.Tensor, torch.Tensor], float],
    ):
        self.settings, self.num_calls = settings, num_calls
        self.relative_change = relative_change
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
            change = self.relative_change(modulated, self.previous_modulated)
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
        resident_blocks: int | None = None,
        skip_offload_group: int = 0,
        cfg_split: bool = False,
        offload_between_runs: bool = False,
        teacache: TeaCacheSettings | None = None,
        enhance_a_video: EnhanceAVideoSettings | None = None,
    ):
        if skip_offload_group < 0:
            raise ValueError(f"skip_offload_group: {skip_offload_group} must be >= 0.")
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.skip_offload_group, self.cfg_split, self.teacache = skip_offload_group, cfg_split, teacache
        self.offload_between_runs = offload_between_runs and self.device.type != "cpu"
        self.host = torch.device("cpu")
        self._state: _TeaCacheState | None = None
        self._calls_left: int | None = None
        self.enhance_a_video = enhance_a_video
        self._num_calls: int | None = None
        self._call = 0
        self.attend: AttentionFn | None = None  # None: F.scaled_dot_product_attention (see module docstring)
        self.streamer = BlockStreamer(model.blocks, self.device, resident_blocks)
        self.skips = SkipOffload(self.device, skip_offload_group, model.config.skip_sources, len(model.blocks))
        self._place_rest(self.host if self.offload_between_runs else self.device)
        if self.offload_between_runs:
            self.streamer.to_host()

    def _place_rest(self, where: torch.device) -> None:
        """Everything but the blocks (embeddings, conditioning, norm_out, proj_out)."""
        for name, child in self.model.named_children():
            if name != "blocks":
                child.to(where)
        for name, param in list(self.model.named_parameters(recurse=False)):
            self.model._parameters[name] = torch.nn.Parameter(param.detach().to(where), requires_grad=False)

    def _to_device(self) -> None:
        if not self.streamer.on_device:
            self._place_rest(self.device)
        self.streamer.to_device()

    def _to_host(self) -> None:
        self._place_rest(self.host)
        self.streamer.to_host()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def start(self, num_calls: int) -> None:
        """Called before a run with the number of denoiser calls to come (resets TeaCache)."""
        self._state = _TeaCacheState(self.teacache, num_calls, self._relative_change) if self.teacache else None
        self._calls_left = num_calls
        self._num_calls, self._call = num_calls, 0

    @property
    def skipped_calls(self) -> int:
        """How many calls TeaCache answered from its cache in the current run."""
        return self._state.skipped if self._state else 0

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        self._to_device()
        inputs = move_inputs(inputs, self.device, self.dtype)
        inputs.pop("return_dict", None)
        model = self.model
        embedded = self._local(model.embed(**inputs))
        x_in = embedded.hidden
        enhance = self._enhance_weight()
        compute = True
        if self._state is not None:
            compute = self._state.decide(self._modulated_input(embedded))
        if compute:
            x = model.norm_out(self._run_batch(embedded, enhance), embedded.temb)
            if self._state is not None:
                self._state.residual = x - x_in
        else:
            x = x_in + self._state.residual
        x = self._gather(model.proj_out(x))
        out = model.unpatchify(x, embedded.num_frames, embedded.grid_height, embedded.grid_width)
        if self._calls_left is not None:
            self._calls_left -= 1
            if self._calls_left == 0 and self.offload_between_runs:
                out = out.to(self.host)
                self._to_host()
        return out

    def _local(self, embedded: BlockInputs) -> BlockInputs:
        """The part of the embedded inputs that this process computes: all of it."""
        return embedded

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """The projected output [B, N, p*p*C] of every token from this process's part: it is all of it."""
        return x

    def _relative_change(self, modulated: torch.Tensor, previous: torch.Tensor) -> float:
        """TeaCache's change signal: mean |modulated - previous| / mean |previous|."""
        return ((modulated - previous).abs().mean() / previous.abs().mean()).item()

    def _enhance_weight(self) -> float | None:
        """Enhance-A-Video's weight for this call (None: not enhanced); counts the call."""
        call, self._call = self._call, self._call + 1
        settings = self.enhance_a_video
        if settings is None or not settings.active(call, self._num_calls):
            return None
        return float(settings.weight)

    def _modulated_input(self, embedded: BlockInputs) -> torch.Tensor:
        """Block 0's norm1 output for this call (temporal PE included), the TeaCache change signal."""
        with self.streamer.loaded(0) as block:
            x = embedded.hidden
            if embedded.num_frames != 1 and block.t_embed is not None:
                x = block.t_embed(x, embedded.num_frames, embedded.frame_index)
            return block.norm1(x, embedded.temb)

    def _run_batch(self, embedded: BlockInputs, enhance: float | None = None) -> torch.Tensor:
        """All blocks on the whole batch, or (CFG split) once per sample, concatenated. Enhance-A-Video's score
        spans the whole batch, so an enhanced call always runs the batch whole."""
        batch = embedded.hidden.shape[0]
        if not self.cfg_split or batch == 1 or enhance is not None:
            return self._run_blocks(embedded, enhance)
        outputs = []
        for b in range(batch):
            sample = embedded._replace(
                hidden=embedded.hidden[b : b + 1], temb=embedded.temb[b : b + 1],
                text_states=embedded.text_states[b : b + 1], clip_states=embedded.clip_states[b : b + 1],
            )  # fmt: skip
            outputs.append(self._run_blocks(sample))
        return torch.cat(outputs)

    def _run_blocks(self, embedded: BlockInputs, enhance: float | None = None) -> torch.Tensor:
        skips = self.skips.start_pass()
        x = embedded.hidden
        for i, block in self.streamer:
            skip = skips.before(i)
            x = block(
                x, embedded.temb, embedded.text_states, embedded.clip_states,
                embedded.rope_cos, embedded.rope_sin, embedded.num_frames, skip, enhance, embedded.frame_index,
                self.attend,
            )  # fmt: skip
            del skip  # the block has consumed it: do not keep it alive through the next block
            skips.after(i, x)
        return x

    def close(self) -> None:
        self._to_host()
        self.skips.close()
