"""Helpers shared by the test suite and the parity checks in tools/: tolerance assertions, synthetic images and
an emulation of CUDA autocast's cast policy on the CPU (the original's precision regime).

Also a pytest plugin (pyproject: `addopts = "-p ruyi_trt.testing"`): the repository root is the package
`ruyi_trt` under whatever name its clone has (`ruyi-trt`, ...), so pytest must collect it as a plain folder;
as a package it would import the root `__init__.py` under the folder's name, which fails for names like
`ruyi-trt`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

# torch.autocast("cuda") runs these in the autocast dtype and these in float32 (PyTorch's "CUDA Ops that can
# autocast to float16/float32" lists, the entries these models call); every other op runs in its inputs' dtype.
AUTOCAST_LOWER_PRECISION_OPS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
    torch.bmm, torch.baddbmm, torch.addmm, torch.einsum, F.scaled_dot_product_attention,
})  # fmt: skip
AUTOCAST_FP32_OPS = frozenset({
    F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.exp,
    torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.sum, torch.Tensor.sum,
})  # fmt: skip


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, name: str = "") -> None:
    """max |actual - expected| <= rel * max(1, max |expected|), computed in float64."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= rel * scale, f"{name}: max abs err {err:.3e} > {rel:.0e} x scale {scale:.3e}"


def gradient_image(width: int, height: int, phase: float = 0.0) -> Image.Image:
    """A smooth synthetic RGB picture of the given size."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [127 + 120 * np.sin(x / width * 6 + phase), 127 + 120 * np.cos(y / height * 5), 255 * x / width], axis=-1
    )
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _cast_floats(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


class CudaAutocastPolicy(TorchFunctionMode):
    """`with CudaAutocastPolicy(torch.bfloat16):` casts the inputs of the ops torch.autocast("cuda") casts, on any
    device: matmuls, convolutions and SDPA to `dtype`, normalizations, softmax, exp, pow and sum to float32.

    CPU autocast has other lists (it leaves layer_norm, group_norm and softmax in bf16), so it cannot stand in
    for the original's run on a GPU. Only the outermost call is cast (the ops inside an intercepted function run
    as they are), which is how autocast treats them as well."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = self.dtype if func in AUTOCAST_LOWER_PRECISION_OPS else torch.float32 if func in AUTOCAST_FP32_OPS else None
        if target is not None:
            args, kwargs = _cast_floats(args, target), {k: _cast_floats(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def pytest_collect_directory(path: Path, parent):
    """pytest hook: the repository root (pytest's rootdir, holding the package's __init__.py) is collected as a plain
    `pytest.Dir` (see the module docstring)."""
    if path == parent.config.rootpath and (path / "__init__.py").is_file():
        import pytest

        return pytest.Dir.from_parent(parent, path=path)
    return None
