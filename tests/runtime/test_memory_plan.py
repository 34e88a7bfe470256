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
from ruyi_trt.runtime.memory.plan import MemoryPlanError, PlanRequest, plan_memory, usable_budget
from ruyi_trt.weights.fp8_storage import FP8_MODES, store_weights_fp8, weight_bytes

FULL = (TransformerConfig.full(), VAEConfig.full(), ClipSpec())
EXAMPLE = Path(__file__).resolve().parents[2] / "assets" / "example.png"  # 672x384 (16:9)


def plan(height: int = 576, width: int = 1008, frames: int = 120, **kwargs):
    kwargs.setdefault("host_ram_bytes", 64 * GiB)  # a typical desktop for a 24 GB card; not this machine's RAM
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
    expected_trt = usable_budget(budget_gib * GiB) - chosen.denoise_activation_bytes
    assert chosen.trt_weight_streaming_budget_bytes == expected_trt


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


def test_12_gib_plan_for_768_x_120_is_chosen_automatically() -> None:
    """Skips on the host, streamed blocks and the CFG split; with a 24 GiB host the page-locked blocks and skips
    no longer fit the RAM in bf16, and --fp8 auto adds fp8 storage (one chunk of the VAE still fits untiled in
    12 GiB: tiling starts below that, see the next test)."""
    for size in ((576, 1008), (768, 768)):
        roomy = plan(*size, budget_bytes=12 * GiB, fp8="auto")  # a 64 GiB host
        s = roomy.settings
        assert roomy.fits and s.fp8 == "none"
        assert s.offload_models and s.skip_offload_group > 0 and roomy.streamed_blocks > 0 and s.cfg_split
        small_host = plan(*size, budget_bytes=12 * GiB, fp8="auto", host_ram_bytes=24 * GiB)
        assert small_host.fits and small_host.settings.fp8 in ("lite", "strong")
        assert "fp8" in " ".join(small_host.notes)
    with pytest.raises(MemoryPlanError, match="host memory"):
        plan(768, 768, budget_bytes=12 * GiB, fp8="none", host_ram_bytes=24 * GiB)


def test_24_gib_plan_needs_no_fp8_and_stays_near_full_speed() -> None:
    chosen = plan(768, 768, budget_bytes=24 * GiB, fp8="auto")
    assert chosen.fits and chosen.settings.fp8 == "none" and chosen.step_time_ratio < 1.1


def test_vae_tiling_only_when_a_chunk_does_not_fit() -> None:
    assert plan(384, 672, budget_bytes=80 * GiB).settings.vae_tile is None
    tiled = plan(768, 768, budget_bytes=10 * GiB, fp8="auto")
    assert tiled.settings.vae_tile is not None and "VAE tiles" in " ".join(tiled.notes)
    untiled = plan_memory(*FULL, PlanRequest(768, 768, 120, memory_mode="normal", host_ram_bytes=64 * GiB))
    assert untiled.settings.vae_tile is None
    assert tiled.stages["vae decode"] < untiled.stages["vae decode"] / 1.5


def test_host_memory_model_and_refusals() -> None:
    low = plan(memory_mode="low_gpu", offload_steps=1, budget_bytes=24 * GiB)
    weights = transformer_weights(TransformerConfig.full(), 2)
    assert low.host_bytes["pinned streamed blocks"] >= weights.total - weights.other  # every block, page-rounded
    assert low.host_bytes["pinned streamed blocks"] < (weights.total - weights.other) * 1.001  # no 2^k rounding
    assert low.host_pinned_bytes == low.host_bytes["pinned streamed blocks"] + low.host_bytes["pinned long skips"]
    with pytest.raises(MemoryPlanError, match="host memory.*(--fp8 lite|--vram-budget)"):
        plan(memory_mode="low_gpu", offload_steps=1, budget_bytes=24 * GiB, host_ram_bytes=16 * GiB)
    with pytest.raises(MemoryPlanError, match="more RAM"):  # auto: no plan fits both the card and the host
        plan(768, 768, budget_bytes=12 * GiB, fp8="auto", host_ram_bytes=12 * GiB)
    roomy = plan(768, 768, budget_bytes=12 * GiB, fp8="auto", host_ram_bytes=128 * GiB)
    assert roomy.host_fits and roomy.host_total_bytes <= roomy.host_limit_bytes


def test_streamer_host_buffers_match_the_plan() -> None:
    """The planner's page-locked bytes for streamed blocks bound what BlockStreamer allocates (tiny) from above,
    by less than the tensors' 256-byte alignment and the page rounding."""
    from ruyi_trt.runtime.memory.streaming import BlockStreamer

    model = tiny_transformer().to(torch.bfloat16)
    tiny = plan_memory(TransformerConfig.tiny(), VAEConfig.tiny(), ClipSpec(), PlanRequest(
        64, 96, 16, memory_mode="low_gpu", host_ram_bytes=64 * GiB))  # fmt: skip
    streamer = BlockStreamer(model.blocks, "cpu", resident_blocks=0)
    blocks = len(streamer.streamed)
    slack = tiny.host_bytes["pinned streamed blocks"] - streamer.host_bytes
    assert 0 <= slack < blocks * (4096 + 256 * 80)


def test_cli_plan_only_full_random() -> None:
    args = ["run", "--plan-only", "--model", "full-random", "--resolution", "768", "--frames", "120",
            "--image", str(EXAMPLE)]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--vram-budget", "24"])
    assert result.exit_code == 0, result.output
    assert "Memory plan (auto) for 576x1008, 120 frames" in result.output
    assert "- fits" in result.output and "TensorRT weight-streaming budget" in result.output
    no_gpu = CliRunner().invoke(main, args)
    assert no_gpu.exit_code != 0 and "--vram-budget" in no_gpu.output


def test_cli_plan_only_needs_a_size_not_an_image() -> None:
    args = ["run", "--plan-only", "--model", "full-random", "--size", "768x768", "--frames", "120", "--vram-budget", "24"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Memory plan (auto) for 768x768, 120 frames" in result.output
    neither = CliRunner().invoke(main, ["run", "--plan-only", "--model", "full-random", "--vram-budget", "24"])
    assert neither.exit_code != 0 and "--size" in neither.output


def test_cli_prints_the_plan_before_a_tiny_run(tmp_path: Path, start_png: Path) -> None:
    out = tmp_path / "video.mp4"
    args = ["run", "--model", "tiny", "--image", str(start_png), "--frames", "8", "--size", "64x96",
            "--steps", "1", "--vram-budget", "2", "--out", str(out), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.index("Memory plan") < result.output.index("wrote")
    assert out.is_file()
