"""Every TensorRT API member our code touches is listed in engine/trt_api.TRT_API and exists in TensorRT 10 and 11.

Reads the source with `ast` (no TensorRT needed) and the committed name lists engine/trt_api/*.txt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ruyi_trt.engine.trt_api import TRT_API
from ruyi_trt.engine.trt_api_names import (
    available_versions,
    has_name,
    names_from_extension,
    names_from_init,
    read_names,
)

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "engine").glob("*.py")) + [REPO / "runtime" / "backends" / "trt_backend.py"]
OBJECT_KINDS = set(TRT_API) - {"trt", "override"}


def _root_chain(node: ast.AST) -> list[str] | None:
    """['trt', 'BuilderFlag', 'REFIT'] for `trt.BuilderFlag.REFIT`; None when the chain is not rooted at a Name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def used_members(source: str) -> set[tuple[str, str]]:
    """(kind, member) for every TensorRT access in `source` (see engine/trt_api.py for the conventions)."""
    used = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and any((_root_chain(b) or [""])[0] == "trt" for b in node.bases):
            used |= {("override", f.name) for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")}
        if not isinstance(node, ast.Attribute):
            continue
        chain = _root_chain(node)
        if chain is None:
            continue
        if chain[0] == "trt":
            used |= {("trt", part) for part in chain[1:]}
        elif chain[0] in OBJECT_KINDS:
            used.add((chain[0], chain[1]))
        elif chain[0] == "self" and len(chain) > 2 and chain[1] in OBJECT_KINDS:
            used.add((chain[1], chain[2]))
    return used


@pytest.fixture(scope="module")
def used() -> set[tuple[str, str]]:
    found = set()
    for path in SOURCES:
        found |= used_members(path.read_text())
    return found


def test_conventions_are_detected():
    source = (
        "class M(trt.IProgressMonitor):\n    def step_complete(self, a, b): return True\n"
        "x = trt.BuilderFlag.REFIT\nbuilder.create_network(0)\nself.context.execute_async_v3(0)\nother.attr\n"
    )
    assert used_members(source) == {
        ("override", "step_complete"), ("trt", "IProgressMonitor"), ("trt", "BuilderFlag"), ("trt", "REFIT"),
        ("builder", "create_network"), ("context", "execute_async_v3"),
    }  # fmt: skip


def test_every_member_used_is_listed(used):
    unlisted = sorted(f"{kind}.{name}" for kind, name in used if name not in TRT_API[kind])
    assert not unlisted, f"add these to engine/trt_api.TRT_API (and check them against TensorRT 10/11): {unlisted}"


def test_every_listed_member_is_used(used):
    unused = sorted(f"{kind}.{name}" for kind, names in TRT_API.items() for name in names if (kind, name) not in used)
    assert not unused, f"listed in engine/trt_api.TRT_API but not used by the code: {unused}"


def test_name_lists_cover_tensorrt_10_and_11():
    majors = {version.split(".")[0] for version in available_versions()}
    assert {"10", "11"} <= majors, f"engine/trt_api/ must hold a 10.x and an 11.x list, has {available_versions()}"


@pytest.mark.parametrize("version", available_versions())
def test_every_listed_member_exists(version):
    names = read_names(version)
    absent = sorted({name for members in TRT_API.values() for name in members if not has_name(names, name)})
    assert not absent, f"TensorRT {version} lacks {absent}: add a version check in the code and account for it here"


def test_lists_detect_removed_apis():
    """The lists are discriminating: TensorRT 11 dropped weak typing and the implicit-batch flag."""
    ten, eleven = read_names("10.16.1.11"), read_names("11.4.0.106")
    for removed in ("FP16", "EXPLICIT_BATCH", "platform_has_fast_fp16"):
        assert has_name(ten, removed) and not has_name(eleven, removed)
    assert not has_name(ten, "no_such_tensorrt_member")


def test_extraction_reads_nul_delimited_identifiers_and_init_names():
    data = b"\x00Builder\x00_ZN8nvinfer1\x00two words\x00set_tensor_address\x00"
    assert names_from_extension(data) == {"Builder", "set_tensor_address"}
    assert names_from_init("import os\n__version__ = '11'\ndef nptype(t):\n    pass\n") == {"__version__", "nptype"}
