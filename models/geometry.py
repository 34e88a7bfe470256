"""Resolution buckets and frame counts, exactly as the reference computes them, plus request validation.

The reference picks the output size from a table of about 512² aspect-ratio buckets (`ASPECT_RATIO_512`), scaled to
the requested base resolution, and rounds the frame count down to whole VAE encoder chunks. The functions
`closest_bucket`, `round_video_length` and `latent_frames` reproduce that arithmetic bit for bit, quirks included
(first minimum wins on ties, 2..7 frames round to 0, no upper cap). `validate_request` is our product's own stricter
check of user input and is kept apart so that the reference-exact functions stay unchanged.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# h/w ratio key -> [height, width] at about 512x512 pixels; dict order decides ties (first minimum wins).
ASPECT_RATIO_512: dict[str, tuple[float, float]] = {
    "0.25": (256.0, 1024.0), "0.26": (256.0, 992.0), "0.27": (256.0, 960.0), "0.28": (256.0, 928.0),
    "0.32": (288.0, 896.0), "0.33": (288.0, 864.0), "0.35": (288.0, 832.0), "0.4": (320.0, 800.0),
    "0.42": (320.0, 768.0), "0.48": (352.0, 736.0), "0.5": (352.0, 704.0), "0.52": (352.0, 672.0),
    "0.57": (384.0, 672.0), "0.6": (384.0, 640.0), "0.68": (416.0, 608.0), "0.72": (416.0, 576.0),
    "0.78": (448.0, 576.0), "0.82": (448.0, 544.0), "0.88": (480.0, 544.0), "0.94": (480.0, 512.0),
    "1.0": (512.0, 512.0), "1.07": (512.0, 480.0), "1.13": (544.0, 480.0), "1.21": (544.0, 448.0),
    "1.29": (576.0, 448.0), "1.38": (576.0, 416.0), "1.46": (608.0, 416.0), "1.67": (640.0, 384.0),
    "1.75": (672.0, 384.0), "2.0": (704.0, 352.0), "2.09": (736.0, 352.0), "2.4": (768.0, 320.0),
    "2.5": (800.0, 320.0), "2.89": (832.0, 288.0), "3.0": (864.0, 288.0), "3.11": (896.0, 288.0),
    "3.62": (928.0, 256.0), "3.75": (960.0, 256.0), "3.88": (992.0, 256.0), "4.0": (1024.0, 256.0),
}  # fmt: skip

TABLE_BASE_RESOLUTION = 512
SIZE_MULTIPLE = 16
MAX_FRAMES = 120
# The original ComfyUI node's base_resolution: 384..1024 in steps of 16 (512 and 768 are the trained sizes).
SUPPORTED_RESOLUTIONS = tuple(range(384, 1024 + 1, 16))
RESOLUTION_RULE = "384..1024 in steps of 16"


def closest_ratio_key(image_width: float, image_height: float) -> str:
    """The `ASPECT_RATIO_512` key nearest to h/w: |float(key) - h/w| in float64, the first minimum in dict order."""
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got width={image_width}, height={image_height}")
    ratio = image_height / image_width
    return min(ASPECT_RATIO_512, key=lambda key: abs(float(key) - ratio))


def scaled_bucket_size(key: str, base_resolution: float) -> tuple[float, float]:
    """The (height, width) of bucket `key` scaled to `base_resolution`, as floats before any flooring."""
    height, width = ASPECT_RATIO_512[key]
    return (height / TABLE_BASE_RESOLUTION * base_resolution, width / TABLE_BASE_RESOLUTION * base_resolution)


def closest_bucket(image_width: int, image_height: int, base_resolution: int) -> tuple[int, int]:
    """Output (height, width) for a start image of `image_width` x `image_height` pixels (PIL `.size` order).

    The reference scales every table entry by `base_resolution / 512`, takes the entry whose key is closest to
    the image's h/w and floors both sides to a multiple of 16 (`int(x / 16) * 16`), which can cut a side at
    bases other than 512 and 768 (e.g. 288x504 -> 288x496 at 384). The choice does not depend on the base, since
    scaling keeps the keys.
    """
    key = closest_ratio_key(image_width, image_height)
    height, width = scaled_bucket_size(key, base_resolution)
    return int(height / SIZE_MULTIPLE) * SIZE_MULTIPLE, int(width / SIZE_MULTIPLE) * SIZE_MULTIPLE


def round_video_length(n: int, mini_batch_encoder: int = 8) -> int:
    """The frame count the reference renders for a request of `n` frames.

    `n // mini_batch_encoder * mini_batch_encoder`, except that exactly 1 stays 1. Requests of 2..7 give 0 and
    nothing caps the length (the reference does not check either; see `validate_request`).
    """
    if n == 1:
        return 1
    return int(n // mini_batch_encoder * mini_batch_encoder)


def latent_frames(n: int, mini_batch_encoder: int = 8, mini_batch_decoder: int = 2) -> int:
    """Latent frames T for a video of `n` (already rounded) frames: the `prepare_latents` shape formula.

    `n // mini_batch_encoder * mini_batch_decoder`, except that a single frame gives 1 latent frame.
    """
    if n == 1:
        return 1
    return int(n // mini_batch_encoder * mini_batch_decoder)


def check_base_resolution(resolution: int) -> None:
    """ValueError unless `resolution` is a base resolution the original accepts (384..1024 in steps of 16)."""
    if isinstance(resolution, bool) or resolution not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"resolution must be {RESOLUTION_RULE} (512 and 768 are the trained sizes), got {resolution!r}")


def frame_rounding_note(requested: int, rendered: int, mini_batch_encoder: int = 8) -> str | None:
    """The message for a frame count rounded down to whole VAE chunks (None when nothing was rounded)."""
    if requested == rendered:
        return None
    return (f"frames: {requested} is not a multiple of {mini_batch_encoder}; making {rendered} frames "
            "(rounded down, as the original does).")  # fmt: skip


def validate_request(frames: int, resolution: int, mini_batch_encoder: int = 8) -> int:
    """Check a user's frame count and base resolution; return the frame count that will be rendered.

    Raises TypeError for a non-integer frame count, ValueError for frames < 1 or > 120, for 2..7 frames (the
    reference would render 0 frames), and for a base resolution outside 384..1024 in steps of 16. A count that
    is not a multiple of `mini_batch_encoder` is rounded down, with a logged warning.
    """
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise TypeError(f"frames must be an integer from 1 to {MAX_FRAMES}, got {frames!r}")
    if frames < 1 or frames > MAX_FRAMES:
        raise ValueError(f"frames must be from 1 to {MAX_FRAMES}, got {frames}")
    rounded = round_video_length(frames, mini_batch_encoder)
    if rounded == 0:
        raise ValueError(
            f"frames={frames} rounds down to 0 frames: use 1 (a single image) or a multiple of "
            f"{mini_batch_encoder} from {mini_batch_encoder} to {MAX_FRAMES}"
        )
    check_base_resolution(resolution)
    note = frame_rounding_note(frames, rounded, mini_batch_encoder)
    if note:
        log.warning("%s", note)
    return rounded
