"""TeaCache and Enhance-A-Video count transformer calls against the number of steps, as the original does.

The original initialises both with `steps` (predict_i2v.py:267,270): TeaCache's counter starts over (with a
clean cache) after `steps` calls (transformer3d.py:1055-1059), and Enhance-A-Video is on for calls
skip_start <= c < steps - skip_end (transformer3d.py:1147). With PNDM, which makes 34 calls for 25 steps, a
counter over calls gives other videos.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ruyi_trt.models.presets import random_denoiser_inputs, tiny_transformer
from ruyi_trt.models.scheduler import load_scheduler, timesteps_for
from ruyi_trt.runtime.backends.block_runner import BlockRunner, EnhanceAVideoSettings, TeaCacheSettings
from ruyi_trt.runtime.loading import RuntimeOptions
from ruyi_trt.runtime.pipeline import load_pipeline
from ruyi_trt.runtime.request import VideoRequest
from ruyi_trt.testing import gradient_image

STEPS = 8  # PNDM: 17 calls


def pndm_calls(steps: int) -> int:
    return len(timesteps_for(load_scheduler("PNDM", {"num_train_timesteps": 1000, "steps_offset": 1}), steps))


def original_teacache_computes(num_steps: int, num_calls: int, start: int, end: int) -> list[bool]:
    """The original's TeaCacheParameters.update, call by call, for inputs that never change (every call it
    compares against the previous one is below the threshold): True where the blocks are computed."""
    count, computed = 0, []
    for _ in range(num_calls):
        computed.append(not (start - 1 < count < num_steps - end))
        count += 1
        if count == num_steps:
            count = 0
    return computed


def test_pndm_makes_more_calls_than_steps() -> None:
    assert pndm_calls(25) == 34 and pndm_calls(STEPS) == 17


def test_teacache_counts_steps_and_starts_over_under_pndm() -> None:
    calls = pndm_calls(STEPS)
    model = tiny_transformer(seed=0).to(torch.bfloat16)
    runner = BlockRunner(model, "cpu", torch.bfloat16, teacache=TeaCacheSettings(0.1, 3, 1, offload_cpu=True))
    runner.start(calls, STEPS)
    inputs = random_denoiser_inputs(model.config, batch=2, frames=2, height=2, width=4)
    computed, residuals = [], []
    for _ in range(calls):
        skipped = runner.skipped_calls
        runner(**inputs)
        computed.append(runner.skipped_calls == skipped)
        residuals.append(runner._state.residual)
    expected = original_teacache_computes(STEPS, calls, 3, 1)
    assert computed == expected
    assert [i for i, c in enumerate(computed) if c] == [0, 1, 2, 7, 8, 9, 10, 15, 16]  # over calls: 0, 1, 2, 16
    assert residuals[1] is None and residuals[8] is None  # none before call 2, and a clean cache after 8 calls
    residual = residuals[2]  # norm_out's float32 output minus the block input, kept on the host (offload_cpu)
    assert residual.dtype == torch.float32 and residual.device.type == "cpu"


def test_enhance_a_video_counts_steps_under_pndm() -> None:
    calls = pndm_calls(STEPS)
    model = tiny_transformer(seed=0)
    inputs = random_denoiser_inputs(model.config, batch=2, frames=2, height=2, width=4)
    plain = BlockRunner(model, "cpu", torch.float32)
    rule = EnhanceAVideoSettings(weight=2.0, skip_start_steps=2, skip_end_steps=3)  # calls 2, 3, 4 of 8 steps
    enhanced = BlockRunner(model, "cpu", torch.float32, enhance_a_video=rule)
    reference = plain(**inputs)
    enhanced.start(calls, STEPS)
    changed = [not torch.equal(enhanced(**inputs), reference) for _ in range(calls)]
    assert [i for i, c in enumerate(changed) if c] == list(range(2, STEPS - 3))  # calls 2..21, none after


def test_the_pipeline_starts_the_denoiser_with_calls_and_steps(tiny_dir: Path) -> None:
    pipe = load_pipeline(tiny_dir, RuntimeOptions(teacache_threshold=0.1))
    started = []
    denoiser = pipe.components.denoiser
    original_start = denoiser.start
    denoiser.start = lambda num_calls, num_steps=None: started.append((num_calls, num_steps)) or original_start(
        num_calls, num_steps
    )
    request = VideoRequest([gradient_image(48, 32)], frames=1, size=(32, 48), steps=4, scheduler="PNDM", seed=3)
    pipe.run(request, progress=False)
    assert started == [(pndm_calls(4), 4)] and pndm_calls(4) == 13
