"""The `ruyi-trt` command line: a thin click layer over the library (validation lives in the library).

Exit codes of `ruyi-trt run`: 0 success; 2 bad usage or input (an option out of range, an image, model, LoRA or
output location that cannot be used; nothing is loaded or written); 1 a failure while running (out of memory,
a full disk, a missing engine or dependency); 130 interrupted by Ctrl-C (nothing half-written is left). A refusal
names the option (as its --flag) and what it accepts.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

import click

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


class InputError(click.ClickException):
    """Bad input: exit code 2, like click's usage errors, without the usage text."""

    exit_code = 2


class RuyiGroup(click.Group):
    """The command group: Ctrl-C anywhere ends the command with exit code 130 and one line, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("\ninterrupted (Ctrl-C); nothing half-written was left behind.", err=True)
            if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
                logging.shutdown()  # worker threads (a download's) would keep the process alive: leave now
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_INTERRUPTED)
            ctx.exit(EXIT_INTERRUPTED)


class Number(click.ParamType):
    """A whole number or a number; the conversion error also says the accepted range, which the library checks.

    `accepted(request, loading)` gives that range from the library's constants (called only on an error, so that
    the command line starts without importing torch)."""

    def __init__(self, kind: type, accepted):
        self.kind, self.accepted = kind, accepted
        self.name = "integer" if kind is int else "float"

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            return value
        try:
            return self.kind(value)
        except (TypeError, ValueError, OverflowError):
            from .runtime import loading, request

            kind = "a whole number" if self.kind is int else "a number"
            self.fail(f"{value!r} is not {kind}; use {self.accepted(request, loading)}.", param, ctx)


FRAMES = Number(int, lambda r, _: f"1 or 8..{r.MAX_FRAMES}")
STEPS = Number(int, lambda r, _: f"1..{r.MAX_STEPS}")
GUIDANCE = Number(float, lambda r, _: f"0..{r.MAX_GUIDANCE}")
SEED = Number(int, lambda r, _: f"0..{r.MAX_SEED}")
OFFLOAD_STEPS = Number(int, lambda _, lo: f"0..{lo.MAX_OFFLOAD_STEPS}")
VRAM_BUDGET = Number(float, lambda _, lo: f"{lo.MIN_VRAM_BUDGET_GB}..{lo.MAX_VRAM_BUDGET_GB} GiB")
THRESHOLD = Number(float, lambda _, __: "a threshold within (0, 1]")
WEIGHT = Number(float, lambda _, __: "0..100")
STRENGTH = Number(float, lambda _, lo: f"-{lo.MAX_LORA_STRENGTH}..{lo.MAX_LORA_STRENGTH}")
TIMEOUT = Number(float, lambda _, __: "a positive number of seconds")
RESOLUTION = Number(int, lambda r, _: r.RESOLUTION_RULE)
SKIP_STEPS = Number(int, lambda r, _: f"0..{r.MAX_STEPS} steps")


# library argument names -> the `run` option that sets them (others are "--" + name with '-' for '_')
FLAGS = {"guidance_scale": "--cfg", "teacache_threshold": "--teacache", "vram_budget_gb": "--vram-budget",
         "image/end_image": "--image/--end-image", "start_images": "--image", "end_images": "--end-image"}  # fmt: skip
ARGUMENT = re.compile(r"^([a-z][a-z0-9_/]*): ")


def cli_message(message: str) -> str:
    """A library message "name: ..." as "--flag: ..." (the option of `run` that sets `name`)."""
    match = ARGUMENT.match(message)
    if match is None:
        return message
    name = match.group(1)
    return FLAGS.get(name, "--" + name.replace("_", "-")) + message[len(name) :]


@click.group(cls=RuyiGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--model", "model", default=None, help="Checkpoint folder, 'tiny' (small random model), 'full-random' (the real architecture, random weights), or omit for models/Ruyi-Mini-7B (downloaded when missing).")
@click.option("--image", "images", multiple=True, type=click.Path(), help="Start image (repeat for up to 5 leading frames); not needed with --plan-only --size.")
@click.option("--end-image", "end_images", multiple=True, type=click.Path(), help="End image (the last frame).")
@click.option("--out", "out", default="outputs/video.mp4", show_default=True, type=click.Path(), help="Output mp4 (H.264, 24 fps).")
@click.option("--frames-dir", default=None, type=click.Path(), help="Also write every frame as PNG into this folder.")
@click.option("--frames", default=120, show_default=True, type=FRAMES, help="Video length, 1..120 (rounded down to a multiple of 8).")
@click.option("--resolution", default=512, show_default=True, type=RESOLUTION, help="Base resolution of the aspect-ratio buckets, 384..1024 in steps of 16 (512 and 768 are the trained sizes).")
@click.option("--size", default=None, help="Explicit HEIGHTxWIDTH (multiples of 16) instead of the bucket, e.g. 384x672.")
@click.option("--camera", default="static", show_default=True, type=click.Choice(["static", "left", "right", "up", "down", "auto"]))
@click.option("--motion", default="2", show_default=True, type=click.Choice(["1", "2", "3", "4", "auto"]), help="Motion amplitude.")
@click.option("--aspect-ratio", default="16:9", show_default=True, help="Aspect key of the control embeddings (p.16x9movie...); the original always uses 16:9, whatever the video's shape.")
@click.option("--steps", default=25, show_default=True, type=STEPS, help="Denoising steps, 1..1000.")
@click.option("--cfg", "guidance_scale", default=7.0, show_default=True, type=GUIDANCE, help="Classifier-free guidance scale, 0..20 (<= 1 turns CFG off).")
@click.option("--seed", default=42, show_default=True, type=SEED, help="Random seed, 0..2^64-1: the same seed gives the same video file.")
@click.option("--noise-device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]), help="Where the seeded noise is drawn: cpu gives the same video on every machine; cuda draws as the original (torch.Generator('cuda')), so a seed gives its video on the same GPU.")
@click.option("--scheduler", default="DDIM", show_default=True, type=click.Choice(["DDIM", "Euler", "Euler A", "DPM++", "PNDM"]))
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "ort", "trt", "ort-int8", "ort-fp8", "torch-compile", "aoti"]), help="ort: ONNX Runtime over graphs exported on first use into the artifact cache; trt: TensorRT engines made by `ruyi-trt build`; ort-int8/ort-fp8: ort with the calibrated Q/DQ transformer; torch-compile: torch.compile'd blocks; aoti: AOTInductor packages made by `ruyi-trt build --engine aoti`.")
@click.option("--calibration", default=None, type=click.Path(), help="ort-int8/ort-fp8: calibration folder from `ruyi-trt calibrate` (default: the cached one, calibrated on first use).")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu).")
@click.option("--dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16"]), help="Default: bf16 on cuda (fp16 with --backend ort) and with --plan-only, fp32 on cpu.")
@click.option("--memory-mode", default="auto", show_default=True, type=click.Choice(["auto", "full_gpu", "normal", "low_gpu"]), help="auto: plan streaming/offload for the GPU's free memory (or --vram-budget).")
@click.option("--offload-steps", default=None, type=OFFLOAD_STEPS, help="Long-skip activations moved to the host in groups of N (0 = keep on device; default: the planner's choice in auto, else 0).")
@click.option("--vram-budget", "vram_budget_gb", default=None, type=VRAM_BUDGET, help="Device memory the run may use, in GiB (default: the GPU's free memory).")
@click.option("--plan-only", is_flag=True, help="Print the memory plan and exit (reads configs only, no weights).")
@click.option("--fp8", default="auto", show_default=True, type=click.Choice(["auto", "none", "lite", "strong", "extreme"]), help="FP8 weight storage for the transformer; auto: none, unless --memory-mode auto finds no plan without it.")
@click.option("--fp8-storage", default="auto", show_default=True, type=click.Choice(["auto", "fp8_e4m3fn", "fp8_e5m2"]), help="auto: fp8_e4m3fn, as the original.")
@click.option("--teacache", "teacache_threshold", default=None, type=THRESHOLD, help="TeaCache step-skipping threshold (e.g. 0.1); off when omitted.")
@click.option("--teacache-skip-start", default=None, type=SKIP_STEPS, help="TeaCache: the first N steps are always computed (>= 1; default 3).")
@click.option("--teacache-skip-end", default=None, type=SKIP_STEPS, help="TeaCache: the last N steps are always computed (>= 1; default 1).")
@click.option("--teacache-offload-cpu/--no-teacache-offload-cpu", default=None, help="TeaCache: keep its cached tensors in host memory (default: yes, as the original).")
@click.option("--enhance-a-video", "enhance_a_video", default=None, type=WEIGHT, metavar="WEIGHT", help="Enhance-A-Video weight (reference default 1.0, keep it < 10): scales self-attention by a temporal score; torch backend only, off when omitted.")
@click.option("--enhance-a-video-skip-start", default=None, type=SKIP_STEPS, help="Enhance-A-Video: not on the first N steps (default 0).")
@click.option("--enhance-a-video-skip-end", default=None, type=SKIP_STEPS, help="Enhance-A-Video: not on the last N steps (default 0).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:STRENGTH]", help="LoRA safetensors file merged into the transformer; repeat to chain several, each with its own strength (a.safetensors:0.8 --lora b.safetensors:0.5).")
@click.option("--lora-strength", default=1.0, show_default=True, type=STRENGTH, help="Strength of the --lora files given without one, -100..100.")
@click.option("--compute", default="none", show_default=True, type=click.Choice(["none", "fp8", "int8"]), help="8-bit GEMMs in the transformer blocks (torch backend): fp8 via torch._scaled_mm (GPU compute capability >= 8.9), int8 via torchao (Ampere+, CPU). Not --fp8, which only stores weights in fp8.")
@click.option("--scales", default=None, type=click.Path(), help="scales.safetensors (or its folder) from `ruyi-trt calibrate` for --compute; default: dynamic per-token scales.")
@click.option("--attention", default="sdpa", show_default=True, type=click.Choice(["sdpa", "fp8", "fp8-full"]), help="Self-attention kernel (torch backend): fp8 = Triton FP8 kernel, Q.K^T in e4m3 and P.V in the run dtype; fp8-full = P.V in e4m3 too (GPU compute capability >= 8.9).")
@click.option("--fused-kernels", is_flag=True, help="Fused Triton kernels for norm1 + shift, QK-norm + RoPE and GELU-tanh (torch backend, CUDA).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--parallel", "parallel", default=None, metavar="ulysses=N[,ring=M][,cfg=2]", help="Spread the video over the processes of `torchrun --nproc-per-node K $(which ruyi-trt) run ...` (K = ulysses x ring x cfg): tokens split over ulysses x ring ranks, the CFG halves over cfg=2 rank groups.")
@click.option("--parallel-timeout", default=600.0, show_default=True, type=TIMEOUT, help="Seconds a rank waits for the others before the whole job stops with an error.")
def run(model, images, end_images, out, frames_dir, frames, resolution, size, camera, motion, aspect_ratio, steps,
        guidance_scale, seed, noise_device, scheduler, backend, calibration, device, dtype, memory_mode, offload_steps,
        vram_budget_gb, plan_only, fp8, fp8_storage, teacache_threshold, teacache_skip_start, teacache_skip_end,
        teacache_offload_cpu, enhance_a_video, enhance_a_video_skip_start, enhance_a_video_skip_end, loras, lora_strength,
        compute, scales, attention, fused_kernels, no_progress, parallel, parallel_timeout) -> None:  # fmt: skip
    """Generate a video from a start image (and optionally an end image).

    Exit codes: 0 success, 2 bad usage or input, 1 a failure while running, 130 Ctrl-C (see the README)."""
    from .files import WriteError
    from .models.checkpoint import Checkpoint
    from .models.checkpoint_io import CheckpointError
    from .runtime.loading import RuntimeOptions, memory_plan
    from .runtime.parallel import ParallelConfig, ParallelConfigError, ParallelError, leave
    from .runtime.pipeline import GenerationError, RuyiPipeline
    from .runtime.request import VideoRequest
    from .runtime.video import check_output_path

    try:
        parallel = ParallelConfig.parse(parallel, parallel_timeout) if parallel else None
    except ParallelConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--parallel") from exc
    if plan_only:
        dtype = dtype or "bf16"  # plan for the GPU run, also from a machine without one
    run_options = {**runtime_keywords(click.get_current_context().params), "dtype": dtype, "parallel": parallel}
    video_options = dict(
        frames=frames, resolution=resolution, size=_parse_size(size), camera=camera, motion=motion,
        aspect_ratio=aspect_ratio, steps=steps, guidance_scale=guidance_scale, seed=seed, noise_device=noise_device,
        scheduler=scheduler,
    )  # fmt: skip
    try:
        if plan_only:
            if not images and video_options["size"] is None:
                raise click.UsageError("--plan-only needs --size HEIGHTxWIDTH or an --image (whose aspect bucket is planned)")
            request = _plan_request(images, video_options)
            options = RuntimeOptions.make(**run_options)
            checkpoint = Checkpoint.for_planning(model)
            height, width, length = request.geometry(checkpoint.vae.mini_batch_encoder)
            plan = memory_plan(checkpoint, options, height, width, length, guidance_scale > 1.0, steps, plan_only=True)
            click.echo(plan.describe())
            return
        if not images:
            raise click.UsageError("Missing option '--image': give a start image (PNG or JPEG; repeat --image for up to 5).")
        # everything the user gave is checked before minutes of loading: the output places, the images and
        # options, the LoRA file
        check_output_path(out, "--out", suffix=".mp4")
        if frames_dir is not None:
            check_output_path(frames_dir, "--frames-dir")
        request = VideoRequest.from_inputs(list(images), list(end_images) or None, **video_options)
        RuntimeOptions.make(**run_options)
        if parallel is not None:
            parallel.check_guidance(request.guidance_scale > 1.0)  # before any process group forms
        if backend in ("ort-int8", "ort-fp8") and calibration is None:  # calibrated on first use, then cached
            from .runtime.calibration import ensure_calibrated

            run_options["calibration"] = str(ensure_calibrated(model, backend.removeprefix("ort-"), progress=not no_progress))
        pipe = RuyiPipeline.from_pretrained(model, **run_options)
        note = request.frames_note(pipe.vae_config.mini_batch_encoder)
        if note:
            click.echo(f"note: {note}")
        plan = pipe.plan(request)
        if plan is not None:
            click.echo(plan.describe())
        video = pipe.generate(request, progress=not no_progress)
        main_rank = pipe.parallel is None or pipe.parallel.is_main
        if main_rank:  # under --parallel every rank has the video; rank 0 writes it
            video.save(out)
            if frames_dir is not None:
                video.save_frames(frames_dir)
        if pipe.parallel is not None:
            pipe.parallel.barrier()  # the other ranks return once the files exist
    except CheckpointError as exc:
        raise InputError(f"--model: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise InputError(cli_message(str(exc))) from exc
    except (GenerationError, ParallelError, WriteError, ImportError, RuntimeError, OSError) as exc:
        raise click.ClickException(cli_message(str(exc))) from exc
    leave()
    if main_rank:
        click.echo(f"wrote {out}  ({video.stats.summary()})")


def _plan_request(images, video_options: dict):
    """The request a plan is made for: the given start images, or a stand-in image when only --size is known."""
    from PIL import Image

    from .runtime.request import VideoRequest

    height, width = video_options["size"] or (16, 16)
    start = list(images) or [Image.new("RGB", (width, height))]
    return VideoRequest.from_inputs(start, None, **video_options)


@main.command()
@click.option("--model", default="tiny", show_default=True, help="'tiny', 'full-random' (full-size random weights built on the device, no checkpoint) or a checkpoint folder.")
@click.option("--backends", default="torch", show_default=True, help="Comma list: torch, ort, trt, ort-int8, ort-fp8, torch-compile, aoti and the torch fast paths torch-compile-max, torch-cudagraph, torch-sdpa-{flash,cudnn,efficient,math}, torch-lowgpu, torch-int8, torch-fp8, torch-fp8-attn, torch-fp8-all, torch-fused.")
@click.option("--resolution", default="512", show_default=True, help="Comma list of square sizes, e.g. 512,768.")
@click.option("--size", default=None, help="Comma list of HEIGHTxWIDTH (multiples of 16) instead of --resolution, e.g. 64x64 for the tiny model.")
@click.option("--frames", default="24", show_default=True, help="Comma list of video lengths (1 or multiples of 8), e.g. 24,120.")
@click.option("--stages", default="image_encoder,vae_encode,denoise,vae_decode,run", show_default=True, help="Comma list of stages to time; add `block` for one full-width transformer block (hidden 2816, 16 x 176 heads) on --block-tokens tokens.")
@click.option("--block-tokens", default=2048, show_default=True, help="Tokens of the block stage (a multiple of 64).")
@click.option("--steps", default=2, show_default=True, help="Denoising steps of the whole-run stage.")
@click.option("--warmup", default=1, show_default=True, help="Untimed calls per stage before timing.")
@click.option("--repeat", default=3, show_default=True, help="Timed calls per stage (median, min, max).")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--time-budget", "time_budget_s", default=None, type=float, help="Skip measurements that would start after this many seconds.")
@click.option("--max-stage-seconds", default=None, type=float, help="Stop timing a stage once its timed calls add up to this (at least one call).")
@click.option("--quality", is_flag=True, help="Also run each backend and the reference (torch bf16 on a GPU, fp32 on the CPU) from the same seed: latent cosine and video PSNR in bench.json's quality object.")
@click.option("--out", default="outputs/bench", show_default=True, type=click.Path(file_okay=False), help="Folder for bench.json, bench.md and bench.png.")
@click.option("--parallel", "parallel", default=None, metavar="ulysses=N[,ring=M][,cfg=2]", help="Time the parallel mode under `torchrun --nproc-per-node K $(which ruyi-trt) bench ...` (torch backend); rows carry the communication per step.")
@click.option("--parallel-timeout", default=600.0, show_default=True, type=TIMEOUT, help="Seconds a rank waits for the others.")
def bench(model, backends, resolution, size, frames, stages, block_tokens, steps, warmup, repeat, dtype, device,
          time_budget_s, max_stage_seconds, quality, out, parallel, parallel_timeout) -> None:
    """Time each stage per backend and shape: median/min/max, peak memory, TFLOP/s and % of the GPU's peak."""
    from .runtime.parallel import ParallelConfig, is_main_process, leave
    from .tools.bench import BenchConfig, parse_shapes, run_bench

    try:
        config = BenchConfig(
            model=model, backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
            shapes=parse_shapes(resolution, frames, size), stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
            steps=steps, warmup=warmup, repeat=repeat, dtype=dtype, device=device, time_budget_s=time_budget_s,
            max_stage_seconds=max_stage_seconds, block_tokens=block_tokens, quality=quality,
            parallel=ParallelConfig.parse(parallel, parallel_timeout) if parallel else None,
        )
        results = run_bench(config, out)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    leave()
    if not is_main_process():
        return
    ok = sum(m.status == "ok" for m in results.measurements)
    click.echo(f"{ok}/{len(results.measurements)} measurements ok; wrote {out}/bench.json, bench.md, bench.png")


@main.command()
@click.option("--model", default=None, help="Checkpoint folder, 'tiny' or 'full-random' (the real architecture, random weights). Omit it with --check to only check the graphs already in --out.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the .onnx graphs and manifest.json.")
@click.option("--component", default="all", show_default=True, type=click.Choice(["all", "transformer", "vae-encoder", "vae-decoder", "image-encoder"]))
@click.option("--per-block", is_flag=True, help="Transformer as embed, plain-block, skip-block and unembed graphs (block weights are inputs) instead of one graph.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (17..20).")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "bf16"]), help="Weights and activations; norms and softmax stay float32.")
@click.option("--exporter", default="auto", show_default=True, type=click.Choice(["auto", "torchscript", "dynamo"]), help="auto: torchscript, and dynamo for bf16 and the fp16 VAE graphs.")
@click.option("--attention", default="decomposed", show_default=True, type=click.Choice(["decomposed", "onnx"]), help="onnx: each attention as one ONNX Attention node (opset 23, TensorRT >= 10.14); decomposed: MatMul-Softmax-MatMul.")
@click.option("--check", is_flag=True, help="Check every graph in --out for TensorRT readiness; exit 1 on problems.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def export(model, out_dir, component, per_block, opset, dtype, exporter, attention, check, no_progress) -> None:
    """Export the model to ONNX graphs (cached: unchanged components are skipped)."""
    import time

    from .export.onnx_export import COMPONENTS, ExportSettings, export_checkpoint, peak_host_rss_bytes
    from .export.readiness import check_export_dir
    from .models.checkpoint import Checkpoint
    from .models.checkpoint_io import CheckpointError

    if model is None and not check:
        raise click.UsageError("pass --model PATH|tiny|full-random (or --check alone to check the graphs in --out)")
    try:
        if model is not None:
            settings = ExportSettings(dtype=dtype, opset=opset, per_block=per_block, exporter=exporter, attention=attention)
            components = COMPONENTS if component == "all" else (component,)
            started = time.perf_counter()
            result = export_checkpoint(Checkpoint.resolve(model, download=False), out_dir, settings, components,
                                       progress=not no_progress)
            for name, entry in result.manifest["components"].items():
                state = "exported" if name in result.exported else "cached"
                graphs = ", ".join(f"{g} {v['bytes'] / 1e6:.1f} MB" for g, v in entry["graphs"].items())
                click.echo(f"{name}: {state} in {entry['seconds']:.1f} s: {graphs}")
            click.echo(f"export: {time.perf_counter() - started:.1f} s, peak host RSS {peak_host_rss_bytes() / 2**30:.2f} GiB")
        problems = check_export_dir(out_dir) if check else {}
    except (ValueError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from exc
    for name, found in problems.items():
        click.echo(f"{name}: {'TensorRT-ready' if not found else f'{len(found)} problem(s)'}")
        for problem in found:
            click.echo(f"  {problem}")
    if any(problems.values()):
        raise SystemExit(1)


@main.command()
@click.option("--model", default="tiny", show_default=True, help="Checkpoint folder, 'tiny' or 'full-random' (the real architecture, random weights).")
@click.option("--precision", default="fp16", show_default=True, type=click.Choice(["fp16", "bf16", "fp8", "int8", "fp32"]), help="Taken from the exported graph's dtypes (strongly typed networks); fp8/int8: the transformer's Q/DQ graph from a calibration (fp16 elsewhere); fp32 with --engine aoti only.")
@click.option("--engine", "engine_kind", default="tensorrt", show_default=True, type=click.Choice(["tensorrt", "aoti"]), help="aoti: AOTInductor packages of the transformer blocks (runs wherever torch runs; --backend aoti).")
@click.option("--calibration", default=None, type=click.Path(file_okay=False), help="fp8/int8: calibration folder from `ruyi-trt calibrate` (default: the cached one, calibrated first when missing).")
@click.option("--resolution", default="512", show_default=True, help="Comma list: 512 / 768 (every aspect bucket of that base) or HEIGHTxWIDTH.")
@click.option("--frames", default="24:24:24", show_default=True, help="Video frames MIN:OPT:MAX (multiples of 8, up to 120).")
@click.option("--batch", default=2, show_default=True, type=click.Choice(["1", "2"]), help="Largest transformer batch: 2 for classifier-free guidance.")
@click.option("--per-block/--whole", "per_block", default=None, help="Transformer as embed / block / unembed engines with the block weights as inputs, or one whole-model engine (default: per-block above 4 GiB of transformer weights, i.e. the full model).")
@click.option("--attention", default="auto", show_default=True, type=click.Choice(["auto", "onnx", "decomposed"]), help="auto: ONNX Attention nodes when the TensorRT used parses them (>= 10.14), else MatMul-Softmax-MatMul.")
@click.option("--weight-streaming", is_flag=True, help="Build with WEIGHT_STREAMING (run within the memory plan's budget).")
@click.option("--refit", is_flag=True, help="Build with REFIT (a LoRA is applied by refit, without a rebuild).")
@click.option("--timing-cache", default=None, type=click.Path(dir_okay=False), help="Timing cache file to load and update.")
@click.option("--workspace", "workspace_gb", default=None, type=float, help="Workspace pool limit in GiB (default: TensorRT's).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Engine folder root (default: the cache, <cache>/engines); build-plan.json goes there.")
@click.option("--dry-run", is_flag=True, help="Export, plan and check every engine (shape inference at each profile's max) and write build-plan.json, without TensorRT or a GPU.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def build(model, precision, engine_kind, calibration, resolution, frames, batch, per_block, attention, weight_streaming,
          refit, timing_cache, workspace_gb, out, dry_run, no_progress) -> None:
    """Export (or reuse) the ONNX graphs, plan the engines and build one cached TensorRT engine per graph and size group
    (--engine aoti: AOTInductor packages of the transformer blocks)."""
    import time
    from pathlib import Path

    from .engine.build import build_engines
    from .engine.settings import BuildSettings
    from .export.onnx_export import peak_host_rss_bytes
    from .models.checkpoint_io import CheckpointError

    started = time.perf_counter()
    try:
        settings = BuildSettings.from_strings(
            model, precision, resolution, frames, batch=int(batch), per_block=per_block, weight_streaming=weight_streaming,
            refit=refit, timing_cache=Path(timing_cache) if timing_cache else None, workspace_gb=workspace_gb,
            out=Path(out) if out else None, attention=attention, engine=engine_kind,
            calibration=Path(calibration) if calibration else None,
        )  # fmt: skip
        quantized = settings.engine == "tensorrt" and settings.precision in ("fp8", "int8")
        if quantized and settings.calibration is None and not dry_run:
            from .engine.trt_api import require_tensorrt
            from .runtime.calibration import ensure_calibrated

            require_tensorrt("ruyi-trt build")  # before calibrating for engines that cannot be built here
            ensure_calibrated(model, precision, progress=not no_progress)
        result = build_engines(settings, progress=not no_progress, dry_run=dry_run)
    except (ValueError, ImportError, RuntimeError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from exc
    for graph, folder in result.engines.items():
        click.echo(f"{graph}: {'built' if graph in result.built else 'cached'} {folder}")
    seconds, rss = time.perf_counter() - started, peak_host_rss_bytes() / 2**30
    done = f"{'planned' if dry_run else 'build plan'}: {result.plan}" if result.plan else f"packages in {result.onnx_dir}"
    click.echo(f"{done} ({seconds:.1f} s, peak host RSS {rss:.2f} GiB)")


def _parse_lora(text: str, default_strength: float) -> tuple[str, float]:
    """'file.safetensors:0.8' -> (file, 0.8); a file without ':STRENGTH' gets `default_strength`."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass  # a ':' inside the path (e.g. C:\loras\a.safetensors)
    return text, default_strength


@main.command()
@click.option("--model", default="tiny", show_default=True, help="Checkpoint folder or 'tiny'.")
@click.option("--precision", required=True, type=click.Choice(["fp8", "int8"]), help="fp8: FP8 E4M3 per-tensor; int8: INT8 SmoothQuant (per-channel weights).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for scales.safetensors and calibration.json.")
@click.option("--resolution", default="512,768", show_default=True, help="Base resolutions of the calibration requests (aspect bucket of the start image).")
@click.option("--size", default=None, help="Explicit HEIGHTxWIDTH instead of --resolution (small test models).")
@click.option("--frames", default=8, show_default=True, help="Video frames per calibration request.")
@click.option("--steps", default=25, show_default=True, help="Scheduler steps: every timestep of this schedule is calibrated.")
@click.option("--alpha", default=0.5, show_default=True, help="SmoothQuant migration strength (int8).")
@click.option("--image", default=None, type=click.Path(dir_okay=False), help="Start image (default: the bundled example).")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def calibrate(model, precision, out_dir, resolution, size, frames, steps, alpha, image, device, no_progress) -> None:
    """Calibrate the transformer's FP8/INT8 scales with ModelOpt over a small set of requests."""
    from .calib.scales import ScalesError
    from .calib.store import CalibrationSettings
    from .models.checkpoint_io import CheckpointError
    from .runtime.calibration import calibrate_checkpoint
    from .runtime.request import load_image

    try:
        resolutions = tuple(int(r) for r in resolution.split(",") if r.strip())
    except ValueError as exc:
        raise click.BadParameter(f"{resolution!r} is not a comma list of 512/768", param_hint="--resolution") from exc
    try:
        settings = CalibrationSettings(resolutions=resolutions, frames=frames, steps=steps, alpha=alpha,
                                       size=_parse_size(size))  # fmt: skip
        result = calibrate_checkpoint(model, precision, out_dir, settings,
                                      device=device, image=load_image(image, "--image") if image else None,
                                      progress=not no_progress)  # fmt: skip
    except (ValueError, ImportError, CheckpointError, ScalesError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"calibrated {result.layers} layers ({precision}) in {result.seconds:.1f} s: {out_dir}/scales.safetensors, "
               f"{out_dir}/calibration.json")


def _parse_size(size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        height, width = (int(part) for part in size.lower().split("x"))
    except ValueError as exc:
        raise click.BadParameter(f"{size!r} is not HEIGHTxWIDTH; use two multiples of 16 within 16..2048, e.g. 384x672",
                                 param_hint="--size") from exc
    return height, width


# `ruyi-trt run`'s options that say how to run; `serve` takes the same ones (the same click options)
SERVE_RUN_OPTIONS = ("backend", "calibration", "device", "dtype", "memory_mode", "offload_steps", "vram_budget_gb", "fp8",
                     "fp8_storage", "teacache_threshold", "teacache_skip_start", "teacache_skip_end",
                     "teacache_offload_cpu", "enhance_a_video", "enhance_a_video_skip_start", "enhance_a_video_skip_end",
                     "loras", "lora_strength", "compute", "scales", "attention", "fused_kernels")  # fmt: skip
# click's parameter names that `RuntimeOptions.make` calls otherwise
MAKE_KEYWORDS = {"vram_budget_gb": "vram_budget", "teacache_threshold": "teacache"}


def runtime_keywords(params: dict) -> dict:
    """The values of run's SERVE_RUN_OPTIONS in `params` (click's) as `RuntimeOptions.make` keywords; the --lora
    files (FILE[:STRENGTH]) become the `lora` list."""
    keywords = {MAKE_KEYWORDS.get(name, name): params[name] for name in SERVE_RUN_OPTIONS if name != "loras"}
    keywords["lora"] = [_parse_lora(text, params["lora_strength"]) for text in params["loras"]] or None
    return keywords


@main.command()
@click.option("--model", "model", default=None, help="As for `run`: a checkpoint folder, 'tiny', 'full-random', or omit for models/Ruyi-Mini-7B.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (anything but loopback is reachable by others: use --token-file).")
@click.option("--port", default=8000, show_default=True)
@click.option("--data-dir", required=True, type=click.Path(file_okay=False), help="Holds the job queue (SQLite) and results/; reuse it to keep the queue across restarts.")
@click.option("--workers-per-gpu", default=1, show_default=True, help="Worker processes per GPU (or per GPU group with --parallel; on the CPU: in all), each holding a loaded pipeline.")
@click.option("--max-queue", default=100, show_default=True, help="Waiting jobs accepted before new ones get 429.")
@click.option("--token-file", default=None, type=click.Path(dir_okay=False), help="File whose first line is the bearer token every request must send.")
@click.option("--max-upload-mb", default=20.0, show_default=True, help="Largest request body (413 past it).")
@click.option("--result-ttl-hours", default=168.0, show_default=True, help="Finished jobs and their videos are deleted after this many hours.")
@click.option("--max-attempts", default=2, show_default=True, help="Runs of a job that keeps being interrupted (a crash, a lost worker) before it is marked failed.")
@click.option("--ray", "use_ray", is_flag=True, help="Run as a Ray Serve application: the API plus one GPU worker replica per GPU of the Ray cluster.")
@click.option("--ray-address", default=None, help="Ray cluster to join (e.g. auto, or ray://head:10001); default: start a local one.")
@click.option("--ray-workers", default=None, type=int, help="Worker replicas under --ray (default: the cluster's GPUs, or 1 on the CPU).")
@click.option("--parallel", "parallel", default=None, metavar="ulysses=N[,ring=M][,cfg=2]", help="Each worker is a group of K = ulysses x ring x cfg processes, one GPU each, sharing every video (as `run --parallel`).")
def serve(model, host, port, data_dir, workers_per_gpu, max_queue, token_file, max_upload_mb, result_ttl_hours,
          max_attempts, use_ray, ray_address, ray_workers, **run_options) -> None:
    """Serve image-to-video jobs over HTTP: a persistent queue, live progress, a web page at /."""
    from pathlib import Path

    from .models.checkpoint_io import CheckpointError
    from .server.config import ServerConfig, read_token
    from .server.main import serve as serve_forever

    run_options = runtime_keywords(run_options)
    try:
        config = ServerConfig(
            model=model, data_dir=Path(data_dir), run_options=run_options, host=host, port=port,
            workers_per_gpu=workers_per_gpu, max_queue=max_queue, max_upload_mb=max_upload_mb,
            result_ttl_s=result_ttl_hours * 3600, max_attempts=max_attempts,
            token=read_token(token_file) if token_file else None, ray=use_ray, ray_address=ray_address,
            ray_workers=ray_workers,
        )  # fmt: skip
        serve_forever(config)
    except (ValueError, CheckpointError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc


serve.params.extend(param for param in run.params if param.name in SERVE_RUN_OPTIONS)
