"""The Ruyi image-to-video pipeline over interchangeable backends.

image -> bucket + conditioning video -> VAE encode (inpaint latents) + CLIP tokens -> control embeddings
-> denoising loop (classifier-free guidance, scheduler) -> VAE decode (+ seam smoothing) -> video [1,3,F,H,W].
The steps follow the reference `RuyiInpaintPipeline.__call__` as driven by `predict_i2v.py`
(docs/ruyi-architecture.md section 6). One deliberate change: the reference draws the conditioning
latents from the VAE posterior with the unseeded global RNG; we draw them with the run's seeded
generator, so a seed fully determines the video.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..models.control_embeddings import ControlEmbeddings
from ..models.geometry import closest_bucket, round_video_length
from ..models.scheduler import load_scheduler, timesteps_for
from ..models.transformer import TransformerConfig, rotary_embedding
from ..models.vae_config import VAEConfig
from .backends.protocol import Components
from .conditioning import clip_pixel_values, image_to_video_condition, prepare_mask_and_masked_video
from .memory.device_usage import DevicePeak
from .request import VideoRequest

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """Seconds per stage and peak device memory of one run."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    driver_peak_bytes: int | None = None  # device memory in use as the driver reports it (TensorRT, ORT included)
    height: int = 0
    width: int = 0
    frames: int = 0

    def summary(self) -> str:
        stages = ", ".join(f"{name} {value:.2f}s" for name, value in self.seconds.items())
        memory = f", peak GPU memory {self.peak_memory_bytes / 2**30:.2f} GiB" if self.peak_memory_bytes else ""
        if self.driver_peak_bytes:
            memory += f" (torch allocator), {self.driver_peak_bytes / 2**30:.2f} GiB in use on the device (driver)"
        host = _peak_host_gib()
        host_text = f", peak host RSS {host:.2f} GiB" if host is not None else ""
        return f"{self.frames} frames {self.height}x{self.width}: {stages}{memory}{host_text}"


def _peak_host_gib() -> float | None:
    """Peak resident memory of this process (Linux/macOS; None where `resource` does not exist)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Timer:
    def __init__(self, stats: RunStats, name: str, device: torch.device):
        self.stats, self.name, self.device = stats, name, device

    def __enter__(self) -> None:
        self.peak = DevicePeak(self.device)  # the driver's view: TensorRT/ORT memory included
        self.peak.start()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.seconds[self.name] = self.stats.seconds.get(self.name, 0.0) + time.perf_counter() - self.start
        self.peak.stop()
        if self.peak.result is not None:
            self.stats.driver_peak_bytes = max(self.stats.driver_peak_bytes or 0, self.peak.result.driver_peak_bytes)


def sample_posterior(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw from the diagonal Gaussian whose (mean | logvar) are stacked on dim 1, with a seeded CPU generator."""
    mean, logvar = moments.float().chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def transformer_conditioning(
    positive: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor],
    clip_tokens: torch.Tensor,
    inpaint_latents: torch.Tensor,
    height: int,
    width: int,
    config: TransformerConfig,
    cfg_on: bool,
) -> tuple[dict[str, torch.Tensor | tuple], dict[str, torch.Tensor | tuple]]:
    """The transformer inputs that stay fixed over the loop, for the early steps (CLIP branch off: zero tokens,
    mask 0 for every sample) and the late steps (positive sample sees the CLIP tokens, the negative zeros).
    Batches are [negative, positive] when `cfg_on`, else [positive]."""
    batch = 2 if cfg_on else 1

    def stack(key: str) -> torch.Tensor:
        return torch.cat([negative[key], positive[key]]) if cfg_on else positive[key]

    latent_h, latent_w = inpaint_latents.shape[-2:]
    cos, sin = rotary_embedding(latent_h, latent_w, config.patch_size, config.attention_head_dim)
    fixed = {
        "encoder_hidden_states": stack("emb1"),
        "text_embedding_mask": stack("mask1"),
        "encoder_hidden_states_t5": stack("emb2"),
        "text_embedding_mask_t5": stack("mask2"),
        "image_meta_size": torch.tensor([[1024.0, 1024.0, height, width, 0.0, 0.0]]).repeat(batch, 1),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": (cos, sin),
        "inpaint_latents": inpaint_latents.repeat(batch, 1, 1, 1, 1),
    }
    zeros = torch.zeros_like(clip_tokens)
    early = {
        **fixed,
        "clip_encoder_hidden_states": zeros.repeat(batch, 1, 1),
        "clip_attention_mask": torch.zeros(batch, config.n_query),
    }
    late = {
        **fixed,
        "clip_encoder_hidden_states": torch.cat([zeros, clip_tokens]) if cfg_on else clip_tokens,
        "clip_attention_mask": torch.cat([torch.zeros(1, config.n_query), torch.ones(1, config.n_query)])
        if cfg_on
        else torch.ones(1, config.n_query),
    }
    return early, late


def guided_velocity(output: torch.Tensor, guidance_scale: float, latent_channels: int) -> torch.Tensor:
    """Keep the v-prediction channels (drop learned sigma) and apply CFG when the batch is [uncond, cond]."""
    velocity = output[:, :latent_channels]
    if velocity.shape[0] == 2:
        uncond, cond = velocity.chunk(2)
        velocity = uncond + guidance_scale * (cond - uncond)
    return velocity


def denoise_step(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    inputs: dict,
    guidance_scale: float,
    latent_channels: int,
    step_kwargs: dict,
) -> torch.Tensor:
    """One loop iteration: scale input, call the denoiser on the CFG batch, guide, scheduler step."""
    batch = inputs["style"].shape[0]
    model_in = scheduler.scale_model_input(torch.cat([latents] * batch), t)
    timestep = torch.as_tensor(t).reshape(1).expand(batch).float()
    output = denoiser(hidden_states=model_in, timestep=timestep, **inputs)
    velocity = guided_velocity(output.to(latents.device), guidance_scale, latent_channels)
    return scheduler.step(velocity, t, latents, **step_kwargs, return_dict=False)[0]


class RuyiPipeline:
    """Runs one `VideoRequest` on `Components`; it loads nothing itself (see `runtime.loading`)."""

    def __init__(
        self,
        components: Components,
        transformer_config: TransformerConfig,
        vae_config: VAEConfig,
        embeddings: ControlEmbeddings,
        scheduler_config: dict,
        clip_processor_config: dict,
        clip_tokens: tuple[int, int],
    ):
        self.components = components
        self.transformer_config = transformer_config
        self.vae_config = vae_config
        self.embeddings = embeddings
        self.scheduler_config = scheduler_config
        self.clip_processor_config = clip_processor_config
        self.clip_tokens = clip_tokens  # (tokens, hidden) of the image encoder output

    # -- stages ---------------------------------------------------------------------------------
    def encode_latents(self, video: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """VAE-encode a [1,3,F,H,W] clip in [-1,1] and draw scaled latents."""
        moments = self.components.vae_encoder(video=video)
        return sample_posterior(moments, generator) * self.vae_config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video in [0,1], float32 on the CPU, with the reference's seam smoothing."""
        cfg = self.vae_config
        video = self.components.vae_decoder(latents=latents / cfg.scaling_factor).float().clamp(-1, 1)
        if not cfg.cache_compression_vae:
            video = self.smooth_seams(video).clamp(-1, 1)
        return (video.cpu() / 2 + 0.5).clamp(0, 1)

    def smooth_seams(self, video: torch.Tensor) -> torch.Tensor:
        """Average the middle frames with a re-encode (posterior mode) and re-decode of them: hides chunk seams."""
        chunk = self.vae_config.mini_batch_encoder
        if video.shape[2] <= chunk:
            return video
        before, after = chunk // 2, chunk - chunk // 2
        middle = video[:, :, before:-after]
        moments = self.components.vae_encoder(video=middle)
        redecoded = self.components.vae_decoder(latents=moments.chunk(2, dim=1)[0]).float().to(video.device)
        video = video.clone()
        video[:, :, before:-after] = (middle + redecoded) / 2
        return video

    # -- the run --------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(
        self, request: VideoRequest, progress: bool = True, on_step: Callable[[int, int], None] | None = None
    ) -> tuple[torch.Tensor, RunStats]:
        """Generate the video for `request`: returns ([1,3,F,H,W] float32 in [0,1] on the CPU, stats).

        `on_step(done, total)` is called after each denoising step (ComfyUI's progress bar; it may raise to stop)."""
        comps, tcfg, vcfg = self.components, self.transformer_config, self.vae_config
        device, dtype = comps.device, comps.dtype
        stats = RunStats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generator = torch.Generator().manual_seed(request.seed)

        # 1. Size and length: aspect bucket of the first start image, frames rounded to VAE chunks
        if request.size is not None:
            height, width = request.size
        else:
            height, width = closest_bucket(*request.start_images[0].size, request.resolution)
        frames = round_video_length(request.frames, vcfg.mini_batch_encoder)
        stats.height, stats.width, stats.frames = height, width, frames

        # 2. Conditioning video and mask (known frames = 0), then the inpaint latents
        with _Timer(stats, "vae_encode", device):
            input_video, mask, clip_image = image_to_video_condition(
                list(request.start_images), list(request.end_images) or None, frames, height, width
            )
            mask01, masked_video = prepare_mask_and_masked_video(input_video, mask)
            mask_latents = self.encode_latents(mask01.repeat(1, 3, 1, 1, 1), generator)
            masked_latents = self.encode_latents(masked_video, generator)
            inpaint = torch.cat([mask_latents, masked_latents], dim=1)  # (1, 2*C, T, h, w)

        # 3. CLIP image tokens of the resized start frame
        with _Timer(stats, "image_encoder", device):
            clip_tokens = comps.image_encoder(pixel_values=clip_pixel_values(clip_image, self.clip_processor_config))

        # 4. Control embeddings (camera, motion) and every fixed transformer input, [negative, positive] under CFG
        positive, negative = self.embeddings.select(request.camera, request.motion)
        cfg_on = request.guidance_scale > 1.0
        early, late = transformer_conditioning(
            positive, negative, clip_tokens, inpaint.to(dtype), height, width, tcfg, cfg_on
        )

        # 5. Scheduler and initial noise
        scheduler = load_scheduler(request.scheduler, self.scheduler_config)
        timesteps = timesteps_for(scheduler, request.steps)
        latent_h, latent_w = inpaint.shape[-2:]
        shape = (1, vcfg.latent_channels, inpaint.shape[2], latent_h, latent_w)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        latents = (latents * scheduler.init_noise_sigma).to(dtype)
        step_kwargs = {"generator": generator} if request.scheduler == "Euler A" else {}
        if request.scheduler == "DDIM":
            step_kwargs["eta"] = 0.0

        # 7. Denoising loop
        clip_start = len(timesteps) * (1 - request.clip_apply_ratio)
        comps.denoiser.start(len(timesteps))
        with _Timer(stats, "denoise", device):
            for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
                inputs = late if i >= clip_start else early
                latents = denoise_step(
                    comps.denoiser, scheduler, latents, t, inputs, request.guidance_scale, vcfg.latent_channels,
                    step_kwargs,
                )
                if on_step is not None:
                    on_step(i + 1, len(timesteps))
            if not torch.isfinite(latents).all():
                raise FloatingPointError(
                    f"the latents became NaN/inf during denoising ({request.scheduler}, {request.steps} steps, "
                    f"{dtype}); try more steps, another scheduler or --dtype fp32/bf16."
                )

        # 8. Decode
        with _Timer(stats, "vae_decode", device):
            video = self.decode_latents(latents)
        if device.type == "cuda":
            stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
        return video, stats
