"""Block streaming for the torch backend: run a list of transformer blocks with only some of them resident.

The first `resident_blocks` blocks live on the device. Every other block lives on the host in ONE flat
buffer (page-locked with `runtime.memory.host.PinnedBuffer` when the device is CUDA: no per-tensor pinning,
no power-of-two rounding), its parameters and buffers being views into it (`FlatLayout`). Blocks are copied,
one block ahead, into preallocated device slots: two slots per block signature (plain blocks and long-skip
blocks have different parameter sets), each a device copy of a block module whose tensors are views into one
flat device buffer, so a load is a single `copy_(non_blocking=True)` on a side CUDA stream. Events order the
copy after the slot's previous compute and the compute after the copy, so block i+1 loads while block i
runs, with no allocation per step. On the CPU the same executor runs with plain copies, which is how it is
tested. Streaming changes no numbers: the slot runs the same module code on the same weights.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .host import FLAT_ALIGN, PinnedBuffer

log = logging.getLogger(__name__)


def signature(module: nn.Module) -> tuple:
    """Names, shapes and dtypes of a module's tensors: blocks with equal signatures can share a slot."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return tuple((name, tuple(t.shape), t.dtype) for name, t in named)


@dataclass(frozen=True)
class _Entry:
    owner: str  # dotted name of the submodule
    name: str  # attribute in its _parameters or _buffers
    is_param: bool
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class FlatLayout:
    """Where each parameter and buffer of a module structure sits in one flat uint8 buffer."""

    def __init__(self, module: nn.Module):
        entries, offset = [], 0
        for is_param, named in ((True, module.named_parameters()), (False, module.named_buffers())):
            for full, tensor in named:
                owner, _, name = full.rpartition(".")
                nbytes = tensor.numel() * tensor.element_size()
                entries.append(_Entry(owner, name, is_param, offset, tuple(tensor.shape), tensor.dtype, nbytes))
                offset += -(-nbytes // FLAT_ALIGN) * FLAT_ALIGN
        self.entries, self.nbytes = entries, offset

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in self.entries]

    def pack(self, module: nn.Module, flat: Tensor) -> None:
        """Copy `module`'s tensors into `flat`, then make them views of it (their old memory is released)."""
        for entry, view in zip(self.entries, self.views(flat), strict=True):
            view.copy_(self._get(module, entry))
        self.bind(module, flat)

    def bind(self, module: nn.Module, flat: Tensor) -> None:
        """Point `module`'s tensors at `flat` (contents as they are)."""
        for entry, view in zip(self.entries, self.views(flat), strict=True):
            owner = module.get_submodule(entry.owner)
            if entry.is_param:  # a new Parameter rather than `.data =`, which cannot change a fake tensor's device
                owner._parameters[entry.name] = nn.Parameter(view, requires_grad=False)
            else:
                owner._buffers[entry.name] = view

    @staticmethod
    def _get(module: nn.Module, entry: _Entry) -> Tensor:
        owner = module.get_submodule(entry.owner)
        return (owner._parameters if entry.is_param else owner._buffers)[entry.name].detach()


@dataclass
class _Slot:
    """A device copy of one block structure over one flat buffer; `holds` is the block whose weights it has."""

    module: nn.Module
    layout: FlatLayout
    flat: Tensor
    holds: int | None = None
    ready: torch.cuda.Event | None = None  # recorded on the copy stream after the last load
    free: torch.cuda.Event | None = None  # recorded on the compute stream after the last use

    def place(self, where: torch.device) -> None:
        """Give the slot a flat buffer on `where` (meta frees it: a slot's contents are reloaded before use)."""
        self.flat = torch.empty(self.layout.nbytes, dtype=torch.uint8, device=where)
        self.layout.bind(self.module, self.flat)
        self.holds = None


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
        self.slot_of: dict[int, _Slot] = {}
        self.slots: list[_Slot] = []
        by_signature: dict[tuple, list[int]] = {}
        for i in self.streamed:
            self.blocks[i].to(self.host)
            by_signature.setdefault(signature(self.blocks[i]), []).append(i)
        self.host_flat: dict[int, Tensor] = {}
        self._pinned: list[PinnedBuffer] = []  # owners of the page-locked host buffers (CUDA devices only)
        for members in by_signature.values():
            layout = FlatLayout(self.blocks[members[0]])
            group = [self._new_slot(self.blocks[members[0]], layout) for _ in range(min(2, len(members)))]
            self.slots += group
            for n, i in enumerate(members):  # alternate, so consecutive blocks of one type use different slots
                self.slot_of[i] = group[n % len(group)]
                self.host_flat[i] = self._host_buffer(layout.nbytes)
                layout.pack(self.blocks[i], self.host_flat[i])
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._place(self.device)
        log.info("block streaming: %d resident, %d streamed (%.2f GiB of %s host buffers) through %d device slots",
                 len(self.resident), len(self.streamed), self.host_bytes / 2**30,
                 "page-locked" if self._pinned else "pageable", len(self.slots))  # fmt: skip

    def _host_buffer(self, nbytes: int) -> Tensor:
        """A block's flat host buffer: page-locked for a CUDA device (asynchronous copies), else plain memory."""
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.host)
        self._pinned.append(PinnedBuffer(nbytes))
        return self._pinned[-1].tensor

    @property
    def host_bytes(self) -> int:
        """Bytes of the streamed blocks' host buffers."""
        return sum(flat.numel() for flat in self.host_flat.values())

    def _new_slot(self, template: nn.Module, layout: FlatLayout) -> _Slot:
        module = copy.deepcopy(template)
        events = (torch.cuda.Event(), torch.cuda.Event()) if self.cuda else (None, None)
        flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        layout.pack(module, flat)
        return _Slot(module, layout, flat, None, *events)

    @property
    def device_weight_sets(self) -> int:
        """Block weight sets that occupy the device: resident blocks plus slots (the planned maximum)."""
        return len(self.resident) + len(self.slots) if self.on_device else 0

    # Placement between runs -----------------------------------------------------------------------------
    def _place(self, where: torch.device) -> None:
        for i in self.resident:
            self.blocks[i].to(where)
        if where != self.device or any(slot.flat.device != where for slot in self.slots):
            for slot in self.slots:  # off the device, a slot needs no memory at all
                slot.place(where if where == self.device else torch.device("meta"))
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
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot.free)  # the slot's previous block has finished computing
                slot.flat.copy_(self.host_flat[index], non_blocking=True)
                # allocated on the compute stream, written on this one: a free (to_host, or an error that
                # leaves a prefetched load unacquired) must not hand the memory out before the copy ends
                slot.flat.record_stream(self.copy_stream)
                slot.ready.record(self.copy_stream)
        else:
            slot.flat.copy_(self.host_flat[index])
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
