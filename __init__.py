"""ruyi-trt: an optimized inference engine for the Ruyi-Mini-7B image-to-video model.

    from ruyi_trt import RuyiPipeline
    pipe = RuyiPipeline.from_pretrained("tiny")            # or a checkpoint folder, "full-random", None
    video = pipe("assets/example.png", frames=8, steps=4)
    video.save("video.mp4")

Importing the package is cheap: `RuyiPipeline`, `Video` and `Checkpoint` are imported (with torch) on first
use, and heavy optional dependencies (onnxruntime, tensorrt, triton, av) inside the functions that need them.

The repository is also a ComfyUI custom node folder: ComfyUI reads the two node mappings below
(`comfyui/`), whose import loads no model and imports neither torch nor ComfyUI.
"""

from .comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__version__ = "0.1.0"
__all__ = ["Checkpoint", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "RuyiPipeline", "Video", "__version__"]

_LAZY = {"RuyiPipeline": "runtime.pipeline", "Video": "runtime.pipeline", "Checkpoint": "models.checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
