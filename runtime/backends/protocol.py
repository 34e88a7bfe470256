"""The backend protocol: what the pipeline calls, whatever runs it.

The pipeline calls four components, each a `Backend`: named tensors in, one tensor out.
- `image_encoder(pixel_values)` -> CLIP patch tokens [B, N, C]
- `vae_encoder(video)` -> posterior moments [B, 2*latent_channels, T, h, w] (mean | logvar)
- `vae_decoder(latents)` -> video [B, 3, F, H, W] in about [-1, 1]
- `denoiser(**transformer inputs)` -> transformer output [B, out_channels, T, h, w]
Torch, ONNX Runtime and TensorRT each provide these four; the pipeline never checks which it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


class Backend(Protocol):
    """Anything that maps named tensors to one tensor and can be closed."""

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


class Denoiser(Backend, Protocol):
    """A backend for the transformer; `start` is called once per run with the number of calls to come and the
    number of steps (PNDM makes more calls than steps)."""

    def start(self, num_calls: int, num_steps: int | None = None) -> None: ...


COMPONENT_NAMES = ("image_encoder", "vae", "transformer")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Components:
    """The four backends of one pipeline, plus the facts the pipeline needs about their models.

    `precision` says, per model (image_encoder, vae, transformer), what it computes in, e.g. "bf16" or
    "bf16, fp8 lite weights"; models it does not name run in `dtype`."""

    image_encoder: Backend
    vae_encoder: Backend
    vae_decoder: Backend
    denoiser: Denoiser
    device: torch.device
    dtype: torch.dtype
    precision: dict[str, str] = field(default_factory=dict)

    def precisions(self) -> dict[str, str]:
        """The precision of every model, by name."""
        return {name: self.precision.get(name, DTYPE_NAMES[self.dtype]) for name in COMPONENT_NAMES}

    def close(self) -> None:
        for backend in (self.image_encoder, self.vae_encoder, self.vae_decoder, self.denoiser):
            backend.close()


# Denoiser inputs that keep the dtype the pipeline gives them, because the reference reads them before any cast:
# the timestep (already rounded to the latents' dtype, exact otherwise), the T5 embeddings (its pooler averages
# them in their stored dtype) and the CLIP tokens (float32, normalized unrounded by the resampler's ln_kv).
KEPT_DTYPE_INPUTS = frozenset({"timestep", "encoder_hidden_states_t5", "clip_encoder_hidden_states"})


def move_inputs(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs on `device`, floating tensors cast to `dtype` except `KEPT_DTYPE_INPUTS`; tuples (the RoPE
    (cos, sin) tables) stay float32, as in the reference."""

    def move(name, value):
        if isinstance(value, tuple):
            return tuple(v.to(device) for v in value)
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            return value.to(dtype) if value.is_floating_point() and name not in KEPT_DTYPE_INPUTS else value
        return value

    return {name: move(name, value) for name, value in inputs.items()}


class CallableBackend:
    """A component backend made of a function over prepared graphs or engines (ONNX Runtime, TensorRT):
    `fn(**inputs)`; `release()` frees what it holds on close."""

    def __init__(self, fn: Callable[..., torch.Tensor], release: Callable[[], None]):
        self.fn, self.release = fn, release

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(**inputs)

    def start(self, num_calls: int, num_steps: int | None = None) -> None:
        """Stateless: nothing to reset between runs."""

    def close(self) -> None:
        self.release()
