"""Writing and reading the generated video: H.264 mp4 through PyAV, or a folder of PNG frames.

Both writers are atomic: they write into a temporary file or folder next to the target and rename it into place,
so an error never leaves a half-written output behind.

Frames come as uint8 [F, H, W, 3] or as the pipeline's float [1, 3, F, H, W] in [0, 1]. Floats are converted like
the reference's `save_videos_grid`: `uint8(x * 255)`, truncating (after clamping to [0, 1]).

H.264 in yuv420p (the pixel format every player supports) needs even width and height. An odd side is padded by
repeating the last row or column, so the mp4 can be one pixel larger than the frames; PNG frames keep the exact size.
Ruyi's own sizes are multiples of 16 and are never padded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..deps import require
from ..files import atomic_write

log = logging.getLogger(__name__)

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
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
    """Fail early (ValueError naming `argument`) when `path` cannot be written: a wrong suffix, or no writable
    folder to hold it. Nothing is created."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{argument}: {path} must end in {suffix}")
    folder = path.parent if suffix is not None else path
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{argument}: cannot write into {existing} (for {path}); choose another location.")
    return path


def _writable(path: Path, write: Callable[[Path], None]) -> Path:
    """Run `atomic_write(path, write)`, turning a folder that cannot be written into a clear error."""
    try:
        return atomic_write(path, write)
    except (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError) as exc:
        raise OSError(f"cannot write {path}: its folder {path.parent} is not a writable folder ({exc})") from exc


def write_video(frames: torch.Tensor, path: str | Path, fps: float = 24, crf: int = 18) -> Path:
    """Write `frames` as an H.264 (libx264, yuv420p) mp4 at `fps` frames per second; returns the path.

    `crf` is x264's constant rate factor (0 = lossless luma, 18 = visually lossless, 23 = x264's default).
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be from 0 to 51, got {crf!r}")
    av = require("av", "writing mp4 video")
    video = to_uint8_frames(frames)
    if video.shape[1] % 2 or video.shape[2] % 2:
        log.warning("frame size %dx%d is odd; padding to even for H.264 yuv420p", video.shape[2], video.shape[1])
        video = _pad_to_even(video)
    rate = Fraction(fps).limit_denominator(1001)
    path = Path(path)

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(CODEC, rate=rate, options={"crf": str(crf)})
            stream.width, stream.height = int(video.shape[2]), int(video.shape[1])
            stream.pix_fmt = PIXEL_FORMAT
            for frame in video.numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    _writable(path, encode)
    log.info("wrote %s (%d frames, %dx%d, %s fps)", path, video.shape[0], video.shape[2], video.shape[1], fps)
    return path


def write_frames(frames: torch.Tensor, folder: str | Path, overwrite: bool = False) -> Path:
    """Write `frames` as `folder/frame_00000.png`, ... atomically (temp folder, then rename); returns the folder.

    An existing `folder` is an error unless `overwrite` is set, in which case it is replaced as a whole.
    """
    video = to_uint8_frames(frames)
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True or choose another folder")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    except OSError as exc:
        raise OSError(f"cannot write {folder}: its folder {folder.parent} is not a writable folder ({exc})") from exc
    try:
        for index, frame in enumerate(video.numpy()):
            Image.fromarray(frame).save(tmp / FRAME_PATTERN.format(index), format="PNG")
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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
