"""TensorRT engines: build them from the exported ONNX graphs, cache them by content, run them.

    build_engines(BuildSettings.from_strings("tiny", "fp16", "512", "24:48:120"))  -> one engine per graph and size group
    build_engines(settings, dry_run=True)   -> build-plan.json only: no TensorRT, no GPU

Modules: settings (BuildSettings, the build command), profiles (resolutions x frames -> size groups and
min/opt/max shapes), plan (the checked build plan), attention (the fused-attention checks: ONNX pattern
before, engine inspector after), builder (the TensorRT builder calls), build (export + plan + build + cache
orchestration), cache (keys, sidecars, refusals, plan checks), device_memory (budget arithmetic, the shared
scratch buffer), runtime (TRTEngine: load/activate/infer/unload, CUDA graphs, weight streaming), refit (LoRA refit),
trt_api (the lazy import and the list of TensorRT members used), trt_api_names (the name lists of
TensorRT 10/11 in trt_api/*.txt), quantized (the Q/DQ transformer graph of fp8/int8 builds), aoti
(AOTInductor packages of the transformer blocks: `--engine aoti`, same profiles, keys, sidecars, refusals). TensorRT is imported only inside the functions that need it.
"""

from .build import BuildResult, build_engines
from .cache import EngineFileError, EngineMismatchError
from .profiles import FrameRange
from .settings import BuildSettings

__all__ = ["BuildResult", "BuildSettings", "EngineFileError", "EngineMismatchError", "FrameRange", "build_engines"]
