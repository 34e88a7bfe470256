"""What a job submission may hold, checked before anything is stored.

A submission is multipart form data: `image` (repeatable: the start images), optional `end_image` (repeatable),
and `ruyi-trt run`'s video options named like its flags without the dashes (`frames`, `resolution`, `size`,
`camera`, `motion`, `steps`, `cfg`, `seed`, `scheduler`). Every upload is decoded as an image here (so nothing
but a readable PNG/JPEG/WebP reaches the pipeline) and the options are validated by building the
`VideoRequest` the worker will run. Errors say which field is wrong and why (`SubmissionError`, a 4xx).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

IMAGE_FIELDS = ("image", "end_image")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_STEPS = 500  # more than the schedulers handle well (diffusers' DDIM breaks at 1000 of its 1000 timesteps)
MAX_IMAGE_PIXELS = 40_000_000  # a larger upload is refused before it is decoded (decompression bombs)
# form field -> (type, default); the names and defaults of `ruyi-trt run`'s options
OPTIONS: dict[str, tuple[type, object]] = {
    "frames": (int, 120),
    "resolution": (int, 512),
    "size": (str, None),
    "camera": (str, "static"),
    "motion": (str, "2"),
    "steps": (int, 25),
    "cfg": (float, 7.0),
    "seed": (int, 42),
    "scheduler": (str, "DDIM"),
}
Upload = tuple[str, bytes]  # (file name as sent, content); the name is only quoted in errors


class SubmissionError(ValueError):
    """A bad submission: `field` names the form field, `status` is the HTTP status to answer with."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


@dataclass
class Submission:
    """A checked submission: the video options (JSON-ready) and the uploaded image bytes."""

    options: dict
    start_images: list[bytes]
    end_images: list[bytes]


def parse_submission(fields: Iterable[tuple[str, str | Upload]]) -> Submission:
    """Check the form's (name, value) pairs (a value is a string, or an upload as (file name, bytes))."""
    values: dict[str, str] = {}
    images: dict[str, list[bytes]] = {name: [] for name in IMAGE_FIELDS}
    decoded: dict[str, list[Image.Image]] = {name: [] for name in IMAGE_FIELDS}
    for name, value in fields:
        if name in IMAGE_FIELDS:
            if not isinstance(value, tuple):
                raise SubmissionError(name, "must be an uploaded image file, not a text field.")
            decoded[name].append(check_image(name, len(images[name]) + 1, *value))
            images[name].append(value[1])
        elif name in OPTIONS:
            if isinstance(value, tuple):
                raise SubmissionError(name, "must be a text field, not a file.")
            if name in values:
                raise SubmissionError(name, "was given twice.")
            values[name] = value.strip()
        else:
            raise SubmissionError(name, f"is not a job option; use {', '.join((*IMAGE_FIELDS, *OPTIONS))}.")
    if not images["image"]:
        raise SubmissionError("image", "at least one start image is needed (multipart field 'image').")
    options = {name: convert(name, values.get(name)) for name in OPTIONS}
    if options["steps"] > MAX_STEPS:
        raise SubmissionError("steps", f"{options['steps']} is more than the scheduler's {MAX_STEPS} timesteps.")
    check_options(options, decoded["image"], decoded["end_image"])
    return Submission(options, images["image"], images["end_image"])


def convert(name: str, text: str | None) -> object:
    kind, default = OPTIONS[name]
    if text is None or text == "":
        return default
    if name == "size":
        return list(parse_size(text))
    try:
        return kind(text)
    except ValueError:
        raise SubmissionError(name, f"{text!r} is not {'an integer' if kind is int else 'a number'}.") from None


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SubmissionError("size", f"{text!r} is not HEIGHTxWIDTH, e.g. 384x672.") from None
    return height, width


def check_image(field: str, index: int, filename: str, data: bytes) -> Image.Image:
    """Decode an upload fully as an RGB image, or raise SubmissionError naming the field and the upload."""
    label = f"upload {index} ({filename!r})"
    if not data:
        raise SubmissionError(field, f"{label} is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise SubmissionError(field, f"{label} is {image.format}; use {', '.join(IMAGE_FORMATS)}.")
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise SubmissionError(field, f"{label} has {image.width}x{image.height} pixels, more than "
                                                 f"{MAX_IMAGE_PIXELS:,}; scale it down.")  # fmt: skip
                return image.convert("RGB")
    except SubmissionError:
        raise
    except UnidentifiedImageError:
        raise SubmissionError(field, f"{label} is not an image PIL can read; use a PNG or JPEG file.") from None
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SubmissionError(field, f"{label} is not a readable image ({exc}); use a PNG or JPEG file.") from None


def request_options(options: dict) -> dict:
    """`VideoRequest` keywords from stored job options."""
    renamed = {"cfg": "guidance_scale"}
    out = {renamed.get(name, name): value for name, value in options.items() if name in OPTIONS}
    if out.get("size") is not None:
        out["size"] = tuple(out["size"])
    return out


def check_options(options: dict, start: list[Image.Image], end: list[Image.Image]) -> None:
    """Build the `VideoRequest` the worker will run: its validation names the option that is wrong."""
    from ..runtime.request import VideoRequest

    try:
        VideoRequest(start_images=start, end_images=end, **request_options(options))
    except (ValueError, TypeError) as exc:
        message = str(exc)
        field, _, rest = message.partition(": ")
        field = {"guidance_scale": "cfg", "start_images": "image", "start_images/end_images": "image"}.get(field, field)
        if field not in OPTIONS and field not in IMAGE_FIELDS:
            field, rest = "image", message
        raise SubmissionError(field, rest) from None
