"""The engine cache: `cache_root()/engines/<key>/` holds `engine.plan`, its sidecar `engine.json` and `build.log`.

One folder per graph engine. The key hashes everything the plan depends on: the graph's ONNX hash (from
export/manifest.json: the component's checkpoint hash, export settings and tool versions, and the graph's
interface and size), the precision, the optimization profile, the builder flags, the GPU (name and
compute capability) and the TensorRT version. `engine.json` records all of it plus the plan's size and
sha256 and the `ruyi-trt build` command that made it.

A run describes what it needs as a `Requirement`; `select_engine` returns the matching record or raises
`EngineMismatchError` saying why each candidate does not fit (other GPU, other TensorRT, other
checkpoint/ONNX, shape outside the profile) and the exact build command that makes a fitting one.
`read_plan` checks size and sha256 before TensorRT ever sees the bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..export.specs import Shape
from ..files import atomic_write
from .profiles import (
    FrameRange,
    Profile,
    outside_profile,
    profile_from_json,
    profile_to_json,
)
from .settings import BuildSettings

log = logging.getLogger(__name__)

PLAN_NAME, RECORD_NAME, LOG_NAME = "engine.plan", "engine.json", "build.log"
SCHEMA = 1


class EngineMismatchError(RuntimeError):
    """No cached engine fits this run; the message names the reasons and the build command."""


class EngineFileError(RuntimeError):
    """An engine file that is missing, truncated or corrupt; the message says how to rebuild it."""


@dataclass(frozen=True)
class Platform:
    """What a plan is tied to: the GPU model, its compute capability and the TensorRT version."""

    gpu: str
    compute_capability: str  # "9.0"
    tensorrt: str

    @classmethod
    def current(cls, tensorrt_version: str, device: int = 0) -> Platform:
        import torch

        props = torch.cuda.get_device_properties(device)
        return cls(props.name, f"{props.major}.{props.minor}", tensorrt_version)


def onnx_hash(component_entry: dict[str, Any], graph: str) -> str:
    """The identity of one exported graph, from its manifest entry (no need to re-read the .onnx files)."""
    payload = {key: component_entry[key] for key in ("checkpoint_hash", "settings", "versions")}
    payload["graph"] = {graph: component_entry["graphs"][graph]}
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_key(graph: str, onnx: str, precision: str, profile: Profile, flags: dict[str, Any], platform: Platform) -> str:
    """The cache key of one engine (hex, 20 chars)."""
    payload = {"graph": graph, "onnx": onnx, "precision": precision, "profile": profile_to_json(profile),
               "flags": flags, "platform": asdict(platform), "schema": SCHEMA}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def engines_root(out: Path | None = None) -> Path:
    """`out`, else cache_root()/engines."""
    from ..models.presets import cache_root

    return Path(out) if out is not None else cache_root() / "engines"


@dataclass
class EngineRecord:
    """The JSON sidecar of one engine (`engine.json`)."""

    key: str
    graph: str
    component: str
    precision: str
    platform: Platform
    checkpoint_hash: str
    onnx_hash: str
    onnx_file: str
    profile: Profile
    flags: dict[str, Any]
    settings: BuildSettings
    engine_bytes: int = 0
    engine_sha256: str = ""
    build_seconds: float = 0.0
    attention: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(schema=SCHEMA, platform=asdict(self.platform), profile=profile_to_json(self.profile),
                     settings=self.settings.to_json(), build_command=self.settings.command())  # fmt: skip
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineRecord:
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA}")
        values = {k: data[k] for k in cls.__dataclass_fields__}
        values.update(platform=Platform(**data["platform"]), profile=profile_from_json(data["profile"]),
                      settings=BuildSettings.from_json(data["settings"]))  # fmt: skip
        return cls(**values)


def write_record(folder: Path, record: EngineRecord) -> Path:
    """Write `folder/engine.json` atomically."""
    text = json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(folder) / RECORD_NAME, lambda tmp: tmp.write_text(text))


def read_record(folder: Path) -> EngineRecord | None:
    """The sidecar in `folder`, or None when there is none or it is unreadable (logged)."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return EngineRecord.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: not a readable engine sidecar (%s); delete its folder", path, exc)
        return None


def read_records(root: Path) -> list[tuple[Path, EngineRecord]]:
    """(folder, record) of every readable engine sidecar under `root`."""
    found = [(path.parent, read_record(path.parent)) for path in sorted(Path(root).glob(f"*/{RECORD_NAME}"))]
    return [(folder, record) for folder, record in found if record is not None]


def read_plan(folder: Path, record: EngineRecord) -> bytes:
    """The plan bytes after checking them against the sidecar's size and sha256."""
    path = Path(folder) / PLAN_NAME
    rebuild = f"delete {folder} and rebuild: {record.settings.command()}"
    if not path.is_file():
        raise EngineFileError(f"{path} is missing; {rebuild}")
    data = path.read_bytes()
    if len(data) != record.engine_bytes:
        raise EngineFileError(f"{path} is {len(data)} bytes, its sidecar says {record.engine_bytes}: truncated; {rebuild}")
    if hashlib.sha256(data).hexdigest() != record.engine_sha256:
        raise EngineFileError(f"{path} does not match the sha256 in its sidecar: corrupt; {rebuild}")
    return data


@dataclass(frozen=True)
class Requirement:
    """What a run needs from one engine. `onnx_hash` is checked when the caller knows the current graph."""

    graph: str
    precision: str
    checkpoint_hash: str
    platform: Platform
    model: str  # --model as the user gave it, for the build command
    request: tuple[int, int, int, int]  # (height, width, frames, batch) of the video
    shapes: dict[str, Shape] = field(default_factory=dict)  # the call's input shapes (empty: not checked)
    onnx_hash: str | None = None


def mismatches(record: EngineRecord, need: Requirement) -> list[str]:
    """Why `record` cannot serve `need` (empty when it can)."""
    reasons = []
    if record.graph != need.graph or record.precision != need.precision:
        reasons.append(f"it is {record.graph} in {record.precision}, the run needs {need.graph} in {need.precision}")
    if record.checkpoint_hash != need.checkpoint_hash:
        reasons.append("it was built from another checkpoint (component hash differs)")
    if need.onnx_hash is not None and record.onnx_hash != need.onnx_hash:
        reasons.append(f"it was built from another ONNX graph ({record.onnx_hash[:19]}, now {need.onnx_hash[:19]})")
    mine, theirs = need.platform, record.platform
    if (mine.gpu, mine.compute_capability) != (theirs.gpu, theirs.compute_capability):
        reasons.append(f"it was built for {theirs.gpu} (sm {theirs.compute_capability}), this GPU is {mine.gpu} "
                       f"(sm {mine.compute_capability})")  # fmt: skip
    if mine.tensorrt != theirs.tensorrt:
        reasons.append(f"it was built with TensorRT {theirs.tensorrt}, this is TensorRT {mine.tensorrt}")
    reasons += outside_profile(record.profile, need.shapes)
    return reasons


def select_engine(candidates: list[tuple[Path, EngineRecord]], need: Requirement) -> tuple[Path, EngineRecord]:
    """The first candidate that fits `need`, or EngineMismatchError with every reason and the build command."""
    relevant = [(folder, rec) for folder, rec in candidates if rec.graph == need.graph and rec.precision == need.precision]
    for folder, record in relevant:
        if not mismatches(record, need):
            return folder, record
    height, width, frames, batch = need.request
    if not relevant:
        settings = BuildSettings(model=need.model, precision=need.precision, resolutions=(f"{height}x{width}",),
                                 frames=FrameRange(frames, frames, frames))  # batch 2: with and without CFG  # fmt: skip
        raise EngineMismatchError(
            f"no TensorRT engine for {need.graph} ({need.precision}) in the engine cache. Build it with:\n  {settings.command()}"
        )
    lines = [f"no cached TensorRT engine for {need.graph} ({need.precision}) fits this run:"]
    for folder, record in relevant[:5]:
        lines.append(f"  {folder.name}: " + "; ".join(mismatches(record, need)))
    rebuild = replace(relevant[0][1].settings.widened(height, width, frames, batch), model=need.model)
    lines.append(f"Rebuild with:\n  {rebuild.command()}")
    raise EngineMismatchError("\n".join(lines))
