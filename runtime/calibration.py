"""`ruyi-trt calibrate`: run the torch pipeline over the calibration requests with ModelOpt's quantizers in the
transformer, and write the scales (calib/).

The calibration set (calib.store.CalibrationSettings): the start image (assets/example.png unless given) in the
aspect bucket of each base resolution (512 and 768), every camera / motion control embedding, every timestep
of a `steps`-step schedule, under classifier-free guidance (both the negative and the positive embedding).
The pipeline runs in fp32 on the CPU and bf16 on a GPU (the reference precision of each). Only the
transformer's inputs matter, so each distinct conditioning video is VAE-encoded once (it is the same for
every control of one size) and the video is not decoded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..calib.quantize import calibrate_module
from ..calib.scales import PRECISIONS
from ..calib.store import CalibrationSettings, cache_dir, read_record, versions, write_calibration
from ..files import file_lock
from ..models.checkpoint import Checkpoint
from .loading import RuntimeOptions, default_dtype
from .pipeline import load_pipeline
from .request import VideoRequest

log = logging.getLogger(__name__)

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "example.png"


class _EncodeOnce:
    """The VAE encoder backend, answering repeated inputs from a memo."""

    def __init__(self, encoder):
        self.encoder, self.memo = encoder, []

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        for known, moments in self.memo:
            if known.shape == video.shape and torch.equal(known, video):
                return moments
        moments = self.encoder(video=video)
        self.memo.append((video.clone(), moments))
        return moments

    def close(self) -> None:
        self.memo.clear()
        self.encoder.close()


class _NoDecode:
    """Stands in for the VAE decoder: calibration needs no video (one black frame keeps the pipeline's shapes)."""

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.zeros(latents.shape[0], 3, 1, 8, 8)

    def close(self) -> None:
        """Holds nothing."""


@dataclass(frozen=True)
class CalibrationResult:
    """Where a calibration was written, how many layers it covers and how long it took."""

    folder: Path
    layers: int
    seconds: float


def calibration_requests(settings: CalibrationSettings, image: Image.Image | None = None) -> list[VideoRequest]:
    """Every request of the calibration set (see the module docstring)."""
    settings.validate()
    image = image if image is not None else Image.open(EXAMPLE_IMAGE).convert("RGB")
    sizes = [(512, settings.size)] if settings.size else [(resolution, None) for resolution in settings.resolutions]
    requests = []
    for resolution, size in sizes:
        for index, (camera, motion) in enumerate(settings.controls()):
            requests.append(VideoRequest(
                start_images=[image], frames=settings.frames, resolution=resolution, size=size, camera=camera,
                motion=motion, steps=settings.steps, guidance_scale=settings.guidance_scale, seed=settings.seed + index,
                scheduler=settings.scheduler,
            ))  # fmt: skip
    return requests


def calibrate_checkpoint(model: str | Path | Checkpoint, precision: str, out: str | Path, settings: CalibrationSettings | None = None,
                         device: str | None = None, dtype: str | None = None,
                         image: Image.Image | None = None, progress: bool = True) -> CalibrationResult:  # fmt: skip
    """Calibrate the transformer of the checkpoint `model` for `precision`; writes `out/scales.safetensors` and
    `out/calibration.json` (calib/store.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision: {precision!r} is not supported; use one of {PRECISIONS}.")
    settings = settings or CalibrationSettings()
    settings.validate()
    checkpoint = Checkpoint.resolve(model, download=False)
    checkpoint_hash = checkpoint.weights_hash("transformer")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device, "torch")
    requests = calibration_requests(settings, image)
    started = time.perf_counter()
    pipeline = load_pipeline(checkpoint, RuntimeOptions(device=device, dtype=dtype))
    components = pipeline.components
    components.vae_encoder, components.vae_decoder = _EncodeOnce(components.vae_encoder), _NoDecode()
    try:
        transformer = pipeline.components.denoiser.model  # the BlockRunner's module: quantizers go in place

        def forward_loop(_model) -> None:
            for request in tqdm(requests, desc=f"calibrate {precision}", unit="request", disable=not progress):
                pipeline.run(request, progress=False)

        scales = calibrate_module(transformer, forward_loop, precision, checkpoint_hash, settings.alpha)
    finally:
        pipeline.components.close()
    seconds = round(time.perf_counter() - started, 2)
    record = {
        "model": checkpoint.name, "settings": settings.to_json(), "device": device, "dtype": dtype,
        "seconds": seconds, "versions": versions(),
        "requests": [{"resolution": r.resolution, "size": r.size, "frames": r.frames, "camera": r.camera, "motion": r.motion,
                      "steps": r.steps, "scheduler": r.scheduler, "guidance_scale": r.guidance_scale, "seed": r.seed}
                     for r in requests],
    }  # fmt: skip
    write_calibration(out, scales, record)
    log.info("calibrated %d layers for %s in %.1f s -> %s", len(scales.layers), precision, seconds, out)
    return CalibrationResult(Path(out), len(scales.layers), seconds)


def ensure_calibrated(model: str | Path | Checkpoint, precision: str, settings: CalibrationSettings | None = None,
                      progress: bool = True) -> Path:  # fmt: skip
    """The cached calibration folder of this checkpoint and precision (calib.store.cache_dir), calibrating first
    when there is none (one process at a time: a second one waits, then finds it). `model` as
    `RuyiPipeline.from_pretrained` takes it (None: the default checkpoint, downloaded when missing)."""
    settings = settings or CalibrationSettings()
    checkpoint = Checkpoint.resolve(model)
    target = cache_dir(checkpoint.weights_hash("transformer"), precision, settings)
    with file_lock(target):
        if read_record(target) is None:
            log.info("no %s calibration of %s cached: calibrating", precision, checkpoint.name)
            calibrate_checkpoint(checkpoint, precision, target, settings, progress=progress)
    return target

