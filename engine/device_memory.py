"""Device memory of TensorRT engines: budget arithmetic (pure functions) and the shared scratch buffer.

- `EngineFigures`: what an engine itself says it needs: its weights (plan size, an upper bound), the
  streamable part of them (WEIGHT_STREAMING engines), and its context (activation) memory.
- `weight_streaming_budget`: the streamable weights to keep on the device, from those figures and the
  memory really free when the engine is activated (after the other resident engines and tensors), less
  what the rest of the stage still allocates outside the engine.
- `ScratchMemory`: one device buffer, allocated by torch's caching allocator, that every execution
  context of an `EngineSet` uses as its user-managed memory (ExecutionContextAllocationStrategy
  USER_MANAGED), sized for the shapes in use rather than the profile's max. The engines of a pipeline run
  one at a time on one stream, so they never need it at the same time. It only grows; a CUDA graph
  captured on an older buffer is recaptured (`generation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STREAMING_RESERVE_BYTES = 256 * 2**20  # left free beside a streaming engine (cuBLAS/cuDNN handles, fragmentation)


@dataclass(frozen=True)
class EngineFigures:
    """One engine's device-memory figures, in bytes."""

    weight_bytes: int  # every weight of the engine (the plan's size bounds it from above)
    streamable_bytes: int  # the part WEIGHT_STREAMING may leave in host memory (0 without the flag)
    context_bytes: int  # activation memory of one context at the shapes in use (or the profile's max)

    @property
    def resident_weight_bytes(self) -> int:
        """Weights that are on the device whatever the budget."""
        return max(0, self.weight_bytes - self.streamable_bytes)


def weight_streaming_budget(free_bytes: int, figures: EngineFigures, keep_free_bytes: int = 0,
                            reserve_bytes: int = STREAMING_RESERVE_BYTES) -> int:  # fmt: skip
    """Streamable weights to keep on the device: the free memory less the engine's non-streamable weights, its
    context memory, what the stage still allocates outside the engine and a reserve; within [0, streamable]."""
    room = free_bytes - keep_free_bytes - reserve_bytes - figures.resident_weight_bytes - figures.context_bytes
    return max(0, min(figures.streamable_bytes, room))


def engine_device_bytes(figures: EngineFigures, budget: int | None) -> int:
    """Device bytes an activated engine holds outside the shared scratch: its resident weights and the
    streamed weights it keeps (all of them without a budget)."""
    streamed = figures.streamable_bytes if budget is None else min(budget, figures.streamable_bytes)
    return figures.resident_weight_bytes + streamed


def free_device_bytes(device: torch.device | int | None = None) -> int:
    """Memory a new allocation can get: what the driver reports free plus what torch caches unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class ScratchMemory:
    """A growing device buffer shared by the execution contexts of engines that run one at a time."""

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        self.buffer: torch.Tensor | None = None
        self.generation = 0  # bumped whenever the buffer moves

    @property
    def size(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel()

    def address(self, size: int) -> int:
        """The buffer's device address, grown (256-byte aligned sizes) to at least `size` bytes."""
        if size > self.size:
            self.buffer = None  # free the old buffer before asking for the bigger one
            self.buffer = torch.empty(-(-size // 256) * 256, dtype=torch.uint8, device=self.device)
            self.generation += 1
        return self.buffer.data_ptr() if self.buffer is not None else 0

    def release(self) -> None:
        self.buffer = None
        self.generation += 1
