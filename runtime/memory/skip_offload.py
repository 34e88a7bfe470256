"""Long-skip offload (the reference's GPU_offload_steps = k) through page-locked host buffers on a copy stream.

Blocks 0..L/2-2 produce the long-skip tensors that blocks L/2+1..L-1 take back, last in first out. With a group
size k > 0, the kept tensors go to the host k at a time. One schedule (`skip_schedule`) decides, per block,
what moves; the executor (`SkipOffload`) follows it and the planner counts memory from it, so the two agree:
- after block i keeps its output and the device group is full, the group is copied device -> host on the copy
  stream (after an event-free `wait_stream` on the compute stream) into page-locked buffers from a pool; the
  device tensors stay referenced until block i+1 has been queued, then are released (`record_stream` makes
  the allocator wait for the copy, not the compute stream);
- before block i is queued, the skip that block i+1 takes is copied host -> device if it is on the host, and
  block i+1 waits for that copy's event: both directions overlap with compute.
On the CPU the same schedule runs with plain copies (how it is tested); outputs are bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .host import PinnedBuffer


@dataclass(frozen=True)
class SkipStep:
    """What happens around block i: `prefetch` (host -> device, before the block, for the next block), `pop`
    (the skip this block takes; `pop_from_host`: it was prefetched), `keep` (its output is a skip) and `send`
    (the device group copied to the host after the block)."""

    prefetch: int | None = None
    pop: int | None = None
    pop_from_host: bool = False
    keep: bool = False
    send: tuple[int, ...] = ()


@dataclass(frozen=True)
class SkipResidency:
    """From a schedule: the most skip tensors on the device during one block, the most on the host at once,
    and how many go to the host per pass."""

    device_peak: int
    host_peak: int
    sent: int


def skip_schedule(sources: dict[int, int], group: int, num_blocks: int) -> list[SkipStep]:
    """The per-block moves for skip block -> source block `sources` with device groups of `group` (0: keep all)."""
    kept = set(sources.values())
    on_device: list[int] = []
    on_host: set[int] = set()
    steps: list[SkipStep] = []
    for i in range(num_blocks):
        nxt = sources.get(i + 1)
        prefetch = nxt if nxt is not None and nxt in on_host else None
        pop = sources.get(i)
        from_host = pop is not None and pop not in on_device
        if pop is not None:
            (on_host.discard if from_host else on_device.remove)(pop)
        send: tuple[int, ...] = ()
        if i in kept:
            on_device.append(i)
            if group and len(on_device) >= group:
                send, on_device = tuple(on_device), []
                on_host.update(send)
        steps.append(SkipStep(prefetch, pop, from_host, i in kept, send))
    return steps


def skip_residency(sources: dict[int, int], group: int, num_blocks: int | None = None) -> SkipResidency:
    """Count the schedule: during block i the device holds the kept skips, the group sent after block i-1 (still
    referenced), the prefetch for block i+1 and the skip block i takes."""
    blocks = num_blocks if num_blocks is not None else max([*sources, *sources.values()], default=-1) + 1
    on_device, on_host, in_flight, prefetched = 0, 0, 0, set()
    device_peak = host_peak = sent = 0
    for step in skip_schedule(sources, group, blocks):
        if step.prefetch is not None:
            prefetched.add(step.prefetch)
            on_host -= 1  # its host buffer goes back to the pool once the copy is queued
        if step.pop is not None and step.pop_from_host:
            if step.pop in prefetched:
                prefetched.discard(step.pop)
            else:
                on_host -= 1
        elif step.pop is not None:
            on_device -= 1
        popped = 1 if step.pop is not None else 0
        device_peak = max(device_peak, on_device + in_flight + len(prefetched) + popped)
        in_flight = 0
        if step.keep:
            on_device += 1
            device_peak = max(device_peak, on_device + len(prefetched))
        if step.send:
            on_device -= len(step.send)
            in_flight = len(step.send)
            on_host += len(step.send)
            sent += len(step.send)
            host_peak = max(host_peak, on_host)
    return SkipResidency(device_peak, host_peak, sent)


class SkipOffload:
    """Executes `skip_schedule` for one BlockRunner; host buffers are pooled by shape across passes and steps."""

    def __init__(self, device: torch.device, group: int, sources: dict[int, int], num_blocks: int):
        self.device, self.group = torch.device(device), group
        self.cuda = self.device.type == "cuda"
        self.schedule = skip_schedule(sources, group, num_blocks)
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and group else None
        self._pool: dict[tuple, list[Tensor]] = {}
        self._owners: list[PinnedBuffer] = []
        self.sent = 0  # tensors copied to the host so far

    @property
    def host_bytes(self) -> int:
        """Bytes of the pooled host buffers."""
        return sum(t.numel() * t.element_size() for free in self._pool.values() for t in free)

    def _take(self, like: Tensor) -> Tensor:
        key = (tuple(like.shape), like.dtype)
        free = self._pool.setdefault(key, [])
        if free:
            return free.pop()
        nbytes = like.numel() * like.element_size()
        if self.cuda:
            self._owners.append(PinnedBuffer(nbytes))
            flat = self._owners[-1].tensor
        else:
            flat = torch.empty(nbytes, dtype=torch.uint8)
        return flat.view(like.dtype).view(like.shape)

    def _give(self, host: Tensor) -> None:
        self._pool.setdefault((tuple(host.shape), host.dtype), []).append(host)

    def start_pass(self) -> _SkipPass:
        return _SkipPass(self)

    def close(self) -> None:
        self._pool.clear()
        for owner in self._owners:
            owner.close()
        self._owners.clear()


class _SkipPass:
    """The state of one pass over the blocks (one CFG half under the split, else the whole batch)."""

    def __init__(self, offload: SkipOffload):
        self.o = offload
        self.on_device: dict[int, Tensor] = {}
        self.on_host: dict[int, Tensor] = {}
        self.incoming: dict[int, tuple[Tensor, torch.cuda.Event | None]] = {}
        self.in_flight: list[Tensor] = []

    def before(self, i: int) -> Tensor | None:
        """Start the prefetch for block i+1 and return the skip block i takes (None: not a skip block)."""
        step = self.o.schedule[i]
        if step.prefetch is not None:
            self._fetch(step.prefetch)
        if step.pop is None:
            return None
        if not step.pop_from_host:
            return self.on_device.pop(step.pop)
        if step.pop not in self.incoming:  # the first block of a pass has no earlier block to prefetch in
            self._fetch(step.pop)
        tensor, ready = self.incoming.pop(step.pop)
        if ready is not None:
            torch.cuda.current_stream(self.o.device).wait_event(ready)
        return tensor

    def after(self, i: int, output: Tensor) -> None:
        """Release the group sent after the previous block, keep block i's output, send a full group."""
        step = self.o.schedule[i]
        self.in_flight = []
        if step.keep:
            self.on_device[i] = output
        if step.send:
            self._send(step.send)

    def _send(self, indices: tuple[int, ...]) -> None:
        o = self.o
        tensors = [self.on_device.pop(k) for k in indices]
        if o.cuda:
            o.copy_stream.wait_stream(torch.cuda.current_stream(o.device))
            with torch.cuda.stream(o.copy_stream):
                for k, tensor in zip(indices, tensors, strict=True):
                    self.on_host[k] = o._take(tensor).copy_(tensor, non_blocking=True)
                    tensor.record_stream(o.copy_stream)
        else:
            for k, tensor in zip(indices, tensors, strict=True):
                self.on_host[k] = o._take(tensor).copy_(tensor)
        self.in_flight = tensors
        o.sent += len(tensors)

    def _fetch(self, k: int) -> None:
        o = self.o
        host = self.on_host.pop(k)
        device = torch.empty(host.shape, dtype=host.dtype, device=o.device)
        if o.cuda:
            o.copy_stream.wait_stream(torch.cuda.current_stream(o.device))  # `device` may reuse freed memory
            with torch.cuda.stream(o.copy_stream):
                device.copy_(host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(o.copy_stream)
        else:
            device.copy_(host)
            ready = None
        o._give(host)  # reused only by later copies on the same copy stream, so after this one
        self.incoming[k] = (device, ready)
