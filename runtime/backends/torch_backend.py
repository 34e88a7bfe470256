"""The PyTorch backend: the four components over loaded modules, optionally kept on the host between uses."""

from __future__ import annotations

import torch
from torch import nn

from ...models.image_encoder import CLIPImageEncoder
from ...models.vae import RuyiVAE
from .protocol import Components, Denoiser, move_inputs


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

    def start(self, num_calls: int, num_steps: int | None = None) -> None:
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

