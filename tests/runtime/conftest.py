"""Fixtures for runtime tests: small start/end image files."""

from __future__ import annotations

from pathlib import Path

import pytest
from ruyi_trt.testing import gradient_image


@pytest.fixture()
def start_png(tmp_path: Path) -> Path:
    path = tmp_path / "start.png"
    gradient_image(144, 96).save(path)
    return path


@pytest.fixture()
def end_png(tmp_path: Path) -> Path:
    path = tmp_path / "end.png"
    gradient_image(120, 90, phase=2.0).save(path)
    return path
