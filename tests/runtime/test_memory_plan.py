"""The memory planner: weight inventory, monotone predictions, budget-respecting choices and `run --plan-only`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ruyi_trt.cli import main
from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.runtime.memory.model import ClipSpec, GiB, transformer_weights
from ruyi_trt.runtime.memory.plan import MemoryPlanError, PlanRequest, plan_memory, skip_residency, usable_budget
from ruyi_trt.weights.fp8_storage import FP8_MODES, store_weights_fp8, weight_bytes

FULL = (TransformerConfig.full(), VAEConfig.full(), ClipSpec())
EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "example.png"  # 672x384 (16:9)


def plan(height: int = 576, width: int = 1008, frames: int = 120, **kwargs):
    return plan_memory(*FULL, PlanRequest(height, width, frames, **kwargs))


@pytest.mark.parametrize("mode", FP8_MODES)
def test_weight_inventory_matches_the_model(mode: str) -> None:
    model = tiny_transformer().to(torch.bfloat16)
    store_weights_fp8(model, mode, model.config.hidden_size)
    predicted = transformer_weights(model.config, 2, mode)
    assert predicted.total == weight_bytes(model)
    assert predicted.plain_block == weight_bytes(model.blocks[0])
    assert predicted.skip_block == weight_bytes(model.blocks[-1])


def test_full_model_weights_match_the_architecture_doc() -> None:
    weights = transformer_weights(TransformerConfig.full(), 2)
    assert weights.total / 1e9 == pytest.approx(14.4, abs=0.15)  # 7.19e9 bf16 parameters (+ the pe tables)


def test_predictions_grow_with_frames_and_resolution() -> None:
    peaks = [plan(frames=f, memory_mode="normal").stages["denoise"] for f in (24, 48, 72, 120)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    sizes = [(384, 672), (512, 512), (576, 1008), (768, 768)]
    peaks = [plan(h, w, memory_mode="normal").stages["denoise"] for h, w in sizes]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    decode = [plan(h, w, memory_mode="normal").stages["vae decode"] for h, w in sizes]
    assert decode == sorted(decode)


def test_fp8_lowers_only_the_weights() -> None:
    plans = {mode: plan(memory_mode="full_gpu", fp8=mode) for mode in FP8_MODES}
    weights = [plans[m].denoise_breakdown["weights (non-block + resident blocks)"] for m in FP8_MODES]
    assert weights == sorted(weights, reverse=True) and len(set(weights)) == 4
    activations = {plans[m].denoise_activation_bytes for m in FP8_MODES}
    assert len(activations) == 1


@pytest.mark.parametrize("budget_gib", [16, 24, 40, 80])
@pytest.mark.parametrize("size", [(384, 672), (576, 1008), (768, 768)])
def test_auto_plan_respects_the_budget(budget_gib: int, size: tuple[int, int]) -> None:
    chosen = plan(*size, budget_bytes=budget_gib * GiB)
    assert chosen.fits and chosen.peak_bytes <= usable_budget(budget_gib * GiB)
    hidden = 2 * chosen.tokens * TransformerConfig.full().inner_dim * 2  # the CFG batch's bf16 hidden state
    assert chosen.trt_block_loop_bytes == (2 + skip_residency(TransformerConfig.full().skip_sources, 0)[0]) * hidden


def test_768_120_on_24_gib_streams_or_offloads() -> None:
    chosen = plan(budget_bytes=24 * GiB)
    s = chosen.settings
    assert chosen.fits
    assert chosen.streamed_blocks > 0 or s.skip_offload_group > 0
    everything = plan(memory_mode="full_gpu", budget_bytes=24 * GiB)
    assert everything.fits is False  # the reference's 80 GB path would not fit


def test_roomy_budget_keeps_everything_resident() -> None:
    chosen = plan(384, 672, budget_bytes=140 * GiB)
    assert chosen.streamed_blocks == 0 and not chosen.settings.offload_models
    assert chosen.settings.skip_offload_group == 0 and not chosen.settings.cfg_split


def test_impossible_budget_says_what_to_reduce() -> None:
    with pytest.raises(MemoryPlanError, match="--frames|--resolution"):
        plan(768, 768, budget_bytes=6 * GiB)


def test_explicit_modes_and_offload_steps() -> None:
    low = plan(memory_mode="low_gpu", offload_steps=1, budget_bytes=24 * GiB)
    assert low.settings.resident_blocks == 0 and low.settings.skip_offload_group == 1
    assert low.skips_on_device <= 2
    full = plan(memory_mode="full_gpu")
    assert full.fits is None and not full.settings.offload_models
    pinned = plan(budget_bytes=24 * GiB, offload_steps=5)
    assert pinned.settings.skip_offload_group == 5
    with pytest.raises(ValueError, match="--vram-budget"):
        plan()


def test_skip_residency_follows_the_runner_policy() -> None:
    sources = TransformerConfig.full().skip_sources
    assert skip_residency(sources, 0) == (19, 0)
    assert skip_residency(sources, 1) == (1, 19)
    peak, sent = skip_residency(sources, 5)
    assert peak == 5 and sent == 15  # 19 = 3 groups of 5 sent + 4 kept


def test_cli_plan_only_full_random() -> None:
    args = ["run", "--plan-only", "--model", "full-random", "--resolution", "768", "--frames", "120",
            "--image", str(EXAMPLE)]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--vram-budget", "24"])
    assert result.exit_code == 0, result.output
    assert "Memory plan (auto) for 576x1008, 120 frames" in result.output
    assert "- fits" in result.output and "TensorRT: the per-block loop keeps" in result.output
    no_gpu = CliRunner().invoke(main, args)
    assert no_gpu.exit_code != 0 and "--vram-budget" in no_gpu.output


def test_cli_prints_the_plan_before_a_tiny_run(tmp_path: Path, start_png: Path) -> None:
    out = tmp_path / "video.mp4"
    args = ["run", "--model", "tiny", "--image", str(start_png), "--frames", "8", "--size", "64x96",
            "--steps", "1", "--vram-budget", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.index("Memory plan") < result.output.index("wrote")
    assert out.is_file()
