"""The torch backend's fast compute end to end: FP8 attention and the fused kernels inside the block runner (under
the Triton interpreter without a GPU), `run --compute` to a real mp4, and the refusals with their reasons."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.torch import save_file

from ruyi_trt.cli import main
from ruyi_trt.models.checkpoint import Checkpoint
from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.runtime.backends.block_runner import BlockRunner
from ruyi_trt.runtime.backends.fast_compute import FastCompute, apply_fast_compute
from ruyi_trt.runtime.loading import RuntimeOptions
from ruyi_trt.runtime.video import read_video
from ruyi_trt.tools.bench_models import Shape, denoiser_inputs
from ruyi_trt.weights.compute8 import token_linears

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: kernels under TRITON_INTERPRET=1 (tests/conftest.py)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize(
    ("settings", "cosine"),
    [(FastCompute(attention="fp8"), 0.999), (FastCompute(attention="fp8-full"), 0.998),
     (FastCompute(fused_kernels=True), 0.99999)],
    ids=["fp8-attention", "fp8-full-attention", "fused-kernels"],
)  # fmt: skip
def test_kernels_in_the_block_runner(settings, cosine):
    """fp32 tiny denoiser call through BlockRunner: the kernels' output vs SDPA / the unfused modules, and undo
    restores the exact original output."""
    pytest.importorskip("triton")
    model = tiny_transformer().eval().to(DEVICE)
    config = model.config
    inputs = denoiser_inputs(config, VAEConfig.tiny(), Shape(32, 64, 8), (16, config.projection_dim),
                             torch.device(DEVICE), torch.float32)  # fmt: skip
    runner = BlockRunner(model, DEVICE, torch.float32)
    reference = runner(**inputs)
    undo = apply_fast_compute(model, settings, DEVICE)
    try:
        out = runner(**inputs)
    finally:
        undo()
    assert _cosine(out, reference) >= cosine
    torch.testing.assert_close(runner(**inputs), reference, rtol=0, atol=0)


def _scales_file(folder: Path, checkpoint_hash: str) -> Path:
    """An fp8 scales file in ruyi-trt-scales/1 for every token linear of the tiny model (weights' own amax; a
    fixed activation range of +-8)."""
    tensors = {}
    for name, layer in token_linears(tiny_transformer()).items():
        tensors[f"{name}.input_scale"] = torch.tensor(8.0 / 448.0)
        tensors[f"{name}.weight_scale"] = (layer.weight.detach().abs().amax() / 448.0).reshape(())
    folder.mkdir()
    save_file(tensors, str(folder / "scales.safetensors"),
              metadata={"format": "ruyi-trt-scales/1", "precision": "fp8", "checkpoint_hash": checkpoint_hash})
    return folder


def _run(start_png: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(start_png), "--out", str(out),
                                     "--frames", "8", "--size", "64x64", "--steps", "2", "--no-progress", *args])


def test_run_int8_compute_writes_mp4(tiny_dir, start_png, tmp_path):
    out = tmp_path / "int8.mp4"
    result = _run(start_png, out, "--compute", "int8")
    assert result.exit_code == 0, result.output
    assert tuple(read_video(out).shape) == (8, 64, 64, 3)


def test_run_fp8_compute_with_calibrated_scales(tiny_dir, start_png, tmp_path):
    good = _scales_file(tmp_path / "calib", Checkpoint.from_folder(tiny_dir).weights_hash("transformer"))
    out = tmp_path / "fp8.mp4"
    result = _run(start_png, out, "--compute", "fp8", "--scales", str(good))
    assert result.exit_code == 0, result.output
    assert tuple(read_video(out).shape) == (8, 64, 64, 3)
    stale = _scales_file(tmp_path / "stale", "sha256:" + "0" * 64)
    result = _run(start_png, tmp_path / "stale.mp4", "--compute", "fp8", "--scales", str(stale))
    assert result.exit_code != 0 and "another checkpoint" in result.output
    assert not (tmp_path / "stale.mp4").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RuntimeOptions(compute="fp8", fp8="lite"), "exclude each other"),
        (RuntimeOptions(backend="ort", compute="int8"), "torch backend options"),
        (RuntimeOptions(scales="x.safetensors"), "applies to --compute"),
        (RuntimeOptions(compute="fp8", scales="no/such/dir"), "ruyi-trt calibrate"),
        (RuntimeOptions(compute="fp16"), "compute"),
        (RuntimeOptions(attention="flash"), "attention"),
    ],
)
def test_bad_fast_compute_options(options, message):
    with pytest.raises(ValueError, match=message):
        options.validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_kernels_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for options in (RuntimeOptions(attention="fp8"), RuntimeOptions(fused_kernels=True)):
        with pytest.raises(ValueError, match="CUDA"):
            options.validate()


def test_doctor_lists_the_torch_options():
    from ruyi_trt.tools.doctor import collect_report, format_report

    report = collect_report()
    assert set(report.torch_options) == {"--compute fp8", "--compute int8", "--attention fp8", "--fused-kernels"}
    assert report.torch_options["--compute int8"][0]  # torchao runs on CPU and GPU
    assert "torch backend options:" in format_report(report)
