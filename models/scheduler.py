"""Noise schedulers: diffusers' classes, chosen by the reference's names and built from one saved config.

The reference loads whichever scheduler the user names from the checkpoint's `scheduler/scheduler_config.json`
(`<Class>.from_pretrained(folder, subfolder="scheduler")`), so every class reads the DDIM config and keeps its own
defaults for keys it does not have. We do the same with diffusers' own implementations (no rewrites):

    DDIM     DDIMScheduler                      25 steps -> 961, 921, ..., 1
    Euler    EulerDiscreteScheduler             float timesteps, init_noise_sigma = sqrt(sigma_0^2 + 1)
    Euler A  EulerAncestralDiscreteScheduler    same timesteps as Euler
    DPM++    DPMSolverMultistepScheduler        25 steps -> 951, 913, ..., 39
    PNDM     PNDMScheduler                      25 steps -> 34 timesteps (Runge-Kutta warm-up)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .checkpoint_io import CheckpointError, read_config

log = logging.getLogger(__name__)

SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "DDIM": DDIMScheduler,
    "Euler": EulerDiscreteScheduler,
    "Euler A": EulerAncestralDiscreteScheduler,
    "DPM++": DPMSolverMultistepScheduler,
    "PNDM": PNDMScheduler,
}
DEFAULT_SCHEDULER = "DDIM"
SCHEDULER_FOLDER = "scheduler"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"


def default_scheduler_config() -> dict[str, Any]:
    """The reference `config/default.yaml` `noise_scheduler_kwargs` (DDIM); every other key is a class default.

    Note beta_end 0.03 (Stable Diffusion uses 0.012) and v-prediction.
    """
    return {
        "beta_start": 0.00085,
        "beta_end": 0.03,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "prediction_type": "v_prediction",
        "clip_sample": False,
    }


def _read_scheduler_config(source: str | Path) -> dict[str, Any]:
    """The config dict from a checkpoint folder, a scheduler folder or a scheduler_config.json file."""
    path = Path(source)
    if path.is_file():
        return read_config(path.parent, path.name)
    if (path / SCHEDULER_FOLDER / SCHEDULER_CONFIG_NAME).is_file():
        return read_config(path / SCHEDULER_FOLDER, SCHEDULER_CONFIG_NAME)
    return read_config(path, SCHEDULER_CONFIG_NAME)


def load_scheduler(name: str, folder_or_config: str | Path | Mapping[str, Any]) -> SchedulerMixin:
    """Build scheduler `name` (DDIM, Euler, Euler A, DPM++ or PNDM) from a saved scheduler config.

    `folder_or_config` is a checkpoint folder (reads `scheduler/scheduler_config.json`, like the reference's
    `from_pretrained(folder, subfolder="scheduler")`), a scheduler folder, a JSON file, or the config dict itself.
    Keys the class does not know are ignored; keys listed in `_use_default_values` take the class's defaults, as
    diffusers does.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(repr(n) for n in SCHEDULERS)}, got {name!r}")
    if isinstance(folder_or_config, Mapping):
        config = dict(folder_or_config)
    else:
        config = _read_scheduler_config(folder_or_config)
    cls = SCHEDULERS[name]
    try:
        scheduler = cls.from_config(config)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"the scheduler config cannot build {cls.__name__}: {exc}") from exc
    log.debug("scheduler %s built from config %s", cls.__name__, config)
    return scheduler


def timesteps_for(scheduler: SchedulerMixin, n_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Set `n_steps` inference steps and return the timesteps the pipeline loops over (strength 1.0).

    This is the pipeline's `set_timesteps` + `get_timesteps(n_steps, strength=1.0)`: all of
    `scheduler.timesteps`, whose length can exceed `n_steps` (PNDM runs 34 model calls for 25 steps).
    """
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    scheduler.set_timesteps(n_steps, device=device)
    strength = 1.0
    init_timestep = min(int(n_steps * strength), n_steps)
    t_start = max(n_steps - init_timestep, 0)
    return scheduler.timesteps[t_start * scheduler.order :]
