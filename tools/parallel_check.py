"""Parity and step time of the parallel modes against one process:
`torchrun --nproc-per-node K -m ruyi_trt.tools.parallel_check --modes "ulysses=2;ring=2" --out DIR`.

Rank 0 first runs the whole pipeline alone (no collective; the other ranks wait), then every rank runs it once per
mode (each mode must use all K processes). For each run rank 0 keeps the final latents (what the pipeline hands
the VAE decoder), the video and the denoising seconds per step, and writes `<mode>.safetensors` (latents, video),
parallel_check.json and parallel_check.md with the largest differences to the one-process run. A mode may add
`teacache=T` (e.g. "ulysses=2,teacache=0.3"): that mode and a matching one-process run use TeaCache, and the
record has every rank's count of skipped steps. `memory=low_gpu` / `offload=K` run that mode with block streaming
/ long skips on the host (they change no numbers, so the plain one-process run is the reference). `--vae-latents T` also compares a chunk-parallel VAE decode and
encode of random latents (T latent frames) with the serial ones. CPU (gloo) or GPUs (NCCL, one per process).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

MODE_SEPARATOR = ";"


MODE_OPTIONS = {"teacache": ("teacache_threshold", float), "memory": ("memory_mode", str), "offload": ("offload_steps", int)}


def parse_mode(text: str, timeout_s: float):
    """'ulysses=2,ring=2[,teacache=0.3][,memory=low_gpu][,offload=1]' -> (ParallelConfig, RuntimeOptions fields)."""
    from ..runtime.parallel import ParallelConfig

    options, rest = {}, []
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() in MODE_OPTIONS:
            field, kind = MODE_OPTIONS[name.strip()]
            options[field] = kind(value)
        else:
            rest.append(item)
    return ParallelConfig.parse(",".join(rest), timeout_s), options


def mode_name(text: str) -> str:
    return ",".join(item.strip() for item in text.split(",") if item.strip())


def serial_name(threshold: float | None) -> str:
    """File stem of a one-process run: 'serial' or 'serial,teacache=T'."""
    return "serial" + (f",teacache={threshold:g}" if threshold is not None else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ruyi_trt.tools.parallel_check", description=__doc__.split("\n")[0])
    parser.add_argument("--modes", required=True, help='Modes separated by ";", e.g. "ulysses=2;ring=2,teacache=0.3"')
    parser.add_argument("--out", required=True, type=Path, help="Folder for the tensors, parallel_check.json and .md")
    parser.add_argument("--model", default="tiny", help="'tiny', 'full-random' or a checkpoint folder")
    parser.add_argument("--size", default="64x64", help="HEIGHTxWIDTH (multiples of 16)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--timeout", type=float, default=600.0, help="Collective timeout in seconds")
    parser.add_argument("--vae-latents", type=int, default=0, help="Also check the VAE on this many latent frames")
    return parser.parse_args(argv)


def _load(model: str, options):
    from ..runtime.pipeline import load_pipeline

    return load_pipeline(model, options)


def run_once(model: str, options, request) -> dict:
    """The pipeline once: final latents, video, denoise seconds per step and TeaCache's skipped calls."""
    pipeline = _load(model, options)
    seen: dict[str, torch.Tensor] = {}
    decoder = pipeline.components.vae_decoder

    def capture(**inputs: torch.Tensor) -> torch.Tensor:
        seen.setdefault("latents", inputs["latents"].float().cpu() * pipeline.vae_config.scaling_factor)
        return decoder(**inputs)

    pipeline.components.vae_decoder = capture
    try:
        video, stats = pipeline.run(request, progress=False)
        skipped = pipeline.components.denoiser.skipped_calls
    finally:
        pipeline.components.vae_decoder = decoder
        pipeline.components.close()
    return {
        "latents": seen["latents"],
        "video": video.float().cpu(),
        "denoise_s_per_step": stats.seconds["denoise"] / request.steps,
        "skipped": skipped,
    }


def vae_check(model: str, options, latent_frames: int, size: tuple[int, int], context) -> dict:
    """Chunk-parallel VAE decode and encode of random latents vs the serial ones (max abs difference)."""
    from ..runtime.parallel.vae import decode, encode_moments

    pipeline = _load(model, replace(options, parallel=None))
    vae = pipeline.components.vae_decoder.offload.module
    height, width = size
    factor = vae.config.spatial_factor
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn((1, vae.config.latent_channels, latent_frames, height // factor, width // factor), generator=gen)
    latents = latents.to(context.device, vae.dtype)
    with torch.inference_mode():
        serial = vae.decode(latents)
        spread = decode(vae, latents, context)
        posterior = vae.encode(serial)
        moments = encode_moments(vae, serial, context)
    return {
        "latent_frames": latent_frames,
        "decode_chunks": len(vae.config.decode_chunks(latent_frames)),
        "decode_max_abs": (serial.float() - spread.float()).abs().max().item(),
        "encode_max_abs": (torch.cat([posterior.mean, posterior.logvar], 1).float() - moments.float()).abs().max().item(),
    }


def _difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from safetensors.torch import save_file

    from ..files import atomic_write
    from ..runtime.loading import RuntimeOptions
    from ..runtime.parallel import join, leave
    from ..runtime.request import VideoRequest
    from ..testing import gradient_image

    height, width = (int(v) for v in args.size.lower().split("x"))
    texts = [m.strip() for m in args.modes.split(MODE_SEPARATOR) if m.strip()]
    modes = [parse_mode(text, args.timeout) for text in texts]
    contexts = [join(config, args.device) for config, _ in modes]  # checks the process count of every mode first
    rank, device = contexts[0].rank, contexts[0].device
    request = VideoRequest(start_images=[gradient_image(width, height)], frames=args.frames, size=(height, width),
                           steps=args.steps, seed=0)  # fmt: skip
    base = RuntimeOptions(device=str(device), dtype=args.dtype, memory_mode="full_gpu")
    thresholds = sorted({o.get("teacache_threshold") for _, o in modes}, key=lambda t: -1 if t is None else t)
    serial: dict[float | None, dict] = {}
    if rank == 0:
        for threshold in thresholds:
            serial[threshold] = run_once(args.model, replace(base, teacache_threshold=threshold), request)
    contexts[0].barrier()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for text, (config, overrides), context in zip(texts, modes, contexts):
        result = run_once(args.model, replace(base, parallel=config, **overrides), request)
        skipped = [None] * context.world_size
        dist.all_gather_object(skipped, result["skipped"])
        if rank != 0:
            continue
        name = mode_name(text)
        save_file({"latents": result["latents"], "video": result["video"]}, str(args.out / f"{name}.safetensors"))
        reference = serial[overrides.get("teacache_threshold")]
        records.append({
            "mode": name, "world_size": config.world_size, "reference": serial_name(overrides.get("teacache_threshold")),
            "latents_max_abs": _difference(result["latents"], reference["latents"]),
            "latents_scale": reference["latents"].abs().max().item(),
            "video_max_abs": _difference(result["video"], reference["video"]),
            "denoise_s_per_step": result["denoise_s_per_step"],
            "serial_denoise_s_per_step": reference["denoise_s_per_step"],
            "skipped_per_rank": skipped, "serial_skipped": reference["skipped"],
        })  # fmt: skip
    vae = vae_check(args.model, base, args.vae_latents, (height, width), contexts[0]) if args.vae_latents else None
    if rank == 0:
        for threshold, result in serial.items():
            tensors = {"latents": result["latents"], "video": result["video"]}
            save_file(tensors, str(args.out / f"{serial_name(threshold)}.safetensors"))
        report = {"config": {k: str(v) for k, v in vars(args).items()}, "modes": records, "vae": vae}
        atomic_write(args.out / "parallel_check.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
        atomic_write(args.out / "parallel_check.md", lambda p: p.write_text(markdown(report)))
        print(markdown(report))
    contexts[0].barrier()
    leave()
    return 0


def markdown(report: dict) -> str:
    cfg = report["config"]
    title = (f"# parallel check: {cfg['model']} {cfg['size']}x{cfg['frames']}f, {cfg['steps']} steps, {cfg['dtype']}, "
             f"{cfg['device']}")
    lines = [
        title,
        "",
        "| mode | ranks | max abs latents (scale) | max abs video | s/step | 1-process s/step | speed-up | TeaCache skips |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["modes"]:
        speedup = r["serial_denoise_s_per_step"] / r["denoise_s_per_step"]
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['latents_max_abs']:.2e} ({r['latents_scale']:.2f}) "
            f"| {r['video_max_abs']:.2e} | {r['denoise_s_per_step']:.4f} | {r['serial_denoise_s_per_step']:.4f} "
            f"| {speedup:.2f}x | {r['skipped_per_rank']} (1 process: {r['serial_skipped']}) |"
        )
    if report["vae"]:
        v = report["vae"]
        vae = (f"VAE on {v['latent_frames']} latent frames ({v['decode_chunks']} decoder chunks): max abs "
               f"decode {v['decode_max_abs']:.2e}, encode {v['encode_max_abs']:.2e} vs one process")
        lines += ["", vae]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
