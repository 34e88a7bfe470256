"""Shared fixtures: the golden folder (RUYI_GOLDEN_DIR), a private artifact cache, the tiny checkpoint, images.

Without a GPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1 is set here, before any test
module imports (and so defines) a kernel.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from ruyi_trt.testing import gradient_image

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

# The repository root is the ruyi_trt package, and pytest imports the package around the tests from its __init__.py.
# When the checkout's folder name is not an identifier (custom_nodes/ruyi-trt, as the README installs it) pytest
# imports that file as a top-level module "__init__", whose relative imports fail before any test runs. The
# installed ruyi_trt is that same file: give it to pytest under that name.
_package = importlib.import_module("ruyi_trt")
if not REPO_ROOT.name.isidentifier() and Path(_package.__file__).resolve() == REPO_ROOT / "__init__.py":
    sys.modules.setdefault("__init__", _package)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Folder of golden tensors made by the reference Ruyi code; RUYI_GOLDEN_DIR overrides the default."""
    folder = Path(os.environ.get("RUYI_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
    if not folder.is_dir():
        pytest.fail(f"golden folder {folder} not found; set RUYI_GOLDEN_DIR")
    return folder



@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point RUYI_TRT_CACHE at a fresh folder so tests never touch (or depend on) the user's cache."""
    folder = tmp_path_factory.mktemp("ruyi-cache")
    previous = os.environ.get("RUYI_TRT_CACHE")
    os.environ["RUYI_TRT_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RUYI_TRT_CACHE", None)
    else:
        os.environ["RUYI_TRT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_dir(private_cache: Path) -> Path:
    """The tiny checkpoint folder (built once per session), as `--model tiny` resolves it."""
    from ruyi_trt.models.presets import tiny_checkpoint_dir

    return tiny_checkpoint_dir()


@pytest.fixture(scope="session")
def exported_dir(tiny_dir: Path) -> Path:
    """All four components of the tiny checkpoint exported once per session (fp32, torchscript), in the artifact
    cache exactly where `--backend ort` looks for them; shared by tests/export and tests/engine."""
    for module in ("onnx", "onnxruntime", "onnx_graphsurgeon"):
        pytest.importorskip(module)
    from ruyi_trt.export import ExportSettings, ensure_exported

    return ensure_exported(tiny_dir, ExportSettings(), progress=False)


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


@pytest.fixture(scope="session")
def tiny_calibrations(tiny_dir: Path) -> dict[str, Path]:
    """int8 and fp8 calibrations of the tiny checkpoint (64x64, 2 steps, two controls: seconds, not minutes), written
    where the default calibration is cached, so `--backend ort-int8/ort-fp8` and `bench` use them without
    calibrating again."""
    pytest.importorskip("modelopt")
    from ruyi_trt.calib.store import CalibrationSettings, cache_dir
    from ruyi_trt.models.checkpoint import Checkpoint
    from ruyi_trt.runtime.calibration import calibrate_checkpoint

    checkpoint = Checkpoint.resolve("tiny")
    small = CalibrationSettings(size=(64, 64), steps=2, cameras=("static", "left"), motions=("1", "3"))
    folders = {}
    for precision in ("int8", "fp8"):
        folder = cache_dir(checkpoint.weights_hash("transformer"), precision, CalibrationSettings())
        calibrate_checkpoint(checkpoint, precision, folder, small, progress=False)
        folders[precision] = folder
    return folders
