"""Helpers shared by the test suite and the parity checks in tools/: tolerance assertions and synthetic images.

Also a pytest plugin (pyproject: `addopts = "-p ruyi_trt.testing"`): the repository root is the package
`ruyi_trt` under whatever name its clone has (`ruyi-trt`, ...), so pytest must collect it as a plain folder;
as a package it would import the root `__init__.py` under the folder's name, which fails for names like
`ruyi-trt`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


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


def pytest_collect_directory(path: Path, parent):
    """pytest hook: the repository root (pytest's rootdir, holding the package's __init__.py) is collected as a plain
    `pytest.Dir` (see the module docstring)."""
    if path == parent.config.rootpath and (path / "__init__.py").is_file():
        import pytest

        return pytest.Dir.from_parent(parent, path=path)
    return None
