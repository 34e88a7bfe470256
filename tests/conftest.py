"""Shared fixtures: the golden folder (RUYI_GOLDEN_DIR) and tensor comparison helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of golden tensors made by the reference Ruyi code; RUYI_GOLDEN_DIR overrides the default."""
    folder = Path(os.environ.get("RUYI_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
    if not folder.is_dir():
        pytest.fail(f"golden folder {folder} not found; set RUYI_GOLDEN_DIR")
    return folder


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, name: str = "") -> None:
    """max |actual - expected| <= rel * max(1, max |expected|), in float64."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= rel * scale, f"{name}: max abs err {err:.3e} > {rel:.0e} x scale {scale:.3e}"
