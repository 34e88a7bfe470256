"""How big a graph's tensors get at given input shapes, found by shape inference alone (no weights, no run).

`tensor_stats(path, shapes)` fixes the graph inputs to `shapes` (e.g. an optimization profile's max) and
runs ONNX Runtime's symbolic shape inference over the graph's structure (`graph_passes.structure_only`:
no weight data is read, whatever the size). It reports the largest tensor (elements: TensorRT and most
CUDA kernels index with 32 bits, so 2^31 elements is a hard limit) and the peak activation bytes of a
sequential execution in graph order, each tensor freed after its last reader (weights not counted; fused
kernels and TensorRT's memory planner do better, an unfused ONNX attention core does not appear at all).
ONNX `Attention` (opset 23) nodes get their output shape here, [B, H, Sq, dv]: the onnxruntime tool only
knows Microsoft's contrib op of that name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..deps import require
from .graph_passes import structure_only

INT32_LIMIT = 2**31  # TensorRT refuses tensors with this many elements or more

_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1, 18: 1}


@dataclass
class TensorStats:
    """Sizes of one graph at one set of input shapes."""

    max_tensor_elements: int  # of graph inputs, outputs and intermediates (weights not counted)
    largest_tensor: str
    largest_shape: tuple[int, ...]
    activation_bytes: int  # peak of live non-weight tensors, executing nodes in graph order
    unknown: list[str] = field(default_factory=list)  # tensors whose shape stayed symbolic


def tensor_stats(onnx_path: str | Path, shapes: dict[str, tuple[int, ...]]) -> TensorStats:
    """`TensorStats` of the graph at `onnx_path` with its inputs fixed to `shapes` (every dynamic input)."""
    graph, weights = _inferred(onnx_path, shapes)
    sized, unknown = _sizes(graph)
    best = (0, "", ())
    for name, (elements, _, dims) in sized.items():
        if elements > best[0] and name not in weights:
            best = (elements, name, dims)
    return TensorStats(best[0], best[1], best[2], _peak_live_bytes(graph, sized, weights), unknown)


def attention_score_shapes(onnx_path: str | Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """{attention node: its score matrix shape (B, H, Sq, Skv)} at `shapes`, for ONNX Attention nodes (named by
    the node) and decomposed cores (named by their Softmax): what an unfused engine would materialize."""
    from .graph_passes import _attention_pattern, _Graph

    graph, _ = _inferred(onnx_path, shapes)
    sized, _ = _sizes(graph)
    nodes = _Graph(graph.node)
    scores = {}
    for node in graph.node:
        if node.op_type == "Attention" and node.input[0] in sized and node.input[1] in sized:
            query, key = sized[node.input[0]][2], sized[node.input[1]][2]
            scores[node.name or node.output[0]] = (*query[:3], key[2])
        elif node.op_type == "Softmax":
            pattern = _attention_pattern(nodes, node, lambda name: len(sized.get(name, (0, 0, ()))[2]))
            if pattern is not None and pattern[0].output[0] in sized:
                scores[node.name or node.output[0]] = sized[pattern[0].output[0]][2]
    return scores


def _inferred(onnx_path: str | Path, shapes: dict[str, tuple[int, ...]]):
    """(the graph with every value's inferred shape at `shapes`, the names of its weights)."""
    onnx = require("onnx", "graph statistics")
    full = onnx.load(str(onnx_path), load_external_data=False)
    weights = {t.name for t in full.graph.initializer}
    model = structure_only(full)
    del full
    missing = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        if value.name not in shapes:
            missing.append(value.name)
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=True):
            dim.Clear()
            dim.dim_value = size
    if missing:
        raise ValueError(f"{Path(onnx_path).name}: no shape given for inputs {missing}")
    return _shape_inference()(model).graph, weights


def _sizes(graph) -> tuple[dict[str, tuple[int, int, tuple[int, ...]]], list[str]]:
    """({name: (elements, bytes, shape)} of every value with a concrete shape, names of the others)."""
    sized, unknown = {}, []
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if not tensor_type.HasField("shape") or None in dims:
            unknown.append(value.name)
            continue
        elements = math.prod(dims)
        sized[value.name] = (elements, elements * _ELEMENT_BYTES.get(tensor_type.elem_type, 4), tuple(dims))
    return sized, unknown


def _peak_live_bytes(graph, sized: dict[str, tuple[int, int, tuple[int, ...]]], weights: set[str]) -> int:
    """Peak bytes of live activations when the nodes run in graph order and each tensor dies after its last reader."""
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = index
    end = len(graph.node)
    for value in graph.output:
        last_use[value.name] = end
    live = {v.name for v in graph.input if v.name not in weights}
    current = sum(sized.get(name, (0, 0, ()))[1] for name in live)
    peak = current
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name and name not in weights:
                live.add(name)
                current += sized.get(name, (0, 0, ()))[1]
        peak = max(peak, current)
        for name in set(node.input) | set(node.output):
            if name in live and last_use.get(name, index) <= index:
                live.discard(name)
                current -= sized.get(name, (0, 0, ()))[1]
    return peak


def _shape_inference():
    """onnxruntime's SymbolicShapeInference, taught the shape of the ONNX (opset 23) Attention operator."""
    require("onnxruntime", "graph statistics")
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    class _Inference(SymbolicShapeInference):
        def _infer_Attention(self, node):  # the name the tool dispatches on
            if node.domain not in ("", "ai.onnx"):
                return super()._infer_Attention(node)
            query, value = self._get_shape(node, 0), self._get_shape(node, 2)
            if len(query) != 4 or len(value) != 4:
                raise ValueError(f"{node.name}: only 4-D ONNX Attention inputs are supported here")
            dtype = self.known_vi_[node.input[0]].type.tensor_type.elem_type
            out = self.known_vi_[node.output[0]]
            out.CopyFrom(helper.make_tensor_value_info(node.output[0], dtype, [*query[:3], value[3]]))
            return None

    def run(model):  # SymbolicShapeInference.infer_shapes, with our class and without its debug dump on failure
        inference = _Inference(2**31 - 1, False, False, 0)
        inference._preprocess(model)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        return inference.out_mp_

    return run
