"""tools/memory_check: a real process, fake CUDA tensors, every stage measured and reported; on the tiny model, and
at full size (768x768x120 in a 12 GiB budget) as issue 12 requires: measured <= budget, within 10% of predicted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("g++") is None, reason="the fake CUDA guard shim needs g++ (apt-get install g++)")
def test_memory_check_tiny_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "check"
    cmd = [sys.executable, "-m", "ruyi_trt.tools.memory_check", "--model", "tiny", "--size", "64x96", "--frames", "8",
           "--vram-budget", "1", "--memory-mode", "low_gpu", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "memory_check.json").read_text())
    assert set(record["stages"]) == {"vae encode", "clip", "denoise", "vae decode"}
    for stage in record["stages"].values():
        assert stage["measured_gib"] > 0 and stage["predicted_gib"] > 0
    assert record["settings"]["resident_blocks"] == 0  # low_gpu: every block streamed through flat buffers
    assert record["host_pinned_measured_gib"] > 0 and record["host_pinned_gib"] >= record["host_pinned_measured_gib"]
    assert record["sdpa_kernels"].get("flash", 0) > 0  # never the math kernel
    assert any("streams" in r for r in record["replaced_mechanisms"])
    assert "| denoise |" in result.stdout


# Full size, bf16, fake CUDA (nothing allocated; ~1.5 min on 2 cores): the planner's figures hold for the real torch
# code path. A precision change that grows a working set (float32 GroupNorm copies in the VAE once took its 12 GiB
# decode to 16.4 GiB) fails here rather than on a 12 GB card.
@pytest.mark.skipif(shutil.which("g++") is None, reason="the fake CUDA guard shim needs g++ (apt-get install g++)")
def test_memory_check_full_size_768_in_12_gib(tmp_path: Path) -> None:
    out = tmp_path / "check"
    cmd = [sys.executable, "-m", "ruyi_trt.tools.memory_check", "--model", "full-random", "--size", "768x768",
           "--frames", "120", "--vram-budget", "12", "--host-ram", "24", "--strict", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "memory_check.json").read_text())
    for name, stage in record["stages"].items():
        assert stage["measured_gib"] <= 12 and abs(stage["measured_over_predicted"] - 1) <= 0.10, (name, stage)
    assert record["settings"]["fp8"] != "none" and record["settings"]["resident_blocks"] < 40


def test_missing_compiler_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ruyi_trt.tools import fake_cuda

    monkeypatch.setattr(fake_cuda.shutil, "which", lambda name: None)
    with pytest.raises(fake_cuda.FakeCudaUnavailable, match="apt-get install g\\+\\+"):
        fake_cuda.register_fake_cuda_guard(tmp_path)
