"""The collectives of sequence/CFG parallelism, on torch.distributed (NCCL or gloo), for uneven token shards.

Token shards differ by at most one token (`config.split_sizes`), so every exchange takes explicit per-rank sizes
instead of padding: all_to_all_single with split sizes for Ulysses, sized receive buffers for the ring, and
padded all-gathers (trimmed afterwards) for the outputs. fp8 tensors travel as their uint8 bytes (collectives
have no fp8 types). A failing collective raises `ParallelError` naming the rank and the operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")
# all_gather_into_tensor was renamed all_gather_single in torch 2.13; older releases only have the first name
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
FP8_DTYPES = {dt for name in ("float8_e4m3fn", "float8_e5m2") if (dt := getattr(torch, name, None)) is not None}


class ParallelError(RuntimeError):
    """A collective failed or timed out: usually another rank died or stopped (its own error says why)."""


def checked(what: str, call: Callable[[], T]) -> T:
    """Run one collective; a failure becomes a ParallelError that says which rank saw it."""
    try:
        return call()
    except ParallelError:
        raise
    except RuntimeError as exc:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ParallelError(
            f"rank {rank}: {what} failed ({first}). Another rank has probably failed or stopped responding; "
            "its own error is the cause."
        ) from exc


def wire(tensor: Tensor) -> Tensor:
    """The tensor as the collectives see it: fp8 as its uint8 bytes (same storage), everything else as is."""
    return tensor.view(torch.uint8) if tensor.dtype in FP8_DTYPES else tensor


def heads_to_tokens(x: Tensor, group: dist.ProcessGroup, sizes: list[int]) -> Tensor:
    """Ulysses, forward: x [B, H, n, d] (this rank's n tokens, every head) -> [B, H/U, sum(sizes), d] (the tokens
    of the whole group, this rank's H/U heads). sizes: token count of each group member, in group order."""
    batch, heads, tokens, dim = x.shape
    members = len(sizes)
    local = heads // members
    # per destination j: heads [j*h, (j+1)*h) of our tokens, laid out [n, B, h, d] so that the rows received
    # from every source stack into one [N, B, h, d] tensor in token order
    send = x.reshape(batch, members, local, tokens, dim).permute(1, 3, 0, 2, 4).contiguous()
    recv = x.new_empty(sum(sizes), batch, local, dim)
    row = batch * local * dim
    checked(
        "Ulysses all-to-all",
        lambda: dist.all_to_all_single(
            wire(recv).view(-1), wire(send).view(-1), [s * row for s in sizes], [tokens * row] * members, group=group
        ),
    )
    return recv.permute(1, 2, 0, 3)  # (B, h, N, d)


def tokens_to_heads(y: Tensor, group: dist.ProcessGroup, sizes: list[int], member: int) -> Tensor:
    """Ulysses, backward: y [B, H/U, sum(sizes), d] -> [B, H, sizes[member], d] (this rank's tokens, every head)."""
    batch, local, _, dim = y.shape
    members, tokens = len(sizes), sizes[member]
    send = y.permute(2, 0, 1, 3).contiguous()  # (N, B, h, d): the rows of member j are its tokens
    recv = y.new_empty(members, tokens, batch, local, dim)  # from member j: our tokens, its heads
    row = batch * local * dim
    checked(
        "Ulysses all-to-all (back)",
        lambda: dist.all_to_all_single(
            wire(recv).view(-1), wire(send).view(-1), [tokens * row] * members, [s * row for s in sizes], group=group
        ),
    )
    return recv.permute(2, 0, 3, 1, 4).reshape(batch, members * local, tokens, dim)


class RingPass:
    """One asynchronous ring step: send `tensor` to the next rank, receive the previous rank's into a new buffer."""

    def __init__(self, tensor: Tensor, recv_shape: tuple[int, ...], ranks: list[int], position: int, group):
        self.recv = tensor.new_empty(recv_shape)
        after, before = ranks[(position + 1) % len(ranks)], ranks[(position - 1) % len(ranks)]
        ops = [
            dist.P2POp(dist.isend, wire(tensor.contiguous()), after, group),
            dist.P2POp(dist.irecv, wire(self.recv), before, group),
        ]
        self.works = checked("ring send/receive", lambda: dist.batch_isend_irecv(ops))

    def wait(self) -> Tensor:
        for work in self.works:
            checked("ring send/receive", work.wait)
        return self.recv


def gather_tokens(x: Tensor, group: dist.ProcessGroup, sizes: list[int]) -> Tensor:
    """x [b, sizes[me], C] on every member -> [b, sum(sizes), C] on every member (padded all-gather, trimmed)."""
    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - x.shape[1])).contiguous()
    out = x.new_empty(len(sizes) * padded.shape[0], *padded.shape[1:])  # concatenated on dim 0 (gloo needs it)
    checked("token all-gather", lambda: all_gather_single(wire(out), wire(padded), group=group))
    out = out.view(len(sizes), *padded.shape)
    return torch.cat([out[j, :, :size] for j, size in enumerate(sizes)], dim=1)


def gather_batch(x: Tensor, group: dist.ProcessGroup, members: int) -> Tensor:
    """x [1, ...] on each member -> [members, ...] in group order (the CFG batch [negative, positive])."""
    out = x.new_empty(members * x.shape[0], *x.shape[1:])
    checked("CFG all-gather", lambda: all_gather_single(wire(out), wire(x.contiguous()), group=group))
    return out


def sum_over(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """In-place sum over the group (the whole job when None)."""
    checked("all-reduce", lambda: dist.all_reduce(tensor, group=group))
    return tensor


def from_main(tensor: Tensor) -> Tensor:
    """In-place: every rank gets rank 0's value."""
    checked("broadcast", lambda: dist.broadcast(tensor, src=0))
    return tensor
