"""What the nodes take from ComfyUI when they run inside it (model folders, the device, the progress bar),
with plain fallbacks outside it. ComfyUI's modules are imported at call time only, never at import time.

Inside ComfyUI a model or LoRA name is a name within its folder (models/Ruyi, models/loras): a name with a `..`
part, or an absolute path outside that folder, is refused, so a workflow cannot make the nodes read elsewhere."""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path, PureWindowsPath
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


def _is_absolute(name: str) -> bool:
    return Path(name).is_absolute() or bool(PureWindowsPath(name).drive) or name.startswith(("\\", "/", "~"))


def _refuse_outside(name: str, folder: str | Path, argument: str) -> ValueError:
    return ValueError(f"{argument}: {name!r} is outside {folder}; names with '..' or absolute paths elsewhere are "
                      f"refused. Put it into {folder} and choose it by name.")  # fmt: skip


def inside_folder(name: str, folder: Path, argument: str) -> Path:
    """`folder / name`, refusing (ValueError) a name that leaves `folder`: a `..` part, or an absolute path (POSIX
    or Windows) that is not inside it. Checked on the names, so symlinks placed in the folder keep working."""
    root = Path(os.path.normpath(folder))
    path = Path(os.path.normpath(Path(name).expanduser() if _is_absolute(name) else root / name))
    if ".." in re.split(r"[\\/]", name) or not (path == root or root in path.parents):
        raise _refuse_outside(name, root, argument)
    return path


def model_folder(model: str) -> str:
    """`tiny` -> the tiny checkpoint folder; `full-random` as it is; an existing folder; else a name under
    `models_root()`. The released Ruyi-Mini-7B is downloaded there when missing, as the original node does."""
    from ..models.checkpoint import DEFAULT_MODEL_DIR, Checkpoint, download_checkpoint, missing_parts

    if model == "full-random":
        return model
    if model == "tiny":
        return str(Checkpoint.resolve(model).folder)
    if comfy_module("folder_paths") is not None:
        folder = inside_folder(model, models_root(), "model")
    else:
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
    if folder_paths is not None and (_is_absolute(name) or ".." in re.split(r"[\\/]", name)):
        raise _refuse_outside(name, "ComfyUI's models/loras folder", "lora")
    found = folder_paths.get_full_path("loras", name) if folder_paths is not None else name
    path = Path(found or "").expanduser()
    if not found or not path.is_file():
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
