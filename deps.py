"""Optional dependencies: import them where they are used, with an install hint when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

_PIP_HINTS = {
    "tensorrt": "pip install 'ruyi-trt[trt]'  (or: pip install tensorrt-cu12 / tensorrt-cu13 from NVIDIA's index)",
    "onnxruntime": "pip install onnxruntime-gpu  (it also runs on CPU)",
    "onnx": "pip install 'ruyi-trt[export]'",
    "onnxscript": "pip install 'ruyi-trt[export]'",
    "onnx_graphsurgeon": "pip install 'ruyi-trt[export]'  (the package is onnx-graphsurgeon)",
    "av": "pip install av",
    "triton": "pip install triton  (Linux + CUDA only)",
    "polygraphy": "pip install polygraphy",
    "matplotlib": "pip install 'ruyi-trt[bench]'",
}


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module` or raise ImportError naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        hint = _PIP_HINTS.get(top, f"pip install {top}")
        what = f" (needed for {purpose})" if purpose else ""
        raise ImportError(f"'{module}' is not installed{what}. Install it with: {hint}") from exc
