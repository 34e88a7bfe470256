"""ONNX export of the Ruyi components and the TensorRT-readiness check.

    export_checkpoint(checkpoint, out_dir, ExportSettings(dtype="fp16"))  -> graphs + manifest.json
    check_tensorrt_ready("out/transformer.onnx")                                -> [Problem, ...]

Modules: specs (ExportSpec per graph), wrappers (modules traced per graph), source (checkpoint folder or
full-random, read piece by piece), graph_passes (fold, ONNX Attention, fp32 upcast, dim names), stitch (the
whole transformer from the per-block graphs), graph_stats (tensor sizes at given shapes by shape inference),
manifest (manifest.json, checkpoint hashing), onnx_export (the export driver), readiness (the TensorRT check
against trt_supported_ops.json), qdq (QuantizeLinear/DequantizeLinear from calibrated scales: the fp8/int8 graphs).
"""

from .onnx_export import (
    COMPONENTS,
    ExportResult,
    ExportSettings,
    ensure_exported,
    export_checkpoint,
)
from .readiness import Problem, check_tensorrt_ready
from .specs import ExportSpec, TensorSpec, VideoShape, video_shapes

__all__ = [
    "COMPONENTS", "ExportResult", "ExportSettings", "ExportSpec", "Problem", "TensorSpec", "VideoShape",
    "check_tensorrt_ready", "ensure_exported", "export_checkpoint", "video_shapes",
]  # fmt: skip
