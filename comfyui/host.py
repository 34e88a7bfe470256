"""What the nodes take from ComfyUI when they run inside it (model folders, the device, the progress bar),
with plain fallbacks outside it. ComfyUI's modules are imported at call time only, never at import time."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

RUYI_FOLDER = "Ruyi"  # models/Ruyi/<name>, as the original Ruyi nodes use
SPECIAL_MODELS = ("tiny", "full-random")


def comfy_module(name: str) -> ModuleType | None:
    """The ComfyUI module `name` (folder_paths, comfy.utils, ...) when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def models_root() -> Path:
    """Where model names are looked up: ComfyUI's models/Ruyi, else the package's default model folder."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        return Path(folder_paths.models_dir) / RUYI_FOLDER
    from ..models.checkpoint import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR.parent


def model_folder(model: str) -> str:
    """`tiny` -> the tiny checkpoint folder; `full-random` as it is; an existing folder; else a name under
    `models_root()`. The released Ruyi-Mini-7B is downloaded there when missing, as the original node does."""
    from ..models.checkpoint import DEFAULT_MODEL_DIR, Checkpoint, download_checkpoint, missing_parts

    if model == "full-random":
        return model
    if model == "tiny":
        return str(Checkpoint.resolve(model).folder)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        folder = models_root() / model
        if model == DEFAULT_MODEL_DIR.name and missing_parts(folder):
            download_checkpoint(folder)
    if not folder.is_dir():
        raise ValueError(
            f"model: {model!r} is neither a folder nor a name under {models_root()}; use {SPECIAL_MODELS}, a "
            f"checkpoint folder, or {DEFAULT_MODEL_DIR.name} (downloaded on first use)."
        )
    return str(Checkpoint.resolve(folder, download=False).folder)


def lora_widget() -> tuple:
    """A choice of ComfyUI's loras folder inside ComfyUI, else a path string."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is not None:
        return (folder_paths.get_filename_list("loras"),)
    return ("STRING", {"default": "", "tooltip": "Path of a kohya-style .safetensors LoRA."})


def lora_path(name: str) -> str:
    """The file of a LoRA chosen from ComfyUI's loras folder, or given as a path."""
    folder_paths = comfy_module("folder_paths")
    found = folder_paths.get_full_path("loras", name) if folder_paths is not None else None
    path = Path(found or name).expanduser()
    if not path.is_file():
        raise ValueError(f"lora: {name!r} is not a file; put it in ComfyUI's models/loras folder or give its path.")
    return str(path)


def device() -> str:
    """ComfyUI's torch device, else cuda when a GPU is visible, else cpu."""
    model_management = comfy_module("comfy.model_management")
    if model_management is not None:
        return str(model_management.get_torch_device())
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def step_callback(steps: int) -> Callable[[str, int, int], None] | None:
    """Per denoising step: advance ComfyUI's progress bar and honour its Cancel button; None outside ComfyUI."""
    utils, model_management = comfy_module("comfy.utils"), comfy_module("comfy.model_management")
    if utils is None:
        return None
    bar = utils.ProgressBar(steps)

    def on_step(stage: str, done: int, total: int) -> None:
        if model_management is not None:
            model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return on_step
