"""One full-width transformer block (hidden 2816, 16 x 176 heads, random weights) timed on every fast path.

The same block, inputs and timing loop per backend; each backend is made the way its pipeline path makes it:
    torch          eager TransformerBlock (fp32 on the CPU)
    torch-compile  torch.compile of the block's forward, token dims dynamic (runtime/backends/compiled.py)
    aoti           the block's AOTInductor package, weights loaded with load_constants (engine/aoti.py)
    ort            the block exported to ONNX (torchscript, opset 18) on ONNX Runtime's CPU provider
    ort-int8/-fp8  that graph with Q/DQ (export/qdq.py) from a ModelOpt calibration of the block (calib/) over
                   its own inputs (random activations: the speed does not depend on the values)
Inputs: the CFG batch (2) of `frames` latent frames x `per_frame` tokens, text (333) and CLIP (16) contexts.
`python -m ruyi_trt.tools.cpu_table` puts these next to the tiny model's denoiser step times.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.transformer import TransformerBlock, TransformerConfig
from ..models.transformer_blocks import temporal_table

log = logging.getLogger(__name__)

BLOCK_BACKENDS = ("torch", "ort", "ort-int8", "ort-fp8", "torch-compile", "aoti")


@dataclass
class BlockTiming:
    backend: str
    tokens: int
    times_s: list[float] = field(default_factory=list)
    setup_s: float = 0.0  # export / compile / calibration, and the warm-up calls
    max_abs_err: float | None = None  # against the eager fp32 block, relative to its max |out|
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


class BlockGraph(nn.Module):
    """The block at `blocks.0` (so calibrated names match the recipe) with its inputs as [B, N, D] tokens."""

    def __init__(self, block: nn.Module, frames: int):
        super().__init__()
        self.blocks = nn.ModuleList([block])
        self.frames = frames

    def forward(self, x: Tensor, temb: Tensor, text_states: Tensor, clip_states: Tensor, rope_cos: Tensor,
                rope_sin: Tensor) -> Tensor:  # fmt: skip
        return self.blocks[0](x, temb, text_states, clip_states, rope_cos, rope_sin, self.frames, None)


def full_width_block(seed: int = 0) -> tuple[TransformerConfig, TransformerBlock]:
    """A plain block of the released architecture with random weights (models/presets' recipe), fp32 on the CPU."""
    from ..models.presets import randomize_
    from ..models.transformer import _GELU_APPROXIMATION

    config = TransformerConfig.full()
    block = TransformerBlock(config.inner_dim, config.num_attention_heads, config.cross_attention_dim,
                             config.ff_inner_dim, _GELU_APPROXIMATION[config.activation_fn], has_skip=False,
                             time_position_encoding=True)  # fmt: skip
    randomize_(block, seed, keep={"t_embed.pe"})
    block.t_embed.pe.copy_(temporal_table(config.inner_dim))
    return config, block.eval().requires_grad_(False)


def block_inputs(config: TransformerConfig, frames: int, per_frame: int, batch: int = 2) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = frames * per_frame
    cos, sin = (torch.randn(per_frame, config.attention_head_dim, generator=gen).repeat(frames, 1) for _ in range(2))
    return {
        "x": torch.randn(batch, tokens, config.inner_dim, generator=gen),
        "temb": torch.randn(batch, config.inner_dim, generator=gen),
        "text_states": torch.randn(batch, config.text_tokens, config.cross_attention_dim, generator=gen),
        "clip_states": torch.randn(batch, config.n_query, config.cross_attention_dim, generator=gen),
        "rope_cos": cos, "rope_sin": sin,
    }  # fmt: skip


def _torch(graph: BlockGraph, inputs: dict, work: Path) -> Callable[[], Tensor]:
    return lambda: graph(**inputs)


def _compiled(graph: BlockGraph, inputs: dict, work: Path) -> Callable[[], Tensor]:
    from ..runtime.backends.compiled import with_dynamic_tokens

    block = graph.blocks[0]
    forward = with_dynamic_tokens(torch.compile(block.forward))
    args = [inputs[k] for k in ("x", "temb", "text_states", "clip_states", "rope_cos", "rope_sin")]
    return lambda: forward(*args, graph.frames, None)


def _aoti(graph: BlockGraph, inputs: dict, work: Path) -> Callable[[], Tensor]:
    from ..engine.aoti import aoti_spec, compile_package
    from ..engine.profiles import FrameRange, graph_profile
    from ..export.specs import transformer_stage_specs
    from ..models.vae_config import VAEConfig

    config = TransformerConfig.full()
    vae = VAEConfig.full()
    spec = aoti_spec(next(s for s in transformer_stage_specs(config, vae, "float32", 576) if s.name == "transformer_block_plain"), config)
    batch, tokens, dim = inputs["x"].shape
    per_frame = tokens // graph.frames
    side = int(per_frame**0.5)
    pixels = side * config.patch_size * vae.spatial_factor  # a square video with this many tokens per frame
    video_frames = graph.frames * (vae.mini_batch_encoder // vae.mini_batch_decoder)
    profile = graph_profile(spec, "transformer", (f"{pixels}x{pixels}",), FrameRange(video_frames, video_frames, video_frames), batch)
    package = compile_package(spec, profile, config, torch.device("cpu"), work / "aoti")
    runner = torch._inductor.aoti_load_package(str(package))
    state = {f"block.{k}": v for k, v in graph.blocks[0].state_dict().items()}
    runner.load_constants({k: state[k] for k in runner.get_constant_fqns()}, check_full_update=True, user_managed=True)
    feeds = {"tokens": inputs["x"].reshape(batch, graph.frames, per_frame, dim), "temb": inputs["temb"],
             "text_states": inputs["text_states"], "clip_states": inputs["clip_states"],
             "rope_cos": inputs["rope_cos"][:per_frame], "rope_sin": inputs["rope_sin"][:per_frame]}  # fmt: skip
    return lambda: runner(**feeds).reshape(batch, tokens, dim)


def _ort(precision: str | None):
    def make(graph: BlockGraph, inputs: dict, work: Path) -> Callable[[], Tensor]:
        import onnx

        from ..export.qdq import ORT_FP8_SESSION_CONFIG, insert_qdq
        from ..runtime.backends.ort_backend import OrtGraph

        path = work / "block.onnx"
        if not path.is_file():
            with torch.no_grad():
                torch.onnx.export(graph, tuple(inputs.values()), str(path), input_names=list(inputs), output_names=["out"],
                                  opset_version=18, dynamo=False)  # fmt: skip
        if precision is None:
            session = OrtGraph(path, torch.device("cpu"))
        else:
            from ..calib.quantize import calibrate_module

            scales = calibrate_module(copy.deepcopy(graph), lambda model: model(**inputs), precision, "random-block")
            model = onnx.load(str(path))
            insert_qdq(model, scales.layers, precision, scope="")
            quantized = work / f"block_{precision}.onnx"
            onnx.save_model(model, str(quantized))
            session = OrtGraph(quantized, torch.device("cpu"), config=ORT_FP8_SESSION_CONFIG if precision == "fp8" else None)
        return lambda: session.run(**inputs)[0]

    return make


MAKERS = {"torch": _torch, "torch-compile": _compiled, "aoti": _aoti, "ort": _ort(None), "ort-int8": _ort("int8"),
          "ort-fp8": _ort("fp8")}  # fmt: skip


def bench_block(backends: tuple[str, ...] = BLOCK_BACKENDS, frames: int = 2, per_frame: int = 1024, warmup: int = 1,
                repeat: int = 3) -> list[BlockTiming]:  # fmt: skip
    """Time one call of the full-width block per backend (see the module docstring); failures are recorded."""
    unknown = [b for b in backends if b not in MAKERS]
    if unknown:
        raise ValueError(f"block backends: {unknown} unknown; use some of {tuple(MAKERS)}.")
    config, block = full_width_block()
    graph = BlockGraph(block, frames).eval()
    inputs = block_inputs(config, frames, per_frame)
    with torch.inference_mode():
        reference = graph(**inputs)
    scale = float(reference.abs().max())
    timings = []
    with tempfile.TemporaryDirectory(prefix="ruyi-block-") as tmp:
        for backend in backends:
            timing = BlockTiming(backend, frames * per_frame)
            started = time.perf_counter()
            try:
                with torch.inference_mode():
                    call = MAKERS[backend](graph, inputs, Path(tmp))
                    for _ in range(warmup):
                        out = call()
                    timing.setup_s = time.perf_counter() - started
                    for _ in range(repeat):
                        start = time.perf_counter()
                        out = call()
                        timing.times_s.append(time.perf_counter() - start)
                timing.max_abs_err = float((out.float() - reference).abs().max()) / scale
            except Exception as exc:  # noqa: BLE001 - one failing backend is recorded, the others still run
                log.warning("block %s failed: %s", backend, exc)
                timing.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            log.info("block %s: median %s s", backend, timing.median_s)
            timings.append(timing)
    return timings
