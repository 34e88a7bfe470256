"""Writing and reading the generated video: H.264 mp4 through PyAV, or a folder of PNG frames.

Both writers are atomic (files.py): they write into a temporary file or folder next to the target, fsync it and
rename it into place, so an error or Ctrl-C never leaves a half-written output behind; outputs get the ordinary
file mode (0644 under umask 022).

The mp4 is deterministic: the same frames always give the same bytes (same machine, same PyAV). libx264's
macroblock-tree rate control (`mbtree`, on by default) makes run-to-run different bitstreams, so it is off; at
crf 18 that keeps the quality (PSNR against the frames) at least as high, at about the same encode time, for a few
percent larger files (tools/encode_check.py measures all three).

Frames come as uint8 [F, H, W, 3] or as the pipeline's float [1, 3, F, H, W] in [0, 1]. Floats are converted like
the reference's `save_videos_grid`: `uint8(x * 255)`, truncating (after clamping to [0, 1]).

H.264 in yuv420p (the pixel format every player supports) needs even width and height. An odd side is padded by
repeating the last row or column, so the mp4 can be one pixel larger than the frames; PNG frames keep the exact size.
Ruyi's own sizes are multiples of 16 and are never padded.
"""

from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..deps import require
from ..files import atomic_folder, atomic_write

log = logging.getLogger(__name__)

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
CRF = 18
# libx264 options besides crf: no macroblock-tree rate control, which makes run-to-run different bitstreams
DETERMINISTIC_OPTIONS = {"mbtree": "0"}
FRAME_PATTERN = "frame_{:05d}.png"


def to_uint8_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] from uint8 [F, H, W, 3] or float [1, 3, F, H, W] in [0, 1] (clamped, x*255 truncated)."""
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype == torch.uint8 and frames.ndim == 4 and frames.shape[-1] == 3:
        out = frames
    elif frames.is_floating_point() and frames.ndim == 5 and frames.shape[:2] == (1, 3):
        out = (frames[0].float().clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 3, 0)  # (F, H, W, 3)
    else:
        raise ValueError(
            "frames must be uint8 [F, H, W, 3] or float [1, 3, F, H, W] in [0, 1], "
            f"got {frames.dtype} {tuple(frames.shape)}"
        )
    if out.shape[0] < 1 or out.shape[1] < 1 or out.shape[2] < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {tuple(out.shape)}")
    return out.detach().cpu().contiguous()


def _pad_to_even(frames: torch.Tensor) -> torch.Tensor:
    """Repeat the last row / column so that H and W are even (yuv420p needs it)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h:
        frames = torch.cat([frames, frames[:, -1:]], dim=1)
    if pad_w:
        frames = torch.cat([frames, frames[:, :, -1:]], dim=2)
    return frames


def check_output_path(path: str | Path, argument: str, suffix: str | None = None) -> Path:
    """Fail early (ValueError naming `argument`) when `path` cannot be written: a wrong suffix, a folder where a
    file (`suffix` given) or a file where a folder (no `suffix`) is asked for, or no writable folder to hold it.
    Nothing is created."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{argument}: {path} must end in {suffix}")
    if suffix is not None and path.is_dir():
        raise ValueError(f"{argument}: {path} is a folder; give the file to write, e.g. {path / ('video' + suffix)}")
    if suffix is None and path.exists() and not path.is_dir():
        raise ValueError(f"{argument}: {path} is a file; give a folder (it is created or replaced).")
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{argument}: cannot write into {existing} (for {path}); choose another location.")
    return path


def encoder_options(crf: int = CRF) -> dict[str, str]:
    """The libx264 options of `write_video` (deterministic, see the module docstring)."""
    return {"crf": str(crf), **DETERMINISTIC_OPTIONS}


def write_video(frames: torch.Tensor, path: str | Path, fps: float = 24, crf: int = CRF) -> Path:
    """Write `frames` as an H.264 (libx264, yuv420p) mp4 at `fps` frames per second; returns the path.

    `crf` is x264's constant rate factor (0 = lossless luma, 18 = visually lossless, 23 = x264's default).
    The same frames always give the same file."""
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be from 0 to 51, got {crf!r}")
    return encode_mp4(frames, path, fps, encoder_options(crf))


def encode_mp4(frames: torch.Tensor, path: str | Path, fps: float, options: dict[str, str]) -> Path:
    """`write_video` with explicit libx264 `options` (tools/encode_check.py compares settings with it)."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    av = require("av", "writing mp4 video")
    video = to_uint8_frames(frames)
    if video.shape[1] % 2 or video.shape[2] % 2:
        log.warning("frame size %dx%d is odd; padding to even for H.264 yuv420p", video.shape[2], video.shape[1])
        video = _pad_to_even(video)
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(CODEC, rate=rate, options=options)
            stream.width, stream.height = int(video.shape[2]), int(video.shape[1])
            stream.pix_fmt = PIXEL_FORMAT
            for index, frame in enumerate(video.numpy()):
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
                picture.pts = index
                container.mux(stream.encode(picture))
            container.mux(stream.encode())

    atomic_write(path, encode)
    log.info("wrote %s (%d frames, %dx%d, %s fps)", path, video.shape[0], video.shape[2], video.shape[1], fps)
    return path


def write_frames(frames: torch.Tensor, folder: str | Path, overwrite: bool = False) -> Path:
    """Write `frames` as `folder/frame_00000.png`, ... atomically (temp folder, then rename); returns the folder.

    An existing `folder` is an error unless `overwrite` is set, in which case it is replaced as a whole."""
    video = to_uint8_frames(frames)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True or choose another folder")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")

    def save(tmp: Path) -> None:
        for index, frame in enumerate(video.numpy()):
            Image.fromarray(frame).save(tmp / FRAME_PATTERN.format(index), format="PNG")

    atomic_folder(folder, save, replace=overwrite)
    log.info("wrote %d frames to %s", video.shape[0], folder)
    return folder


def read_video(path: str | Path) -> torch.Tensor:
    """Decode every frame of a video file to uint8 [F, H, W, 3] RGB."""
    av = require("av", "reading video")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return torch.from_numpy(np.stack(frames))
