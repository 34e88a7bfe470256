"""Refit a REFIT-built transformer engine with new weights (a merged LoRA) instead of rebuilding it.

TensorRT's ONNX parser names an engine's weights after the ONNX initializers, and the exporters rename
many of them: a Linear's weight is stored transposed under a generated name (`onnx::MatMul_3389`).
`weight_map` recovers the link by value: it hashes every initializer and every checkpoint tensor (as is,
and transposed for 2-D tensors) in the export dtype, and maps initializer -> (checkpoint name, transposed).
The map is computed once at build time from the unmodified checkpoint and stored as `refit_map.json`
beside the engine; `refit_engine` then feeds the matching tensors of a merged state dict, straight from
device memory, through `trt.Refitter`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import ModuleType

import torch

from ..deps import require
from ..files import atomic_write
from ..models.checkpoint_io import load_weights
from .trt_api import errors_of, make_logger, trt_dtype

log = logging.getLogger(__name__)

MAP_NAME = "refit_map.json"
MIN_ELEMENTS = 2  # scalars (eps, shape constants) are not weights worth refitting and would match by accident

RefitMap = dict[str, list[tuple[str, bool, str]]]  # ONNX initializer -> [(checkpoint tensor, transposed, dtype)]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _digest(tensor: torch.Tensor) -> str:
    flat = tensor.contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() + str(tuple(tensor.shape)).encode()).hexdigest()


def weight_map(onnx_path: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> RefitMap:
    """{initializer name: [(state key, transposed, dtype name)]} for every initializer equal to a tensor of `state`
    cast to `dtype` (the export dtype), or to it and back to float32 (norm weights the export widens).

    An initializer matching several keys lists them all; slices of a tensor (fused q/k/v) are not found.
    """
    onnx = require("onnx", "the refit weight map")
    from onnx import numpy_helper

    by_value: dict[str, list[tuple[str, bool, str]]] = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        low = tensor.to(dtype)
        for value in (low, low.float()) if dtype != torch.float32 else (low,):
            dtype_name = str(value.dtype).removeprefix("torch.")
            by_value.setdefault(_digest(value), []).append((name, False, dtype_name))
            if value.ndim == 2:
                by_value.setdefault(_digest(value.t()), []).append((name, True, dtype_name))
    model = onnx.load(str(onnx_path))
    mapping: RefitMap = {}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.size < MIN_ELEMENTS:
            continue
        if array.dtype.kind == "V" or array.dtype.name == "bfloat16":  # bfloat16 (ml_dtypes): compare raw bytes
            value = torch.frombuffer(bytearray(array.tobytes()), dtype=torch.bfloat16).reshape(array.shape)
        else:
            value = torch.from_numpy(array.copy())
        found = by_value.get(_digest(value))
        if found:
            mapping[init.name] = found
    return mapping


def write_refit_map(folder: Path, onnx_path: Path, weights_dir: Path, precision: str) -> Path:
    """Map the graph at `onnx_path` (exported in `precision`) to the checkpoint component in `weights_dir`;
    store the map beside the engine."""
    from ..export.specs import EXPORT_DTYPES, TORCH_DTYPES

    mapping = weight_map(onnx_path, load_weights(weights_dir), TORCH_DTYPES[EXPORT_DTYPES[precision]])
    log.info("%s: %d ONNX weights mapped to checkpoint tensors for refit", Path(onnx_path).name, len(mapping))
    text = json.dumps({k: [list(c) for c in v] for k, v in sorted(mapping.items())}, indent=1) + "\n"
    return atomic_write(Path(folder) / MAP_NAME, lambda tmp: tmp.write_text(text))


def read_refit_map(folder: Path) -> RefitMap:
    path = Path(folder) / MAP_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the engine was not built with --refit; rebuild it with --refit.")
    return {k: [(name, bool(t), dtype) for name, t, dtype in v] for k, v in json.loads(path.read_text()).items()}


def refit_tensors(mapping: RefitMap, state: dict[str, torch.Tensor], changed: list[str]) -> dict[str, torch.Tensor]:
    """{initializer name: tensor laid out and typed as the graph stores it} for the `changed` state keys.

    `state` holds the merged weights in the export dtype (as the engine's graph was exported).
    Raises ValueError when a changed key has no initializer (e.g. a slice of a fused weight): rebuild then.
    """
    mapped = {key for candidates in mapping.values() for key, _, _ in candidates}
    lost = sorted(set(changed) - mapped)
    if lost:
        raise ValueError(f"merged weights {lost[:5]} have no refittable ONNX weight; rebuild the engine with the "
                         "LoRA merged instead of refitting it.")  # fmt: skip
    out = {}
    for name, candidates in mapping.items():
        if not any(key in changed for key, _, _ in candidates):
            continue
        values = [(state[key].t() if transposed else state[key]).to(_DTYPES[dtype]) for key, transposed, dtype in candidates]
        if any(not torch.equal(values[0], v) for v in values[1:]):
            raise ValueError(f"ONNX weight {name} matched {[c[0] for c in candidates]} at build time, which now "
                             "differ; rebuild the engine instead of refitting it.")  # fmt: skip
        out[name] = values[0].contiguous()
    return out


def refit_engine(trt: ModuleType, engine: object, tensors: dict[str, torch.Tensor]) -> int:
    """Refit `engine` in place from device tensors {weight name: tensor}; returns how many weights were set."""
    messages: list[str] = []
    refitter = trt.Refitter(engine, make_logger(trt, messages))
    known = set(refitter.get_all_weights())
    unknown = sorted(set(tensors) - known)
    if unknown:
        log.debug("refit: %d mapped weights are not refittable in the engine (folded by TensorRT): %s",
                  len(unknown), unknown[:5])  # fmt: skip
    kept = []  # the device tensors must live until refit_cuda_engine returns
    for name in sorted(set(tensors) & known):
        tensor = tensors[name]
        kept.append(tensor)
        weights = trt.Weights(trt_dtype(trt, tensor.dtype), tensor.data_ptr(), tensor.numel())
        if not refitter.set_named_weights(name, weights, trt.TensorLocation.DEVICE):
            raise RuntimeError(f"TensorRT refused the refit weight {name}:\n  " + "\n  ".join(errors_of(messages)))
    missing = refitter.get_missing_weights()
    if missing:
        raise RuntimeError(f"refit needs weights it was not given: {list(missing)[:10]}; rebuild the engine instead.")
    torch.cuda.current_stream().synchronize()  # the device weights were made (cast, transposed) on torch's stream
    if not refitter.refit_cuda_engine():
        raise RuntimeError("TensorRT could not refit the engine:\n  " + "\n  ".join(errors_of(messages) or messages[-10:]))
    torch.cuda.synchronize()
    return len(kept)
