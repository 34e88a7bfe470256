"""The server shared by the API and web page tests (see serving.py for the helpers)."""

from __future__ import annotations

import pytest
from serving import TOKEN, ServerProcess


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory) -> ServerProcess:
    """A server shared by the API and web page tests: a token, at most 2 waiting jobs."""
    process = ServerProcess(tmp_path_factory.mktemp("server"), "--max-queue", "2", token=TOKEN).start()
    yield process
    process.stop()
