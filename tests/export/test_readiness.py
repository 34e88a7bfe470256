"""The TensorRT-readiness check on hand-made graphs: each kind of problem is found and names its node."""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper

from ruyi_trt.export.readiness import check_tensorrt_ready, tensorrt_op_table


def _save(tmp_path: Path, nodes: list, inputs: list, outputs: list, opset: int = 18, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def _value(name: str, dtype: int = TensorProto.FLOAT, shape=(4,)):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_clean_graph_has_no_problems(tmp_path: Path) -> None:
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="act")], [_value("x")], [_value("y")])
    assert check_tensorrt_ready(path) == []


def test_unsupported_op_and_double_tensor_are_flagged_by_node(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Cast", ["x64"], ["x32"], name="back", to=TensorProto.FLOAT),
        helper.make_node("Unique", ["x32"], ["y"], name="dedupe"),
    ]
    problems = check_tensorrt_ready(_save(tmp_path, nodes, [_value("x")], [_value("y", shape=None)]))
    kinds = {(p.kind, p.node) for p in problems}
    assert ("unsupported_op", "dedupe") in kinds
    assert ("dtype", "to_double") in kinds
    assert all(p.node != "back" or p.kind != "unsupported_op" for p in problems)
    assert "Unique" in str(next(p for p in problems if p.kind == "unsupported_op"))


def test_double_input_and_complex_initializer(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["x", "w"], ["y"], name="add")]
    weight = helper.make_tensor("w", TensorProto.DOUBLE, [4], [1.0, 2.0, 3.0, 4.0])
    problems = check_tensorrt_ready(_save(tmp_path, nodes, [_value("x", TensorProto.DOUBLE)],
                                          [_value("y", TensorProto.DOUBLE)], initializers=[weight]))  # fmt: skip
    messages = " ".join(str(p) for p in problems)
    assert "'x' is DOUBLE" in messages and "initializer 'w' is DOUBLE" in messages


def test_nonzero_feeding_a_shape_is_flagged(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("NonZero", ["x"], ["idx"], name="find"),
        helper.make_node("Shape", ["idx"], ["n"], name="count"),
        helper.make_node("Reshape", ["x", "n"], ["y"], name="reshape_by_count"),
    ]
    problems = check_tensorrt_ready(_save(tmp_path, nodes, [_value("x")], [_value("y", shape=None)]))
    assert [(p.kind, p.node) for p in problems] == [("data_dependent_shape", "reshape_by_count")]
    assert "find" in problems[0].message


def test_custom_domain_and_opset_out_of_range(tmp_path: Path) -> None:
    table = tensorrt_op_table()
    node = helper.make_node("FusedGelu", ["x"], ["y"], name="fused", domain="com.microsoft")
    problems = check_tensorrt_ready(_save(tmp_path, [node], [_value("x")], [_value("y")], opset=table["opset_max"] + 1))
    assert {p.kind for p in problems} == {"custom_domain", "opset"}
    assert table["source"].startswith("https://github.com/onnx/onnx-tensorrt/")


def test_missing_file_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file"):
        check_tensorrt_ready(tmp_path / "absent.onnx")
