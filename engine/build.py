"""`ruyi-trt build`: export (or reuse) the ONNX graphs, then build one cached TensorRT engine per graph.

    build_engines(BuildSettings(model="tiny", precision="fp16", resolutions=("512",), frames=FrameRange(24, 48, 120)))

Per graph: compute its optimization profile (engine/profiles.py), its cache key (engine/cache.py), skip
it when `engines/<key>/engine.plan` is already there and intact, else build it (engine/builder.py) and write
the plan, `build.log` (settings, profile, attention-pattern check, every TensorRT message) and last the
`engine.json` sidecar into a temporary folder that is fsynced and renamed to `engines/<key>` (files.atomic_folder),
so an engine folder is always complete and a failed or interrupted build leaves nothing. A lock per key
(files.file_lock) makes a second process building the same engine wait, then reuse it.
With `refit`, `refit_map.json` (engine/refit.py) records which checkpoint tensor each ONNX weight is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..export import manifest as export_manifest
from ..export.onnx_export import ensure_exported
from ..export.specs import ExportSpec
from ..files import atomic_folder, file_lock
from ..models.checkpoint import Checkpoint
from . import cache
from .attention import attention_patterns, describe
from .builder import BuilderOptions, build_plan
from .profiles import graph_profile, graph_specs, profile_to_json
from .settings import BuildSettings
from .trt_api import require_tensorrt

log = logging.getLogger(__name__)

# graphs the runtime needs per component (the per-block transformer graphs replace the whole one)
WHOLE_TRANSFORMER = ("transformer",)
BLOCK_TRANSFORMER = ("transformer_embed", "transformer_block_plain", "transformer_block_skip", "transformer_unembed")


@dataclass
class BuildResult:
    """Engine folders per graph, and which were built now or found in the cache."""

    onnx_dir: Path
    engines: dict[str, Path] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def build_engines(settings: BuildSettings, progress: bool = True, verbose: bool = False) -> BuildResult:
    """Build (or find) every engine `settings` asks for; see the module docstring."""
    settings.validate()
    trt = require_tensorrt("ruyi-trt build")  # fail before the export when TensorRT is missing
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("ruyi-trt build needs a CUDA GPU (TensorRT builds for the GPU it runs on); none is visible.")
    platform = cache.Platform.current(trt.__version__)
    checkpoint = Checkpoint.resolve(settings.model)
    onnx_dir = ensure_exported(checkpoint, settings.export_settings(), progress=progress)
    data = export_manifest.read_manifest(onnx_dir)
    options = BuilderOptions(settings.weight_streaming, settings.refit, settings.workspace_gb, settings.timing_cache, verbose)
    root = cache.engines_root(settings.out)
    result = BuildResult(onnx_dir)
    specs = graph_specs(checkpoint, settings.precision)
    for component, entry in data["components"].items():
        for graph in graphs_of(component, entry, settings.per_block):
            folder, built = build_graph(specs[graph], component, entry, onnx_dir, checkpoint, settings, options,
                                        platform, root, progress)  # fmt: skip
            result.engines[graph] = folder
            (result.built if built else result.reused).append(graph)
    return result


def graphs_of(component: str, entry: dict, per_block: bool) -> list[str]:
    """The graphs of a manifest component that the runtime uses."""
    graphs = list(entry["graphs"])
    if component == "transformer":
        wanted = BLOCK_TRANSFORMER if per_block else WHOLE_TRANSFORMER
        graphs = [g for g in wanted if g in entry["graphs"]]
    return graphs


def build_graph(spec: ExportSpec, component: str, entry: dict, onnx_dir: Path, checkpoint: Checkpoint, settings: BuildSettings,
                options: BuilderOptions, platform: cache.Platform, root: Path, progress: bool) -> tuple[Path, bool]:  # fmt: skip
    """Build one engine into its cache folder unless an intact one is there; (folder, whether it was built now)."""
    graph = spec.name
    profile = graph_profile(spec, component, settings.resolutions, settings.frames, settings.batch)
    onnx_id = cache.onnx_hash(entry, graph)
    key = cache.engine_key(graph, onnx_id, settings.precision, profile, options.flags(), platform)
    folder = root / key
    with file_lock(folder):
        existing = cache.read_record(folder)
        if existing is not None:
            try:
                cache.read_plan(folder, existing)
                log.info("%s: engine %s is cached, skipping", graph, folder)
                return folder, False
            except cache.EngineFileError as exc:
                log.warning("%s: rebuilding (%s)", graph, exc)
        onnx_path = onnx_dir / entry["graphs"][graph]["file"]
        attention = attention_patterns(onnx_path)
        started = time.perf_counter()
        result = build_plan(onnx_path, profile, options, progress)
        seconds = round(time.perf_counter() - started, 2)
        record = cache.EngineRecord(
            key=key, graph=graph, component=component, precision=settings.precision, platform=platform,
            checkpoint_hash=entry["checkpoint_hash"], onnx_hash=onnx_id, onnx_file=str(onnx_path), profile=profile,
            flags=options.flags(), settings=settings, engine_bytes=len(result.plan),
            engine_sha256=hashlib.sha256(result.plan).hexdigest(), build_seconds=seconds, attention=attention,
        )  # fmt: skip
        lines = [
            f"ruyi-trt build log: {graph} ({component})", f"command: {settings.command()}",
            f"onnx: {onnx_path} ({onnx_id})", f"platform: {platform}", f"flags: {options.flags()}",
            f"profile: {json.dumps(profile_to_json(profile))}",
            f"network: {result.num_layers} layers, inputs {json.dumps(result.network_inputs)}", describe(attention),
            f"built in {seconds} s, {len(result.plan)} bytes", "", "TensorRT messages:", *result.messages,
        ]  # fmt: skip

        def write(tmp: Path) -> None:
            (tmp / cache.PLAN_NAME).write_bytes(result.plan)
            (tmp / cache.LOG_NAME).write_text("\n".join(lines) + "\n")
            if settings.refit and component == "transformer":
                from .refit import write_refit_map

                write_refit_map(tmp, onnx_path, checkpoint.part("transformer"), settings.precision)
            cache.write_record(tmp, record)

        atomic_folder(folder, write, replace=True)
    log.info("%s: built %s in %.1f s (%s)", graph, folder, seconds, describe(attention))
    return folder, True
