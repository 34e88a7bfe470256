"""FP8 weight storage selects exactly the parameters the original's rule selects on the original's module tree.

The original (predict_i2v.py:132-151, comfyui/comfyui_nodes.py:102-121, IamCreateAI/Ruyi-Models 6c7b597) picks
modules by class name: lite/strong every `Linear` above (or at) 2816^2 weights, extreme every leaf module with
parameters whose class is not Embedding, LayerNorm, Conv2d or NonDynamicallyQuantizableLinear. `ORIGINAL_TREE`
below writes down, from the original's source, every module of HunyuanTransformer3DModel that owns parameters:
its class name there and whether it is a leaf. The rule is applied to that tree here, independently of our
modules, and compared with the parameters our `store_weights_fp8` converts (judged at full size on the meta
device; state-dict keys are the same in both models).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from ruyi_trt.models.transformer import RuyiTransformer3D, TransformerConfig
from ruyi_trt.weights.fp8_storage import FP8_DTYPES, resolve_fp8_storage, store_weights_fp8

ORIGINAL_SKIPPED = ("Embedding", "LayerNorm", "Conv2d", "NonDynamicallyQuantizableLinear")


def original_tree(cfg: TransformerConfig) -> dict[str, tuple[str, bool, tuple[str, ...]]]:
    """module path -> (class name in the original, is a leaf, its own parameter names), for the modules of the
    original HunyuanTransformer3DModel (basic blocks, inpaint branch) that own parameters.

    Sources: transformer3d.py (top level, Resampler with norm_layer=nn.LayerNorm), attention.py (HunyuanDiTBlock,
    GEGLU), norm.py (AdaLayerNormShift with FP32LayerNorm), embeddings.py (HunyuanCombinedTimestep...,
    HunyuanDiTAttentionPool, PixArtAlphaTextProjection), resampler.py (nn.MultiheadAttention, whose out_proj is
    torch's NonDynamicallyQuantizableLinear), and diffusers: Attention with qk_norm="layer_norm" (nn.LayerNorm),
    FeedForward (GELU.proj, Dropout, Linear), PatchEmbed (Conv2d), TimestepEmbedding, AdaLayerNormContinuous
    (Linear + LayerNorm without affine parameters)."""
    linear, bias_free = ("weight", "bias"), ("weight",)
    tree: dict[str, tuple[str, bool, tuple[str, ...]]] = {
        "": ("HunyuanTransformer3DModel", False, ("text_embedding_padding", "clip_padding")),
        "text_embedder.linear_1": ("Linear", True, linear),
        "text_embedder.linear_2": ("Linear", True, linear),
        "pos_embed.proj": ("Conv2d", True, linear),
        "time_extra_emb.timestep_embedder.linear_1": ("Linear", True, linear),
        "time_extra_emb.timestep_embedder.linear_2": ("Linear", True, linear),
        "time_extra_emb.pooler": ("HunyuanDiTAttentionPool", False, ("positional_embedding",)),
        **{f"time_extra_emb.pooler.{n}_proj": ("Linear", True, linear) for n in "kqvc"},
        "time_extra_emb.style_embedder": ("Embedding", True, ("weight",)),
        "time_extra_emb.extra_embedder.linear_1": ("Linear", True, linear),
        "time_extra_emb.extra_embedder.linear_2": ("Linear", True, linear),
        "clip_projection": ("Resampler", False, ("pos_embed", "query")),
        "clip_projection.attn": ("MultiheadAttention", False, ("in_proj_weight", "in_proj_bias")),
        "clip_projection.attn.out_proj": ("NonDynamicallyQuantizableLinear", True, linear),
        "clip_projection.ln_q": ("LayerNorm", True, linear),
        "clip_projection.ln_kv": ("LayerNorm", True, linear),
        "norm_out.linear": ("Linear", True, linear),
        "proj_out": ("Linear", True, linear),
    }
    if cfg.projection_dim != cfg.cross_attention_dim:
        tree["clip_projection.kv_proj"] = ("Linear", True, bias_free)
    for i in range(cfg.num_layers):
        block = {
            "norm1.linear": "Linear", "norm1.norm": "FP32LayerNorm", "norm2": "FP32LayerNorm",
            "norm_clip": "FP32LayerNorm", "gate_clip.norm": "FP32LayerNorm", "gate_clip.proj": "Linear",
            "norm_clip_out": "FP32LayerNorm", "norm3": "FP32LayerNorm", "ff.net.0.proj": "Linear", "ff.net.2": "Linear",
        }  # fmt: skip
        for attn in ("attn1", "attn2", "attn_clip"):
            block.update({f"{attn}.{n}": "Linear" for n in ("to_q", "to_k", "to_v", "to_out.0")})
            block.update({f"{attn}.norm_q": "LayerNorm", f"{attn}.norm_k": "LayerNorm"})
        if i > cfg.num_layers // 2:
            block.update({"skip_norm": "FP32LayerNorm", "skip_linear": "Linear"})
        tree.update({f"blocks.{i}.{name}": (cls, True, linear) for name, cls in block.items()})
    return tree


def original_selection(cfg: TransformerConfig, mode: str, shapes: dict[str, torch.Size]) -> set[str]:
    """The parameter names the original's rule converts on `original_tree` (weight shapes from the state dict)."""
    selected = set()
    for path, (cls, leaf, params) in original_tree(cfg).items():
        if mode in ("lite", "strong"):
            threshold = cfg.hidden_size**2 - (mode == "strong")  # the original hard-codes 2816**2
            out_dim, in_dim = shapes[f"{path}.weight"][:2] if cls == "Linear" else (0, 0)
            chosen = cls == "Linear" and out_dim * in_dim > threshold
        else:
            chosen = leaf and cls not in ORIGINAL_SKIPPED
        if chosen:
            selected.update(f"{path}.{p}" if path else p for p in params)
    return selected


def converted_parameters(model: torch.nn.Module) -> set[str]:
    """The parameters `store_weights_fp8` put into fp8 storage, by their state-dict names."""
    names = set()
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                assert plist.original0.dtype in FP8_DTYPES.values()
                names.add(f"{path}.{name}")
    return names


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = RuyiTransformer3D(TransformerConfig.full())
    return {k: v.shape for k, v in model.state_dict().items()}


def test_original_tree_covers_every_parameter(full_shapes) -> None:
    """The written-down tree names exactly our parameters (so the comparison below misses none)."""
    cfg = TransformerConfig.full()
    with torch.device("meta"):
        model = RuyiTransformer3D(cfg)
    described = {f"{path}.{p}" if path else p for path, (_, _, params) in original_tree(cfg).items() for p in params}
    assert described == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize(("mode", "layers"), [("lite", 144), ("strong", 505), ("extreme", 930)])
def test_fp8_selects_the_original_parameters(mode: str, layers: int, full_shapes) -> None:
    """Full size (meta device): the same parameter set per mode; lite/strong counts as the architecture notes."""
    cfg = TransformerConfig.full()
    with torch.device("meta"):
        model = RuyiTransformer3D(cfg).to(torch.bfloat16)
    assert store_weights_fp8(model, mode, cfg.hidden_size) == layers
    ours = converted_parameters(model)
    assert ours == original_selection(cfg, mode, full_shapes)
    assert not any(".norm_q." in n or ".norm_k." in n or n.startswith("clip_projection") for n in ours)


def test_extreme_keeps_the_plain_norms_on_the_tiny_model() -> None:
    cfg = TransformerConfig.tiny()
    model = RuyiTransformer3D(cfg).to(torch.bfloat16)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    store_weights_fp8(model, "extreme", cfg.hidden_size, "fp8_e5m2")
    attn = model.blocks[0].attn1
    assert attn.norm_q.weight.dtype == torch.bfloat16 and not parametrize.is_parametrized(attn.norm_q)
    assert model.blocks[0].norm2.parametrizations.weight.original0.dtype == torch.float8_e5m2
    assert converted_parameters(model) == original_selection(cfg, "extreme", shapes)


def test_fp8_storage_auto_is_e4m3fn() -> None:
    assert resolve_fp8_storage("auto") == "fp8_e4m3fn"
    assert resolve_fp8_storage("fp8_e5m2") == "fp8_e5m2"
    with pytest.raises(ValueError, match="fp8_storage: 'fp16' is unknown"):
        resolve_fp8_storage("fp16")
