"""Start/end frames to conditioning tensors: the inpaint video and mask, their pipeline form, and CLIP pixels.

Three steps, each reproducing the reference exactly (architecture doc sections 6.4 and 6.5):

1. `image_to_video_condition`: the list branch of `get_image_to_video_latent`. Images are stretched (PIL default
   bicubic, no crop) to the bucket size; the video tiles the first start image over all frames, puts the start
   images first and the single end image last; the mask is 0 on known frames and 255 on frames to generate.
2. `prepare_mask_and_masked_video`: what `RuyiInpaintPipeline.__call__` does with them before the VAE: the
   binarised {0, 1} mask and the video in [-1, 1] with the frames to generate set to -1 (black).
3. `clip_pixel_values`: transformers' `CLIPImageProcessor` on the resized first start image.

Mask dtype quirk: the reference returns a float32 mask without an end image and a uint8 mask with one (it is made
before the division by 255). `image_to_video_condition` keeps that dtype so that golden comparisons are exact;
`prepare_mask_and_masked_video` accepts either and returns float32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..deps import require

log = logging.getLogger(__name__)

MAX_START_IMAGES = 5
MAX_END_IMAGES = 1
LATENT_SCALE = 8  # VAE spatial factor: the pipeline needs H and W divisible by it


def _to_rgb(image: Image.Image, argument: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"{argument} must hold PIL images, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def _frames_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """[1, 3, n, H, W] uint8 from n equally sized RGB PIL images."""
    frames = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]  # (3, H, W) each
    return torch.stack(frames, dim=1).unsqueeze(0)


def _check_images(
    starts: Sequence[Image.Image], ends: Sequence[Image.Image] | None, video_length: int, height: int, width: int
) -> None:
    if not starts:
        raise ValueError("starts must hold at least one start image, got none")
    if len(starts) > MAX_START_IMAGES:
        raise ValueError(f"starts holds {len(starts)} images; at most {MAX_START_IMAGES} start images are supported")
    n_ends = len(ends) if ends is not None else 0
    if n_ends > MAX_END_IMAGES:
        raise ValueError(
            f"ends holds {n_ends} images; at most {MAX_END_IMAGES} end image is supported "
            "(the reference fails with two or more)"
        )
    if video_length < 1:
        raise ValueError(f"video_length must be at least 1, got {video_length}")
    if len(starts) + n_ends > video_length:
        raise ValueError(
            f"{len(starts)} start and {n_ends} end image(s) do not fit in video_length={video_length} frames; "
            f"use at most {video_length} images in all or ask for more frames"
        )
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")


def image_to_video_condition(
    starts: Sequence[Image.Image],
    ends: Sequence[Image.Image] | None,
    video_length: int,
    height: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, Image.Image]:
    """Build (input_video, mask, clip_image) from start and optional end images, as the reference list branch.

    Returns:
        input_video: float32 [1, 3, F, H, W] with values k/255. Frames 0..len(starts)-1 are the start images in
            order, the last frame is the end image if one is given, every other frame repeats the first start.
        mask: [1, 1, F, H, W] with 0 on known frames and 255 elsewhere; float32 without an end image and uint8
            with one (the reference's dtype, kept for exact comparisons).
        clip_image: the first start image resized to (W, H), the image that CLIP sees.

    Raises ValueError for no start image, more than 5 start images, more than one end image, or more images
    than frames; TypeError for something that is not a PIL image.
    """
    _check_images(starts, ends, video_length, height, width)
    size = (width, height)  # PIL order
    # Pillow's default resample for resize is bicubic (antialiased on downscale); no crop, the aspect may change.
    start_images = [_to_rgb(image, "starts").resize(size, Image.Resampling.BICUBIC) for image in starts]
    start_video = _frames_tensor(start_images)  # (1, 3, n_starts, H, W) uint8
    input_video = start_video[:, :, :1].repeat(1, 1, video_length, 1, 1)
    input_video[:, :, : len(start_images)] = start_video

    if ends:
        end_images = [_to_rgb(image, "ends").resize(size, Image.Resampling.BICUBIC) for image in ends]
        mask = torch.zeros_like(input_video[:, :1])  # uint8: made before the division, as in the reference
        mask[:, :, len(start_images) :] = 255
        input_video[:, :, -len(end_images) :] = _frames_tensor(end_images)
        mask[:, :, -len(end_images) :] = 0
        input_video = input_video / 255
    else:
        input_video = input_video / 255
        mask = torch.zeros_like(input_video[:, :1])  # float32
        mask[:, :, len(start_images) :] = 255
    return input_video, mask, start_images[0]


def prepare_mask_and_masked_video(input_video: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's preprocessing of `image_to_video_condition`'s video and mask, before the VAE encodes them.

    Reproduces diffusers' `VaeImageProcessor` as the pipeline configures it: the video is normalised to
    `2 * x - 1`; the mask (0/255, uint8 or float) is binarised to {0, 1} with `>= 0.5 -> 1`, so 1 means generate.
    The masked video keeps the known frames and is -1 (black) where the mask is 1.

    Args:
        input_video: [B, 3, F, H, W] float in [0, 1]; H and W must be multiples of 8 (the pipeline's sizes
            always are, so the processor's nearest resize is the identity).
        mask: [B, 1, F, H, W], 0 for known pixels and 255 (or 1) for pixels to generate.

    Returns:
        mask01: float32 [B, 1, F, H, W] in {0, 1}.
        masked_video: float32 [B, 3, F, H, W] in [-1, 1].
    """
    if input_video.ndim != 5 or input_video.shape[1] != 3:
        raise ValueError(f"input_video must be [B, 3, F, H, W], got shape {tuple(input_video.shape)}")
    expected_mask = (input_video.shape[0], 1, *input_video.shape[2:])
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"mask must have shape {expected_mask} to match input_video, got {tuple(mask.shape)}")
    height, width = input_video.shape[-2:]
    if height % LATENT_SCALE or width % LATENT_SCALE:
        raise ValueError(
            f"input_video height and width must be multiples of {LATENT_SCALE}, got {height}x{width}; "
            "use the sizes from runtime.buckets.closest_bucket"
        )
    if not input_video.is_floating_point() or input_video.min() < 0 or input_video.max() > 1:
        raise ValueError("input_video must be a float tensor with values in [0, 1] (image_to_video_condition output)")

    init_video = (2.0 * input_video - 1.0).to(torch.float32)
    mask01 = (mask >= 0.5).to(torch.float32)
    generate = mask01.expand_as(init_video) > 0.5
    masked_video = torch.where(generate, torch.full_like(init_video, -1.0), init_video)
    return mask01, masked_video


def generates_every_frame(mask: torch.Tensor) -> bool:
    """True when the mask marks every pixel as 'generate' (all 255): the pipeline then uses zero inpaint latents."""
    return bool((mask == 255).all())


def clip_pixel_values(clip_image: Image.Image, processor_config: Mapping[str, Any]) -> torch.Tensor:
    """CLIP input pixels [1, 3, S, S] float32 for `clip_image`, with transformers' PIL-based CLIP image processor.

    `processor_config` is the content of the checkpoint's `image_encoder/preprocessor_config.json` (resize the
    shortest edge with PIL bicubic, centre crop, rescale by 1/255, normalise with the CLIP mean and std).
    transformers >= 5 makes `CLIPImageProcessor` the torchvision-based processor wherever torchvision is installed
    (every ComfyUI): its bicubic resize differs from PIL's (up to 0.03 after normalisation on the golden image), so
    the PIL one, `CLIPImageProcessorPil` (what `CLIPImageProcessor` is in 4.x), is asked for by name.
    """
    if not isinstance(clip_image, Image.Image):
        raise TypeError(f"clip_image must be a PIL image, got {type(clip_image).__name__}")
    transformers = require("transformers", "CLIP image preprocessing")
    config = {k: v for k, v in processor_config.items() if k not in ("_processor_class", "image_processor_type")}
    try:
        processor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"processor_config is not a valid CLIPImageProcessor config: {exc}") from exc
    pixels = processor(images=clip_image, return_tensors="pt")["pixel_values"]
    return pixels.to(torch.float32)
