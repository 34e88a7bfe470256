"""Clean-up passes over an exported ONNX model, in the order `onnx_export` applies them.

1. `fold_and_clean`: onnx-graphsurgeon constant folding, dead-node removal and topological sort.
2. `fuse_attention` (attention="onnx"): every MatMul -> Softmax -> MatMul attention pattern becomes one
   ONNX `Attention` node (opset 23), which TensorRT >= 10.14 maps to its fused IAttention layer.
3. `upcast_to_fp32`: in fp16/bf16 graphs, run normalizations, means and softmax in float32
   (Cast to float before, Cast back after), as the PyTorch model does for its LayerNorms.
4. `name_dims`: give graph inputs and outputs the spec's dim names (exporters invent their own).

No pass serializes a model with its weights: type and shape inference run on `structure_only(model)`,
a copy without the data of large initializers, so a graph of any size stays under protobuf's 2 GB limit.
"""

from __future__ import annotations

import logging
import math

from ..deps import require
from .specs import ExportSpec

log = logging.getLogger(__name__)

FP32_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "ReduceMean", "Softmax")
ATTENTION_OPSET = 23  # the first opset with the ONNX Attention operator
SMALL_INITIALIZER_BYTES = 1 << 16  # initializers kept with their values in structure_only (shape constants)
_SCALE_RTOL = 1e-6


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


def _initializer_bytes(tensor) -> int | None:
    """The byte size of an initializer's data held in memory (None when it lives in an external file)."""
    onnx = require("onnx", "ONNX export")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return math.prod(tensor.dims) * 8


def structure_only(model):
    """A copy of `model` whose large (or external) initializers are graph inputs of the same type and shape.

    Shape constants (small initializers) keep their values, so type and shape inference give the same
    answers as on the full model, and the copy serializes in a few MB whatever the weights weigh.
    """
    onnx = require("onnx", "ONNX export")
    graph = model.graph
    kept, declared = [], []
    for tensor in graph.initializer:
        size = _initializer_bytes(tensor)
        if size is not None and size <= SMALL_INITIALIZER_BYTES:
            kept.append(tensor)
        else:
            declared.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    light = onnx.helper.make_graph(list(graph.node), graph.name, list(graph.input) + declared, list(graph.output),
                                   initializer=kept, value_info=list(graph.value_info))  # fmt: skip
    copy = onnx.helper.make_model(light, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    copy.functions.extend(model.functions)
    return copy


def inferred(model):
    """ONNX type and shape inference (with shape-value propagation) on `structure_only(model)`, never on >2 GB protos."""
    onnx = require("onnx", "ONNX export")
    return onnx.shape_inference.infer_shapes(structure_only(model), data_prop=True)


def elem_types(model) -> dict[str, int]:
    """{tensor name: ONNX elem type} for every initializer, graph value and Constant output."""
    graph = inferred(model).graph
    types = {t.name: t.data_type for t in model.graph.initializer}
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
    types = elem_types(model)
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
    _replace_nodes(model, nodes)
    del model.graph.value_info[:]  # stale types of the re-routed tensors; shape inference rebuilds them
    return model, changed


# -- attention ----------------------------------------------------------------------------------------------------
def fuse_attention(model, softmax_in_float32: bool) -> tuple[object, int, int]:
    """Replace each `MatMul(Q*a, Kt*b) -> [Cast] -> Softmax(last axis) -> [Cast] -> MatMul(., V)` by one ONNX
    `Attention(Q, Transpose(Kt), V)` node and raise the default opset to 23; returns (model, fused, left).

    The pattern is what both exporters make of `F.scaled_dot_product_attention` on 4-D tensors: the scale
    split as sqrt(scale) on Q and on K^T. The fused node gets `scale` only when a*b differs from
    1/sqrt(head size) (ONNX's default), and `softmax_precision` FLOAT when `softmax_in_float32` (fp16/bf16
    graphs, matching PyTorch's attention kernels). A pattern with a non-constant scale, a shared
    intermediate or a rank other than 4 is left as it is and counted in `left`.
    """
    onnx = require("onnx", "ONNX export")
    numpy_helper = onnx.numpy_helper
    info = inferred(model).graph
    shapes = {v.name: v.type.tensor_type.shape for v in list(info.input) + list(info.value_info) + list(info.output)}
    constants = {t.name: t for t in model.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})  # fmt: skip
    graph = _Graph(model.graph.node)

    def scalar(name: str) -> float | None:
        tensor = constants.get(name)
        if tensor is None or math.prod(tensor.dims) != 1:
            return None
        return float(numpy_helper.to_array(tensor).reshape(-1)[0])

    def operand(name: str) -> tuple[str, float] | None:
        """(tensor, scale) for `name` = tensor * constant (or / constant, or unscaled); None if not constant."""
        node = graph.producer.get(name)
        if node is None or node.op_type not in ("Mul", "Div") or len(graph.consumers[name]) != 1:
            return name, 1.0
        for position in (1, 0) if node.op_type == "Mul" else (1,):
            value = scalar(node.input[position])
            if value is not None:
                return node.input[1 - position], (value if node.op_type == "Mul" else 1.0 / value)
        return None

    def rank(name: str) -> int | None:
        shape = shapes.get(name)
        return len(shape.dim) if shape is not None else None

    fused = left = 0
    replacements: dict[str, list] = {}  # output of the final MatMul -> the nodes replacing that MatMul
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        pattern = _attention_pattern(graph, softmax, rank)
        if pattern is None:
            continue
        first, second, values = pattern
        q_side, k_side = operand(first.input[0]), operand(first.input[1])
        if q_side is None or k_side is None or rank(q_side[0]) != 4 or rank(k_side[0]) != 4:
            left += 1
            continue
        (query, a), (key_t, b) = q_side, k_side
        head = shapes[query].dim[3]
        attributes = {}
        default = 1.0 / math.sqrt(head.dim_value) if head.HasField("dim_value") else None
        if default is None or abs(a * b - default) > _SCALE_RTOL * default:
            attributes["scale"] = a * b
        if softmax_in_float32:
            attributes["softmax_precision"] = onnx.TensorProto.FLOAT
        name = softmax.name or softmax.output[0]
        key = f"{name}/key"
        nodes = [
            onnx.helper.make_node("Transpose", [key_t], [key], name=key, perm=[0, 1, 3, 2]),
            onnx.helper.make_node("Attention", [query, key, values], list(second.output), name=f"{name}/attention",
                                  **attributes),
        ]  # fmt: skip
        replacements[second.output[0]] = nodes
        fused += 1
    if fused:
        nodes = []
        for node in model.graph.node:
            nodes.extend(replacements.get(node.output[0] if node.output else "", [node]))
        _replace_nodes(model, _live_nodes(nodes, [o.name for o in model.graph.output]))
        set_default_opset(model, max(default_opset(model), ATTENTION_OPSET))
        del model.graph.value_info[:]
    log.debug("fuse_attention: %d fused, %d left decomposed", fused, left)
    return model, fused, left


def attention_counts(model) -> dict[str, int]:
    """{'onnx': Attention nodes, 'decomposed': MatMul -> Softmax -> MatMul attention cores} of a graph."""
    graph = _Graph(model.graph.node)
    rank = lambda name: 4  # counting only: the softmax axis check needs no shapes
    decomposed = sum(_attention_pattern(graph, n, rank) is not None for n in model.graph.node if n.op_type == "Softmax")
    return {"onnx": sum(n.op_type == "Attention" for n in model.graph.node), "decomposed": decomposed}


def _attention_pattern(graph: _Graph, softmax, rank):
    """(first MatMul, second MatMul, V) around `softmax` when it is an attention core, else None."""
    source = softmax.input[0]
    node = graph.producer.get(source)
    if node is not None and node.op_type == "Cast" and len(graph.consumers[source]) == 1:
        source = node.input[0]
        node = graph.producer.get(source)
    if node is None or node.op_type != "MatMul" or len(graph.consumers[source]) != 1:
        return None
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3) or (axis == 3 and rank(softmax.input[0]) != 4):
        return None
    first, probs = node, softmax.output[0]
    after = graph.consumers.get(probs, [])
    if len(after) == 1 and after[0].op_type == "Cast":
        probs = after[0].output[0]
        after = graph.consumers.get(probs, [])
    if len(after) != 1 or after[0].op_type != "MatMul" or after[0].input[0] != probs:
        return None
    return first, after[0], after[0].input[1]


class _Graph:
    """Producer and consumer maps of a node list."""

    def __init__(self, nodes) -> None:
        self.producer = {out: node for node in nodes for out in node.output if out}
        self.consumers: dict[str, list] = {}
        for node in nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)


def _live_nodes(nodes: list, outputs: list[str]) -> list:
    """`nodes` without those whose outputs nothing reads (repeated until none is left)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraph bodies read outer-scope names
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(name for n in sub.node for name in n.input)
    return kept[::-1]


def _replace_nodes(model, nodes: list) -> None:
    copies = [type(n)() for n in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def default_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def set_default_opset(model, version: int) -> None:
    """Declare default-domain opset `version`. Between 18 and 24 the operators our graphs use only gained
    types (and Attention, RMSNormalization, RotaryEmbedding were added), so no node needs rewriting."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


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
