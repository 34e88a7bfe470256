"""What the nodes take from ComfyUI when they run inside it, with plain fallbacks outside it: the "Ruyi" model
folder type (so extra_model_paths.yaml works) and the model list, downloads with ComfyUI's progress bar, the
device, one progress bar over a whole video (with Cancel, latent previews and the stage as text under the node),
and the VIDEO type. ComfyUI's modules are imported at call time only, never at import time.

Inside ComfyUI a model or LoRA name is a name within its folder (the Ruyi folders, models/loras): a name with a
`..` part, or an absolute path outside those folders, is refused, so a workflow cannot make the nodes read
elsewhere."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path, PureWindowsPath
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

RUYI_FOLDER = "Ruyi"  # models/Ruyi/<name>, as the original Ruyi nodes use
DEFAULT_MODEL = "Ruyi-Mini-7B"  # downloaded into the first Ruyi folder when chosen and missing
SPECIAL_MODELS = ("tiny", "full-random")
STAGE_LABELS = {"load": "loading the model", "vae_encode": "VAE encode", "denoise": "denoising",
                "vae_decode": "VAE decode"}  # fmt: skip
PREVIEW_SCALE = 8  # latent pixels -> video pixels


def comfy_module(name: str) -> ModuleType | None:
    """The ComfyUI module `name` (folder_paths, comfy.utils, ...) when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def model_roots() -> list[Path]:
    """The folders of the "Ruyi" model type, first = where the default model is downloaded. Inside ComfyUI this
    registers the type (models/Ruyi, after any `Ruyi:` entries of extra_model_paths.yaml, which ComfyUI reads
    before it loads custom nodes); outside it, the package's models folder."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        from ..models.checkpoint import DEFAULT_MODEL_DIR

        return [DEFAULT_MODEL_DIR.parent]
    folder_paths.add_model_folder_path(RUYI_FOLDER, os.path.join(folder_paths.models_dir, RUYI_FOLDER))
    return [Path(path) for path in folder_paths.get_folder_paths(RUYI_FOLDER)]


def model_choices() -> list[str]:
    """The model dropdown: complete checkpoint folders in the Ruyi folders (the first folder wins a name), the
    downloadable Ruyi-Mini-7B when it is not among them, then tiny and full-random (random weights)."""
    from ..models.checkpoint import missing_parts

    names: list[str] = []
    for root in model_roots():
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if child.is_dir() and child.name not in names and not missing_parts(child):
                    names.append(child.name)
    if DEFAULT_MODEL not in names:
        names.append(DEFAULT_MODEL)
    return names + list(SPECIAL_MODELS)


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


def _in_model_roots(model: str, roots: list[Path]) -> Path:
    """The folder `model` names in the first Ruyi folder that has it, else where it goes in the first one that
    takes the name; refuses names that leave every Ruyi folder, and a Ruyi folder itself."""
    places: list[Path] = []
    for root in roots:
        try:
            places.append(inside_folder(model, root, "model"))
        except ValueError:
            continue
    if not places:
        raise _refuse_outside(model, " or ".join(str(root) for root in roots), "model")
    if any(place == Path(os.path.normpath(root)) for place in places for root in roots):
        raise ValueError(f"model: {model!r} is not a checkpoint folder name; choose one from the list (folders in "
                         f"{', '.join(str(root) for root in roots)}).")  # fmt: skip
    return next((place for place in places if place.is_dir()), places[0])


def model_folder(model: str, node_id: str | None = None) -> str:
    """`tiny` -> the tiny checkpoint folder; `full-random` as it is; else the folder of that name in the first Ruyi
    folder that has it (outside ComfyUI also any checkpoint folder). Ruyi-Mini-7B is downloaded (or its download
    resumed) when missing, with a progress bar."""
    from ..models.checkpoint import Checkpoint, download_checkpoint, missing_parts

    if model == "full-random":
        return model
    if model == "tiny":
        return str(Checkpoint.resolve(model).folder)
    roots = model_roots()
    given = Path(model).expanduser()
    if comfy_module("folder_paths") is None and given.is_dir():
        folder = given
    else:
        folder = _in_model_roots(model, roots)
    if model == DEFAULT_MODEL and missing_parts(folder):
        download_checkpoint(folder, progress=download_progress(model, node_id))
    elif not folder.is_dir():
        where = ", ".join(str(root) for root in roots)
        raise ValueError(f"model: {model!r} is not a folder in {where}; put the checkpoint folder there (or add a "
                         f"'{RUYI_FOLDER}:' entry to extra_model_paths.yaml), or choose {DEFAULT_MODEL} to download it.")  # fmt: skip
    return str(Checkpoint.resolve(folder, download=False).folder)


def download_progress(name: str, node_id: str | None = None) -> Callable[[int, int], None] | None:
    """Bytes downloaded on the running node's progress bar (and as text), stopping at Cancel; None outside ComfyUI."""
    utils, model_management = comfy_module("comfy.utils"), comfy_module("comfy.model_management")
    if utils is None:
        return None
    bar = utils.ProgressBar(1, node_id=node_id)

    def report(done: int, total: int) -> None:
        if model_management is not None:
            model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, max(total, 1))
        show_text(f"downloading {name}: {done / 2**30:.2f} of {total / 2**30:.2f} GiB", node_id)

    return report


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


def show_text(text: str, node_id: str | None = None) -> None:
    """Text under the running node in ComfyUI's UI (its progress text); nothing outside ComfyUI."""
    server = sys.modules.get("server")  # ComfyUI's server module is loaded before any custom node
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "send_progress_text"):
        return
    if node_id is None:
        context = getattr(comfy_module("comfy_execution.utils"), "get_executing_context", lambda: None)()
        node_id = getattr(context, "node_id", None) or getattr(instance, "last_node_id", None)
    if node_id is not None:
        instance.send_progress_text(text, node_id)


def previews_enabled() -> bool:
    """ComfyUI's --preview-method is not `none` (auto, latent2rgb and taesd all get our latent projection)."""
    cli_args = comfy_module("comfy.cli_args")
    return cli_args is not None and cli_args.args.preview_method != cli_args.LatentPreviewMethod.NoPreviews


class JobProgress:
    """One ComfyUI progress bar over a whole video: the stages of `RuyiPipeline.progress_totals` one after another,
    Cancel honoured at every report, the stage as text under the node (below `note`, e.g. a rounding warning) and
    latent previews on the bar when ComfyUI's preview method allows them."""

    def __init__(self, totals: dict[str, int], node_id: str | None = None, note: str = ""):
        self.utils, self.model_management = comfy_module("comfy.utils"), comfy_module("comfy.model_management")
        self.node_id, self.note = node_id, note
        self.offsets, start = {}, 0
        for stage, count in totals.items():
            self.offsets[stage], start = start, start + count
        self.total = max(start, 1)
        self.bar = self.utils.ProgressBar(self.total, node_id=node_id)
        self.preview_size = getattr(getattr(comfy_module("comfy.cli_args"), "args", None), "preview_size", 512)

    @classmethod
    def make(cls, totals: dict[str, int], node_id: str | None = None, note: str = "") -> JobProgress | None:
        """The progress for a job inside ComfyUI; None outside it (the library's own tqdm bars show progress)."""
        return cls(totals, node_id, note) if comfy_module("comfy.utils") is not None else None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.model_management is not None:
            self.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(self.offsets.get(stage, 0) + done, self.total)
        show_text("\n".join(filter(None, [self.note, f"{STAGE_LABELS.get(stage, stage)} {done}/{total}"])), self.node_id)

    def preview(self, step: int, total: int, image: torch.Tensor) -> None:
        """A latent preview (uint8 [h, w, 3]) for denoising step `step`, scaled up to about the video's size."""
        from PIL import Image

        picture = Image.fromarray(image.numpy())
        picture = picture.resize((picture.width * PREVIEW_SCALE, picture.height * PREVIEW_SCALE), Image.Resampling.BILINEAR)
        self.bar.update_absolute(self.offsets.get("denoise", 0) + step, self.total, ("JPEG", picture, self.preview_size))


def has_video_type() -> bool:
    """Whether this ComfyUI has the VIDEO type (comfy_api's VideoFromComponents); False outside ComfyUI."""
    if "comfy_api" not in sys.modules and importlib.util.find_spec("comfy_api") is None:
        return False
    return comfy_module("comfy_api.input_impl") is not None and comfy_module("comfy_api.util") is not None


def comfy_video(images: torch.Tensor, fps: int):
    """ComfyUI IMAGE frames [F, H, W, 3] as a VIDEO value (what its Create Video node makes)."""
    input_impl, util = comfy_module("comfy_api.input_impl"), comfy_module("comfy_api.util")
    components = util.VideoComponents(images=images, audio=None, frame_rate=Fraction(fps))
    return input_impl.VideoFromComponents(components)
