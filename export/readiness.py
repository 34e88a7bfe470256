"""Will TensorRT's ONNX parser take this graph? A static check that needs neither TensorRT nor a GPU.

`check_tensorrt_ready(path)` lists every problem it finds, each naming the offending node:
- an operator outside TensorRT's ONNX support matrix (export/trt_supported_ops.json, which records its
  source), or from a non-standard domain (that would need a plugin);
- a double, complex or string tensor (graph value, initializer, Cast target or constant);
- a data-dependent value (NonZero, NonMaxSuppression, Unique output) reaching a shape input
  (Reshape shape, Expand/Tile/Slice/Range/Pad/Resize/TopK/ConstantOfShape size arguments);
- a default-domain opset outside the range the parser supports;
- an `Attention` node outside the parser's restrictions (not 4-D, KV-cache inputs or outputs, softcap).
Local functions are inlined first, so their nodes are checked too. `minimum_tensorrt(model)` is the
oldest TensorRT whose parser knows every operator of a graph (e.g. 10.14 for `Attention`).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..deps import require
from .graph_passes import inferred

log = logging.getLogger(__name__)

SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_supported_ops.json")
DATA_DEPENDENT_OPS = ("NonZero", "NonMaxSuppression", "Unique")
# op type -> input positions read as shapes, sizes or axes (values TensorRT must know at build/shape time)
SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2), "Pad": (1,), "Resize": (2, 3), "Upsample": (1,), "TopK": (1,), "OneHot": (1,),
}  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One reason TensorRT would reject the graph."""

    kind: str  # unsupported_op | custom_domain | dtype | data_dependent_shape | opset | attention
    node: str  # the node's name ("" for graph-level problems)
    message: str

    def __str__(self) -> str:
        where = f" at node '{self.node}'" if self.node else ""
        return f"{self.kind}{where}: {self.message}"


@functools.lru_cache(maxsize=1)
def tensorrt_op_table() -> dict[str, Any]:
    """The support matrix data: supported/unsupported op names, opset range, rejected dtypes, source."""
    return json.loads(SUPPORTED_OPS_FILE.read_text())


def check_tensorrt_ready(onnx_path: str | Path) -> list[Problem]:
    """Problems that would stop TensorRT from parsing or building `onnx_path` (empty when it looks ready)."""
    onnx = require("onnx", "the TensorRT readiness check")
    path = Path(onnx_path)
    if not path.is_file():
        raise ValueError(f"onnx_path: {path} is not a file; pass an exported .onnx graph.")
    model = onnx.load(str(path), load_external_data=False)
    return check_model(model)


def check_export_dir(folder: str | Path) -> dict[str, list[Problem]]:
    """`check_tensorrt_ready` for every .onnx graph in `folder`: {file name: problems}."""
    paths = sorted(Path(folder).glob("*.onnx"))
    if not paths:
        raise ValueError(
            f"no .onnx graphs in {folder}; export them first (ruyi-trt export --model ... --out {folder})."
        )
    return {path.name: check_tensorrt_ready(path) for path in paths}


def check_model(model) -> list[Problem]:
    """`check_tensorrt_ready` for an in-memory ModelProto (external data need not be loaded)."""
    onnx = require("onnx", "the TensorRT readiness check")
    table = tensorrt_op_table()
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    problems = _check_opset(model, table)
    nodes = list(_walk(model.graph))
    supported = set(table["supported"])
    for name, node in nodes:
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem("custom_domain", name, f"{node.domain}::{node.op_type} needs a TensorRT plugin"))
        elif node.op_type not in supported:
            known = "is marked unsupported" if node.op_type in table["unsupported"] else "is not listed"
            problems.append(
                Problem("unsupported_op", name, f"{node.op_type} {known} in TensorRT's ONNX support matrix")
            )
    problems += _check_dtypes(model, nodes, set(table["rejected_dtypes"]))
    problems += _check_data_dependent_shapes(nodes)
    problems += _check_attention(model, nodes)
    return problems


def minimum_tensorrt(model) -> str | None:
    """The oldest TensorRT release (e.g. '10.14') whose ONNX parser has every operator of `model`, when one of
    them is newer than TensorRT 10.0 (None otherwise)."""
    since = tensorrt_op_table()["since"]
    versions = {since[node.op_type] for _, node in _walk(model.graph) if node.op_type in since}
    return max(versions, key=lambda v: tuple(int(p) for p in v.split(".")), default=None)


def _walk(graph, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(display name, node) for every node, including those in If/Loop/Scan bodies."""
    for index, node in enumerate(graph.node):
        name = prefix + (node.name or f"{node.op_type}#{index}")
        yield name, node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk(sub, prefix=f"{name}/")


def _check_opset(model, table: dict[str, Any]) -> list[Problem]:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    low, high = table["opset_min"], table["opset_max"]
    if not versions:
        return [Problem("opset", "", "the model imports no default-domain opset")]
    if not low <= versions[0] <= high:
        message = (
            f"opset {versions[0]} is outside TensorRT {table['tensorrt_version']}'s {low}..{high}; "
            f"re-export with --opset {min(max(versions[0], low), high)}"
        )
        return [Problem("opset", "", message)]
    return []


def _check_dtypes(model, nodes: list[tuple[str, Any]], rejected: set[str]) -> list[Problem]:
    onnx = require("onnx", "the TensorRT readiness check")
    type_name = onnx.TensorProto.DataType.Name
    try:
        graph = inferred(model).graph
    except onnx.shape_inference.InferenceError as exc:  # e.g. an op of an unregistered domain
        log.warning("shape inference failed (%s); checking declared tensor types only", exc)
        graph = model.graph
    producer = {out: name for name, node in nodes for out in node.output}
    problems = []
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        kind = type_name(value.type.tensor_type.elem_type)
        if kind in rejected:
            where = producer.get(value.name, "")
            problems.append(Problem("dtype", where, f"tensor '{value.name}' is {kind}"))
    for init in graph.initializer:
        if type_name(init.data_type) in rejected:
            problems.append(Problem("dtype", "", f"initializer '{init.name}' is {type_name(init.data_type)}"))
    for name, node in nodes:
        for attr in node.attribute:
            kind = None
            if node.op_type == "Cast" and attr.name == "to":
                kind = type_name(attr.i)
            elif attr.HasField("t"):
                kind = type_name(attr.t.data_type)
            if kind in rejected:
                problems.append(Problem("dtype", name, f"{node.op_type} produces {kind}"))
    return _unique(problems)


def _check_data_dependent_shapes(nodes: list[tuple[str, Any]]) -> list[Problem]:
    tainted: dict[str, str] = {}  # tensor -> the data-dependent node it derives from
    problems = []
    for name, node in nodes:  # nodes are in topological order
        source = next((tainted[i] for i in node.input if i in tainted), None)
        for position in SHAPE_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and node.input[position] in tainted:
                origin = tainted[node.input[position]]
                message = f"{node.op_type} input {position} depends on the values of '{origin}'"
                problems.append(Problem("data_dependent_shape", name, message))
        if node.op_type in DATA_DEPENDENT_OPS:
            source = name
        if source is not None:
            tainted.update({out: source for out in node.output if out})
    return problems


_ATTENTION_UNSUPPORTED_INPUTS = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
_ATTENTION_UNSUPPORTED_ATTRIBUTES = ("qk_matmul_output_mode", "softcap")


def _check_attention(model, nodes: list[tuple[str, Any]]) -> list[Problem]:
    """TensorRT's restrictions on ONNX Attention: 4-D Q/K/V/mask, no KV cache, no softcap or qk output mode."""
    attention = [(name, node) for name, node in nodes if node.op_type == "Attention"]
    if not attention:
        return []
    graph = inferred(model).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.input) + list(graph.value_info)
             if v.type.tensor_type.HasField("shape")}  # fmt: skip
    problems = []
    for name, node in attention:
        for position, tensor in enumerate(node.input[:4]):
            if tensor and ranks.get(tensor, 4) != 4:
                problems.append(Problem("attention", name, f"input {position} ('{tensor}') is {ranks[tensor]}-D; "
                                                           "TensorRT's Attention needs 4-D Q, K, V and mask"))  # fmt: skip
        for position, label in _ATTENTION_UNSUPPORTED_INPUTS.items():
            if position < len(node.input) and node.input[position]:
                problems.append(Problem("attention", name, f"the {label} input is not supported by TensorRT"))
        if any(out for out in node.output[1:]):
            problems.append(Problem("attention", name, "only the first output (Y) is supported by TensorRT"))
        for attr in node.attribute:
            if attr.name in _ATTENTION_UNSUPPORTED_ATTRIBUTES:
                problems.append(Problem("attention", name, f"attribute {attr.name} is not supported by TensorRT"))
    return problems


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))
