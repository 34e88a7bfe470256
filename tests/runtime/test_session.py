"""PipelineCache: one pipeline at a time, reused until the spec or (auto with a budget) the planned video changes."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from ruyi_trt.runtime import session
from ruyi_trt.runtime.loading import RuntimeOptions
from ruyi_trt.runtime.memory.plan import MemoryPlan
from ruyi_trt.runtime.request import VideoRequest
from ruyi_trt.runtime.session import PipelineCache, PipelineSpec, plan_key
from ruyi_trt.testing import gradient_image


def request(**overrides) -> VideoRequest:
    return VideoRequest(**{"start_images": [gradient_image(96, 64)], "frames": 8, "size": (64, 96), **overrides})


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace loading with stand-in pipelines; the list records (spec, plan, closed-flag holder) per load."""
    made: list = []

    def fake_load(spec: PipelineSpec, plan=None):
        closed = types.SimpleNamespace(value=False)
        pipeline = types.SimpleNamespace(components=types.SimpleNamespace(close=lambda: setattr(closed, "value", True)))
        made.append((spec, plan, closed))
        return pipeline

    monkeypatch.setattr(session, "load_spec", fake_load)
    return made


def test_reuses_until_the_spec_changes_and_closes_the_old_one(tiny_dir: Path, loads: list) -> None:
    cache = PipelineCache()
    spec = PipelineSpec(str(tiny_dir), RuntimeOptions())
    first = cache.get(spec, request())
    assert cache.get(spec, request(size=(32, 48), steps=3)) is first  # full_gpu: no plan depends on the video
    assert len(loads) == 1
    other = PipelineSpec(str(tiny_dir), RuntimeOptions(teacache_threshold=0.1))
    assert cache.get(other, request()) is not first
    assert loads[0][2].value and len(loads) == 2
    cache.clear()
    assert loads[1][2].value


def test_auto_with_a_budget_plans_per_video(tiny_dir: Path, loads: list) -> None:
    cache = PipelineCache()
    spec = PipelineSpec(str(tiny_dir), RuntimeOptions(memory_mode="auto", vram_budget_gb=8))
    first = cache.get(spec, request())
    assert isinstance(loads[0][1], MemoryPlan) and loads[0][1].request.height == 64
    assert cache.get(spec, request(steps=5)) is first
    cache.get(spec, request(size=(32, 48)))
    assert len(loads) == 2 and loads[0][2].value and loads[1][1].request.height == 32


def test_plan_key_only_depends_on_the_video_when_a_plan_does(tiny_dir: Path) -> None:
    def key(**options) -> tuple | None:
        return plan_key(PipelineSpec(str(tiny_dir), RuntimeOptions(**options)), request())

    assert key() is None and key(memory_mode="auto") is None  # CPU without a budget: no plan
    assert key(memory_mode="auto", vram_budget_gb=8) == ((64, 96), 8, True)
    assert key(memory_mode="auto", vram_budget_gb=8, backend="ort") is None
