"""The folder layout is the architecture: no module imports from a higher layer, and there are no import cycles.

Every import of a `ruyi_trt` module is read with `ast` (module-level and inside functions alike) from every
`.py` file of the package; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ruyi_trt"
# lowest first; a module belongs to the longest prefix listed (same-layer imports are fine)
LAYERS = {
    "ruyi_trt.deps": 0, "ruyi_trt.files": 0, "ruyi_trt.testing": 0,
    "ruyi_trt.models": 1,
    "ruyi_trt.kernels": 2, "ruyi_trt.weights": 2,
    "ruyi_trt.export": 3,
    "ruyi_trt.calib": 4, "ruyi_trt.engine": 5,
    "ruyi_trt.runtime.memory": 6,
    "ruyi_trt.runtime.backends": 7,
    "ruyi_trt.runtime.parallel": 7.5,
    "ruyi_trt.runtime": 8,
    "ruyi_trt.tools": 9, "ruyi_trt.comfyui": 9, "ruyi_trt.server": 9,
    "ruyi_trt.cli": 10, "ruyi_trt": 10,
}  # fmt: skip
SKIP = {".venv", "tests", "build", "dist", "outputs", "models/Ruyi-Mini-7B"}


def module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(REPO).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    files = {}
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in SKIP) or "/." in "/" + rel:
            continue
        files[module_name(path)] = path
    return files


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports (a `from X import y` counts X.y when that is a module, else X)."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == PACKAGE or t.startswith(PACKAGE + ".")}
    return found - {name}


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} belongs to no layer: add its package to LAYERS in tests/test_layering.py"
    return LAYERS[max(prefixes, key=len)]


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        layer(module)


def test_no_module_imports_from_a_higher_layer() -> None:
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in sorted(import_graph().items())
        for target in sorted(targets)
        if layer(target) > layer(module) and not module.startswith(target + ".")  # a module may import its package
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = {m: {t for t in targets if t in import_graph_nodes(targets, m)} for m, targets in import_graph().items()}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def import_graph_nodes(targets: set[str], module: str) -> set[str]:
    """Edges that count for cycles: importing a parent package (its __init__) is part of importing any module of
    it, so `a.b -> a` is not an edge."""
    return {t for t in targets if not module.startswith(t + ".")}
