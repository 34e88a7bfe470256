"""Scheduler selection and timesteps (models/scheduler.py) against the reference's diffusers runs.

Golden: scheduler_config.json + scheduler.safetensors (DDIM schedule and eta-0 trajectory; float32, compared with
atol 1e-6 scaled by max(1, |expected|)); preprocess.json + preprocess.safetensors `sched.*` (timesteps and sigmas exact
with the stored dtype; init_noise_sigma within 1e-6 relative).
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from ruyi_trt.models.checkpoint_io import CheckpointError
from ruyi_trt.models.scheduler import SCHEDULERS, default_scheduler_config, load_scheduler, timesteps_for
from ruyi_trt.testing import assert_close_scaled


@pytest.fixture(scope="module")
def ddim_golden(golden_dir):
    meta = json.loads((golden_dir / "scheduler_config.json").read_text())
    return meta, load_file(str(golden_dir / "scheduler.safetensors"))


def test_golden_ddim_schedule_and_trajectory(ddim_golden):
    meta, tensors = ddim_golden
    scheduler = load_scheduler("DDIM", meta["config"])
    timesteps = timesteps_for(scheduler, meta["num_inference_steps"])
    assert timesteps.dtype == tensors["timesteps"].dtype and torch.equal(timesteps, tensors["timesteps"])
    assert_close_scaled(scheduler.alphas_cumprod, tensors["alphas_cumprod"], 1e-6, "alphas_cumprod")
    assert_close_scaled(scheduler.betas, tensors["betas"], 1e-6, "betas")
    assert float(scheduler.init_noise_sigma) == 1.0

    checked = {int(m.group(1)) for k in tensors if (m := re.fullmatch(r"traj\.prev_sample_(\d+)", k))}
    assert checked
    sample = tensors["traj.sample_0"]
    for i, t in enumerate(timesteps):
        assert torch.equal(scheduler.scale_model_input(sample, t), sample)
        out = scheduler.step(tensors[f"traj.model_output_{i}"], t, sample, eta=meta["eta"])
        sample = out.prev_sample
        if i in checked:
            assert_close_scaled(sample, tensors[f"traj.prev_sample_{i}"], 1e-6, f"prev_sample_{i}")
            assert_close_scaled(out.pred_original_sample, tensors[f"traj.pred_original_sample_{i}"], 1e-6, f"x0_{i}")
    assert_close_scaled(sample, tensors["traj.final_sample"], 1e-6, "final_sample")


def test_golden_default_config_matches_constructor(ddim_golden):
    meta, tensors = ddim_golden
    assert default_scheduler_config() == meta["constructor_kwargs"]
    scheduler = load_scheduler("DDIM", default_scheduler_config())
    assert torch.equal(timesteps_for(scheduler, meta["num_inference_steps"]), tensors["timesteps"])


def test_golden_all_schedulers(golden_dir, tmp_path):
    """Each scheduler loaded from the saved DDIM config in a checkpoint-like folder, as predict_i2v.py does."""
    meta = json.loads((golden_dir / "preprocess.json").read_text())["schedulers"]
    tensors = load_file(str(golden_dir / "preprocess.safetensors"))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(meta["saved_config"]))
    assert set(meta["schedulers"]) == set(SCHEDULERS)
    for name, info in meta["schedulers"].items():
        for steps, expected in info["steps"].items():
            scheduler = load_scheduler(name, tmp_path)
            assert type(scheduler).__name__ == info["class_name"] and scheduler.order == info["order"]
            timesteps = timesteps_for(scheduler, int(steps))
            key = f"sched.{info['key']}.{steps}"
            want = tensors[f"{key}.timesteps"]
            assert len(timesteps) == expected["len"], key
            assert timesteps.dtype == want.dtype and torch.equal(timesteps, want), key
            if f"{key}.sigmas" in tensors:
                # float32 sigmas come from float64 numpy math: numpy releases differ by one float32 ulp (2.2.6, which
                # made the golden files, vs 2.4); allow 2 ulps, no absolute slack
                torch.testing.assert_close(scheduler.sigmas, tensors[f"{key}.sigmas"], rtol=2.4e-7, atol=0, msg=key)
            sigma = float(scheduler.init_noise_sigma)
            assert abs(sigma - expected["init_noise_sigma"]) <= 1e-6 * max(1.0, expected["init_noise_sigma"]), key


def test_config_sources(tmp_path):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(default_scheduler_config()))
    for source in (tmp_path, folder, folder / "scheduler_config.json", str(tmp_path)):
        assert load_scheduler("Euler A", source).config.beta_end == 0.03


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="'DDIM', 'Euler', 'Euler A', 'DPM\\+\\+', 'PNDM'"):
        load_scheduler("LMS", default_scheduler_config())
    with pytest.raises(CheckpointError):
        load_scheduler("DDIM", tmp_path / "missing")
    (tmp_path / "scheduler_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_scheduler("DDIM", tmp_path)
    with pytest.raises(ValueError, match="n_steps"):
        timesteps_for(load_scheduler("DDIM", default_scheduler_config()), 0)
