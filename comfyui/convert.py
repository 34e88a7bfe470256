"""ComfyUI IMAGE tensors ([B, H, W, 3] float in [0, 1]) to PIL images and a pipeline video back to IMAGE frames."""

from __future__ import annotations

import torch
from PIL import Image


def images_to_pil(images: torch.Tensor, argument: str) -> list[Image.Image]:
    """One RGB PIL image per batch entry of a ComfyUI IMAGE (a single [H, W, 3] image is taken as a batch of 1)."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{argument}: expected a ComfyUI IMAGE [B, H, W, 3], got shape {tuple(images.shape)}.")
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).to(torch.uint8)  # truncates, as the original node
    return [Image.fromarray(frame.numpy()) for frame in pixels]


def video_to_images(frames: torch.Tensor) -> torch.Tensor:
    """A video's uint8 frames [F, H, W, 3] -> ComfyUI IMAGE frames [F, H, W, 3] float32 in [0, 1]."""
    return frames.float().div(255).contiguous()
