"""The FP8 attention kernel against its torch reference and exact attention (head size 176 and others)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ruyi_trt.kernels.fp8_attention import FP8_MAX, fp8_attention, fp8_attention_ref, head_lanes, quantize_blocks
from ruyi_trt.kernels.triton_support import fp8_supported, kernel_unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: under the interpreter (tests/conftest.py)
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])  # no bf16 in the interpreter
FLOAT_DTYPES = [torch.float32, *HALF_DTYPES]

pytestmark = pytest.mark.skipif(not fp8_supported(DEVICE), reason="FP8 tl.dot needs compute capability >= 8.9")


def _qkv(batch, heads, tokens, context, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, head_dim, generator=gen)
    k = torch.randn(batch, heads, context, head_dim, generator=gen) + 0.5
    v = torch.randn(batch, heads, context, head_dim, generator=gen)
    return (t.to(DEVICE, dtype) for t in (q, k, v))


def _cosine(a, b):
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1, 100, 100, 176), (1, 2, 70, 33, 176), (2, 1, 40, 40, 16)], ids=["self-176", "cross-176", "d16"]
)
def test_half_pv_matches_reference(shape, dtype):
    """P.V in fp16/bf16: kernel vs reference within 2e-3 (fp32 out) / 4e-3 (half out) absolute, and within cosine
    0.998 of exact fp32 attention (the FP8 Q.K^T error)."""
    q, k, v = _qkv(*shape, dtype)
    pv = "bf16" if dtype == torch.bfloat16 else "fp16"
    out = fp8_attention(q, k, v, pv=pv)
    assert out.shape == q.shape and out.dtype == dtype
    ref = fp8_attention_ref(q, k, v, pv=pv)
    tolerance = 2e-3 if dtype == torch.float32 else (4e-3 if dtype == torch.float16 else 2e-2)
    assert (out.float() - ref.float()).abs().max().item() <= tolerance
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _cosine(out, exact) >= 0.998


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
def test_e4m3_pv_matches_reference(dtype):
    """P.V in e4m3 (P * 448 cast in the kernel, V per channel): cosine >= 0.997 to the reference (which keeps P
    exact) and >= 0.995 to exact attention; max abs error <= 0.2 on unit-variance values."""
    q, k, v = _qkv(1, 1, 100, 100, 176, dtype, seed=1)
    out = fp8_attention(q, k, v, pv="e4m3")
    ref = fp8_attention_ref(q, k, v, pv="e4m3")
    assert _cosine(out, ref) >= 0.997
    assert (out.float() - ref.float()).abs().max().item() <= 0.2
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert _cosine(out, exact) >= 0.995


def test_key_offset_is_smoothed_away():
    """A large shared key offset changes no softmax row; smoothing K removes it before quantization, so the FP8
    result barely moves (fp32, within 2e-3), where quantizing the raw keys would lose most of e4m3's precision."""
    q, k, v = _qkv(1, 1, 64, 64, 176, torch.float32, seed=2)
    plain = fp8_attention(q, k, v)
    shifted = fp8_attention(q, k + 20.0, v)
    assert (plain - shifted).abs().max().item() <= 2e-3


def test_strided_inputs_and_output_layout():
    """Inputs may be the model's transposed views of [B, N, H, d]; the output is [B, H, N, d] over a [B, N, H, d]
    buffer, so transpose(1, 2) is contiguous."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 32, 3, 2, 176, generator=gen).to(DEVICE)  # (B, N, {q,k,v}, H, d)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    out = fp8_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, fp8_attention(q.contiguous(), k.contiguous(), v.contiguous()), atol=0, rtol=0)


def test_block_quantization_error_bound():
    """e4m3 keeps 3 mantissa bits: each dequantized value is within 2^-4 relative (+ the subnormal step) of x."""
    x = torch.randn(2, 3, 300, 176, generator=torch.Generator().manual_seed(4)) * 5
    x8, scale = quantize_blocks(x, 128)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 3)
    per_token = scale.repeat_interleave(128, dim=-1)[..., :300, None]
    error = (x8.float() * per_token - x).abs()
    assert bool((error <= x.abs() * 2**-4 + per_token * 2**-9).all())
    assert x8.float().abs().max().item() == FP8_MAX  # each block's amax maps onto the largest finite e4m3


def test_head_lanes():
    assert head_lanes(176) == (128, 64)  # 176 = 128 + 48 (a 64-wide lane, 16 columns masked)
    assert head_lanes(16) == (32, 0)  # lanes are >= 32 wide (e4m3 dots need K >= 32): 16 columns masked
    assert head_lanes(48) == (32, 32)
    assert head_lanes(256) == (256, 0)
    with pytest.raises(ValueError, match="head_dim 8"):
        head_lanes(8)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in kernel_unavailable_reason("cpu")


def test_bad_shapes_are_refused():
    q, k, v = _qkv(1, 2, 16, 16, 176, torch.float32)
    with pytest.raises(ValueError, match="expected q"):
        fp8_attention(q, k[:, :1], v[:, :1])
    with pytest.raises(ValueError, match="pv"):
        fp8_attention(q, k, v, pv="int8")
