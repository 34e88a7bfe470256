"""The bench's `block` stage on its graph backends (tools/block_backends.py), at the tiny model's width so it fits CI:
the ONNX Runtime graph, its INT8 / FP8 Q/DQ versions calibrated with ModelOpt over the stage's inputs, and the
AOTInductor package, each against the eager fp32 block; the scratch folder is gone after close."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.tools.bench_models import BLOCK_GRID_WIDTH, block_inputs, full_width_block
from ruyi_trt.tools.block_backends import block_runner

pytest.importorskip("onnxruntime")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.fixture(scope="module")
def tiny_block():
    config = TransformerConfig.tiny()
    host = full_width_block(torch.device("cpu"), torch.float32, config=config)
    inputs = block_inputs(2 * BLOCK_GRID_WIDTH, torch.device("cpu"), torch.float32, config)
    with torch.inference_mode():
        reference = host.blocks[0](**inputs)
    return host, inputs, reference


@pytest.mark.parametrize(
    ("backend", "cosine"),
    [("ort", 0.99999), ("ort-int8", 0.99), ("ort-fp8", 0.99), ("aoti", 0.99999)],
)  # fmt: skip
def test_block_graph_backends_match_the_eager_block(tiny_block, tmp_path, backend, cosine):
    """fp32 output cosine to the eager block: >= 0.99999 for the float graphs, >= 0.99 for the 8-bit Q/DQ graphs."""
    if backend.startswith("ort-"):
        pytest.importorskip("modelopt", reason="the block's Q/DQ scales come from ModelOpt")
    host, inputs, reference = tiny_block
    block = block_runner(backend, host, tmp_path / "bench", torch.device("cpu"))
    try:
        first, again = block(**inputs), block(**inputs)  # the first call builds the graph
        assert list(tmp_path.iterdir())  # the scratch folder beside `bench`
    finally:
        block.close()
    assert first.shape == reference.shape and first.dtype == torch.float32
    assert _cosine(first, reference) >= cosine
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not list(tmp_path.iterdir())


def test_unknown_block_backend_is_refused(tiny_block, tmp_path):
    with pytest.raises(ValueError, match="use one of"):
        block_runner("trt", tiny_block[0], tmp_path, torch.device("cpu"))
