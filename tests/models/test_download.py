"""Downloads with progress and stop (models/download.py) against a local stand-in for the Hub: a real HTTP server
on 127.0.0.1 that answers huggingface_hub's model-info and resolve requests (HEAD, GET, ranged GET for resumes),
with huggingface_hub itself doing the downloading in a subprocess pointed at it (HF_ENDPOINT)."""

from __future__ import annotations

import hashlib
import http.server
import inspect
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ID = "someone/tiny-repo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PIECE = 1 << 20  # served in 1 MiB pieces, 20 ms apart: a 24 MiB file takes about half a second
FILES = {"config.json": b'{"a": 1}\n', "weights/model.safetensors": bytes(range(256)) * (24 * PIECE // 256)}


class FakeHub(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.gets: list[str] = []  # "name" or "name:bytes=N-" per file download


class HubHandler(http.server.BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:
        """Quiet."""

    def _file(self) -> tuple[str, bytes] | None:
        prefix = f"/{REPO_ID}/resolve/"
        if not self.path.startswith(prefix):
            return None
        name = self.path[len(prefix) :].split("/", 1)[1]
        return (name, FILES[name]) if name in FILES else None

    def _headers(self, name: str, data: bytes, status: int, start: int = 0) -> None:
        self.send_response(status)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()

    def do_HEAD(self) -> None:
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        self._headers(*found, 200)

    def do_GET(self) -> None:
        if self.path.startswith(f"/api/models/{REPO_ID}"):
            siblings = [{"rfilename": name, "size": len(data)} for name, data in FILES.items()]
            body = json.dumps({"id": REPO_ID, "sha": COMMIT, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        name, data = found
        requested = self.headers.get("Range")
        start = int(requested.split("=")[1].split("-")[0]) if requested else 0
        self.server.gets.append(f"{name}:{requested}" if requested else name)
        self._headers(name, data, 206 if requested else 200, start)
        try:
            for offset in range(start, len(data), PIECE):
                self.wfile.write(data[offset : offset + PIECE])
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture()
def hub() -> FakeHub:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


SCRIPT = """
import json, sys, time
from pathlib import Path
from ruyi_trt.models.download import download_repo
folder, stop_at = Path(sys.argv[1]), int(sys.argv[2])
reports, raised = [], []
class Stop(Exception):
    pass
def progress(done, total):
    reports.append((done, total))
    if stop_at and done >= stop_at:
        raised.append(time.monotonic())
        raise Stop()
try:
    download_repo("someone/tiny-repo", folder, progress)
    outcome, returned_after = "done", None
except Stop:
    outcome, returned_after = "stopped", time.monotonic() - raised[0]
big = folder / "weights" / "model.safetensors"
print(json.dumps({"outcome": outcome, "reports": reports, "returned_after": returned_after, "big_file": big.exists()}))
"""


def download(hub: FakeHub, folder: Path, stop_at: int = 0) -> dict:
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin"}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(stop_at)], env=env, capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_progress_counts_bytes_up_to_the_total(hub: FakeHub, tmp_path: Path) -> None:
    total = sum(len(data) for data in FILES.values())
    result = download(hub, tmp_path / "repo")
    reports = [tuple(r) for r in result["reports"]]
    assert result["outcome"] == "done" and reports[0] == (0, total) and reports[-1] == (total, total)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    for name, data in FILES.items():
        assert (tmp_path / "repo" / name).read_bytes() == data


def test_a_stopped_download_ends_at_once_and_the_next_call_finishes_it(hub: FakeHub, tmp_path: Path) -> None:
    """Stop once the large file is under way (the callback raises, as ComfyUI's Cancel does): the call returns at
    once, and with huggingface_hub >= 1.0 the file stops too (older ones finish it in the background, here before
    the process exits); the next call fetches only what is missing and gets every byte right."""
    from huggingface_hub import hf_hub_download

    big = "weights/model.safetensors"
    stopped = download(hub, tmp_path / "repo", stop_at=len(FILES["config.json"]) + 1)
    assert stopped["outcome"] == "stopped" and stopped["returned_after"] < 1.0
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        assert not stopped["big_file"] and not (tmp_path / "repo" / big).exists()
    assert (tmp_path / "repo" / "config.json").exists()
    done = download(hub, tmp_path / "repo")
    assert done["outcome"] == "done" and (tmp_path / "repo" / big).read_bytes() == FILES[big]
    assert hub.gets.count("config.json") == 1 and hub.gets[0] == "config.json", hub.gets  # finished files stay
    assert hub.gets.count(big) + sum(g.startswith(big + ":") for g in hub.gets) <= 2, hub.gets
