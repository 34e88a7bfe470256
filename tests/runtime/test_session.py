"""Loading and reloading: RuyiPipeline loads once and reloads only when the planned video changes (auto with a
budget); PipelineCache keeps one pipeline per spec and unloads the old one."""

from __future__ import annotations

import types
from dataclasses import replace
from pathlib import Path

import pytest

from ruyi_trt.runtime import pipeline as pipeline_module
from ruyi_trt.runtime.backends.block_runner import EnhanceAVideoSettings, TeaCacheSettings
from ruyi_trt.runtime.loading import RuntimeOptions, plan_depends_on_video
from ruyi_trt.runtime.memory.plan import MemoryPlan
from ruyi_trt.runtime.request import VideoRequest
from ruyi_trt.runtime.session import PipelineCache, PipelineSpec
from ruyi_trt.testing import gradient_image


def request(**overrides) -> VideoRequest:
    return VideoRequest(**{"start_images": [gradient_image(96, 64)], "frames": 8, "size": (64, 96), **overrides})


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace component loading with stand-ins; the list records (plan, closed-flag holder) per load."""
    made: list = []

    def fake_load(checkpoint, options, plan=None, progress=None):
        closed = types.SimpleNamespace(value=False)
        made.append((plan, closed))
        return types.SimpleNamespace(close=lambda: setattr(closed, "value", True))

    monkeypatch.setattr(pipeline_module, "load_components", fake_load)
    return made


def test_reuses_until_the_spec_changes_and_unloads_the_old_one(tiny_dir: Path, loads: list) -> None:
    cache = PipelineCache()
    spec = PipelineSpec(str(tiny_dir), RuntimeOptions())
    first = cache.get(spec)
    first.load(request())
    assert cache.get(spec) is first
    first.load(request(size=(32, 48), steps=3))  # full_gpu: no plan depends on the video
    assert len(loads) == 1
    other = PipelineSpec(str(tiny_dir), RuntimeOptions(teacache_threshold=0.1))
    second = cache.get(other)
    assert second is not first and loads[0][1].value
    second.load(request())
    cache.clear()
    assert len(loads) == 2 and loads[1][1].value


def test_auto_with_a_budget_plans_per_video(tiny_dir: Path, loads: list) -> None:
    pipe = pipeline_module.RuyiPipeline.from_pretrained(tiny_dir, device="cpu", memory_mode="auto", vram_budget=8)
    assert not loads  # the plan depends on the video: nothing loads before the first request
    pipe.load(request())
    assert isinstance(loads[0][0], MemoryPlan) and loads[0][0].request.height == 64
    pipe.load(request(steps=5))
    assert len(loads) == 1
    pipe.load(request(size=(32, 48)))
    assert len(loads) == 2 and loads[0][1].value and loads[1][0].request.height == 32


def test_fixed_modes_load_in_from_pretrained(tiny_dir: Path, loads: list) -> None:
    pipe = pipeline_module.RuyiPipeline.from_pretrained(tiny_dir, device="cpu", memory_mode="full_gpu")
    assert len(loads) == 1 and loads[0][0] is None and pipe.is_loaded
    pipe.unload()
    assert loads[0][1].value and not pipe.is_loaded


def test_the_plan_only_depends_on_the_video_when_a_plan_applies() -> None:
    assert not plan_depends_on_video(RuntimeOptions()) and not plan_depends_on_video(RuntimeOptions(memory_mode="auto"))
    assert plan_depends_on_video(RuntimeOptions(memory_mode="auto", vram_budget_gb=8))
    assert not plan_depends_on_video(RuntimeOptions(memory_mode="auto", vram_budget_gb=8, backend="ort"))


def test_one_run_reads_each_config_file_once(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoint's five config files (transformer, vae, CLIP + its preprocessor, scheduler) are read once, by
    `Checkpoint`, for loading and a whole run; nothing below it reads them again."""
    import sys

    from ruyi_trt.models import checkpoint_io

    original, calls = checkpoint_io.read_config, []

    def counting(folder, name=checkpoint_io.CONFIG_NAME):
        calls.append(f"{Path(folder).name}/{name}")
        return original(folder, name)

    for module in list(sys.modules.values()):
        if getattr(module, "read_config", None) is original:
            monkeypatch.setattr(module, "read_config", counting)
    pipe = pipeline_module.RuyiPipeline.from_pretrained(tiny_dir, device="cpu", memory_mode="full_gpu")
    pipe(gradient_image(96, 64), frames=8, size=(64, 96), steps=1, progress=False)
    assert sorted(calls) == ["image_encoder/config.json", "image_encoder/preprocessor_config.json",
                             "scheduler/scheduler_config.json", "transformer/config.json", "vae/config.json"]


def test_per_step_settings_keep_the_loaded_pipeline(tiny_dir: Path) -> None:
    cache = PipelineCache()
    spec = PipelineSpec(str(tiny_dir), RuntimeOptions(teacache_threshold=0.1))
    pipe = cache.get(spec)
    pipe.load()
    retuned = PipelineSpec(spec.model, replace(spec.options, teacache_threshold=0.3, teacache_skip_start=2,
                                               teacache_skip_end=2, enhance_a_video=2.0,
                                               enhance_a_video_skip_start=1, enhance_a_video_skip_end=0))  # fmt: skip
    assert cache.get(retuned) is pipe and pipe.is_loaded and pipe.options == retuned.options
    assert pipe.components.denoiser.teacache == TeaCacheSettings(0.3, 2, 2)
    assert pipe.components.denoiser.enhance_a_video == EnhanceAVideoSettings(2.0, 1, 0)
    teacache_off = PipelineSpec(spec.model, replace(retuned.options, teacache_threshold=None))
    unloaded = cache.get(teacache_off)
    assert unloaded is not pipe and not pipe.is_loaded  # the memory plan counts TeaCache: a new pipeline
    assert cache.get(PipelineSpec(spec.model, replace(teacache_off.options, dtype="bf16"))) is not unloaded
