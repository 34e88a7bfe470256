"""The TensorRT Python API names of one bindings release, read without TensorRT: lists kept as data.

The `tensorrt-cu12-bindings` / `tensorrt-cu13-bindings` wheels install anywhere (1.3 MB), but their
extension module `tensorrt_bindings/tensorrt.so` only imports with libnvinfer. Its read-only data still
holds every name pybind11 registers (classes, methods, properties, enum members) as a NUL-terminated
string, and `__init__.py` defines a few helpers in Python (`nptype`, `volume`). This module extracts both
into `engine/trt_api/<version>.txt`, one name a line, so tests can check the names our code uses against
TensorRT 10 and 11 with no download.

The linker merges a string into the tail of a longer one ("serialize" lives inside "deserialize",
"Refitter" inside "OnnxParserRefitter"), so a name counts as present when it is a listed name or the
tail of one (`has_name`).

Regenerate:  pip download --no-deps tensorrt-cu13-bindings==11.4.0.106 -d /tmp/w
             python -m ruyi_trt.engine.trt_api_names /tmp/w/tensorrt_cu13_bindings-11.4.0.106-*.whl
"""

from __future__ import annotations

import argparse
import ast
import logging
import re
import zipfile
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

NAMES_DIR = Path(__file__).with_name("trt_api")
_IDENTIFIER = re.compile(rb"(?<=\x00)[A-Za-z_][A-Za-z0-9_]*(?=\x00)")
_WHEEL_NAME = re.compile(r"tensorrt(?:_cu\d+)?_bindings-(?P<version>[0-9][0-9.]*[0-9](?:\.post\d+)?)-")


def names_from_extension(data: bytes) -> set[str]:
    """Every NUL-delimited identifier string in an extension module's bytes, minus C++ mangled symbols."""
    return {m.decode() for m in _IDENTIFIER.findall(data) if not m.startswith(b"_Z")}


def names_from_init(source: str) -> set[str]:
    """Top-level functions, classes and assignments of the bindings' `__init__.py`."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def names_from_wheel(wheel: str | Path) -> tuple[str, set[str]]:
    """(version, names) of a `tensorrt-cu*-bindings` wheel."""
    wheel = Path(wheel)
    match = _WHEEL_NAME.match(wheel.name)
    if match is None:
        raise ValueError(f"{wheel.name} is not a tensorrt-cu12/cu13-bindings wheel (tensorrt_cu13_bindings-<version>-...whl).")
    with zipfile.ZipFile(wheel) as archive:
        members = archive.namelist()
        extension = [m for m in members if re.fullmatch(r"tensorrt_bindings/tensorrt[^/]*\.so", m)]
        if not extension:
            raise ValueError(f"{wheel.name} holds no tensorrt_bindings/tensorrt*.so; is it a Linux wheel?")
        names = names_from_extension(archive.read(extension[0]))
        if "tensorrt_bindings/__init__.py" in members:
            names |= names_from_init(archive.read("tensorrt_bindings/__init__.py").decode())
    return match.group("version"), names


def write_names(version: str, names: set[str], folder: Path = NAMES_DIR) -> Path:
    """Write `folder/<version>.txt` (sorted, one name a line, with a header line naming the source)."""
    from ..files import atomic_write

    text = f"# TensorRT {version} Python bindings: names from tensorrt.so and __init__.py (engine/trt_api_names.py)\n"
    text += "\n".join(sorted(names)) + "\n"
    return atomic_write(folder / f"{version}.txt", lambda tmp: tmp.write_text(text))


def available_versions(folder: Path = NAMES_DIR) -> list[str]:
    """The versions with a committed name list, oldest first."""
    versions = [p.stem for p in folder.glob("*.txt")]
    return sorted(versions, key=lambda v: tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.]", v)))


@lru_cache(maxsize=8)
def read_names(version: str, folder: Path = NAMES_DIR) -> frozenset[str]:
    """The committed name list of `version`."""
    path = folder / f"{version}.txt"
    if not path.is_file():
        raise ValueError(f"no TensorRT name list {path}; have {available_versions(folder)}. Generate it (see {__name__}).")
    return frozenset(line for line in path.read_text().splitlines() if line and not line.startswith("#"))


def has_name(names: frozenset[str] | set[str], name: str) -> bool:
    """True when `name` is listed or is the tail of a listed name (the linker's string tail merging)."""
    return name in names or any(entry.endswith(name) for entry in names)


def main(argv: list[str] | None = None) -> None:
    arg_parser = argparse.ArgumentParser(prog=f"python -m {__name__}", description="Write engine/trt_api/<version>.txt")
    arg_parser.add_argument("wheels", nargs="+", type=Path, help="tensorrt-cu12/cu13-bindings wheel files")
    arg_parser.add_argument("--out", type=Path, default=NAMES_DIR, help="folder for the lists")
    args = arg_parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for wheel in args.wheels:
        version, names = names_from_wheel(wheel)
        log.info("%s: %d names -> %s", wheel.name, len(names), write_names(version, names, args.out))


if __name__ == "__main__":
    main()
