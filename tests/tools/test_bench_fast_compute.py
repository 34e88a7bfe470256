"""`bench` rows for the 8-bit and kernel paths (torch-int8 runs on CPU; the FP8/Triton ones need a GPU and say so)
and the `block` stage (one full-width transformer block), with the ratio to torch in the markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.runtime.backends.block_runner import BlockRunner
from ruyi_trt.tools.bench import BenchConfig, run_bench
from ruyi_trt.tools.bench_models import Shape, block_flops, block_inputs
from ruyi_trt.tools.fast_paths import FAST_PATHS, FastComputeDenoiser, wrap_denoiser

pytest.importorskip("torchao", reason="torch-int8 needs torchao")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows (GPU-only paths unavailable)")
def test_cpu_bench_rows(tmp_path: Path, tiny_dir: Path):
    config = BenchConfig(
        model="tiny", backends=("torch", "torch-int8", "torch-fp8", "torch-fp8-attn", "torch-fp8-all", "torch-fused"),
        shapes=(Shape(64, 64, 8), Shape(64, 96, 8)), stages=("denoise", "block"), warmup=0, repeat=1, block_tokens=64,
    )  # fmt: skip
    results = run_bench(config, tmp_path)
    rows = {(m.backend, m.stage, m.width): m for m in results.measurements}
    for backend in ("torch", "torch-int8"):
        assert rows[(backend, "denoise", 64)].status == "ok" and rows[(backend, "denoise", 96)].status == "ok"
        block = rows[(backend, "block", 64 * 16)]  # one 1 x 64-patch frame: 16 x 1024 px
        assert block.status == "ok" and block.tokens == 64 and block.flops["total"] == block_flops(64).total
    assert sum(m.stage == "block" for m in results.measurements) == 2  # once per backend, not per shape
    backends = {b["name"]: b for b in json.loads((tmp_path / "bench.json").read_text())["backends"]}
    for name in ("torch-fp8", "torch-fp8-attn", "torch-fp8-all", "torch-fused"):
        assert not backends[name]["available"] and "needs --device cuda" in backends[name]["reason"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| x torch |" in markdown and "| torch | block | 16x1024x1f |" in markdown


def test_fast_compute_path_is_undone_on_close():
    model = tiny_transformer()
    wrapped = wrap_denoiser(FAST_PATHS["torch-int8"], BlockRunner(model, "cpu", torch.float32), "cpu", torch.float32)
    assert isinstance(wrapped, FastComputeDenoiser)
    assert "Int8" in type(model.blocks[0].attn1.to_q.weight).__name__  # a torchao int8 weight
    wrapped.close()
    assert type(model.blocks[0].attn1.to_q.weight) is nn.Parameter


def test_block_inputs_are_the_real_width():
    """Ruyi-Mini-7B's block sizes: 2816 wide, 16 heads of 176, 333 text and 16 CLIP tokens."""
    inputs = block_inputs(128, torch.device("cpu"), torch.float32)
    assert inputs["x"].shape == (1, 128, 2816) and inputs["rope_cos"].shape == (128, 176)
    assert inputs["text_states"].shape == (1, 333, 1024) and inputs["clip_states"].shape == (1, 16, 1024)
