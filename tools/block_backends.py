"""The bench's `block` stage on the backends that do not run torch modules: one full-width transformer block
(tools/bench_models.full_width_block) made the way each backend's pipeline path makes the transformer.

    ort            the block exported to ONNX (torchscript exporter, opset 18) on ONNX Runtime
    ort-int8/-fp8  that graph with Q/DQ (export/qdq.py) from a ModelOpt calibration (calib/) of the block over
                   the stage's own inputs (random activations: the speed does not depend on their values)
    aoti           the block's AOTInductor package (engine/aoti.py: weights outside the package, loaded with
                   load_constants), exported static at the stage's shapes

`host` is a bench_models.BlockHost (the block at `.blocks[0]`, its TransformerConfig at `.config`).
The torch paths (torch, torch-compile, the torch-* fast paths) wrap the shared block module instead
(bench_models.SharedBlock). Each runner makes its graph on the first call, from that call's inputs (the bench's
warm-up, timed apart as warmup_s), in a scratch folder beside the bench output that is removed on close.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import scratch_folder

log = logging.getLogger(__name__)

_TENSORS = ("x", "temb", "text_states", "clip_states", "rope_cos", "rope_sin")


class BlockGraph(nn.Module):
    """The host's block as a graph of tensors only (one latent frame), at `blocks.0` so that calibrated layer
    names and ONNX node scopes match the calibration recipe."""

    def __init__(self, host: nn.Module, num_frames: int = 1):
        super().__init__()
        self.blocks, self.num_frames = host.blocks, num_frames

    def forward(self, x: Tensor, temb: Tensor, text_states: Tensor, clip_states: Tensor, rope_cos: Tensor,
                rope_sin: Tensor) -> Tensor:  # fmt: skip
        return self.blocks[0](x, temb, text_states, clip_states, rope_cos, rope_sin, self.num_frames)


Runner = Callable[[dict[str, Tensor]], Tensor]


class LazyBlock:
    """`block(**block_inputs)` whose runner `make(host, work, device, inputs)` builds on the first call; `close`
    drops it and removes its files."""

    def __init__(self, make: Callable[[nn.Module, Path, torch.device, dict[str, Tensor]], Runner], host: nn.Module,
                 work: Path, device: torch.device):  # fmt: skip
        self.make, self.host, self.device = make, host, device
        self.stack = ExitStack()
        self.work = self.stack.enter_context(scratch_folder(work, "block"))
        self.runner: Runner | None = None

    @torch.inference_mode()
    def __call__(self, **inputs) -> Tensor:
        if inputs.get("num_frames", 1) != 1:
            raise ValueError("the block stage runs one latent frame (num_frames 1)")
        tensors = {name: inputs[name] for name in _TENSORS}
        if self.runner is None:
            self.runner = self.make(self.host, self.work, self.device, tensors)
        return self.runner(tensors)

    def start(self, num_calls: int, num_steps: int | None = None) -> None:
        """Stateless."""

    def close(self) -> None:
        self.runner = None
        self.stack.close()


def ort_block(precision: str | None):
    """The maker of the block on ONNX Runtime; `precision` int8 / fp8: with Q/DQ from a calibration over the first
    call's inputs."""

    def make(host: nn.Module, work: Path, device: torch.device, inputs: dict[str, Tensor]) -> Runner:
        from ..export.qdq import qdq_session_config, quantize_graph_file
        from ..runtime.backends.ort_backend import OrtGraph

        graph = BlockGraph(host).eval()
        path = work / "block.onnx"
        log.info("block stage: exporting the full-width block to ONNX (%s)", path)
        torch.onnx.export(graph, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=["out"],
                          opset_version=18, dynamo=False)  # fmt: skip
        if precision is not None:
            from ..calib.quantize import calibrate_module

            log.info("block stage: calibrating the block (%s, ModelOpt) over the stage's inputs", precision)
            with torch.inference_mode(False):  # ModelOpt's quantizers keep state tensors
                scales = calibrate_module(copy.deepcopy(graph), lambda model: model(**inputs), precision, "random-block")
            quantized = work / f"block_{precision}.onnx"
            quantize_graph_file(path, quantized, scales.layers, precision, scope="")
            path.unlink()
            path = quantized
        session = OrtGraph(path, device, config=qdq_session_config(precision, device))
        return lambda tensors: session.run(**tensors)[0]

    return make


def aoti_block(host: nn.Module, work: Path, device: torch.device, inputs: dict[str, Tensor]) -> Runner:
    """The block as an AOTInductor package compiled static at the first call's shapes, the host's weights loaded in."""
    from ..engine.aoti import aoti_spec, compile_package
    from ..export.specs import transformer_stage_specs
    from ..models.vae_config import VAEConfig

    config = host.config
    precision = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[inputs["x"].dtype]
    specs = transformer_stage_specs(config, VAEConfig.full(), precision, config.n_query)
    spec = aoti_spec(next(s for s in specs if s.name == "transformer_block_plain"), config)

    def feeds(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        batch, tokens, dim = tensors["x"].shape
        return {"tokens": tensors["x"].reshape(batch, 1, tokens, dim),
                **{name: tensors[name] for name in _TENSORS if name != "x"}}  # fmt: skip

    profile = {name: (tuple(t.shape),) * 3 for name, t in feeds(inputs).items()}  # exactly these shapes
    log.info("block stage: compiling the full-width block with AOTInductor (%d tokens)", inputs["x"].shape[1])
    package = compile_package(spec, profile, config, device, work)
    index = device.index if device.type == "cuda" and device.index is not None else -1
    runner = torch._inductor.aoti_load_package(str(package), device_index=index)
    state = {f"block.{k}": v for k, v in host.blocks[0].state_dict().items()}
    runner.load_constants({k: state[k] for k in runner.get_constant_fqns()}, check_full_update=True, user_managed=True)

    def run(tensors: dict[str, Tensor]) -> Tensor:
        out = runner(**feeds(tensors))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.reshape(tensors["x"].shape)

    return run


MAKERS = {"ort": ort_block(None), "ort-int8": ort_block("int8"), "ort-fp8": ort_block("fp8"), "aoti": aoti_block}


def block_runner(backend: str, host: nn.Module, work: Path, device: torch.device) -> LazyBlock:
    """The `block` stage's callable for one of MAKERS (`work`: where its scratch folder goes)."""
    if backend not in MAKERS:
        raise ValueError(f"block stage: {backend!r} has no block runner here; use one of {tuple(MAKERS)}.")
    return LazyBlock(MAKERS[backend], host, work, device)
