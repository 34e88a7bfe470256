"""The public pipeline: `RuyiPipeline.from_pretrained(...)`, then `pipe(image, ...)` -> `Video`.

image -> bucket + conditioning video -> VAE encode (inpaint latents) + CLIP tokens -> control embeddings
-> denoising loop (classifier-free guidance, scheduler; the backend's denoiser) -> VAE decode (+ seam smoothing)
-> video. The steps follow the reference `RuyiInpaintPipeline.__call__` as driven by `predict_i2v.py`
(docs/ruyi-architecture.md section 6), dtypes and random draws included (the initial noise is the seeded
generator's first draw, on the CPU or, like the reference, on the GPU). One deliberate change: the reference draws
the conditioning latents from the VAE posterior with the unseeded global RNG; we draw them with a seeded CPU
generator, so a seed fully determines the video.

`from_pretrained` reads the checkpoint's configs once (`models.checkpoint.Checkpoint`) and loads the weights
right away, except when the memory plan depends on the video (memory_mode auto on a GPU or with a VRAM budget):
then the first call plans for its video and loads, and a later call whose video needs another plan reloads.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models.checkpoint import Checkpoint
from ..models.control_embeddings import DEFAULT_ASPECT, ControlEmbeddings
from ..models.scheduler import load_scheduler, timesteps_for
from ..models.transformer import TransformerConfig
from ..models.vae import after_each_chunk
from ..models.vae_config import VAEConfig
from .backends.protocol import Components
from .conditioning import clip_pixel_values, image_to_video_condition, prepare_mask_and_masked_video
from .denoising import denoise_step, initial_noise, latent_dtype, sample_posterior, transformer_conditioning
from .loading import RuntimeOptions, load_components, load_steps, memory_plan, plan_depends_on_video
from .memory.plan import MemoryPlan
from .parallel import ParallelContext, ParallelError, join
from .preview import LatentPreview
from .request import ImageInput, VideoRequest
from .stats import RunStats, StageTimer
from .video import to_uint8_frames, write_frames, write_video

log = logging.getLogger(__name__)

FPS = 24
# callback(stage, done, total), in this order: "load" after each loading step (only when the call loads),
# "vae_encode" after each VAE encoder chunk, "denoise" after each denoising step, "vae_decode" after each VAE chunk
# of the decode (seam smoothing included); `RuyiPipeline.progress_totals` gives every total up front. It may raise
# to stop the run.
ProgressCallback = Callable[[str, int, int], None]
# preview(step, total, image): after each denoising step, the middle latent frame as a small RGB image (uint8
# [h, w, 3], one pixel per latent pixel), projected by `runtime.preview.LatentPreview`.
PreviewCallback = Callable[[int, int, torch.Tensor], None]
STAGES = ("load", "vae_encode", "denoise", "vae_decode")


class GenerationError(RuntimeError):
    """A run that cannot go ahead (out of memory, non-finite latents); the message says what to change."""


@dataclass
class Video:
    """A generated video: `frames` uint8 [F, H, W, 3] on the CPU, at `fps`, with the run's `stats`."""

    frames: torch.Tensor
    fps: int = FPS
    stats: RunStats = field(default_factory=RunStats)

    def save(self, path: str | Path) -> Path:
        """Write an H.264 mp4 (atomically: the file appears whole or not at all)."""
        return write_video(self.frames, path, fps=self.fps)

    def save_frames(self, folder: str | Path, overwrite: bool = True) -> Path:
        """Write every frame as a PNG into `folder` (atomically)."""
        return write_frames(self.frames, folder, overwrite=overwrite)


class RuyiPipeline:
    """Ruyi image-to-video over a checkpoint and runtime options; see the module docstring."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        options: RuntimeOptions,
        components: Components | None = None,
        embeddings: ControlEmbeddings | None = None,
    ):
        """`components`, when given, are ready for `options` (the caller made them); otherwise the options are
        validated here and the components load on demand (`load`). The control embeddings load from the checkpoint
        on first use unless given."""
        if components is None:
            options.validate()
        self.parallel: ParallelContext | None = None  # this rank's part of a torchrun job (options.parallel)
        if options.parallel is not None:
            options.parallel.check_heads(checkpoint.transformer.num_attention_heads)
            self.parallel = join(options.parallel, options.device)
            options = replace(options, device=str(self.parallel.device))
        self.checkpoint, self.options = checkpoint, options
        self._components = components
        self._plan: MemoryPlan | None = None
        self._plan_key: tuple | None = None
        self._embeddings = embeddings

    @classmethod
    def from_pretrained(
        cls, model: str | Path | Checkpoint | None = None, *, download: bool = True, **options: Any
    ) -> RuyiPipeline:
        """A pipeline for `model`: a checkpoint folder, "tiny", "full-random", or None for models/Ruyi-Mini-7B
        (downloaded when missing and `download`). `options` say how to run, as `ruyi-trt run`'s options do
        (`RuntimeOptions.make`): backend (torch, ort, trt), device (default cuda when visible), dtype (default bf16
        on cuda, fp16 with ort, fp32 on the CPU), memory_mode (auto, full_gpu, normal, low_gpu), vram_budget (GiB),
        offload_steps, fp8 (none, lite, strong, extreme), fp8_storage (auto, fp8_e4m3fn, fp8_e5m2), teacache
        (threshold) with teacache_skip_start/_skip_end/_offload_cpu, enhance_a_video (weight) with
        enhance_a_video_skip_start/_skip_end, lora (a .safetensors file, or a list of files and (file, strength)
        pairs, merged in order), lora_strength (for files given without one), and the torch backend's compute
        (none, fp8, int8), scales (a calibrated scales.safetensors or its folder), attention (sdpa, fp8, fp8-full)
        and fused_kernels."""
        options = RuntimeOptions.make(**options)
        pipe = cls(Checkpoint.resolve(model, download=download), options)
        if not plan_depends_on_video(options):
            pipe.load()
        return pipe

    # -- what it is -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device(self.options.device)

    @property
    def transformer_config(self) -> TransformerConfig:
        return self.checkpoint.transformer

    @property
    def vae_config(self) -> VAEConfig:
        return self.checkpoint.vae

    @property
    def is_loaded(self) -> bool:
        return self._components is not None

    @property
    def components(self) -> Components:
        """The loaded backends (loading them now, without a plan, if nothing is loaded yet)."""
        if self._components is None:
            self.load()
        return self._components

    def plan(self, request: VideoRequest) -> MemoryPlan | None:
        """The memory plan for `request`'s video (None when no plan applies; see `runtime.loading.memory_plan`)."""
        if not plan_depends_on_video(self.options):
            return None
        height, width, frames = request.geometry(self.checkpoint.vae.mini_batch_encoder)
        return memory_plan(self.checkpoint, self.options, height, width, frames, request.guidance_scale > 1.0,
                           request.steps)  # fmt: skip

    def _plan_key_for(self, request: VideoRequest | None) -> tuple | None:
        if request is None or not plan_depends_on_video(self.options):
            return None
        return request.geometry(self.checkpoint.vae.mini_batch_encoder), request.guidance_scale > 1.0

    def needs_load(self, request: VideoRequest | None = None) -> bool:
        """Whether `load(request)` (and so `generate(request)`) will load the components."""
        key = self._plan_key_for(request)
        return self._components is None or (key is not None and key != self._plan_key)

    def load(self, request: VideoRequest | None = None, callback: ProgressCallback | None = None) -> Components:
        """Load the components (planned for `request`'s video when the plan depends on it); a loaded pipeline is
        kept unless the plan for `request` differs from the one it was loaded with. `callback("load", done, total)`
        follows the loading steps."""
        if not self.needs_load(request):
            return self._components
        key = self._plan_key_for(request)
        plan = self.plan(request) if key is not None else None
        self.unload()
        if plan is not None:
            log.info("%s", plan.describe())
        progress = (lambda done, total: callback("load", done, total)) if callback else None
        self._components = load_components(self.checkpoint, self.options, plan, progress)
        self._plan, self._plan_key = plan, key
        return self._components

    def unload(self) -> None:
        """Release the loaded components and their device memory (they load again on the next call)."""
        if self._components is not None:
            self._components.close()
            self._components = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._plan = self._plan_key = None

    close = unload

    def with_options(self, **changes: object) -> RuyiPipeline:
        """A new (unloaded) pipeline over the same checkpoint with some runtime options changed."""
        return RuyiPipeline(self.checkpoint, replace(self.options, **changes))

    # -- making a video ---------------------------------------------------------------------------
    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput],
        end_image: ImageInput | Sequence[ImageInput] | None = None,
        *,
        frames: int = 120,
        resolution: int = 512,
        size: tuple[int, int] | None = None,
        camera: str = "static",
        motion: str | int = 2,
        steps: int = 25,
        cfg: float = 7.0,
        seed: int = 42,
        scheduler: str = "DDIM",
        clip_apply_ratio: float = 0.4,
        aspect_ratio: str = DEFAULT_ASPECT,
        noise_device: str = "cpu",
        callback: ProgressCallback | None = None,
        progress: bool = True,
        preview: PreviewCallback | None = None,
    ) -> Video:
        """Make a video from a start image (a PIL image, a path, or a list of up to 5) and optional end image(s).

        frames 1..120 (rounded down to a multiple of 8), resolution 384..1024 in steps of 16 (the aspect bucket of
        the first start image; `size` (height, width) overrides it), camera static/left/right/up/down/auto, motion
        1-4 or auto, cfg <= 1 turns classifier-free guidance off; aspect_ratio is the control embeddings' key (the
        original's 16:9), noise_device where the seeded noise is drawn (cpu, or cuda as the original). `callback`
        follows every stage and `preview` gets a latent preview after each step (see `ProgressCallback` and
        `PreviewCallback`)."""
        request = VideoRequest.from_inputs(
            image, end_image, frames=frames, resolution=resolution, size=size, camera=camera, motion=motion,
            steps=steps, guidance_scale=cfg, seed=seed, scheduler=scheduler, clip_apply_ratio=clip_apply_ratio,
            aspect_ratio=aspect_ratio, noise_device=noise_device,
        )  # fmt: skip
        return self.generate(request, callback=callback, progress=progress, preview=preview)

    def generate(
        self,
        request: VideoRequest,
        callback: ProgressCallback | None = None,
        progress: bool = True,
        preview: PreviewCallback | None = None,
    ) -> Video:
        """Make the video `request` describes (see `__call__` for the options). Under --parallel every rank calls
        this and every rank gets the video; only rank 0 shows progress."""
        if self.options.parallel is not None:
            self.options.parallel.check_guidance(request.guidance_scale > 1.0)
        progress = progress and (self.parallel is None or self.parallel.is_main)
        try:
            self.load(request, callback)
            pixels, stats = self.run(request, progress=progress, callback=callback, preview=preview)
        except ParallelError as exc:
            raise GenerationError(str(exc)) from exc
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise GenerationError(
                f"out of memory ({exc}). Try memory_mode auto (with a smaller VRAM budget), low_gpu, offload steps "
                "1, fp8 lite, dtype bf16, or fewer frames / a lower resolution."
            ) from exc
        return Video(to_uint8_frames(pixels), FPS, stats)

    def progress_totals(self, request: VideoRequest) -> dict[str, int]:
        """How many times `generate(request, callback)` will report each stage, in `STAGES` order (load is 0 when
        nothing needs loading), so that a host can show one progress bar over the whole job."""
        vcfg = self.vae_config
        frames = request.geometry(vcfg.mini_batch_encoder)[2]
        latents = vcfg.latent_frames(frames)
        decode = len(vcfg.decode_chunks(latents))
        if not vcfg.cache_compression_vae and vcfg.decoded_frames(latents) > vcfg.mini_batch_encoder:
            middle = vcfg.decoded_frames(latents) - vcfg.mini_batch_encoder  # `smooth_seams` re-encodes these
            decode += len(vcfg.encode_chunks(middle)) + len(vcfg.decode_chunks(vcfg.latent_frames(middle)))
        steps = len(timesteps_for(load_scheduler(request.scheduler, self.checkpoint.scheduler), request.steps))
        return {"load": load_steps(self.options) if self.needs_load(request) else 0,
                "vae_encode": 2 * len(vcfg.encode_chunks(frames)), "denoise": steps, "vae_decode": decode}  # fmt: skip

    # -- the stages -------------------------------------------------------------------------------
    @property
    def embeddings(self) -> ControlEmbeddings:
        if self._embeddings is None:
            self._embeddings = self.checkpoint.load_embeddings()
        return self._embeddings

    def encode_latents(self, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE-encode a [1,3,F,H,W] clip in [-1,1] and draw scaled latents."""
        moments = self.components.vae_encoder(video=video)
        return sample_posterior(moments, generator) * self.checkpoint.vae.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video in [0,1], float32 on the CPU, with the reference's seam smoothing. As in the reference,
        the clamps, the smoothing average and the mapping to [0, 1] run in the decoder's output dtype."""
        cfg = self.checkpoint.vae
        video = self.components.vae_decoder(latents=latents / cfg.scaling_factor).clamp(-1, 1)
        if not cfg.cache_compression_vae:
            video = self.smooth_seams(video).cpu().clamp(-1, 1)
        return (video.cpu() / 2 + 0.5).clamp(0, 1).float()

    def smooth_seams(self, video: torch.Tensor) -> torch.Tensor:
        """Average the middle frames with a re-encode (posterior mode) and re-decode of them: hides chunk seams."""
        chunk = self.checkpoint.vae.mini_batch_encoder
        if video.shape[2] <= chunk:
            return video
        before, after = chunk // 2, chunk - chunk // 2
        middle = video[:, :, before:-after]
        moments = self.components.vae_encoder(video=middle)
        redecoded = self.components.vae_decoder(latents=moments.chunk(2, dim=1)[0]).to(video.device, video.dtype)
        video = video.clone()
        video[:, :, before:-after] = (middle + redecoded) / 2
        return video

    @torch.inference_mode()
    def run(
        self,
        request: VideoRequest,
        progress: bool = True,
        callback: ProgressCallback | None = None,
        preview: PreviewCallback | None = None,
    ) -> tuple[torch.Tensor, RunStats]:
        """The stages for `request` on the loaded components: ([1,3,F,H,W] float32 in [0,1] on the CPU, stats).

        `callback` follows the encode, denoise and decode stages and `preview` the steps (see `generate`)."""
        comps, tcfg, vcfg = self.components, self.transformer_config, self.vae_config
        totals = self.progress_totals(request) if callback else {}
        device, dtype = comps.device, comps.dtype
        stats = RunStats(precision=comps.precisions())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if request.noise_device == "cuda" and device.type != "cuda":
            raise ValueError("noise_device: cuda draws on the GPU the models run on; use --device cuda, or noise_device "
                             "cpu.")  # fmt: skip

        # 1. Size and length: aspect bucket of the first start image, frames rounded to VAE chunks
        height, width, frames = request.geometry(vcfg.mini_batch_encoder)
        stats.height, stats.width, stats.frames = height, width, frames
        note = request.frames_note(vcfg.mini_batch_encoder)
        if note:
            log.warning("%s", note)

        # 2. Control embeddings (camera, motion, aspect key); their stored dtype is the latents' dtype
        positive, negative = self.embeddings.select(request.camera, request.motion, request.aspect_ratio)
        latents_dtype = latent_dtype(dtype, positive["emb1"].dtype)

        # 3. Scheduler and initial noise: the seeded generator's first draw, as in the reference
        scheduler = load_scheduler(request.scheduler, self.checkpoint.scheduler)
        timesteps = timesteps_for(scheduler, request.steps)
        generator = torch.Generator(request.noise_device).manual_seed(request.seed)
        shape = (1, vcfg.latent_channels, vcfg.latent_frames(frames), height // vcfg.spatial_factor,
                 width // vcfg.spatial_factor)  # fmt: skip
        latents = initial_noise(shape, generator, device, latents_dtype, scheduler.init_noise_sigma)
        step_kwargs = {"generator": generator} if request.scheduler == "Euler A" else {}
        if request.scheduler == "DDIM":
            step_kwargs["eta"] = 0.0
        # the posterior samples come next from a CPU generator (the reference uses the unseeded global RNG)
        posterior = generator if generator.device.type == "cpu" else torch.Generator().manual_seed(request.seed)

        # 4. Conditioning video and mask (known frames = 0), then the inpaint latents
        with StageTimer(stats, "vae_encode", device), _count_chunks(callback, "vae_encode", totals.get("vae_encode")):
            input_video, mask, clip_image = image_to_video_condition(
                list(request.start_images), list(request.end_images) or None, frames, height, width
            )
            mask01, masked_video = prepare_mask_and_masked_video(input_video, mask)
            mask_latents = self.encode_latents(mask01.repeat(1, 3, 1, 1, 1), posterior)
            masked_latents = self.encode_latents(masked_video, posterior)
            inpaint = torch.cat([mask_latents, masked_latents], dim=1)  # (1, 2*C, T, h, w)
            previewer = LatentPreview.fit(masked_latents, masked_video, vcfg) if preview else None

        # 5. CLIP image tokens of the resized start frame (float32), and every fixed transformer input,
        #    [negative, positive] under CFG
        with StageTimer(stats, "image_encoder", device):
            clip_tokens = comps.image_encoder(pixel_values=clip_pixel_values(clip_image, self.checkpoint.image_processor))
        cfg_on = request.guidance_scale > 1.0
        early, late = transformer_conditioning(
            positive, negative, clip_tokens, inpaint.to(latents_dtype), height, width, tcfg, cfg_on
        )

        # 6. Denoising loop
        clip_start = len(timesteps) * (1 - request.clip_apply_ratio)
        comps.denoiser.start(len(timesteps), request.steps)
        with StageTimer(stats, "denoise", device):
            for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
                inputs = late if i >= clip_start else early
                latents = denoise_step(
                    comps.denoiser, scheduler, latents, t, inputs, request.guidance_scale, vcfg.latent_channels,
                    step_kwargs,
                )
                if callback is not None:
                    callback("denoise", i + 1, len(timesteps))
                if previewer is not None:
                    preview(i + 1, len(timesteps), previewer.image(latents))
            if not torch.isfinite(latents).all():
                raise GenerationError(
                    f"the latents became NaN/inf during denoising ({request.scheduler}, {request.steps} steps, "
                    f"{dtype}); try more steps, another scheduler or --dtype fp32/bf16."
                )

        # 7. Decode
        with StageTimer(stats, "vae_decode", device), _count_chunks(callback, "vae_decode", totals.get("vae_decode")):
            video = self.decode_latents(latents)
        if device.type == "cuda":
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        return video, stats


@contextmanager
def _count_chunks(callback: ProgressCallback | None, stage: str, total: int | None) -> Iterator[None]:
    """Report `stage` to `callback` after every VAE chunk run inside the block."""
    if callback is None:
        yield
        return
    done = 0

    def chunk_done() -> None:
        nonlocal done
        done += 1
        callback(stage, done, total)

    with after_each_chunk(chunk_done):
        yield


def load_pipeline(
    model: str | Path | Checkpoint, options: RuntimeOptions = RuntimeOptions(), plan: MemoryPlan | None = None
) -> RuyiPipeline:
    """A pipeline with its components loaded now for `options` (following `plan` when given)."""
    checkpoint = Checkpoint.resolve(model, download=False)
    return RuyiPipeline(checkpoint, options, load_components(checkpoint, options, plan))
