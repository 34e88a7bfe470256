"""8-bit compute of the transformer's linears: FP8 through torch._scaled_mm (runs on CPU, slowly) and INT8 through
torchao, dynamic or with a `ruyi-trt-scales/1` file; fp32 CPU references, tolerances as cosine similarities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.tools.bench_models import Shape, denoiser_inputs
from ruyi_trt.weights.compute8 import (
    FP8Linear,
    ScalesError,
    read_scales_file,
    restore_modules,
    token_linears,
    use_8bit_compute,
    use_fp8_compute,
)

pytest.importorskip("torchao", reason="--compute int8 needs torchao")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.fixture(scope="module")
def tiny_case():
    model = tiny_transformer().eval()
    config = model.config
    inputs = denoiser_inputs(config, VAEConfig.tiny(), Shape(64, 64, 8), (16, config.projection_dim),
                             torch.device("cpu"), torch.float32)  # fmt: skip
    with torch.inference_mode():
        reference = model(**inputs)[0]
    return model, inputs, reference


def write_scales(model: nn.Module, inputs: dict, precision: str, path: Path, alpha: float = 0.5) -> Path:
    """A scales file in the calibration format, from the activation amax of one forward pass (max calibration;
    SmoothQuant factors for int8)."""
    layers = token_linears(model)
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            per_channel = args[0].detach().abs().flatten(0, -2).amax(dim=0)
            amax[name] = per_channel if name not in amax else torch.maximum(amax[name], per_channel)
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    with torch.inference_mode():
        model(**inputs)
    for handle in handles:
        handle.remove()
    qmax = 448.0 if precision == "fp8" else 127.0
    tensors = {}
    for name, layer in layers.items():
        weight, x_amax = layer.weight.detach().float(), amax[name].clamp(min=1e-5)
        smooth = torch.ones_like(x_amax)
        if precision == "int8":
            smooth = (x_amax**alpha / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
            smooth = 1.0 / smooth  # x_s = x * s shrinks the large channels
            tensors[f"{name}.smooth"] = smooth
        weight_s = weight / smooth[None, :]
        tensors[f"{name}.input_scale"] = ((x_amax * smooth).amax() / qmax).reshape(())
        w_amax = weight_s.abs().amax(dim=1) if precision == "int8" else weight_s.abs().amax()
        tensors[f"{name}.weight_scale"] = w_amax / qmax
    metadata = {"format": "ruyi-trt-scales/1", "precision": precision, "qmax": str(qmax),
                "weight_axis": "0" if precision == "int8" else "none", "checkpoint_hash": "sha256:test"}  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_fp8_linear_dynamic_and_static_match_fp32():
    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(139, 64)  # 139: not a multiple of 16 (fine on CPU)
    x = torch.randn(2, 50, 139, generator=gen)
    with torch.inference_mode():
        expected = layer(x)
        dynamic = FP8Linear(layer)(x)
        static = FP8Linear(layer, input_scale=x.abs().amax() / 448.0, per_channel=False)(x)
    assert dynamic.shape == expected.shape and dynamic.dtype == torch.float32
    assert _cosine(dynamic, expected) >= 0.999
    assert _cosine(static, expected) >= 0.998


def test_fp8_linear_is_the_scales_format_formula():
    """Static per-tensor: y = (xq @ wq.T) * input_scale * weight_scale + bias, fp32 accumulation (1e-5 relative)."""
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(64, 32)
    x = torch.randn(10, 64, generator=gen) * 3
    input_scale = torch.tensor(2.0 / 448.0)  # saturates everything above 2
    fp8 = FP8Linear(layer, input_scale=input_scale, per_channel=False)
    xq = (x / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    weight_scale = layer.weight.detach().abs().amax() / 448.0
    wq = (layer.weight.detach() / weight_scale).to(torch.float8_e4m3fn).float()
    expected = (xq @ wq.T) * input_scale * weight_scale + layer.bias.detach()
    with torch.inference_mode():
        torch.testing.assert_close(fp8(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute", ["fp8", "int8"])
def test_dynamic_compute_on_the_tiny_transformer(tiny_case, compute):
    """Every token-wise block linear (45 in the tiny model) is swapped; denoiser output cosine >= 0.999 to fp32;
    restoring the modules gives the fp32 output back exactly."""
    model, inputs, reference = tiny_case
    originals = use_8bit_compute(model, compute)
    try:
        assert len(originals) == len(token_linears(tiny_transformer())) == 45
        with torch.inference_mode():
            out = model(**inputs)[0]
    finally:
        restore_modules(model, originals)
    assert _cosine(out, reference) >= 0.999
    with torch.inference_mode():
        torch.testing.assert_close(model(**inputs)[0], reference, rtol=0, atol=0)


@pytest.mark.parametrize(("precision", "cosine"), [("fp8", 0.998), ("int8", 0.995)])
def test_calibrated_compute_reads_the_scales_file(tiny_case, tmp_path, precision, cosine):
    model, inputs, reference = tiny_case
    write_scales(model, inputs, precision, tmp_path / "scales.safetensors")
    scales = read_scales_file(tmp_path)  # the folder works too
    assert scales.precision == precision and len(scales.layers) == 45 and scales.checkpoint_hash == "sha256:test"
    originals = use_8bit_compute(model, precision, scales)
    try:
        with torch.inference_mode():
            out = model(**inputs)[0]
        if precision == "fp8":
            layer = model.get_submodule("blocks.0.attn1.to_q")
            assert isinstance(layer, FP8Linear) and layer.input_scale is not None and layer.weight_scale.ndim == 0
    finally:
        restore_modules(model, originals)
    assert _cosine(out, reference) >= cosine


def test_cuda_gemm_rule_skips_layers_not_multiple_of_16(tiny_case):
    """For CUDA the 8-bit GEMMs need dims that are multiples of 16: the tiny FFN (139 wide) stays in the run dtype."""
    model, _, _ = tiny_case
    originals = use_fp8_compute(model, device="cuda")
    restore_modules(model, originals)
    assert len(originals) == 45 - 2 * 4 and not any(name.startswith("blocks.0.ff") for name in originals)


def test_bad_scales_files_are_refused(tiny_case, tmp_path):
    model, inputs, _ = tiny_case
    with pytest.raises(ScalesError, match="ruyi-trt calibrate"):
        read_scales_file(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ScalesError, match="not a readable"):
        read_scales_file(tmp_path / "junk.safetensors")
    save_file({"x.input_scale": torch.ones(())}, str(tmp_path / "other.safetensors"), metadata={"format": "other/1"})
    with pytest.raises(ScalesError, match="format"):
        read_scales_file(tmp_path / "other.safetensors")
    int8 = read_scales_file(write_scales(model, inputs, "int8", tmp_path / "int8.safetensors"))
    with pytest.raises(ValueError, match="needs an fp8 calibration"):
        use_8bit_compute(model, "fp8", int8)
    save_file({"blocks.99.attn1.to_q.input_scale": torch.ones(()), "blocks.99.attn1.to_q.weight_scale": torch.ones(())},
              str(tmp_path / "alien.safetensors"), metadata={"format": "ruyi-trt-scales/1", "precision": "fp8"})
    with pytest.raises(ScalesError, match="another architecture"):
        use_8bit_compute(model, "fp8", read_scales_file(tmp_path / "alien.safetensors"))


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="FP8 GEMMs need a CUDA GPU with compute capability >= 8.9",
)
def test_fp8_linear_on_gpu_bf16():
    """The real path: e4m3 _scaled_mm on the GPU at full width in bf16, dynamic (row-wise) and static (tensor-wise)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    layer = nn.Linear(2816, 2816).cuda().bfloat16()
    x = torch.randn(2, 1024, 2816, generator=gen, device="cuda").bfloat16()
    with torch.inference_mode():
        expected = layer(x)
        dynamic = FP8Linear(layer)(x)
        static = FP8Linear(layer, input_scale=x.float().abs().amax() / 448.0, per_channel=False)(x)
    assert dynamic.dtype == torch.bfloat16 and _cosine(dynamic, expected) >= 0.998
    assert _cosine(static, expected) >= 0.997
