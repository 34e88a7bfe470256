"""Export a Ruyi checkpoint's components to ONNX graphs, cached by content, written atomically.

`export_checkpoint(checkpoint, out_dir, settings)` writes `out_dir/<graph>.onnx` (plus one
`<graph>.onnx.data` for graphs over 2 GB) and `out_dir/manifest.json` (schema in export/manifest.py).
Per component it: hashes the checkpoint files, skips the component when the manifest already lists it
with the same hash and settings and its files are intact (size and sha256), otherwise loads the model, traces
every graph of the component into a temporary folder next to `out_dir`, runs the clean-up passes
(export/graph_passes.py), checks each graph with onnx.checker, and only then fsyncs the files, moves them into
`out_dir` and records them. A failure (Ctrl-C included) leaves neither half-written graphs nor a manifest entry.
A lock (files.file_lock) serializes processes exporting into the same `out_dir`: the second one waits, then
reuses what the first exported.

Graphs per component (specs in export/specs.py, wrappers in export/wrappers.py):
    transformer     transformer, or with per_block: transformer_embed, transformer_block_plain,
                    transformer_block_skip, transformer_unembed (instead of the whole graph)
    vae-encoder     vae_encoder
    vae-decoder     vae_decoder, vae_decoder_one_frame
    image-encoder   image_encoder

Exporters: "torchscript" (torch.onnx's tracing exporter, the default: a few seconds per graph; a Python
branch takes the path of the traced sizes, which the specs choose) or "dynamo" (torch.export based, about
5-10x slower here; dynamic dims are exported with Dim.AUTO and renamed to the spec's names; needed for
bf16, where the tracing exporter fails on bfloat16 constants).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..deps import require
from ..files import explained_write_errors, file_digest, file_lock, publish, scratch_folder
from ..models.checkpoint import Checkpoint
from . import graph_passes, manifest
from .specs import EXPORT_DTYPES, TORCH_DTYPES, ExportSpec

log = logging.getLogger(__name__)

COMPONENTS = ("transformer", "vae-encoder", "vae-decoder", "image-encoder")
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18
MAX_PROTO_BYTES = 2**31 - 2**26  # above this, weights go to one external .onnx.data file (protobuf's 2 GB limit)


@dataclass(frozen=True)
class ExportSettings:
    """How to export: weight/activation dtype, ONNX opset, per-block transformer graphs, and the exporter."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16 (norms and softmax still run in float32)
    opset: int = DEFAULT_OPSET
    per_block: bool = False
    exporter: str = "torchscript"

    def validate(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {tuple(EXPORT_DTYPES)}.")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter: {self.exporter!r} is not supported; use one of {EXPORTERS}.")
        if self.dtype == "bf16" and self.exporter != "dynamo":
            raise ValueError(
                "dtype: bf16 needs exporter dynamo (--exporter dynamo); the torchscript exporter fails on "
                "bfloat16 constants in the VAE and CLIP graphs."
            )
        if not 17 <= self.opset <= 20:
            raise ValueError(f"opset: {self.opset} is not supported; use 17..20 (LayerNormalization needs 17, "
                             "TensorRT 10's parser stops at 20).")  # fmt: skip

    def for_component(self, component: str) -> dict:
        """The settings that shape `component`'s graphs (what its manifest entry records)."""
        settings = asdict(self)
        if component != "transformer":
            settings.pop("per_block")
        return settings


@dataclass
class ExportResult:
    """What `export_checkpoint` did: the folder, the components exported and those reused from the cache."""

    out_dir: Path
    manifest: dict
    exported: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def export_checkpoint(
    checkpoint: Checkpoint | str | Path,
    out_dir: str | Path,
    settings: ExportSettings = ExportSettings(),
    components: Sequence[str] = COMPONENTS,
    progress: bool = True,
    reset_damaged: bool = False,
) -> ExportResult:
    """Export `components` of `checkpoint` (or the checkpoint folder it names) into `out_dir` (see the module
    docstring). A damaged manifest.json is an error, or with `reset_damaged` (the artifact cache) is replaced
    by exporting everything again."""
    settings.validate()
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components: {unknown or '[]'} not supported; choose from {COMPONENTS}.")
    require("onnx", "ONNX export")
    checkpoint, out_dir = Checkpoint.resolve(checkpoint, download=False), Path(out_dir)
    hashes = {c: manifest.component_hash(checkpoint, c) for c in components}  # fails early on missing files
    with file_lock(out_dir):
        return _export_locked(checkpoint, out_dir, settings, components, hashes, progress, reset_damaged)


def _export_locked(checkpoint: Checkpoint, out_dir: Path, settings: ExportSettings, components: Sequence[str],
                   hashes: dict[str, str], progress: bool, reset_damaged: bool) -> ExportResult:  # fmt: skip
    try:
        data = manifest.read_manifest(out_dir)
    except ValueError as exc:
        if not reset_damaged:
            raise
        log.warning("%s Exporting every graph again.", exc)
        data = manifest.empty_manifest()
    result = ExportResult(out_dir, data)
    for component in components:
        wanted = settings.for_component(component)
        if manifest.entry_is_current(out_dir, data["components"].get(component), hashes[component], wanted):
            log.info("%s: graphs in %s are current, skipping", component, out_dir)
            result.reused.append(component)
            continue
        started = time.perf_counter()
        graphs = _export_component(checkpoint, out_dir, component, settings, progress)
        previous = data["components"].get(component, {}).get("graphs", {})
        data["components"][component] = {
            "checkpoint_hash": hashes[component],
            "settings": wanted,
            "versions": manifest.tool_versions(settings.exporter),
            "seconds": round(time.perf_counter() - started, 2),
            "graphs": graphs,
        }
        manifest.write_manifest(out_dir, data)
        _remove_stale(out_dir, previous, graphs)
        result.exported.append(component)
    return result


def ensure_exported(checkpoint: Checkpoint | str | Path, settings: ExportSettings, components: Sequence[str] = COMPONENTS,
                    progress: bool = True) -> Path:  # fmt: skip
    """The artifact-cache folder `cache_root()/onnx/<key>` holding current graphs, exporting what is missing.

    The key hashes the components' checkpoint hashes and the settings, so each checkpoint and dtype has its own folder.
    """
    from ..models.presets import cache_root

    settings.validate()
    checkpoint = Checkpoint.resolve(checkpoint, download=False)
    key = hashlib.sha256()
    for component in components:
        key.update(f"{component}={manifest.component_hash(checkpoint, component)};".encode())
    key.update(repr(sorted(asdict(settings).items())).encode())
    out_dir = cache_root() / "onnx" / key.hexdigest()[:16]
    export_checkpoint(checkpoint, out_dir, settings, components, progress, reset_damaged=True)
    return out_dir


def component_graphs(
    checkpoint: Checkpoint, component: str, settings: ExportSettings
) -> list[tuple[ExportSpec, torch.nn.Module]]:
    """(spec, export wrapper) for every graph of `component`, with the weights loaded in the export dtype."""
    from . import specs, wrappers

    dtype_name = EXPORT_DTYPES[settings.dtype]
    dtype = TORCH_DTYPES[dtype_name]
    if component == "transformer":
        model = checkpoint.load_transformer(dtype)
        clip_tokens = checkpoint.clip_geometry[1]
        if not settings.per_block:
            return [
                (
                    specs.transformer_spec(model.config, checkpoint.vae, dtype_name, clip_tokens),
                    wrappers.TransformerGraph(model),
                )
            ]
        embed, plain, skip, unembed = specs.transformer_stage_specs(model.config, checkpoint.vae, dtype_name, clip_tokens)
        block = lambda has_skip: model.blocks[specs.example_block_index(model.config, has_skip)]
        return [
            (embed, wrappers.TransformerEmbedGraph(model)),
            (plain, wrappers.TransformerBlockGraph(block(False))),
            (skip, wrappers.TransformerBlockGraph(block(True))),
            (unembed, wrappers.TransformerUnembedGraph(model)),
        ]
    if component in ("vae-encoder", "vae-decoder"):
        vae = checkpoint.load_vae(dtype)
        if component == "vae-encoder":
            return [(specs.vae_encoder_spec(vae.config, dtype_name), wrappers.VAEEncoderGraph(vae))]
        chunk, one_frame = specs.vae_decoder_specs(vae.config, dtype_name)
        return [(chunk, wrappers.VAEDecoderGraph(vae)), (one_frame, wrappers.VAEDecoderOneFrameGraph(vae))]
    encoder = checkpoint.load_image_encoder(dtype)
    spec = specs.image_encoder_spec(encoder.image_size, encoder.num_tokens, encoder.hidden_size, dtype_name)
    return [(spec, wrappers.ImageEncoderGraph(encoder))]


def _export_component(checkpoint: Checkpoint, out_dir: Path, component: str, settings: ExportSettings,
                      progress: bool) -> dict:  # fmt: skip
    """Export every graph of `component` into a temp folder, then fsync the files and move them into `out_dir`."""
    with scratch_folder(out_dir, component) as tmp:
        graphs = component_graphs(checkpoint, component, settings)
        entries = {}
        for spec, module in tqdm(graphs, desc=f"export {component}", unit="graph", disable=not progress):
            started = time.perf_counter()
            entries[spec.name] = export_graph(module, spec, tmp, settings)
            log.info("%s: exported %s in %.1f s (%.2f MB)", component, spec.name, time.perf_counter() - started,
                     entries[spec.name]["bytes"] / 1e6)  # fmt: skip
        with explained_write_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            for entry in entries.values():
                for name in filter(None, (entry["data_file"], entry["file"])):
                    publish(tmp / name, out_dir / name)
        return entries


def _remove_stale(out_dir: Path, previous: dict, current: dict) -> None:
    """Delete the files of graphs a component no longer has (e.g. the whole transformer after --per-block)."""
    keep = {name for entry in current.values() for name in (entry["file"], entry["data_file"]) if name}
    for entry in previous.values():
        for name in filter(None, (entry["file"], entry.get("data_file"))):
            if name not in keep:
                (out_dir / name).unlink(missing_ok=True)


def export_graph(module: torch.nn.Module, spec: ExportSpec, folder: Path, settings: ExportSettings) -> dict:
    """Trace `module` at `spec.trace_dims`, clean the graph and save `folder/<spec.name>.onnx`.

    Returns the graph's manifest entry."""
    onnx = require("onnx", "ONNX export")
    module = module.eval()
    inputs = spec.sample_inputs()
    with torch.no_grad():
        if settings.exporter == "dynamo":
            model = _export_dynamo(module, spec, inputs, settings.opset)
        else:
            model = _export_torchscript(module, spec, inputs, settings.opset, folder)
    model = graph_passes.fold_and_clean(model)
    fp32_nodes = 0
    if settings.dtype != "fp32":
        model, fp32_nodes = graph_passes.upcast_to_fp32(model)
    graph_passes.name_dims(model, spec)
    path = folder / f"{spec.name}.onnx"
    external = sum(len(t.raw_data) for t in model.graph.initializer) > MAX_PROTO_BYTES
    data_file = f"{spec.name}.onnx.data" if external else None
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)  # fmt: skip
    onnx.checker.check_model(str(path))
    files = [path] + ([folder / data_file] if data_file else [])
    return {
        "file": path.name,
        "data_file": data_file,
        "bytes": sum(f.stat().st_size for f in files),
        "sha256": {f.name: file_digest(f) for f in files},
        "opset": settings.opset,
        "fp32_nodes": fp32_nodes,
        **spec.to_dict(),
    }


def _export_torchscript(module, spec: ExportSpec, inputs: dict, opset: int, folder: Path):
    onnx = require("onnx", "ONNX export")
    with scratch_folder(folder / spec.name, "raw") as raw_dir:
        raw = raw_dir / "model.onnx"
        with warnings.catch_warnings():  # tracer notes on Python branches: the specs pick the traced sizes for them
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, tuple(inputs.values()), str(raw), input_names=spec.input_names, output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )  # fmt: skip
        return onnx.load(str(raw))  # loads any external weight files the exporter wrote


def _export_dynamo(module, spec: ExportSpec, inputs: dict, opset: int):
    require("onnxscript", "the dynamo ONNX exporter")
    auto = torch.export.Dim.AUTO
    shapes = tuple({axis: auto for axis in spec.dynamic_axes.get(name, {})} or None for name in inputs)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # torch.export wants *args' shapes as one nested tuple
        fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
        shapes = shapes[:fixed] + (shapes[fixed:],)
    program = torch.onnx.export(
        module, tuple(inputs.values()), input_names=spec.input_names, output_names=spec.output_names,
        dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
        optimize=True,  # onnxscript's optimizer: turns chunk's SplitToSequence/SequenceAt into Split, folds bf16
    )  # fmt: skip
    return program.model_proto
