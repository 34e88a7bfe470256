"""Block streaming for the torch backend: run a list of transformer blocks with only some of them resident.

The first `resident_blocks` blocks live on the device. The others live on the host (pinned when CUDA is
available) and are copied, one block ahead, into preallocated device slots: two slots per block signature
(plain blocks and long-skip blocks have different parameter sets), each a device copy of a block module
whose tensors are overwritten in place with `copy_(non_blocking=True)` on a side CUDA stream. Events order
the copy after the slot's previous compute and the compute after the copy, so block i+1 loads while block
i runs, with no allocation per step. On the CPU the same executor runs with plain copies, which is how it
is tested. Streaming changes no numbers: the slot runs the same module code on the same weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def state_tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of `module`, in a fixed order (the same for two modules of one structure)."""
    return [p for _, p in module.named_parameters()] + [b for _, b in module.named_buffers()]


def signature(module: nn.Module) -> tuple:
    """Names, shapes and dtypes of a module's tensors: blocks with equal signatures can share a slot."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return tuple((name, tuple(t.shape), t.dtype) for name, t in named)


def pin_module_(module: nn.Module) -> nn.Module:
    """Move `module`'s tensors into page-locked host memory (for asynchronous host-to-device copies)."""
    for param in module.parameters():
        param.data = param.data.pin_memory()
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None:
                sub._buffers[name] = buf.pin_memory()
    return module


@dataclass
class _Slot:
    """A device copy of one block structure; `holds` is the index of the block whose weights it has."""

    module: nn.Module
    holds: int | None = None
    ready: torch.cuda.Event | None = None  # recorded on the copy stream after the last load
    free: torch.cuda.Event | None = None  # recorded on the compute stream after the last use


class BlockStreamer:
    """Yields the blocks of a ModuleList in order, each ready on `device`; see the module docstring."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device | str, resident_blocks: int | None = None):
        count = len(blocks)
        resident = count if resident_blocks is None else resident_blocks
        if not 0 <= resident <= count:
            raise ValueError(f"resident_blocks: {resident_blocks} must be within 0..{count}.")
        self.blocks, self.device = list(blocks), torch.device(device)
        self.host = torch.device("cpu")
        self.resident = list(range(resident))
        self.streamed = list(range(resident, count))
        self.cuda = self.device.type == "cuda"
        self.loads = 0  # block weight sets copied into slots so far
        self.on_device = True
        pin = self.cuda and torch.cuda.is_available()  # page-locked memory only helps copies to a CUDA device
        for i in self.streamed:
            self.blocks[i].to(self.host)
            if pin:
                pin_module_(self.blocks[i])
        self.slot_of: dict[int, _Slot] = {}
        self.slots: list[_Slot] = []
        by_signature: dict[tuple, list[int]] = {}
        for i in self.streamed:
            by_signature.setdefault(signature(self.blocks[i]), []).append(i)
        for members in by_signature.values():
            group = [self._new_slot(self.blocks[members[0]]) for _ in range(min(2, len(members)))]
            self.slots += group
            for n, i in enumerate(members):  # alternate, so consecutive blocks of one type use different slots
                self.slot_of[i] = group[n % len(group)]
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._place(self.device)
        log.info("block streaming: %d resident, %d streamed through %d device slots",
                 len(self.resident), len(self.streamed), len(self.slots))

    def _new_slot(self, template: nn.Module) -> _Slot:
        module = copy.deepcopy(template).to(self.device)
        events = (torch.cuda.Event(), torch.cuda.Event()) if self.cuda else (None, None)
        return _Slot(module, None, *events)

    @property
    def device_weight_sets(self) -> int:
        """Block weight sets that occupy the device: resident blocks plus slots (the planned maximum)."""
        return len(self.resident) + len(self.slots) if self.on_device else 0

    # Placement between runs -----------------------------------------------------------------------------
    def _place(self, where: torch.device) -> None:
        for i in self.resident:
            self.blocks[i].to(where)
        for slot in self.slots:
            slot.module.to(where)
            slot.holds = None
        self.on_device = where == self.device

    def to_device(self) -> None:
        if not self.on_device:
            self._place(self.device)

    def to_host(self) -> None:
        """Free the device: resident blocks and slots go to the host (normal mode, between runs)."""
        if self.on_device and self.device != self.host:
            self._place(self.host)

    # Loading ------------------------------------------------------------------------------------------
    def _load(self, index: int) -> None:
        slot = self.slot_of[index]
        if slot.holds == index:
            return
        sources, targets = state_tensors(self.blocks[index]), state_tensors(slot.module)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)  # the slot's previous block has finished computing
                for target, source in zip(targets, sources, strict=True):
                    target.copy_(source, non_blocking=True)
                    # allocated on the compute stream, written on this one: a free (to_host, or an error that
                    # leaves a prefetched load unacquired) must not hand the memory out before the copy ends
                    target.record_stream(self.copy_stream)
                slot.ready.record(self.copy_stream)
        else:
            for target, source in zip(targets, sources, strict=True):
                target.copy_(source)
        slot.holds = index
        self.loads += 1

    def _acquire(self, index: int) -> nn.Module:
        slot = self.slot_of[index]
        if slot.holds != index:
            raise RuntimeError(f"block {index} was not loaded into its slot (it holds {slot.holds})")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        return slot.module

    def _release(self, index: int) -> None:
        if self.cuda:
            self.slot_of[index].free.record(torch.cuda.current_stream(self.device))

    # Use ----------------------------------------------------------------------------------------------
    @contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Block `index` on the device for a one-off use (e.g. TeaCache's look at block 0)."""
        self.to_device()
        if index not in self.slot_of:
            yield self.blocks[index]
            return
        self._load(index)
        try:
            yield self._acquire(index)
        finally:
            self._release(index)

    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        """(index, module) for every block in order; streamed block j+1 loads while block j computes."""
        self.to_device()
        upcoming = iter(self.streamed)
        pending = next(upcoming, None)
        if pending is not None:
            self._load(pending)
        for i, block in enumerate(self.blocks):
            if i not in self.slot_of:
                yield i, block
                continue
            module = self._acquire(i)
            pending = next(upcoming, None)
            if pending is not None:
                self._load(pending)  # into the other slot, while this block computes
            try:
                yield i, module
            finally:
                self._release(i)
