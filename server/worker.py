"""A worker: one loaded `RuyiPipeline` that runs jobs one after another, kept loaded between them.

`JobRunner` turns a job payload (video options and image bytes) into a `Video`, reporting progress per stage
and stopping at the next progress report once cancelled; local worker processes and Ray Serve replicas both use
it. Run as a process (`python -m ruyi_trt.server.worker`), it speaks JSON lines: jobs and cancels arrive on stdin,
`ready` / `progress` / `done` / `failed` / `cancelled` go out on stdout (everything else the process prints goes
to stderr). A worker whose stdin closes (its server is gone) exits at once.

Under `--parallel` a worker is a group of processes, one per rank, started with torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): every rank gets every job, rank 0 reports and writes the video, and
the ranks agree on a cancel at each progress report (a broadcast from rank 0), so they stop at the same step.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised from the progress callback to stop a run that was cancelled."""


class JobRunner:
    """Holds the pipeline for `model` and `options` (`RuyiPipeline.from_pretrained`'s keywords)."""

    def __init__(self, model: str, options: dict):
        from ..runtime.pipeline import RuyiPipeline

        started = time.perf_counter()
        self.pipe = RuyiPipeline.from_pretrained(model, download=False, **options)
        self.load_seconds = time.perf_counter() - started
        self.device = str(self.pipe.device)
        self._agree = _cancel_agreement(self.pipe)

    @property
    def is_main(self) -> bool:
        return self.pipe.parallel is None or self.pipe.parallel.is_main

    def run(self, payload: dict, on_progress: Callable[[str, int, int], None], cancelled: Callable[[], bool]):
        """Make the video of `payload` ({"options", "images", "end_images"}, images base64): (Video, stats)."""
        from PIL import Image

        from ..runtime.request import VideoRequest
        from .forms import request_options

        def images(key: str) -> list:
            return [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in payload.get(key, ())]

        def callback(stage: str, done: int, total: int) -> None:
            if self._agree(cancelled()):
                raise JobCancelled(payload["id"])
            on_progress(stage, done, total)

        request = VideoRequest(start_images=images("images"), end_images=images("end_images"),
                               **request_options(payload["options"]))  # fmt: skip
        if self._agree(cancelled()):
            raise JobCancelled(payload["id"])
        started = time.perf_counter()
        video = self.pipe.generate(request, callback=callback, progress=False)
        stats = {"seconds": {k: round(v, 3) for k, v in video.stats.seconds.items()},
                 "run_seconds": round(time.perf_counter() - started, 3), "frames": video.stats.frames,
                 "height": video.stats.height, "width": video.stats.width, "device": self.device,
                 "peak_memory_bytes": video.stats.peak_memory_bytes}  # fmt: skip
        return video, stats


def _cancel_agreement(pipe) -> Callable[[bool], bool]:
    """`agree(mine) -> bool`: outside --parallel, `mine`; under it, rank 0's flag, broadcast to every rank."""
    if pipe.parallel is None:
        return lambda mine: mine
    import torch
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")  # collective: every rank of the group makes it at start-up

    def agree(mine: bool) -> bool:
        flag = torch.tensor([int(mine)])
        dist.broadcast(flag, src=0, group=group)
        return bool(flag.item())

    return agree


class ProcessWorker:
    """The JSON-lines loop of a worker process (see the module docstring)."""

    def __init__(self, runner: JobRunner, out) -> None:
        self.runner, self.out = runner, out
        self._write_lock = threading.Lock()
        self._jobs: list[dict] = []
        self._have_job = threading.Condition()
        self._cancelled: set[str] = set()

    def send(self, message: dict) -> None:
        if not self.runner.is_main and message["type"] == "progress":
            return
        with self._write_lock:
            self.out.write(json.dumps(message) + "\n")
            self.out.flush()

    def read_commands(self, stream) -> None:
        """Reader thread: queue jobs, note cancels; exit the process when the server goes away."""
        for line in stream:
            message = json.loads(line)
            if message["type"] == "cancel":
                self._cancelled.add(message["id"])
            elif message["type"] in ("job", "stop"):
                with self._have_job:
                    self._jobs.append(message)
                    self._have_job.notify()
        os._exit(0)  # stdin closed: the server stopped; nobody is left to take a result

    def serve(self) -> None:
        self.send({"type": "ready", "device": self.runner.device, "load_seconds": round(self.runner.load_seconds, 3),
                   "pid": os.getpid()})  # fmt: skip
        while True:
            with self._have_job:
                self._have_job.wait_for(lambda: self._jobs)
                message = self._jobs.pop(0)
            if message["type"] == "stop":
                return
            self.run(message)

    def run(self, job: dict) -> None:
        job_id = job["id"]
        try:
            video, stats = self.runner.run(
                job,
                on_progress=lambda stage, done, total: self.send(
                    {"type": "progress", "id": job_id, "stage": stage, "done": done, "total": total}),
                cancelled=lambda: job_id in self._cancelled,
            )  # fmt: skip
            if self.runner.is_main:
                video.save(Path(job["out"]))
            self.send({"type": "done", "id": job_id, "stats": stats})
        except JobCancelled:
            self.send({"type": "cancelled", "id": job_id})
        except Exception as exc:  # noqa: BLE001 - the job fails; the worker (and its loaded pipeline) carries on
            log.error("job %s failed:\n%s", job_id, traceback.format_exc())
            self.send({"type": "failed", "id": job_id, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            self._cancelled.discard(job_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--options", default="{}", help="RuyiPipeline.from_pretrained keywords as JSON.")
    args = parser.parse_args(argv)
    out = os.fdopen(os.dup(1), "w")  # the protocol keeps the real stdout; prints and progress bars go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s worker {os.getpid()} %(name)s: %(message)s")
    try:
        runner = JobRunner(args.model, json.loads(args.options))
    except Exception as exc:
        out.write(json.dumps({"type": "broken", "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        raise SystemExit(1) from exc
    worker = ProcessWorker(runner, out)
    threading.Thread(target=worker.read_commands, args=(sys.stdin,), daemon=True).start()
    worker.serve()


if __name__ == "__main__":
    main()
