"""`ruyi-trt build` arguments, BuildSettings validation and its command line, and the missing-TensorRT messages."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from ruyi_trt.cli import main
from ruyi_trt.engine.profiles import FrameRange
from ruyi_trt.engine.settings import BuildSettings


@pytest.fixture()
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import tensorrt` fail, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "9:5:3"], "MIN <= OPT <= MAX"),
        (["--frames", "8:12:16"], "not a multiple of 8"),
        (["--precision", "fp8", "--per-block"], "the Q/DQ transformer is one whole graph"),
        (["--precision", "fp32"], "not supported with --engine tensorrt"),
        (["--engine", "aoti", "--precision", "fp8"], "not supported with --engine aoti"),
        (["--engine", "aoti", "--precision", "fp32", "--refit"], "are TensorRT options"),
        (["--resolution", "640"], "640 is not a base resolution"),
        (["--resolution", "512,1000x1000x3"], "is unknown"),
        (["--workspace", "-1"], "--workspace"),
    ],
)
def test_argument_errors(args: list[str], message: str, no_tensorrt: None):
    result = CliRunner().invoke(main, ["build", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_tensorrt_names_the_pip_command(no_tensorrt: None):
    result = CliRunner().invoke(main, ["build", "--model", "tiny"])
    assert result.exit_code == 1
    assert "pip install 'ruyi-trt[trt]'" in result.output and "tensorrt-cu12" in result.output


def test_run_backend_trt_without_tensorrt(no_tensorrt: None, start_png: Path, tmp_path: Path):
    out = tmp_path / "v.mp4"
    result = CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(start_png), "--backend", "trt",
                                       "--frames", "8", "--steps", "1", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 1
    assert "pip install 'ruyi-trt[trt]'" in result.output and not out.exists()


def test_doctor_reports_tensorrt(no_tensorrt: None):
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 0
    assert "trt    unusable: tensorrt is not installed: pip install 'ruyi-trt[trt]'" in result.output


def test_command_parses_back_to_the_same_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    settings = BuildSettings(model="tiny", precision="bf16", resolutions=("512", "384x672"), frames=FrameRange(16, 24, 48),
                             batch=1, per_block=True, weight_streaming=True, refit=True,
                             timing_cache=tmp_path / "timing cache.bin", workspace_gb=2.5, out=tmp_path / "engines")  # fmt: skip
    seen = []
    monkeypatch.setattr("ruyi_trt.engine.build.build_engines", lambda s, progress: seen.append(s) or _Result())
    argv = shlex.split(settings.command())
    assert argv[:2] == ["ruyi-trt", "build"]
    result = CliRunner().invoke(main, argv[1:])
    assert result.exit_code == 0, result.output
    assert seen == [settings]


class _Result:
    engines: ClassVar[dict] = {}
    built: ClassVar[list] = []


def test_widened_covers_a_request():
    settings = BuildSettings(resolutions=("512",), frames=FrameRange(24, 24, 48), batch=1)
    assert settings.widened(512, 512, 16, 2) == BuildSettings(resolutions=("512",), frames=FrameRange(16, 24, 48), batch=2)
    assert settings.widened(64, 96, 120, 1).resolutions == ("512", "64x96")
    assert settings.widened(64, 96, 120, 1).frames == FrameRange(24, 24, 120)
