"""Helpers for the server tests: real `ruyi-trt serve` processes on 127.0.0.1 for the server tests: start, wait until the workers are ready,
talk to them with httpx, stop (SIGTERM) or crash them (SIGKILL of the whole process group)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ruyi_trt.testing import gradient_image

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

TOKEN = "test-token-0123456789abcdef"
SMALL_JOB = {"frames": "8", "size": "32x32", "steps": "2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(width: int = 48, height: int = 32, phase: float = 0.0) -> bytes:
    buffer = io.BytesIO()
    gradient_image(width, height, phase).save(buffer, format="PNG")
    return buffer.getvalue()


class ServerProcess:
    """One `ruyi-trt serve` process (its own session, so its workers can be killed with it)."""

    def __init__(self, folder: Path, *args: str, token: str | None = None, ray: bool = False,
                 tmp_dir: Path | None = None):  # fmt: skip
        self.folder, self.token, self.ray = folder, token, ray
        self.data_dir = folder / "data"
        self.tmp_dir = tmp_dir or folder / "tmp"  # the server's TMPDIR: spooled uploads would land here
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "from ruyi_trt.cli import main; main()", "serve", "--model", "tiny", "--port", str(self.port),
                   "--data-dir", str(self.data_dir), *args]  # fmt: skip
        if token is not None:
            token_file = folder / "token.txt"
            token_file.write_text(token + "\n")
            command += ["--token-file", str(token_file)]
        if ray:
            command.append("--ray")
        self.command = command
        self.process: subprocess.Popen | None = None
        self.log_path = folder / "server.log"

    def start(self, timeout: float = 240.0) -> ServerProcess:
        env = os.environ | {"TMPDIR": str(self.tmp_dir), "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - the server writes into it until stop()
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                health = self.client().get("/healthz", timeout=5).json()
                if health.get("status") == "ok":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_text()}")

    def client(self, token: str | None = "default") -> httpx.Client:
        token = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, and wait for a clean exit (the return code)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server and every process of its session (its workers): a crash."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)
        deadline = time.monotonic() + 15
        while self.session_processes() and time.monotonic() < deadline:  # SIGKILL lands a moment later
            time.sleep(0.1)
        self.log.close()

    def session_processes(self) -> list[int]:
        """Pids still running in the server's session (zombies, dead but not yet reaped, do not count)."""
        alive = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                    if os.getsid(int(entry.name)) == self.process.pid and not zombie:
                        alive.append(int(entry.name))
                except (OSError, IndexError):
                    pass
        return alive


def submit(client: httpx.Client, image: bytes | None = None, **fields: str) -> httpx.Response:
    files = [("image", ("start.png", image if image is not None else png_bytes(), "image/png"))]
    return client.post("/v1/jobs", data=SMALL_JOB | fields, files=files)


def wait_for(client: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 180.0,
             until=lambda job: True) -> dict:  # fmt: skip
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not {states} after {timeout} s: {job}")
