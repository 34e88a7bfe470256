"""The build plan: every engine a build makes, checked before TensorRT is called (`ruyi-trt build --dry-run`).

For each graph the runtime needs and each of its size groups (engine/profiles.py) one engine: its
optimization profile and, from shape inference at the profile's max shapes (export/graph_stats.py),
the largest tensor and the peak activation bytes; the attention form (ONNX `Attention` nodes, or
decomposed MatMul -> Softmax -> MatMul cores), the oldest TensorRT that parses the graph, and the
TensorRT-readiness problems (export/readiness.py). `DIR/build-plan.json` (schema 1):

    {"schema": 1, "command": "ruyi-trt build ...", "dry_run": true, "model": ..., "precision": ...,
     "per_block": true, "attention": "onnx", "tensorrt": {"installed": null, "target": "10.15"},
     "export": {"dir": ..., "seconds": {component: s},
                "peak_host_rss_bytes": {component: bytes}},
     "engines": {"<graph>[@HxW]": {"graph", "component", "sizes": ["768x768", ...],
                 "inputs": {name: {"min": [...], "opt": [...], "max": [...]}},
                 "max_tensor_elements", "largest_tensor": {"name", "shape"}, "activation_bytes_at_max",
                 "attention": {"form": "onnx-attention" | "decomposed" | "mixed" | "none", "nodes": n},
                 "tensorrt_min_version": "10.14", "problems": [...]}},
     "refused": [{"engine", "reason"}], "seconds": ..., "peak_host_rss_bytes": ...}

An engine whose largest tensor reaches 2^31 elements (TensorRT's and most kernels' 32-bit indexing) or
whose graph TensorRT would not parse is refused: `write_plan` writes the file, then raises
`BuildPlanError` naming each refused engine and what to change.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..deps import require
from ..export import graph_passes, manifest
from ..export.graph_stats import INT32_LIMIT, tensor_stats
from ..export.readiness import check_model, minimum_tensorrt
from ..export.specs import ExportSpec
from ..files import atomic_write
from .profiles import Profile, SizeGroup, graph_profiles
from .settings import BuildSettings
from .trt_api import MIN_VERSION

log = logging.getLogger(__name__)

PLAN_NAME = "build-plan.json"
SCHEMA = 1
# graphs the runtime needs per component (the per-block transformer graphs replace the whole one)
WHOLE_TRANSFORMER = ("transformer",)
BLOCK_TRANSFORMER = ("transformer_embed", "transformer_block_plain", "transformer_block_skip", "transformer_unembed")


class BuildPlanError(ValueError):
    """Some engine of the plan cannot be built; the message names each and what to change."""


@dataclass
class PlannedEngine:
    """One engine to build: a graph, the sizes it serves and its profile, with the checks' results."""

    name: str  # "<graph>" when the graph needs one engine, else "<graph>@<HxW>"
    graph: str
    component: str
    group: SizeGroup
    profile: Profile
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def refusal(self) -> str | None:
        problems = self.report.get("problems", [])
        if problems:
            return f"TensorRT would not parse the graph: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        elements = self.report.get("max_tensor_elements", 0)
        if elements >= INT32_LIMIT:
            largest = self.report["largest_tensor"]
            return (f"tensor {largest['name']} {tuple(largest['shape'])} has {elements:,} elements at the profile's max, "
                    f"not below 2^31 = {INT32_LIMIT:,}")  # fmt: skip
        return None


def graphs_of(component: str, entry: dict, per_block: bool) -> list[str]:
    """The graphs of a manifest component that the runtime uses."""
    graphs = list(entry["graphs"])
    if component == "transformer":
        wanted = BLOCK_TRANSFORMER if per_block else WHOLE_TRANSFORMER
        graphs = [g for g in wanted if g in entry["graphs"]]
    return graphs


def planned_engines(settings: BuildSettings, specs: dict[str, ExportSpec], data: dict, per_block: bool) -> list[PlannedEngine]:
    """Every (graph, size group) engine of a build over the exported graphs listed in manifest `data`."""
    engines = []
    for component, entry in data["components"].items():
        for graph in graphs_of(component, entry, per_block):
            groups = graph_profiles(specs[graph], component, settings.resolutions, settings.frames, settings.batch)
            for group, profile in groups:
                name = graph if len(groups) == 1 else f"{graph}@{group.label}"
                engines.append(PlannedEngine(name, graph, component, group, profile))
    return engines


def check_engine(planned: PlannedEngine, onnx_path: Path) -> dict[str, Any]:
    """Shape inference at the profile's max, attention form, minimum TensorRT and readiness of one engine."""
    onnx = require("onnx", "the build plan")
    model = onnx.load(str(onnx_path), load_external_data=False)
    stats = tensor_stats(onnx_path, {name: high for name, (_, _, high) in planned.profile.items()})
    counts = graph_passes.attention_counts(model)
    oldest = max([".".join(map(str, MIN_VERSION)), minimum_tensorrt(model) or "0"], key=_version)
    report = {
        "graph": planned.graph,
        "component": planned.component,
        "sizes": [f"{h}x{w}" for h, w in planned.group.sizes],
        "inputs": {name: {"min": list(lo), "opt": list(mid), "max": list(hi)} for name, (lo, mid, hi) in planned.profile.items()},
        "max_tensor_elements": stats.max_tensor_elements,
        "largest_tensor": {"name": stats.largest_tensor, "shape": list(stats.largest_shape)},
        "activation_bytes_at_max": stats.activation_bytes,
        "attention": {"form": _attention_form(counts), "nodes": counts["onnx"] + counts["decomposed"]},
        "tensorrt_min_version": oldest,
        "problems": [str(p) for p in check_model(model)],
    }
    if stats.unknown:
        report["unknown_shapes"] = len(stats.unknown)
    return report


def write_plan(settings: BuildSettings, engines: list[PlannedEngine], onnx_dir: Path, data: dict, facts: dict[str, Any],
               root: Path, progress: bool = True) -> Path:  # fmt: skip
    """Check every engine, write `root/build-plan.json`, and raise BuildPlanError when one is refused."""
    from tqdm.auto import tqdm

    from ..export.onnx_export import peak_host_rss_bytes

    started = time.perf_counter()
    for planned in tqdm(engines, desc="plan engines", unit="engine", disable=not progress):
        planned.report = check_engine(planned, manifest.graph_path(onnx_dir, data, planned.graph))
    refused = [{"engine": e.name, "reason": e.refusal} for e in engines if e.refusal]
    components = data["components"]
    export = {"dir": str(onnx_dir), "seconds": {c: e.get("seconds") for c, e in components.items()},
              "peak_host_rss_bytes": {c: e.get("peak_host_rss_bytes") for c, e in components.items()}}  # fmt: skip
    summary = {
        "schema": SCHEMA,
        "command": settings.command(),
        **facts,
        "export": export,
        "engines": {e.name: e.report for e in engines},
        "refused": refused,
        "seconds": round(time.perf_counter() - started, 2),
        "peak_host_rss_bytes": peak_host_rss_bytes(),
    }
    text = json.dumps(summary, indent=2) + "\n"
    path = atomic_write(Path(root) / PLAN_NAME, lambda tmp: tmp.write_text(text))
    log.info("build plan: %d engines, %d refused -> %s", len(engines), len(refused), path)
    if refused:
        lines = [f"refusing {len(refused)} of {len(engines)} engines (the plan is in {path}):"]
        lines += [f"  {r['engine']}: {r['reason']}" for r in refused]
        lines.append(_advice(facts.get("attention")))
        raise BuildPlanError("\n".join(lines))
    return path


def _advice(attention: str | None) -> str:
    if attention == "decomposed":
        return ("Decomposed attention materializes the [B, heads, N, N] score tensor: use TensorRT >= 10.14 with "
                "--attention onnx, or fewer --frames / a smaller --resolution.")  # fmt: skip
    return "Use fewer --frames, a smaller --resolution, or --batch 1."


def _attention_form(counts: dict[str, int]) -> str:
    if counts["onnx"] and counts["decomposed"]:
        return "mixed"
    if counts["onnx"]:
        return "onnx-attention"
    return "decomposed" if counts["decomposed"] else "none"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())
