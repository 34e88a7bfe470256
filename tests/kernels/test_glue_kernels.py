"""The fused glue kernels (LayerNorm + adaLN shift, QK-norm + RoPE, GELU-tanh) against their torch references and
against the model modules they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ruyi_trt.kernels.gelu_tanh import gelu_tanh, gelu_tanh_ref
from ruyi_trt.kernels.layernorm_shift import layernorm_shift, layernorm_shift_ref
from ruyi_trt.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from ruyi_trt.models.rope import apply_rotary, rotary_embedding
from ruyi_trt.models.transformer_blocks import NORM_EPS, AdaLayerNormShift, FP32LayerNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under the interpreter (tests/conftest.py)
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # no bf16 in the interpreter
FLOAT_DTYPES = [torch.float32, *HALF_DTYPES]

# Kernel vs reference, absolute: fp32 a few ulps; half types one rounding of values up to ~8 (the output's ulp).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def _rand(*shape, scale=1.0, offset=0.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale + offset).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layernorm_shift(dtype, affine):
    x = _rand(2, 37, 176, scale=3.0, offset=1.0, dtype=dtype)  # 176: not a power of two (masked tile)
    weight, bias = (_rand(176, seed=1), _rand(176, seed=2)) if affine else (None, None)
    shift = _rand(2, 176, seed=3, dtype=dtype)
    out = layernorm_shift(x, weight, bias, shift, NORM_EPS)
    assert out.dtype == dtype and out.shape == x.shape
    ref = layernorm_shift_ref(x, weight, bias, shift, NORM_EPS)
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]


def test_layernorm_shift_equals_the_model_norm1():
    """fp32: the fused kernel with the module's weights equals AdaLayerNormShift (norm1) within 1e-5."""
    module = AdaLayerNormShift(176).to(DEVICE)
    torch.nn.init.normal_(module.norm.weight)
    torch.nn.init.normal_(module.norm.bias)
    x, temb = _rand(2, 21, 176, seed=4), _rand(2, 176, seed=5)
    shift = module.linear(F.silu(temb))
    out = layernorm_shift(x, module.norm.weight, module.norm.bias, shift, module.norm.eps)
    assert (out - module(x, temb)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_qk_norm_rope(dtype):
    heads, head_dim = 2, 176
    cos, sin = rotary_embedding(6, 8, 2, head_dim)  # one 3 x 4 patch frame
    cos, sin = cos.repeat(3, 1).to(DEVICE), sin.repeat(3, 1).to(DEVICE)  # 3 frames: 36 tokens
    x = _rand(2, 36, heads * head_dim, scale=2.0, offset=0.5, seed=6, dtype=dtype)
    weight, bias = _rand(head_dim, seed=7), _rand(head_dim, seed=8)
    out = qk_norm_rope(x, heads, weight, bias, NORM_EPS, cos, sin)
    assert out.shape == (2, heads, 36, head_dim) and out.dtype == dtype
    ref = qk_norm_rope_ref(x, heads, weight, bias, NORM_EPS, cos, sin)
    assert (out.float() - ref.float()).abs().max().item() <= TOLERANCE[dtype]
    keys = qk_norm_rope(x, heads, weight, bias, NORM_EPS, None, None)  # cross-attention keys: norm only
    assert (keys.float() - qk_norm_rope_ref(x, heads, weight, bias, NORM_EPS, None, None).float()).abs().max() <= (
        TOLERANCE[dtype]
    )


def test_qk_norm_rope_equals_the_model_path():
    """fp32: the kernel equals the model's norm_q then apply_rotary (models/rope.py) within 1e-5."""
    heads, head_dim = 2, 16
    cos, sin = (t.to(DEVICE) for t in rotary_embedding(4, 4, 2, head_dim))
    norm = FP32LayerNorm(head_dim, eps=NORM_EPS).to(DEVICE)
    torch.nn.init.normal_(norm.weight)
    x = _rand(1, 4, heads * head_dim, seed=9)
    model = apply_rotary(norm(x.unflatten(-1, (heads, head_dim)).transpose(1, 2)), cos, sin)
    out = qk_norm_rope(x, heads, norm.weight, norm.bias, norm.eps, cos, sin)
    assert (out - model).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gelu_tanh(dtype):
    x = _rand(3, 1000, scale=4.0, seed=10, dtype=dtype)  # not a multiple of the 1024 tile
    out = gelu_tanh(x)
    relative = 1e-6 if dtype == torch.float32 else (1e-3 if dtype == torch.float16 else 8e-3)
    assert ((out.float() - gelu_tanh_ref(x).float()).abs() <= relative * (1 + x.float().abs())).all()


def test_gelu_tanh_tails_and_zero():
    x = torch.tensor([-100.0, -20.0, -1e-4, 0.0, 1e-4, 5.0, 20.0, 100.0], device=DEVICE)
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), atol=1e-7, rtol=1e-6)
