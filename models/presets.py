"""Model presets with random weights: `tiny` (a whole checkpoint folder, for tests and the CPU demo)
and `full-random` (the real Ruyi-Mini-7B architecture, built lazily on the meta device, for GPU benchmarks).

Random weights follow one deterministic recipe (the golden files' recipe): matrices N(0,1)/sqrt(fan_in),
1-D norm weights 1 + 0.1 N(0,1), biases and other vectors 0.1 N(0,1), so no branch is zero.
Fixed tables (the temporal sin-cos PE, the Resampler's 2-D sin-cos) keep their computed values.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_folder, file_lock
from .checkpoint_io import config_to_dict, save_component
from .control_embeddings import make_random_control_embeddings, save_control_embeddings
from .image_encoder import CLIPImageEncoder, build_random_image_encoder
from .transformer import RuyiTransformer3D, TransformerConfig, computed_state
from .vae import RuyiVAE
from .vae_config import VAEConfig

TINY_VERSION = "tiny-v1"
TINY_SEED = 0
# CLIP tower of the tiny preset: 56 px crops in 14 px patches -> 4 x 4 = 16 tokens.
TINY_CLIP = {"image_size": 56, "patch_size": 14, "num_layers": 2, "num_heads": 2}


def cache_root() -> Path:
    """Where built artifacts live: $RUYI_TRT_CACHE, else ~/.cache/ruyi-trt (never the current directory)."""
    return Path(os.environ.get("RUYI_TRT_CACHE", Path.home() / ".cache" / "ruyi-trt"))


def randomize_(module: nn.Module, seed: int, keep: set[str] = frozenset()) -> nn.Module:
    """Overwrite every floating parameter and buffer of `module`, except the names in `keep`, in place.

    Each tensor draws from its own generator on its own device (fast for multi-GB models on a GPU),
    seeded from `seed` and the tensor's position, so the result does not depend on the device.
    """
    with torch.no_grad():
        for index, (name, tensor) in enumerate(list(module.named_parameters()) + list(module.named_buffers())):
            if name in keep or not tensor.is_floating_point():
                continue
            gen = torch.Generator(device=tensor.device).manual_seed(seed * 100_003 + index)
            value = torch.randn(tensor.shape, generator=gen, device=tensor.device, dtype=torch.float32)
            if tensor.ndim >= 2:
                value /= tensor[0].numel() ** 0.5
            elif name.endswith("weight") and "norm" in name:
                value = 1 + 0.1 * value
            else:
                value *= 0.1
            tensor.copy_(value.to(tensor.dtype))
    return module


def tiny_transformer(seed: int = TINY_SEED) -> RuyiTransformer3D:
    """The tiny transformer with deterministic random weights."""
    config = TransformerConfig.tiny()
    model = RuyiTransformer3D.from_config(config_to_dict(config))
    return randomize_(model, seed, keep=set(computed_state(config))).eval().requires_grad_(False)


def tiny_vae(seed: int = TINY_SEED) -> RuyiVAE:
    """The tiny VAE with deterministic random weights."""
    model = RuyiVAE.from_config(config_to_dict(VAEConfig.tiny()))
    return randomize_(model, seed + 1).eval().requires_grad_(False)


def write_tiny_checkpoint(folder: str | Path, seed: int = TINY_SEED) -> Path:
    """Write a complete checkpoint folder of the real layout with tiny random models."""
    from .scheduler import default_scheduler_config  # diffusers: not needed by the full-random builders

    folder = Path(folder)
    transformer = tiny_transformer(seed)
    tcfg = transformer.config
    save_component(folder / "transformer", config_to_dict(tcfg), transformer.state_dict())
    vae = tiny_vae(seed)
    save_component(folder / "vae", config_to_dict(vae.config), vae.state_dict())
    clip = build_random_image_encoder(hidden_size=tcfg.projection_dim, seed=seed + 2, **TINY_CLIP)
    clip.save_pretrained(folder / "image_encoder")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(default_scheduler_config(), indent=2))
    embeddings = make_random_control_embeddings(
        text_len=tcfg.text_len,
        dim1=tcfg.cross_attention_dim,
        text_len_t5=tcfg.text_len_t5,
        dim2=tcfg.cross_attention_dim_t5,
        seed=seed + 3,
    )
    save_control_embeddings(folder / "embeddings.safetensors", embeddings)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "RuyiInpaintPipeline", "preset": TINY_VERSION}))
    return folder


def tiny_checkpoint_dir(root: Path | None = None, seed: int = TINY_SEED) -> Path:
    """The tiny checkpoint folder in the cache, built on first use (atomically, under a lock: a second process
    waits for the first one's folder)."""
    target = (root or cache_root()) / f"{TINY_VERSION}-seed{seed}"
    if (target / "model_index.json").is_file():
        return target
    with file_lock(target):
        if not (target / "model_index.json").is_file():
            atomic_folder(target, lambda tmp: write_tiny_checkpoint(tmp, seed), replace=True)
    return target


def full_random_transformer(
    device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> RuyiTransformer3D:
    """The full Ruyi-Mini-7B transformer with random weights.

    On the meta device (the default) it costs no memory; pass a real device to materialize it there
    directly (about 14.4 GB in bf16), without ever holding it on the host.
    """
    config = TransformerConfig.full()
    with torch.device("meta"):
        model = RuyiTransformer3D.from_config(config_to_dict(config))
    model = model.to(dtype=dtype)
    if str(device) == "meta":
        return model.eval().requires_grad_(False)
    model = model.to_empty(device=device)
    fixed = computed_state(config)
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, value in fixed.items():
            state[name].copy_(value.to(dtype=state[name].dtype))
    return randomize_(model, seed, keep=set(fixed)).eval().requires_grad_(False)


# CLIP ViT-L/14 at 336 px, vision tower only (architecture doc section 4): 24 x 24 = 576 tokens of width 1024,
# as image_encoder/config.json would say it
FULL_CLIP_CONFIG = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                    "projection_dim": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336,
                    "patch_size": 14, "hidden_act": "quick_gelu"}  # fmt: skip


def full_random_vae(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 1) -> RuyiVAE:
    """The full-size VAE (VAEConfig.full()) with random weights, materialized directly on `device`."""
    with torch.device("meta"):
        model = RuyiVAE.from_config(config_to_dict(VAEConfig.full()))
    model = model.to(dtype=dtype).to_empty(device=device)
    return randomize_(model, seed).eval().requires_grad_(False)


def full_random_image_encoder(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 2
) -> CLIPImageEncoder:
    """The full-size CLIP image encoder (ViT-L/14-336, vision tower only) with random weights on `device`."""
    clip = FULL_CLIP_CONFIG
    encoder = build_random_image_encoder(
        hidden_size=clip["hidden_size"], image_size=clip["image_size"], patch_size=clip["patch_size"],
        num_layers=clip["num_hidden_layers"], num_heads=clip["num_attention_heads"], seed=seed,
    )  # fmt: skip
    return encoder.to(device=device, dtype=dtype)
