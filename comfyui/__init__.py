"""ComfyUI nodes for ruyi-trt: Load Model, Load LoRA, TeaCache, Enhance-A-Video and Sampler (Image to Video), under
the Ruyi-TRT category.

Both mapping dicts are built from the one list `nodes.NODES`, so their keys cannot drift. Importing them loads
no model and imports neither torch, ComfyUI nor TensorRT (see `nodes`).
"""

from .nodes import NODES

NODE_CLASS_MAPPINGS = {node.__name__: node for node in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.__name__: node.DISPLAY_NAME for node in NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
