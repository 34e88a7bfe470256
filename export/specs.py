"""What each exported graph looks like from outside: `ExportSpec`, one per ONNX graph.

A spec is data: input and output names with symbolic shapes and dtypes (the dynamic axes follow from
the named dims), the concrete dims used for tracing, a function from a request size (`VideoShape`)
to concrete dims, and the fixed ranges of chunk-level dims. From that it gives sample inputs, concrete
input shapes, and TensorRT min/opt/max optimization profiles. The TensorRT engine builder reads the
same specs (and `manifest.json`, which stores `ExportSpec.to_dict()` for every graph).

Named dims (every shape entry is an int or one of these names):
    batch              call batch (2 for the transformer under classifier-free guidance)
    latent_frames      T, latent frames of the whole video (>= 2 for transformer graphs, see below)
    latent_height/_width   h, w: pixels / 8 (even: the transformer uses 2x2 patches)
    grid_height/_width     hp = h/2, wp = w/2: the transformer's patch grid of one frame
    tokens_per_frame   hp * wp (rows of the per-frame RoPE tables)
    chunk_frames       video frames in one VAE-encoder chunk (1 .. mini_batch_encoder)
    chunk_latents      latent frames decoded by one VAE-decoder chunk (1 .. mini_batch_decoder)
    context_before/_after  neighbour-chunk latents the slice decoder sees (0 .. mini_batch_decoder)
    height, width      video pixels (multiples of 8)

Transformer graphs are traced with T >= 2: the reference skips the temporal position encoding for a
single latent frame, so one-frame requests need the PyTorch backend.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..models.transformer import TransformerConfig
from ..models.vae_config import VAEConfig

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
EXPORT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
FILLS = ("normal", "ones", "zeros", "timestep")

Dims = dict[str, int]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, shape (ints are static, strings name a dynamic dim) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # a key of TORCH_DTYPES
    fill: str = "normal"  # sample values: normal, ones (masks), zeros (style), timestep (uniform 0..1000)

    def resolve(self, dims: Dims) -> Shape:
        """The concrete shape for the named dims `dims`."""
        missing = [d for d in self.shape if isinstance(d, str) and d not in dims]
        if missing:
            raise ValueError(f"{self.name}: no value for dim(s) {missing}; got {sorted(dims)}")
        return tuple(dims[d] if isinstance(d, str) else d for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class VideoShape:
    """A request size: call batch, video frames, pixel height and width (multiples of 16)."""

    batch: int
    frames: int
    height: int
    width: int


@dataclass(frozen=True)
class ExportSpec:
    """The interface of one ONNX graph; see the module docstring for the dim names."""

    name: str  # graph name; the file is `<name>.onnx`
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    trace_dims: Dims  # dims the graph is traced at: distinct values >= 2, so no dim is specialized or tied
    dims_for: Callable[[VideoShape], Dims]  # the dims one request size uses (the chunk size for chunk dims)
    dim_bounds: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # fixed (min, max) dims

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor name: {axis: dim name}} for every input and output with a dynamic dim."""
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes

    def shapes(self, dims: Dims) -> dict[str, Shape]:
        """Concrete input shapes for `dims`."""
        return {t.name: t.resolve(dims) for t in self.inputs}

    def sample_inputs(self, dims: Dims | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """Deterministic inputs of the right shapes and dtypes (at `trace_dims` when `dims` is None)."""
        dims = self.trace_dims if dims is None else dims
        gen = torch.Generator().manual_seed(seed)
        return {t.name: _sample(t, t.resolve(dims), gen) for t in self.inputs}

    def profile(
        self, shapes: Sequence[VideoShape], opt: VideoShape | None = None
    ) -> dict[str, tuple[Shape, Shape, Shape]]:
        """TensorRT optimization profile: {input: (min, opt, max)} covering every request size in `shapes`.

        Each named dim ranges from its smallest to its largest value over the sizes' dims (so derived dims
        such as tokens_per_frame take real values, not the product of two other sizes' extremes), `opt`
        defaults to the largest request, and chunk-level dims take their fixed bounds. Whether the max is
        itself a real size is up to the caller's grouping (engine/profiles.py).
        """
        if not shapes:
            raise ValueError("profile: pass at least one VideoShape")
        dims = [self.dims_for(shape) for shape in shapes]
        low = {name: min(d[name] for d in dims) for name in dims[0]}
        high = {name: max(d[name] for d in dims) for name in dims[0]}
        opt_dims = self.dims_for(opt or max(shapes, key=lambda s: s.batch * s.frames * s.height * s.width))
        for name, (lo, hi) in self.dim_bounds.items():
            low[name], high[name] = lo, hi
        return {t.name: (t.resolve(low), t.resolve(opt_dims), t.resolve(high)) for t in self.inputs}

    @property
    def size_dims(self) -> list[str]:
        """The named dims of the inputs that follow the request size (chunk-level dims excluded)."""
        names = [d for t in self.inputs for d in t.shape if isinstance(d, str) and d not in self.dim_bounds]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in manifest.json."""
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dynamic_axes": {k: {str(a): d for a, d in v.items()} for k, v in self.dynamic_axes.items()},
            "trace_dims": dict(self.trace_dims),
            "dim_bounds": {k: list(v) for k, v in self.dim_bounds.items()},
        }


def video_shapes(
    resolutions: Sequence[tuple[int, int]], frames: Sequence[int], batch: Sequence[int] = (1,)
) -> list[VideoShape]:
    """Every (batch, frames, height, width) combination, for `ExportSpec.profile`."""
    return [VideoShape(b, f, h, w) for b, f, (h, w) in itertools.product(batch, frames, resolutions)]


def _sample(t: TensorSpec, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    dtype = TORCH_DTYPES[t.dtype]
    if t.fill == "ones":
        return torch.ones(shape, dtype=dtype)
    if t.fill == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if t.fill == "timestep":
        return (torch.rand(shape, generator=gen) * 1000).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


# -- transformer ------------------------------------------------------------------------------------------------
_TRANSFORMER_TRACE = {"batch": 2, "frames": 3, "grid_height": 5, "grid_width": 7}  # distinct, so dynamo ties no dims


def _transformer_dims(vae: VAEConfig, patch: int) -> Callable[[VideoShape], Dims]:
    def dims_for(shape: VideoShape) -> Dims:
        h, w = shape.height // vae.spatial_factor, shape.width // vae.spatial_factor
        return _grid_dims(shape.batch, vae.latent_frames(shape.frames), h // patch, w // patch, patch)

    return dims_for


def _grid_dims(batch: int, frames: int, grid_height: int, grid_width: int, patch: int) -> Dims:
    return {
        "batch": batch, "latent_frames": frames, "grid_height": grid_height, "grid_width": grid_width,
        "latent_height": grid_height * patch, "latent_width": grid_width * patch,
        "tokens_per_frame": grid_height * grid_width,
    }  # fmt: skip


def _conditioning_inputs(cfg: TransformerConfig, dtype: str) -> tuple[TensorSpec, ...]:
    """The transformer inputs between the latents and RoPE, in the forward's order. The timestep and the T5
    embeddings (like the CLIP tokens in `transformer_spec`) are float32 in every graph dtype, as the torch
    denoiser keeps them: the model rounds them where the reference does."""
    return (
        TensorSpec("timestep", ("batch",), "float32", "timestep"),
        TensorSpec("encoder_hidden_states", ("batch", cfg.text_len, cfg.cross_attention_dim), dtype),
        TensorSpec("text_embedding_mask", ("batch", cfg.text_len), "int64", "ones"),
        TensorSpec("encoder_hidden_states_t5", ("batch", cfg.text_len_t5, cfg.cross_attention_dim_t5), "float32"),
        TensorSpec("text_embedding_mask_t5", ("batch", cfg.text_len_t5), "int64", "ones"),
        TensorSpec("image_meta_size", ("batch", 6), dtype),
        TensorSpec("style", ("batch",), "int64", "zeros"),
    )


def transformer_spec(cfg: TransformerConfig, vae: VAEConfig, dtype: str, clip_tokens: int) -> ExportSpec:
    """The whole transformer: the pipeline's denoiser call with image_rotary_emb split into rope_cos/rope_sin."""
    conditioning = _conditioning_inputs(cfg, dtype)
    latent = ("batch", "latent_frames", "latent_height", "latent_width")
    inputs = (
        TensorSpec("hidden_states", (latent[0], cfg.in_channels - 2 * vae.latent_channels, *latent[1:]), dtype),
        *conditioning,
        TensorSpec("rope_cos", ("tokens_per_frame", cfg.attention_head_dim), "float32"),
        TensorSpec("rope_sin", ("tokens_per_frame", cfg.attention_head_dim), "float32"),
        TensorSpec("inpaint_latents", (latent[0], 2 * vae.latent_channels, *latent[1:]), dtype),
        TensorSpec("clip_encoder_hidden_states", ("batch", clip_tokens, cfg.projection_dim), "float32"),
        TensorSpec("clip_attention_mask", ("batch", cfg.n_query), dtype, "ones"),
    )
    outputs = (TensorSpec("model_output", (latent[0], cfg.output_channels, *latent[1:]), dtype),)
    trace = _grid_dims(**_TRANSFORMER_TRACE, patch=cfg.patch_size)
    return ExportSpec("transformer", inputs, outputs, trace, _transformer_dims(vae, cfg.patch_size))


def transformer_stage_specs(cfg: TransformerConfig, vae: VAEConfig, dtype: str, clip_tokens: int) -> list[ExportSpec]:
    """embed, block_plain, block_skip and unembed: the per-block graphs (see export/wrappers.py).

    Block graphs take the block's weights as inputs named by the block's state-dict keys (`attn1.to_q.weight`),
    so one graph per block type serves every block index. embed's `tokens` output and unembed's input are
    [B, T, hp, wp, D]; the block graphs take and give [B, T, S, D] (S = hp*wp, a free reshape), so their
    shapes never name a height or a width and one optimization profile covers every aspect bucket.
    """
    whole = transformer_spec(cfg, vae, dtype, clip_tokens)
    tokens = ("batch", "latent_frames", "grid_height", "grid_width", cfg.inner_dim)
    flat = ("batch", "latent_frames", "tokens_per_frame", cfg.inner_dim)
    text = TensorSpec("text_states", ("batch", cfg.text_tokens, cfg.cross_attention_dim), dtype)
    clip = TensorSpec("clip_states", ("batch", cfg.n_query, cfg.cross_attention_dim), dtype)
    temb = TensorSpec("temb", ("batch", cfg.inner_dim), dtype)
    rope = tuple(t for t in whole.inputs if t.name.startswith("rope_"))
    embed_inputs = tuple(t for t in whole.inputs if not t.name.startswith("rope_"))
    specs = [dataclasses.replace(whole, name="transformer_embed", inputs=embed_inputs,
                                 outputs=(TensorSpec("tokens", tokens, dtype), temb, text, clip))]  # fmt: skip
    for name, has_skip in (("transformer_block_plain", False), ("transformer_block_skip", True)):
        block = example_block(cfg, has_skip)
        data = [TensorSpec("tokens", flat, dtype), temb, text, clip, *rope]
        if has_skip:
            data.append(TensorSpec("skip", flat, dtype))
        weights = [TensorSpec(k, tuple(v.shape), dtype) for k, v in block.state_dict().items()]
        specs.append(dataclasses.replace(whole, name=name, inputs=tuple(data + weights),
                                         outputs=(TensorSpec("tokens_out", flat, dtype),)))  # fmt: skip
    unembed_inputs = (TensorSpec("tokens", tokens, dtype), temb)
    specs.append(dataclasses.replace(whole, name="transformer_unembed", inputs=unembed_inputs))
    return specs


def example_block_index(cfg: TransformerConfig, has_skip: bool) -> int:
    """The first block of a type: 0 for plain blocks, num_layers//2 + 1 for long-skip blocks."""
    return cfg.skip_blocks[0] if has_skip else 0


def example_block(cfg: TransformerConfig, has_skip: bool) -> torch.nn.Module:
    """A block of the given type on the meta device (shapes only, no memory; shared: copy it before changing it)."""
    return _meta_transformer(cfg).blocks[example_block_index(cfg, has_skip)]


@functools.lru_cache(maxsize=2)
def _meta_transformer(cfg: TransformerConfig) -> torch.nn.Module:
    from ..models.transformer import RuyiTransformer3D

    with torch.device("meta"):
        return RuyiTransformer3D(cfg)


# -- VAE --------------------------------------------------------------------------------------------------------
def vae_encoder_spec(vae: VAEConfig, dtype: str) -> ExportSpec:
    """One encoder chunk (zero time padding): video [B, 3, f, H, W] -> moments (mean | logvar, unclamped)."""
    s = vae.spatial_factor
    video = TensorSpec("video", ("batch", vae.in_channels, "chunk_frames", "height", "width"), dtype)
    moments = TensorSpec(
        "moments", ("batch", 2 * vae.latent_channels, "chunk_latents", "latent_height", "latent_width"), dtype
    )

    def dims_for(shape: VideoShape) -> Dims:
        frames = min(shape.frames, vae.mini_batch_encoder)
        return {"batch": shape.batch, "chunk_frames": frames, "height": shape.height, "width": shape.width}

    trace = {"batch": 2, "chunk_frames": max(vae.mini_batch_encoder, 3), "height": 5 * s, "width": 7 * s}
    bounds = {"chunk_frames": (1, vae.mini_batch_encoder)}
    return ExportSpec("vae_encoder", (video,), (moments,), trace, dims_for, bounds)


def vae_decoder_specs(vae: VAEConfig, dtype: str) -> list[ExportSpec]:
    """Slice-mode decoder chunks: `vae_decoder` (a chunk with its neighbour context latents, possibly 0 frames)
    and `vae_decoder_one_frame` (the lone first latent of an odd count: no temporal upsampling)."""
    if vae.cache_compression_vae:
        raise ValueError(
            "cache_compression_vae decoders are not exportable yet (their per-conv cache would be graph inputs); "
            "use --backend torch for this VAE."
        )
    s, step, latent = vae.spatial_factor, vae.mini_batch_decoder, vae.latent_channels
    spatial = ("latent_height", "latent_width")
    video_shape = ("batch", vae.out_channels, "chunk_video_frames", "height", "width")

    def dims_for(shape: VideoShape) -> Dims:
        h, w = shape.height // s, shape.width // s
        chunk = min(step, vae.latent_frames(shape.frames))
        return {"batch": shape.batch, "chunk_latents": chunk, "context_before": step, "context_after": step,
                "latent_height": h, "latent_width": w}  # fmt: skip

    inputs = tuple(
        TensorSpec(name, ("batch", latent, frames, *spatial), dtype)
        for name, frames in (("latents", "chunk_latents"), ("context_before",) * 2, ("context_after",) * 2)
    )
    trace = {
        "batch": 2,
        "chunk_latents": 3,
        "context_before": 4,
        "context_after": 5,
        "latent_height": 6,
        "latent_width": 7,
    }
    bounds = {"chunk_latents": (1, step), "context_before": (0, step), "context_after": (0, step)}
    chunk = ExportSpec("vae_decoder", inputs, (TensorSpec("video", video_shape, dtype),), trace, dims_for, bounds)
    one = TensorSpec("latents", ("batch", latent, 1, *spatial), dtype)
    one_video = TensorSpec("video", ("batch", vae.out_channels, 1, "height", "width"), dtype)
    one_trace = {k: trace[k] for k in ("batch", *spatial)}
    one_frame = ExportSpec("vae_decoder_one_frame", (one,), (one_video,), one_trace, dims_for)
    return [chunk, one_frame]


# -- image encoder ----------------------------------------------------------------------------------------------
def image_encoder_spec(image_size: int, tokens: int, hidden: int, dtype: str) -> ExportSpec:
    """CLIP vision tower: pixel_values [B, 3, S, S] -> patch tokens [B, N, C] (no CLS), float32 in every graph
    dtype (the residual stream is float32, as in the reference under autocast)."""
    pixels = TensorSpec("pixel_values", ("batch", 3, image_size, image_size), dtype)
    out = TensorSpec("image_tokens", ("batch", tokens, hidden), "float32")
    return ExportSpec("image_encoder", (pixels,), (out,), {"batch": 2}, lambda shape: {"batch": shape.batch})
