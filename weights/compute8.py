"""8-bit compute for the transformer's linear layers: FP8 GEMMs through `torch._scaled_mm`, INT8 through torchao.

Unlike `fp8_storage` (the reference's storage-only FP8), the GEMMs themselves run in 8 bits:
- fp8: weights e4m3 with a per-tensor scale (calibrated) or per-output-channel scales (dynamic); activations
  quantized at run time with the calibrated per-tensor `input_scale`, or per token (dynamic, amax of each row).
  `torch._scaled_mm` accumulates in fp32 and adds the bias. Needs compute capability >= 8.9 on a GPU; on CPU it
  runs (slowly), which is how it is tested.
- int8: torchao's int8 GEMMs (`torch._int_mm`; Ampere and newer, and CPU): dynamic per-token activations with
  per-channel weights, or with calibrated scales, SmoothQuant (x * s into W / s) and the static per-tensor
  `input_scale`.
Which layers: the token-wise linears of every block (the calibration recipe's set), or exactly the layers of a
scales file. Scales files follow `ruyi-trt-scales/1` (written by `ruyi-trt calibrate`, calib/).
Every function swaps modules and returns the originals, so a caller can put them back (`restore_modules`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

COMPUTE_MODES = ("none", "fp8", "int8")
SCALES_FORMAT = "ruyi-trt-scales/1"
SCALES_NAME = "scales.safetensors"
FP8_MAX = 448.0
# The recipe's layers inside each block (calib/ quantizes the same set): every token goes through them.
TOKEN_LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
    "attn_clip.to_q", "attn_clip.to_out.0", "gate_clip.proj", "ff.net.0.proj", "ff.net.2", "skip_linear",
)  # fmt: skip
_BLOCK_LAYER = re.compile(r"^blocks\.\d+\.(.+)$")


class ScalesError(ValueError):
    """A scales file that is missing, unreadable, of another format, or for another model."""


def scales_file(path: str | Path) -> Path:
    """The scales file a `--scales` argument names: the file itself, or DIR/scales.safetensors."""
    path = Path(path)
    return path / SCALES_NAME if path.is_dir() else path


@dataclass(frozen=True)
class LayerScales:
    """One layer's calibrated scales (float32): input_scale 0-d, weight_scale 0-d or [out], smooth [in] or None."""

    input_scale: Tensor
    weight_scale: Tensor
    smooth: Tensor | None = None


@dataclass(frozen=True)
class CalibratedScales:
    """A scales file: precision ("fp8" or "int8"), per-layer scales, and the checkpoint hash it was made for."""

    precision: str
    layers: dict[str, LayerScales]
    checkpoint_hash: str
    path: Path


def read_scales_file(path: str | Path) -> CalibratedScales:
    """Read `path` (a scales.safetensors file, or the folder holding one); clear errors for anything else."""
    from safetensors import SafetensorError, safe_open

    path = scales_file(path)
    if not path.is_file():
        raise ScalesError(f"{path} does not exist; make it with `ruyi-trt calibrate --out {path.parent}`, "
                                "or drop --scales for dynamic scales.")  # fmt: skip
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise ScalesError(f"{path} is not a readable safetensors file ({exc}); re-run ruyi-trt calibrate.") from exc
    if metadata.get("format") != SCALES_FORMAT or metadata.get("precision") not in ("fp8", "int8"):
        raise ScalesError(f"{path}: format {metadata.get('format')!r} / precision {metadata.get('precision')!r}; "
                         f"expected {SCALES_FORMAT!r} with fp8 or int8; re-run ruyi-trt calibrate.")  # fmt: skip
    layers = {}
    for key, value in tensors.items():
        if key.endswith(".input_scale"):
            name = key.removesuffix(".input_scale")
            if f"{name}.weight_scale" not in tensors:
                raise ScalesError(f"{path}: {name} has an input_scale but no weight_scale; re-run ruyi-trt calibrate.")
            layers[name] = LayerScales(value, tensors[f"{name}.weight_scale"], tensors.get(f"{name}.smooth"))
    if not layers:
        raise ScalesError(f"{path} holds no layer scales; re-run ruyi-trt calibrate.")
    return CalibratedScales(metadata["precision"], layers, metadata.get("checkpoint_hash", ""), path)


def token_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The recipe's linear layers of `model` (a RuyiTransformer3D), by module path."""
    return {
        name: module for name, module in model.named_modules()
        if type(module) is nn.Linear and (m := _BLOCK_LAYER.match(name)) and m.group(1) in TOKEN_LINEARS
    }  # fmt: skip


def _selected(model: nn.Module, scales: CalibratedScales | None) -> dict[str, nn.Linear]:
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
    model: nn.Module, scales: CalibratedScales | None = None, device: torch.device | str | None = None
) -> dict[str, nn.Module]:
    """Swap the selected linears for `FP8Linear`s (calibrated: the file's layers, per-tensor scales; else dynamic
    per-token activations with per-channel weights). `device`: where the GEMMs will run (default: where the weights
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
        replacements[name] = FP8Linear(layer, input_scale, per_channel=layer_scales is None)
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
    model: nn.Module, scales: CalibratedScales | None = None, device: torch.device | str | None = None
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
    model: nn.Module, compute: str, scales: CalibratedScales | None = None, device: torch.device | str | None = None
) -> dict[str, nn.Module]:
    """`compute` "none" (nothing), "fp8" or "int8" on `model` for GEMMs on `device`; returns the replaced modules."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute: {compute!r} is not supported; use one of {COMPUTE_MODES}.")
    if compute == "none":
        if scales is not None:
            raise ValueError("a scales file was given without --compute fp8|int8; add one or drop the scales.")
        return {}
    return (use_fp8_compute if compute == "fp8" else use_int8_compute)(model, scales, device)
