"""Export wrappers: modules whose forward takes exactly the graph inputs of one `ExportSpec`, in order.

They fix the non-tensor arguments of the models (the RoPE tuple, the block's frame count, the decoder's
context and padding mode) and take no part in PyTorch inference, so they live here and not in models/.

Per-block graphs: one graph per block *type* (plain, long-skip) whose weights are graph inputs named by
the block's state-dict keys. A streaming runtime feeds `transformer.blocks[i]`'s tensors (or the
checkpoint's `blocks.{i}.*` entries, prefix removed) to the same graph or engine for every i; nothing
is refitted. embed gives tokens as [B, T, hp, wp, D] and unembed takes them so; the block graphs take
[B, T, S, D] (S = hp*wp tokens per frame), so the frame count travels in the shapes and no block shape
names a height or width (every graph uses the same named dims as the whole model).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..models.image_encoder import CLIPImageEncoder
from ..models.transformer import RuyiTransformer3D
from ..models.vae import RuyiVAE


class TransformerGraph(nn.Module):
    """The whole transformer with RoPE as two inputs: -> model_output [B, C_out, T, h, w]."""

    def __init__(self, model: RuyiTransformer3D):
        super().__init__()
        self.model = model

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, text_embedding_mask: Tensor,
        encoder_hidden_states_t5: Tensor, text_embedding_mask_t5: Tensor, image_meta_size: Tensor, style: Tensor,
        rope_cos: Tensor, rope_sin: Tensor, inpaint_latents: Tensor, clip_encoder_hidden_states: Tensor,
        clip_attention_mask: Tensor,
    ) -> Tensor:  # fmt: skip
        return self.model(
            hidden_states, timestep, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
            text_embedding_mask_t5, image_meta_size, style, (rope_cos, rope_sin), inpaint_latents,
            clip_encoder_hidden_states, clip_attention_mask,
        )[0]  # fmt: skip


class TransformerEmbedGraph(nn.Module):
    """`embed`: -> tokens [B, T, hp, wp, D], temb, text_states, clip_states (RoPE is not needed here)."""

    def __init__(self, model: RuyiTransformer3D):
        super().__init__()
        self.model = model
        # embed() tiles the RoPE tables over frames; the block graphs do that themselves, so any table will do.
        self.register_buffer("rope_unused", torch.zeros(1, model.config.attention_head_dim), persistent=False)

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, text_embedding_mask: Tensor,
        encoder_hidden_states_t5: Tensor, text_embedding_mask_t5: Tensor, image_meta_size: Tensor, style: Tensor,
        inpaint_latents: Tensor, clip_encoder_hidden_states: Tensor, clip_attention_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        inputs = self.model.embed(
            hidden_states, timestep, encoder_hidden_states, text_embedding_mask, encoder_hidden_states_t5,
            text_embedding_mask_t5, image_meta_size, style, (self.rope_unused, self.rope_unused), inpaint_latents,
            clip_encoder_hidden_states, clip_attention_mask,
        )  # fmt: skip
        batch = inputs.hidden.shape[0]
        tokens = inputs.hidden.reshape(batch, inputs.num_frames, inputs.grid_height, inputs.grid_width, -1)
        return tokens, inputs.temb, inputs.text_states, inputs.clip_states


class TransformerBlockGraph(nn.Module):
    """One block with its weights as inputs: (tokens, temb, text_states, clip_states, rope_cos, rope_sin,
    [skip], *weights in `weight_names` order) -> tokens_out; tokens, skip and tokens_out are [B, T, S, D].

    A copy of the block has its parameters and buffers turned into plain attributes, which forward sets
    to the weight inputs (torch.func.functional_call cannot run under the TorchScript tracer).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.weight_names = list(block.state_dict())
        self.has_skip = block.has_skip
        self.block = copy.deepcopy(block)
        self.slots = []  # (owning module, attribute) per weight name
        for name in self.weight_names:
            path, _, leaf = name.rpartition(".")
            owner = self.block.get_submodule(path)
            value = owner._parameters.pop(leaf, None)
            value = owner._buffers.pop(leaf, value)
            setattr(owner, leaf, value.detach())  # a plain attribute now; forward replaces it
            self.slots.append((owner, leaf))

    def forward(
        self, tokens: Tensor, temb: Tensor, text_states: Tensor, clip_states: Tensor, rope_cos: Tensor,
        rope_sin: Tensor, *rest: Tensor,
    ) -> Tensor:  # fmt: skip
        skip, weights = (rest[0], rest[1:]) if self.has_skip else (None, rest)
        for (owner, leaf), weight in zip(self.slots, weights, strict=True):
            setattr(owner, leaf, weight)
        batch, frames, per_frame, dim = tokens.shape
        x = tokens.reshape(batch, frames * per_frame, dim)  # (B, N, D)
        if skip is not None:
            skip = skip.reshape(batch, frames * per_frame, dim)
        cos, sin = rope_cos.repeat(frames, 1), rope_sin.repeat(frames, 1)  # per-frame tables tiled: (N, d)
        out = self.block(x, temb, text_states, clip_states, cos, sin, frames, skip)
        return out.reshape(batch, frames, per_frame, dim)


class TransformerUnembedGraph(nn.Module):
    """`unembed`: (tokens [B, T, hp, wp, D], temb) -> model_output [B, C_out, T, h, w]."""

    def __init__(self, model: RuyiTransformer3D):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, temb: Tensor) -> Tensor:
        batch, frames, grid_height, grid_width, dim = tokens.shape
        x = tokens.reshape(batch, frames * grid_height * grid_width, dim)
        return self.model.unembed(x, temb, frames, grid_height, grid_width)


class VAEEncoderGraph(nn.Module):
    """One encoder chunk: video [B, 3, f, H, W] -> moments [B, 2*latent, f', H/8, W/8]."""

    def __init__(self, vae: RuyiVAE):
        super().__init__()
        self.vae = vae

    def forward(self, video: Tensor) -> Tensor:
        return self.vae.encode_chunk(video)


class VAEDecoderGraph(nn.Module):
    """One slice-mode decoder chunk with its context latents (either may have 0 frames) -> video."""

    def __init__(self, vae: RuyiVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor, context_before: Tensor, context_after: Tensor) -> Tensor:
        return self.vae.decode_chunk(latents, context_before, context_after)


class VAEDecoderOneFrameGraph(nn.Module):
    """The single-latent first chunk of an odd latent count: latents [B, C, 1, h, w] -> one frame."""

    def __init__(self, vae: RuyiVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode_chunk(latents, one_frame=True)


class ImageEncoderGraph(nn.Module):
    """pixel_values [B, 3, S, S] -> CLIP patch tokens [B, N, C]."""

    def __init__(self, encoder: CLIPImageEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encoder(pixel_values)
