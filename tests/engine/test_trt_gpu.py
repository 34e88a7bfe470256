"""Real TensorRT builds of the tiny model, compared with PyTorch: fused attention checked in the engine, user-managed
context memory, the private stream, CUDA graphs per shape, weight streaming, refit from host memory, per-block
engines and driver-measured memory. Skipped (with the reason) without TensorRT or a GPU."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch

from ruyi_trt.engine import cache
from ruyi_trt.engine.build import build_engines
from ruyi_trt.engine.device_memory import ScratchMemory
from ruyi_trt.engine.profiles import FrameRange
from ruyi_trt.engine.runtime import TRTEngine
from ruyi_trt.engine.settings import BuildSettings
from ruyi_trt.engine.trt_api import require_tensorrt
from ruyi_trt.export.specs import VideoShape

pytestmark = [pytest.mark.trt, pytest.mark.gpu]
GRAPH_COMPONENT = {"transformer": "transformer", "vae_encoder": "vae-encoder", "vae_decoder": "vae-decoder",
                   "vae_decoder_one_frame": "vae-decoder", "image_encoder": "image-encoder"}  # fmt: skip


@pytest.fixture(scope="module")
def built(tiny_dir: Path, private_cache: Path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    try:
        require_tensorrt("the TensorRT tests")
    except ImportError as exc:
        pytest.skip(f"TensorRT is not usable here: {exc}")
    settings = BuildSettings(model="tiny", precision="fp16", resolutions=("64x64", "64x96"), frames=FrameRange(8, 8, 16),
                             refit=True, weight_streaming=True, timing_cache=private_cache / "timing.cache")  # fmt: skip
    return settings, build_engines(settings, progress=False)


def _engine(result, graph: str, **kwargs) -> TRTEngine:
    folder = result.engines[graph]
    return TRTEngine(folder, cache.read_record(folder), **kwargs)


def _reference(tiny_dir: Path, graph: str):
    from ruyi_trt.export.onnx_export import ExportSettings, reference_graph

    spec, module = reference_graph(tiny_dir, graph, ExportSettings(dtype="fp16"))
    return spec, module.cuda().eval()


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    scale = expected.float().abs().max().clamp_min(1.0)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error < 2e-2, f"{name}: max error {error:.3g} of scale {scale:.3g}"


def test_build_writes_engines_sidecars_logs_and_reuses(built):
    settings, result = built
    assert set(result.engines) == set(GRAPH_COMPONENT)
    for graph, folder in result.engines.items():
        record = cache.read_record(folder)
        assert cache.read_plan(folder, record)
        log = (folder / cache.LOG_NAME).read_text()
        assert "attention:" in log and "--attention onnx" in log
        assert record.attention["form"] == "onnx-attention" and record.attention["fused"] == record.attention["nodes"] > 0, graph
    assert (result.plan).is_file()
    assert (settings.timing_cache).is_file()
    again = build_engines(settings, progress=False)
    assert again.built == [] and sorted(again.reused) == sorted(result.engines)


@pytest.mark.parametrize("graph", sorted(GRAPH_COMPONENT))
def test_engine_matches_torch(built, tiny_dir: Path, graph: str):
    """With user-managed context memory from one shared scratch buffer and a private stream."""
    spec, module = _reference(tiny_dir, graph)
    scratch = ScratchMemory()
    engine = _engine(built[1], graph, scratch=scratch, stream=torch.cuda.Stream())
    for shape in (VideoShape(1, 8, 64, 64), VideoShape(2, 16, 64, 96)):
        if graph != "transformer" and shape.batch != 1:
            shape = dataclasses.replace(shape, batch=1)
        inputs = {k: v.cuda() for k, v in spec.sample_inputs(spec.dims_for(shape)).items()}
        with torch.inference_mode():
            expected = module(*inputs.values())
        _close(next(iter(engine.infer(inputs).values())), expected, f"{graph} {shape}")
        assert 0 < scratch.size <= max(engine.engine.device_memory_size_v2, 256)  # sized for the shapes in use
    assert engine.plan is None  # the host copy of the plan was dropped after deserializing
    engine.unload()


def test_cuda_graph_and_weight_streaming(built, tiny_dir: Path):
    spec, _ = _reference(tiny_dir, "transformer")
    folder = built[1].engines["transformer"]
    plain = TRTEngine(folder, cache.read_record(folder))
    graphed = TRTEngine(folder, cache.read_record(folder), cuda_graphs=True, scratch=ScratchMemory(), stream=torch.cuda.Stream())
    graphed.activate(keep_free_bytes=0, free_bytes=lambda: 0)  # no room: stream every weight
    assert graphed.budget == 0 and graphed.figures.streamable_bytes > 0
    for seed, shape in ((1, VideoShape(2, 8, 64, 64)), (2, VideoShape(2, 8, 64, 64)), (3, VideoShape(1, 16, 64, 96))):
        inputs = {k: v.cuda() for k, v in spec.sample_inputs(spec.dims_for(shape), seed).items()}
        _close(next(iter(graphed.infer(inputs).values())), next(iter(plain.infer(inputs).values())), "cuda graph")
    assert len(graphed.captured) == 2  # one context and graph per shape
    contexts = {id(c.context) for c in graphed.captured.values()}
    assert len(contexts) == 2


def test_refit_matches_torch_with_changed_weights(built, tiny_dir: Path):
    from ruyi_trt.engine.refit import initializer_tensors, read_refit_map, refit_tensors

    spec, module = _reference(tiny_dir, "transformer")
    folder = built[1].engines["transformer"]
    engine = TRTEngine(folder, cache.read_record(folder))
    key = "blocks.0.attn1.to_q.weight"
    with torch.no_grad():
        module.model.get_parameter(key).add_(0.05)
    state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}  # host memory
    mapping = read_refit_map(folder)
    assert mapping[key] == [(key, False, "float16")]  # block weights keep their checkpoint names
    fill = lambda names: initializer_tensors(mapping, state, names)
    assert engine.refit(refit_tensors(mapping, state, [key]), fill) >= 1
    inputs = {k: v.cuda() for k, v in spec.sample_inputs(spec.dims_for(VideoShape(2, 8, 64, 64))).items()}
    with torch.inference_mode():
        expected = module(*inputs.values())
    _close(next(iter(engine.infer(inputs).values())), expected, "refitted transformer")


def test_corrupt_plan_that_passes_the_checksum_is_refused(built, tmp_path: Path):
    folder = built[1].engines["image_encoder"]
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    plan = bytearray((copy / cache.PLAN_NAME).read_bytes())
    plan[len(plan) // 2 :] = bytes(len(plan) - len(plan) // 2)
    (copy / cache.PLAN_NAME).write_bytes(bytes(plan))
    record = cache.read_record(copy)
    import hashlib

    record = dataclasses.replace(record, engine_sha256=hashlib.sha256(bytes(plan)).hexdigest())
    with pytest.raises(cache.EngineFileError, match="rebuild"):
        TRTEngine(copy, record).activate()


def test_pipeline_on_trt_matches_torch(built, start_png: Path, tmp_path: Path):
    """fp16 TensorRT engines against the fp16 torch backend on the same request: the same video within 30 dB PSNR
    (uint8 frames; fp16 rounding differs between the engines' fused kernels and torch's)."""
    from ruyi_trt.runtime.pipeline import RuyiPipeline

    args = {"frames": 16, "size": (64, 96), "steps": 3, "cfg": 7.0, "seed": 1}
    videos, stats = {}, {}
    for backend in ("torch", "trt"):
        pipe = RuyiPipeline.from_pretrained("tiny", backend=backend, device="cuda", dtype="fp16", memory_mode="full_gpu")
        video = pipe(start_png, progress=False, **args)
        videos[backend], stats[backend] = video.frames.float(), video.stats
        pipe.unload()
    mse = (videos["torch"] - videos["trt"]).pow(2).mean().item()
    assert 10 * math.log10(255**2 / max(mse, 1e-12)) >= 30
    trt = stats["trt"]  # TensorRT allocates outside torch: only the driver's figure sees its engines
    assert trt.driver_peak_bytes is not None and trt.driver_peak_bytes > trt.peak_memory_bytes
    assert "in use on the device (driver)" in trt.summary()


def test_run_outside_the_profile_is_refused(built, start_png: Path, tmp_path: Path):
    from ruyi_trt.runtime.pipeline import RuyiPipeline

    pipe = RuyiPipeline.from_pretrained("tiny", backend="trt", device="cuda", dtype="fp16", memory_mode="full_gpu")
    with pytest.raises(cache.EngineMismatchError, match="ruyi-trt build .*--frames 8:8:24"):
        pipe(start_png, frames=24, size=(64, 96), steps=1, seed=1, progress=False)


def test_per_block_engines_match_the_whole_engine(built, tiny_dir: Path, start_png: Path, tmp_path: Path):
    """--per-block: embed, plain/skip block and unembed engines (block weights bound from torch) give the same
    transformer output as the whole-model engine."""
    from ruyi_trt.models.checkpoint import Checkpoint

    settings = dataclasses.replace(built[0], per_block=True, refit=False, weight_streaming=False)
    result = build_engines(settings, progress=False)
    assert {"transformer_embed", "transformer_block_plain", "transformer_block_skip", "transformer_unembed"} <= set(result.engines)
    from ruyi_trt.runtime.backends import trt_backend

    engines = trt_backend.EngineSet(Checkpoint.resolve(tiny_dir), "fp16", root=settings.out)
    engines.records = [(f, cache.read_record(f)) for f in result.engines.values()]
    spec, module = _reference(tiny_dir, "transformer")
    full = {k: v.cuda() for k, v in spec.sample_inputs(spec.dims_for(VideoShape(2, 16, 64, 96)), 4).items()}
    tcfg = module.model.config
    blocks = trt_backend._block_weights({k: v.half() for k, v in module.model.state_dict().items()}, tcfg.num_layers)
    inputs = {k: v for k, v in full.items() if not k.startswith("rope_")}
    out = trt_backend._run_blocks(engines, tcfg, blocks, (64, 96, 16, 2), full["rope_cos"], full["rope_sin"], inputs)
    with torch.inference_mode():
        expected = module(*(full[name] for name in spec.input_names))
    _close(out, expected, "per-block transformer")
    engines.enter("vae-decoder")  # the stage change releases every transformer engine
    assert not engines.active
    engines.close()
