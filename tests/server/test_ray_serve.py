"""`ruyi-trt serve --ray`: the same API as a Ray Serve application on a local Ray cluster (CPU only here) serves
one job end to end, then shuts Ray down with it. Ray starts about 13 processes (~1.2 GB)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from serving import ServerProcess, submit, wait_for

pytest.importorskip("ray.serve")


def ray_processes(marker: str) -> list[int]:
    """Pids whose command line names this test's Ray temp folder (Ray's own daemons included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.slow
def test_ray_serve_runs_one_job_on_cpu(tiny_dir, tmp_path) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="ruyi-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    server = ServerProcess(tmp_path, "--max-queue", "4", ray=True, tmp_dir=Path(ray_tmp))
    try:
        server.start(timeout=300)
        with server.client() as client:
            health = client.get("/healthz").json()
            assert [w["name"] for w in health["workers"]] == ["ray-replica-0"]
            job = submit(client).json()
            done = wait_for(client, job["id"], ("done", "failed"), timeout=240)
            assert done["state"] == "done", (done, server.log_text())
            assert done["stats"]["device"] == "cpu" and done["step"] == 2
            assert client.get(done["video"]).content[4:8] == b"ftyp"
        assert (server.data_dir / "results" / f"{job['id']}.mp4").is_file()
        code = server.stop(timeout=120)
        assert code in (0, -signal.SIGTERM), (code, server.log_text()[-4000:])
        assert ray_processes(ray_tmp) == [], "Ray processes outlived the server"
    finally:
        server.kill()
        for pid in ray_processes(ray_tmp):  # only the processes of this test's Ray cluster
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
