"""The backend protocol and the PyTorch backend.

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
from torch import nn

from ..models.image_encoder import CLIPImageEncoder
from ..models.vae import RuyiVAE


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


class ModuleOffload:
    """Keeps a module on `home` between calls and moves it to `device` for each call (normal mode).

    With `home == device` it does nothing, which is the default on a GPU with room and on CPU.
    """

    def __init__(self, module: nn.Module, device: torch.device, home: torch.device):
        self.module, self.device, self.home = module, device, home
        module.to(home)

    def __enter__(self) -> nn.Module:
        if self.home != self.device:
            self.module.to(self.device)
        return self.module

    def __exit__(self, *exc: object) -> None:
        if self.home != self.device:
            self.module.to(self.home)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


class TorchBackend:
    """Calls `fn(module, **inputs)` with inputs moved to the module's device and floating inputs cast to `dtype`."""

    def __init__(self, module: nn.Module, fn, device: torch.device, dtype: torch.dtype, home: torch.device | None = None):
        self.offload = ModuleOffload(module, device, home or device)
        self.fn, self.device, self.dtype = fn, device, dtype

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        prepared = move_inputs(inputs, self.device, self.dtype)
        with self.offload as module:
            return self.fn(module, **prepared)

    def start(self, num_calls: int) -> None:
        """Stateless: nothing to reset between runs."""

    def close(self) -> None:
        self.offload.module.to("cpu")


def _encode_moments(vae: RuyiVAE, video: torch.Tensor) -> torch.Tensor:
    posterior = vae.encode(video)
    return torch.cat([posterior.mean, posterior.logvar], dim=1)


def _decode(vae: RuyiVAE, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents)


def _denoise(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


def _encode_image(encoder: CLIPImageEncoder, pixel_values: torch.Tensor) -> torch.Tensor:
    return encoder(pixel_values)


def torch_components(
    transformer: nn.Module,
    vae: RuyiVAE,
    image_encoder: CLIPImageEncoder,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    offload_models: bool = False,
    denoiser: Denoiser | None = None,
) -> Components:
    """PyTorch backends over loaded modules (already in their run dtype).

    `offload_models` keeps each model on the CPU between uses (the reference's normal_mode).
    `denoiser` replaces the plain transformer call (e.g. a block runner with offload or TeaCache).
    """
    device = torch.device(device)
    home = torch.device("cpu") if offload_models else device
    return Components(
        image_encoder=TorchBackend(image_encoder, _encode_image, device, dtype, home),
        vae_encoder=TorchBackend(vae, _encode_moments, device, dtype, home),
        vae_decoder=TorchBackend(vae, _decode, device, dtype, home),
        denoiser=denoiser or TorchBackend(transformer, _denoise, device, dtype, home),
        device=device,
        dtype=dtype,
    )

