"""Tests of models/transformer.py against the reference golden files, plus loading, dtype and shape paths.

Every shape is read from the golden files, so a held-out golden set with other sizes runs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ruyi_trt.models.checkpoint_io import CheckpointError, load_into, save_component
from ruyi_trt.models.rope import crop_region, rotary_embedding
from ruyi_trt.models.transformer import RuyiTransformer3D, TransformerConfig, computed_state
from ruyi_trt.testing import assert_close_scaled

REL_TOL = 1e-4  # float32 vs the float32 reference: they differ only by op order


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    config = json.loads((golden_dir / "transformer_config.json").read_text())
    inputs = load_file(str(golden_dir / "transformer_inputs.safetensors"))
    kwargs = {k: v for k, v in inputs.items() if not k.startswith("image_rotary_emb")}
    kwargs["image_rotary_emb"] = (inputs["image_rotary_emb_cos"], inputs["image_rotary_emb_sin"])
    return {
        "config": config,
        "state": load_file(str(golden_dir / "transformer_state_dict.safetensors")),
        "kwargs": kwargs,
        "outputs": load_file(str(golden_dir / "transformer_outputs.safetensors")),
        "manifest": json.loads((golden_dir / "manifest.json").read_text()),
    }


@pytest.fixture(scope="module")
def golden_model(golden: dict) -> RuyiTransformer3D:
    model = RuyiTransformer3D.from_config(golden["config"]["base_config_json"])
    model.load_state_dict(golden["state"], strict=True)
    return model.eval().requires_grad_(False)


def make_inputs(
    config: TransformerConfig, batch=2, frames=3, height=8, width=12, clip_tokens=64, seed=0, dtype=torch.float32
):
    """Random inputs of the reference call for `config` (latent height/width in cells)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    latent = config.in_channels // 3
    text_mask = torch.ones(batch, config.text_len, dtype=torch.int64)
    text_mask[0, config.text_len // 2 :] = 0
    t5_mask = torch.ones(batch, config.text_len_t5, dtype=torch.int64)
    t5_mask[-1, config.text_len_t5 // 3 :] = 0
    clip_mask = torch.ones(batch, config.n_query)
    clip_mask[0] = 0
    return {
        "hidden_states": randn(batch, latent, frames, height, width),
        "timestep": torch.linspace(961, 481, batch).to(dtype),
        "encoder_hidden_states": randn(batch, config.text_len, config.cross_attention_dim),
        "text_embedding_mask": text_mask,
        "encoder_hidden_states_t5": randn(batch, config.text_len_t5, config.cross_attention_dim_t5),
        "text_embedding_mask_t5": t5_mask,
        "image_meta_size": torch.tensor([[1024, 1024, height * 8, width * 8, 0, 0]] * batch, dtype=dtype),
        "style": torch.zeros(batch, dtype=torch.int64),
        "image_rotary_emb": rotary_embedding(height, width, config.patch_size, config.attention_head_dim),
        "inpaint_latents": randn(batch, config.in_channels - latent, frames, height, width),
        "clip_encoder_hidden_states": randn(batch, clip_tokens, config.projection_dim),
        "clip_attention_mask": clip_mask.to(dtype),
    }


def tiny_model(seed: int = 0) -> RuyiTransformer3D:
    torch.manual_seed(seed)
    return RuyiTransformer3D(TransformerConfig.tiny()).eval().requires_grad_(False)


def test_transformer_golden(golden: dict, golden_model: RuyiTransformer3D):
    """float32 forward vs the reference output and intermediates: max abs err <= 1e-4 * max(1, |expected|max)."""
    outputs = golden["outputs"]
    captured: dict[str, torch.Tensor] = {}

    def capture(name):
        return lambda module, args, out: captured.__setitem__(name, out)

    named = {"pos_embed": golden_model.pos_embed, "time_extra_emb.pooler": golden_model.time_extra_emb.pooler,
             "temb": golden_model.time_extra_emb, "text_embedder": golden_model.text_embedder,
             "clip_projection": golden_model.clip_projection, "norm_out": golden_model.norm_out,
             "proj_out": golden_model.proj_out}  # fmt: skip
    named.update({f"blocks.{i}": block for i, block in enumerate(golden_model.blocks)})
    handles = [module.register_forward_hook(capture(name)) for name, module in named.items()]
    try:
        with torch.no_grad():
            (out,) = golden_model(**golden["kwargs"], return_dict=False)
    finally:
        for handle in handles:
            handle.remove()

    assert_close_scaled(out, outputs["output"], REL_TOL, "output")
    for name in named:
        expected = outputs[f"intermediate.{name}"]
        actual = captured[name].reshape(expected.shape)  # text_embedder is recorded flattened to [B*L, C]
        assert_close_scaled(actual, expected, REL_TOL, name)


def test_rotary_embedding_golden(golden: dict):
    rope = golden["manifest"]["transformer_rope"]
    height, width = golden["kwargs"]["hidden_states"].shape[-2:]
    patch = golden["config"]["base_config_json"]["patch_size"]
    assert (rope["grid_height"], rope["grid_width"]) == (height // patch, width // patch)
    crops = crop_region(rope["grid_height"], rope["grid_width"], rope["base_size"])
    assert [list(c) for c in crops] == rope["grid_crops_coords"]
    cos, sin = rotary_embedding(height, width, patch, rope["rope_dim"])
    expected_cos, expected_sin = golden["kwargs"]["image_rotary_emb"]
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width,head_dim", [(96, 96, 176), (72, 126, 176), (126, 72, 176), (10, 6, 8)])
def test_rotary_embedding_matches_diffusers(height, width, head_dim):
    """The reference ran diffusers 0.31, whose `get_2d_rotary_pos_embed` lays the grid out with
    np.linspace(start, stop, n, endpoint=False, dtype=float32). diffusers >= 0.32 builds it with
    torch.linspace(start, stop * (n - 1) / n, n), which is another grid whenever the crop does not start at 0
    (every non-square latent: up to 1.6 off here) and differs by float32 rounding (2e-6) when it does; so the
    grid is made here as 0.31 made it, and diffusers' unchanged `get_2d_rotary_pos_embed_from_grid` does the rest."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    grid = (height // 2, width // 2)
    (top, left), (bottom, right) = crop_region(*grid, 32)
    rows = np.linspace(top, bottom, grid[0], endpoint=False, dtype=np.float32)
    columns = np.linspace(left, right, grid[1], endpoint=False, dtype=np.float32)
    positions = np.stack(np.meshgrid(columns, rows), axis=0).reshape(2, 1, *grid)
    expected = embeddings.get_2d_rotary_pos_embed_from_grid(head_dim, positions, use_real=True)
    actual = rotary_embedding(height, width, 2, head_dim)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


def test_load_without_computed_tables(golden: dict, golden_model: RuyiTransformer3D):
    """A checkpoint lacking t_embed.pe / pos_embed loads through load_into(computed=...) to the same output."""
    config = golden_model.config
    fixed = computed_state(config)
    for key, value in fixed.items():
        torch.testing.assert_close(value, golden["state"][key], rtol=0, atol=1e-6, msg=key)
    trimmed = {k: v for k, v in golden["state"].items() if k not in fixed}
    with torch.device("meta"):
        model = RuyiTransformer3D(config)
    load_into(model, trimmed, source="golden", computed=lambda: computed_state(config))
    with torch.no_grad():
        (expected,) = golden_model(**golden["kwargs"])
        (actual,) = model(**golden["kwargs"])
    assert_close_scaled(actual, expected, 1e-6, "output without computed tables")


def test_key_mismatch_is_named(golden: dict, golden_model: RuyiTransformer3D):
    state = dict(golden["state"])
    state["time_extra_emb.pooler.q_projection.weight"] = state.pop("time_extra_emb.pooler.q_proj.weight")
    with torch.device("meta"):
        model = RuyiTransformer3D(golden_model.config)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*q_projection\.weight"):
        load_into(model, state, source="golden", computed=lambda: computed_state(golden_model.config))


def test_save_and_from_pretrained_round_trip(tmp_path: Path):
    model = tiny_model()
    fixed = computed_state(model.config)
    state = {k: v for k, v in model.state_dict().items() if k not in fixed}  # like a checkpoint without tables
    folder = save_component(tmp_path / "transformer", model.config.to_dict(), state)
    loaded = RuyiTransformer3D.from_pretrained(folder)
    assert loaded.config == model.config
    inputs = make_inputs(model.config, batch=1, frames=2, height=6, width=4, clip_tokens=16)
    with torch.no_grad():
        # Not bit-exact: CPU kernels take other paths for the unaligned tensors of a mmapped file.
        assert_close_scaled(loaded(**inputs)[0], model(**inputs)[0], 1e-6, "round trip")


def test_extra_checkpoint_tensor_loads_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    model = tiny_model()
    state = {**model.state_dict(), "blocks.0.attn1.extra_scale": torch.ones(3)}
    folder = save_component(tmp_path / "transformer", model.config.to_dict(), state)
    with caplog.at_level("WARNING", logger="ruyi_trt.models.checkpoint_io"):
        loaded = RuyiTransformer3D.from_pretrained(folder)
    assert "1 tensor(s) not used by RuyiTransformer3D, left out: blocks.0.attn1.extra_scale" in caplog.text
    assert torch.equal(loaded.blocks[0].attn1.to_q.weight, model.blocks[0].attn1.to_q.weight)


def test_bf16_forward_is_finite():
    model = tiny_model()
    inputs = make_inputs(model.config, batch=2, frames=2, height=4, width=6, clip_tokens=16)
    with torch.no_grad():
        (reference,) = model(**inputs)
        (out,) = model.to(torch.bfloat16)(**make_inputs(model.config, 2, 2, 4, 6, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max() <= 0.1 * reference.abs().max()


def test_single_frame_skips_temporal_encoding(golden: dict, golden_model: RuyiTransformer3D):
    """F == 1: no temporal PE (the buffer's contents must not matter), the RoPE table is used untiled."""
    kwargs = dict(golden["kwargs"])
    kwargs["hidden_states"] = kwargs["hidden_states"][:, :, :1]
    kwargs["inpaint_latents"] = kwargs["inpaint_latents"][:, :, :1]
    with torch.no_grad():
        (out,) = golden_model(**kwargs)
        model = RuyiTransformer3D(golden_model.config).eval().requires_grad_(False)
        model.load_state_dict(golden_model.state_dict())
        for block in model.blocks:
            block.t_embed.pe.normal_()
        (out_scrambled,) = model(**kwargs)
    batch, channels, _, height, width = golden["outputs"]["output"].shape
    assert out.shape == (batch, channels, 1, height, width)
    assert_close_scaled(out_scrambled, out, 1e-6, "single frame, scrambled temporal PE")


def test_block_by_block_matches_forward(golden: dict, golden_model: RuyiTransformer3D):
    """embed -> blocks with the reference's LIFO skip stack -> unembed, as a block-streaming runtime would."""
    model, num_layers = golden_model, golden_model.config.num_layers
    with torch.no_grad():
        inputs = model.embed(**golden["kwargs"])
        x, stack = inputs.hidden, []
        for i, block in enumerate(model.blocks):
            skip = stack.pop() if i > num_layers // 2 else None
            x = block(x, inputs.temb, inputs.text_states, inputs.clip_states,
                      inputs.rope_cos, inputs.rope_sin, inputs.num_frames, skip)  # fmt: skip
            if i < num_layers // 2 - 1:
                stack.append(x)
        out = model.unembed(x, inputs.temb, inputs.num_frames, inputs.grid_height, inputs.grid_width)
    assert not stack
    assert_close_scaled(out, golden["outputs"]["output"], REL_TOL, "block-by-block output")


def test_config_round_trip_and_extra_keys(golden: dict):
    full_json = golden["config"]["config"]  # includes motion_module_* keys and bookkeeping
    config = TransformerConfig.from_dict(full_json)
    assert config == TransformerConfig.from_dict(golden["config"]["base_config_json"])
    assert TransformerConfig.from_dict(config.to_dict()) == config
    derived = golden["config"]["derived"]
    assert config.inner_dim == derived["inner_dim"]
    assert config.ff_inner_dim == derived["ff_inner_dim"]
    assert config.output_channels == derived["out_channels"]
    assert config.enable_inpaint == derived["enable_inpaint"]
    assert list(config.skip_blocks) == derived["skip_blocks"]


@pytest.mark.parametrize(
    "change",
    [{"basic_block_type": "motionmodule"}, {"after_norm": True}, {"num_layers": 5}, {"hidden_size": 48},
     {"out_channels": 96}, {"activation_fn": "geglu"}],
)
def test_unsupported_config_raises(change: dict):
    with pytest.raises(ValueError, match=next(iter(change))):
        dataclasses.replace(TransformerConfig.tiny(), **change)


def test_full_config_on_meta_device():
    config = TransformerConfig.full()
    assert (config.inner_dim, config.ff_inner_dim, len(config.skip_blocks)) == (2816, 12288, 19)
    with torch.device("meta"):
        model = RuyiTransformer3D(config)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params - 7.187e9) < 0.005e9, params
    state = model.state_dict()
    assert state["blocks.39.skip_linear.weight"].shape == (2816, 5632)
    assert "blocks.20.skip_linear.weight" not in state
    assert state["text_embedding_padding"].shape == (333, 1024)


def test_block_exports_to_onnx(tmp_path: Path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = tiny_model()
    inputs = model.embed(**make_inputs(model.config, batch=1, frames=2, height=4, width=6, clip_tokens=16))
    block = model.blocks[-1]
    skip = torch.randn_like(inputs.hidden)
    args = (inputs.hidden, inputs.temb, inputs.text_states, inputs.clip_states, inputs.rope_cos, inputs.rope_sin)

    class FixedFrames(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x, temb, text, clip, cos, sin, skip):
            return self.block(x, temb, text, clip, cos, sin, inputs.num_frames, skip)

    names = ["x", "temb", "text", "clip", "cos", "sin", "skip"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(FixedFrames(), (*args, skip), str(tmp_path / "block.onnx"), dynamo=False,
                          opset_version=18, input_names=names, output_names=["out"])  # fmt: skip
    session = ort.InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {n: t.numpy() for n, t in zip(names, (*args, skip))})
    with torch.no_grad():
        expected = block(*args, inputs.num_frames, skip)
    assert_close_scaled(torch.from_numpy(out), expected, 1e-5, "onnx block")


def reference_enhance_score(q: torch.Tensor, k: torch.Tensor, num_frames: int, weight: float) -> torch.Tensor:
    """Enhance-A-Video's score written out with loops: q, k [B, H, F*S, d], frame-major tokens."""
    batch, heads, tokens, head_dim = q.shape
    spatial = tokens // num_frames
    means = []
    for b in range(batch):
        for s in range(spatial):
            for h in range(heads):
                rows = []
                for f in range(num_frames):
                    qf = q[b, h, f * spatial + s] * head_dim**-0.5
                    logits = torch.stack([qf @ k[b, h, g * spatial + s] for g in range(num_frames)])
                    rows.append(logits.float().softmax(dim=0))
                total = sum(rows[f][g] for f in range(num_frames) for g in range(num_frames) if f != g)
                means.append(total / (num_frames * (num_frames - 1)))
    return (torch.stack(means).mean() * (num_frames + weight)).clamp(min=1)


@pytest.mark.parametrize(("frames", "weight"), [(2, 1.0), (3, 4.0), (4, 0.0)])
def test_enhance_a_video_score_matches_loops(frames: int, weight: float):
    from ruyi_trt.models.transformer_blocks import enhance_a_video_score

    gen = torch.Generator().manual_seed(frames)
    q = torch.randn(2, 3, frames * 5, 8, generator=gen)
    k = torch.randn(2, 3, frames * 5, 8, generator=gen)
    score = enhance_a_video_score(q, k, frames, weight)
    assert score.dtype == torch.float32 and score.dim() == 0
    torch.testing.assert_close(score, reference_enhance_score(q, k, frames, weight), rtol=1e-6, atol=1e-6)
    # Keys equal across frames: uniform frame attention, off-diagonal mean 1/F, score max(1, (F + weight) / F).
    k_same = k[:, :, :5].repeat(1, 1, frames, 1)
    uniform = enhance_a_video_score(q, k_same, frames, weight)
    torch.testing.assert_close(uniform, torch.tensor(max(1.0, (frames + weight) / frames)))
    assert enhance_a_video_score(q[:, :, :5], k[:, :, :5], 1, weight) is None  # one frame: no off-diagonal


def test_enhance_a_video_scales_self_attention_output_only():
    from ruyi_trt.models.transformer_blocks import Attention, enhance_a_video_score

    torch.manual_seed(0)
    frames, spatial, dim, heads = 3, 4, 32, 4
    attn = Attention(dim, heads).eval()
    x = torch.randn(2, frames * spatial, dim)
    cos, sin = torch.randn(frames * spatial, dim // heads), torch.randn(frames * spatial, dim // heads)
    with torch.no_grad():
        plain = attn(x, None, cos, sin)
        assert torch.equal(attn(x, None, cos, sin, None, frames), plain)
        enhanced = attn(x, None, cos, sin, 2.0, frames)
        q = attn.norm_q(attn.to_q(x).unflatten(-1, (heads, dim // heads)).transpose(1, 2))  # before RoPE
        k = attn.norm_k(attn.to_k(x).unflatten(-1, (heads, dim // heads)).transpose(1, 2))
        score = enhance_a_video_score(q, k, frames, 2.0)
    assert torch.equal(enhanced, plain * score)
    cross = Attention(dim, heads, context_dim=16)
    with pytest.raises(ValueError, match="self-attention"):
        cross(x, torch.randn(2, 5, 16), cos, sin, 1.0, frames)


def test_block_enhance_weight_none_is_bit_identical(golden: dict, golden_model: RuyiTransformer3D):
    model = golden_model
    with torch.no_grad():
        inputs = model.embed(**golden["kwargs"])
        block = model.blocks[0]
        args = (inputs.hidden, inputs.temb, inputs.text_states, inputs.clip_states, inputs.rope_cos,
                inputs.rope_sin, inputs.num_frames)  # fmt: skip
        plain = block(*args)
        assert torch.equal(block(*args, None, None), plain)
        enhanced = block(*args, None, 50.0)
    assert torch.isfinite(enhanced).all() and not torch.equal(enhanced, plain)
