"""Refit a REFIT-built transformer engine with new weights (a merged LoRA) instead of rebuilding it.

TensorRT's ONNX parser names an engine's weights after the ONNX initializers. In the whole-transformer
graph every block weight is an initializer named by its checkpoint key, in checkpoint layout
(export/stitch.py), so it maps by name. The embed/unembed weights come from the exporter, which renames
many of them and stores a Linear's weight transposed under a generated name (`embed/onnx::MatMul_3389`);
`weight_map` recovers those by value: it hashes the remaining initializers and checkpoint tensors (as is,
and transposed for 2-D tensors) in the export dtype. Only the non-block weights are ever read for that,
so mapping a full-size graph needs a few hundred MB. The map is computed once at build time from the
unmodified checkpoint and stored as `refit_map.json` beside the engine.

`refit_engine` feeds TensorRT's Refitter from host memory (TensorLocation.HOST: nothing is copied to the
GPU by us): first the changed weights, then whatever TensorRT reports missing (weights it fused with the
changed ones, e.g. a merged q/k/v), filled from the full state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

import torch

from ..deps import require
from ..files import atomic_write
from .trt_api import errors_of, process_logger, trt_dtype

log = logging.getLogger(__name__)

MAP_NAME = "refit_map.json"
MIN_ELEMENTS = 2  # scalars (eps, shape constants) are not weights worth refitting and would match by accident

RefitMap = dict[str, list[tuple[str, bool, str]]]  # ONNX initializer -> [(checkpoint tensor, transposed, dtype)]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16"}  # TensorProto data types of float weights


def _digest(tensor: torch.Tensor) -> str:
    flat = tensor.contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() + str(tuple(tensor.shape)).encode()).hexdigest()


def weight_map(onnx_path: Path, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> RefitMap:
    """{initializer name: [(state key, transposed, dtype name)]}: by name for initializers named like a state
    key (the stitched block weights), else by value for initializers equal to a remaining tensor of `state`
    cast to `dtype` (the export dtype), or to it and back to float32 (norm weights the export widens).

    `state` may be lazy (tensors read on access): only the keys no initializer is named after are read.
    An initializer matching several keys lists them all; slices of a tensor (fused q/k/v) are not found.
    """
    onnx = require("onnx", "the refit weight map")
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    mapping: RefitMap = {}
    named = {init.name for init in model.graph.initializer if init.name in state}
    for init in model.graph.initializer:
        if init.name in named:
            mapping[init.name] = [(init.name, False, _ONNX_DTYPES.get(init.data_type, "float32"))]
    by_value: dict[str, list[tuple[str, bool, str]]] = {}
    for name in state:
        if name in named:
            continue
        tensor = state[name]
        if not tensor.is_floating_point():
            continue
        low = tensor.to(dtype)
        for value in (low, low.float()) if dtype != torch.float32 else (low,):
            dtype_name = str(value.dtype).removeprefix("torch.")
            by_value.setdefault(_digest(value), []).append((name, False, dtype_name))
            if value.ndim == 2:
                by_value.setdefault(_digest(value.t()), []).append((name, True, dtype_name))
    for init in model.graph.initializer:
        if init.name in named or init.data_location == onnx.TensorProto.EXTERNAL:
            continue
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


def write_refit_map(folder: Path, onnx_path: Path, model, precision: str) -> Path:
    """Map the graph at `onnx_path` (exported in `precision`) to the transformer of `model` (a ModelSource,
    'full-random' or checkpoint folder); store the map beside the engine."""
    from ..export.source import model_source
    from ..export.specs import EXPORT_DTYPES, TORCH_DTYPES

    dtype = TORCH_DTYPES[EXPORT_DTYPES[precision]]
    mapping = weight_map(onnx_path, TransformerState(model_source(model), dtype), dtype)
    log.info("%s: %d ONNX weights mapped to checkpoint tensors for refit", Path(onnx_path).name, len(mapping))
    text = json.dumps({k: [list(c) for c in v] for k, v in sorted(mapping.items())}, indent=1) + "\n"
    return atomic_write(Path(folder) / MAP_NAME, lambda tmp: tmp.write_text(text))


class TransformerState(Mapping):
    """A model source's transformer state dict in one dtype, each tensor read (or made) when accessed."""

    def __init__(self, source, dtype: torch.dtype):
        self.source, self.dtype = source, dtype
        self.keys_ = list(source.transformer(dtype, keys=lambda key: False).state_dict())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.keys_:
            raise KeyError(key)
        return self.source.transformer_tensor(key, self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def read_refit_map(folder: Path) -> RefitMap:
    path = Path(folder) / MAP_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the engine was not built with --refit; rebuild it with --refit.")
    return {k: [(name, bool(t), dtype) for name, t, dtype in v] for k, v in json.loads(path.read_text()).items()}


def refit_tensors(mapping: RefitMap, state: Mapping[str, torch.Tensor], changed: list[str]) -> dict[str, torch.Tensor]:
    """{initializer name: tensor laid out and typed as the graph stores it} for the `changed` state keys.

    `state` holds the merged weights in the export dtype (as the engine's graph was exported).
    Raises ValueError when a changed key has no initializer (e.g. a slice of a fused weight): rebuild then.
    """
    mapped = {key for candidates in mapping.values() for key, _, _ in candidates}
    lost = sorted(set(changed) - mapped)
    if lost:
        raise ValueError(f"merged weights {lost[:5]} have no refittable ONNX weight; rebuild the engine with the "
                         "LoRA merged instead of refitting it.")  # fmt: skip
    wanted = [name for name, candidates in mapping.items() if any(key in changed for key, _, _ in candidates)]
    return initializer_tensors(mapping, state, wanted)


def initializer_tensors(mapping: RefitMap, state: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """{initializer name: tensor laid out and typed as the graph stores it} for the initializers `names`
    (e.g. the weights TensorRT reports missing during a refit); ValueError for a name the map lacks."""
    absent = sorted(set(names) - set(mapping))
    if absent:
        raise ValueError(f"engine weights {absent[:5]} have no checkpoint tensor in the refit map; rebuild the engine.")
    out = {}
    for name in names:
        candidates = mapping[name]
        values = [(state[key].t() if transposed else state[key]).to(_DTYPES[dtype]) for key, transposed, dtype in candidates]
        if any(not torch.equal(values[0], v) for v in values[1:]):
            raise ValueError(f"ONNX weight {name} matched {[c[0] for c in candidates]} at build time, which now "
                             "differ; rebuild the engine instead of refitting it.")  # fmt: skip
        out[name] = values[0].contiguous()
    return out


def refit_engine(trt: ModuleType, engine: object, tensors: dict[str, torch.Tensor],
                 fill: Callable[[list[str]], dict[str, torch.Tensor]] | None = None, label: str = "refit") -> int:  # fmt: skip
    """Refit `engine` in place from host tensors {weight name: tensor}; weights TensorRT then reports missing
    (fused with those) come from `fill(names)`. Returns how many weights were set."""
    logger = process_logger(trt)
    with logger.capture(label) as messages:
        refitter = trt.Refitter(engine, logger.logger)
        known = set(refitter.get_all_weights())
        unknown = sorted(set(tensors) - known)
        if unknown:
            log.debug("refit: %d mapped weights are not refittable in the engine (folded by TensorRT): %s",
                      len(unknown), unknown[:5])  # fmt: skip
        kept: dict[str, torch.Tensor] = {}  # the host tensors must live until refit_cuda_engine returns
        pending = {name: tensor for name, tensor in tensors.items() if name in known}
        while pending:
            for name, tensor in pending.items():
                host = tensor.detach().to("cpu").contiguous()
                kept[name] = host
                weights = trt.Weights(trt_dtype(trt, host.dtype), host.data_ptr(), host.numel())
                if not refitter.set_named_weights(name, weights, trt.TensorLocation.HOST):
                    raise RuntimeError(f"TensorRT refused the refit weight {name}:\n  " + "\n  ".join(errors_of(messages)))
            missing = [name for name in refitter.get_missing_weights() if name not in kept]
            pending = fill(missing) if (missing and fill is not None) else {}
            if missing and set(missing) - set(pending):
                raise RuntimeError(f"refit needs weights it was not given: {sorted(set(missing) - set(pending))[:10]}; "
                                   "rebuild the engine instead.")  # fmt: skip
        if not refitter.refit_cuda_engine():
            raise RuntimeError("TensorRT could not refit the engine:\n  " + "\n  ".join(errors_of(messages) or messages[-10:]))
    return len(kept)
