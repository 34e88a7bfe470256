"""ruyi-trt: an optimized inference engine for the Ruyi-Mini-7B image-to-video model.

Importing the package is cheap: heavy optional dependencies (onnxruntime, tensorrt, triton, av)
are imported inside the functions that need them through `ruyi_trt.deps.require`.

The repository is also a ComfyUI custom node folder: ComfyUI reads the two node mappings below
(`comfyui/`), whose import loads no model and imports neither torch nor ComfyUI.
"""

from .comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
