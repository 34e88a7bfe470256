"""One TensorRT engine with explicit lifecycle verbs: load -> activate -> infer (repeatedly) -> unload.

- `load` reads the plan into host memory after checking its size and sha256 against the sidecar.
- `activate` deserializes it (a None engine is a clear error, never a crash later), applies the
  weight-streaming budget (engines built with --weight-streaming; the memory planner supplies the
  budget) and creates the execution context.
- `infer` binds torch CUDA tensors directly (`set_tensor_address`, no host copies), sets every input
  shape, allocates outputs from the shapes TensorRT infers and runs `execute_async_v3` on torch's
  current stream. With `cuda_graphs`, each new input-shape signature is run once, captured into a
  CUDA graph, and later calls of that signature copy their inputs into the captured buffers and replay.
- `refit` swaps weights in place (engines built with --refit), `unload` frees everything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import cache
from .profiles import outside_profile
from .refit import refit_engine
from .trt_api import errors_of, make_logger, require_tensorrt, torch_dtype

log = logging.getLogger(__name__)


class TRTEngine:
    """A cached engine (folder + sidecar) and, once activated, its TensorRT engine and context."""

    def __init__(self, folder: Path, record: cache.EngineRecord, cuda_graphs: bool = False):
        self.folder, self.record, self.cuda_graphs = Path(folder), record, cuda_graphs
        self.plan: bytes | None = None
        self.runtime = self.engine = self.context = None
        self.messages: list[str] = []
        self.io: dict[str, tuple[bool, torch.dtype]] = {}  # name -> (is input, dtype), filled by activate
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}
        self.placeholders: dict[torch.dtype, torch.Tensor] = {}  # addresses for empty inputs

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Read and verify the plan bytes (kept on the host so re-activation skips the disk)."""
        if self.plan is None:
            self.plan = cache.read_plan(self.folder, self.record)

    def activate(self, weight_streaming_budget: int | None = None) -> None:
        """Deserialize the plan and create the execution context; `weight_streaming_budget` in bytes."""
        if self.context is not None:
            return
        self.load()
        trt = require_tensorrt("the TensorRT backend")
        self.runtime = trt.Runtime(make_logger(trt, self.messages))
        self.engine = self.runtime.deserialize_cuda_engine(self.plan)
        if self.engine is None:
            raise cache.EngineFileError(
                f"TensorRT could not deserialize {self.folder / cache.PLAN_NAME}: "
                + ("; ".join(errors_of(self.messages)) or "no message")
                + f". Delete the folder and rebuild: {self.record.settings.command()}"
            )
        if weight_streaming_budget is not None:
            self._set_streaming_budget(weight_streaming_budget)
        self.context = self.engine.create_execution_context()
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            self.io[name] = (is_input, torch_dtype(trt, self.engine.get_tensor_dtype(name)))
        self._check_profile()
        log.debug("%s active: %d bytes of device memory for activations", self.record.graph, self.engine.device_memory_size_v2)

    def _check_profile(self) -> None:
        """The plan's own profile must be the one its sidecar records (a swapped or stale sidecar fails here)."""
        inputs = [name for name, (is_input, _) in self.io.items() if is_input]
        actual = {}
        if self.engine.num_optimization_profiles == 1:
            actual = {name: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(name, 0)) for name in inputs}
        if actual != self.record.profile:
            raise cache.EngineFileError(
                f"{self.folder / cache.PLAN_NAME} does not have the optimization profile its sidecar records; "
                f"delete the folder and rebuild: {self.record.settings.command()}"
            )

    def _set_streaming_budget(self, budget: int) -> None:
        if not self.record.flags.get("weight_streaming"):
            log.info("%s: built without --weight-streaming; the streaming budget is ignored", self.record.graph)
            return
        streamable = self.engine.streamable_weights_size
        self.engine.weight_streaming_budget_v2 = max(0, min(int(budget), streamable))
        log.info("%s: weight streaming budget %.2f GiB of %.2f GiB streamable weights", self.record.graph,
                 min(budget, streamable) / 2**30, streamable / 2**30)  # fmt: skip

    def unload(self) -> None:
        """Free the context, the engine and the host plan."""
        self.graphs.clear()
        self.placeholders.clear()
        self.context = self.engine = self.runtime = None
        self.plan = None

    # -- running -----------------------------------------------------------------------------------------------
    def infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on CUDA tensors (moved/cast to the engine's device and dtypes when needed); outputs by name."""
        if self.context is None:
            self.activate()
        feeds = self._feeds(inputs)
        if not self.cuda_graphs:
            return self._execute(feeds)
        signature = tuple((name, tuple(t.shape)) for name, t in feeds.items())
        if signature not in self.graphs:
            self._execute(feeds)  # warm-up: TensorRT allocates and picks kernels for this shape
            self.graphs[signature] = self._capture(feeds)
        graph, static_in, static_out = self.graphs[signature]
        for name, tensor in feeds.items():
            static_in[name].copy_(tensor)
        graph.replay()
        return {name: out.clone() for name, out in static_out.items()}

    def refit(self, tensors: dict[str, torch.Tensor]) -> int:
        """Replace weights {ONNX initializer name: device tensor}; captured CUDA graphs are dropped."""
        if not self.record.flags.get("refit"):
            raise ValueError(f"{self.record.graph}: the engine was built without --refit; rebuild it with: "
                             f"{self.record.settings.command()} --refit")  # fmt: skip
        if self.context is None:
            self.activate()
        self.graphs.clear()
        return refit_engine(require_tensorrt("refitting engines"), self.engine, tensors)

    def _feeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        wanted = {name: dtype for name, (is_input, dtype) in self.io.items() if is_input}
        missing = sorted(set(wanted) - set(inputs))
        if missing:
            raise ValueError(f"{self.record.graph}: engine inputs {missing} were not given (got {sorted(inputs)})")
        feeds = {name: inputs[name].to("cuda", dtype).contiguous() for name, dtype in wanted.items()}
        problems = outside_profile(self.record.profile, {name: tuple(t.shape) for name, t in feeds.items()})
        if problems:
            raise cache.EngineMismatchError(
                f"{self.record.graph}: " + "; ".join(problems) + f". Rebuild with a wider profile: {self.record.settings.command()}"
            )
        return feeds

    def _execute(self, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, self._address(tensor))
        if outputs is None:
            outputs = {}
            for name, (is_input, dtype) in self.io.items():
                if not is_input:
                    shape = tuple(self.context.get_tensor_shape(name))
                    outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, self._address(tensor))
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.record.graph}: TensorRT execution failed: " + "; ".join(errors_of(self.messages)))
        return outputs

    def _address(self, tensor: torch.Tensor) -> int:
        """The device address to bind; an empty tensor (a 0-frame context) has none, and TensorRT still wants a
        valid one: a one-element placeholder per dtype, made once (not inside a CUDA graph capture)."""
        if tensor.numel() > 0:
            return tensor.data_ptr()
        if tensor.dtype not in self.placeholders:
            self.placeholders[tensor.dtype] = torch.empty(1, dtype=tensor.dtype, device="cuda")
        return self.placeholders[tensor.dtype].data_ptr()

    def _capture(self, feeds: dict[str, torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, dict, dict]:
        static_in = {name: tensor.clone() for name, tensor in feeds.items()}
        static_out = self._execute(static_in)  # output shapes are fixed by this signature
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._execute(static_in, static_out)
        return graph, static_in, static_out
