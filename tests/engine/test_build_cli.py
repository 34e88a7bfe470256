"""`ruyi-trt build` arguments, BuildSettings validation and its command line, and the missing-TensorRT messages."""

from __future__ import annotations

import json
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
        (["--resolution", "650"], "650 is not a base resolution; use 384..1024 in steps of 16"),
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
    seen = []
    monkeypatch.setattr("ruyi_trt.engine.build.build_engines", lambda s, progress, dry_run: seen.append(s) or _Result())
    for per_block, attention in ((True, "onnx"), (False, "decomposed"), (None, "auto")):
        settings = BuildSettings(model="tiny", precision="bf16", resolutions=("512", "384x672"), frames=FrameRange(16, 24, 48),
                                 batch=1, per_block=per_block, weight_streaming=True, refit=True, attention=attention,
                                 timing_cache=tmp_path / "timing cache.bin", workspace_gb=2.5, out=tmp_path / "engines")  # fmt: skip
        argv = shlex.split(settings.command())
        assert argv[:2] == ["ruyi-trt", "build"]
        result = CliRunner().invoke(main, argv[1:])
        assert result.exit_code == 0, result.output
        assert seen[-1] == settings
        assert BuildSettings.from_json(settings.to_json()) == settings


class _Result:
    engines: ClassVar[dict] = {}
    built: ClassVar[list] = []
    plan = Path("build-plan.json")


def test_widened_covers_a_request():
    settings = BuildSettings(resolutions=("512",), frames=FrameRange(24, 24, 48), batch=1)
    assert settings.widened(512, 512, 16, 2) == BuildSettings(resolutions=("512",), frames=FrameRange(16, 24, 48), batch=2)
    assert settings.widened(64, 96, 120, 1).resolutions == ("512", "64x96")
    assert settings.widened(64, 96, 120, 1).frames == FrameRange(24, 24, 120)


def test_resolved_settings_pick_per_block_and_attention():
    settings = BuildSettings()
    assert settings.resolved(14_400_000_000, (10, 15)).per_block is True  # the full model
    assert settings.resolved(10_000_000, (10, 15)).per_block is False  # tiny: one whole engine
    assert settings.resolved(0, (10, 14, 1)).attention == "onnx" and settings.resolved(0, (10, 13)).attention == "decomposed"
    assert BuildSettings(per_block=False, attention="decomposed").resolved(14_400_000_000, (10, 15)) == BuildSettings(
        per_block=False, attention="decomposed")  # fmt: skip
    with pytest.raises(ValueError, match="resolved"):
        settings.export_settings()
    resolved = settings.resolved(0, (10, 15)).export_settings()
    assert (resolved.per_block, resolved.attention, resolved.exporter) == (False, "onnx", "auto")


@pytest.fixture()
def reuse_export(monkeypatch: pytest.MonkeyPatch, exported_dir: Path) -> Path:
    """Plan over the session's exported tiny graphs instead of exporting again (the plan reads the manifest)."""
    monkeypatch.setattr("ruyi_trt.engine.build.ensure_exported", lambda *args, **kwargs: exported_dir)
    return exported_dir


def test_dry_run_writes_the_plan_without_tensorrt(no_tensorrt: None, reuse_export: Path, tmp_path: Path):
    out = tmp_path / "engines"
    args = ["build", "--model", "tiny", "--resolution", "64x64,64x96,96x64", "--frames", "8:8:16", "--whole",
            "--dry-run", "--out", str(out), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"planned: {out / 'build-plan.json'}" in result.output and "peak host RSS" in result.output
    plan = json.loads((out / "build-plan.json").read_text())
    assert plan["dry_run"] and plan["tensorrt"] == {"installed": None, "target": "10.15"} and plan["refused"] == []
    assert plan["attention"] == "onnx" and "--attention onnx" in plan["command"]
    assert {"transformer@64x96", "transformer@96x64", "image_encoder"} <= set(plan["engines"])
    assert plan["engines"]["transformer@64x96"]["sizes"] == ["64x96", "64x64"]
    assert plan["engines"]["transformer@96x64"]["inputs"]["hidden_states"]["max"] == [2, 16, 4, 12, 8]
    assert not [p for p in out.iterdir() if p.name != "build-plan.json"]  # no engine folder: nothing was built


def test_dry_run_refuses_a_profile_past_int32(no_tensorrt: None, reuse_export: Path, tmp_path: Path):
    """The session's graphs have decomposed attention: at 768 x 768 x 120 frames the scores pass 2^31 elements."""
    out = tmp_path / "engines"
    args = ["build", "--model", "tiny", "--resolution", "768x768", "--frames", "8:120:120", "--whole", "--dry-run",
            "--out", str(out), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "refusing" in result.output and "2^31" in result.output and "Traceback" not in result.output
    assert json.loads((out / "build-plan.json").read_text())["refused"]
