"""The refit weight map (ONNX initializer <-> checkpoint tensor) and the fused-attention pattern check, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ruyi_trt.engine.attention import attention_patterns, describe
from ruyi_trt.engine.refit import (
    read_refit_map,
    refit_tensors,
    weight_map,
    write_refit_map,
)
from ruyi_trt.models.checkpoint_io import load_weights


@pytest.fixture(scope="module")
def transformer_map(tiny_dir: Path, exported_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("engine")
    write_refit_map(folder, exported_dir / "transformer.onnx", tiny_dir, "fp32")
    return read_refit_map(folder)


def _initializers(path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}


def test_every_block_weight_is_mapped(tiny_dir: Path, transformer_map):
    state = load_weights(tiny_dir / "transformer")
    mapped = {key for candidates in transformer_map.values() for key, _, _ in candidates}
    block_weights = [k for k in state if k.startswith("blocks.") and not k.endswith(".pe")]
    assert block_weights and not set(block_weights) - mapped
    assert all(transformer_map[k] == [(k, False, "float32")] for k in block_weights)  # by name: the stitched graph
    assert any(transposed for candidates in transformer_map.values() for _, transposed, _ in candidates)  # MatMul weights


def test_refit_tensors_reproduce_the_initializers(tiny_dir: Path, exported_dir: Path, transformer_map):
    state = load_weights(tiny_dir / "transformer")
    changed = [k for k in state if k.startswith("blocks.0.attn1.to_")]
    tensors = refit_tensors(transformer_map, state, changed)
    initializers = _initializers(exported_dir / "transformer.onnx")
    assert len(tensors) >= len(changed)
    for name, tensor in tensors.items():
        assert torch.equal(tensor, initializers[name]), name
    merged = {**state, changed[0]: state[changed[0]] + 1}
    assert not torch.equal(refit_tensors(transformer_map, merged, changed)[_name_of(transformer_map, changed[0])],
                           tensors[_name_of(transformer_map, changed[0])])  # fmt: skip


def _name_of(mapping, key: str) -> str:
    return next(name for name, candidates in mapping.items() if any(k == key for k, _, _ in candidates))


def test_unmappable_change_is_refused(tiny_dir: Path, transformer_map):
    state = load_weights(tiny_dir / "transformer")
    with pytest.raises(ValueError, match="rebuild the engine"):
        refit_tensors(transformer_map, state, ["clip_projection.attn.in_proj_weight"])  # sliced into q/k/v by the export


def test_weight_map_finds_float32_norms_of_a_low_precision_graph(tmp_path: Path):
    import onnx
    from onnx import helper, numpy_helper

    weight = torch.randn(4, 3)
    norm = torch.randn(3)
    inits = [numpy_helper.from_array(weight.half().t().contiguous().numpy(), "onnx::MatMul_7"),
             numpy_helper.from_array(norm.half().float().numpy(), "onnx::LayerNormalization_9")]  # fmt: skip
    graph = helper.make_graph([], "g", [], [], initializer=inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    mapping = weight_map(tmp_path / "g.onnx", {"lin.weight": weight, "ln.weight": norm}, torch.float16)
    assert mapping == {"onnx::MatMul_7": [("lin.weight", True, "float16")],
                       "onnx::LayerNormalization_9": [("ln.weight", False, "float32")]}  # fmt: skip


def test_exported_attention_is_in_the_fusable_pattern(exported_dir: Path):
    counts = attention_patterns(exported_dir / "transformer.onnx")
    assert counts["softmax"] > 0 and counts["fusable"] == counts["softmax"]
    assert "MatMul-Softmax-MatMul" in describe(counts)
    assert attention_patterns(exported_dir / "vae_encoder.onnx")["scale_after_bmm1"] == 0


def test_scale_after_the_first_matmul_is_flagged(tmp_path: Path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Mul", ["s", "c"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["p"]), helper.make_node("MatMul", ["p", "v"], ["o"])]  # fmt: skip
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph(nodes, "g", [tensor(n) for n in "qkvc"], [tensor("o")])
    onnx.save(helper.make_model(graph), str(tmp_path / "g.onnx"))
    counts = attention_patterns(tmp_path / "g.onnx")
    assert counts["scale_after_bmm1"] == 1 and counts["fusable"] == 0
    assert "will not fuse" in describe(counts)
