"""Kohya-style LoRA merge/unmerge (weights/lora.py) on a small module tree with the transformer's naming.

float32 weights: merge must equal W + strength * alpha/r * up @ down within 1e-6; unmerge restores W within 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ruyi_trt.weights.lora import merge_lora, unmerge_lora


class _Attn(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn1 = _Attn(dim)
        self.attn_clip = _Attn(dim)
        self.norm_clip = nn.LayerNorm(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(3 * dim, dim)])
        self.ff.net[0].proj = nn.Linear(dim, 3 * dim)
        self.skip_linear = nn.Linear(2 * dim, dim)


class _Model(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(2)])
        self.proj = nn.Conv2d(dim, dim, 1)
        self.norm_out = nn.Module()
        self.norm_out.linear = nn.Linear(dim, 2 * dim)


def _pair(out_f: int, in_f: int, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out_f, rank, generator=gen), torch.randn(rank, in_f, generator=gen)


def _lora(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for name, (out_f, in_f) in {
        "blocks_0_attn1_to_q": (8, 8),
        "blocks_1_attn_clip_to_out_0": (8, 8),
        "blocks_0_ff_net_0_proj": (24, 8),
        "blocks_1_skip_linear": (8, 16),
        "norm_out_linear": (16, 8),
    }.items():
        up, down = _pair(out_f, in_f, 4, gen)
        state[f"lora_unet_{name}.lora_up.weight"] = up
        state[f"lora_unet_{name}.lora_down.weight"] = down
    state["lora_unet_blocks_0_attn1_to_q.alpha"] = torch.tensor(2.0)
    return state


def test_merge_and_unmerge():
    gen = torch.Generator().manual_seed(0)
    model = _Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _lora(gen)
    names = merge_lora(model, lora, strength=0.7)
    assert sorted(names) == sorted(
        [
            "blocks.0.attn1.to_q",
            "blocks.1.attn_clip.to_out.0",
            "blocks.0.ff.net.0.proj",
            "blocks.1.skip_linear",
            "norm_out.linear",
        ]
    )
    after = model.state_dict()
    up, down = (
        lora["lora_unet_blocks_0_attn1_to_q.lora_up.weight"],
        lora["lora_unet_blocks_0_attn1_to_q.lora_down.weight"],
    )
    expected = before["blocks.0.attn1.to_q.weight"] + 0.7 * (2.0 / 4) * up @ down
    torch.testing.assert_close(after["blocks.0.attn1.to_q.weight"], expected, rtol=0, atol=1e-6)
    up, down = (
        lora["lora_unet_blocks_0_ff_net_0_proj.lora_up.weight"],
        lora["lora_unet_blocks_0_ff_net_0_proj.lora_down.weight"],
    )
    expected = before["blocks.0.ff.net.0.proj.weight"] + 0.7 * 1.0 * up @ down  # no alpha: scale 1
    torch.testing.assert_close(after["blocks.0.ff.net.0.proj.weight"], expected, rtol=0, atol=1e-6)
    for key in ("blocks.0.attn1.to_k.weight", "blocks.0.attn1.to_q.bias", "blocks.1.norm_clip.weight"):
        assert torch.equal(after[key], before[key])

    unmerge_lora(model, lora, strength=0.7)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-5)


def test_conv_1x1_and_bf16():
    gen = torch.Generator().manual_seed(1)
    model = _Model().to(torch.bfloat16)
    before = model.proj.weight.detach().float().clone()
    up, down = torch.randn(8, 2, 1, 1, generator=gen), torch.randn(2, 8, 1, 1, generator=gen)
    merge_lora(model, {"lora_unet_proj.lora_up.weight": up, "lora_unet_proj.lora_down.weight": down}, 1.0)
    assert model.proj.weight.dtype == torch.bfloat16
    expected = before + (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    torch.testing.assert_close(model.proj.weight.float(), expected, rtol=1e-2, atol=5e-2)


def test_text_encoder_keys_are_skipped():
    gen = torch.Generator().manual_seed(2)
    model = _Model()
    lora = _lora(gen)
    lora["lora_te_encoder_layer_0_q.lora_up.weight"] = torch.zeros(4, 2)
    lora["lora_te_encoder_layer_0_q.lora_down.weight"] = torch.zeros(2, 4)
    assert len(merge_lora(model, lora, 1.0)) == 5


def test_unmatched_key_raises_and_changes_nothing():
    gen = torch.Generator().manual_seed(3)
    model = _Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _lora(gen)
    up, down = _pair(8, 8, 4, gen)
    lora["lora_unet_blocks_0_attn9_to_q.lora_up.weight"] = up
    lora["lora_unet_blocks_0_attn9_to_q.lora_down.weight"] = down
    with pytest.raises(ValueError, match="blocks_0_attn9_to_q"):
        merge_lora(model, lora, 1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_no_matching_key_raises():
    with pytest.raises(ValueError, match="match no module"):
        merge_lora(_Model(), {"foo.lora_up.weight": torch.zeros(1, 1), "foo.lora_down.weight": torch.zeros(1, 1)}, 1.0)
    with pytest.raises(ValueError, match="no transformer layers"):
        merge_lora(_Model(), {}, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        merge_lora(
            _Model(),
            {
                "lora_unet_norm_out_linear.lora_up.weight": torch.zeros(8, 2),
                "lora_unet_norm_out_linear.lora_down.weight": torch.zeros(2, 8),
            },
            1.0,
        )


def test_load_lora(tmp_path):
    from safetensors.torch import save_file

    from ruyi_trt.weights.lora import load_lora

    lora = _lora(torch.Generator().manual_seed(4))
    save_file(lora, str(tmp_path / "style.safetensors"))
    loaded = load_lora(tmp_path / "style.safetensors")
    assert loaded.keys() == lora.keys() and all(torch.equal(loaded[k], lora[k]) for k in lora)
    with pytest.raises(ValueError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_lora(tmp_path / "bad.safetensors")
