"""2-D rotary position embedding of the Ruyi transformer, in real arithmetic (no complex numbers).

The pipeline builds one (cos, sin) table for the patch grid of a single latent frame, rescaling the
positions onto the 32x32 grid of the 512 px training resolution ("normalized RoPE"); the transformer
repeats it over frames. This reproduces `get_resize_crop_region_for_grid` followed by diffusers'
`get_2d_rotary_pos_embed(use_real=True)`, and `apply_rotary_emb(use_real_unbind_dim=-1)`.
See docs/ruyi-architecture.md section 2.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROPE_THETA = 10000.0
BASE_PIXELS = 512  # the training resolution the positions are normalized to
VAE_SCALE = 8  # pixels per latent cell


def crop_region(grid_height: int, grid_width: int, base_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The box (top, left), (bottom, right) that a (grid_height, grid_width) patch grid maps to on the
    base_size x base_size grid: the longer side spans it, the shorter one is centred.

    Uses Python's `round` (half to even), like the reference pipeline.
    """
    if grid_height / grid_width > 1:
        resize_height, resize_width = base_size, round(base_size / grid_height * grid_width)
    else:
        resize_height, resize_width = round(base_size / grid_width * grid_height), base_size
    top = round((base_size - resize_height) / 2.0)
    left = round((base_size - resize_width) / 2.0)
    return (top, left), (top + resize_height, left + resize_width)


def _linspace(start: float, stop: float, num: int) -> Tensor:
    """numpy.linspace(start, stop, num, endpoint=False, dtype=float32): float64 maths, then float32."""
    step = (stop - start) / num
    return (torch.arange(num, dtype=torch.float64) * step + start).float()


def _axis_table(positions: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin [S, dim] of one axis; each frequency fills two adjacent channels (2i, 2i+1)."""
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))  # [dim/2]
    angles = torch.outer(positions, freqs)  # [S, dim/2]
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rotary_embedding(height: int, width: int, patch_size: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """RoPE tables (cos, sin), each float32 [hp*wp, head_dim], for a latent frame of height x width cells.

    hp = height // patch_size and wp = width // patch_size; rows are ordered y-major (idx = y*wp + x).
    The first head_dim/2 channels encode the column (x) position, the second half the row (y).
    """
    if head_dim % 4 != 0:
        raise ValueError(f"head_dim must be a multiple of 4 for 2-D RoPE, got {head_dim}")
    grid_height, grid_width = height // patch_size, width // patch_size
    if grid_height < 1 or grid_width < 1:
        raise ValueError(
            f"latent size {height}x{width} is smaller than one {patch_size}x{patch_size} patch; "
            "pass the latent height/width (pixels / 8)"
        )
    base_size = BASE_PIXELS // VAE_SCALE // patch_size
    (top, left), (bottom, right) = crop_region(grid_height, grid_width, base_size)
    ys = _linspace(top, bottom, grid_height)
    xs = _linspace(left, right, grid_width)
    y_pos = ys[:, None].expand(grid_height, grid_width).reshape(-1)  # [S]
    x_pos = xs[None, :].expand(grid_height, grid_width).reshape(-1)  # [S]
    cos_x, sin_x = _axis_table(x_pos, head_dim // 2)
    cos_y, sin_y = _axis_table(y_pos, head_dim // 2)
    return torch.cat([cos_x, cos_y], dim=1), torch.cat([sin_x, sin_y], dim=1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x [..., S, d] by the float32 tables [S, d]; maths in float32."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # [..., S, d/2] each
    rotated = torch.stack((-imag, real), dim=-1).flatten(-2)  # [..., S, d]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
