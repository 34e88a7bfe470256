"""`ruyi-trt build --precision fp8|int8`: the transformer engine is built from its Q/DQ graph.

The graphs are exported in fp16 (BuildSettings.export_settings); the whole-transformer graph then gets explicit
QuantizeLinear/DequantizeLinear pairs from a calibration folder (calib/, export/qdq.py), and the strongly typed
network TensorRT parses from it runs those GEMMs in FP8 / INT8 and the rest in fp16. The VAE and CLIP graphs
stay fp16. `quantized_transformer(settings, ...)` does everything but the TensorRT call (export, Q/DQ graph,
readiness check, profile), so it runs and is tested without TensorRT or a GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..calib.store import CalibrationSettings, cache_dir, load_calibration, read_record
from ..export import manifest as export_manifest
from ..export.onnx_export import ensure_exported
from ..export.qdq import ensure_qdq_graph
from ..export.readiness import Problem, check_tensorrt_ready
from ..models.checkpoint import Checkpoint
from .cache import onnx_hash
from .profiles import Profile, SizeGroup, graph_profiles, graph_specs
from .settings import QUANTIZED, BuildSettings


@dataclass(frozen=True)
class QuantizedGraph:
    """The Q/DQ transformer graph an fp8/int8 engine is built from."""

    path: Path
    onnx_id: str  # the source graph's identity + the scales' digest + the precision (for the engine key)
    profiles: list[tuple[SizeGroup, Profile]]  # one engine per size group (engine/profiles.py)
    problems: list[Problem]  # export.readiness findings (empty when TensorRT should parse it)
    calibration: Path


def calibration_folder(settings: BuildSettings, checkpoint: Checkpoint) -> Path:
    """`--calibration`, else the cached calibration of this checkpoint; ValueError with the command otherwise."""
    if settings.calibration is not None:
        return Path(settings.calibration)
    folder = cache_dir(checkpoint.weights_hash("transformer"), settings.precision, CalibrationSettings())
    if read_record(folder) is None:
        raise ValueError(f"--precision {settings.precision}: no calibration of {checkpoint.name} is cached; make one "
                         f"with: ruyi-trt calibrate --model {checkpoint.name} --precision {settings.precision} --out DIR "
                         "and pass --calibration DIR")  # fmt: skip
    return folder


def quantized_transformer(settings: BuildSettings, checkpoint: Checkpoint, onnx_dir: Path | None = None,
                          progress: bool = True) -> QuantizedGraph:  # fmt: skip
    """Export (or reuse) the fp16 graphs, make the Q/DQ transformer graph and check it; see the module docstring.
    `settings` are resolved ones (BuildSettings.resolved: the whole transformer, the attention form decided)."""
    if settings.precision not in QUANTIZED:
        raise ValueError(f"--precision {settings.precision} is not an 8-bit precision ({QUANTIZED}).")
    calibration = calibration_folder(settings, checkpoint)
    scales, record = load_calibration(calibration, settings.precision, checkpoint.weights_hash("transformer"))
    onnx_dir = onnx_dir or ensure_exported(checkpoint, settings.export_settings(), ("transformer",), progress=progress)
    entry = export_manifest.read_manifest(onnx_dir)["components"]["transformer"]
    path = ensure_qdq_graph(onnx_dir / entry["graphs"]["transformer"]["file"], scales.layers, record["scales_sha256"],
                            settings.precision)  # fmt: skip
    identity = f"{onnx_hash(entry, 'transformer')}|{record['scales_sha256']}|{settings.precision}"
    spec = graph_specs(checkpoint, settings.graph_dtype)["transformer"]
    profiles = graph_profiles(spec, "transformer", settings.resolutions, settings.frames, settings.batch)
    return QuantizedGraph(path, "sha256:" + hashlib.sha256(identity.encode()).hexdigest(), profiles,
                          check_tensorrt_ready(path), calibration)  # fmt: skip
