"""ruyi-trt: an optimized inference engine for the Ruyi-Mini-7B image-to-video model.

Importing the package is cheap: heavy optional dependencies (onnxruntime, tensorrt, triton, av)
are imported inside the functions that need them through `ruyi_trt.deps.require`.
"""

__version__ = "0.1.0"
