"""Whether Triton kernels can run here, and the few settings that differ between a GPU and the interpreter.

Kernels run on a CUDA GPU, or anywhere under Triton's interpreter (`TRITON_INTERPRET=1`, set before the kernel
modules are imported: `triton.jit` reads it when a kernel is defined). The interpreter is how CI checks the kernels
on CPU; it is ~40x slower than torch, cannot autotune, and is wrong for bf16 arithmetic and for in-kernel
fp32 -> fp8 casts across an exponent step (tests quantize with torch and stay in fp32/fp16).
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_PIP = "pip install 'triton>=3.3'"


def interpreting() -> bool:
    """True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_missing_reason() -> str | None:
    """None when Triton imports, else what to install."""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed; {TRITON_PIP} (it comes with CUDA builds of torch)"
    return None


def kernel_unavailable_reason(device: torch.device | str) -> str | None:
    """None when the Triton kernels can run on `device`, else why not (and what to do)."""
    missing = triton_missing_reason()
    if missing:
        return missing
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is visible"
    if interpreting():
        return None
    return f"Triton kernels need a CUDA device (got {device}); on CPU they run only under TRITON_INTERPRET=1"


def check_kernel_inputs(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the tensors cannot go to a Triton kernel (wrong device, or mixed devices)."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"kernel inputs are on several devices {sorted(map(str, devices))}; move them to one")
    reason = kernel_unavailable_reason(next(iter(devices)))
    if reason:
        raise RuntimeError(reason)


def fp8_supported(device: torch.device | str) -> bool:
    """FP8 tensor-core maths (e4m3 GEMMs, e4m3 tl.dot): compute capability >= 8.9, or the interpreter on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return interpreting()
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
