"""Run NVIDIA ModelOpt's post-training calibration on a transformer and read the scales out of its quantizers.

`calibrate_module(model, forward_loop, precision)` inserts ModelOpt's fake quantizers into the recipe's layers
(calib/recipe.py), lets `forward_loop(model)` push the calibration data through (max calibration; for int8
SmoothQuant also the per-channel activation maxima and the smoothing), and returns the `Scales`. ModelOpt
changes `model` in place (quantizers inserted, SmoothQuant folds 1/s into the weights): pass a model that
is not used for anything else afterwards.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..deps import require
from .recipe import DEFAULT_ALPHA, is_quantized, modelopt_config
from .scales import QMAX, LayerScales, Scales

log = logging.getLogger(__name__)


def import_modelopt():
    """`modelopt.torch.quantization`, or ImportError with the install command."""
    try:
        with warnings.catch_warnings():  # it warns about the transformers version at import; we use no HF model
            warnings.simplefilter("ignore", UserWarning)
            return require("modelopt.torch.quantization", "calibration (ruyi-trt calibrate)")
    except ImportError as exc:
        raise ImportError(
            f"{exc}. Install it with: pip install 'ruyi-trt[calib]'  (nvidia-modelopt 0.47 with requests and "
            "huggingface_hub; not its [onnx] extra)"
        ) from exc


def calibrate_module(model: nn.Module, forward_loop: Callable[[nn.Module], None], precision: str,
                     checkpoint_hash: str, alpha: float = DEFAULT_ALPHA) -> Scales:  # fmt: skip
    """Calibrate `model` in place over `forward_loop` and return the scales of every recipe layer."""
    mtq = import_modelopt()
    config = modelopt_config(precision, alpha)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mtq.quantize(model, config, forward_loop=forward_loop)
    scales = Scales(precision, read_layer_scales(model, precision), checkpoint_hash,
                    alpha if precision == "int8" else None)  # fmt: skip
    if not scales.layers:
        raise RuntimeError("calibration produced no scales: no recipe layer saw calibration data.")
    log.info("calibrated %d layers (%s)", len(scales.layers), precision)
    return scales


def read_layer_scales(model: nn.Module, precision: str) -> dict[str, LayerScales]:
    """The scales of every calibrated recipe layer of a ModelOpt-quantized model (amax / QMAX)."""
    qmax = QMAX[precision]
    layers = {}
    for name, module in model.named_modules():
        inputs, weights = getattr(module, "input_quantizer", None), getattr(module, "weight_quantizer", None)
        if not is_quantized(name) or inputs is None or not inputs.is_enabled:
            continue
        if inputs.amax is None or weights.amax is None:
            raise RuntimeError(f"{name}: no calibration data reached this layer; check the calibration requests.")
        input_amax = inputs.amax.detach().float().reshape(())
        weight_amax = weights.amax.detach().float()
        weight_amax = weight_amax.reshape(-1) if weight_amax.numel() > 1 else weight_amax.reshape(())
        smooth = getattr(inputs, "pre_quant_scale", None)
        layers[name] = LayerScales(
            input_scale=(input_amax.clamp(min=1e-12) / qmax).cpu(),
            weight_scale=(weight_amax.clamp(min=1e-12) / qmax).cpu(),
            smooth=None if smooth is None else smooth.detach().float().reshape(-1).cpu(),
        )
    return layers
