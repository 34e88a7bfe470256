"""Errors as a ComfyUI user reads them: in node-input terms, and of a type whose name reads as a class name.

The library's messages are written for the CLI and for Python ("--model PATH", "use --backend torch"); inside a
node the same advice is about the node's inputs. And ComfyUI names an exception's type by its module: for a
custom node that module is named after the node folder's path (`/home/me/ComfyUI/custom_nodes/ruyi-trt.models.
checkpoint_io.CheckpointError`), so the nodes raise the builtin base type (ValueError, RuntimeError, ...) with
the translated message instead, chained to the original. ComfyUI's own exceptions (Cancel: its
InterruptProcessingException) and those of other libraries pass through unchanged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

PACKAGE = __name__.rsplit(".", 2)[0]  # "ruyi_trt", or the path-derived name ComfyUI gives the node folder
# CLI flag (with the value that follows it, if any) -> the node input or ComfyUI setting that does the same
FLAG_TERMS = (
    (r"omit --model", "choose Ruyi-Mini-7B in Load Model's model"),
    (r"--model PATH", "a checkpoint folder in models/Ruyi (Load Model's model)"),
    (r"--model (\S+)", r"model \1"),
    (r"--model", "model"),
    (r"--device cpu", "ComfyUI's --cpu option"),
    (r"--vram-budget GB(?: \(e\.g\. 24\))?", "a GPU (ComfyUI plans for the free GPU memory)"),
    (r"--vram-budget", "free GPU memory"),
    (r"--lora", "Load LoRA"),
    (r"--frames", "video_length"),
    (r"--resolution", "base_resolution"),
    (r"--size", "height/width"),
    (r"--memory-mode", "memory_mode"),
    (r"--(backend|dtype|fp8)\b", r"\1"),
)
QUOTED = re.compile(r"(`[^`]*`)")  # commands to run elsewhere (`ruyi-trt build ...`) stay as they are


def comfy_message(text: str) -> str:
    """`text` with CLI flags outside backquotes replaced by the node inputs that do the same."""
    parts = QUOTED.split(text)
    for i in range(0, len(parts), 2):
        for pattern, replacement in FLAG_TERMS:
            parts[i] = re.sub(pattern, replacement, parts[i])
    return "".join(parts)


def _builtin_base(exc: BaseException) -> type[BaseException]:
    return next(cls for cls in type(exc).__mro__ if cls.__module__ == "builtins")


def node_errors(function: F) -> F:
    """Wrap a node method: errors of this package or builtin types leave it as a builtin type with a message in
    node terms (see the module docstring); other exceptions pass through."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except Exception as exc:
            module = type(exc).__module__
            if module != "builtins" and not module.startswith(PACKAGE + "."):
                raise
            message = comfy_message(str(exc))
            if module == "builtins" and message == str(exc):
                raise
            raise _builtin_base(exc)(message) from exc

    return wrapper  # type: ignore[return-value]
