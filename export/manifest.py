"""`DIR/manifest.json`: what every exported graph is and what it was built from.

Schema (version 1):
    {
      "schema": 1,
      "components": {
        "<component>": {                       # transformer | vae-encoder | vae-decoder | image-encoder
          "checkpoint_hash": "sha256:...",     # the checkpoint folder's config + weights (see component_hash), or
                                               # full-random's preset, recipe, seed and configs (export/source.py)
          "settings": {"dtype": "fp16", "opset": 18, "exporter": "torchscript", "per_block": false,
                       "attention": "onnx"},   # the exporter actually used ("auto" resolved per component)
          "versions": {"torch": ..., "onnx": ..., "onnx_graphsurgeon": ..., "ruyi_trt": ...},
          "seconds": 12.3, "peak_host_rss_bytes": 4032488000,  # the export's wall time, the process's peak RSS
          "graphs": {
            "<graph>": {                       # e.g. transformer, transformer_block_skip, vae_decoder
              "file": "<graph>.onnx", "data_file": "<graph>.onnx.data" | null, "bytes": 123 (both files),
              "opset": 23, "fp32_nodes": 40,   # nodes upcast to float32 in fp16/bf16 graphs
              "attention": {"onnx": 14, "decomposed": 0},   # ONNX Attention nodes / MatMul-Softmax-MatMul cores
              "inputs": [{"name": ..., "shape": [..., "batch", 16], "dtype": "float16"}], "outputs": [...],
              "dynamic_axes": {...}, "trace_dims": {...}, "dim_bounds": {...}   # ExportSpec.to_dict()
            }
          }
        }
      }
    }
A component is reused when its entry has the same checkpoint hash and settings and all its files exist.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from ..files import atomic_write
from ..models.checkpoint_io import CheckpointError, weight_files

MANIFEST_NAME = "manifest.json"
SCHEMA = 1
# component -> (checkpoint sub-folder, files hashed besides the safetensors)
COMPONENT_SOURCES = {
    "transformer": ("transformer", ("config.json",)),
    "vae-encoder": ("vae", ("config.json",)),
    "vae-decoder": ("vae", ("config.json",)),
    "image-encoder": ("image_encoder", ("config.json", "preprocessor_config.json")),
}


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file; cached per (path, size, mtime) for the process, since weights can be many GB."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def component_hash(checkpoint_dir: str | Path, component: str) -> str:
    """sha256 over the names and contents of the component's config file(s) and safetensors weights."""
    folder_name, extra = COMPONENT_SOURCES[component]
    folder = Path(checkpoint_dir) / folder_name
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder} does not exist: {checkpoint_dir} is not a complete Ruyi checkpoint "
            "(pass --model PATH to a Ruyi-Mini-7B folder or --model tiny)."
        )
    files = []
    for name in extra:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; download the checkpoint again.")
        files.append(path)
    files += weight_files(folder)
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{_file_digest(str(path), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return "sha256:" + digest.hexdigest()


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


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The manifest in `out_dir`, or an empty one; a damaged file raises ValueError naming it."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return {"schema": SCHEMA, "components": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it to re-export every graph.") from exc
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
    for graph in entry.get("graphs", {}).values():
        files = [graph["file"]] + ([graph["data_file"]] if graph.get("data_file") else [])
        if not all((out_dir / name).is_file() for name in files):
            return False
        if sum((out_dir / name).stat().st_size for name in files) != graph.get("bytes"):
            return False
    return bool(entry.get("graphs"))


def graph_path(out_dir: str | Path, manifest: dict[str, Any], graph: str) -> Path:
    """The .onnx file of `graph` listed in the manifest, or ValueError saying what to export."""
    for entry in manifest["components"].values():
        if graph in entry["graphs"]:
            return Path(out_dir) / entry["graphs"][graph]["file"]
    raise ValueError(f"no graph '{graph}' in {Path(out_dir) / MANIFEST_NAME}; export it first (ruyi-trt export).")
