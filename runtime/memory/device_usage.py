"""Device memory as the driver sees it, beside torch's allocator peak.

`torch.cuda.max_memory_allocated` (reported beside it) only counts torch's own tensors: TensorRT engines (weights, context
memory), ONNX Runtime's CUDA arena, cuBLAS/cuDNN workspaces and torch's cache do not appear in it, so a
TensorRT or ONNX Runtime run would report almost nothing. `DevicePeak` samples the driver's view
(`torch.cuda.mem_get_info`, cudaMemGetInfo: memory in use on the whole device) on a background thread
while a block runs, and gives the peak in use and the peak above the use at the start (what the block
added; other processes on the same GPU count too, so run measurements on an otherwise idle GPU).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

SAMPLE_INTERVAL_S = 0.005  # cudaMemGetInfo takes microseconds; a 5 ms period catches every layer-sized peak


@dataclass
class DeviceMemory:
    """One block's device memory, in bytes."""

    driver_peak_bytes: int  # most memory in use on the device (driver) while the block ran
    driver_added_bytes: int  # that peak minus the use when the block started


class DevicePeak:
    """`start()`, the block, `stop()`, then `result`; a no-op (result None) off CUDA. See also `device_peak`."""

    def __init__(self, device: torch.device | str | None = None, interval_s: float = SAMPLE_INTERVAL_S):
        self.device = torch.device(device) if device is not None else torch.device("cuda")
        self.interval_s = interval_s
        self.result: DeviceMemory | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = self._start = 0

    @property
    def active(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        torch.cuda.set_device(self.device)
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self._used())

    def start(self) -> None:
        if self.active:
            torch.cuda.synchronize(self.device)
            self._start = self._peak = self._used()
            self._thread = threading.Thread(target=self._sample, name="device-peak", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        torch.cuda.synchronize(self.device)
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._peak = max(self._peak, self._used())
        self.result = DeviceMemory(self._peak, self._peak - self._start)


@contextlib.contextmanager
def device_peak(device: torch.device | str | None = None) -> Iterator[DevicePeak]:
    """`with device_peak(device) as peak: ...`, then `peak.result` (None off CUDA)."""
    peak = DevicePeak(device)
    peak.start()
    try:
        yield peak
    finally:
        peak.stop()
