"""A calibration folder: `scales.safetensors` (calib/scales.py) and `calibration.json`, and where cached ones live.

`calibration.json` (schema 1) records what the scales were made from and how:
    {"schema": 1, "precision": "int8", "checkpoint_hash": "sha256:...", "model": "tiny",
     "settings": CalibrationSettings.to_json(), "requests": [{"size": [512, 512], "camera": ..., ...}],
     "layers": 45, "seconds": 12.3, "device": "cpu", "dtype": "fp32",
     "versions": {"torch": ..., "nvidia_modelopt": ..., "ruyi_trt": ...}, "scales_sha256": "sha256:..."}
The scales file is written first and the record last, so a folder with a record has complete scales; a run
refuses a folder whose record names another checkpoint, precision or scales file.
Cached calibrations live in `cache_root()/calib/<key>`, the key hashing checkpoint, precision and settings.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .recipe import DEFAULT_ALPHA
from .scales import PRECISIONS, SCALES_NAME, Scales, ScalesError, read_scales, scales_digest, write_scales

RECORD_NAME = "calibration.json"
SCHEMA = 1
CAMERAS = ("static", "left", "right", "up", "down")
MOTIONS = ("1", "2", "3", "4")


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration set: for every base resolution, one request per camera with the motions taken in turn
    (every control embedding is seen), each running all `steps` timesteps of the scheduler under CFG."""

    resolutions: tuple[int, ...] = (512, 768)
    frames: int = 8
    steps: int = 25
    scheduler: str = "DDIM"
    guidance_scale: float = 7.0
    cameras: tuple[str, ...] = CAMERAS
    motions: tuple[str, ...] = MOTIONS
    seed: int = 0
    alpha: float = DEFAULT_ALPHA  # SmoothQuant migration strength (int8)
    size: tuple[int, int] | None = None  # (height, width) instead of the resolutions' buckets (small test models)

    def validate(self) -> None:
        if not self.resolutions or any(r not in (512, 768) for r in self.resolutions):
            raise ValueError(f"calibration resolutions: {self.resolutions} must be some of 512, 768.")
        if self.steps < 1 or self.frames < 1:
            raise ValueError(f"calibration steps ({self.steps}) and frames ({self.frames}) must be >= 1.")
        bad = [c for c in self.cameras if c not in CAMERAS] + [m for m in self.motions if m not in MOTIONS]
        if bad or not self.cameras or not self.motions:
            raise ValueError(f"calibration cameras/motions: {bad or 'none given'}; use {CAMERAS} and {MOTIONS}.")
        if self.size is not None and (len(self.size) != 2 or any(v <= 0 or v % 16 for v in self.size)):
            raise ValueError(f"calibration size: {self.size} must be (height, width) in positive multiples of 16.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha: {self.alpha} must be within [0, 1].")

    def controls(self) -> list[tuple[str, str]]:
        """(camera, motion) per request of one resolution: every camera once, the motions in turn."""
        count = max(len(self.cameras), len(self.motions))
        return [(self.cameras[i % len(self.cameras)], self.motions[i % len(self.motions)]) for i in range(count)]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "resolutions": list(self.resolutions), "cameras": list(self.cameras),
                "motions": list(self.motions), "size": list(self.size) if self.size else None}  # fmt: skip


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "nvidia-modelopt", "ruyi-trt"):
        try:
            found[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name.replace("-", "_")] = "unknown"
    return found


def write_calibration(folder: str | Path, scales: Scales, record: dict[str, Any]) -> Path:
    """Write `folder/scales.safetensors`, then `folder/calibration.json` (record + the scales' digest)."""
    folder = Path(folder)
    path = write_scales(folder / SCALES_NAME, scales)
    data = {**record, "schema": SCHEMA, "precision": scales.precision, "checkpoint_hash": scales.checkpoint_hash,
            "layers": len(scales.layers), "scales_file": SCALES_NAME, "scales_sha256": scales_digest(path)}  # fmt: skip
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / RECORD_NAME, lambda tmp: tmp.write_text(text))
    return folder


def read_record(folder: str | Path) -> dict[str, Any] | None:
    """`calibration.json` of `folder`, or None when there is none."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ScalesError(f"{path} is not valid JSON ({exc}); delete the folder and calibrate again.") from exc
    if data.get("schema") != SCHEMA:
        raise ScalesError(f"{path} has schema {data.get('schema')!r}, expected {SCHEMA}; calibrate again.")
    return data


def load_calibration(folder: str | Path, precision: str, checkpoint_hash: str) -> tuple[Scales, dict[str, Any]]:
    """(scales, record) of a calibration folder made for this checkpoint and precision; ScalesError otherwise."""
    folder = Path(folder)
    command = f"ruyi-trt calibrate --model MODEL --precision {precision} --out {folder}"
    record = read_record(folder)
    if record is None:
        raise ScalesError(f"{folder} holds no {RECORD_NAME}: not a calibration folder. Make one with: {command}")
    if record["precision"] != precision:
        raise ScalesError(f"{folder} is a {record['precision']} calibration, this run needs {precision}: {command}")
    if record["checkpoint_hash"] != checkpoint_hash:
        raise ScalesError(f"{folder} was calibrated for another checkpoint; calibrate this one: {command}")
    path = folder / record["scales_file"]
    if not path.is_file() or scales_digest(path) != record["scales_sha256"]:
        raise ScalesError(f"{path} is missing or does not match {folder / RECORD_NAME}; calibrate again: {command}")
    return read_scales(path, checkpoint_hash), record


def cache_dir(checkpoint_hash: str, precision: str, settings: CalibrationSettings) -> Path:
    """`cache_root()/calib/<key>`: where the calibration of this checkpoint, precision and settings is kept."""
    from ..models.presets import cache_root

    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not supported; use one of {PRECISIONS}.")
    payload = json.dumps({"checkpoint": checkpoint_hash, "precision": precision, "settings": settings.to_json(),
                          "schema": SCHEMA}, sort_keys=True)  # fmt: skip
    return cache_root() / "calib" / hashlib.sha256(payload.encode()).hexdigest()[:16]
