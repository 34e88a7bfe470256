"""What a benchmark ran on: library versions, GPU, driver, git commit, and the GPU's datasheet peak rate."""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

PEAKS_FILE = Path(__file__).with_name("gpu_peaks.json")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PeakRate:
    """A GPU's peak dense tensor-core rate for one dtype, with where the number comes from."""

    gpu: str
    dtype: str
    tflops: float
    source: str


@cache
def _peak_table() -> tuple[dict, ...]:
    return tuple(json.loads(PEAKS_FILE.read_text())["gpus"])


def peak_rate(device_name: str, dtype: str) -> PeakRate | None:
    """The datasheet peak for `device_name` (as torch names it) in `dtype` ('bf16'/'fp16'); None when unknown."""
    for entry in _peak_table():
        if dtype in entry and re.search(entry["pattern"], device_name, flags=re.IGNORECASE):
            return PeakRate(entry["name"], dtype, float(entry[dtype]), entry["source"])
    return None


def module_version(module: str) -> str | None:
    """`module.__version__`, or None when it is missing or does not import (e.g. tensorrt without its libraries)."""
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return None


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def git_commit() -> str | None:
    """HEAD of the checkout the package runs from (with '+dirty' when it has changes), or None outside git."""
    commit = _run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT)
    if commit is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE_ROOT)
    return commit + ("+dirty" if dirty else "")


def gpu_info(device: torch.device) -> dict[str, object] | None:
    """Name, memory, compute capability and driver of a CUDA device; None on the CPU."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={index}"])
    return {
        "name": props.name,
        "memory_bytes": props.total_memory,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "driver": driver.splitlines()[0] if driver else None,
    }


def collect_environment(device: torch.device) -> dict[str, object]:
    """Everything needed to reproduce or compare a benchmark."""
    from .. import __version__

    return {
        "ruyi_trt": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "onnxruntime": module_version("onnxruntime"),
        "tensorrt": module_version("tensorrt"),
        "device": str(device),
        "gpu": gpu_info(device),
    }
