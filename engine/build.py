"""`ruyi-trt build`: export (or reuse) the ONNX graphs, plan every engine, then build each (cached) TensorRT engine.

    build_engines(BuildSettings(model="tiny", precision="fp16", resolutions=("512",), frames=FrameRange(24, 48, 120)))

First the settings are resolved for the model and the targeted TensorRT (per-block or whole transformer,
ONNX Attention or decomposed; engine/settings.py), the graphs exported into the artifact cache and the
plan written and checked (engine/plan.py: one engine per graph and size group, refused before TensorRT
when a tensor reaches 2^31 elements). `dry_run` stops there and needs neither TensorRT nor a GPU.
Per engine: its cache key (engine/cache.py), skip it when `engines/<key>/engine.plan` is already there
and intact, else build it (engine/builder.py), check with TensorRT's engine inspector that every
attention ran as one fused layer (engine/attention.py), and write the plan, `build.log` (settings,
profile, attention, every TensorRT message) and last the `engine.json` sidecar into a temporary folder
that is fsynced and renamed to `engines/<key>` (files.atomic_folder), so an engine folder is always
complete and checked and a failed or interrupted build leaves nothing. A lock per key (files.file_lock)
makes a second process building the same engine wait, then reuse it. With `refit`, `refit_map.json`
(engine/refit.py) records which checkpoint tensor each ONNX weight is. With --precision fp8/int8 the
transformer engines are built from its Q/DQ graph (engine/quantized.py); --engine aoti builds AOTInductor
packages instead of TensorRT engines (engine/aoti.py).
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
from ..export.readiness import tensorrt_op_table
from ..export.source import ModelSource, model_source
from ..export.specs import EXPORT_DTYPES, TORCH_DTYPES
from ..files import atomic_folder, file_lock
from ..models.checkpoint import Checkpoint
from . import cache
from .attention import attention_patterns, check_fused_attention, describe
from .builder import BuilderOptions, build_plan
from .plan import PlannedEngine, planned_engines, write_plan
from .profiles import graph_specs, profile_to_json
from .settings import QUANTIZED, BuildSettings
from .trt_api import require_tensorrt, version_tuple

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """Engine folders per engine name (`<graph>` or `<graph>@<HxW>`), which were built now or found in the
    cache, and the plan file."""

    onnx_dir: Path
    plan: Path | None  # build-plan.json (None for AOTInductor packages)
    engines: dict[str, Path] = field(default_factory=dict)
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def build_engines(settings: BuildSettings, progress: bool = True, verbose: bool = False, dry_run: bool = False) -> BuildResult:
    """Plan, and unless `dry_run` build, every engine `settings` asks for; see the module docstring."""
    settings.validate()
    if settings.engine == "aoti":  # AOTInductor packages of the transformer blocks (engine/aoti.py)
        from .aoti import aoti_root, build_aoti_engines

        result = BuildResult(aoti_root(settings.out), None)
        build_aoti_engines(settings, result, progress)
        return result
    trt = _installed_tensorrt(required=not dry_run)
    if not dry_run:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("ruyi-trt build needs a CUDA GPU (TensorRT builds for the GPU it runs on); none is "
                               "visible. `ruyi-trt build --dry-run` plans the engines without one.")  # fmt: skip
    source = model_source(Checkpoint.resolve(settings.model))
    target = trt.__version__ if trt is not None else tensorrt_op_table()["tensorrt_version"]
    weights = source.transformer_weight_bytes(TORCH_DTYPES[EXPORT_DTYPES[settings.graph_dtype]])
    resolved = settings.resolved(weights, version_tuple(target))
    onnx_dir = ensure_exported(source, resolved.export_settings(), progress=progress)
    data = export_manifest.read_manifest(onnx_dir)
    specs = graph_specs(source.checkpoint, settings.graph_dtype)
    engines = planned_engines(resolved, specs, data, bool(resolved.per_block))
    root = cache.engines_root(settings.out)
    facts = {"dry_run": dry_run, "model": settings.model, "precision": settings.precision,
               "per_block": resolved.per_block, "attention": resolved.attention,
               "tensorrt": {"installed": trt.__version__ if trt is not None else None, "target": target}}  # fmt: skip
    result = BuildResult(onnx_dir, write_plan(resolved, engines, onnx_dir, data, facts, root, progress))
    if dry_run:
        return result
    # graph -> (ONNX file, identity) replacing the exported one: the Q/DQ transformer of fp8/int8 (made after the
    # plan, so a dry run needs no calibration)
    sources = {}
    if settings.precision in QUANTIZED:
        from .quantized import quantized_transformer

        quantized = quantized_transformer(resolved, source.checkpoint, onnx_dir, progress)
        if quantized.problems:
            raise ValueError(f"{quantized.path} is not TensorRT-ready:\n  " + "\n  ".join(map(str, quantized.problems)))
        sources["transformer"] = (quantized.path, quantized.onnx_id)
    platform = cache.Platform.current(trt.__version__)
    options = BuilderOptions(settings.weight_streaming, settings.refit, settings.workspace_gb, settings.timing_cache, verbose)
    for planned in engines:
        entry = data["components"][planned.component]
        folder, built = build_graph(planned, entry, onnx_dir, source, resolved, options, platform, root, progress,
                                    sources.get(planned.graph))  # fmt: skip
        result.engines[planned.name] = folder
        (result.built if built else result.reused).append(planned.name)
    return result


def _installed_tensorrt(required: bool):
    """The tensorrt module; when not `required` (a dry run) None if it is missing or unusable."""
    try:
        return require_tensorrt("ruyi-trt build")
    except ImportError:
        if required:
            raise
        return None


def build_graph(planned: PlannedEngine, entry: dict, onnx_dir: Path, source: ModelSource, settings: BuildSettings,
                options: BuilderOptions, platform: cache.Platform, root: Path, progress: bool,
                replacement: tuple[Path, str] | None = None) -> tuple[Path, bool]:  # fmt: skip
    """Build one engine into its cache folder unless an intact one is there; (folder, whether it was built now).
    `replacement` (ONNX file, identity) stands for the exported graph (the Q/DQ transformer of an fp8/int8 build)."""
    graph, profile = planned.graph, planned.profile
    onnx_id = replacement[1] if replacement else cache.onnx_hash(entry, graph)
    key = cache.engine_key(graph, onnx_id, settings.precision, profile, options.flags(), platform)
    folder = root / key
    with file_lock(folder):
        existing = cache.read_record(folder)
        if existing is not None:
            try:
                cache.read_plan(folder, existing)
                log.info("%s: engine %s is cached, skipping", planned.name, folder)
                return folder, False
            except cache.EngineFileError as exc:
                log.warning("%s: rebuilding (%s)", planned.name, exc)
        onnx_path = replacement[0] if replacement else onnx_dir / entry["graphs"][graph]["file"]
        started = time.perf_counter()
        result = build_plan(onnx_path, profile, options, progress)
        seconds = round(time.perf_counter() - started, 2)
        fused = check_fused_attention(result.plan, onnx_path, profile, planned.name)  # raises when one did not fuse
        attention = {**planned.report.get("attention", {}), "patterns": attention_patterns(onnx_path), "fused": fused}
        record = cache.EngineRecord(
            key=key, graph=graph, component=planned.component, precision=settings.precision, platform=platform,
            checkpoint_hash=entry["checkpoint_hash"], onnx_hash=onnx_id, onnx_file=str(onnx_path), profile=profile,
            flags=options.flags(), settings=settings, engine_bytes=len(result.plan),
            engine_sha256=hashlib.sha256(result.plan).hexdigest(), build_seconds=seconds, attention=attention,
        )  # fmt: skip
        lines = [
            f"ruyi-trt build log: {planned.name} ({planned.component}), sizes {', '.join(planned.report.get('sizes', []))}",
            f"command: {settings.command()}", f"onnx: {onnx_path} ({onnx_id})", f"platform: {platform}",
            f"flags: {options.flags()}", f"profile: {json.dumps(profile_to_json(profile))}",
            f"network: {result.num_layers} layers, inputs {json.dumps(result.network_inputs)}",
            f"attention: {attention.get('form', 'none')}, {fused} checked fused in the engine; "
            + describe(attention["patterns"]),
            f"built in {seconds} s, {len(result.plan)} bytes", "", "TensorRT messages:", *result.messages,
        ]  # fmt: skip

        def write(tmp: Path) -> None:
            (tmp / cache.PLAN_NAME).write_bytes(result.plan)
            (tmp / cache.LOG_NAME).write_text("\n".join(lines) + "\n")
            if settings.refit and planned.component == "transformer":
                from .refit import write_refit_map

                write_refit_map(tmp, onnx_path, source, settings.precision)
            cache.write_record(tmp, record)

        atomic_folder(folder, write, replace=True)
    log.info("%s: built %s in %.1f s", planned.name, folder, seconds)
    return folder, True
