"""The backend protocol: what the pipeline calls, whatever runs it.

The pipeline calls four components, each a `Backend`: named tensors in, one tensor out.
- `image_encoder(pixel_values)` -> CLIP patch tokens [B, N, C]
- `vae_encoder(video)` -> posterior moments [B, 2*latent_channels, T, h, w] (mean | logvar)
- `vae_decoder(latents)` -> video [B, 3, F, H, W] in about [-1, 1]
- `denoiser(**transformer inputs)` -> transformer output [B, out_channels, T, h, w]
Torch, ONNX Runtime and TensorRT each provide these four; the pipeline never checks which it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch


class Backend(Protocol):
    """Anything that maps named tensors to one tensor and can be closed."""

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


class Denoiser(Backend, Protocol):
    """A backend for the transformer; `start` is called once per run with the number of calls to come."""

    def start(self, num_calls: int) -> None: ...


@dataclass
class Components:
    """The four backends of one pipeline, plus the facts the pipeline needs about their models."""

    image_encoder: Backend
    vae_encoder: Backend
    vae_decoder: Backend
    denoiser: Denoiser
    device: torch.device
    dtype: torch.dtype

    def close(self) -> None:
        for backend in (self.image_encoder, self.vae_encoder, self.vae_decoder, self.denoiser):
            backend.close()


def move_inputs(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs on `device`, floating tensors cast to `dtype`; tuples (the RoPE (cos, sin) tables) stay float32,
    as in the reference."""

    def move(value):
        if isinstance(value, tuple):
            return tuple(v.to(device) for v in value)
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            return value.to(dtype) if value.is_floating_point() else value
        return value

    return {name: move(value) for name, value in inputs.items()}


class CallableBackend:
    """A component backend made of a function over prepared graphs or engines (ONNX Runtime, TensorRT):
    `fn(**inputs)`; `release()` frees what it holds on close."""

    def __init__(self, fn: Callable[..., torch.Tensor], release: Callable[[], None]):
        self.fn, self.release = fn, release

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.fn(**inputs)

    def start(self, num_calls: int) -> None:
        """Stateless: nothing to reset between runs."""

    def close(self) -> None:
        self.release()
