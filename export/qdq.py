"""Explicit quantization of an exported graph: QuantizeLinear/DequantizeLinear pairs from calibrated scales.

`insert_qdq(model, layers, precision)` rewrites every MatMul (or Gemm) whose node scope names a calibrated linear
layer (`/model/blocks.0/attn1/to_q/MatMul` -> `blocks.0.attn1.to_q`, the torchscript exporter's scopes) into

    x -> [Mul(s): SmoothQuant] -> QuantizeLinear(input_scale) -> DequantizeLinear(input_scale) --\
                                                                                                    MatMul -> y
    W_q (int8 | float8e4m3fn initializer, W / s quantized) -> DequantizeLinear(weight_scale[, axis]) --/

with standard ONNX operators only (opset >= 19, no custom domains; an opset-18 graph is lifted to 19: no operator
it uses changed meaning between 18 and 19 for existing attributes, 19 only added types and new options): int8 with int8 zero points 0 (TensorRT's
only INT8 form), FP8 E4M3 with float8e4m3fn zero points 0 (opset 19). Scales and the smoothing vector are in
the graph's float type (float32 or float16), so a strongly typed TensorRT network runs the GEMM in 8 bits and
everything else in the graph's dtype. Weights are per output channel (axis of the output dim) when the scales
are (what `ruyi-trt calibrate` writes for both precisions), else per tensor; activations are per tensor. The quantized weights replace the float ones (the graph
shrinks ~4x from fp32).

ONNX Runtime's CPU provider fuses DQ -> MatMul into MatMulIntegerToFloat, which has no float8 kernel: FP8
graphs must run with its QDQ fusion off; they then compute the exact Q/DQ arithmetic in float (a numerical
check, not a speed-up). INT8 graphs run fused where the CPU has VNNI (or is not x86): on x86 CPUs without it,
the fused kernel multiplies u8 x s8 pairs with VPMADDUBSW, whose int16 sums saturate (measured on an AVX2-only
EPYC: 6.8% of max |out| off the exact Q/DQ arithmetic on the tiny transformer, against 3e-7 unfused), so there
int8 runs unfused too. `qdq_session_config(precision, device)` gives the session options for both.

`ensure_qdq_graph` caches the rewritten graph in `cache_root()/qdq/<key>/` (written whole, files.atomic_folder,
one process at a time), keyed by the source graph's bytes, the scales' identity and the precision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..deps import require
from ..files import atomic_folder, file_digest, file_lock

log = logging.getLogger(__name__)

QDQ_OPSET = 19  # float8e4m3fn QuantizeLinear/DequantizeLinear
PRECISIONS = ("fp8", "int8")
QMAX = {"fp8": 448.0, "int8": 127.0}
UNFUSED_QDQ = {"session.disable_quant_qdq": "1"}  # ORT session option: Q/DQ computed as written
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
RECORD_NAME = "qdq.json"


def qdq_session_config(precision: str, device: torch.device | str) -> dict[str, str] | None:
    """ONNX Runtime session options for a Q/DQ graph of `precision` on `device` (see the module docstring)."""
    if precision == "fp8" or (precision == "int8" and torch.device(device).type == "cpu" and not this_cpu_int8_exact()):
        return dict(UNFUSED_QDQ)
    return None


def cpu_int8_exact(machine: str, cpuinfo: str) -> bool:
    """Whether ONNX Runtime's fused int8 CPU kernels are free of int16 saturation on a CPU of `machine`
    (platform.machine()) with /proc/cpuinfo text `cpuinfo`: any non-x86 CPU, or an x86 one with a VNNI flag."""
    if machine.lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in VNNI_FLAGS)


@functools.cache
def this_cpu_int8_exact() -> bool:
    """`cpu_int8_exact` for this machine (an x86 CPU whose flags cannot be read counts as without VNNI)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    exact = cpu_int8_exact(platform.machine(), cpuinfo)
    if not exact:
        log.info("this CPU has no VNNI: int8 Q/DQ graphs run in ONNX Runtime with QDQ fusion off (exact, slower)")
    return exact


class LinearScales(Protocol):
    """One layer's calibrated scales (calib.scales.LayerScales has this shape)."""

    input_scale: torch.Tensor  # 0-d
    weight_scale: torch.Tensor  # 0-d or [out]
    smooth: torch.Tensor | None  # [in] or None


@dataclass
class QdqReport:
    """What `insert_qdq` changed."""

    precision: str
    quantized: list[str] = field(default_factory=list)  # layer names
    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    smooth_nodes: int = 0


def module_of(node_name: str, scope: str) -> str:
    """The transformer module a MatMul/Gemm node belongs to, from its exported scope:
    '/model/blocks.0/attn1/to_q/MatMul' -> 'blocks.0.attn1.to_q' (scope 'model': the export wrapper's attribute);
    'blocks.0//block/attn1/to_q/MatMul' -> 'blocks.0.attn1.to_q' (the whole transformer stitched from the per-block
    graphs, export/stitch.py: '<stage>/' + the stage graph's node name, whose wrapper holds the block as 'block');
    'unembed//proj_out/MatMul' -> 'proj_out'."""
    stage, stitched, inner = node_name.partition("//")
    parts = [p for p in (inner if stitched else node_name).split("/") if p][:-1]
    if parts and parts[0] in (scope, "block"):
        parts = parts[1:]
    if stitched and stage.startswith("blocks."):
        parts = [stage, *parts]
    return ".".join(parts) if parts else ""


def insert_qdq(model, layers: Mapping[str, LinearScales], precision: str, scope: str = "model") -> QdqReport:
    """Quantize every MatMul/Gemm of `model` (a ModelProto, changed in place) that belongs to a layer of `layers`.

    Raises ValueError when a layer has no node in the graph (the scales do not fit this graph)."""
    onnx = require("onnx", "Q/DQ graphs")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not supported; use one of {PRECISIONS}.")
    default = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    opset = default.version if default is not None else 0
    if opset < QDQ_OPSET - 1:
        raise ValueError(f"the graph has opset {opset}; Q/DQ graphs need opset >= 18 (export with --opset 18 or 19).")
    default.version = max(opset, QDQ_OPSET)
    initializers = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    # MatMul(x, Transpose(W)) with W [out, in] an initializer: how the per-block graphs (weights as inputs) and the
    # whole transformer stitched from them (export/stitch.py) carry a linear
    transposes = {node.output[0]: node for node in model.graph.node
                  if node.op_type == "Transpose" and node.input[0] in initializers
                  and [list(a.ints) for a in node.attribute if a.name == "perm"] in ([], [[1, 0]])}  # fmt: skip
    report = QdqReport(precision)
    nodes, added, replaced = [], [], set()
    held = {}  # single-consumer Transpose(W) nodes, emitted just before their consumer (after the weight's DQ)
    for node in model.graph.node:
        if node.output and node.output[0] in transposes and consumers.get(node.output[0]) == 1:
            held[node.output[0]] = node
            continue
        layer = module_of(node.name, scope) if node.op_type in ("MatMul", "Gemm") else ""
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        transpose = held.pop(node.input[1], None) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if transpose is not None:
            weight = initializers[transpose.input[0]]
        nodes.extend(held.pop(name) for name in node.input if name in held)  # any other consumer of a held one
        if layer not in layers or weight is None:
            nodes.extend([transpose] if transpose is not None else [])
            nodes.append(node)
            continue
        transposed = transpose is not None or (node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute))
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            raise ValueError(f"{node.name}: Gemm with transA is not supported for Q/DQ.")
        pre, weight_dq = _quantize_layer(onnx, node, layer, layers[layer], weight, transposed, precision, added)
        if consumers[weight.name] == 1:
            replaced.add(weight.name)
        nodes.extend(pre)
        if transpose is not None:  # DQ(W_q) -> Transpose -> MatMul
            transpose.input[0] = weight_dq
            nodes.append(transpose)
        nodes.append(node)
        report.quantized.append(layer)
        report.quantize_nodes += 1
        report.dequantize_nodes += 2
        report.smooth_nodes += int(layers[layer].smooth is not None)
        if transpose is None:
            node.input[1] = weight_dq
    missing = sorted(set(layers) - set(report.quantized))
    if missing:
        raise ValueError(
            f"{len(missing)} calibrated layers have no MatMul in the graph (e.g. {missing[:3]}): the scales were made "
            "for another model, or the graph's node names do not carry module scopes (export with the torchscript "
            "exporter)."
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [init for init in model.graph.initializer if init.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    return report


def _quantize_layer(onnx, node, layer: str, scales: LinearScales, weight, transposed: bool, precision: str,
                    added: list) -> tuple[list, str]:  # fmt: skip
    """The nodes before `node` (smooth, Q, DQ on its activation, DQ of its weight), new initializers into `added`;
    returns (nodes, the dequantized weight's name). `node.input[0]` is rewired to the dequantized activation."""
    numpy_helper, helper, TensorProto = onnx.numpy_helper, onnx.helper, onnx.TensorProto
    w = numpy_helper.to_array(weight).astype(np.float32)
    float_type = weight.data_type
    float_np = np.float16 if float_type == TensorProto.FLOAT16 else np.float32
    if float_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ValueError(f"{node.name}: weight type {TensorProto.DataType.Name(float_type)}; Q/DQ takes float32/float16 graphs.")
    out_axis = 0 if transposed else 1  # MatMul B is [in, out]; Gemm with transB: [out, in]
    smooth = None if scales.smooth is None else scales.smooth.detach().cpu().float().numpy()
    if smooth is not None:
        w = w / np.expand_dims(smooth, out_axis)  # W_s = W / s along the input dim (the other axis)
    weight_scale = scales.weight_scale.detach().cpu().float().numpy()
    per_channel = weight_scale.ndim == 1
    shape = [1, 1]
    shape[out_axis] = -1
    divisor = weight_scale.reshape(shape) if per_channel else weight_scale
    base = f"{layer}.qdq"
    x_name = node.input[0]
    before = []
    if smooth is not None:
        added.append(numpy_helper.from_array(smooth.astype(float_np), f"{base}.smooth"))
        before.append(helper.make_node("Mul", [x_name, f"{base}.smooth"], [f"{base}.x_smooth"], name=f"{base}/Smooth"))
        x_name = f"{base}.x_smooth"
    added.append(numpy_helper.from_array(scales.input_scale.detach().cpu().float().numpy().astype(float_np).reshape(()),
                                         f"{base}.input_scale"))  # fmt: skip
    added.append(numpy_helper.from_array(weight_scale.astype(float_np), f"{base}.weight_scale"))
    if precision == "int8":
        quantized = np.clip(np.rint(w / divisor), -128, 127).astype(np.int8)
        added.append(numpy_helper.from_array(quantized, f"{base}.weight_q"))
        added.append(numpy_helper.from_array(np.zeros((), np.int8), f"{base}.input_zero"))
        weight_zero = np.zeros(weight_scale.shape, np.int8)
        added.append(numpy_helper.from_array(weight_zero, f"{base}.weight_zero"))
    else:
        ml_dtypes = require("ml_dtypes", "FP8 Q/DQ graphs")
        quantized = np.clip(w / divisor, -QMAX["fp8"], QMAX["fp8"]).astype(ml_dtypes.float8_e4m3fn)
        added.append(_fp8_tensor(helper, TensorProto, quantized, f"{base}.weight_q"))
        added.append(_fp8_tensor(helper, TensorProto, np.zeros((), ml_dtypes.float8_e4m3fn), f"{base}.input_zero"))
        added.append(_fp8_tensor(helper, TensorProto, np.zeros(weight_scale.shape, ml_dtypes.float8_e4m3fn),
                                 f"{base}.weight_zero"))  # fmt: skip
    before += [
        helper.make_node("QuantizeLinear", [x_name, f"{base}.input_scale", f"{base}.input_zero"], [f"{base}.x_q"],
                         name=f"{base}/QuantizeInput"),
        helper.make_node("DequantizeLinear", [f"{base}.x_q", f"{base}.input_scale", f"{base}.input_zero"],
                         [f"{base}.x_dq"], name=f"{base}/DequantizeInput"),
        helper.make_node("DequantizeLinear", [f"{base}.weight_q", f"{base}.weight_scale", f"{base}.weight_zero"],
                         [f"{base}.w_dq"], name=f"{base}/DequantizeWeight", **({"axis": out_axis} if per_channel else {})),
    ]  # fmt: skip
    node.input[0] = f"{base}.x_dq"
    return before, f"{base}.w_dq"


def _fp8_tensor(helper, TensorProto, array: np.ndarray, name: str):
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(array.shape), array.view(np.uint8).tobytes(), raw=True)


def quantize_graph_file(source: Path, target: Path, layers: Mapping[str, LinearScales], precision: str,
                        scope: str = "model") -> QdqReport:  # fmt: skip
    """Load `source` (with its external data), insert Q/DQ, check and save it as `target` (+ `target.data` > 2 GB)."""
    onnx = require("onnx", "Q/DQ graphs")
    from .onnx_export import MAX_PROTO_BYTES

    model = onnx.load(str(source))
    report = insert_qdq(model, layers, precision, scope)
    external = sum(len(t.raw_data) for t in model.graph.initializer) > MAX_PROTO_BYTES
    onnx.save_model(model, str(target), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{target.name}.data" if external else None, size_threshold=1024)  # fmt: skip
    onnx.checker.check_model(str(target))
    return report


def _files_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for item in (path, path.with_name(f"{path.name}.data")):
        if item.is_file():
            digest.update(f"{item.name}:{file_digest(item)}\n".encode())
    return digest.hexdigest()


def ensure_qdq_graph(source: str | Path, layers: Mapping[str, LinearScales], scales_id: str, precision: str,
                     scope: str = "model") -> Path:  # fmt: skip
    """The Q/DQ version of the graph `source`, from the cache (`cache_root()/qdq/<key>/<name>.onnx`) or made now."""
    from ..models.presets import cache_root

    source = Path(source)
    key = hashlib.sha256(json.dumps({"source": _files_digest(source), "scales": scales_id, "precision": precision,
                                     "scope": scope, "opset": QDQ_OPSET}, sort_keys=True).encode()).hexdigest()[:16]  # fmt: skip
    folder = cache_root() / "qdq" / key
    target = folder / source.name
    with file_lock(folder):
        if (folder / RECORD_NAME).is_file() and target.is_file():
            return target
        report = None

        def write(tmp: Path) -> None:
            nonlocal report
            report = quantize_graph_file(source, tmp / source.name, layers, precision, scope)
            record = {"source": str(source), "scales": scales_id, "precision": precision, **asdict(report),
                      "quantized": len(report.quantized)}  # fmt: skip
            (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

        atomic_folder(folder, write, replace=True)
    log.info("%s: %s Q/DQ graph with %d quantized layers -> %s", source.name, precision, len(report.quantized), target)
    return target
