"""Clean-up passes over an exported ONNX model, in the order `onnx_export` applies them.

1. `fold_and_clean`: onnx-graphsurgeon constant folding, dead-node removal and topological sort.
2. `upcast_to_fp32`: in fp16/bf16 graphs, run normalizations, means and softmax in float32
   (Cast to float before, Cast back after), as the PyTorch model does for its LayerNorms.
3. `name_dims`: give graph inputs and outputs the spec's dim names (exporters invent their own).
"""

from __future__ import annotations

import logging

from ..deps import require
from .specs import ExportSpec

log = logging.getLogger(__name__)

FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "Softmax")


def fold_and_clean(model):
    """Fold constant subgraphs and drop unused nodes with onnx-graphsurgeon; returns a new ModelProto.

    bfloat16 graphs are only cleaned: graphsurgeon folds through numpy, which has no bfloat16 (it would
    write float64 constants), so their folding is left to the exporter.
    """
    gs = require("onnx_graphsurgeon", "ONNX graph clean-up")
    onnx = require("onnx", "ONNX export")
    require("onnxruntime", "constant folding").set_default_logger_severity(3)  # folding fp16 nodes warns per node
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    bf16 = any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer) or any(
        v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in model.graph.input
    )
    (graph if bf16 else graph.fold_constants()).cleanup().toposort()
    log.debug("fold_and_clean: %d -> %d nodes%s", before, len(graph.nodes), " (bf16: not folded)" if bf16 else "")
    return gs.export_onnx(graph)


def _elem_types(model) -> dict[str, int]:
    onnx = require("onnx", "ONNX export")
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:  # Constant nodes are not always covered by value_info
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def upcast_to_fp32(model, op_types: tuple[str, ...] = FP32_OPS) -> tuple[object, int]:
    """Compute every `op_types` node that has a float16/bfloat16 input in float32; returns (model, nodes changed).

    Each low-precision float input gets a Cast to float32 and each low-precision output is produced in
    float32 and cast back, so the surrounding graph keeps its dtypes.
    """
    onnx = require("onnx", "ONNX export")
    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    types = _elem_types(model)
    nodes, changed = [], 0
    for node in model.graph.node:
        if node.op_type not in op_types or not any(types.get(name) in low for name in node.input):
            nodes.append(node)
            continue
        changed += 1
        for i, name in enumerate(node.input):
            if types.get(name) in low:
                cast = f"{node.name or node.output[0]}/input{i}_fp32"
                nodes.append(onnx.helper.make_node("Cast", [name], [cast], name=cast, to=onnx.TensorProto.FLOAT))
                node.input[i] = cast
        after = []
        for i, name in enumerate(node.output):
            if name and types.get(name) in low:
                wide = f"{node.name or name}/output{i}_fp32"
                after.append(onnx.helper.make_node("Cast", [wide], [name], name=f"{wide}_cast", to=types[name]))
                node.output[i] = wide
        nodes.append(node)
        nodes.extend(after)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # stale types of the re-routed tensors; shape inference rebuilds them
    return model, changed


def name_dims(model, spec: ExportSpec) -> None:
    """Set the dim names of the graph's inputs and outputs to the spec's; raise when a dynamic axis was frozen."""
    frozen = []
    for values, specs, is_input in ((model.graph.input, spec.inputs, True), (model.graph.output, spec.outputs, False)):
        by_name = {t.name: t for t in specs}
        for value in values:
            t = by_name.get(value.name)
            if t is None:
                continue
            dims = value.type.tensor_type.shape.dim
            for axis, want in enumerate(t.shape):
                if isinstance(want, str):
                    if is_input and dims[axis].HasField("dim_value"):
                        frozen.append(f"{value.name}[{axis}]={dims[axis].dim_value}")
                    dims[axis].dim_param = want
                else:
                    dims[axis].dim_value = want
    if frozen:
        raise RuntimeError(
            f"{spec.name}: the exporter froze dynamic input axes {frozen}; the graph would only run at the traced "
            "size. Report this with the exporter and torch versions."
        )
