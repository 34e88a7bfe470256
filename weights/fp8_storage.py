"""FP8 weight storage, the reference's `fp8_quant_mode`: weights are stored as float8 and up-cast per call.

This saves device memory only; the maths stays in the run dtype (no scales, no FP8 GEMMs), exactly as
the reference's plain `module.to(float8)` under autocast. Modes (D = hidden size, 2816 in Ruyi-Mini-7B):
- lite: every nn.Linear with out*in > D^2
- strong: every nn.Linear with out*in >= D^2
- extreme: every leaf module with parameters except embeddings, the patch Conv2d, the plain (qk) LayerNorms
  and the Resampler's attention; our FP32 LayerNorms are included, as in the reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

FP8_MODES = ("none", "lite", "strong", "extreme")
FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


class _StoredAs(nn.Module):
    """Parametrization: keep the tensor in `storage` dtype, hand it to forward in `compute` dtype."""

    def __init__(self, storage: torch.dtype, compute: torch.dtype):
        super().__init__()
        self.storage, self.compute = storage, compute

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.compute)

    def right_inverse(self, value: torch.Tensor) -> tuple[torch.Tensor]:
        return (value.to(self.storage),)  # a 1-tuple: torch only allows a dtype change for sequences


def _selected(model: nn.Module, mode: str, hidden_size: int) -> list[nn.Module]:
    if mode in ("lite", "strong"):
        threshold = hidden_size**2 - (1 if mode == "strong" else 0)
        return [
            m for m in model.modules()
            if type(m) is nn.Linear and m.weight.shape[0] * m.weight.shape[1] > threshold
        ]
    excluded = (nn.Embedding, nn.Conv2d, nn.MultiheadAttention)
    resampler = {id(m) for name, m in model.named_modules() if name.startswith("clip_projection")}
    return [
        m for m in model.modules()
        if not list(m.children()) and list(m.parameters(recurse=False))
        and not isinstance(m, excluded) and type(m) is not nn.LayerNorm and id(m) not in resampler
    ]


def store_weights_fp8(model: nn.Module, mode: str, hidden_size: int, storage: str = "fp8_e4m3fn") -> int:
    """Convert the selected modules' parameters to FP8 storage in place; returns how many modules changed."""
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 mode {mode!r} is unknown; use one of {FP8_MODES}.")
    if storage not in FP8_DTYPES:
        raise ValueError(f"fp8 storage {storage!r} is unknown; use one of {tuple(FP8_DTYPES)}.")
    if mode == "none":
        return 0
    modules = _selected(model, mode, hidden_size)
    for module in modules:
        for name, param in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, _StoredAs(FP8_DTYPES[storage], param.dtype))
    return len(modules)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, as stored."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
