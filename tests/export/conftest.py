"""The per-block graphs of the tiny checkpoint; `exported_dir` (all graphs) is in tests/conftest.py, shared with tests/engine."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")


@pytest.fixture(scope="session")
def per_block_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transformer as embed / plain block / skip block / unembed graphs."""
    from ruyi_trt.export import ExportSettings, export_checkpoint

    out = tmp_path_factory.mktemp("per-block")
    export_checkpoint(tiny_dir, out, ExportSettings(per_block=True), components=["transformer"], progress=False)
    return out
