"""The torch backend's fast compute, applied to a loaded RuyiTransformer3D and undoable:

- compute "fp8" | "int8": 8-bit GEMMs in the blocks' token-wise linears (weights/compute8.py), with the scales of
  `ruyi-trt calibrate` (a scales.safetensors file or its folder) or dynamic per-token scales without one;
- attention "fp8" | "fp8-full": the self-attention of every block through the Triton FP8 kernel
  (kernels/fp8_attention.py; "fp8": Q.K^T in e4m3, P.V in the run dtype; "fp8-full": P.V in e4m3 too), plugged
  into `Attention.attention_fn`; the text and CLIP cross-attentions (333 / 16 keys) stay on SDPA;
- fused_kernels: norm1 (LayerNorm + adaLN shift), QK-norm + RoPE and the FFN's GELU-tanh as fused Triton kernels.
The kernels need a CUDA GPU (FP8: compute capability >= 8.9); on CPU they run only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...kernels.triton_support import fp8_supported, interpreting, kernel_unavailable_reason
from ...models.transformer_blocks import AdaLayerNormShift, Attention, AttentionFn, GELUProjection
from ...weights.compute8 import (
    COMPUTE_MODES,
    CalibratedScales,
    ScalesError,
    read_scales_file,
    restore_modules,
    scales_file,
    use_8bit_compute,
)

log = logging.getLogger(__name__)

ATTENTION_MODES = ("sdpa", "fp8", "fp8-full")
_PV = {"fp8": None, "fp8-full": "e4m3"}  # None: P.V in the run dtype (fp16/bf16)


@dataclass(frozen=True)
class FastCompute:
    """What to change in the transformer; the defaults change nothing."""

    compute: str = "none"
    attention: str = "sdpa"
    scales: str | None = None  # a scales.safetensors file (or its folder) for compute fp8/int8; None: dynamic
    fused_kernels: bool = False

    @property
    def active(self) -> bool:
        return self.compute != "none" or self.attention != "sdpa" or self.fused_kernels

    def validate(self) -> None:
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute: {self.compute!r} is not supported; use one of {COMPUTE_MODES}.")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention: {self.attention!r} is not supported; use one of {ATTENTION_MODES}.")
        if self.scales is not None and self.compute == "none":
            raise ValueError("scales: a scales file applies to --compute fp8|int8; add one or drop --scales.")
        if self.scales is not None and not scales_file(self.scales).is_file():
            raise ScalesError(f"scales: {scales_file(self.scales)} does not exist; make it with `ruyi-trt calibrate "
                              "--precision fp8|int8 --out DIR`, or drop --scales for dynamic scales.")  # fmt: skip

    def unavailable_reason(self, device: torch.device | str) -> str | None:
        """None when everything asked for can run on `device`, else why not and what to use instead."""
        device = torch.device(device)
        if self.compute == "fp8" and device.type == "cuda" and not fp8_supported(device):
            return ("compute fp8: FP8 GEMMs need compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                    "use --compute int8 on this GPU.")  # fmt: skip
        if self.compute == "int8" and importlib.util.find_spec("torchao") is None:
            return "compute int8 needs torchao: pip install 'torchao>=0.12'"
        if self.attention != "sdpa" or self.fused_kernels:
            what = f"attention {self.attention}" if self.attention != "sdpa" else "fused kernels"
            reason = kernel_unavailable_reason(device)
            if reason:
                return f"{what}: {reason}"
            if self.attention != "sdpa" and not fp8_supported(device):
                return f"{what}: the FP8 kernel needs compute capability >= 8.9; use --attention sdpa."
        return None


def fp8_self_attention(pv: str | None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The FP8 kernel as an `Attention.attention_fn` (imported here: only when asked for, Triton is optional)."""
    from ...kernels.fp8_attention import fp8_attention

    return functools.partial(fp8_attention, pv=pv)


def _fused_norm1(self: AdaLayerNormShift, x: Tensor, temb: Tensor) -> Tensor:
    from ...kernels.layernorm_shift import layernorm_shift

    shift = self.linear(F.silu(temb.float()).to(temb.dtype))
    return layernorm_shift(x, self.norm.weight, self.norm.bias, shift, self.norm.eps)


def _fused_gelu_projection(self: GELUProjection, x: Tensor) -> Tensor:
    from ...kernels.gelu_tanh import gelu_tanh

    return gelu_tanh(self.proj(x))


def _fused_attention(self: Attention, x: Tensor, context: Tensor | None, cos: Tensor, sin: Tensor,
                     enhance_weight: float | None = None, num_frames: int = 1,
                     attend: AttentionFn | None = None) -> Tensor:  # fmt: skip
    """Attention.forward with the QK LayerNorm and RoPE fused into one kernel per tensor (same maths, fp32 inside).
    Enhance-A-Video needs q and k between the norm and the rotation: those calls take the model's own forward."""
    from ...kernels.qk_norm_rope import qk_norm_rope

    if enhance_weight is not None:
        return type(self).forward(self, x, context, cos, sin, enhance_weight, num_frames, attend)
    context = x if context is None else context
    batch = x.shape[0]
    q = qk_norm_rope(self.to_q(x), self.heads, self.norm_q.weight, self.norm_q.bias, self.norm_q.eps, cos, sin)
    key_tables = (cos, sin) if self.rotate_keys else (None, None)
    k = qk_norm_rope(self.to_k(context), self.heads, self.norm_k.weight, self.norm_k.bias, self.norm_k.eps, *key_tables)
    v = self.to_v(context).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, L, d)
    out = (attend or self.attention_fn)(q, k, v)  # (B, H, N, d); attend: sequence parallelism
    return self.to_out[0](out.transpose(1, 2).reshape(batch, -1, self.heads * self.head_dim))


_FUSED_FORWARDS = {AdaLayerNormShift: _fused_norm1, Attention: _fused_attention}


def _use_fused_kernels(model: nn.Module) -> list[nn.Module]:
    """Bind the fused forwards as instance attributes (the class forwards stay); returns the patched modules."""
    patched = []
    for module in model.blocks.modules():
        fused = _FUSED_FORWARDS.get(type(module))
        if type(module) is GELUProjection and module.approximate == "tanh":
            fused = _fused_gelu_projection
        if fused is not None:
            module.forward = types.MethodType(fused, module)
            patched.append(module)
    return patched


def resolve_scales(settings: FastCompute, checkpoint_hash: str | None) -> CalibratedScales | None:
    """Read the scales file of `settings` and refuse one made for another checkpoint."""
    if settings.scales is None:
        return None
    scales = read_scales_file(settings.scales)
    if checkpoint_hash and scales.checkpoint_hash and scales.checkpoint_hash != checkpoint_hash:
        raise ScalesError(f"{scales.path} was calibrated for another checkpoint ({scales.checkpoint_hash[:19]}..., "
                         f"this one is {checkpoint_hash[:19]}...); re-run ruyi-trt calibrate for this model.")  # fmt: skip
    return scales


def apply_fast_compute(
    model: nn.Module, settings: FastCompute, device: torch.device | str, checkpoint_hash: str | None = None
) -> Callable[[], None]:
    """Change `model` as `settings` asks, for running on `device` (the model may still be on the host); returns a
    function that undoes it. Raises ValueError/RuntimeError with the reason when something asked for cannot run on `device`."""
    settings.validate()
    if not settings.active:
        return lambda: None
    reason = settings.unavailable_reason(device)
    if reason:
        raise RuntimeError(reason)
    if torch.device(device).type == "cpu" and settings.compute == "fp8":
        log.warning("compute fp8 on CPU: torch._scaled_mm emulates FP8 (numerically right, slower than fp32)")
    if interpreting() and (settings.attention != "sdpa" or settings.fused_kernels):
        log.warning("Triton kernels under TRITON_INTERPRET=1: correct but ~40x slower than torch")
    originals = use_8bit_compute(model, settings.compute, resolve_scales(settings, checkpoint_hash), device)
    attentions = []
    if settings.attention != "sdpa":
        attention_fn = fp8_self_attention(_PV[settings.attention])
        for block in model.blocks:
            block.attn1.attention_fn = attention_fn
            attentions.append(block.attn1)
    patched = _use_fused_kernels(model) if settings.fused_kernels else []

    def undo() -> None:
        for module in patched:
            del module.forward
        for attention in attentions:
            attention.attention_fn = F.scaled_dot_product_attention
        restore_modules(model, originals)

    return undo
