"""What the user asks for, validated up front with errors that name the argument and the allowed values.

Images are read defensively (`load_image`): a missing, empty, truncated, corrupt or non-image file is refused
with a message naming it, as is a picture over Pillow's decompression-bomb limit (`MAX_IMAGE_PIXELS`, checked
from the header before anything is decoded) or under `MIN_IMAGE_SIDE` pixels on a side. Every image, read from a
file or given as a PIL image, becomes RGB the way a viewer shows it (`to_rgb`): the EXIF orientation of phone
pictures is applied; transparency (RGBA, LA, palette or tRNS transparency) is composited onto white; 16-bit
greyscale is scaled to 8 bits (not clipped); CMYK and other colour modes go through Pillow's conversion.
"""

from __future__ import annotations

import logging
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..models.geometry import closest_bucket, round_video_length

log = logging.getLogger(__name__)

ImageInput = Image.Image | str | Path

CAMERAS = ("static", "left", "right", "up", "down", "auto")
MOTIONS = ("1", "2", "3", "4", "auto")
RESOLUTIONS = (512, 768)
SCHEDULER_NAMES = ("DDIM", "Euler", "Euler A", "DPM++", "PNDM")
MAX_FRAMES = 120
MAX_IMAGES = 5
MAX_STEPS = 1000  # the schedulers' training timesteps: more steps than that repeat timesteps (diffusers refuses)
MAX_GUIDANCE = 20.0  # the reference's useful range is about 5..10
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
MAX_SIDE = 2048  # an explicit size's height and width (multiples of 16)
MIN_IMAGE_SIDE = 16  # one latent patch (VAE x8, patch 2): smaller pictures hold no detail to animate
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit (about 9459 x 9459)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
EXIF_ORIENTATION = 0x0112
BACKGROUND = (255, 255, 255)  # transparency is composited onto white, as image viewers show it


def _check_image_size(image: Image.Image, source: str, argument: str) -> None:
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"{argument}: {source} is {width}x{height} pixels; images need at least {MIN_IMAGE_SIDE} "
                         "px on each side (the video is 512 or 768 px): use a larger picture.")  # fmt: skip
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{argument}: {source} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} pixel "
                         "limit (Pillow's decompression-bomb guard); scale it down first (the video is at most "
                         f"{MAX_SIDE} px).")  # fmt: skip


def to_rgb(image: Image.Image, source: str = "the image", argument: str = "image") -> Image.Image:
    """`image` as a new 8-bit RGB image, as a viewer shows it (see the module docstring)."""
    _check_image_size(image, source, argument)
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation != 1:
        log.info("%s: applied its EXIF orientation (%s)", source, orientation)
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.uint16).astype(np.float32) / 257.0
        return Image.fromarray(np.rint(pixels).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"{argument}: {source} has 32-bit {'float' if image.mode == 'F' else 'integer'} pixels, "
                         "which have no standard brightness range; save it as an 8- or 16-bit PNG or a JPEG.")  # fmt: skip
    if image.has_transparency_data:
        log.info("%s: has transparency; composited onto white", source)
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"{argument}: {source} is in colour mode {image.mode}, which cannot be converted to RGB "
                         f"({exc}); save it as an RGB PNG or JPEG.") from exc  # fmt: skip


def load_image(path: str | Path, argument: str = "image") -> Image.Image:
    """Open an image file as RGB (`to_rgb`), or raise ValueError saying which argument, which file and why.

    The pixel count is checked from the header before decoding, so a decompression bomb never fills the memory."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: {path} does not exist or is not a file; give the path of a PNG or JPEG picture.")
    if path.stat().st_size == 0:
        raise ValueError(f"{argument}: {path} is empty (0 bytes); use a PNG or JPEG file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{argument}: {path} is too large to open safely ({exc}); scale it down to at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels first.") from exc  # fmt: skip
    except UnidentifiedImageError as exc:
        raise ValueError(f"{argument}: {path} is not a readable image (not a format Pillow knows); use a PNG or "
                         "JPEG file.") from exc  # fmt: skip
    except PermissionError as exc:
        raise ValueError(f"{argument}: {path} cannot be read ({exc.strerror}); check its permissions.") from exc
    except Exception as exc:  # Pillow's parsers raise many types on broken files
        raise _corrupt(path, argument, exc) from exc
    with image:
        _check_image_size(image, str(path), argument)  # from the header, before decoding
        try:
            image.load()
        except Exception as exc:  # Pillow's decoders raise many types on broken data
            raise _corrupt(path, argument, exc) from exc
        return to_rgb(image, str(path), argument)


def _corrupt(path: Path, argument: str, exc: Exception) -> ValueError:
    return ValueError(f"{argument}: {path} is not a readable image: it is truncated or corrupt "
                      f"({type(exc).__name__}: {exc}); use a PNG or JPEG file that opens in an image viewer.")  # fmt: skip


def load_images(images: ImageInput | Sequence[ImageInput] | None, argument: str) -> list[Image.Image]:
    """RGB PIL images (`to_rgb`) from one image or path, or a list of them; None gives an empty list."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, Path)):
        images = [images]
    return [to_rgb(item, "the PIL image", argument) if isinstance(item, Image.Image) else load_image(item, argument)
            for item in images]  # fmt: skip


@dataclass
class VideoRequest:
    """One image-to-video job. `size` (height, width), multiples of 16, overrides the resolution bucket."""

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

    def __post_init__(self) -> None:
        self.start_images = list(self.start_images)
        self.end_images = list(self.end_images or ())
        self.motion = str(self.motion)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (TypeError for images that are not PIL images) naming the option and what it accepts."""
        if not self.start_images:
            raise ValueError("image: at least one start image is needed.")
        if len(self.start_images) > MAX_IMAGES or len(self.end_images) > MAX_IMAGES:
            raise ValueError(f"image/end_image: at most {MAX_IMAGES} each, got "
                             f"{len(self.start_images)} and {len(self.end_images)}.")  # fmt: skip
        for argument, images in (("image", self.start_images), ("end_image", self.end_images)):
            for index, image in enumerate(images):
                if not isinstance(image, Image.Image):
                    raise TypeError(f"{argument}: must hold PIL images, got {type(image).__name__}.")
                _check_image_size(image, f"image {index + 1}", argument)
        check_number("frames", self.frames, 1, MAX_FRAMES, integer=True)
        if 2 <= self.frames <= 7:
            raise ValueError(f"frames: {self.frames} rounds down to 0 (lengths are multiples of 8, or exactly 1); "
                             f"use 1 or 8..{MAX_FRAMES}.")  # fmt: skip
        if self.size is None and self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution: {self.resolution!r} is not supported; use one of {RESOLUTIONS}.")
        if self.size is not None:
            sides = tuple(self.size) if isinstance(self.size, (tuple, list)) else ()
            if len(sides) != 2 or not all(_is_integer(v) and 16 <= v <= MAX_SIDE and v % 16 == 0 for v in sides):
                raise ValueError(f"size: {self.size!r} must be (height, width), two multiples of 16 within "
                                 f"16..{MAX_SIDE}.")  # fmt: skip
        if self.camera not in CAMERAS:
            raise ValueError(f"camera: {self.camera!r} is unknown; use one of {CAMERAS}.")
        if self.motion not in MOTIONS:
            raise ValueError(f"motion: {self.motion!r} is unknown; use one of {MOTIONS}.")
        if self.scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"scheduler: {self.scheduler!r} is unknown; use one of {SCHEDULER_NAMES}.")
        check_number("steps", self.steps, 1, MAX_STEPS, integer=True)
        if self.scheduler == "PNDM" and self.steps < 4:
            raise ValueError(f"steps: PNDM needs at least 4 steps (its Runge-Kutta warm-up), got {self.steps}; "
                             f"use 4..{MAX_STEPS}.")  # fmt: skip
        check_number("guidance_scale", self.guidance_scale, 0, MAX_GUIDANCE)
        check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        check_number("clip_apply_ratio", self.clip_apply_ratio, 0, 1)
        known = len(self.start_images) + len(self.end_images)
        if self.frames > 1 and known > self.frames - self.frames % 8:
            raise ValueError(f"image/end_image: {known} start/end images do not fit in {self.frames} frames; use "
                             "fewer images or more frames.")  # fmt: skip


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(name: str, value: object, low: float, high: float, integer: bool = False) -> None:
    """Raise ValueError naming `name` and the range low..high unless `value` is a finite number in it (a whole
    number when `integer`)."""
    kind = "a whole number" if integer else "a number"
    valid_type = _is_integer(value) if integer else isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not valid_type:
        raise ValueError(f"{name}: {value!r} is not {kind}; use {kind} within {low}..{high}.")
    if not low <= value <= high:  # NaN compares False: refused too
        raise ValueError(f"{name}: {value!r} is outside {low}..{high}.")
