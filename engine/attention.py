"""Does attention fuse in TensorRT? Checked on the ONNX file before building, and in the engine after it.

TensorRT turns `MatMul(Q, K^T) -> [mask Add/Where] -> Softmax -> MatMul(., V)` into one fused
multi-head-attention kernel (no N x N tensor in memory), provided the softmax scale is applied to Q or K
*before* the first MatMul ("Fused Attention" in the TensorRT developer guide; the IAttention layer,
`add_attention`, is the other route, for networks built with the layer API). Our exporters emit
exactly that from `F.scaled_dot_product_attention`: the scale is a Mul on Q/K, and in fp16/bf16
graphs the softmax sits between Casts to float32 and back (export/graph_passes.py). The build log
records, per graph, how many attention patterns were found and of which form, so a graph that will
not fuse (scale after BMM1, or a Softmax not fed by a MatMul) is visible before any profiling.

After a build, `check_fused_attention` asks TensorRT's engine inspector for every layer's tensors at the
profile's opt shapes and refuses the engine when some layer writes an attention's [B, H, Sq, Skv] score
matrix (`unfused_attention`, a pure function of the inspector JSON): ONNX `Attention` nodes and decomposed
cores alike must have become one fused kernel.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ..deps import require

_BETWEEN_BMM1_AND_SOFTMAX = ("Cast", "Add", "Where")  # mask and dtype ops TensorRT's pattern allows
_SCALE_OPS = ("Mul", "Div")


def attention_patterns(onnx_path: str | Path) -> dict[str, Any]:
    """{'softmax': n, 'fusable': n, 'scale_after_bmm1': n, 'no_bmm': n, 'fp32_softmax': n} for the graph."""
    onnx = require("onnx", "the attention-pattern check")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        counts["softmax"] += 1
        upstream, scaled_after = _walk_up(producer, node.input[0])
        downstream, fp32 = _walk_down(consumers, node.output[0])
        if fp32:
            counts["fp32_softmax"] += 1
        if upstream is None or downstream is None:
            counts["no_bmm"] += 1
        elif scaled_after:
            counts["scale_after_bmm1"] += 1
        else:
            counts["fusable"] += 1
    return {key: counts.get(key, 0) for key in ("softmax", "fusable", "scale_after_bmm1", "no_bmm", "fp32_softmax")}


def _walk_up(producer: dict, name: str):
    """(the MatMul feeding a Softmax input through allowed ops or None, whether a scale op sits in between)."""
    scaled = False
    for _ in range(6):
        node = producer.get(name)
        if node is None:
            return None, scaled
        if node.op_type == "MatMul":
            return node, scaled
        if node.op_type in _SCALE_OPS:
            scaled = True
        elif node.op_type not in _BETWEEN_BMM1_AND_SOFTMAX:
            return None, scaled
        name = node.input[0]
    return None, scaled


def _walk_down(consumers: dict, name: str):
    """(the MatMul the Softmax output feeds, through Casts, or None; whether a Cast follows: fp32 softmax)."""
    cast = False
    for _ in range(3):
        nodes = consumers.get(name, [])
        if len(nodes) != 1:
            return None, cast
        node = nodes[0]
        if node.op_type == "MatMul":
            return node, cast
        if node.op_type != "Cast":
            return None, cast
        cast, name = True, node.output[0]
    return None, cast


def describe(counts: dict[str, Any]) -> str:
    """One line for the build log."""
    if not counts["softmax"]:
        return "attention: no Softmax in this graph (nothing to fuse)"
    text = f"attention: {counts['fusable']}/{counts['softmax']} Softmax nodes in the MatMul-Softmax-MatMul pattern TensorRT fuses"
    if counts["fp32_softmax"]:
        text += f" ({counts['fp32_softmax']} with float32 softmax between Casts)"
    if counts["scale_after_bmm1"]:
        text += f"; {counts['scale_after_bmm1']} scale after the first MatMul (will not fuse: scale Q or K instead)"
    if counts["no_bmm"]:
        text += f"; {counts['no_bmm']} not between two MatMuls"
    return text


# -- after the build: did every attention become one fused layer? ----------------------------------------------
def unfused_attention(engine_info: dict[str, Any], scores: dict[str, tuple[int, ...]]) -> list[str]:
    """The attention nodes of `scores` ({node: (B, H, Sq, Skv)}) whose score matrix some engine layer writes.

    `engine_info` is TensorRT's engine inspector JSON at concrete shapes (ProfilingVerbosity.DETAILED). A fused
    attention kernel never materializes its [B, H, Sq, Skv] scores; an unfused one writes them, maybe
    reshaped to [B*H, Sq, Skv], so a layer output with those last two dims and that element count is one.
    """
    layers = engine_info.get("Layers", [])
    if any(not isinstance(layer, dict) for layer in layers):
        raise ValueError("the engine inspector gave layer names only: the engine was built without "
                         "ProfilingVerbosity.DETAILED; rebuild it with this ruyi-trt.")  # fmt: skip
    written = [tuple(t.get("Dimensions", ())) for layer in layers for t in layer.get("Outputs", [])]
    unfused = []
    for name, shape in scores.items():
        elements = math.prod(shape)
        if any(len(dims) >= 2 and dims[-2:] == shape[-2:] and math.prod(dims) == elements for dims in written):
            unfused.append(name)
    return unfused


def check_fused_attention(plan: bytes, onnx_path: Path, profile: dict, engine_name: str) -> int:
    """Deserialize a freshly built plan, inspect its layers at the profile's opt shapes and raise EngineBuildError
    when an attention did not become one fused layer; returns the number of attention nodes checked."""
    from ..export.graph_stats import attention_score_shapes
    from .builder import EngineBuildError
    from .trt_api import process_logger, require_tensorrt

    opt = {name: shape for name, (_, shape, _) in profile.items()}
    scores = attention_score_shapes(onnx_path, opt)
    if not scores:
        return 0
    trt = require_tensorrt("the fused-attention check")
    logger = process_logger(trt)
    with logger.capture(f"{engine_name} (inspector)"):
        runtime = trt.Runtime(logger.logger)
        engine = runtime.deserialize_cuda_engine(plan)
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)  # nothing runs
        for name, shape in opt.items():
            context.set_input_shape(name, shape)
        inspector = engine.create_engine_inspector()
        inspector.execution_context = context
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    unfused = unfused_attention(info, scores)
    if unfused:
        raise EngineBuildError(
            f"{engine_name}: {len(unfused)} of {len(scores)} attention nodes did not become one fused layer in the "
            f"TensorRT engine (their score matrices are written to memory: {unfused[:4]}); at full size that is "
            "hundreds of GB. Export attention as ONNX Attention (--attention onnx, TensorRT >= 10.14.1) or report "
            "this TensorRT version. The plan was not cached."
        )
    return len(scores)
