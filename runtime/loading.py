"""`load_pipeline`: a checkpoint folder + runtime options -> a ready `RuyiPipeline` on the chosen backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.checkpoint import read_config
from ..models.control_embeddings import load_control_embeddings
from ..models.image_encoder import CLIPImageEncoder
from ..models.transformer import RuyiTransformer3D
from ..models.vae import RuyiVAE
from .backends import torch_components
from .block_runner import BlockRunner, TeaCacheSettings
from .fp8 import FP8_DTYPES, FP8_MODES, store_weights_fp8
from .lora import load_lora, merge_lora
from .pipeline import RuyiPipeline

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch",)
MEMORY_MODES = ("normal", "low_gpu", "full_gpu")


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: backend, device, dtype and the reference's memory/speed options.

    memory_mode: full_gpu keeps every model on the device; normal moves each model to the device only
    while it runs (the reference's normal_mode); low_gpu also streams transformer blocks one at a time
    (the reference's sequential offload, block-granular). offload_steps is the reference's
    GPU_offload_steps (long-skip activations moved to the host in groups of k; 0 keeps them on device).
    """

    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "fp32"
    memory_mode: str = "full_gpu"
    offload_steps: int = 0
    fp8: str = "none"
    fp8_storage: str = "fp8_e4m3fn"
    teacache_threshold: float | None = None
    lora: str | None = None
    lora_strength: float = 1.0

    def validate(self) -> None:
        choices = {
            "backend": (self.backend, BACKENDS),
            "dtype": (self.dtype, tuple(DTYPES)),
            "memory_mode": (self.memory_mode, MEMORY_MODES),
            "fp8": (self.fp8, FP8_MODES),
            "fp8_storage": (self.fp8_storage, tuple(FP8_DTYPES)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not supported; use one of {allowed}.")
        if self.offload_steps < 0:
            raise ValueError(f"offload_steps: {self.offload_steps} must be >= 0.")
        if self.teacache_threshold is not None and not 0.0 < self.teacache_threshold <= 1.0:
            raise ValueError(f"teacache_threshold: {self.teacache_threshold} must be within (0, 1].")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA GPU is visible; use --device cpu.")


def load_pipeline(folder: str | Path, options: RuntimeOptions = RuntimeOptions()) -> RuyiPipeline:
    """Load every component of the checkpoint in `folder` and wrap it for `options.backend`."""
    options.validate()
    folder = Path(folder)
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    on_gpu = device.type == "cuda"
    # Models are loaded to the host first whenever something stays there between uses.
    load_device = device if (on_gpu and options.memory_mode == "full_gpu") else torch.device("cpu")

    transformer = RuyiTransformer3D.from_pretrained(folder / "transformer", dtype=dtype, device=load_device)
    vae = RuyiVAE.from_pretrained(folder / "vae", dtype=dtype, device=load_device)
    image_encoder = CLIPImageEncoder.from_pretrained(folder / "image_encoder", dtype=dtype, device=load_device)
    if options.lora:
        merged = merge_lora(transformer, load_lora(options.lora), options.lora_strength)
        log.info("LoRA %s merged into %d layers (strength %s)", options.lora, len(merged), options.lora_strength)
    if options.fp8 != "none":
        count = store_weights_fp8(transformer, options.fp8, transformer.config.hidden_size, options.fp8_storage)
        log.info("FP8 (%s, %s): %d transformer layers stored in fp8", options.fp8, options.fp8_storage, count)

    denoiser = BlockRunner(
        transformer,
        device=device,
        dtype=dtype,
        stream_blocks=options.memory_mode == "low_gpu",
        skip_offload_group=options.offload_steps,
        teacache=TeaCacheSettings(threshold=options.teacache_threshold) if options.teacache_threshold else None,
    )
    components = torch_components(
        transformer, vae, image_encoder, device=device, dtype=dtype,
        offload_models=on_gpu and options.memory_mode != "full_gpu", denoiser=denoiser,
    )
    scheduler_config = read_config(folder / "scheduler", "scheduler_config.json")
    return RuyiPipeline(
        components=components,
        transformer_config=transformer.config,
        vae_config=vae.config,
        embeddings=load_control_embeddings(folder / "embeddings.safetensors"),
        scheduler_config=scheduler_config,
        clip_processor_config=image_encoder.processor_config,
        clip_tokens=(image_encoder.num_tokens, image_encoder.hidden_size),
    )

