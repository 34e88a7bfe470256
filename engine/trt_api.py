"""The TensorRT Python API as ruyi-trt uses it: the lazy import, the members we call, shared glue.

`TRT_API` lists every TensorRT member the engine code touches, per kind of object. The test
tests/engine/test_trt_api.py parses engine/*.py and runtime/backends/trt_backend.py with `ast` and checks both
ways: every attribute read on the `trt` module or on a variable holding a TensorRT object (the names in
`TRT_API`, e.g. `builder`, `engine`, `self.context`) is listed here, and every listed name exists in the
committed name lists of TensorRT 10.16 and 11.4 (engine/trt_api/*.txt, see engine/trt_api_names.py).
Code in these modules must therefore keep TensorRT objects in variables of these names, and only them.

Everything used here exists in both TensorRT 10 (>= 10.8) and 11. TensorRT 11 dropped weak typing
(BuilderFlag.FP16/BF16/INT8/FP8 are gone), so networks are always created STRONGLY_TYPED and take
their precision from the ONNX graph's dtypes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from ..deps import require

log = logging.getLogger(__name__)

MIN_VERSION = (10, 8)  # IProgressMonitor, weight_streaming_budget_v2, update_device_memory_size_for_shapes, STRONGLY_TYPED + WEIGHT_STREAMING

# kind of object (the variable name that holds it) -> members read on it
TRT_API: dict[str, tuple[str, ...]] = {
    "trt": (
        "__version__", "Builder", "BuilderFlag", "REFIT", "WEIGHT_STREAMING", "DataType", "BF16", "BOOL", "FLOAT",
        "HALF", "INT32", "INT64", "INT8", "UINT8", "FP8", "ILogger", "Severity", "ERROR", "INTERNAL_ERROR", "WARNING",
        "INFO", "VERBOSE", "__init__", "IProgressMonitor", "MemoryPoolType", "WORKSPACE", "NetworkDefinitionCreationFlag",
        "STRONGLY_TYPED", "OnnxParser", "Refitter", "Runtime", "TensorIOMode", "INPUT", "TensorLocation", "HOST",
        "Weights", "ProfilingVerbosity", "DETAILED", "ExecutionContextAllocationStrategy", "USER_MANAGED",
        "LayerInformationFormat", "JSON",
    ),
    "builder": ("create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"),
    "network": ("num_inputs", "get_input", "num_layers"),
    "network_input": ("name", "dtype", "shape"),
    "parser": ("parse_from_file", "num_errors", "get_error"),
    "builder_config": (
        "set_memory_pool_limit", "set_flag", "create_timing_cache", "set_timing_cache", "get_timing_cache",
        "add_optimization_profile", "progress_monitor", "profiling_verbosity",
    ),
    "opt_profile": ("set_shape",),
    "timing_cache": ("serialize",),
    "plan": ("nbytes",),
    "runtime": ("deserialize_cuda_engine",),
    "engine": (
        "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_profile_shape",
        "num_optimization_profiles", "streamable_weights_size", "weight_streaming_budget_v2", "device_memory_size_v2",
        "create_execution_context", "create_engine_inspector",
    ),
    "context": (
        "set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3",
        "update_device_memory_size_for_shapes", "set_device_memory",
    ),
    "inspector": ("execution_context", "get_engine_information"),
    "refitter": ("get_all_weights", "set_named_weights", "get_missing_weights", "refit_cuda_engine"),
    # methods our Python subclasses of trt.ILogger / trt.IProgressMonitor override
    "override": ("log", "phase_start", "step_complete", "phase_finish"),
}  # fmt: skip


def require_tensorrt(purpose: str) -> ModuleType:
    """`import tensorrt`, or ImportError naming the pip command (also when the bindings lack libnvinfer)."""
    try:
        trt = require("tensorrt", purpose)
    except OSError as exc:  # the bindings wheel is there but the TensorRT libraries are not
        raise ImportError(
            f"tensorrt is installed but its libraries do not load ({exc}); needed for {purpose}. Install them with: "
            "pip install 'ruyi-trt[trt]'  (or: pip install tensorrt-cu12 / tensorrt-cu13 from NVIDIA's index)"
        ) from exc
    if version_tuple(trt.__version__) < MIN_VERSION:
        raise ImportError(
            f"TensorRT {trt.__version__} is too old for {purpose}; ruyi-trt needs >= {'.'.join(map(str, MIN_VERSION))}: "
            "pip install -U 'ruyi-trt[trt]'"
        )
    return trt


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.16.1.11' -> (10, 16, 1, 11); non-numeric parts (post1) are dropped."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def torch_dtype(trt: ModuleType, dtype: object) -> torch.dtype:
    """The torch dtype of a TensorRT DataType; ValueError for types that have none."""
    table = {
        trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64, trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8, trt.DataType.BOOL: torch.bool, trt.DataType.FP8: torch.float8_e4m3fn,
    }  # fmt: skip
    if dtype not in table:
        raise ValueError(f"TensorRT dtype {dtype} has no torch equivalent; this engine cannot be bound to torch tensors.")
    return table[dtype]


def trt_dtype(trt: ModuleType, dtype: torch.dtype) -> object:
    """The TensorRT DataType of a torch dtype (the inverse of `torch_dtype`)."""
    for candidate in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16, trt.DataType.INT32, trt.DataType.INT64,
                      trt.DataType.INT8, trt.DataType.UINT8, trt.DataType.BOOL, trt.DataType.FP8):  # fmt: skip
        if torch_dtype(trt, candidate) == dtype:
            return candidate
    raise ValueError(f"torch dtype {dtype} has no TensorRT equivalent.")


class _ProcessLogger:
    """The one trt.ILogger of this process, which records messages into the captures open at the time.

    TensorRT keeps the first logger it is given (by the first Builder or Runtime) for the whole process
    and ignores later ones, so a logger per engine would leave every engine but the first without its
    messages. Here every Builder, Runtime, OnnxParser and Refitter gets this logger, and each task opens
    `capture(label)`: the messages logged while it is open go to its list (TensorRT may log from its own
    threads, so captures are process-wide, not per thread), and to Python logging with the label.
    """

    def __init__(self, trt: ModuleType) -> None:
        levels = {
            trt.ILogger.Severity.INTERNAL_ERROR: logging.CRITICAL, trt.ILogger.Severity.ERROR: logging.ERROR,
            trt.ILogger.Severity.WARNING: logging.WARNING, trt.ILogger.Severity.INFO: logging.INFO,
            trt.ILogger.Severity.VERBOSE: logging.DEBUG,
        }  # fmt: skip
        captures: list[tuple[str, list[str], bool]] = []
        lock = threading.Lock()
        self.captures, self.lock = captures, lock

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, level, message):  # called by TensorRT, possibly from its threads
                python_level = levels.get(level, logging.INFO)
                with lock:
                    open_now = list(captures)
                label = open_now[-1][0] if open_now else "tensorrt"
                for _, messages, verbose in open_now:
                    if python_level > logging.DEBUG or verbose:
                        messages.append(f"[{logging.getLevelName(python_level)}] {message}")
                log.log(python_level if python_level >= logging.WARNING else logging.DEBUG, "TensorRT (%s): %s",
                        label, message)  # fmt: skip

        self.logger = _Logger()

    @contextlib.contextmanager
    def capture(self, label: str, verbose: bool = False) -> Iterator[list[str]]:
        """Collect TensorRT's messages under `label` while the block runs (VERBOSE ones only with `verbose`)."""
        entry: tuple[str, list[str], bool] = (label, [], verbose)
        with self.lock:
            self.captures.append(entry)
        try:
            yield entry[1]
        finally:
            with self.lock:
                self.captures.remove(entry)


_LOGGERS: dict[int, _ProcessLogger] = {}


def process_logger(trt: ModuleType) -> _ProcessLogger:
    """The process-wide TensorRT logger (see `_ProcessLogger`); pass `.logger` to TensorRT."""
    if id(trt) not in _LOGGERS:
        _LOGGERS[id(trt)] = _ProcessLogger(trt)
    return _LOGGERS[id(trt)]


def errors_of(messages: list[str]) -> list[str]:
    """The ERROR/CRITICAL lines of a logger's messages."""
    return [m for m in messages if m.startswith(("[ERROR]", "[CRITICAL]"))]
