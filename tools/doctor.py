"""`ruyi-trt doctor`: which libraries, GPU and backends this machine has, with the reason when one is unusable."""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass, field


@dataclass
class DoctorReport:
    """Versions, GPU and backend availability; `backends` maps name -> (usable, reason)."""

    versions: dict[str, str | None] = field(default_factory=dict)
    gpus: list[str] = field(default_factory=list)
    backends: dict[str, tuple[bool, str]] = field(default_factory=dict)
    torch_options: dict[str, tuple[bool, str]] = field(default_factory=dict)  # --compute / --attention / kernels


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken install (e.g. tensorrt without libnvinfer) counts as absent
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _installed_version(distribution: str) -> str | None:
    """The installed version without importing the package (torchao logs warnings on import without CUDA)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append(
            f"cuda:{index} {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}"
        )
    return found


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _onnxruntime_status() -> tuple[bool, str]:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return False, "onnxruntime is not installed: pip install onnxruntime-gpu (it also runs on CPU)"
    providers = ort.get_available_providers()
    note = "" if torch_cuda_available() else " (GPU providers need a visible CUDA GPU; CPU is used here)"
    return True, "providers: " + ", ".join(providers) + note


def _tensorrt_status(has_gpu: bool) -> tuple[bool, str]:
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return False, "tensorrt is not installed: pip install 'ruyi-trt[trt]' (tensorrt-cu12 or -cu13 from NVIDIA's index)"
    except Exception as exc:  # noqa: BLE001 - the bindings import but the libraries are missing
        return False, f"tensorrt is installed but does not load ({exc}); reinstall tensorrt-cu12/-cu13"
    if not has_gpu:
        return False, "tensorrt is installed but no CUDA GPU is visible"
    return True, "TensorRT engines can be built and run"


def _torch_option_statuses(device: str) -> dict[str, tuple[bool, str]]:
    """The torch backend's 8-bit compute and kernel options on `device` (runtime.backends.fast_compute)."""
    from ..runtime.backends.fast_compute import FastCompute

    options = {
        "--compute fp8": FastCompute(compute="fp8"), "--compute int8": FastCompute(compute="int8"),
        "--attention fp8": FastCompute(attention="fp8"), "--fused-kernels": FastCompute(fused_kernels=True),
    }  # fmt: skip
    statuses = {}
    for name, settings in options.items():
        reason = settings.unavailable_reason(device)
        if name == "--compute fp8" and reason is None and device == "cpu":
            reason, usable = "runs on CPU only as a slow emulation of FP8 (numerically right)", True
        else:
            usable = reason is None
        statuses[name] = (usable, reason or f"on {device}")
    return statuses


def collect_report() -> DoctorReport:
    """Probe the environment without changing anything."""
    import torch

    report = DoctorReport()
    report.versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda (torch)": torch.version.cuda or "none (CPU build)",
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "tensorrt": _version("tensorrt"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "av": _version("av"),
        "triton": _installed_version("triton"),
        "torchao": _installed_version("torchao"),
    }
    report.gpus = _gpus()
    has_gpu = bool(report.gpus)
    report.backends = {
        "torch": (True, "CUDA" if has_gpu else "CPU only (no CUDA GPU visible): slow beyond the tiny model"),
        "ort": _onnxruntime_status(),
        "trt": _tensorrt_status(has_gpu),
    }
    report.torch_options = _torch_option_statuses("cuda" if has_gpu else "cpu")
    return report


def format_report(report: DoctorReport) -> str:
    """Plain-text rendering for the terminal."""
    lines = ["versions:"]
    lines += [f"  {name:<14} {value or 'not installed'}" for name, value in report.versions.items()]
    lines.append("gpu:")
    lines += [f"  {gpu}" for gpu in report.gpus] or ["  none visible"]
    lines.append("backends:")
    lines += [
        f"  {name:<6} {'usable' if ok else 'unusable'}: {reason}" for name, (ok, reason) in report.backends.items()
    ]
    if report.torch_options:
        lines.append("torch backend options:")
        lines += [f"  {name:<16} {'usable' if ok else 'unusable'}: {reason}"
                  for name, (ok, reason) in report.torch_options.items()]  # fmt: skip
    return "\n".join(lines)
