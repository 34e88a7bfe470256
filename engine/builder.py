"""One ONNX graph -> one serialized TensorRT plan: the TensorRT builder calls, and nothing else.

`build_plan` parses the graph into a STRONGLY_TYPED network (precision comes from the graph's dtypes;
TensorRT 11 has no other mode), adds one optimization profile, sets the workspace pool limit, the
WEIGHT_STREAMING / REFIT flags and DETAILED profiling verbosity (so the engine inspector can list every
layer's tensors: the fused-attention check in engine/attention.py), loads the timing cache and checks that
TensorRT accepted it (a cache from another TensorRT or GPU is replaced by a fresh one, with a warning),
saves it (atomically), reports progress through TensorRT's IProgressMonitor into a tqdm bar, and returns
the plan bytes with every TensorRT message of this build (the process-wide logger's capture).
Parser and builder failures raise `EngineBuildError` carrying every error message TensorRT gave.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tqdm.auto import tqdm

from ..files import atomic_write
from .profiles import Profile
from .trt_api import errors_of, process_logger, require_tensorrt

log = logging.getLogger(__name__)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph; the message holds every TensorRT error."""


@dataclass(frozen=True)
class BuilderOptions:
    """Builder flags and limits shared by every engine of a build."""

    weight_streaming: bool = False
    refit: bool = False
    workspace_gb: float | None = None
    timing_cache: Path | None = None
    verbose: bool = False

    def flags(self) -> dict:
        """What the cache key and sidecar record about these options (the timing cache does not change a plan)."""
        return {"weight_streaming": self.weight_streaming, "refit": self.refit, "workspace_gb": self.workspace_gb}


@dataclass
class PlanResult:
    plan: bytes
    messages: list[str] = field(default_factory=list)
    network_inputs: dict[str, str] = field(default_factory=dict)  # name -> "dtype shape" as TensorRT parsed it
    num_layers: int = 0


def build_plan(onnx_path: Path, profile: Profile, options: BuilderOptions, progress: bool = True) -> PlanResult:
    """Parse `onnx_path`, build it for `profile` with `options`; the serialized plan and TensorRT's messages."""
    trt = require_tensorrt("building TensorRT engines")
    logger = process_logger(trt)
    with logger.capture(Path(onnx_path).stem, options.verbose) as messages:
        builder = trt.Builder(logger.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + errors_of(messages)
            raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors or ["(no message)"]))
        inputs = {}
        for index in range(network.num_inputs):
            network_input = network.get_input(index)  # an ITensor
            inputs[network_input.name] = f"{network_input.dtype} {tuple(network_input.shape)}"
        missing = sorted(set(inputs) ^ set(profile))
        if missing:
            raise EngineBuildError(f"{onnx_path}: the profile and the network disagree on inputs {missing}; re-export the graph.")

        builder_config = builder.create_builder_config()
        if options.workspace_gb is not None:
            builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
        if options.weight_streaming:
            builder_config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
        if options.refit:
            builder_config.set_flag(trt.BuilderFlag.REFIT)
        builder_config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        opt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.items():
            opt_profile.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(opt_profile)
        _use_timing_cache(builder_config, options.timing_cache)
        bar = tqdm(total=1, desc=f"build {Path(onnx_path).stem}", unit="step", disable=not progress, leave=True)
        builder_config.progress_monitor = _progress_monitor(trt, bar)
        try:
            plan = builder.build_serialized_network(network, builder_config)
        finally:
            bar.close()
        if plan is None:
            raise EngineBuildError(f"TensorRT could not build {onnx_path}:\n  " + "\n  ".join(errors_of(messages) or messages[-10:]))
        if options.timing_cache is not None:
            _save_timing_cache(builder_config, options.timing_cache)
        log.debug("plan of %s: %d bytes", onnx_path, plan.nbytes)
        return PlanResult(bytes(plan), list(messages), inputs, network.num_layers)


def _use_timing_cache(builder_config, path: Path | None) -> None:
    """Load the timing cache at `path` (or start an empty one); a cache TensorRT rejects (another TensorRT
    version or GPU) is replaced by an empty one instead of failing the build after it ran."""
    cached = path.read_bytes() if path is not None and path.is_file() else b""
    timing_cache = builder_config.create_timing_cache(cached)
    if builder_config.set_timing_cache(timing_cache, False):  # ignore_mismatch=False: a foreign cache is refused
        return
    log.warning("TensorRT rejected the timing cache %s (made by another TensorRT version or GPU); building with "
                "a fresh one, which will replace it", path)  # fmt: skip
    timing_cache = builder_config.create_timing_cache(b"")
    if not builder_config.set_timing_cache(timing_cache, False):
        raise EngineBuildError("TensorRT refused even an empty timing cache; build without --timing-cache.")


def _save_timing_cache(builder_config, path: Path) -> None:
    timing_cache = builder_config.get_timing_cache()
    if timing_cache is None:
        log.warning("TensorRT returned no timing cache after the build; %s is left as it was", path)
        return
    data = bytes(timing_cache.serialize())
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    log.info("timing cache saved to %s (%d bytes)", path, len(data))


def _progress_monitor(trt: ModuleType, bar: tqdm) -> object:
    """A trt.IProgressMonitor driving `bar`: its total is the top-level phase's steps, nested phases show as text."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()  # TensorRT may call from several threads
            self.top: str | None = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                if parent_phase is None and self.top is None:
                    self.top = phase_name
                    bar.reset(total=max(num_steps, 1))
                bar.set_postfix_str(phase_name, refresh=True)

        def step_complete(self, phase_name, step):
            with self.lock:
                if phase_name == self.top:
                    bar.update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self.lock:
                if phase_name == self.top:
                    bar.n = bar.total
                    bar.refresh()
                    self.top = None

    return _Monitor()
