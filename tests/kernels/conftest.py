"""Kernel tests run on a CUDA GPU when one is visible, else on CPU under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). The interpreter's bf16 arithmetic is wrong, so bf16 cases exist only on a GPU."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'triton>=3.3'")
