"""A bounded load test of `ruyi-trt serve`: `python -m ruyi_trt.server.loadtest [--url URL] --jobs 50 --clients 8`.

Each client thread submits jobs until `--jobs` have been accepted (a 429 counts as a rejection and is retried
after the server's Retry-After), then waits for its jobs and downloads each video. It reports accepted,
completed (done, video downloaded), failed, rejected (429 answers) and lost jobs (accepted but never finished
within `--timeout`, gone, or without a video; must be 0), the p50/p95 queue latency (acceptance to the start of the
run, as the server measured it), end-to-end latency and throughput. Without `--url` it starts a server of its own
on 127.0.0.1 (tiny model, in a temporary folder) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

FINISHED = ("done", "failed", "cancelled")


@dataclass
class LoadReport:
    jobs: int
    clients: int
    accepted: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    lost: int = 0
    queue_p50_s: float = 0.0
    queue_p95_s: float = 0.0
    latency_p50_s: float = 0.0
    latency_p95_s: float = 0.0
    wall_s: float = 0.0
    jobs_per_minute: float = 0.0
    errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        counts = (f"accepted {self.accepted}  completed {self.completed}  failed {self.failed}  "
                  f"rejected (429 answers, retried) {self.rejected}  lost {self.lost}")  # fmt: skip
        latency = (f"queue latency p50 {self.queue_p50_s:.2f} s  p95 {self.queue_p95_s:.2f} s; "
                   f"submit-to-done p50 {self.latency_p50_s:.2f} s  p95 {self.latency_p95_s:.2f} s")  # fmt: skip
        total = (
            f"jobs {self.jobs} from {self.clients} clients in {self.wall_s:.1f} s ({self.jobs_per_minute:.1f} jobs/min)"
        )
        return [total, counts, latency]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the nearest ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def start_image() -> bytes:
    from ..testing import gradient_image

    buffer = io.BytesIO()
    gradient_image(48, 32).save(buffer, format="PNG")
    return buffer.getvalue()


def run_load(url: str, jobs: int, clients: int, fields: dict[str, str], token: str | None = None,
             timeout_s: float = 900.0) -> LoadReport:  # fmt: skip
    """Drive the server at `url` (see the module docstring)."""
    report = LoadReport(jobs=jobs, clients=clients)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    image = start_image()
    lock = threading.Lock()
    to_submit = [jobs]
    finished: list[dict] = []
    started = time.monotonic()
    deadline = started + timeout_s

    def take() -> bool:
        with lock:
            if to_submit[0] == 0:
                return False
            to_submit[0] -= 1
            return True

    def note(**counts: int) -> None:
        with lock:
            for name, n in counts.items():
                setattr(report, name, getattr(report, name) + n)

    def client_loop() -> None:
        mine: list[str] = []
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            while take():
                while time.monotonic() < deadline:
                    response = client.post(
                        "/v1/jobs", data=fields, files=[("image", ("start.png", image, "image/png"))]
                    )
                    if response.status_code == 429:
                        note(rejected=1)
                        time.sleep(min(float(response.headers.get("retry-after", 1)), 2.0))
                        continue
                    if response.status_code != 201:
                        with lock:
                            report.errors.append(f"submit answered {response.status_code}: {response.text[:200]}")
                        break
                    mine.append(response.json()["id"])
                    note(accepted=1)
                    break
            pending = list(mine)
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    answer = client.get(f"/v1/jobs/{job_id}")
                    if answer.status_code == 404:
                        pending.remove(job_id)  # gone: counted as lost below
                        continue
                    job = answer.json()
                    if job["state"] in FINISHED:
                        pending.remove(job_id)
                        video = client.get(job["video"]) if job["state"] == "done" and job["video"] else None
                        job["downloaded"] = (
                            video is not None and video.status_code == 200 and video.content[4:8] == b"ftyp"
                        )
                        with lock:
                            finished.append(job)
                time.sleep(0.5)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.wall_s = time.monotonic() - started
    report.completed = sum(job["state"] == "done" and job["downloaded"] for job in finished)
    report.failed = sum(job["state"] == "failed" for job in finished)
    report.lost = report.accepted - report.completed - report.failed
    queue = [job["queue_seconds"] for job in finished if job["queue_seconds"] is not None]
    latency = [job["finished"] - job["created"] for job in finished if job["finished"]]
    report.queue_p50_s, report.queue_p95_s = percentile(queue, 50), percentile(queue, 95)
    report.latency_p50_s, report.latency_p95_s = percentile(latency, 50), percentile(latency, 95)
    report.jobs_per_minute = 60 * report.completed / report.wall_s if report.wall_s else 0.0
    report.errors += [f"job {job['id']} failed: {job['error']}" for job in finished if job["state"] == "failed"]
    return report


class OwnServer:
    """`ruyi-trt serve --model tiny` in a temporary folder on a free 127.0.0.1 port, for the load test."""

    def __init__(self, max_queue: int, workers: int):
        self._scratch = tempfile.TemporaryDirectory(prefix="ruyi-loadtest-", ignore_cleanup_errors=True)  # a scratch folder, not a published file
        self.folder = Path(self._scratch.name)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "from ruyi_trt.cli import main; main()", "serve", "--model", "tiny",
                   "--port", str(self.port), "--data-dir", str(self.folder / "data"), "--max-queue", str(max_queue),
                   "--workers-per-gpu", str(workers)]  # fmt: skip
        self.log = open(self.folder / "server.log", "wb")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.folder}/server.log")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).json()["status"] == "ok":
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server was not ready after {timeout_s} s; see {self.folder}/server.log")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()

    def remove(self) -> None:
        self._scratch.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="A running server (default: start one with the tiny model).")
    parser.add_argument("--token-file", default=None)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--frames", default="8")
    parser.add_argument("--size", default="32x32")
    parser.add_argument("--steps", default="2")
    parser.add_argument("--max-queue", type=int, default=16, help="For the server it starts: waiting jobs before 429.")
    parser.add_argument("--workers", type=int, default=1, help="For the server it starts: worker processes.")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds for the whole test.")
    parser.add_argument("--out", default=None, help="Also write the report as JSON here.")
    args = parser.parse_args(argv)
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    own = None if args.url else OwnServer(args.max_queue, args.workers)
    try:
        if own is not None:
            own.wait_ready()
        fields = {"frames": args.frames, "size": args.size, "steps": args.steps}
        report = run_load(args.url or own.url, args.jobs, args.clients, fields, token, args.timeout)
    finally:
        if own is not None:
            own.stop()
    if own is not None and report.lost == 0:
        own.remove()
    elif own is not None:
        print(f"the server's folder is kept for a look: {own.folder}")
    print("\n".join(report.lines()))
    for error in report.errors[:10]:
        print("  " + error)
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(report), indent=2))
    return 0 if report.lost == 0 and report.accepted == args.jobs else 1


if __name__ == "__main__":
    raise SystemExit(main())
