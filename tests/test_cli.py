"""The `ruyi-trt` command line: help, doctor, an end-to-end tiny run to a real mp4, and clear errors that write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ruyi_trt.cli import main
from ruyi_trt.runtime.video import read_video

SMALL = ["--size", "64x96", "--steps", "2"]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_commands() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "doctor" in result.output and "run" in result.output


def test_doctor_reports_versions_and_backends() -> None:
    result = invoke("doctor")
    assert result.exit_code == 0
    assert "torch" in result.output and "backends:" in result.output
    assert "trt" in result.output  # usable or not, always listed with a reason


def test_run_tiny_writes_mp4_that_reads_back(tiny_dir: Path, start_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "video.mp4"
    frames_dir = tmp_path / "frames"
    result = invoke("run", "--model", "tiny", "--image", str(start_png), "--out", str(out), "--frames", "16",
                    "--frames-dir", str(frames_dir), "--no-progress", *SMALL)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    video = read_video(out)
    assert tuple(video.shape) == (16, 64, 96, 3)
    assert len(list(frames_dir.glob("*.png"))) == 16
    assert not list(out.parent.glob(".*"))  # no temp files left behind


def test_run_with_end_image(tiny_dir: Path, start_png: Path, end_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "video.mp4"
    result = invoke("run", "--model", "tiny", "--image", str(start_png), "--end-image", str(end_png),
                    "--out", str(out), "--frames", "8", "--camera", "left", "--motion", "3", "--no-progress", *SMALL)
    assert result.exit_code == 0, result.output
    assert tuple(read_video(out).shape) == (8, 64, 96, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "0"], "frames"),
        (["--frames", "121"], "frames"),
        (["--frames", "5"], "rounds down to 0"),
        (["--camera", "sideways"], "camera"),
        (["--motion", "9"], "motion"),
        (["--resolution", "640"], "resolution"),
        (["--scheduler", "LMS"], "scheduler"),
        (["--size", "60x96"], "multiples of 16"),
    ],
)
def test_bad_options_fail_clearly_and_write_nothing(start_png: Path, tmp_path: Path, args, message: str) -> None:
    out = tmp_path / "video.mp4"
    result = CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(start_png), "--out", str(out), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert not out.exists()


def test_missing_and_unreadable_images(tmp_path: Path) -> None:
    out = tmp_path / "video.mp4"
    missing = CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(tmp_path / "nope.png"), "--out", str(out)])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    unreadable = CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(broken), "--out", str(out)])
    assert unreadable.exit_code != 0 and "not a readable image" in unreadable.output
    assert not out.exists()


def test_unwritable_output_and_missing_model(start_png: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    result = CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(start_png),
                                       "--out", str(blocker / "video.mp4")])
    assert result.exit_code != 0 and "cannot write" in result.output
    result = CliRunner().invoke(main, ["run", "--model", str(tmp_path / "no-such-model"), "--image", str(start_png),
                                       "--out", str(tmp_path / "v.mp4")])
    assert result.exit_code != 0 and "does not exist" in result.output
    assert not (tmp_path / "v.mp4").exists()


def test_enhance_a_video_option_is_validated(start_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "video.mp4"
    base = ["run", "--model", "tiny", "--image", str(start_png), "--out", str(out), "--frames", "8", "--size", "64x96",
            "--steps", "1", "--no-progress", "--enhance-a-video"]
    result = CliRunner().invoke(main, [*base, "2", "--backend", "ort"])
    assert result.exit_code != 0 and "enhance_a_video" in result.output
    result = CliRunner().invoke(main, [*base, "-1"])
    assert result.exit_code == 2 and "--enhance-a-video" in result.output
    assert not out.exists()
