"""The main job end to end: image files -> validated request -> pipeline -> mp4 (and optional PNG frames).

Everything cheap is checked before any model is loaded (images, options, output folder), and the
video is written atomically, so a failed run leaves no file behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.checkpoint import CheckpointError
from .loading import RuntimeOptions, load_pipeline
from .model_source import resolve_model
from .pipeline import RunStats
from .request import VideoRequest, load_image
from .video import write_frames, write_video


class GenerationError(RuntimeError):
    """A run that cannot go ahead; the message says what to change."""


def check_writable(path: Path, argument: str) -> None:
    """Fail early when the folder that will hold `path` cannot be written."""
    folder = path.parent if path.suffix else path
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise GenerationError(f"{argument}: cannot write into {existing} (for {path}); choose another location.")


def generate_video(
    model: str | Path | None,
    images: Sequence[str | Path],
    end_images: Sequence[str | Path],
    out: str | Path,
    request_args: dict[str, Any],
    options: RuntimeOptions = RuntimeOptions(),
    frames_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[Path, RunStats]:
    """Run the whole image-to-video job and write the video; returns its path and the run statistics."""
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise GenerationError(f"--out: {out} must end in .mp4")
    check_writable(out, "--out")
    if frames_dir is not None:
        check_writable(Path(frames_dir), "--frames-dir")
    try:
        request = VideoRequest(
            start_images=[load_image(p, "--image") for p in images],
            end_images=[load_image(p, "--end-image") for p in end_images],
            **request_args,
        )
        options.validate()
        pipeline = load_pipeline(resolve_model(model), options)
        video, stats = pipeline(request, progress=progress)
    except (ValueError, TypeError, CheckpointError) as exc:
        raise GenerationError(str(exc)) from exc
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise GenerationError(
            f"out of memory ({exc}). Try --memory-mode low_gpu, --offload-steps 1, --fp8 lite, --dtype bf16, "
            "or fewer --frames / a lower --resolution."
        ) from exc
    write_video(video, out, fps=24)
    if frames_dir is not None:
        write_frames(video, frames_dir, overwrite=True)
    return out, stats
