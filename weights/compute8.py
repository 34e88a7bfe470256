"""8-bit compute for the transformer's linear layers: FP8 GEMMs through `torch._scaled_mm`, INT8 through torchao.

Unlike `fp8_storage` (the reference's storage-only FP8), the GEMMs themselves run in 8 bits:
- fp8: weights e4m3 with per-output-channel scales (or per tensor where a calibration says so); activations
  quantized at run time with the calibrated per-tensor `input_scale`, or per token (dynamic, amax of each row).
  `torch._scaled_mm` accumulates in fp32 and adds the bias. Needs compute capability >= 8.9 on a GPU; on CPU it
  runs (slowly), which is how it is tested.
- int8: torchao's int8 GEMMs (`torch._int_mm`; Ampere and newer, and CPU): dynamic per-token activations with
  per-channel weights, or with calibrated scales, SmoothQuant (x * s into W / s) and the static per-tensor
  `input_scale`.
Which layers: the token-wise linears of every block (calib.recipe, the set `ruyi-trt calibrate` quantizes), or
exactly the layers of a scales file (`ruyi-trt-scales/1`, read by calib.scales.read_scales).
Every function swaps modules and returns the originals, so a caller can put them back (`restore_modules`).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from ..calib.recipe import quantized_linears
from ..calib.scales import QMAX, Scales, ScalesError

log = logging.getLogger(__name__)

COMPUTE_MODES = ("none", "fp8", "int8")
FP8_MAX = QMAX["fp8"]


def token_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The recipe's linear layers of `model` (a RuyiTransformer3D), by module path (calib.recipe: the layers
    `ruyi-trt calibrate` quantizes)."""
    return dict(quantized_linears(model))


def _selected(model: nn.Module, scales: Scales | None) -> dict[str, nn.Linear]:
    if scales is None:
        return token_linears(model)
    modules = dict(model.named_modules())
    missing = [name for name in scales.layers if not isinstance(modules.get(name), nn.Linear)]
    if missing:
        raise ScalesError(f"{scales.path} names layers this model lacks or that are not linear ({missing[:3]}...); "
                         "it was calibrated for another architecture: re-run ruyi-trt calibrate.")  # fmt: skip
    return {name: modules[name] for name in scales.layers}


def _gemm_ready(layer: nn.Linear, device: torch.device) -> bool:
    """CUDA 8-bit GEMMs need both dims to be multiples of 16 (every full-size layer is; some tiny ones are not)."""
    return device.type != "cuda" or (layer.in_features % 16 == 0 and layer.out_features % 16 == 0)


class FP8Linear(nn.Module):
    """y = x W^T + b with an e4m3 GEMM: W stored e4m3 with weight_scale (0-d, or [out] per output channel);
    x quantized per call with the static `input_scale` (0-d) or, when None, per token (amax of each row)."""

    def __init__(self, linear: nn.Linear, input_scale: Tensor | None = None, per_channel: bool = True):
        super().__init__()
        weight = linear.weight.detach().float()
        amax = weight.abs().amax(dim=1) if per_channel else weight.abs().amax()
        scale = amax.clamp(min=1e-12) / FP8_MAX
        quantized = (weight / (scale[:, None] if per_channel else scale)).clamp(-FP8_MAX, FP8_MAX)
        self.register_buffer("weight", quantized.to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        device = weight.device
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()).to(device))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.input_scale is None:
            scale_a = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (M, 1)
        else:
            scale_a = self.input_scale
        quantized = (rows.float() / scale_a).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        scale_b = self.weight_scale
        rowwise = scale_a.ndim or scale_b.ndim
        if rowwise:  # _scaled_mm takes per-tensor pairs or per-row pairs: widen whichever is a scalar
            scale_a = scale_a.reshape(-1, 1).expand(rows.shape[0], 1).contiguous()
            scale_b = scale_b.reshape(1, -1).expand(1, self.out_features).contiguous()
        out_dtype = torch.bfloat16 if (x.is_cuda and rowwise) else x.dtype  # CUDA row-wise scaling writes bf16 only
        bias = self.bias.to(out_dtype) if self.bias is not None else None
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                               out_dtype=out_dtype)  # fmt: skip
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        activations = "dynamic per token" if self.input_scale is None else "static per tensor"
        weights = "per channel" if self.weight_scale.ndim else "per tensor"
        return f"in={self.in_features}, out={self.out_features}, e4m3 weights {weights}, activations {activations}"


class SmoothedInput(nn.Module):
    """SmoothQuant's activation side: inner(x * s), with 1/s already folded into inner's weight."""

    def __init__(self, inner: nn.Module, smooth: Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("smooth", smooth)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.smooth.to(x.dtype))


def _replace(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    originals = {}
    for name, new in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        originals[name] = getattr(parent, child)
        setattr(parent, child, new)
    return originals


def restore_modules(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Put back the modules a `use_*_compute` call replaced."""
    _replace(model, originals)


def use_fp8_compute(
    model: nn.Module, scales: Scales | None = None, device: torch.device | str | None = None
) -> dict[str, nn.Module]:
    """Swap the selected linears for `FP8Linear`s (calibrated: the file's layers with its static activation scales
    and its weight granularity, per channel or per tensor, recomputed from these weights by the format's rule so a
    merged LoRA is covered; else dynamic per-token activations with per-channel weights). `device`: where the GEMMs will run (default: where the weights
    are). Returns the replaced modules."""
    if scales is not None and scales.precision != "fp8":
        raise ValueError(f"{scales.path} holds {scales.precision} scales; --compute fp8 needs an fp8 calibration "
                         "(ruyi-trt calibrate --precision fp8).")  # fmt: skip
    replacements = {}
    for name, layer in _selected(model, scales).items():
        if not _gemm_ready(layer, torch.device(device) if device is not None else layer.weight.device):
            continue
        layer_scales = scales.layers[name] if scales is not None else None
        input_scale = layer_scales.input_scale if layer_scales is not None else None
        per_channel = layer_scales is None or layer_scales.per_channel  # as calibrated (the weights' own amax per row)
        replacements[name] = FP8Linear(layer, input_scale, per_channel=per_channel)
    log.info("fp8 compute: %d linear layers (%s scales)", len(replacements), "calibrated" if scales else "dynamic")
    return _replace(model, replacements)


def _torchao():
    """torchao's quantization API, without its import-time warnings about GPU extensions a CPU build lacks."""
    ao_log = logging.getLogger("torchao")
    level = ao_log.level
    ao_log.setLevel(logging.ERROR)
    try:
        from torchao import quantization
    except ImportError as exc:
        raise ImportError("--compute int8 needs torchao: pip install 'torchao>=0.12'") from exc
    finally:
        ao_log.setLevel(level)
    return quantization


def use_int8_compute(
    model: nn.Module, scales: Scales | None = None, device: torch.device | str | None = None
) -> dict[str, nn.Module]:
    """Swap the selected linears for torchao int8 linears (calibrated: SmoothQuant + static per-tensor activation
    scales, per-channel weights; else dynamic per-token activations). Returns the replaced modules."""
    if scales is not None and scales.precision != "int8":
        raise ValueError(f"{scales.path} holds {scales.precision} scales; --compute int8 needs an int8 calibration "
                         "(ruyi-trt calibrate --precision int8).")  # fmt: skip
    ao = _torchao()
    replacements = {}
    for name, layer in _selected(model, scales).items():
        if not _gemm_ready(layer, torch.device(device) if device is not None else layer.weight.device):
            continue
        new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                        device=layer.weight.device, dtype=layer.weight.dtype)  # fmt: skip
        weight = layer.weight.detach()
        layer_scales = scales.layers[name] if scales is not None else None
        smooth = layer_scales.smooth if layer_scales is not None else None
        if smooth is not None:
            smooth = smooth.to(weight.device)
            weight = (weight.float() / smooth[None, :]).to(weight.dtype)  # W_s = W / s
        new.weight.data.copy_(weight)
        if layer.bias is not None:
            new.bias.data.copy_(layer.bias.detach())
        if layer_scales is None:
            config = ao.Int8DynamicActivationInt8WeightConfig()
        else:  # block inputs are [B, N, D]: torchao wants a scale of the same rank
            act_scale = layer_scales.input_scale.reshape(1, 1, 1).to(weight.device)
            config = ao.Int8StaticActivationInt8WeightConfig(act_scale, granularity=[ao.PerTensor(), ao.PerRow()])
        ao.quantize_(new, config)
        replacements[name] = SmoothedInput(new, smooth) if smooth is not None else new
    log.info("int8 compute: %d linear layers (%s scales)", len(replacements), "calibrated" if scales else "dynamic")
    return _replace(model, replacements)


def use_8bit_compute(
    model: nn.Module, compute: str, scales: Scales | None = None, device: torch.device | str | None = None
) -> dict[str, nn.Module]:
    """`compute` "none" (nothing), "fp8" or "int8" on `model` for GEMMs on `device`; returns the replaced modules."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute: {compute!r} is not supported; use one of {COMPUTE_MODES}.")
    if compute == "none":
        if scales is not None:
            raise ValueError("a scales file was given without --compute fp8|int8; add one or drop the scales.")
        return {}
    return (use_fp8_compute if compute == "fp8" else use_int8_compute)(model, scales, device)
