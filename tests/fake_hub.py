"""A local stand-in for the Hugging Face Hub, for download tests: a real HTTP server on 127.0.0.1 that answers the
requests huggingface_hub makes for one model repository (model info with its files, the file tree that newer
`snapshot_download`s list, HEAD and GET of each file, ranged GETs for resumes), sending file bodies in pieces
`delay` seconds apart so that a test can stop a download half-way. Point huggingface_hub at it with `hub.env()`.

Imported by tests as `fake_hub` (pytest puts tests/, the folder of the root conftest.py, on sys.path).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves `files` ({path in the repo: bytes}) as the model repository `repo_id`, `piece` bytes at a time."""

    daemon_threads = True

    def __init__(self, repo_id: str, files: dict[str, bytes], piece: int = 1 << 15, delay: float = 0.0):
        self.repo_id, self.contents, self.piece, self.delay = repo_id, dict(files), piece, delay
        self.files = sorted(self.contents)
        self.gets: list[str] = []  # per file body sent: "name", or "name:bytes=N-" for a ranged GET
        super().__init__(("127.0.0.1", 0), FakeHubHandler)

    @classmethod
    def of_folder(cls, repo_id: str, folder: Path, **kwargs: float) -> FakeHub:
        """Every file under `folder`, by its path relative to it."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        return cls(repo_id, files, **kwargs)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def env(self) -> dict[str, str]:
        """Environment variables that send huggingface_hub here (plain HTTP, no Xet, no telemetry)."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                "HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "10"}  # fmt: skip

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.contents[name]).hexdigest()


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""

    def _file(self) -> str | None:
        prefix = f"/{self.server.repo_id}/resolve/"
        if not self.path.startswith(prefix):
            return None
        name = self.path[len(prefix) :].split("/", 1)[1].split("?", 1)[0]
        return name if name in self.server.contents else None

    def _json(self, value: object) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _headers(self, name: str, status: int = 200, start: int = 0) -> None:
        size = len(self.server.contents[name])
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{self.server.etag(name)}"')
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()

    def do_HEAD(self) -> None:
        name = self._file()
        if name is None:
            self.send_error(404)
            return
        self._headers(name)

    def do_GET(self) -> None:
        hub = self.server
        if self.path.startswith(f"/api/models/{hub.repo_id}"):
            if "/tree/" in self.path:
                self._json([{"type": "file", "path": name, "size": len(hub.contents[name]), "oid": hub.etag(name)}
                            for name in hub.files])  # fmt: skip
            else:
                siblings = [{"rfilename": name, "size": len(hub.contents[name])} for name in hub.files]
                self._json({"id": hub.repo_id, "sha": COMMIT, "siblings": siblings})
            return
        name = self._file()
        if name is None:
            self.send_error(404)
            return
        data, requested = hub.contents[name], self.headers.get("Range")
        start = int(requested.split("=")[1].split("-")[0]) if requested else 0
        hub.gets.append(f"{name}:{requested}" if requested else name)
        self._headers(name, 206 if requested else 200, start)
        try:
            for offset in range(start, len(data), hub.piece):
                self.wfile.write(data[offset : offset + hub.piece])
                time.sleep(hub.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """`hub` answering requests in a background thread for the block."""
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
