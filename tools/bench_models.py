"""What `bench` times: a model (a checkpoint folder, or the full-size random model built on the device), opened
once per backend, and one call of each stage with random inputs of the requested shape.

Backends are looked up by name: a name in `runtime.loading.BACKENDS` loads through `load_pipeline`; a `torch-*`
name is a fast path (tools/fast_paths.py) over the torch backend; anything else `ruyi-trt doctor` knows (ort,
trt) is listed as unavailable with the reason, until runtime.loading wires it.

The `block` stage (not in the default stages) times one transformer block at the real width (2816 = 16 x 176
heads, Ruyi-Mini-7B's sizes, random weights) on a one-frame grid of `block_tokens` tokens, whatever the model:
a comparable row for every backend even on CPU, where the full model is out of reach. Torch paths run it through
the same fast-path wrapping as the whole transformer (`BlockHost` has `.blocks`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..models.transformer import TransformerConfig, rotary_embedding
from ..models.transformer_blocks import TransformerBlock
from ..models.vae_config import VAEConfig
from ..runtime.backends.protocol import Backend, Denoiser
from .fast_paths import FAST_PATHS, wrap_denoiser
from .flops import FlopCount, transformer_flops

if TYPE_CHECKING:
    from ..models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

STAGES = ("image_encoder", "vae_encode", "denoise", "vae_decode", "run")
BLOCK_STAGE = "block"  # one full-width transformer block; asked for explicitly (--stages ...,block)
ALL_STAGES = (*STAGES, BLOCK_STAGE)
BLOCK_GRID_WIDTH = 64  # patches per row of the block stage's one-frame grid (block_tokens is a multiple of it)
FULL_RANDOM = "full-random"
CFG_BATCH = 2
# runtime.loading.DTYPES, repeated so that the full-random path imports without the pipeline's dependencies
# (diffusers is missing on a bare GPU image).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Shape:
    """A video size: pixels and frames (frames as the pipeline counts them: 1 or a multiple of 8)."""

    height: int
    width: int
    frames: int

    @property
    def label(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}f"


@dataclass(frozen=True)
class BackendStatus:
    """A requested backend: usable or not, with the description or the reason."""

    name: str
    kind: str  # "runtime" (runtime.loading) or "fast-path" (a torch variant)
    available: bool
    reason: str


def backend_statuses(names: list[str], full_random: bool, device: torch.device) -> list[BackendStatus]:
    """Resolve `--backends` names; unknown names raise ValueError, unusable ones carry the reason."""
    from .doctor import collect_report

    try:
        from ..runtime.loading import BACKENDS
    except ImportError as exc:  # e.g. no diffusers: the full-random transformer still runs on torch
        log.warning("runtime.loading does not import (%s): only torch on %s", exc, FULL_RANDOM)
        BACKENDS = ("torch",) if full_random else ()
    doctor = collect_report().backends
    known = sorted(set(BACKENDS) | {"torch"} | set(doctor) | set(FAST_PATHS))
    statuses = []
    for name in names:
        if name in FAST_PATHS:
            path = FAST_PATHS[name]
            why = path.unavailable_reason(device)
            statuses.append(BackendStatus(name, "fast-path", why is None, why or path.description))
        elif name in BACKENDS:
            usable, why = doctor.get(name, (True, ""))
            if full_random and name != "torch":
                usable, why = (
                    False,
                    f"{FULL_RANDOM} has no checkpoint folder to build {name} components from; use --model PATH",
                )
            statuses.append(BackendStatus(name, "runtime", usable, why))
        elif name in doctor:
            why = f"not wired into runtime.loading.BACKENDS {BACKENDS} yet (doctor: {doctor[name][1]})"
            statuses.append(BackendStatus(name, "runtime", False, why))
        else:
            raise ValueError(f"backends: {name!r} is unknown; use any of {known}.")
    return statuses


@dataclass
class Session:
    """One backend's callables for the stages; None where the model has no such component."""

    image_encoder: Backend | Callable | None
    vae_encoder: Backend | Callable | None
    vae_decoder: Backend | Callable | None
    denoiser: Denoiser | None
    clip_tokens: tuple[int, int]  # (tokens, width) of the image encoder output
    clip_image_size: int
    close: Callable[[], None]
    pipeline: object | None = None  # a RuyiPipeline when the whole run can be timed
    block: Denoiser | None = None  # the full-width block (stage `block`), through this backend's path


class BlockHost(torch.nn.Module):
    """One transformer block held as `.blocks`, so fast paths apply to it exactly as to the whole transformer."""

    def __init__(self, block: TransformerBlock):
        super().__init__()
        self.blocks = torch.nn.ModuleList([block])


class BlockDenoiser:
    """`block(**block_inputs)` as a Denoiser that the fast paths can wrap; the block outlives the session."""

    def __init__(self, host: BlockHost):
        self.model = host

    def __call__(self, **inputs) -> torch.Tensor:
        return self.model.blocks[0](**inputs)

    def start(self, num_calls: int) -> None:
        """Stateless."""

    def close(self) -> None:
        """The block is shared by every backend."""


def full_width_block(device: torch.device, dtype: torch.dtype, seed: int = 0) -> BlockHost:
    """A plain (no long skip) block at Ruyi-Mini-7B's width with random weights, on `device` in `dtype`."""
    from ..models.presets import randomize_

    config = TransformerConfig.full()
    with torch.device(device):
        block = TransformerBlock(
            config.inner_dim, config.num_attention_heads, config.cross_attention_dim, config.ff_inner_dim,
            "tanh", has_skip=False, time_position_encoding=True,  # activation_fn "gelu-approximate"
        )  # fmt: skip
    randomize_(block, seed, keep={"t_embed.pe"})
    return BlockHost(block).to(dtype).eval().requires_grad_(False)


def block_inputs(tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random inputs of the full-width block for one sample of `tokens` tokens (one frame, BLOCK_GRID_WIDTH wide)."""
    config = TransformerConfig.full()
    gen = torch.Generator().manual_seed(0)
    rows, p = tokens // BLOCK_GRID_WIDTH, config.patch_size
    cos, sin = rotary_embedding(rows * p, BLOCK_GRID_WIDTH * p, p, config.attention_head_dim)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(device, dtype)

    return {
        "x": randn(1, tokens, config.inner_dim), "temb": randn(1, config.inner_dim),
        "text_states": randn(1, config.text_tokens, config.cross_attention_dim),
        "clip_states": randn(1, config.n_query, config.cross_attention_dim),
        "rope_cos": cos.to(device), "rope_sin": sin.to(device), "num_frames": 1,
    }  # fmt: skip


def block_flops(tokens: int) -> FlopCount:
    """FLOPs of one plain full-width block on one sample (tools/flops.py's terms for a single block)."""
    config = TransformerConfig.full()
    d, dff, context = config.inner_dim, config.ff_inner_dim, config.text_tokens + config.n_query
    return FlopCount(tokens * (20 * d * d + 4 * d * dff), 4 * tokens * tokens * d, 4 * tokens * context * d, tokens, 1)


class SharedBlock:
    """The full-width block, built on first use and shared by every backend of a bench (like full-random's model)."""

    def __init__(self, device: torch.device, dtype: str):
        self.device, self.dtype = device, dtype
        self._host: BlockHost | None = None

    def denoiser(self, path) -> Denoiser:
        if self._host is None:
            log.info("building the full-width block (hidden 2816, 16 x 176 heads) on %s", self.device)
            self._host = full_width_block(self.device, DTYPES[self.dtype])
        base = BlockDenoiser(self._host)
        return wrap_denoiser(path, base, self.device, DTYPES[self.dtype]) if path else base


class CheckpointModel:
    """A checkpoint folder (or the tiny preset), loaded through the public pipeline once per backend."""

    def __init__(
        self, checkpoint: Checkpoint, device: torch.device, dtype: str, context=None, stages: tuple[str, ...] = STAGES
    ):
        self.checkpoint, self.device, self.dtype, self.context = checkpoint, device, dtype, context
        self.stages = stages
        self.transformer_config, self.vae_config = checkpoint.transformer, checkpoint.vae
        self.name = str(checkpoint.folder)
        self.shared_block = SharedBlock(device, dtype)

    def unsupported(self, stage: str) -> str | None:
        return None

    def open(self, status: BackendStatus) -> Session:
        from ..runtime.pipeline import RuyiPipeline

        path = FAST_PATHS.get(status.name)
        pipeline = RuyiPipeline.from_pretrained(
            self.checkpoint, backend="torch" if path else status.name, device=str(self.device), dtype=self.dtype,
            memory_mode=path.memory_mode if path else "full_gpu", parallel=self.context.config if self.context else None,
        )  # fmt: skip
        comps = pipeline.components
        if path:
            comps.denoiser = wrap_denoiser(path, comps.denoiser, self.device, DTYPES[self.dtype])
        image_size, tokens, hidden = self.checkpoint.clip_geometry
        block = self.shared_block.denoiser(path) if BLOCK_STAGE in self.stages else None

        def close() -> None:
            comps.close()
            if block is not None:
                block.close()

        return Session(
            comps.image_encoder, comps.vae_encoder, comps.vae_decoder, comps.denoiser,
            clip_tokens=(tokens, hidden),
            clip_image_size=int(self.checkpoint.image_processor["crop_size"]["height"]),
            close=close, pipeline=pipeline, block=block,
        )  # fmt: skip


class ModuleDenoiser:
    """`model(**inputs)[0]` as a Denoiser, leaving the model where it is on close (it is shared)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs)[0]

    def start(self, num_calls: int) -> None:
        """Stateless."""

    def close(self) -> None:
        """The model outlives the session."""


class FullRandomModel:
    """The real architecture at full size with random weights, built directly on the device and shared by every
    backend. The VAE and the CLIP tower are built only when their stages are asked for; there is no control
    embedding file or scheduler config, so the whole run cannot be timed."""

    def __init__(self, device: torch.device, dtype: str, stages: tuple[str, ...], context=None):
        self.device, self.dtype, self.stages, self.context = device, dtype, stages, context
        self.transformer_config, self.vae_config = TransformerConfig.full(), VAEConfig.full()
        self.name = FULL_RANDOM
        self._modules: dict[str, torch.nn.Module] = {}
        self.shared_block = SharedBlock(device, dtype)

    def unsupported(self, stage: str) -> str | None:
        if stage == "run":
            return (
                f"{FULL_RANDOM} has no checkpoint (control embeddings, scheduler): time the whole run with --model PATH"
            )
        return None

    def _module(self, name: str) -> torch.nn.Module:
        from ..models import presets

        if name not in self._modules:
            build = {
                "transformer": presets.full_random_transformer,
                "vae": presets.full_random_vae,
                "image_encoder": presets.full_random_image_encoder,
            }[name]
            log.info("building the full-size %s with random weights on %s", name, self.device)
            self._modules[name] = build(device=self.device, dtype=DTYPES[self.dtype])
        return self._modules[name]

    def open(self, status: BackendStatus) -> Session:
        from ..runtime.backends.block_runner import BlockRunner

        path = FAST_PATHS.get(status.name)
        dtype = DTYPES[self.dtype]
        denoiser = close = None
        if "denoise" in self.stages:
            transformer = self._module("transformer")
            if path and path.memory_mode == "low_gpu":
                denoiser = BlockRunner(transformer, self.device, dtype, resident_blocks=0)
                close = lambda: transformer.to(self.device)  # put the streamed blocks back
            elif self.context is not None:
                from ..runtime.parallel import ParallelBlockRunner

                denoiser = ParallelBlockRunner(transformer, self.device, dtype, context=self.context)
            else:
                denoiser = ModuleDenoiser(transformer)
            if path:
                denoiser = wrap_denoiser(path, denoiser, self.device, dtype)
        vae = self._module("vae") if {"vae_encode", "vae_decode"} & set(self.stages) else None
        clip = self._module("image_encoder") if "image_encoder" in self.stages else None
        block = self.shared_block.denoiser(path) if BLOCK_STAGE in self.stages else None

        def close_session() -> None:
            if denoiser is not None and path:
                denoiser.close()  # undoes the fast path's changes; the shared modules stay
            if block is not None:
                block.close()
            if close is not None:
                close()

        config = self.transformer_config
        encode, decode = (lambda video: vae.encode(video).mean), (lambda latents: vae.decode(latents))
        if self.context is not None:
            from ..runtime.parallel import vae as spread

            encode = lambda video: spread.encode_moments(vae, video, self.context).chunk(2, dim=1)[0]
            decode = lambda latents: spread.decode(vae, latents, self.context)
        return Session(
            image_encoder=(lambda pixel_values: clip(pixel_values)) if clip is not None else None,
            vae_encoder=encode if vae is not None else None,
            vae_decoder=decode if vae is not None else None,
            denoiser=denoiser,
            clip_tokens=(576, config.projection_dim),
            clip_image_size=336,
            close=close_session,
            block=block,
        )


def open_model(spec: str, device: torch.device, dtype: str, stages: tuple[str, ...], context=None):
    """`tiny`, `full-random` or a checkpoint folder -> a model that opens one Session per backend
    (`context`: this rank's runtime.parallel.ParallelContext under --parallel)."""
    if spec == FULL_RANDOM:
        return FullRandomModel(device, dtype, stages, context)
    from ..models.checkpoint import Checkpoint

    return CheckpointModel(Checkpoint.resolve(spec, download=False), device, dtype, context, stages)


def denoiser_inputs(
    config: TransformerConfig,
    vae_config: VAEConfig,
    shape: Shape,
    clip_tokens: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    batch: int = CFG_BATCH,
) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Random transformer inputs of the CFG batch at `shape`, already on the device in the run dtype."""
    gen = torch.Generator().manual_seed(0)
    frames, height, width = latent_shape(vae_config, shape)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen).to(device, dtype)

    def ones(*size: int) -> torch.Tensor:
        return torch.ones(size, device=device, dtype=dtype)

    channels = vae_config.latent_channels
    cos, sin = rotary_embedding(height, width, config.patch_size, config.attention_head_dim)
    meta = torch.tensor([[1024.0, 1024.0, shape.height, shape.width, 0.0, 0.0]]).repeat(batch, 1)
    return {
        "hidden_states": randn(batch, channels, frames, height, width),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "encoder_hidden_states": randn(batch, config.text_len, config.cross_attention_dim),
        "text_embedding_mask": ones(batch, config.text_len),
        "encoder_hidden_states_t5": randn(batch, config.text_len_t5, config.cross_attention_dim_t5),
        "text_embedding_mask_t5": ones(batch, config.text_len_t5),
        "image_meta_size": meta.to(device, dtype),
        "style": torch.zeros(batch, dtype=torch.long, device=device),
        "image_rotary_emb": (cos.to(device), sin.to(device)),
        "inpaint_latents": randn(batch, config.in_channels - channels, frames, height, width),
        "clip_encoder_hidden_states": randn(batch, *clip_tokens),
        "clip_attention_mask": ones(batch, config.n_query),
    }


def latent_shape(vae_config: VAEConfig, shape: Shape) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width) of a video shape."""
    factor = vae_config.spatial_factor
    return vae_config.latent_frames(shape.frames), shape.height // factor, shape.width // factor


def stage_call(
    model, session: Session, stage: str, shape: Shape, steps: int, calls: int, block_tokens: int = 2048
) -> tuple[Callable[[], object], FlopCount | None]:
    """One timed call of `stage` at `shape` (inputs prepared here, outside the timing) and its transformer FLOPs.

    Raises LookupError with the reason when the session cannot run the stage.
    """
    device, dtype = model.device, DTYPES[model.dtype]
    if stage == BLOCK_STAGE and session.block is not None:
        inputs = block_inputs(block_tokens, device, dtype)
        return (lambda: session.block(**inputs)), block_flops(block_tokens)
    gen = torch.Generator().manual_seed(0)
    frames, latent_h, latent_w = latent_shape(model.vae_config, shape)
    step_flops = transformer_flops(model.transformer_config, frames, latent_h, latent_w, CFG_BATCH)
    if stage == "image_encoder" and session.image_encoder is not None:
        size = session.clip_image_size
        pixels = torch.randn((1, 3, size, size), generator=gen).to(device, dtype)
        return (lambda: session.image_encoder(pixel_values=pixels)), None
    if stage == "vae_encode" and session.vae_encoder is not None:
        video = (torch.rand((1, 3, shape.frames, shape.height, shape.width), generator=gen) * 2 - 1).to(device, dtype)
        return (lambda: session.vae_encoder(video=video)), None
    if stage == "vae_decode" and session.vae_decoder is not None:
        latents = torch.randn((1, model.vae_config.latent_channels, frames, latent_h, latent_w), generator=gen)
        latents = latents.to(device, dtype)
        return (lambda: session.vae_decoder(latents=latents)), None
    if stage == "denoise" and session.denoiser is not None:
        inputs = denoiser_inputs(model.transformer_config, model.vae_config, shape, session.clip_tokens, device, dtype)
        session.denoiser.start(calls)
        return (lambda: session.denoiser(**inputs)), step_flops
    if stage == "run" and session.pipeline is not None:
        return _run_call(session.pipeline, shape, steps), _scaled(step_flops, steps)
    raise LookupError(f"this session has no component for the {stage} stage")


def _scaled(flops: FlopCount, steps: int) -> FlopCount:
    return FlopCount(
        flops.linear * steps, flops.self_attention * steps, flops.cross_attention * steps, flops.tokens, flops.batch
    )


def _run_call(pipeline, shape: Shape, steps: int) -> Callable[[], object]:
    from ..testing import gradient_image

    image = gradient_image(shape.width, shape.height)
    return lambda: pipeline(image, frames=shape.frames, size=(shape.height, shape.width), steps=steps, seed=0,
                            progress=False)  # fmt: skip
