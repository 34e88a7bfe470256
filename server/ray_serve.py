"""`ruyi-trt serve --ray`: the same API as a Ray Serve application, its jobs run by GPU worker replicas.

Two deployments: `Api` (one replica, pinned to the node `serve` was started on, where --data-dir is) serves the
FastAPI app of `app.create_app` over the same SQLite queue and dispatcher as the local mode; `GpuWorker` has one
replica per GPU (`num_gpus=1`; on a cluster without GPUs they run on the CPU), each holding a loaded pipeline.
The dispatcher sends a job to the worker deployment through its handle and reads a stream back: progress events,
then the mp4's bytes, which the Api writes into results/. Cancelling the stream (a cancelled job, or the Api
going away) makes the replica stop at its next progress report. Every Ray node that runs a worker must have the
model at the same path (or use `tiny` / `full-random`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import threading
from collections.abc import Awaitable
from pathlib import Path

from ray import serve

from ..files import atomic_write
from .config import ServerConfig
from .executors import JobCancelled, JobFailed, Progress
from .worker import JobCancelled as RunCancelled
from .worker import JobRunner

log = logging.getLogger(__name__)

APP_NAME = "ruyi-trt"


@serve.deployment(max_ongoing_requests=1, health_check_period_s=30, health_check_timeout_s=120)
class GpuWorker:
    """One loaded pipeline; `run` streams a job's progress and then its video."""

    def __init__(self, model: str, options: dict):
        self.runner = JobRunner(model, options)

    async def run(self, payload: dict):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_progress(stage: str, done: int, total: int) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"type": "progress", "stage": stage, "done": done,
                                                          "total": total})  # fmt: skip

        work = loop.run_in_executor(None, self._work, payload, on_progress, cancelled.is_set)
        try:
            while not work.done() or not events.empty():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                else:
                    next_event.cancel()
            yield work.result()
        finally:
            cancelled.set()  # the caller went away or cancelled: the run stops at its next progress report

    def _work(self, payload: dict, on_progress, cancelled) -> dict:
        try:
            video, stats = self.runner.run(payload, on_progress, cancelled)
        except RunCancelled:
            return {"type": "cancelled"}
        except Exception as exc:
            log.exception("job %s failed", payload["id"])
            return {"type": "failed", "error": f"{type(exc).__name__}: {exc}"}
        with tempfile.TemporaryDirectory() as folder:
            path = video.save(Path(folder) / "video.mp4")
            return {"type": "done", "stats": stats, "video": path.read_bytes()}


class RayWorkers:
    """The executor over the `GpuWorker` deployment: at most `replicas` jobs in flight, one per replica."""

    def __init__(self, handle, replicas: int, on_change):
        self.handle, self.replicas, self.on_change = handle, replicas, on_change
        self._streams: dict[str, object] = {}
        self._cancelled: set[str] = set()
        self._done = 0

    async def start(self) -> None:
        pass

    def idle(self) -> int:
        return self.replicas - len(self._streams)

    def run(self, payload: dict, out: Path, on_progress: Progress) -> Awaitable[dict]:
        stream = self.handle.options(stream=True).run.remote(payload)
        self._streams[payload["id"]] = stream
        return self._run(payload["id"], stream, out, on_progress)

    async def _run(self, job_id: str, stream, out: Path, on_progress: Progress) -> dict:
        try:
            async for event in stream:
                if event["type"] == "progress":
                    on_progress(event["stage"], event["done"], event["total"])
                elif event["type"] == "done":
                    atomic_write(out, lambda tmp, data=event["video"]: tmp.write_bytes(data))
                    self._done += 1
                    return event["stats"]
                elif event["type"] == "cancelled":
                    raise JobCancelled(job_id)
                else:
                    raise JobFailed(event["error"])
            raise JobCancelled(job_id) if job_id in self._cancelled else JobFailed("the worker replica ended the job "
                                                                                   "without a result")  # fmt: skip
        except asyncio.CancelledError:
            if job_id in self._cancelled:
                raise JobCancelled(job_id) from None
            raise
        except Exception as exc:
            if job_id in self._cancelled and type(exc).__name__ == "RequestCancelledError":
                raise JobCancelled(job_id) from None
            raise
        finally:
            self._streams.pop(job_id, None)
            self._cancelled.discard(job_id)
            self.on_change()

    def cancel(self, job_id: str) -> None:
        stream = self._streams.get(job_id)
        if stream is not None:
            self._cancelled.add(job_id)
            stream.cancel()

    async def stop(self) -> None:
        for job_id in list(self._streams):
            self._streams[job_id].cancel()

    def describe(self) -> list[dict]:
        busy = list(self._streams)
        return [{"name": f"ray-replica-{i}", "state": "busy" if i < len(busy) else "ready", "ranks": 1,
                 "job": busy[i] if i < len(busy) else None, "jobs_done": self._done if i == 0 else 0,
                 "error": None} for i in range(self.replicas)]  # fmt: skip


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Api:
    """The HTTP API over the queue in `data_dir` (on this replica's node), dispatching to the GPU workers."""

    def __init__(self, worker, config: dict, replicas: int):
        self.worker, self.config, self.replicas = worker, ServerConfig(**config), replicas

    def __serve_build_asgi_app__(self):
        from .app import create_app
        from .dispatcher import Service
        from .jobs import JobStore

        config = self.config
        store = JobStore(config.data_dir, config.max_queue, config.max_attempts)
        service = Service(store, lambda on_change: RayWorkers(self.worker, self.replicas, on_change),
                          config.result_ttl_s)  # fmt: skip
        return create_app(service, config.token, config.max_upload_mb)


def serve_on_ray(config: ServerConfig, model: str) -> None:
    """Run the application on Ray until SIGINT/SIGTERM, then shut Serve and Ray down.

    Ray's core worker takes a SIGTERM sent to its driver as its own exit (its C++ handler may be the one installed
    when the signal lands) and then aborts the Python shutdown that follows. So the driver runs in a child process
    that never gets SIGTERM: this process turns SIGINT/SIGTERM into a stop message on a pipe, and exits with the
    driver's code."""
    import multiprocessing

    if config.parallel_world > 1:
        raise ValueError("--parallel with --ray is not supported: each Ray worker replica runs on one GPU.")
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    driver = context.Process(target=_ray_driver, args=(config, model, theirs), name="ruyi-trt-ray-driver")
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        driver.start()
        while driver.is_alive() and not stop.wait(0.5):
            pass
        if driver.is_alive():
            ours.send("stop")
        driver.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if driver.exitcode:
        raise RuntimeError(f"the Ray driver exited with code {driver.exitcode}; see the log above.")


def _ray_driver(config: ServerConfig, model: str, stop) -> None:
    """The child of `serve_on_ray`: start (or join) a Ray cluster, run the application, wait for "stop"."""
    import ray

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ray.init(address=config.ray_address, include_dashboard=False, log_to_driver=True)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        replicas = config.ray_workers or max(1, gpus)
        options = {k: v for k, v in config.run_options.items() if v is not None}
        options["device"] = "cuda" if gpus else "cpu"
        worker = GpuWorker.options(num_replicas=replicas,
                                   ray_actor_options={"num_gpus": 1 if gpus else 0, "num_cpus": 1})  # fmt: skip
        here = f"node:{ray.util.get_node_ip_address()}"
        api = Api.options(ray_actor_options={"num_cpus": 0, "resources": {here: 0.001}})
        settings = {name: getattr(config, name) for name in ServerConfig.__dataclass_fields__}
        settings["data_dir"] = str(Path(config.data_dir).resolve())
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(api.bind(worker.bind(model, options), settings, replicas), name=APP_NAME, route_prefix="/")
        log.info("serving %s on Ray: http://%s:%d, %d worker replica(s) (%s)", model, config.host, config.port,
                 replicas, "one GPU each" if gpus else "CPU")  # fmt: skip
        print("ruyi-trt serve --ray: ready", flush=True)
        try:
            stop.recv()
        except EOFError:  # the parent is gone
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
