"""VAE spatial tiling: run one chunk's encoder or decoder on overlapping tiles and blend them into one output.

The reference (`AutoencoderKLMagvit.tiled_encode/tiled_decode`) cuts the input into tiles of
`tile_sample_min_size` pixels (`tile_sample_min_size / spatial_factor` latents) that overlap by
`tile_overlap_factor` of a tile, and blends neighbours linearly across the overlap. Here the grid is laid
the same way, except that the last tile of a row or column is moved back to end at the border (every tile
has the full size, no thin remainder tile and no separate corner pass), and the blend weights are linear
ramps over each actual overlap, normalised to sum to one. Tiling bounds the working set of one chunk by
the tile instead of the frame; the output differs from the untiled one near tile borders (convolutions see
zero padding there, GroupNorm and the mid-block attention see only their tile), which the blend hides.

Inputs smaller than one tile are not tiled, as in the reference, so their output is bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SpatialTiling:
    """Tiles of `tile` pixels (a multiple of the VAE's spatial factor) overlapping by `overlap` of a tile."""

    tile: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.tile <= 0:
            raise ValueError(f"tile size {self.tile} must be positive (pixels).")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"tile overlap {self.overlap} must be within [0, 1).")


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of `tile` units covering `size` with about `overlap * tile` units of overlap.

    The stride is tile - round(overlap * tile) (at least 1); the last tile ends at the border."""
    if size <= tile:
        return [0]
    stride = max(1, tile - round(overlap * tile))
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def tile_cells(tiling: SpatialTiling, unit_in: int, unit_out: int) -> int:
    """Grid cells per tile: `tiling.tile` pixels, a cell being max(unit_in, unit_out) pixels."""
    return max(1, tiling.tile // max(unit_in, unit_out))


def is_tiled(height: int, width: int, tiling: SpatialTiling | None, unit_in: int, unit_out: int) -> bool:
    """Whether an input of height x width samples is cut into more than one tile."""
    if tiling is None:
        return False
    tile = tile_cells(tiling, unit_in, unit_out)
    return max(height, width) // unit_in > tile


def _ramp_weights(starts: list[int], tile: int, device: torch.device) -> list[Tensor]:
    """Per tile, a 1-D weight over its `tile` output samples: linear ramps across the overlaps with its
    neighbours (rising over the previous tile's overlap, falling over the next one's), 1 elsewhere."""
    weights = []
    for n, start in enumerate(starts):
        w = torch.ones(tile, dtype=torch.float32, device=device)
        if n > 0 and (rise := starts[n - 1] + tile - start) > 0:
            w[:rise] = (torch.arange(rise, dtype=torch.float32, device=device) + 0.5) / rise
        if n + 1 < len(starts) and (fall := start + tile - starts[n + 1]) > 0:
            down = 1 - (torch.arange(fall, dtype=torch.float32, device=device) + 0.5) / fall
            w[tile - fall :] = torch.minimum(w[tile - fall :], down)
        weights.append(w)
    return weights


def run_tiled(x: Tensor, fn: Callable[[Tensor], Tensor], tiling: SpatialTiling, unit_in: int, unit_out: int) -> Tensor:
    """`fn` on overlapping spatial tiles of `x` [B, C, T, H, W], blended into one output.

    The grid is laid in cells of `unit_in` input samples, each giving `unit_out` output samples: a decoder has
    (1 latent -> 8 pixels), an encoder (8 pixels -> 1 latent). `tiling.tile` is in pixels, so a tile is
    tile / max(unit_in, unit_out) cells."""
    if not is_tiled(*x.shape[-2:], tiling, unit_in, unit_out):
        return fn(x)
    if x.shape[-2] % unit_in or x.shape[-1] % unit_in:
        raise ValueError(f"a tiled input must be a multiple of {unit_in} in height and width, got {tuple(x.shape)}")
    cells_h, cells_w = x.shape[-2] // unit_in, x.shape[-1] // unit_in
    tile = tile_cells(tiling, unit_in, unit_out)
    rows, cols = tile_starts(cells_h, tile, tiling.overlap), tile_starts(cells_w, tile, tiling.overlap)
    th, tw = min(tile, cells_h), min(tile, cells_w)
    row_w = _ramp_weights([r * unit_out for r in rows], th * unit_out, x.device)
    col_w = _ramp_weights([c * unit_out for c in cols], tw * unit_out, x.device)
    out = total = None
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            y = fn(x[..., r * unit_in : (r + th) * unit_in, c * unit_in : (c + tw) * unit_in])
            if out is None:
                shape = (*y.shape[:-2], cells_h * unit_out, cells_w * unit_out)
                out = torch.zeros(shape, dtype=torch.float32, device=y.device)
                total = torch.zeros(shape[-2:], dtype=torch.float32, device=y.device)
            weight = row_w[i][:, None] * col_w[j][None, :]
            rows_out = slice(r * unit_out, (r + th) * unit_out)
            cols_out = slice(c * unit_out, (c + tw) * unit_out)
            out[..., rows_out, cols_out] += y.float() * weight
            total[rows_out, cols_out] += weight
            del y
    return out.div_(total).to(x.dtype)
