"""The single-process parts of sequence parallelism (float32, CPU): the log-sum-exp merge of ring attention, the
temporal PE / RoPE of a token slice, and the attention hook of the blocks. Multi-process runs: test_parallel_jobs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.models.transformer import rotary_embedding
from ruyi_trt.models.transformer_blocks import TemporalPositionalEncoding
from ruyi_trt.runtime.parallel.attention import attention_with_lse, merge_partial
from ruyi_trt.runtime.parallel.config import offsets, split_sizes
from ruyi_trt.testing import assert_close_scaled


def test_attention_with_lse_matches_sdpa_and_the_explicit_logsumexp() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 176, generator=gen) for _ in range(3))
    out, lse = attention_with_lse(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 37)
    assert_close_scaled(out, F.scaled_dot_product_attention(q, k, v), 1e-6, "out")
    assert_close_scaled(lse, (q @ k.transpose(-1, -2) * 176**-0.5).logsumexp(-1), 1e-6, "lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_give_an_output_and_a_per_query_logsumexp(dtype: torch.dtype) -> None:
    """No GPU here: fake CUDA tensors check the kernel choice and its signatures (bf16: flash attention, which
    takes head dim 176; fp32: memory-efficient attention, whose log-sum-exp is padded to 32 queries)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(1, 8, 1000, 176, dtype=dtype, device="cuda")
        kv = torch.empty(1, 8, 700, 176, dtype=dtype, device="cuda")
        out, lse = attention_with_lse(q, kv, kv)
        assert out.shape == (1, 8, 1000, 176) and out.dtype == dtype and out.device.type == "cuda"
        assert lse.shape == (1, 8, 1000) and lse.dtype == torch.float32


def test_merging_uneven_key_blocks_equals_attention_over_all_keys() -> None:
    """The ring's arithmetic: attention over keys split 5/5/4/4 and merged by log-sum-exp (float32, 1e-6)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 9, 16, generator=gen)
    k, v = (torch.randn(1, 2, 18, 16, generator=gen) for _ in range(2))
    out = lse = None
    sizes = split_sizes(18, 4)
    for start, size in zip(offsets(sizes), sizes):
        block = attention_with_lse(q, k[:, :, start : start + size], v[:, :, start : start + size])
        out, lse = merge_partial(out, lse, *block)
    assert_close_scaled(out, F.scaled_dot_product_attention(q, k, v), 1e-6, "merged")


def test_temporal_pe_of_a_slice_equals_the_slice_of_the_whole() -> None:
    pe = TemporalPositionalEncoding(32)
    frames, per_frame = 3, 4
    x = torch.randn(2, frames * per_frame, 32)
    whole = pe(x, frames)
    start, stop = 5, 10  # ends inside frames 1 and 2
    frame_index = torch.arange(start, stop) // per_frame
    torch.testing.assert_close(pe(x[:, start:stop], frames, frame_index), whole[:, start:stop], rtol=0, atol=0)


def test_a_block_with_a_gathering_attend_hook_equals_the_whole_block() -> None:
    """Two token slices run separately, their self-attention answered over the whole sequence by the hook:
    every output row equals the unsliced block's (float32, 1e-6): cross-attention, FFN, RoPE, PE are token-local."""
    model = tiny_transformer()
    block = model.blocks[-1]  # a long-skip block
    frames, hp, wp = 2, 2, 3
    tokens, dim = frames * hp * wp, model.config.inner_dim
    gen = torch.Generator().manual_seed(2)
    x, skip = torch.randn(1, tokens, dim, generator=gen), torch.randn(1, tokens, dim, generator=gen)
    temb = torch.randn(1, dim, generator=gen)
    text = torch.randn(1, model.config.text_tokens, model.config.cross_attention_dim, generator=gen)
    clip = torch.randn(1, model.config.n_query, model.config.cross_attention_dim, generator=gen)
    cos, sin = (t.repeat(frames, 1) for t in rotary_embedding(2 * hp, 2 * wp, 2, model.config.attention_head_dim))
    with torch.no_grad():
        whole = block(x, temb, text, clip, cos, sin, frames, skip)
        # the hook sees q, k, v of one slice; it answers with attention of that slice's queries over every key,
        # the keys and values coming from a whole-sequence pass (what Ulysses / the ring assemble)
        captured = {}

        def record(q, k, v):
            captured["k"], captured["v"] = k, v
            return F.scaled_dot_product_attention(q, k, v)

        block(x, temb, text, clip, cos, sin, frames, skip, attend=record)
        pieces = []
        for start, stop in ((0, 7), (7, tokens)):
            frame_index = torch.arange(start, stop) // (hp * wp)

            def attend(q, k, v):
                return F.scaled_dot_product_attention(q, captured["k"], captured["v"])

            pieces.append(block(
                x[:, start:stop], temb, text, clip, cos[start:stop], sin[start:stop], frames, skip[:, start:stop],
                frame_index=frame_index, attend=attend,
            ))  # fmt: skip
    assert_close_scaled(torch.cat(pieces, dim=1), whole, 1e-6, "sliced block")
