"""ONNX Attention graphs, the stitched whole transformer and the model sources, on the tiny checkpoint.

Parity tolerance (float32 graphs, ONNX Runtime CPU): max |ort - torch| <= 1e-4 x max(1, max |torch|), at
shapes unlike the traced one.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ruyi_trt.export import ExportSettings, check_tensorrt_ready, export_checkpoint
from ruyi_trt.export.graph_passes import ATTENTION_OPSET, attention_counts, fuse_attention, structure_only
from ruyi_trt.export.onnx_export import reference_graph
from ruyi_trt.export.readiness import minimum_tensorrt
from ruyi_trt.export.source import RandomSource, model_source
from ruyi_trt.models.checkpoint_io import load_weights
from ruyi_trt.models.presets import random_value, tiny_transformer
from ruyi_trt.runtime.backends.ort_backend import OrtGraph
from ruyi_trt.testing import assert_close_scaled

CPU = torch.device("cpu")
UNTRACED = {
    "transformer": [{"batch": 1, "latent_frames": 2, "grid_height": 4, "grid_width": 6},
                    {"batch": 2, "latent_frames": 5, "grid_height": 6, "grid_width": 3}],
    "image_encoder": [{"batch": 1}, {"batch": 3}],
}  # fmt: skip


@pytest.fixture(scope="module")
def onnx_attention_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx-attention")
    export_checkpoint(tiny_dir, out, ExportSettings(attention="onnx"), components=["transformer", "image-encoder"],
                      progress=False)  # fmt: skip
    return out


def _with_grid(dims: dict) -> dict:
    if "grid_height" not in dims:
        return dims
    h, w = dims["grid_height"], dims["grid_width"]
    return {**dims, "latent_height": 2 * h, "latent_width": 2 * w, "tokens_per_frame": h * w}


@pytest.mark.parametrize("name", sorted(UNTRACED))
def test_onnx_attention_graphs_match_torch_at_untraced_shapes(tiny_dir: Path, onnx_attention_dir: Path, name: str):
    """Every attention core is one ONNX Attention node (opset 23, TensorRT >= 10.14), and ONNX Runtime runs the
    graph within the fp32 tolerance of PyTorch."""
    path = onnx_attention_dir / f"{name}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    counts = attention_counts(model)
    assert counts["onnx"] > 0 and counts["decomposed"] == 0
    assert next(o.version for o in model.opset_import if o.domain == "") == ATTENTION_OPSET
    assert check_tensorrt_ready(path) == [] and minimum_tensorrt(model) == "10.14"
    spec, module = reference_graph(tiny_dir, name)
    session = OrtGraph(path, CPU)
    for seed, dims in enumerate(UNTRACED[name]):
        inputs = spec.sample_inputs(_with_grid(dims), seed=seed + 1)
        with torch.no_grad():
            expected = module(*inputs.values())
        assert_close_scaled(session.run(**inputs)[0], expected, name=f"{name} {dims}")


def test_stitched_transformer_names_block_weights_by_checkpoint_key(tiny_dir: Path, exported_dir: Path):
    """The whole graph's block weights are external initializers named and laid out as the checkpoint's."""
    path = exported_dir / "transformer.onnx"
    model = onnx.load(str(path), load_external_data=False)
    external = {t.name: t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    state = load_weights(tiny_dir / "transformer")
    blocks = [k for k in state if k.startswith("blocks.")]
    assert set(blocks) <= set(external)
    assert {e.value for t in external.values() for e in t.external_data if e.key == "location"} == {"transformer.onnx.data"}
    loaded = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    for key in blocks[:6]:
        value = torch.from_numpy(onnx.numpy_helper.to_array(loaded[key]).copy())
        assert torch.equal(value, state[key].float()), key
    light = structure_only(model)  # what shape inference sees: the external weights become typed inputs
    assert not any(t.data_location == TensorProto.EXTERNAL for t in light.graph.initializer)
    assert set(blocks) <= {v.name for v in light.graph.input}


def _attention_model(scale_input: str, extra_inputs=(), initializers=()):
    shape = [2, 3, 5, 4]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("Mul", ["q", scale_input], ["qs"]),
             helper.make_node("MatMul", ["qs", "kt"], ["scores"]), helper.make_node("Softmax", ["scores"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"])]  # fmt: skip
    value = lambda name, dims: helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
    inputs = [value("q", shape), value("k", shape), value("v", shape), *extra_inputs]
    graph = helper.make_graph(nodes, "g", inputs, [value("o", shape)], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fuse_attention_keeps_patterns_it_cannot_prove():
    """A scale that is not a constant leaves the pattern decomposed (and counted); a constant one that is not
    ONNX's default 1/sqrt(head size) is kept as the node's `scale`."""
    dynamic = _attention_model("s", extra_inputs=[helper.make_tensor_value_info("s", TensorProto.FLOAT, [1])])
    _, fused, left = fuse_attention(dynamic, softmax_in_float32=False)
    assert (fused, left) == (0, 1) and attention_counts(dynamic) == {"onnx": 0, "decomposed": 1}
    constant = _attention_model("c", initializers=[helper.make_tensor("c", TensorProto.FLOAT, [1], [0.25])])
    model, fused, left = fuse_attention(constant, softmax_in_float32=True)
    assert (fused, left) == (1, 0) and attention_counts(model) == {"onnx": 1, "decomposed": 0}
    (attention,) = [n for n in model.graph.node if n.op_type == "Attention"]
    attributes = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert attributes == {"scale": 0.25, "softmax_precision": TensorProto.FLOAT}  # not the default 1/sqrt(4)
    onnx.checker.check_model(model, full_check=True)


def test_random_source_reproduces_the_full_random_recipe():
    """Tensor for tensor what models.presets.randomize_ makes (checked on the tiny model, where both fit)."""
    model = tiny_transformer(seed=3)
    entries = list(model.named_parameters()) + list(model.named_buffers())
    for index, (name, tensor) in list(enumerate(entries))[:: max(1, len(entries) // 12)]:
        if name.endswith(".pe") or name == "clip_projection.pos_embed":
            continue
        assert torch.equal(random_value(name, tuple(tensor.shape), index, 3).to(tensor.dtype), tensor), name
    source = RandomSource()
    key = "blocks.7.attn1.to_q.weight"
    value = source.transformer_tensor(key, torch.float16)
    assert value.shape == (2816, 2816) and value.dtype == torch.float16
    assert torch.equal(value, source.transformer_tensor(key, torch.float16))
    assert source.component_hash("transformer") != RandomSource(seed=1).component_hash("transformer")


def test_checkpoint_source_loads_only_the_selected_tensors(tiny_dir: Path):
    source = model_source(tiny_dir)
    model = source.transformer(torch.float16, keys=lambda key: not key.startswith("blocks."))
    assert model.blocks[0].attn1.to_q.weight.is_meta and not model.proj_out.weight.is_meta
    state = load_weights(tiny_dir / "transformer")
    assert torch.equal(model.proj_out.weight, state["proj_out.weight"].half())
    assert torch.equal(source.transformer_tensor("blocks.1.ff.net.2.weight", torch.float32), state["blocks.1.ff.net.2.weight"])
