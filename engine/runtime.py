"""One TensorRT engine with explicit lifecycle verbs: load -> activate -> infer (repeatedly) -> unload.

- `load` reads the plan into host memory after checking its size and sha256 against the sidecar.
- `activate` deserializes it (a None engine is a clear error, never a crash later) and drops the host
  bytes (a 14 GB plan must not stay in host memory; re-activation reads the file again). An engine built
  with --weight-streaming gets its budget from `weight_streaming_budget` (engine/device_memory.py): its
  own figures (streamable and resident weights, context memory) against the device memory free now.
- Execution contexts use user-managed device memory (ExecutionContextAllocationStrategy.USER_MANAGED)
  from a `ScratchMemory` shared with the other engines of the set, sized by
  `update_device_memory_size_for_shapes` for the shapes of each call, not for the profile's max.
- `infer` binds torch CUDA tensors directly (`set_tensor_address`, no host copies), allocates outputs
  from the shapes TensorRT infers and runs `execute_async_v3` on the set's private CUDA stream (the
  legacy default stream would make TensorRT synchronize), ordered after and before torch's current stream
  with `wait_stream`. With `cuda_graphs`, each input-shape signature gets its own execution context and
  CUDA graph (a graph is only valid for the shapes its context had at capture): later calls of that
  signature copy their inputs into the captured buffers and replay.
- `refit` swaps weights in place (engines built with --refit) from host memory, `unload` frees everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cache
from .device_memory import EngineFigures, ScratchMemory, free_device_bytes, weight_streaming_budget
from .profiles import outside_profile
from .refit import refit_engine
from .trt_api import errors_of, process_logger, require_tensorrt, torch_dtype

log = logging.getLogger(__name__)


@dataclass
class _Captured:
    """One CUDA graph with its own context and static buffers, captured for one input-shape signature."""

    context: object
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    generation: int  # the scratch buffer's generation at capture


class TRTEngine:
    """A cached engine (folder + sidecar) and, once activated, its TensorRT engine and contexts."""

    def __init__(self, folder: Path, record: cache.EngineRecord, cuda_graphs: bool = False,
                 scratch: ScratchMemory | None = None, stream: torch.cuda.Stream | None = None):  # fmt: skip
        self.folder, self.record, self.cuda_graphs = Path(folder), record, cuda_graphs
        self.scratch, self.stream = scratch, stream
        self.plan: bytes | None = None
        self.runtime = self.engine = self.context = None
        self.logger = None  # the process-wide TensorRT logger, set by activate
        self.io: dict[str, tuple[bool, torch.dtype]] = {}  # name -> (is input, dtype), filled by activate
        self.captured: dict[tuple, _Captured] = {}
        self.placeholders: dict[torch.dtype, torch.Tensor] = {}  # addresses for empty inputs
        self.figures: EngineFigures | None = None
        self.budget: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Read and verify the plan bytes."""
        if self.plan is None and self.engine is None:
            self.plan = cache.read_plan(self.folder, self.record)

    def activate(self, keep_free_bytes: int | None = None, free_bytes: Callable[[], int] | None = None) -> None:
        """Deserialize the plan (then free its host bytes) and create the execution context.

        For a WEIGHT_STREAMING engine, `keep_free_bytes` (what the stage still allocates outside the engine;
        None: stream nothing) and `free_bytes()` (memory free now; default: the driver's free plus torch's
        unused cache) set the streaming budget from the engine's own figures."""
        if self.context is not None:
            return
        self.load()
        trt = require_tensorrt("the TensorRT backend")
        streaming = keep_free_bytes is not None and self.record.flags.get("weight_streaming")
        free_before = (free_bytes or free_device_bytes)() if streaming else 0  # before the engine takes any
        self.logger = logger = process_logger(trt)
        with logger.capture(self.record.graph) as messages:
            self.runtime = trt.Runtime(logger.logger)
            self.engine = self.runtime.deserialize_cuda_engine(self.plan)
            self.plan = None  # the engine holds its own copy now
            if self.engine is None:
                raise cache.EngineFileError(
                    f"TensorRT could not deserialize {self.folder / cache.PLAN_NAME}: "
                    + ("; ".join(errors_of(messages)) or "no message")
                    + f". Delete the folder and rebuild: {self.record.settings.command()}"
                )
            self.figures = self._figures()
            if streaming:
                self._set_streaming_budget(free_before, keep_free_bytes)
            self.context = self._new_context(trt)
            for index in range(self.engine.num_io_tensors):
                name = self.engine.get_tensor_name(index)
                is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
                self.io[name] = (is_input, torch_dtype(trt, self.engine.get_tensor_dtype(name)))
        self._check_profile()
        log.debug("%s active: %d bytes of context memory at the profile's max", self.record.graph,
                  self.engine.device_memory_size_v2)  # fmt: skip

    def _new_context(self, trt):
        if self.scratch is None:
            return self.engine.create_execution_context()
        return self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)

    def _figures(self) -> EngineFigures:
        streamable = self.engine.streamable_weights_size if self.record.flags.get("weight_streaming") else 0
        return EngineFigures(self.record.engine_bytes, streamable, self.engine.device_memory_size_v2)

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

    def _set_streaming_budget(self, free_bytes: int, keep_free_bytes: int) -> None:
        """`free_bytes` was measured before the engine was deserialized (its resident weights are in `figures`)."""
        figures = self.figures
        budget = weight_streaming_budget(free_bytes, figures, keep_free_bytes)
        self.engine.weight_streaming_budget_v2 = budget
        # the context memory includes the streaming scratch, which depends on the budget: settle it once more
        self.figures = EngineFigures(figures.weight_bytes, figures.streamable_bytes, self.engine.device_memory_size_v2)
        budget = weight_streaming_budget(free_bytes, self.figures, keep_free_bytes)
        self.engine.weight_streaming_budget_v2 = budget
        self.budget = budget
        log.info("%s: weight streaming budget %.2f GiB of %.2f GiB streamable weights", self.record.graph,
                 budget / 2**30, figures.streamable_bytes / 2**30)  # fmt: skip

    def unload(self) -> None:
        """Free the contexts, the engine and the host plan."""
        self.captured.clear()
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
            return self._ordered(lambda: self._execute(self.context, feeds))
        signature = tuple((name, tuple(t.shape)) for name, t in feeds.items())
        captured = self.captured.get(signature)
        if captured is None or (self.scratch is not None and captured.generation != self.scratch.generation):
            captured = self._capture(feeds)
            self.captured[signature] = captured
        for name, tensor in feeds.items():
            captured.inputs[name].copy_(tensor)
        self._ordered(captured.graph.replay)
        return {name: out.clone() for name, out in captured.outputs.items()}

    def refit(self, tensors: dict[str, torch.Tensor], fill: Callable[[list[str]], dict[str, torch.Tensor]] | None = None) -> int:
        """Replace weights {ONNX initializer name: host tensor}, `fill` supplying what TensorRT then reports
        missing; captured CUDA graphs are dropped."""
        if not self.record.flags.get("refit"):
            raise ValueError(f"{self.record.graph}: the engine was built without --refit; rebuild it with: "
                             f"{self.record.settings.command()} --refit")  # fmt: skip
        if self.context is None:
            self.activate()
        self.captured.clear()
        torch.cuda.synchronize()  # no enqueued work (on any stream) may still read the old weights
        return refit_engine(require_tensorrt("refitting engines"), self.engine, tensors, fill, self.record.graph)

    def _ordered(self, work: Callable[[], object]):
        """Run `work` on the private stream, after what torch's current stream has queued and before what it
        queues next (without a private stream: on the current one)."""
        if self.stream is None:
            return work()
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = work()
        current.wait_stream(self.stream)
        return result

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

    def _execute(self, context, feeds: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor] | None = None,
                 stream: torch.cuda.Stream | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, self._address(tensor))
        if self.scratch is not None:
            size = context.update_device_memory_size_for_shapes()
            context.set_device_memory(self.scratch.address(size), size)
        if outputs is None:
            outputs = {}
            for name, (is_input, dtype) in self.io.items():
                if not is_input:
                    shape = tuple(context.get_tensor_shape(name))
                    outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
        for name, tensor in outputs.items():
            context.set_tensor_address(name, self._address(tensor))
        stream = stream or torch.cuda.current_stream()
        with self.logger.capture(self.record.graph) as messages:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.record.graph}: TensorRT execution failed: " + ("; ".join(errors_of(messages)) or "no message"))
        return outputs

    def _address(self, tensor: torch.Tensor) -> int:
        """The device address to bind; an empty tensor (a 0-frame context) has none, and TensorRT still wants a
        valid one: a one-element placeholder per dtype, made once (not inside a CUDA graph capture)."""
        if tensor.numel() > 0:
            return tensor.data_ptr()
        if tensor.dtype not in self.placeholders:
            self.placeholders[tensor.dtype] = torch.empty(1, dtype=tensor.dtype, device="cuda")
        return self.placeholders[tensor.dtype].data_ptr()

    def _capture(self, feeds: dict[str, torch.Tensor]) -> _Captured:
        """A new context for this shape signature, warmed up, then captured into a CUDA graph on a side stream."""
        trt = require_tensorrt("the TensorRT backend")
        context = self._new_context(trt)
        static_in = {name: tensor.clone() for name, tensor in feeds.items()}
        for tensor in static_in.values():
            self._address(tensor)  # placeholders exist before the capture
        static_out = self._ordered(lambda: self._execute(context, static_in))  # warm-up: TensorRT picks its kernels
        torch.cuda.synchronize()
        side = self.stream or torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self._execute(context, static_in, static_out, stream=side)
        generation = self.scratch.generation if self.scratch is not None else 0
        return _Captured(context, graph, static_in, static_out, generation)
