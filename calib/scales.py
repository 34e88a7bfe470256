"""`scales.safetensors`: the calibrated quantization scales of the transformer's linear layers.

Format `ruyi-trt-scales/1`. Per quantized module `M` (its path in `RuyiTransformer3D`, e.g.
`blocks.3.attn1.to_q`, the checkpoint key without `.weight`), float32 tensors:
    M.input_scale   []                     activation dequant scale, per tensor: amax(x * s) / QMAX
    M.weight_scale  [out] (or [])          weight dequant scale: amax(W / s) / QMAX per output row (or per tensor)
    M.smooth        [in] (int8 only)        SmoothQuant factor s: x_s = x * s, W_s = W / s
and string metadata (format, precision, qmax, weight_axis, algorithm, smoothquant_alpha, checkpoint_hash).
Exactly the modules present are quantized. A quantized linear is, symmetric with zero point 0:
    xq = saturate(round(x * s / input_scale)); wq = saturate(round(W_s / weight_scale)) (per row when [out])
    y = (xq @ wq.T) * input_scale * weight_scale + bias      (int8 in [-128, 127]; fp8 = e4m3fn, |v| <= 448)
Readers refuse another format or another checkpoint. A consumer that changes the weights (a merged LoRA)
may recompute weight_scale with the same rule; input_scale and smooth come only from calibration data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import atomic_write

FORMAT = "ruyi-trt-scales/1"
SCALES_NAME = "scales.safetensors"
PRECISIONS = ("fp8", "int8")
QMAX = {"fp8": 448.0, "int8": 127.0}  # float8_e4m3fn's largest finite value; symmetric int8
ALGORITHMS = {"fp8": "max", "int8": "smoothquant"}


class ScalesError(ValueError):
    """A scales file that is missing, of another format, or made for another checkpoint."""


@dataclass(frozen=True)
class LayerScales:
    """The scales of one quantized linear layer (float32 CPU tensors)."""

    input_scale: torch.Tensor  # 0-d
    weight_scale: torch.Tensor  # 0-d (per tensor) or [out] (per output channel)
    smooth: torch.Tensor | None = None  # [in], SmoothQuant only

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.ndim == 1


@dataclass(frozen=True)
class Scales:
    """Every quantized layer's scales, the precision and where they came from."""

    precision: str
    layers: dict[str, LayerScales]
    checkpoint_hash: str
    smoothquant_alpha: float | None = None
    extra: dict[str, str] = field(default_factory=dict)  # more metadata, kept as strings
    path: Path | None = None  # the file it was read from (read_scales), for messages

    @property
    def qmax(self) -> float:
        return QMAX[self.precision]

    def metadata(self) -> dict[str, str]:
        per_channel = any(layer.per_channel for layer in self.layers.values())
        return {
            **self.extra,
            "format": FORMAT,
            "precision": self.precision,
            "qmax": str(self.qmax),
            "weight_axis": "0" if per_channel else "none",
            "algorithm": ALGORITHMS[self.precision],
            "smoothquant_alpha": "" if self.smoothquant_alpha is None else str(self.smoothquant_alpha),
            "checkpoint_hash": self.checkpoint_hash,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in sorted(self.layers.items()):
            out[f"{name}.input_scale"] = layer.input_scale
            out[f"{name}.weight_scale"] = layer.weight_scale
            if layer.smooth is not None:
                out[f"{name}.smooth"] = layer.smooth
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def write_scales(path: str | Path, scales: Scales) -> Path:
    """Write `scales` to `path` atomically."""
    from safetensors.torch import save_file

    if scales.precision not in PRECISIONS:
        raise ValueError(f"precision: {scales.precision!r} is not supported; use one of {PRECISIONS}.")
    if not scales.layers:
        raise ValueError("scales: no quantized layer; nothing was calibrated.")
    tensors, metadata = scales.tensors(), scales.metadata()
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def scales_file(path: str | Path) -> Path:
    """The scales file a `--scales` argument names: the file itself, or DIR/scales.safetensors."""
    path = Path(path)
    return path / SCALES_NAME if path.is_dir() else path


def read_scales(path: str | Path, checkpoint_hash: str | None = None) -> Scales:
    """The scales in `path` (a scales file or the folder holding one); ScalesError when the format differs or
    (given `checkpoint_hash`) the checkpoint does. The one reader of the format: calib/, export/qdq.py's callers
    and the torch backend's `--compute fp8|int8 --scales` (weights/compute8.py) all read through it."""
    from safetensors import SafetensorError, safe_open

    path = scales_file(path)
    if not path.is_file():
        raise ScalesError(f"{path} does not exist; calibrate first (ruyi-trt calibrate --model ... --out {path.parent}).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict
    except (SafetensorError, OSError) as exc:
        raise ScalesError(f"{path} is not a readable safetensors file ({exc}); re-run ruyi-trt calibrate.") from exc
    if metadata.get("format") != FORMAT:
        raise ScalesError(f"{path} has format {metadata.get('format')!r}, expected {FORMAT!r}; re-run ruyi-trt calibrate.")
    precision = metadata.get("precision")
    if precision not in PRECISIONS:
        raise ScalesError(f"{path}: precision {precision!r} is not one of {PRECISIONS}.")
    if checkpoint_hash is not None and metadata.get("checkpoint_hash") != checkpoint_hash:
        raise ScalesError(
            f"{path} was calibrated for another checkpoint ({metadata.get('checkpoint_hash', '?')[:19]}, this one is "
            f"{checkpoint_hash[:19]}); re-run ruyi-trt calibrate for this model."
        )
    layers = {}
    for key, value in tensors.items():
        if key.endswith(".input_scale"):
            name = key.removesuffix(".input_scale")
            if f"{name}.weight_scale" not in tensors:
                raise ScalesError(f"{path}: {name} has an input_scale but no weight_scale.")
            layers[name] = LayerScales(value, tensors[f"{name}.weight_scale"], tensors.get(f"{name}.smooth"))
    if not layers:
        raise ScalesError(f"{path} holds no layer scales; re-run ruyi-trt calibrate.")
    alpha = metadata.get("smoothquant_alpha")
    known = {"format", "precision", "qmax", "weight_axis", "algorithm", "smoothquant_alpha", "checkpoint_hash"}
    return Scales(precision, layers, metadata.get("checkpoint_hash", ""), float(alpha) if alpha else None,
                  {k: v for k, v in metadata.items() if k not in known}, path)  # fmt: skip


def scales_digest(path: str | Path) -> str:
    """sha256 of a scales file: the identity of a calibration in cache keys."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
