"""AOTInductor engines (`ruyi-trt build --engine aoti`): the transformer blocks compiled ahead of time by
torch.export + AOTInductor, cached and refused exactly like TensorRT engines.

One package per block type (`transformer_block_plain`, `transformer_block_skip`, the per-block graphs of
export/specs.py), built for the same optimization profile (engine/profiles.py: resolutions x frames x batch)
and kept in `engines_root()/aoti/<key>/` with the same `engine.json` sidecar and `build.log` (engine/cache.py):
the key hashes the graph, the precision, the profile and the platform (CPU vector ISA or GPU, torch version).

- Weights stay outside the package (`aot_inductor.package_constants_in_so=False`): a package depends on the
  architecture only (the sidecar's checkpoint_hash is the transformer config's hash), and a run loads each
  block's tensors with `load_constants` before calling it, so 40 blocks share one package, and LoRA merges or
  other checkpoints of the same architecture need no rebuild.
- Shapes: tokens are [B, T, S, D] (S = tokens per frame) and the RoPE tables [S, d]; T and S are dynamic
  within the profile. AOTInductor does not check the declared range at run time, so `AotiPackage.run` does
  (engine.cache.outside_profile, an EngineMismatchError naming the build command). The batch is exported
  static at the profile's largest batch: torch.export cannot keep a dim that may be 1 dynamic (its 0/1
  specialization), so batch-1 calls of a batch-2 package run duplicated (half the result is used).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..export.specs import TORCH_DTYPES, ExportSpec
from ..files import atomic_folder, file_digest, file_lock
from ..models.checkpoint import Checkpoint
from ..models.transformer import TransformerConfig
from . import cache
from .profiles import Profile, graph_profiles, profile_to_json
from .settings import BuildSettings

log = logging.getLogger(__name__)

ENGINE = "aoti"
AOTI_GRAPHS = ("transformer_block_plain", "transformer_block_skip")
PACKAGE_NAME = "engine.pt2"
_DYNAMIC_DIMS = ("latent_frames", "tokens_per_frame")


class AotiBlockGraph(nn.Module):
    """One block over [B, T, S, D] tokens with per-frame RoPE tables [S, d] (-> tokens_out [B, T, S, D])."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, tokens: Tensor, temb: Tensor, text_states: Tensor, clip_states: Tensor, rope_cos: Tensor,
                rope_sin: Tensor, skip: Tensor | None = None) -> Tensor:  # fmt: skip
        batch, frames, per_frame, dim = tokens.shape
        x = tokens.reshape(batch, frames * per_frame, dim)
        if skip is not None:
            skip = skip.reshape(batch, frames * per_frame, dim)
        cos, sin = rope_cos.repeat(frames, 1), rope_sin.repeat(frames, 1)
        out = self.block(x, temb, text_states, clip_states, cos, sin, frames, skip)
        return out.reshape(batch, frames, per_frame, dim)


def block_profile(spec: ExportSpec, settings: BuildSettings) -> Profile:
    """The one profile of a block package: its size dim is tokens per frame, so every requested size falls in the
    group of the largest (engine/profiles.py)."""
    [(_, profile)] = graph_profiles(spec, "transformer", settings.resolutions, settings.frames, settings.batch)
    return profile


def aoti_root(out: Path | None = None) -> Path:
    """`engines_root(out)/aoti`: AOTInductor packages live beside, never among, the TensorRT engines."""
    return cache.engines_root(out) / ENGINE


def aoti_platform(device: torch.device) -> cache.Platform:
    """What a package is tied to: the GPU and its compute capability, or the CPU's vector ISA; and torch."""
    runtime = f"torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return cache.Platform(props.name, f"{props.major}.{props.minor}", runtime)
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return cache.Platform("cpu", f"cpu-{pick_vec_isa() or 'scalar'}", runtime)


def config_hash(checkpoint: Checkpoint) -> str:
    """The transformer's architecture identity: sha256 of its config (the weights are loaded at run time)."""
    text = json.dumps(checkpoint.transformer.to_dict(), sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def aoti_spec(onnx_spec: ExportSpec, config) -> ExportSpec:
    """The AOTI form of a per-block graph spec: data inputs only (no weights), tokens [B, T, S, D]."""
    tokens = ("batch", "latent_frames", "tokens_per_frame", config.inner_dim)
    weights = set(_block_of(config, onnx_spec.name).state_dict())
    inputs = []
    for tensor in onnx_spec.inputs:
        if tensor.name in weights:
            continue
        inputs.append(dataclasses.replace(tensor, shape=tokens) if tensor.name in ("tokens", "skip") else tensor)
    outputs = tuple(dataclasses.replace(t, shape=tokens) for t in onnx_spec.outputs)
    return dataclasses.replace(onnx_spec, inputs=tuple(inputs), outputs=outputs)


def _block_of(config, graph: str) -> nn.Module:
    from ..export.specs import example_block

    return example_block(config, has_skip=graph == "transformer_block_skip")


def aoti_specs(checkpoint: Checkpoint, precision: str) -> dict[str, ExportSpec]:
    """The AOTI specs of both block graphs, from the checkpoint's configs."""
    from .profiles import graph_specs

    specs = graph_specs(checkpoint, precision)
    return {graph: aoti_spec(specs[graph], checkpoint.transformer) for graph in AOTI_GRAPHS}


def source_hash(graph: str, spec: ExportSpec, checkpoint: Checkpoint, precision: str) -> str:
    """Plays the ONNX hash's role in the key: what the package is traced from (architecture, interface, dtype)."""
    payload = {"graph": graph, "config": config_hash(checkpoint), "spec": spec.to_dict(), "precision": precision,
               "torch": torch.__version__}  # fmt: skip
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_aoti_engines(settings: BuildSettings, result, progress: bool = True) -> None:
    """Build (or find) both block packages for `settings` (engine aoti); fills `result` (an engine.build.BuildResult)."""
    settings.validate()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    platform = aoti_platform(device)
    checkpoint = Checkpoint.resolve(settings.model)
    specs = aoti_specs(checkpoint, settings.precision)
    flags = {"engine": ENGINE}
    root = aoti_root(settings.out)
    for graph in tqdm(AOTI_GRAPHS, desc="build aoti", unit="package", disable=not progress):
        spec = specs[graph]
        profile = block_profile(spec, settings)
        source = source_hash(graph, spec, checkpoint, settings.precision)
        key = cache.engine_key(graph, source, settings.precision, profile, flags, platform)
        folder = root / key
        with file_lock(folder):
            existing = cache.read_record(folder)
            if existing is not None:
                try:
                    _check_package(folder, existing)
                    result.engines[graph] = folder
                    result.reused.append(graph)
                    continue
                except cache.EngineFileError as exc:
                    log.warning("%s: rebuilding (%s)", graph, exc)
            seconds = _build_package(folder, graph, spec, profile, source, checkpoint, settings, platform, device)
        log.info("%s: built %s in %.1f s", graph, folder, seconds)
        result.engines[graph] = folder
        result.built.append(graph)


def _build_package(folder: Path, graph: str, spec: ExportSpec, profile: Profile, source: str, checkpoint: Checkpoint,
                   settings: BuildSettings, platform: cache.Platform, device: torch.device) -> float:  # fmt: skip
    """Compile one package and write it, its build.log and last its sidecar as the whole folder `folder`
    (files.atomic_folder: a failed or interrupted build leaves nothing); returns the build seconds."""

    def write(tmp: Path) -> None:
        nonlocal seconds
        started = time.perf_counter()
        package = compile_package(spec, profile, checkpoint.transformer, device, tmp)
        seconds = round(time.perf_counter() - started, 2)
        size, digest = package.stat().st_size, file_digest(package)
        record = cache.EngineRecord(
            key=folder.name, graph=graph, component="transformer", precision=settings.precision, platform=platform,
            checkpoint_hash=config_hash(checkpoint), onnx_hash=source, onnx_file="", profile=profile,
            flags={"engine": ENGINE}, settings=settings, engine_bytes=size, engine_sha256=digest, build_seconds=seconds,
        )  # fmt: skip
        lines = [f"ruyi-trt build log: {graph} (AOTInductor)", f"command: {settings.command()}",
                 f"source: {source}", f"platform: {platform}", f"profile: {json.dumps(profile_to_json(profile))}",
                 f"built in {seconds} s, {size} bytes (weights not included: loaded at run time)"]  # fmt: skip
        (tmp / cache.LOG_NAME).write_text("\n".join(lines) + "\n")
        cache.write_record(tmp, record)

    seconds = 0.0
    atomic_folder(folder, write, replace=True)
    return seconds


def packages_cover(settings: BuildSettings, root: Path | None = None) -> bool:
    """Whether cached packages (this platform, architecture, precision) already cover every request size of
    `settings` (its profile's min and max shapes), so nothing needs building."""
    checkpoint = Checkpoint.resolve(settings.model, download=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = cache.read_records(aoti_root(root if root is not None else settings.out))
    specs = aoti_specs(checkpoint, settings.precision)
    for graph in AOTI_GRAPHS:
        profile = block_profile(specs[graph], settings)
        for end in (0, 2):
            need = cache.Requirement(graph, settings.precision, config_hash(checkpoint), aoti_platform(device),
                                     settings.model, (0, 0, 0, 0), {k: v[end] for k, v in profile.items()}, engine=ENGINE)  # fmt: skip
            if not any(r.graph == graph and r.precision == settings.precision and not cache.mismatches(r, need)
                       for _, r in records):  # fmt: skip
                return False
    return True


def compile_package(spec: ExportSpec, profile: Profile, config: TransformerConfig, device: torch.device,
                    folder: Path) -> Path:  # fmt: skip
    """torch.export the block graph of `config` for `profile` and AOT-compile it into `folder/engine.pt2` (a folder
    being written: the caller makes it appear whole)."""
    dtype = TORCH_DTYPES[spec.inputs[0].dtype]
    block = _block_of(config, spec.name).to_empty(device=device).to(dtype)
    with torch.no_grad():  # any values do: the weights are not compiled in
        for tensor in block.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape) * 0.02)
    module = AotiBlockGraph(block).eval()
    dims = _export_dims(profile, spec)
    sample = {name: tensor.to(device) for name, tensor in spec.sample_inputs(_sample_dims(profile, spec)).items()}
    dynamic = {t.name: {axis: dims[name] for axis, name in enumerate(t.shape) if name in dims} or None for t in spec.inputs}
    target = folder / PACKAGE_NAME
    with torch.no_grad():
        program = torch.export.export(module, (), sample, dynamic_shapes=dynamic)
        configs = {"aot_inductor.package_constants_in_so": False}
        if dtype != torch.float32:  # derived constants (weight.float() in the fp32 norms) follow load_constants
            configs["aot_inductor.use_runtime_constant_folding"] = True
        torch._inductor.aoti_compile_and_package(program, package_path=str(target), inductor_configs=configs)
    return target


def _export_dims(profile: Profile, spec: ExportSpec) -> dict[str, object]:
    """torch.export dims for the profile's dynamic named dims: Dim.AUTO (the exporter derives the range the graph
    supports, >= 2; a bounded Dim trips over guards it cannot prove), with the profile's range checked at run time
    by `AotiPackage.check`. The batch stays static (see the module docstring)."""
    dynamic = set()
    for tensor in spec.inputs:
        low, _, high = profile[tensor.name]
        for axis, name in enumerate(tensor.shape):
            if name in _DYNAMIC_DIMS and low[axis] != high[axis]:
                if low[axis] < 2:
                    raise ValueError(f"{name}: AOTInductor packages need at least 2 (the profile starts at {low[axis]}).")
                dynamic.add(name)
    return {name: torch.export.Dim.AUTO for name in dynamic}


def _sample_dims(profile: Profile, spec: ExportSpec) -> dict[str, int]:
    """Trace sizes: the profile's opt dims, the batch at its largest (the package's static batch), and the dynamic
    dims made distinct from each other and from 1 (so the exporter ties or specializes none of them)."""
    dims: dict[str, int] = {}
    for tensor in spec.inputs:
        _, opt, high = profile[tensor.name]
        for axis, name in enumerate(tensor.shape):
            if isinstance(name, str):
                dims[name] = high[axis] if name == "batch" else opt[axis]
                if name in _DYNAMIC_DIMS and dims[name] in [v for k, v in dims.items() if k != name] and opt[axis] < high[axis]:
                    dims[name] = opt[axis] + 1
    return dims


def _check_package(folder: Path, record: cache.EngineRecord) -> None:
    """Size and sha256 of `engine.pt2` against its sidecar (as engine.cache.read_plan does for plans)."""
    path = folder / PACKAGE_NAME
    rebuild = f"delete {folder} and rebuild: {record.settings.command()}"
    if not path.is_file():
        raise cache.EngineFileError(f"{path} is missing; {rebuild}")
    if path.stat().st_size != record.engine_bytes or file_digest(path) != record.engine_sha256:
        raise cache.EngineFileError(f"{path} does not match its sidecar (truncated or corrupt); {rebuild}")


class AotiPackage:
    """One loaded package: `run(constants, **inputs)` loads a block's weights, checks the shapes against the
    profile and runs it."""

    def __init__(self, folder: Path, record: cache.EngineRecord, device: torch.device):
        _check_package(folder, record)
        self.folder, self.record, self.device = folder, record, device
        index = device.index if device.type == "cuda" and device.index is not None else -1
        self.runner = torch._inductor.aoti_load_package(str(folder / PACKAGE_NAME), device_index=index)
        self.constant_names = list(self.runner.get_constant_fqns())
        self.batch = record.profile["tokens"][2][0]  # the static batch the package was exported with
        self.loaded: int | None = None  # id of the constants dict last loaded

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        problems = cache.outside_profile(self.record.profile, shapes)
        if problems:
            raise cache.EngineMismatchError(f"{self.record.graph}: " + "; ".join(problems)
                                            + f". Rebuild with a wider profile: {self.record.settings.command()}")  # fmt: skip

    def run(self, constants: dict[str, Tensor], **inputs: Tensor) -> Tensor:
        self.check({name: tuple(t.shape) for name, t in inputs.items()})
        if self.loaded != id(constants):
            self.runner.load_constants({name: constants[name] for name in self.constant_names},
                                       check_full_update=True, user_managed=True)  # fmt: skip
            self.loaded = id(constants)
        batch = inputs["tokens"].shape[0]
        if batch < self.batch:  # see the module docstring: the package's batch is static
            inputs = {k: torch.cat([v] * (self.batch // batch)) if k not in ("rope_cos", "rope_sin") else v
                      for k, v in inputs.items()}  # fmt: skip
        out = self.runner(**inputs)
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out[:batch]
