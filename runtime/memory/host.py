"""Host memory for streaming: page-locked flat buffers without the caching host allocator's rounding, and RAM size.

`torch.empty(..., pin_memory=True)` goes through torch's CachingHostAllocator, which rounds every request up
to a power of two (a 69 MB FFN weight takes 128 MiB). `PinnedBuffer` instead maps anonymous memory (page
aligned, the size asked rounded up to a page) and registers it with `cudaHostRegister`; it is unregistered
when its owner is dropped or closed. `PINNED` counts the bytes held by live buffers, so checks can compare
what was pinned with what the planner predicted.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref

import torch

log = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
FLAT_ALIGN = 256  # bytes: every tensor of a flat block buffer starts at a multiple of this


class _PinnedBytes:
    """Bytes held by live `PinnedBuffer`s now, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)


PINNED = _PinnedBytes()


def page_rounded(nbytes: int) -> int:
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def _register(address: int, nbytes: int) -> None:
    status = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
    code = int(status[0] if isinstance(status, tuple) else status)
    if code != 0:
        raise RuntimeError(
            f"cudaHostRegister of {nbytes / 2**30:.2f} GiB failed (status {code}): the host cannot page-lock "
            "that much memory; raise `ulimit -l`, free host RAM, or give a larger --vram-budget (fewer streamed blocks)."
        )


def map_anonymous(nbytes: int) -> torch.Tensor:
    """`nbytes` of page-aligned anonymous memory as a uint8 tensor (its storage keeps the mapping alive)."""
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8)


class PinnedBuffer:
    """A flat uint8 host tensor of `nbytes` (`.tensor`), page-locked for asynchronous copies while this owner lives.

    Without a CUDA build (tests, fake-CUDA memory checks) the memory is mapped the same way but not registered.
    Tensor views may outlive the owner: the memory stays valid (their storage holds the mapping), only unpinned."""

    def __init__(self, nbytes: int):
        self.nbytes = page_rounded(max(nbytes, 1))
        self.tensor = self.map_memory(self.nbytes)[:nbytes]
        self.registered = torch.cuda.is_available()
        address = self.tensor.data_ptr() if self.registered else 0
        if self.registered:
            _register(address, self.nbytes)
        PINNED.add(self.nbytes)
        self._finalizer = weakref.finalize(self, _release, address, self.nbytes, self.registered)

    map_memory = staticmethod(map_anonymous)  # tools/memory_check maps fake host memory instead

    def close(self) -> None:
        self._finalizer()


def _release(address: int, nbytes: int, registered: bool) -> None:
    if registered:
        torch.cuda.cudart().cudaHostUnregister(address)
    PINNED.add(-nbytes)


def host_ram_bytes() -> int:
    """Physical memory of this machine (the limit a plan's host memory must fit)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
