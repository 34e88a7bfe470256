"""What one run reports: seconds per stage, the precision each model ran in, peak device and host memory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .memory.device_usage import DevicePeak

REFERENCE_PRECISION = "bf16"  # the original runs every model in bf16 (under autocast)


@dataclass
class RunStats:
    """Seconds per stage, the precision of each model (image_encoder, vae, transformer) and peak device memory
    of one run."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    driver_peak_bytes: int | None = None  # device memory in use as the driver reports it (TensorRT, ORT included)
    height: int = 0
    width: int = 0
    frames: int = 0
    precision: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        stages = ", ".join(f"{name} {value:.2f}s" for name, value in self.seconds.items())
        memory = f", peak GPU memory {self.peak_memory_bytes / 2**30:.2f} GiB" if self.peak_memory_bytes else ""
        if self.driver_peak_bytes:
            memory += f" (torch allocator), {self.driver_peak_bytes / 2**30:.2f} GiB in use on the device (driver)"
        host = _peak_host_gib()
        host_text = f", peak host RSS {host:.2f} GiB" if host is not None else ""
        precision = ""
        if self.precision:
            precision = "; precision " + ", ".join(f"{name} {value}" for name, value in self.precision.items())
            if any(not value.startswith(REFERENCE_PRECISION) for value in self.precision.values()):
                precision += f" (the original runs {REFERENCE_PRECISION})"
        return f"{self.frames} frames {self.height}x{self.width}: {stages}{memory}{host_text}{precision}"


def _peak_host_gib() -> float | None:
    """Peak resident memory of this process (Linux/macOS; None where `resource` does not exist)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StageTimer:
    """Adds the wall time of a `with` block to `stats.seconds[name]` (CUDA-synchronized)."""

    def __init__(self, stats: RunStats, name: str, device: torch.device):
        self.stats, self.name, self.device = stats, name, device

    def __enter__(self) -> None:
        self.peak = DevicePeak(self.device)  # the driver's view: TensorRT/ORT memory included
        self.peak.start()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.seconds[self.name] = self.stats.seconds.get(self.name, 0.0) + time.perf_counter() - self.start
        self.peak.stop()
        if self.peak.result is not None:
            self.stats.driver_peak_bytes = max(self.stats.driver_peak_bytes or 0, self.peak.result.driver_peak_bytes)
