"""The `ruyi-trt` command line: help, doctor, an end-to-end tiny run to a real mp4, and clear errors that write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ruyi_trt.cli import main
from ruyi_trt.runtime.video import read_video
from ruyi_trt.testing import gradient_image

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
        (["--resolution", "650"], "384..1024 in steps of 16"),
        (["--resolution", "1040"], "resolution"),
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


def test_run_with_the_originals_options(tiny_dir: Path, tmp_path: Path) -> None:
    """Any base resolution (400: the 3:2 bucket scaled from 512), the aspect key, chained LoRAs with their own
    strengths, TeaCache / Enhance-A-Video step options, fp8 storage auto, a note for the rounded frame count, and
    the precision of each model in the summary."""
    from safetensors.torch import save_file

    from ruyi_trt.models.checkpoint import Checkpoint

    dim = Checkpoint.resolve("tiny").transformer.inner_dim
    loras = []
    for seed, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(seed)
        out_dim, in_dim = dim, dim
        path = tmp_path / f"{name}.safetensors"
        save_file({"lora_unet_blocks_0_attn1_to_q.lora_up.weight": torch.randn(out_dim, 2, generator=gen),
                   "lora_unet_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, in_dim, generator=gen)}, str(path))  # fmt: skip
        loras.append(path)
    image = tmp_path / "wide.png"
    gradient_image(150, 100).save(image)  # h/w 0.667 -> bucket 0.68 (416x608 at 512) -> 325x475 -> 320x464 at 400
    out = tmp_path / "video.mp4"
    result = invoke("run", "--model", "tiny", "--image", str(image), "--out", str(out), "--resolution", "400",
                    "--frames", "1", "--steps", "2", "--aspect-ratio", "4:3", "--lora", f"{loras[0]}:0.8",
                    "--lora", str(loras[1]), "--lora-strength", "0.5", "--teacache", "0.5", "--teacache-skip-start",
                    "1", "--teacache-skip-end", "1", "--no-teacache-offload-cpu", "--enhance-a-video", "1",
                    "--enhance-a-video-skip-start", "1", "--fp8", "extreme", "--fp8-storage", "auto",
                    "--noise-device", "cpu", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "precision image_encoder fp32, vae fp32, transformer fp32, fp8 extreme weights (fp8_e4m3fn)" in result.output
    assert tuple(read_video(out).shape) == (1, 320, 464, 3)
    rounded = invoke("run", "--model", "tiny", "--image", str(image), "--out", str(out), "--frames", "9", "--steps",
                     "1", "--no-progress", "--size", "32x48")  # fmt: skip
    assert "note: frames: 9 is not a multiple of 8; making 8 frames" in rounded.output
    assert tuple(read_video(out).shape) == (8, 32, 48, 3)
    bad = invoke("run", "--model", "tiny", "--image", str(image), "--out", str(out), "--teacache-skip-end", "2")
    assert bad.exit_code != 0 and "applies only with teacache turned on" in bad.output
