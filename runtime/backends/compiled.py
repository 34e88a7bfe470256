"""`--backend torch-compile`: the torch denoiser with every transformer block's forward torch.compile'd.

Regional compilation: the blocks share one code object, so dynamo compiles it once per block type (plain,
long-skip) and every block of that type runs the same compiled graph with its own parameters (torch >= 2.5
treats module parameters as graph inputs). Token dims are marked dynamic before the first call (the tokens of
x / skip and the rows of the RoPE tables), so a new resolution or frame count does not recompile; the frame
count (a Python int) and the batch become dynamic after their first change (dynamo's automatic dynamic
shapes), so each recompiles at most once. Whoever holds the blocks (the BlockRunner, a block streamer)
runs the compiled code; `close` puts the plain forwards back.
"""

from __future__ import annotations

import torch

from .protocol import Denoiser


def blocks_model(denoiser: Denoiser) -> torch.nn.Module:
    """The torch model a denoiser runs: a RuyiTransformer3D, or anything else with `.blocks` (the bench's block)."""
    model = getattr(denoiser, "model", None)
    if not isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
        raise TypeError(f"{type(denoiser).__name__} holds no torch transformer blocks to change")
    return model


def with_dynamic_tokens(compiled):
    """Calls `compiled(x, temb, text, clip, cos, sin, frames, skip, ...)` with the token dims marked dynamic."""

    def forward(x, temb, text_states, clip_states, rope_cos, rope_sin, num_frames, skip=None, *rest):
        for tensor, dim in ((x, 1), (rope_cos, 0), (rope_sin, 0), (skip, 1)):
            if tensor is not None and tensor.shape[dim] > 1:
                torch._dynamo.mark_dynamic(tensor, dim)
        return compiled(x, temb, text_states, clip_states, rope_cos, rope_sin, num_frames, skip, *rest)

    return forward


class CompiledBlocks:
    """Compiles each transformer block's forward in place (mode None: inductor's default)."""

    def __init__(self, base: Denoiser, mode: str | None = None):
        self.base = base
        self.model = getattr(base, "model", None)
        self.blocks = list(blocks_model(base).blocks)
        for block in self.blocks:
            block.forward = with_dynamic_tokens(torch.compile(block.forward, mode=mode))

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.base(**inputs)

    def start(self, num_calls: int, num_steps: int | None = None) -> None:
        self.base.start(num_calls, num_steps)

    def close(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)  # the instance attribute; the class's forward shows again
        self.base.close()
