"""What is quantized and how: the transformer's token-wise linear layers, FP8 E4M3 or INT8 SmoothQuant.

Quantized: the linear layers every token goes through in every block (the `linear` term of tools/flops.py,
over 99% of the transformer's GEMM work at real sizes). Left in the run dtype: the text/CLIP key and value
projections (they see 333 text / 16 CLIP tokens), norm1's adaLN linear (one row per sample), the embedders,
norm_out, proj_out and the patch embedding.

    fp8   FP8 E4M3, per-output-channel weights and per-tensor activations, max calibration (ModelOpt
          FP8_DEFAULT_CFG's quantizers with the weight axis 0: on the tiny model one forward's 1 - cosine to fp32
          halves, 1.0e-3 -> 5.1e-4, against per-tensor weights; TensorRT and torch._scaled_mm take per-channel
          weight scales)
    int8  INT8 with SmoothQuant (alpha 0.5), per-output-channel weights, per-tensor activations
          (ModelOpt INT8_SMOOTHQUANT_CFG's quantizers)
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

# module paths inside a block, relative to `blocks.{i}.`
QUANTIZED_IN_BLOCK = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
    "attn_clip.to_q", "attn_clip.to_out.0", "gate_clip.proj", "ff.net.0.proj", "ff.net.2", "skip_linear",
)  # fmt: skip
_BLOCK_MODULE = re.compile(r"^blocks\.(\d+)\.(.+)$")
DEFAULT_ALPHA = 0.5
_NUM_BITS = {"fp8": (4, 3), "int8": 8}
_WEIGHT_AXIS = {"fp8": 0, "int8": 0}


def is_quantized(name: str) -> bool:
    """Whether the module at path `name` of a RuyiTransformer3D is one the recipe quantizes."""
    match = _BLOCK_MODULE.match(name)
    return bool(match) and match.group(2) in QUANTIZED_IN_BLOCK


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(path, module) of every linear layer of `model` the recipe quantizes."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and is_quantized(name):
            yield name, module


def modelopt_config(precision: str, alpha: float = DEFAULT_ALPHA) -> dict:
    """A ModelOpt quantization config enabling exactly the recipe's layers (quantizer names are matched as globs)."""
    if precision not in _NUM_BITS:
        raise ValueError(f"precision: {precision!r} is not supported; use fp8 or int8.")
    bits, axis = _NUM_BITS[precision], _WEIGHT_AXIS[precision]
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for path in QUANTIZED_IN_BLOCK:
        quant_cfg.append({"quantizer_name": f"blocks.*.{path}.weight_quantizer", "cfg": {"num_bits": bits, "axis": axis}})
        quant_cfg.append({"quantizer_name": f"blocks.*.{path}.input_quantizer", "cfg": {"num_bits": bits, "axis": None}})
    algorithm = "max" if precision == "fp8" else {"method": "smoothquant", "alpha": alpha}
    return {"quant_cfg": quant_cfg, "algorithm": algorithm}
