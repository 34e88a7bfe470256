"""Real multi-process runs under torchrun on the CPU (gloo) with the tiny model, float32.

- 2 and 4 processes (tools/parallel_check): every parallel mode gives the final latents (and video) of a
  one-process run (rank 0 alone, before the modes, no collective) within 1e-5 x max|latents| (fp32: the ring's
  merge and batch-1 GEMMs only reorder sums), TeaCache skips the same steps on every rank as alone, block
  streaming and host-side long skips change nothing, and the chunk-parallel VAE decode/encode equals the serial
  one exactly;
- `ruyi-trt run --parallel` writes one mp4 (rank 0) whose frames equal a one-process run's;
- a rank killed mid-run ends the job, and a rank that stops answering makes the others fail with the collective
  timeout instead of hanging.
Shapes are tiny so that four processes fit two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from ruyi_trt.runtime.pipeline import RuyiPipeline
from ruyi_trt.testing import assert_close_scaled

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
CLI = Path(sys.executable).parent / "ruyi-trt"
LATENT_TOLERANCE = 1e-5  # relative to max |latents|, float32
STEPS = 6  # TeaCache (3 forced steps at the start, 1 at the end) can skip steps 4 and 5


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]


def run_job(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(torchrun(nproc, *args), capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def check_modes(out: Path, modes: list[str]) -> dict:
    report = json.loads((out / "parallel_check.json").read_text())
    assert [r["mode"] for r in report["modes"]] == modes
    for record in report["modes"]:
        reference = load_file(str(out / f"{record['reference']}.safetensors"))
        saved = load_file(str(out / f"{record['mode']}.safetensors"))
        assert_close_scaled(saved["latents"], reference["latents"], LATENT_TOLERANCE, record["mode"])
        assert_close_scaled(saved["video"], reference["video"], LATENT_TOLERANCE, record["mode"] + " video")
        assert record["skipped_per_rank"] == [record["serial_skipped"]] * record["world_size"]
    assert report["vae"]["decode_max_abs"] == 0.0 and report["vae"]["encode_max_abs"] == 0.0
    return report


def test_two_processes_ulysses_ring_cfg_teacache_and_streaming_match_one_process(tiny_dir: Path, tmp_path: Path) -> None:
    modes = ["ulysses=2", "ring=2", "cfg=2", "ulysses=2,teacache=0.3", "ring=2,memory=low_gpu,offload=1"]
    run_job(2, "-m", "ruyi_trt.tools.parallel_check", "--modes", ";".join(modes), "--size", "64x64",
            "--steps", STEPS, "--vae-latents", 6, "--timeout", 120, "--out", tmp_path)  # fmt: skip
    report = check_modes(tmp_path, modes)
    assert report["modes"][3]["serial_skipped"] > 0  # TeaCache really skipped steps, on every rank alike


def test_four_processes_with_uneven_token_shards_match_one_process(tiny_dir: Path, tmp_path: Path) -> None:
    # 48x48 px -> 2 latent frames of 3x3 tokens = 18 tokens: shards of 5, 5, 4, 4, ending inside frames
    modes = ["ulysses=2,cfg=2", "ring=4", "ulysses=2,ring=2"]
    run_job(4, "-m", "ruyi_trt.tools.parallel_check", "--modes", ";".join(modes), "--size", "48x48",
            "--steps", STEPS, "--vae-latents", 6, "--timeout", 120, "--out", tmp_path)  # fmt: skip
    check_modes(tmp_path, modes)


def cli_args(image: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [CLI, "run", "--model", "tiny", "--image", image, "--out", out, "--frames", "8", "--size", "64x64",
            "--steps", steps, "--seed", "3", *extra]  # fmt: skip


def test_cli_run_writes_one_video_equal_to_one_process(tiny_dir: Path, tmp_path: Path, start_png: Path) -> None:
    out, frames = tmp_path / "video.mp4", tmp_path / "frames"
    result = run_job(2, *cli_args(start_png, out, 3, "--parallel", "ulysses=2", "--frames-dir", frames, "--no-progress"))
    printed = result.stdout + result.stderr
    assert printed.count(f"runtime.video: wrote {out}") == 1 and result.stdout.count(f"wrote {out}  (") == 1
    assert out.stat().st_size > 0 and min(p.name for p in frames.iterdir()) == "frame_00000.png"
    alone = tmp_path / "alone"
    pipe = RuyiPipeline.from_pretrained("tiny", device="cpu", memory_mode="full_gpu")
    pipe(start_png, frames=8, size=(64, 64), steps=3, seed=3, progress=False).save_frames(alone)
    for mine, theirs in zip(sorted(frames.iterdir()), sorted(alone.iterdir()), strict=True):
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (mine, theirs))
        assert np.abs(a - b).max() <= 1  # uint8 frames: at most one step of rounding


def start_job(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(torchrun(2, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def read_until(proc: subprocess.Popen, marker: str, limit_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + limit_s
    for line in proc.stdout:  # universal newlines: tqdm's carriage returns end lines too
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    assert any(marker in line for line in lines), "".join(lines)[-3000:]
    return lines


def rank_process(proc: subprocess.Popen, rank: int):
    import psutil

    return next(p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == str(rank))


def test_a_rank_killed_mid_run_ends_the_job_within_the_timeout(tiny_dir: Path, tmp_path: Path, start_png: Path):
    timeout_s = 20
    out = tmp_path / "video.mp4"
    proc = start_job(cli_args(start_png, out, 500, "--parallel", "ulysses=2", "--parallel-timeout", str(timeout_s)))
    try:
        read_until(proc, "denoising:", 240)
        rank_process(proc, 1).kill()
        killed = time.monotonic()
        proc.wait(timeout=timeout_s + 30)
        ended = time.monotonic() - killed
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert ended < timeout_s, f"the job took {ended:.1f} s to end after rank 1 was killed"
    assert not out.exists() and not list(tmp_path.glob("*.mp4*"))  # nothing half-written


def test_a_stopped_rank_makes_the_others_fail_at_the_timeout(tmp_path: Path) -> None:
    timeout_s = 5
    proc = start_job([HERE / "stall_worker.py", str(timeout_s)])
    try:
        read_until(proc, "rank 1 stopping", 120)
        stopped = time.monotonic()
        lines = read_until(proc, "rank 0 gave up", timeout_s + 30)
        waited = time.monotonic() - stopped
        rank_process(proc, 1).send_signal(signal.SIGKILL)  # torchrun would wait 30 s for a stopped process
        proc.wait(timeout=60)
    finally:
        proc.kill()
    message = next(line for line in lines if "rank 0 gave up" in line)
    assert "Ulysses all-to-all failed" in message and "Timed out" in message, message
    assert timeout_s - 1 <= waited <= timeout_s + 15, waited
    assert proc.returncode != 0
