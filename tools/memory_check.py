"""Full-size device-memory check on a CPU-only machine: `python -m ruyi_trt.tools.memory_check --model full-random
--size HxW --frames N --vram-budget GB [--fp8 MODE] --out DIR`.

The memory plan is made for the request (`runtime.memory.plan`), then the real torch code path runs each stage
with fake CUDA tensors (`tools.fake_cuda`: nothing is allocated, shapes and bytes are exact): the pipeline's own
components built by `runtime.loading` with the plan's settings (model offload, resident/streamed blocks, skip
offload, CFG split, fp8 storage, VAE tiling), called as `RuyiPipeline` calls them:
  vae encode  `pipeline.encode_latents` on the conditioning video,
  clip        the image encoder on one 336 px crop,
  denoise     one `denoise_step` (the block runner, as the last step of a run: the transformer leaves after it),
  vae decode  `pipeline.decode_latents` (chunked decode, clamp and the seam-smoothing re-encode/decode).
Each stage's peak of live CUDA storage (512 B blocks) is written beside the planner's prediction in
DIR/memory_check.json, with the host memory: predicted (pinned, total) and measured (fake host tensors, the
page-locked buffers among them). SDPA runs the flash/efficient kernels a GPU would pick (the counts are
recorded); CUDA streams/events and page-locking are replaced by stand-ins (listed in the output).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GiB = 2**30
TOLERANCE = 0.10  # |measured - predicted| / predicted the Done-when allows


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--size {text!r}: use HxW, e.g. 576x1008") from exc
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise argparse.ArgumentTypeError(f"--size {text}: height and width must be positive multiples of 16")
    return height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ruyi_trt.tools.memory_check", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="full-random", choices=["full-random", "tiny"])
    parser.add_argument("--size", type=parse_size, required=True, help="HxW in pixels, e.g. 576x1008")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--vram-budget", type=float, required=True, help="Device budget in GiB")
    parser.add_argument("--fp8", default="auto", choices=["auto", "none", "lite", "strong", "extreme"])
    parser.add_argument("--memory-mode", default="auto", choices=["auto", "full_gpu", "normal", "low_gpu"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--host-ram", type=float, default=None, help="Host RAM to plan for, GiB (default: this machine's)")
    parser.add_argument("--out", type=Path, required=True, help="Folder for memory_check.json")
    parser.add_argument("--strict", action="store_true", help="Exit 1 unless every stage is within the budget "
                        f"and within {TOLERANCE:.0%} of the prediction")
    args = parser.parse_args(argv)
    if args.frames <= 0 or args.vram_budget <= 0:
        parser.error("--frames and --vram-budget must be positive")
    return args


def make_plan(args: argparse.Namespace):
    from ..models.checkpoint import Checkpoint
    from ..models.geometry import round_video_length
    from ..runtime.memory.model import ClipSpec
    from ..runtime.memory.plan import PlanRequest, plan_memory

    checkpoint = Checkpoint.for_planning(args.model)
    tcfg, vcfg, clip = checkpoint.transformer, checkpoint.vae, ClipSpec.from_config(checkpoint.image_encoder)
    height, width = args.size
    request = PlanRequest(
        height, width, round_video_length(args.frames, vcfg.mini_batch_encoder), dtype=args.dtype, fp8=args.fp8,
        memory_mode=args.memory_mode, budget_bytes=int(args.vram_budget * GiB),
        host_ram_bytes=None if args.host_ram is None else int(args.host_ram * GiB),
    )  # fmt: skip
    return plan_memory(tcfg, vcfg, clip, request), (tcfg, vcfg, clip)


def _meta_models(model: str, configs: tuple, dtype: Any):
    """The three models on the meta device in the run dtype (no memory, no init kernels)."""
    import torch

    from ..models.image_encoder import build_random_image_encoder
    from ..models.presets import TINY_CLIP
    from ..models.transformer import RuyiTransformer3D
    from ..models.vae import RuyiVAE

    tcfg, vcfg, clip = configs
    shape = TINY_CLIP if model == "tiny" else {"image_size": clip.image_size, "patch_size": clip.patch_size,
                                                "num_layers": clip.num_hidden_layers, "num_heads": 16}  # fmt: skip
    with torch.device("meta"):
        transformer = RuyiTransformer3D(tcfg).to(dtype).eval().requires_grad_(False)
        vae = RuyiVAE(vcfg).to(dtype).eval().requires_grad_(False)
        encoder = build_random_image_encoder(hidden_size=tcfg.projection_dim, seed=0, **shape).to(dtype)
    return transformer, vae, encoder


def run_stages(plan: Any, args: argparse.Namespace, configs: tuple) -> dict[str, Any]:
    """Build the pipeline from fake CUDA tensors with the plan's settings and measure every stage."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..models.checkpoint import Checkpoint
    from ..runtime.loading import DTYPES, RuntimeOptions, assemble_torch_components
    from ..runtime.memory.host import PINNED
    from ..runtime.pipeline import RuyiPipeline
    from .fake_cuda import REPLACED, FlashSDPA, LivePeak, register_fake_cuda_guard, sequential_streams
    from .pipeline_stages import run_pipeline_stages

    register_fake_cuda_guard()
    tcfg = configs[0]
    s = plan.settings
    all_resident = not s.offload_models and s.resident_blocks == tcfg.num_layers
    load_device = torch.device("cuda" if all_resident else "cpu")
    options = RuntimeOptions(device="cuda", dtype=args.dtype, memory_mode=args.memory_mode, fp8=s.fp8)
    transformer, vae, encoder = _meta_models(args.model, configs, DTYPES[args.dtype])
    checkpoint = Checkpoint.for_planning(args.model)
    embeddings = checkpoint.load_embeddings()  # real host tensors, read before the fake mode
    tracker, sdpa = LivePeak(), FlashSDPA()
    pinned_before = PINNED.now

    def measure(name: str, fn) -> dict[str, float]:
        tracker.reset_peak()
        fn()
        return {"device": tracker.peak["cuda"], "host": tracker.peak["cpu"]}

    with FakeTensorMode(allow_non_fake_inputs=True), sequential_streams(), tracker, sdpa, torch.no_grad():
        for module in (transformer, vae, encoder):
            module.to_empty(device=load_device)
        components = assemble_torch_components(transformer, vae, encoder, options, s)
        pipeline = RuyiPipeline(checkpoint, options, components, embeddings)
        measured = run_pipeline_stages(pipeline, plan, measure)
        host_pinned, host_peak = PINNED.peak - pinned_before, tracker.peak["cpu"]
    return {"measured": measured, "sdpa": dict(sdpa.used), "replaced": list(REPLACED),
            "host_pinned_measured_bytes": host_pinned, "host_tensors_peak_bytes": host_peak}  # fmt: skip


def report(plan: Any, result: dict, args: argparse.Namespace, seconds: float) -> dict:
    from .pipeline_stages import STAGES

    stages = {}
    for name in STAGES:
        got = result["measured"][name]
        predicted = plan.stages[name]
        stages[name] = {"predicted_gib": predicted / GiB, "measured_gib": got["device"] / GiB,
                        "measured_over_predicted": got["device"] / predicted,
                        "within_budget": got["device"] <= plan.request.budget_bytes,
                        "within_tolerance": abs(got["device"] - predicted) <= TOLERANCE * predicted,
                        "host_tensors_measured_gib": got["host"] / GiB}  # fmt: skip
    return {
        "model": args.model, "height": plan.request.height, "width": plan.request.width,
        "frames": plan.request.frames, "vram_budget_gib": args.vram_budget, "dtype": args.dtype,
        "fp8_requested": args.fp8, "settings": plan.settings.__dict__, "plan": plan.describe(),
        "stages": stages,
        "host_pinned_gib": plan.host_pinned_bytes / GiB, "host_total_gib": plan.host_total_bytes / GiB,
        "host_parts_gib": {k: v / GiB for k, v in plan.host_bytes.items()},
        "host_pinned_measured_gib": result["host_pinned_measured_bytes"] / GiB,
        "host_tensors_measured_gib": result["host_tensors_peak_bytes"] / GiB,
        "host_limit_gib": plan.host_limit_bytes / GiB,
        "predicted_step_time_ratio": plan.step_time_ratio, "predicted_step_s": plan.est_step_s,
        "unconstrained_step_s": plan.est_compute_s_per_step,
        "sdpa_kernels": result["sdpa"], "replaced_mechanisms": result["replaced"],
        "ok": all(v["within_budget"] and v["within_tolerance"] for v in stages.values()),
        "seconds": seconds,
    }  # fmt: skip


def summary(record: dict) -> str:
    head = (f"memory_check {record['model']} {record['height']}x{record['width']}x{record['frames']} frames, budget "
            f"{record['vram_budget_gib']:g} GiB, fp8 {record['settings']['fp8']} (requested {record['fp8_requested']})")
    lines = [head, "| stage | predicted GiB | measured GiB | measured/predicted |", "|---|---|---|---|"]  # fmt: skip
    for name, v in record["stages"].items():
        lines.append(f"| {name} | {v['predicted_gib']:.2f} | {v['measured_gib']:.2f} | {v['measured_over_predicted']:.3f} |")
    lines.append(f"host: predicted {record['host_total_gib']:.2f} GiB total, {record['host_pinned_gib']:.2f} GiB "
                 f"page-locked; measured page-locked {record['host_pinned_measured_gib']:.2f} GiB, host tensors "
                 f"{record['host_tensors_measured_gib']:.2f} GiB")  # fmt: skip
    lines.append(f"predicted step time: {record['predicted_step_time_ratio']:.3f}x the unconstrained plan's")
    lines.append(f"sdpa kernels: {record['sdpa_kernels']}; result: {'OK' if record['ok'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from ..files import atomic_write
    from ..runtime.memory.plan import MemoryPlanError
    from .fake_cuda import FakeCudaUnavailable

    start = time.perf_counter()
    try:
        plan, configs = make_plan(args)
        log.info("%s", plan.describe())
        result = run_stages(plan, args, configs)
    except (MemoryPlanError, FakeCudaUnavailable) as exc:
        raise SystemExit(f"memory_check: {exc}") from exc
    record = report(plan, result, args, time.perf_counter() - start)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(args.out / "memory_check.json", lambda tmp: tmp.write_text(text))
    print(summary(record))
    return 0 if record["ok"] or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
