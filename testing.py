"""Helpers shared by the test suite and the parity checks in tools/: tolerance assertions and synthetic images."""

from __future__ import annotations

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
