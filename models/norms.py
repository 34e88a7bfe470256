"""LayerNorms with the precision the reference's have under CUDA autocast, written as explicit casts.

The reference runs bf16 weights under `torch.autocast`, which computes every layer_norm in float32 and returns
float32. Its own `FP32LayerNorm` casts that result back to the input dtype; its plain `nn.LayerNorm`s (the q/k
norms, the CLIP resampler's ln_q/ln_kv, norm_out's norm, CLIP's own norms) hand the float32 result on. The
classes keep the reference's class names, which FP8 "extreme" selection goes by (weights/fp8_storage.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def layer_norm_fp32(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """`norm` applied in float32 (input, weight and bias upcast), as CUDA autocast runs layer_norm: float32 out."""
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


class FP32LayerNorm(nn.LayerNorm):
    """The reference's FP32LayerNorm: computed in float32, cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_fp32(self, x).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """Where the reference has a plain nn.LayerNorm: computed in float32 and returned in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_fp32(self, x)
