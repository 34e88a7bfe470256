"""The compiled torch paths on the CPU with the tiny model: `--backend torch-compile` (regional torch.compile) and
AOTInductor packages (`ruyi-trt build --engine aoti`, `--backend aoti`): parity with eager fp32, the cache and
sidecar, weights loaded at run time, and the refusals. Compiling is slow: one package build per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ruyi_trt.cli import main
from ruyi_trt.engine import cache
from ruyi_trt.runtime.loading import RuntimeOptions
from ruyi_trt.runtime.pipeline import load_pipeline
from ruyi_trt.tools.bench_models import Shape, denoiser_inputs

# fp32 on the CPU: inductor reorders reductions, so compiled outputs match eager to ~1e-6 of the output scale
REL = 1e-4


def _inputs(pipe, shape: Shape, batch: int = 2) -> dict:
    tokens = pipe.checkpoint.clip_geometry[1:]
    return denoiser_inputs(pipe.transformer_config, pipe.vae_config, shape, tokens, torch.device("cpu"), torch.float32,
                           batch)  # fmt: skip


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= REL * max(1.0, expected.abs().max())


@pytest.fixture(scope="module")
def eager(tiny_dir: Path):
    return load_pipeline("tiny", RuntimeOptions())


def test_torch_compile_backend_matches_eager_without_recompiling_for_new_sizes(eager):
    from torch._dynamo.utils import counters

    pipe = load_pipeline("tiny", RuntimeOptions(backend="torch-compile"))
    for shape in (Shape(64, 64, 8), Shape(64, 96, 8), Shape(96, 64, 8)):
        inputs = _inputs(eager, shape)
        _close(pipe.components.denoiser(**inputs), eager.components.denoiser(**inputs))
    graphs = counters["stats"]["unique_graphs"]
    inputs = _inputs(eager, Shape(128, 64, 8))  # a fourth token count: no new graph
    _close(pipe.components.denoiser(**inputs), eager.components.denoiser(**inputs))
    assert counters["stats"]["unique_graphs"] == graphs
    blocks = pipe.components.denoiser.blocks
    assert all("forward" in vars(block) for block in blocks)
    pipe.unload()
    assert not any("forward" in vars(block) for block in blocks)  # the plain forwards are back


@pytest.fixture(scope="module")
def aoti_packages(tiny_dir: Path) -> dict[str, Path]:
    result = CliRunner().invoke(main, ["build", "--engine", "aoti", "--model", "tiny", "--precision", "fp32",
                                       "--resolution", "64x64,64x96", "--frames", "8:8:16", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    *packages, summary = result.output.splitlines()
    assert summary.startswith("packages in ")
    folders = {}
    for line in packages:
        graph, state, folder = line.split()
        assert state == "built"
        folders[graph.rstrip(":")] = Path(folder)
    return folders


def test_aoti_build_writes_sidecars_and_is_cached(aoti_packages: dict[str, Path]):
    assert set(aoti_packages) == {"transformer_block_plain", "transformer_block_skip"}
    for graph, folder in aoti_packages.items():
        record = json.loads((folder / "engine.json").read_text())
        assert record["graph"] == graph and record["precision"] == "fp32" and record["flags"] == {"engine": "aoti"}
        assert record["platform"]["gpu"] == "cpu" and record["platform"]["tensorrt"].startswith("torch ")
        assert "--engine aoti" in record["build_command"] and record["engine_bytes"] == (folder / "engine.pt2").stat().st_size
        assert record["profile"]["tokens"][0][1:3] == [2, 16] and record["profile"]["tokens"][2][1:3] == [4, 24]
        assert record["engine_bytes"] < 5_000_000  # the weights are not in the package
    again = CliRunner().invoke(main, ["build", "--engine", "aoti", "--model", "tiny", "--precision", "fp32",
                                      "--resolution", "64x64,64x96", "--frames", "8:8:16", "--no-progress"])  # fmt: skip
    assert again.exit_code == 0 and again.output.count("cached") == 2


def test_aoti_backend_matches_eager(aoti_packages: dict[str, Path], eager):
    pipe = load_pipeline("tiny", RuntimeOptions(backend="aoti"))
    for shape, batch in ((Shape(64, 64, 8), 2), (Shape(64, 96, 16), 2), (Shape(64, 64, 16), 1)):
        inputs = _inputs(eager, shape, batch)
        _close(pipe.components.denoiser(**inputs), eager.components.denoiser(**inputs))
    video = pipe(eager_image(), frames=8, size=(64, 64), steps=2, progress=False)  # end to end
    assert video.frames.shape == (8, 64, 64, 3)


def eager_image():
    from ruyi_trt.testing import gradient_image

    return gradient_image(64, 64)


def test_aoti_weights_are_loaded_at_run_time(aoti_packages: dict[str, Path], eager):
    pipe = load_pipeline("tiny", RuntimeOptions(backend="aoti"))
    reference = load_pipeline("tiny", RuntimeOptions())
    for model in (pipe.components.denoiser.model, reference.components.denoiser.model):  # a "LoRA": new weights
        with torch.no_grad():
            model.blocks[1].attn1.to_q.weight.mul_(1.5)
    inputs = _inputs(eager, Shape(64, 64, 8))
    changed = pipe.components.denoiser(**inputs)
    _close(changed, reference.components.denoiser(**inputs))
    assert (changed - eager.components.denoiser(**inputs)).abs().max() > 1e-3


def test_aoti_refuses_shapes_outside_the_profile_and_corrupt_packages(aoti_packages: dict[str, Path], eager, tmp_path: Path):
    pipe = load_pipeline("tiny", RuntimeOptions(backend="aoti"))
    with pytest.raises(cache.EngineMismatchError, match=r"(?s)AOTInductor package.*--engine aoti"):
        pipe.components.denoiser(**_inputs(eager, Shape(128, 128, 8)))
    folder = aoti_packages["transformer_block_plain"]
    data = (folder / "engine.pt2").read_bytes()
    try:
        (folder / "engine.pt2").write_bytes(data[:-10])
        broken = load_pipeline("tiny", RuntimeOptions(backend="aoti"))
        with pytest.raises(cache.EngineFileError, match="truncated or corrupt"):
            broken.components.denoiser(**_inputs(eager, Shape(64, 64, 8)))
    finally:
        (folder / "engine.pt2").write_bytes(data)


def test_aoti_backend_without_packages_names_the_build_command(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("RUYI_TRT_CACHE", str(tmp_path))
    with pytest.raises(cache.EngineMismatchError, match=r"ruyi-trt build --engine aoti --model \S+ --precision fp32"):
        load_pipeline(tiny_dir, RuntimeOptions(backend="aoti"))


def test_bench_quality_rows_for_every_fast_path(aoti_packages: dict[str, Path], tiny_calibrations: dict, exported_dir: Path,
                                                tmp_path: Path):  # fmt: skip
    # torch-compile's parity is checked above (to 1e-4 of the output scale); compiling it again here costs a minute
    backends = "torch,ort,ort-int8,ort-fp8,aoti"
    result = CliRunner().invoke(main, ["bench", "--model", "tiny", "--backends", backends, "--quality", "--size", "64x64",
                                       "--frames", "8", "--stages", "denoise", "--warmup", "1", "--repeat", "1",
                                       "--out", str(tmp_path)])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert {m["backend"] for m in data["measurements"] if m["status"] == "ok"} == set(backends.split(","))
    quality = data["quality"]
    assert set(quality) == set(backends.split(",")) and data["config"]["quality_reference"] == "torch fp32"
    assert quality["torch"]["latent_cosine"] == pytest.approx(1.0, abs=1e-12)
    # latent cosine to torch fp32 after the whole run (float64 reduction). At this CI size (64x64, 8 frames, one
    # seed) FP8 E4M3 with per-tensor activation scales on the random tiny model measures 0.987-0.989 (0.992 at
    # 256x256x16f); INT8 SmoothQuant 0.999; the floors leave that margin, the float paths must be near exact.
    for backend, floor in (("ort-int8", 0.99), ("ort-fp8", 0.98), ("aoti", 0.9999), ("ort", 0.9999)):
        assert quality[backend]["latent_cosine"] >= floor, (backend, quality[backend])
        assert quality[backend]["psnr_db"] > 20
    assert "## Quality" in (tmp_path / "bench.md").read_text()
