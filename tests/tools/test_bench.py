"""`bench` on the tiny model: valid JSON / markdown / PNG, unavailable backends with reasons, input checks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ruyi_trt.cli import main
from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.runtime.backends.block_runner import BlockRunner
from ruyi_trt.tools.bench import BenchConfig, parse_shapes, run_bench
from ruyi_trt.tools.bench_models import STAGES, Shape, backend_statuses
from ruyi_trt.tools.fast_paths import FAST_PATHS, CompiledBlocks, wrap_denoiser

REPO = Path(__file__).resolve().parents[2]
MEASUREMENT_KEYS = {
    "backend", "stage", "height", "width", "frames", "status", "reason", "latent", "tokens", "times_s", "warmup_s",
    "median_s", "min_s", "max_s", "peak_allocated_bytes", "peak_reserved_bytes", "host_rss_bytes",
    "host_peak_rss_bytes", "flops", "tflops_per_s", "peak_fraction",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        model="tiny", backends=("torch", "trt", "torch-cudagraph"), shapes=(Shape(64, 64, 8),),
        steps=1, warmup=0, repeat=2,
    )  # fmt: skip
    run_bench(config, out)
    return out


def test_json_has_every_stage_and_the_environment(tiny_bench: Path):
    data = json.loads((tiny_bench / "bench.json").read_text())
    assert data["schema"] == "ruyi-trt-bench/1"
    assert {"config", "environment", "backends", "peak", "notes", "measurements"} <= data.keys()
    assert {"torch", "python", "git_commit", "gpu", "device"} <= data["environment"].keys()
    rows = data["measurements"]
    assert {row["stage"] for row in rows} == set(STAGES)
    for row in rows:
        assert MEASUREMENT_KEYS <= row.keys()
        assert row["backend"] == "torch" and row["status"] == "ok", row
        assert len(row["times_s"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["host_peak_rss_bytes"] > 0
    denoise = next(row for row in rows if row["stage"] == "denoise")
    assert denoise["latent"] == [2, 8, 8] and denoise["tokens"] == 32
    assert denoise["flops"]["total"] > 0 and denoise["tflops_per_s"] > 0
    run = next(row for row in rows if row["stage"] == "run")
    assert run["flops"]["total"] == denoise["flops"]["total"]  # one step


def test_unavailable_backends_are_listed_with_reasons(tiny_bench: Path):
    data = json.loads((tiny_bench / "bench.json").read_text())
    backends = {b["name"]: b for b in data["backends"]}
    assert backends["torch"]["available"]
    for name in ("trt", "torch-cudagraph"):
        assert not backends[name]["available"] and backends[name]["reason"]
    markdown = (tiny_bench / "bench.md").read_text()
    assert "| backend | stage | shape | median s |" in markdown
    assert "## Unavailable backends" in markdown and "torch-cudagraph needs --device cuda" in markdown


def test_png_plot_opens(tiny_bench: Path):
    with Image.open(tiny_bench / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert not list(tiny_bench.glob(".*"))  # no temp files left by the atomic writes


def test_ort_is_listed_with_a_reason_for_full_random():
    (status,) = backend_statuses(["ort"], full_random=True, device=torch.device("cpu"))
    assert not status.available and status.reason


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="torch-compile"):
        backend_statuses(["tensorflow"], full_random=False, device=torch.device("cpu"))


def test_full_random_run_stage_is_unavailable_without_building_anything(tmp_path: Path):
    config = BenchConfig(model="full-random", backends=("torch",), shapes=(Shape(512, 512, 24),), stages=("run",))
    results = run_bench(config, tmp_path)
    (row,) = results.measurements
    assert row.status == "unavailable" and "checkpoint" in row.reason
    assert row.tokens == 6 * 32 * 32


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"repeat": 0}, "repeat"),
        ({"stages": ("denoise", "train")}, "stages"),
        ({"dtype": "int8"}, "dtype"),
        ({"shapes": (Shape(60, 64, 8),)}, "multiples of 16"),
        ({"shapes": (Shape(64, 64, 12),)}, "frames"),
        ({"stages": ("block",), "block_tokens": 100}, "block_tokens"),
    ],
)
def test_bad_configs_are_rejected(changes, match, tmp_path: Path, tiny_dir: Path):
    base = {"model": "tiny", "shapes": (Shape(64, 64, 8),)}
    with pytest.raises(ValueError, match=match):
        run_bench(BenchConfig(**{**base, **changes}), tmp_path)


def test_parse_shapes():
    assert parse_shapes("512,768", "24,120", None) == (
        Shape(512, 512, 24), Shape(512, 512, 120), Shape(768, 768, 24), Shape(768, 768, 120),
    )  # fmt: skip
    assert parse_shapes("512", "8", "64x96") == (Shape(64, 96, 8),)
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_shapes(None, "8", "64x96x2")


def test_compiled_blocks_restore_the_model_on_close():
    model = tiny_transformer()
    wrapped = wrap_denoiser(FAST_PATHS["torch-compile"], BlockRunner(model, "cpu", torch.float32), "cpu", torch.float32)
    assert isinstance(wrapped, CompiledBlocks)
    assert all("forward" in vars(block) for block in model.blocks)  # compiled lazily, on the first call
    wrapped.close()
    assert not any("forward" in vars(block) for block in model.blocks)


def test_cli_bench_denoise_only(tmp_path: Path, tiny_dir: Path):
    result = CliRunner().invoke(
        main,
        ["bench", "--model", "tiny", "--size", "64x64", "--frames", "8", "--stages", "denoise",
         "--warmup", "0", "--repeat", "1", "--out", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1/1 measurements ok" in result.output
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.png").is_file()


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "tools" / "gpu_check.sh")], check=True)


def test_dtypes_match_runtime_loading():
    from ruyi_trt.runtime.loading import DTYPES
    from ruyi_trt.tools import bench_models

    assert bench_models.DTYPES == DTYPES


def test_full_random_path_with_tiny_stand_ins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The full-random code path (models built once, shared by backends, fast paths undone) with the tiny
    configs standing in for the full ones, which would not fit a CPU test."""
    from ruyi_trt.models import presets
    from ruyi_trt.models.transformer import TransformerConfig
    from ruyi_trt.models.vae_config import VAEConfig

    built = []

    def tiny_model(device, dtype):
        built.append("transformer")
        return tiny_transformer().to(device, dtype)

    tiny_configs = TransformerConfig.tiny(), VAEConfig.tiny()
    monkeypatch.setattr(TransformerConfig, "full", classmethod(lambda cls: tiny_configs[0]))
    monkeypatch.setattr(VAEConfig, "full", classmethod(lambda cls: tiny_configs[1]))
    monkeypatch.setattr(presets, "full_random_transformer", tiny_model)
    monkeypatch.setattr(presets, "full_random_vae", lambda device, dtype: presets.tiny_vae().to(device, dtype))
    config = BenchConfig(
        model="full-random", backends=("torch", "torch-sdpa-math", "ort"), shapes=(Shape(64, 64, 8),),
        stages=("vae_encode", "denoise", "vae_decode", "run"), warmup=0, repeat=1,
    )  # fmt: skip
    results = run_bench(config, tmp_path)
    status = {(m.backend, m.stage): m.status for m in results.measurements}
    assert built == ["transformer"]
    for backend in ("torch", "torch-sdpa-math"):
        assert [status[(backend, s)] for s in config.stages] == ["ok", "ok", "ok", "unavailable"]
    assert not any(m.backend == "ort" for m in results.measurements)
    assert any("full-random" in note for note in results.notes)
