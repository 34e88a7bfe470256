"""FP8 weight storage, the reference's `fp8_quant_mode`: weights are stored as float8 and up-cast per call.

This saves device memory only; the maths stays in the run dtype (no scales, no FP8 GEMMs), exactly as
the reference's plain `module.to(float8)` under autocast. The modules are chosen by the reference's own rule
(predict_i2v.py, comfyui_nodes.py), which goes by class names; our modules carry the reference's class names
(`LayerNorm` vs `FP32LayerNorm`, torch's `NonDynamicallyQuantizableLinear` for the resampler's out_proj), so the
rule selects the same parameters. Modes (D = hidden size, 2816 in Ruyi-Mini-7B, which the reference hard-codes):
- lite: every module of class `Linear` with out*in > D^2 (144 layers in Ruyi-Mini-7B)
- strong: every module of class `Linear` with out*in >= D^2 (505 layers)
- extreme: every leaf module with parameters whose class is not Embedding, LayerNorm, Conv2d or
  NonDynamicallyQuantizableLinear (930 layers): the FP32LayerNorms are converted, the q/k norms, the resampler's
  norms and attention, the patch conv and the top-level parameters stay in the run dtype.
The storage dtype "auto" is the reference's default, float8_e4m3fn (its rule: e5m2 only when asked for).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

FP8_MODES = ("none", "lite", "strong", "extreme")
FP8_DTYPES = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_STORAGE_CHOICES = ("auto", *FP8_DTYPES)
EXTREME_SKIPPED_CLASSES = ("Embedding", "LayerNorm", "Conv2d", "NonDynamicallyQuantizableLinear")


def resolve_fp8_storage(storage: str) -> str:
    """"auto" -> "fp8_e4m3fn" (the reference's choice); the explicit names unchanged."""
    if storage not in FP8_STORAGE_CHOICES:
        raise ValueError(f"fp8_storage: {storage!r} is unknown; use one of {FP8_STORAGE_CHOICES}.")
    return "fp8_e4m3fn" if storage == "auto" else storage


class _StoredAs(nn.Module):
    """Parametrization: keep the tensor in `storage` dtype, hand it to forward in `compute` dtype."""

    def __init__(self, storage: torch.dtype, compute: torch.dtype):
        super().__init__()
        self.storage, self.compute = storage, compute

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.to(self.compute)

    def right_inverse(self, value: torch.Tensor) -> tuple[torch.Tensor]:
        return (value.to(self.storage),)  # a 1-tuple: torch only allows a dtype change for sequences


def selected_modules(model: nn.Module, mode: str, hidden_size: int) -> dict[str, nn.Module]:
    """The modules (by name) whose parameters `mode` stores in FP8: the reference's rule, verbatim."""
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 mode {mode!r} is unknown; use one of {FP8_MODES}.")
    named = dict(model.named_modules())
    if mode == "none":
        return {}
    if mode in ("lite", "strong"):
        threshold = hidden_size**2 - (1 if mode == "strong" else 0)
        return {
            name: m for name, m in named.items()
            if type(m).__name__ == "Linear" and m.weight.shape[0] * m.weight.shape[1] > threshold
        }  # fmt: skip
    return {
        name: m for name, m in named.items()
        if len(list(m.modules())) == 1 and list(m.named_parameters())
        and type(m).__name__ not in EXTREME_SKIPPED_CLASSES
    }  # fmt: skip


def store_weights_fp8(model: nn.Module, mode: str, hidden_size: int, storage: str = "auto") -> int:
    """Convert the selected modules' parameters to FP8 storage in place; returns how many modules changed."""
    dtype = FP8_DTYPES[resolve_fp8_storage(storage)]
    modules = selected_modules(model, mode, hidden_size)
    for module in modules.values():
        for name, param in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, _StoredAs(dtype, param.dtype))
    return len(modules)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, as stored."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
