"""What the user asks for, validated up front with errors that name the argument and the allowed values."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..models.control_embeddings import DEFAULT_ASPECT, positive_prefix
from ..models.geometry import (
    RESOLUTION_RULE,
    SUPPORTED_RESOLUTIONS,
    closest_bucket,
    frame_rounding_note,
    round_video_length,
)
from .denoising import NOISE_DEVICES

ImageInput = Image.Image | str | Path

CAMERAS = ("static", "left", "right", "up", "down", "auto")
MOTIONS = ("1", "2", "3", "4", "auto")
RESOLUTIONS = SUPPORTED_RESOLUTIONS  # base resolutions of the aspect buckets: 384..1024 in steps of 16
SCHEDULER_NAMES = ("DDIM", "Euler", "Euler A", "DPM++", "PNDM")
MAX_FRAMES = 120
MAX_IMAGES = 5


def load_image(path: str | Path, argument: str = "image") -> Image.Image:
    """Open an image file as RGB, or raise ValueError saying which argument and why."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: {path} does not exist or is not a file.")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{argument}: {path} is not a readable image ({exc}); use a PNG or JPEG file.") from exc


def load_images(images: ImageInput | Sequence[ImageInput] | None, argument: str) -> list[Image.Image]:
    """PIL images (converted to RGB) from one image or path, or a list of them; None gives an empty list."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, Path)):
        images = [images]
    return [item.convert("RGB") if isinstance(item, Image.Image) else load_image(item, argument) for item in images]


@dataclass
class VideoRequest:
    """One image-to-video job. `size` (height, width), multiples of 16, overrides the resolution bucket.

    `aspect_ratio` picks the control embeddings' key (`p.{16x9}movie...`; the original hard-codes "16:9",
    whatever the video's shape). `noise_device` is where the seeded generator draws the initial noise (and Euler
    A's): "cpu" gives the same video on every machine; "cuda" draws as the original's torch.Generator("cuda").
    """

    start_images: Sequence[Image.Image]
    end_images: Sequence[Image.Image] = ()
    frames: int = 120
    resolution: int = 512
    camera: str = "static"
    motion: str | int = 2
    steps: int = 25
    guidance_scale: float = 7.0
    seed: int = 42
    scheduler: str = "DDIM"
    clip_apply_ratio: float = 0.4
    size: tuple[int, int] | None = None
    aspect_ratio: str = DEFAULT_ASPECT
    noise_device: str = "cpu"

    @classmethod
    def from_inputs(
        cls,
        image: ImageInput | Sequence[ImageInput],
        end_image: ImageInput | Sequence[ImageInput] | None = None,
        **options: object,
    ) -> VideoRequest:
        """A request from images or image paths (one, or a list of up to 5 each) and the video options."""
        return cls(start_images=load_images(image, "image"), end_images=load_images(end_image, "end_image"), **options)

    def geometry(self, mini_batch_encoder: int) -> tuple[int, int, int]:
        """(height, width, frames) of the video to make: `size`, else the first start image's aspect bucket at
        `resolution`; frames rounded down to whole VAE chunks of `mini_batch_encoder` (or exactly 1)."""
        height, width = self.size or closest_bucket(*self.start_images[0].size, self.resolution)
        return height, width, round_video_length(self.frames, mini_batch_encoder)

    def frames_note(self, mini_batch_encoder: int) -> str | None:
        """The message when the frame count is rounded down to whole VAE chunks (None when it is not)."""
        return frame_rounding_note(self.frames, round_video_length(self.frames, mini_batch_encoder), mini_batch_encoder)

    def __post_init__(self) -> None:
        self.start_images = list(self.start_images)
        self.end_images = list(self.end_images or ())
        self.motion = str(self.motion)
        self.validate()

    def validate(self) -> None:
        if not self.start_images:
            raise ValueError("start_images: at least one start image is needed.")
        if len(self.start_images) > MAX_IMAGES or len(self.end_images) > MAX_IMAGES:
            raise ValueError(f"start_images/end_images: at most {MAX_IMAGES} each, got "
                             f"{len(self.start_images)} and {len(self.end_images)}.")
        for image in [*self.start_images, *self.end_images]:
            if not isinstance(image, Image.Image):
                raise TypeError(f"start_images/end_images must hold PIL images, got {type(image).__name__}.")
        if not 1 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"frames: {self.frames} is outside 1..{MAX_FRAMES}.")
        if 2 <= self.frames <= 7:
            raise ValueError(f"frames: {self.frames} rounds down to 0 (lengths are multiples of 8, or exactly 1).")
        if self.size is None and (isinstance(self.resolution, bool) or self.resolution not in RESOLUTIONS):
            raise ValueError(f"resolution: {self.resolution} is not supported; use {RESOLUTION_RULE} "
                             "(512 and 768 are the trained sizes), or an explicit size.")
        if self.size is not None and any(s <= 0 or s % 16 for s in self.size):
            raise ValueError(f"size: {self.size} must be two positive multiples of 16 (height, width).")
        if self.camera not in CAMERAS:
            raise ValueError(f"camera: {self.camera!r} is unknown; use one of {CAMERAS}.")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion: {self.motion!r} is unknown; use one of {MOTIONS}.")
        try:
            positive_prefix(self.camera, self.motion, self.aspect_ratio)
        except ValueError as exc:
            raise ValueError(f"aspect_ratio: {exc}") from exc
        if self.noise_device not in NOISE_DEVICES:
            raise ValueError(f"noise_device: {self.noise_device!r} is unknown; use one of {NOISE_DEVICES}.")
        if self.noise_device == "cuda" and not torch.cuda.is_available():
            raise ValueError("noise_device: cuda needs a CUDA GPU and none is visible; use cpu.")
        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler: {self.scheduler!r} is unknown; use one of {SCHEDULER_NAMES}.")
        if self.steps < 1:
            raise ValueError(f"steps: {self.steps} must be at least 1.")
        if self.scheduler == "PNDM" and self.steps < 4:
            raise ValueError(f"steps: PNDM needs at least 4 steps (its Runge-Kutta warm-up), got {self.steps}.")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale: {self.guidance_scale} must not be negative.")
        if not 0.0 <= self.clip_apply_ratio <= 1.0:
            raise ValueError(f"clip_apply_ratio: {self.clip_apply_ratio} must be within 0..1.")
        known = len(self.start_images) + len(self.end_images)
        if self.frames > 1 and known > self.frames - self.frames % 8:
            raise ValueError(f"{known} start/end images do not fit in {self.frames} frames.")
