"""Export a Ruyi model's components to ONNX graphs, cached by content, written atomically.

`export_checkpoint(checkpoint, out_dir, settings)` writes `out_dir/<graph>.onnx` (plus one `<graph>.onnx.data`
for graphs over 2 GB) and `out_dir/manifest.json` (schema in export/manifest.py). The checkpoint is a
`Checkpoint`, what `Checkpoint.resolve` takes (a folder, `tiny`, `full-random`), or a ModelSource
(export/source.py). Per component it: hashes the source, skips the component when the manifest already lists it
with the same hash and settings and its files are intact (size and sha256), otherwise loads what the graphs
need, traces every graph of the component into a temporary folder next to `out_dir`, runs the clean-up passes
(export/graph_passes.py), checks each graph with onnx.checker, and only then fsyncs the files, moves them into
`out_dir` and records them (with the export time and the process's peak host RSS). A failure (Ctrl-C included)
leaves neither half-written graphs nor a manifest entry. A lock (files.file_lock) serializes processes exporting
into the same `out_dir`: the second one waits, then reuses what the first exported.

Graphs per component (specs in export/specs.py, wrappers in export/wrappers.py):
    transformer     transformer, or with per_block: transformer_embed, transformer_block_plain,
                    transformer_block_skip, transformer_unembed (instead of the whole graph)
    vae-encoder     vae_encoder
    vae-decoder     vae_decoder, vae_decoder_one_frame
    image-encoder   image_encoder
The transformer is always traced as its four stage graphs (block weights are graph inputs, so tracing reads
only the embed/unembed weights); the whole-model graph is stitched from them with the block weights
streamed into its .onnx.data file (export/stitch.py). At full size neither form holds the 14.4 GB of fp16
transformer weights in memory.

Exporters: "torchscript" (torch.onnx's tracing exporter: a few seconds per graph; a Python branch takes the
path of the traced sizes, which the specs choose) or "dynamo" (torch.export based, about 3-10x slower on small
graphs; dynamic dims are exported with Dim.AUTO and renamed to the spec's names). "auto" (the default) picks
torchscript, and dynamo where the tracing exporter fails or is too slow: bf16 (it fails on the bfloat16 constant
of an explicit attention scale) and the fp16 VAE graphs. The tracer runs the graph once, for real, on the CPU in
the export dtype, and torch's CPU Conv3d in half precision is a slow scalar path: tracing the full-size VAE
encoder in fp16 took 937 s on a 2-core machine; torch.export traces on fake tensors (40 s).
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
from .source import ModelSource, model_source
from .specs import EXPORT_DTYPES, TORCH_DTYPES, ExportSpec

log = logging.getLogger(__name__)

VAE_COMPONENTS = ("vae-encoder", "vae-decoder")
COMPONENTS = ("transformer", *VAE_COMPONENTS, "image-encoder")
EXPORTERS = ("auto", "torchscript", "dynamo")
ATTENTION_FORMS = ("decomposed", "onnx")
DEFAULT_OPSET = 18
MAX_PROTO_BYTES = 2**31 - 2**26  # above this, weights go to one external .onnx.data file (protobuf's 2 GB limit)


@dataclass(frozen=True)
class ExportSettings:
    """How to export: weight/activation dtype, ONNX opset, per-block transformer graphs, the exporter and the
    attention form.

    exporter "auto" takes torchscript where it works and dynamo where it does not (bf16: the tracing
    exporter fails on a bfloat16 attention scale constant) or is too slow (fp16 VAE graphs: the trace runs
    half-precision Conv3d on the CPU). attention "onnx" turns every attention core into one ONNX `Attention`
    node (the graph's opset becomes 23; TensorRT >= 10.14 parses it into its fused IAttention layer, ONNX
    Runtime runs it too);
    "decomposed" keeps MatMul -> Softmax -> MatMul (for older TensorRT, which fuses that pattern itself).
    """

    dtype: str = "fp32"  # fp32 | fp16 | bf16 (norms and softmax still run in float32)
    opset: int = DEFAULT_OPSET  # the exporter's opset; attention "onnx" raises the saved graph's to 23
    per_block: bool = False
    exporter: str = "auto"
    attention: str = "decomposed"

    def validate(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {tuple(EXPORT_DTYPES)}.")
        if self.exporter not in EXPORTERS:
            raise ValueError(f"exporter: {self.exporter!r} is not supported; use one of {EXPORTERS}.")
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"attention: {self.attention!r} is not supported; use one of {ATTENTION_FORMS}.")
        if self.dtype == "bf16" and self.exporter == "torchscript":
            raise ValueError(
                "dtype: bf16 needs exporter auto or dynamo (--exporter auto); the torchscript exporter fails on "
                "the bfloat16 constant of an explicit attention scale."
            )
        if not 17 <= self.opset <= 20:
            raise ValueError(f"opset: {self.opset} is not supported; use 17..20 (LayerNormalization needs 17, "
                             "the torchscript exporter stops at 20; --attention onnx raises graphs to 23).")  # fmt: skip

    def exporter_for(self, component: str) -> str:
        """The exporter that traces `component`'s graphs."""
        if self.exporter != "auto":
            return self.exporter
        half_vae = self.dtype == "fp16" and component in VAE_COMPONENTS
        return "dynamo" if self.dtype == "bf16" or half_vae else "torchscript"

    def for_component(self, component: str) -> dict:
        """The settings that shape `component`'s graphs (what its manifest entry records)."""
        settings = {**asdict(self), "exporter": self.exporter_for(component)}
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
    checkpoint: Checkpoint | str | Path | ModelSource,
    out_dir: str | Path,
    settings: ExportSettings = ExportSettings(),
    components: Sequence[str] = COMPONENTS,
    progress: bool = True,
    reset_damaged: bool = False,
) -> ExportResult:
    """Export `components` of `checkpoint` (a Checkpoint, what Checkpoint.resolve takes, or a ModelSource) into
    `out_dir` (see the module docstring). A damaged manifest.json is an error, or with `reset_damaged` (the
    artifact cache) is replaced by exporting everything again."""
    settings.validate()
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components: {unknown or '[]'} not supported; choose from {COMPONENTS}.")
    require("onnx", "ONNX export")
    source, out_dir = model_source(checkpoint), Path(out_dir)
    hashes = {c: source.component_hash(c) for c in components}  # fails early on missing files
    with file_lock(out_dir):
        return _export_locked(source, out_dir, settings, components, hashes, progress, reset_damaged)


def _export_locked(source: ModelSource, out_dir: Path, settings: ExportSettings, components: Sequence[str],
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
        graphs = _export_component(source, out_dir, component, settings, progress)
        previous = data["components"].get(component, {}).get("graphs", {})
        data["components"][component] = {
            "checkpoint_hash": hashes[component],
            "settings": wanted,
            "versions": manifest.tool_versions(settings.exporter_for(component)),
            "seconds": round(time.perf_counter() - started, 2),
            "peak_host_rss_bytes": peak_host_rss_bytes(),
            "graphs": graphs,
        }
        manifest.write_manifest(out_dir, data)
        _remove_stale(out_dir, previous, graphs)
        result.exported.append(component)
    return result


def ensure_exported(checkpoint: Checkpoint | str | Path | ModelSource, settings: ExportSettings,
                    components: Sequence[str] = COMPONENTS, progress: bool = True) -> Path:  # fmt: skip
    """The artifact-cache folder `cache_root()/onnx/<key>` holding current graphs, exporting what is missing.

    The key hashes the components' checkpoint hashes and the settings, so each checkpoint and dtype has its own folder.
    """
    from ..models.presets import cache_root

    settings.validate()
    source = model_source(checkpoint)
    key = hashlib.sha256()
    for component in components:
        key.update(f"{component}={source.component_hash(component)};".encode())
    key.update(repr(sorted(asdict(settings).items())).encode())
    out_dir = cache_root() / "onnx" / key.hexdigest()[:16]
    export_checkpoint(source, out_dir, settings, components, progress, reset_damaged=True)
    return out_dir


def peak_host_rss_bytes() -> int:
    """This process's peak resident set size so far (getrusage; KiB on Linux)."""
    import resource
    import sys

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def component_graphs(
    checkpoint: Checkpoint | str | Path | ModelSource, component: str, settings: ExportSettings
) -> list[tuple[ExportSpec, torch.nn.Module]]:
    """(spec, export wrapper) for every graph traced for `component`, with the weights loaded in the export dtype.

    The transformer is always traced as its four stage graphs (the whole-model graph is stitched from them);
    the block graphs take their weights as inputs, so only the embed/unembed weights are read."""
    from . import specs, wrappers

    source = model_source(checkpoint)
    dtype_name = EXPORT_DTYPES[settings.dtype]
    dtype = TORCH_DTYPES[dtype_name]
    if component == "transformer":
        config = source.transformer_config()
        model = source.transformer(dtype, keys=lambda key: not key.startswith("blocks."))
        stages = specs.transformer_stage_specs(config, source.vae_config(), dtype_name, source.clip_geometry()[1])
        embed, plain, skip, unembed = stages
        block = lambda has_skip: model.blocks[specs.example_block_index(config, has_skip)]  # on the meta device
        return [
            (embed, wrappers.TransformerEmbedGraph(model)),
            (plain, wrappers.TransformerBlockGraph(block(False))),
            (skip, wrappers.TransformerBlockGraph(block(True))),
            (unembed, wrappers.TransformerUnembedGraph(model)),
        ]
    if component in VAE_COMPONENTS:
        vae = source.vae(dtype)
        if component == "vae-encoder":
            return [(specs.vae_encoder_spec(vae.config, dtype_name), wrappers.VAEEncoderGraph(vae))]
        chunk, one_frame = specs.vae_decoder_specs(vae.config, dtype_name)
        return [(chunk, wrappers.VAEDecoderGraph(vae)), (one_frame, wrappers.VAEDecoderOneFrameGraph(vae))]
    encoder = source.image_encoder(dtype)
    spec = specs.image_encoder_spec(encoder.image_size, encoder.num_tokens, encoder.hidden_size, dtype_name)
    return [(spec, wrappers.ImageEncoderGraph(encoder))]


def reference_graph(checkpoint: Checkpoint | str | Path | ModelSource, graph: str,
                    settings: ExportSettings = ExportSettings()) -> tuple[ExportSpec, torch.nn.Module]:  # fmt: skip
    """(spec, PyTorch module with exactly the graph's inputs) of any exported graph, the whole transformer
    included: what parity tests compare the ONNX graphs and TensorRT engines with."""
    from . import specs, wrappers

    source = model_source(checkpoint)
    if graph == "transformer":
        dtype_name = EXPORT_DTYPES[settings.dtype]
        config, clip_tokens = source.transformer_config(), source.clip_geometry()[1]
        spec = specs.transformer_spec(config, source.vae_config(), dtype_name, clip_tokens)
        return spec, wrappers.TransformerGraph(source.transformer(TORCH_DTYPES[dtype_name]))
    for component in COMPONENTS:
        for spec, module in component_graphs(source, component, settings):
            if spec.name == graph:
                return spec, module
    raise ValueError(f"graph: {graph!r} is not an exported graph.")


def _export_component(source: ModelSource, out_dir: Path, component: str, settings: ExportSettings,
                      progress: bool) -> dict:  # fmt: skip
    """Export every graph of `component` into a temp folder, then fsync the files and move them into `out_dir`."""
    with scratch_folder(out_dir, component) as tmp:
        graphs = component_graphs(source, component, settings)
        entries = {}
        exporter = settings.exporter_for(component)
        for spec, module in tqdm(graphs, desc=f"export {component}", unit="graph", disable=not progress):
            started = time.perf_counter()
            entries[spec.name] = export_graph(module, spec, tmp, settings, exporter)
            log.info("%s: exported %s in %.1f s (%.2f MB)", component, spec.name, time.perf_counter() - started,
                     entries[spec.name]["bytes"] / 1e6)  # fmt: skip
        del graphs  # the embed/unembed weights; the whole graph's are streamed
        if component == "transformer" and not settings.per_block:
            entries = {"transformer": _stitch_whole(source, tmp, entries, settings, progress)}
        with explained_write_errors(out_dir):
            out_dir.mkdir(parents=True, exist_ok=True)
            for entry in entries.values():
                for name in filter(None, (entry["data_file"], entry["file"])):
                    publish(tmp / name, out_dir / name)
        return entries


def _stitch_whole(source: ModelSource, folder: Path, stages: dict, settings: ExportSettings, progress: bool) -> dict:
    """The whole-transformer graph from the stage graphs in `folder` (export/stitch.py); its manifest entry."""
    from . import specs
    from .stitch import stitch_transformer

    onnx = require("onnx", "ONNX export")
    config, dtype_name = source.transformer_config(), EXPORT_DTYPES[settings.dtype]
    spec = specs.transformer_spec(config, source.vae_config(), dtype_name, source.clip_geometry()[1])
    path = folder / f"{spec.name}.onnx"
    started = time.perf_counter()
    data = stitch_transformer({name: folder / entry["file"] for name, entry in stages.items()}, spec, config,
                              source.transformer_tensor, path, progress)  # fmt: skip
    onnx.checker.check_model(str(path))
    copies = {"transformer_block_skip": len(config.skip_sources)}
    copies["transformer_block_plain"] = config.num_layers - copies["transformer_block_skip"]

    def total(field: str, form: str | None = None) -> int:  # over the stage graphs, a block graph once per copy
        return sum((e[field][form] if form else e[field]) * copies.get(name, 1) for name, e in stages.items())

    attention = {form: total("attention", form) for form in ATTENTION_FORMS}
    log.info("transformer: stitched in %.1f s", time.perf_counter() - started)
    return {
        "file": path.name,
        "data_file": data.name,
        **_file_fields([path, data]),
        "opset": max(entry["opset"] for entry in stages.values()),
        "fp32_nodes": total("fp32_nodes"),
        "attention": attention,
        **spec.to_dict(),
    }


def _remove_stale(out_dir: Path, previous: dict, current: dict) -> None:
    """Delete the files of graphs a component no longer has (e.g. the whole transformer after --per-block)."""
    keep = {name for entry in current.values() for name in (entry["file"], entry["data_file"]) if name}
    for entry in previous.values():
        for name in filter(None, (entry["file"], entry.get("data_file"))):
            if name not in keep:
                (out_dir / name).unlink(missing_ok=True)


def export_graph(module: torch.nn.Module, spec: ExportSpec, folder: Path, settings: ExportSettings,
                 exporter: str = "torchscript") -> dict:  # fmt: skip
    """Trace `module` at `spec.trace_dims` with `exporter`, clean the graph and save `folder/<spec.name>.onnx`.

    Returns the graph's manifest entry."""
    onnx = require("onnx", "ONNX export")
    module = module.eval()
    inputs = spec.sample_inputs()
    with torch.no_grad():
        if exporter == "dynamo":
            model = _export_dynamo(module, spec, inputs, settings.opset)
        else:
            model = _export_torchscript(module, spec, inputs, settings.opset, folder)
    model = graph_passes.fold_and_clean(model)
    if settings.attention == "onnx":
        model, _, left = graph_passes.fuse_attention(model, softmax_in_float32=settings.dtype != "fp32")
        if left:
            log.warning("%s: %d attention patterns stay decomposed (non-constant scale or shared tensors)", spec.name, left)
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
    return {
        "file": path.name,
        "data_file": data_file,
        **_file_fields([path] + ([folder / data_file] if data_file else [])),
        "opset": graph_passes.default_opset(model),
        "fp32_nodes": fp32_nodes,
        "attention": graph_passes.attention_counts(model),
        **spec.to_dict(),
    }


def _file_fields(files: list[Path]) -> dict:
    """A graph entry's `bytes` (all its files) and `sha256` (per file), what `manifest.entry_is_current` checks."""
    return {"bytes": sum(f.stat().st_size for f in files), "sha256": {f.name: file_digest(f) for f in files}}


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
