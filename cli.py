"""The `ruyi-trt` command line: a thin click layer over the library (validation lives in the library)."""

from __future__ import annotations

import logging

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="ruyi-trt")
def main(verbose: bool) -> None:
    """ruyi-trt: fast, memory-lean inference for the Ruyi-Mini-7B image-to-video model."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@main.command()
def doctor() -> None:
    """Print library versions, the GPU and which backends are usable (with the reason when not)."""
    from .tools.doctor import collect_report, format_report

    click.echo(format_report(collect_report()))


@main.command()
@click.option("--model", "model", default=None, help="Checkpoint folder, 'tiny' (small random model), or omit for models/Ruyi-Mini-7B (downloaded when missing).")
@click.option("--image", "images", multiple=True, required=True, type=click.Path(dir_okay=False), help="Start image (repeat for up to 5 leading frames).")
@click.option("--end-image", "end_images", multiple=True, type=click.Path(dir_okay=False), help="End image (the last frame).")
@click.option("--out", "out", default="outputs/video.mp4", show_default=True, type=click.Path(dir_okay=False), help="Output mp4 (H.264, 24 fps).")
@click.option("--frames-dir", default=None, type=click.Path(file_okay=False), help="Also write every frame as PNG into this folder.")
@click.option("--frames", default=120, show_default=True, help="Video length, 1..120 (rounded down to a multiple of 8).")
@click.option("--resolution", default=512, show_default=True, type=click.Choice(["512", "768"]), help="Base resolution of the aspect-ratio buckets.")
@click.option("--size", default=None, help="Explicit HEIGHTxWIDTH (multiples of 16) instead of the bucket, e.g. 384x672.")
@click.option("--camera", default="static", show_default=True, type=click.Choice(["static", "left", "right", "up", "down", "auto"]))
@click.option("--motion", default="2", show_default=True, type=click.Choice(["1", "2", "3", "4", "auto"]), help="Motion amplitude.")
@click.option("--steps", default=25, show_default=True, help="Denoising steps.")
@click.option("--cfg", "guidance_scale", default=7.0, show_default=True, help="Classifier-free guidance scale (<= 1 turns CFG off).")
@click.option("--seed", default=42, show_default=True)
@click.option("--scheduler", default="DDIM", show_default=True, type=click.Choice(["DDIM", "Euler", "Euler A", "DPM++", "PNDM"]))
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch"]))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--memory-mode", default="full_gpu", show_default=True, type=click.Choice(["full_gpu", "normal", "low_gpu"]))
@click.option("--offload-steps", default=0, show_default=True, help="Long-skip activations moved to the host in groups of N (0 = keep on device).")
@click.option("--fp8", default="none", show_default=True, type=click.Choice(["none", "lite", "strong", "extreme"]), help="FP8 weight storage for the transformer.")
@click.option("--fp8-storage", default="fp8_e4m3fn", show_default=True, type=click.Choice(["fp8_e4m3fn", "fp8_e5m2"]))
@click.option("--teacache", "teacache_threshold", default=None, type=float, help="TeaCache step-skipping threshold (e.g. 0.1); off when omitted.")
@click.option("--lora", default=None, type=click.Path(dir_okay=False), help="LoRA safetensors file merged into the transformer.")
@click.option("--lora-strength", default=1.0, show_default=True)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def run(model, images, end_images, out, frames_dir, frames, resolution, size, camera, motion, steps, guidance_scale,
        seed, scheduler, backend, device, dtype, memory_mode, offload_steps, fp8, fp8_storage, teacache_threshold,
        lora, lora_strength, no_progress) -> None:
    """Generate a video from a start image (and optionally an end image)."""
    from .runtime.generate import GenerationError, generate_video
    from .runtime.loading import RuntimeOptions

    options = RuntimeOptions(
        backend=backend, device=device, dtype=dtype, memory_mode=memory_mode, offload_steps=offload_steps,
        fp8=fp8, fp8_storage=fp8_storage, teacache_threshold=teacache_threshold, lora=lora, lora_strength=lora_strength,
    )
    request_args = dict(
        frames=frames, resolution=int(resolution), size=_parse_size(size), camera=camera, motion=motion, steps=steps,
        guidance_scale=guidance_scale, seed=seed, scheduler=scheduler,
    )
    try:
        path, stats = generate_video(model, images, end_images, out, request_args, options,
                                     frames_dir=frames_dir, progress=not no_progress)
    except GenerationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {path}  ({stats.summary()})")


def _parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        height, width = (int(part) for part in size.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"{size!r} is not HEIGHTxWIDTH, e.g. 384x672", param_hint="--size") from exc
    return height, width
