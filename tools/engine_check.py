"""GPU check of the engine path at full width: `python -m ruyi_trt.tools.engine_check --out DIR [--cpu]`.

The full-width plain transformer block (hidden 2816, 16 heads x 176; the graph `ruyi-trt build` makes by
default at full size) is exported with ONNX Attention in fp16, fed random fp16 weights and one real
request size (768 x 768, 24 frames, CFG batch 2: 13,824 tokens per sample), and compared with the PyTorch
block on the same inputs:
1. ONNX Runtime on its CUDA provider (arena kSameAsRequested): seconds per call, driver-measured peak.
2. TensorRT, when it is installed: the engine for the 768 bucket group and 8..120 frames (the profile
   `ruyi-trt build --resolution 768 --frames 8:120:120` plans), the fused-attention check by the engine
   inspector, then a run with user-managed context memory from the shared scratch buffer on a private
   stream: seconds, scratch bytes at that shape against the profile-max context memory, driver peak.
Each result (or the reason it could not run) goes to DIR/engine_check.json and DIR/engine_check.md; the graph
and the engine live in a temporary folder, removed at the end.
`--cpu` runs the same steps at a tiny size on the CPU (no TensorRT), to check the script itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

GPU_SHAPE = (2, 6, 48, 48)  # batch, latent frames, patch grid: 768 x 768 x 24 frames
CPU_SHAPE = (2, 2, 4, 4)
FP16_TOLERANCE = 2e-2  # max |a - b| / max(1, max |torch|), fp16 engines against the fp16 PyTorch block


def block_inputs(spec, shape: tuple[int, int, int, int], device: str) -> dict[str, torch.Tensor]:
    """Deterministic inputs (random fp16 weights included) for the block graph at (batch, frames, h, w) patches."""
    batch, frames, height, width = shape
    dims = {"batch": batch, "latent_frames": frames, "grid_height": height, "grid_width": width,
            "latent_height": 2 * height, "latent_width": 2 * width, "tokens_per_frame": height * width}  # fmt: skip
    inputs = spec.sample_inputs(dims, seed=0)
    for name, tensor in inputs.items():
        if tensor.ndim >= 2 and name not in ("tokens", "temb", "text_states", "clip_states", "rope_cos", "rope_sin"):
            inputs[name] = tensor / tensor.shape[-1] ** 0.5  # weights scaled like a trained layer's
    return {k: v.to(device) for k, v in inputs.items()}


def _timed(call, device: str, repeat: int = 3) -> tuple[Any, float]:
    out = call()
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        out = call()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - started) / repeat


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.float().abs().max().item())
    return (actual.float() - expected.float()).abs().max().item() / scale


def check_ort(path: Path, inputs: dict, expected: torch.Tensor, device: str) -> dict[str, Any]:
    from ..runtime.backends.ort_backend import OrtGraph
    from ..runtime.memory.device_usage import device_peak

    graph = OrtGraph(path, torch.device(device))
    with device_peak(device) as peak:
        (out,), seconds = _timed(lambda: graph.run(**inputs), device)
    return {"providers": graph.session.get_providers(), "seconds": round(seconds, 4), "error": _error(out, expected),
            "ok": _error(out, expected) <= FP16_TOLERANCE,
            "driver_peak_bytes": peak.result.driver_peak_bytes if peak.result else None}  # fmt: skip


def check_tensorrt(path: Path, spec, inputs: dict, expected: torch.Tensor) -> dict[str, Any]:
    from ..engine import cache
    from ..engine.attention import check_fused_attention
    from ..engine.builder import BuilderOptions, build_plan
    from ..engine.device_memory import ScratchMemory
    from ..engine.profiles import FrameRange, graph_profiles
    from ..engine.runtime import TRTEngine
    from ..engine.settings import BuildSettings
    from ..engine.trt_api import require_tensorrt
    from ..runtime.memory.device_usage import device_peak

    trt = require_tensorrt("the engine check")
    ((group, profile),) = graph_profiles(spec, "transformer", ("768",), FrameRange(8, 120, 120), 2)
    started = time.perf_counter()
    built = build_plan(path, profile, BuilderOptions(), progress=False)
    build_seconds = time.perf_counter() - started
    fused = check_fused_attention(built.plan, path, profile, spec.name)
    folder = path.parent / "engine"
    folder.mkdir(exist_ok=True)
    (folder / cache.PLAN_NAME).write_bytes(built.plan)
    record = cache.EngineRecord(
        key="engine-check", graph=spec.name, component="transformer", precision="fp16",
        platform=cache.Platform.current(trt.__version__), checkpoint_hash="", onnx_hash="", onnx_file=str(path),
        profile=profile, flags={}, settings=BuildSettings(model="full-random", resolutions=("768",)),
        engine_bytes=len(built.plan), engine_sha256=hashlib.sha256(built.plan).hexdigest(),
    )  # fmt: skip
    scratch = ScratchMemory()
    engine = TRTEngine(folder, record, scratch=scratch, stream=torch.cuda.Stream())
    with device_peak("cuda") as peak:
        engine.activate()
        out, seconds = _timed(lambda: next(iter(engine.infer(inputs).values())), "cuda")
    return {"tensorrt": trt.__version__, "sizes": len(group.sizes), "build_seconds": round(build_seconds, 1),
            "plan_bytes": len(built.plan), "attention_fused": fused, "seconds": round(seconds, 4),
            "error": _error(out, expected), "ok": _error(out, expected) <= FP16_TOLERANCE,
            "scratch_bytes": scratch.size, "context_bytes_at_profile_max": engine.engine.device_memory_size_v2,
            "driver_peak_bytes": peak.result.driver_peak_bytes if peak.result else None}  # fmt: skip


def run(out_dir: Path, cpu: bool) -> dict[str, Any]:
    """Every check, the graphs and the engine in a temporary folder; the report in `out_dir`."""
    with tempfile.TemporaryDirectory(prefix="engine_check.", ignore_cleanup_errors=True) as work:
        return _run(out_dir, Path(work), cpu)


def _run(out_dir: Path, work: Path, cpu: bool) -> dict[str, Any]:
    from ..export.onnx_export import ExportSettings, export_graph
    from ..export.specs import example_block, transformer_stage_specs
    from ..export.wrappers import TransformerBlockGraph
    from ..models.transformer import TransformerConfig
    from ..models.vae_config import VAEConfig

    device = "cpu" if cpu or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.float16
    config = TransformerConfig.full()
    spec = transformer_stage_specs(config, VAEConfig.full(), "float16", clip_tokens=576)[1]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    entry = export_graph(TransformerBlockGraph(example_block(config, False)), spec, work,
                         ExportSettings(dtype="fp16", attention="onnx"))  # fmt: skip
    report: dict[str, Any] = {"device": device, "graph": entry["file"], "attention": entry["attention"],
                              "export_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    shape = CPU_SHAPE if device == "cpu" else GPU_SHAPE
    report["shape"] = {"batch": shape[0], "latent_frames": shape[1], "tokens_per_sample": shape[1] * shape[2] * shape[3]}
    inputs = block_inputs(spec, shape, device)
    module = TransformerBlockGraph(example_block(config, False))  # its weights are the inputs
    with torch.inference_mode():
        expected, report["torch_seconds"] = _timed(lambda: module(*(inputs[n].to(dtype) for n in spec.input_names)), device)
    path = work / entry["file"]
    checks = {"onnxruntime": lambda: check_ort(path, inputs, expected, device)}
    if device == "cuda":
        checks["tensorrt"] = lambda: check_tensorrt(path, spec, inputs, expected)
    for name, check in checks.items():
        try:
            report[name] = check()
        except ImportError as exc:
            report[name] = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - any failure is a result to record, the other checks still run
            report[name] = {"failed": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
    (out_dir / "engine_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# engine_check ({device})", "", "```json", json.dumps(report, indent=2), "```", ""]
    (out_dir / "engine_check.md").write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ruyi_trt.tools.engine_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="Folder for engine_check.json and .md")
    parser.add_argument("--cpu", action="store_true", help="Tiny shapes on the CPU (checks the script, no TensorRT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(args.out, args.cpu)
    print(json.dumps({k: v for k, v in report.items() if k != "trace"}, indent=2))


if __name__ == "__main__":
    main()
