"""The VAE of a parallel job: temporal chunks spread over every rank, the result summed back onto every rank.

In slice mode (Ruyi's VAE) every encoder chunk and every decoder chunk is an independent computation (a decoder
chunk reads its neighbour latents as context, not their results), so rank r computes a contiguous run of the
chunk plan and leaves zeros in the others; one all-reduce (sum) then gives every rank the whole result, bit for
bit what one process computes (x + 0 = x). The pipeline's seam smoothing re-encodes and re-decodes through the
same backends, so it is spread too, and every rank ends with the same video (rank 0 writes it).
Cache mode chains each decoder chunk to the previous one, so it decodes serially on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...models.vae import RuyiVAE, decode_in_chunks, encode_in_chunks
from ..backends.protocol import Components
from ..backends.torch_backend import TorchBackend
from .comm import sum_over
from .config import split_sizes
from .context import ParallelContext


def chunk_owners(count: int, ranks: int) -> list[int]:
    """Rank of each of `count` chunks: contiguous runs of (almost) equal length, rank 0 first."""
    return [rank for rank, size in enumerate(split_sizes(count, ranks)) for _ in range(size)]


class _OwnedChunks:
    """Counts the chunk calls of one pass over a chunk plan and says which ones this rank computes."""

    def __init__(self, count: int, context: ParallelContext):
        self.owners, self.rank, self.index = chunk_owners(count, context.world_size), context.rank, -1

    def next_is_mine(self) -> bool:
        self.index += 1
        return self.owners[self.index] == self.rank


def encode_moments(vae: RuyiVAE, video: Tensor, context: ParallelContext) -> Tensor:
    """`vae.encode(video)` as (mean | clamped logvar) [B, 2*latent, T, h, w], chunks spread over the ranks."""
    config = vae.config
    chunks = config.encode_chunks(video.shape[2])
    owned = _OwnedChunks(len(chunks), context)
    batch, _, _, height, width = video.shape
    factor = config.spatial_factor

    def encode_chunk(part: Tensor) -> Tensor:
        if owned.next_is_mine():
            return vae.encode_chunk(part)
        shape = (batch, 2 * config.latent_channels, config.chunk_latent_frames(part.shape[2]))
        return part.new_zeros(*shape, height // factor, width // factor)

    moments = sum_over(encode_in_chunks(config, video, encode_chunk))
    mean, logvar = moments.chunk(2, dim=1)
    return torch.cat([mean, logvar.clamp(-30.0, 20.0)], dim=1)


def decode(vae: RuyiVAE, latents: Tensor, context: ParallelContext) -> Tensor:
    """`vae.decode(latents)` with the decoder chunks spread over the ranks (serial in cache mode)."""
    config = vae.config
    chunks = config.decode_chunks(latents.shape[2])
    if config.cache_compression_vae or len(chunks) == 1:
        return vae.decode(latents)
    owned = _OwnedChunks(len(chunks), context)
    factor = config.spatial_factor
    batch, _, _, height, width = latents.shape

    def decode_chunk(part: Tensor, before: Tensor | None, after: Tensor | None, one_frame: bool) -> Tensor:
        plan = chunks[owned.index + 1]
        if owned.next_is_mine():
            return vae.decode_chunk(part, before, after, one_frame)
        frames = config.chunk_video_frames(plan)
        return part.new_zeros(batch, config.out_channels, frames, height * factor, width * factor)

    return sum_over(decode_in_chunks(config, latents, decode_chunk))


def _bind(fn: Callable[[RuyiVAE, Tensor, ParallelContext], Tensor], context: ParallelContext, name: str):
    def call(vae: RuyiVAE, **inputs: Tensor) -> Tensor:
        return fn(vae, inputs[name], context)

    return call


def spread_vae(components: Components, vae: RuyiVAE, context: ParallelContext, home: torch.device) -> Components:
    """`components` with VAE encoder and decoder backends that split their chunks over the ranks."""
    device, dtype = components.device, components.dtype
    components.vae_encoder = TorchBackend(vae, _bind(encode_moments, context, "video"), device, dtype, home)
    components.vae_decoder = TorchBackend(vae, _bind(decode, context, "latents"), device, dtype, home)
    return components
