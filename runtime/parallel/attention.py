"""Self-attention over the whole sequence from each rank's token slice: Ulysses, ring, or both (USP).

The transformer calls this as its `attend` hook (`models.transformer_blocks.AttentionFn`) with q, k, v
[B, H, n, d] of this rank's n tokens, after QK-norm and RoPE, and gets [B, H, n, d] back:

1. Ulysses (ulysses = U > 1): an all-to-all inside the Ulysses group trades tokens for heads, so each rank
   holds every token of its group and H/U heads; attention per head is then exact and local.
2. Ring (ring = R > 1): the key/value blocks of the R Ulysses groups travel round the ring (asynchronous
   send/receive, overlapped with the attention of the block in hand); the partial results are merged exactly
   with their log-sum-exp.
3. The reverse all-to-all gives each rank its own tokens with every head again.

Everything else in a block (the projections, QK-norm, RoPE, cross-attention, the FFN, the long-skip fuse) is
token-local, so it runs on the slice unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models.transformer_blocks import AttentionFn
from .comm import RingPass, heads_to_tokens, tokens_to_heads
from .context import ParallelContext

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d)) v [B, H, Nq, d] and the float32 log-sum-exp of the scores over the keys [B, H, Nq].

    CPU: the flash kernel for CPU (the one SDPA runs there). CUDA: flash attention for fp16/bf16 with head dims up
    to 256 in multiples of 8 (Ruyi's 176 qualifies), else the memory-efficient kernel; neither makes the Nq x Nk
    score matrix."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
        return out, lse
    if q.device.type == "cuda":
        head_dim = q.shape[-1]
        if q.dtype in FLASH_DTYPES and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
            return out, lse
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse.narrow(-1, 0, q.shape[2])  # the kernel pads the queries of the log-sum-exp to 32s
    raise ValueError(f"ring attention runs on cpu or cuda devices, not {q.device.type}")


def merge_partial(
    out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets from their outputs and log-sum-exps (float32)."""
    block_out = block_out.float()
    if out is None:
        return block_out, block_lse
    total = torch.logaddexp(lse, block_lse)
    out = out * (lse - total).exp().unsqueeze(-1) + block_out * (block_lse - total).exp().unsqueeze(-1)
    return out, total


def ring_attention(q: Tensor, k: Tensor, v: Tensor, context: ParallelContext, ring_tokens: list[int]) -> Tensor:
    """Attention of q over the keys/values of every ring member; ring_tokens[r]: member r's key count."""
    members, position = len(ring_tokens), context.coords.ring_rank
    held = torch.stack([k, v])  # (2, B, h, n_r, d): one message per hop
    out = lse = None
    for step in range(members):
        pending = None
        if step + 1 < members:
            source = (position - step - 1) % members
            shape = (2, *k.shape[:2], ring_tokens[source], k.shape[-1])
            pending = RingPass(held, shape, context.ring_ranks, position, context.ring_group)
        block_out, block_lse = attention_with_lse(q, held[0], held[1])
        out, lse = merge_partial(out, lse, block_out, block_lse)
        if pending is not None:
            held = pending.wait()
    return out.to(q.dtype)


class SequenceParallelAttention:
    """The `attend` hook for one call: `shard_tokens[s]` is the token count of sequence shard s (this CFG half).

    `local_attention` is the single-device kernel used when there is no ring (default SDPA); an FP8 or other
    custom attention kernel plugs in here."""

    def __init__(self, context: ParallelContext, shard_tokens: list[int], local_attention: AttentionFn | None = None):
        config = context.config
        self.context = context
        self.local_attention = local_attention or F.scaled_dot_product_attention
        u = config.ulysses
        groups = [shard_tokens[r * u : (r + 1) * u] for r in range(config.ring)]
        self.ulysses_tokens = groups[context.coords.ring_rank]  # token count of each member of our Ulysses group
        self.ring_tokens = [sum(group) for group in groups]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        context, config = self.context, self.context.config
        if config.ulysses > 1:
            group, sizes = context.ulysses_group, self.ulysses_tokens
            q, k, v = (heads_to_tokens(t, group, sizes) for t in (q, k, v))
        if config.ring > 1:
            out = ring_attention(q, k, v, context, self.ring_tokens)
        else:
            out = self.local_attention(q, k, v)
        if config.ulysses > 1:
            out = tokens_to_heads(out, context.ulysses_group, self.ulysses_tokens, context.coords.ulysses_rank)
        return out
