"""`DIR/manifest.json`: what every exported graph is and what it was built from.

Schema (version 1):
    {
      "schema": 1,
      "components": {
        "<component>": {                       # transformer | vae-encoder | vae-decoder | image-encoder
          "checkpoint_hash": "sha256:...",     # the component's config + weights (Checkpoint.weights_hash)
          "settings": {"dtype": "fp16", "opset": 18, "exporter": "torchscript", "per_block": false},
          "versions": {"torch": ..., "onnx": ..., "onnx_graphsurgeon": ..., "ruyi_trt": ...},
          "seconds": 12.3,
          "graphs": {
            "<graph>": {                       # e.g. transformer, transformer_block_skip, vae_decoder
              "file": "<graph>.onnx", "data_file": "<graph>.onnx.data" | null, "bytes": 123 (both files),
              "sha256": {"<graph>.onnx": "...", "<graph>.onnx.data": "..."},
              "opset": 18, "fp32_nodes": 40,   # nodes upcast to float32 in fp16/bf16 graphs
              "inputs": [{"name": ..., "shape": [..., "batch", 16], "dtype": "float16"}], "outputs": [...],
              "dynamic_axes": {...}, "trace_dims": {...}, "dim_bounds": {...}   # ExportSpec.to_dict()
            }
          }
        }
      }
    }
A component is reused when its entry has the same checkpoint hash and settings and all its files exist with the
recorded size and sha256 (a truncated or damaged graph is exported again).
"""

from __future__ import annotations

import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from ..files import atomic_write, file_digest
from ..models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SCHEMA = 1
# component -> the checkpoint part whose config and weights it is made from
COMPONENT_PARTS = {"transformer": "transformer", "vae-encoder": "vae", "vae-decoder": "vae",
                   "image-encoder": "image_encoder"}  # fmt: skip


def component_hash(checkpoint: Checkpoint, component: str) -> str:
    """The hash of the checkpoint files `component` is made from (`Checkpoint.weights_hash`)."""
    return checkpoint.weights_hash(COMPONENT_PARTS[component])


def tool_versions(exporter: str) -> dict[str, str]:
    """Versions of everything that shapes the exported graphs."""
    names = ["torch", "onnx", "onnx_graphsurgeon", "ruyi-trt"] + (["onnxscript"] if exporter == "dynamo" else [])
    versions = {}
    for name in names:
        try:
            versions[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name.replace("-", "_")] = "unknown"
    return versions


def empty_manifest() -> dict[str, Any]:
    return {"schema": SCHEMA, "components": {}}


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest in `out_dir`, or an empty one; a damaged file raises ValueError naming it."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return empty_manifest()
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to re-export every graph.") from exc
    if not isinstance(data, dict) or not isinstance(data.get("components"), dict):
        message = f"{path} is not an export manifest (no components); delete it to re-export every graph."
        raise ValueError(message)  # noqa: TRY004 - a damaged file, not an argument of the wrong type
    if data.get("schema") != SCHEMA:
        raise ValueError(
            f"{path} has schema {data.get('schema')!r}, expected {SCHEMA}; delete the folder and re-export."
        )
    return data


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return atomic_write(Path(out_dir) / MANIFEST_NAME, lambda tmp: tmp.write_text(text))


def entry_is_current(out_dir: str | Path, entry: dict[str, Any] | None, checkpoint_hash: str, settings: dict) -> bool:
    """True when `entry` was built from this checkpoint with these settings and its files are all present."""
    if not entry or entry.get("checkpoint_hash") != checkpoint_hash or entry.get("settings") != settings:
        return False
    out_dir = Path(out_dir)
    for name, graph in entry.get("graphs", {}).items():
        files = [graph["file"]] + ([graph["data_file"]] if graph.get("data_file") else [])
        if not all((out_dir / file).is_file() for file in files):
            return False
        if sum((out_dir / file).stat().st_size for file in files) != graph.get("bytes"):
            log.warning("graph %s in %s is truncated (size differs from the manifest); exporting again", name, out_dir)
            return False
        if {file: file_digest(out_dir / file) for file in files} != graph.get("sha256"):
            log.warning("graph %s in %s does not match its recorded sha256 (damaged); exporting again", name, out_dir)
            return False
    return bool(entry.get("graphs"))


def graph_path(out_dir: str | Path, manifest: dict[str, Any], graph: str) -> Path:
    """The .onnx file of `graph` listed in the manifest, or ValueError saying what to export."""
    for entry in manifest["components"].values():
        if graph in entry["graphs"]:
            return Path(out_dir) / entry["graphs"][graph]["file"]
    raise ValueError(f"no graph '{graph}' in {Path(out_dir) / MANIFEST_NAME}; export it first (ruyi-trt export).")
