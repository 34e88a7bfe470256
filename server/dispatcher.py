"""The service behind the API: the job store, an executor (local worker processes or Ray Serve replicas) and the
loop that moves queued jobs to free workers.

`Service.start` first recovers the queue (jobs a stopped server left running are re-queued or failed, see
`jobs.JobStore.recover`), then starts the executor and the dispatch loop. Each running job is one asyncio task:
it sends the job's inputs to a worker, records progress as it comes, and finishes the job as done (the video in
results/), failed (with the worker's reason), cancelled, or re-queued when its worker was lost. A cancel of a
running job is passed to its worker, which stops at its next progress report. Finished jobs older than the
retention age are deleted, with their videos, once a minute.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable

from .executors import Executor, JobCancelled, JobFailed, WorkerLost
from .jobs import Job, JobStore

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 60.0


class Service:
    """See the module docstring. `make_executor(on_change)` builds the executor once the loop runs."""

    def __init__(self, store: JobStore, make_executor: Callable[[Callable[[], None]], Executor],
                 result_ttl_s: float = 7 * 24 * 3600.0):  # fmt: skip
        self.store, self.result_ttl_s = store, result_ttl_s
        self._make_executor = make_executor
        self.executor: Executor | None = None
        self.started_at = time.time()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._running: dict[str, asyncio.Task] = {}
        self._stopping = False

    async def start(self) -> None:
        for job_id, state in self.store.recover().items():
            log.warning("job %s was running when the server stopped: now %s", job_id, state)
        self._wake = asyncio.Event()
        self.executor = self._make_executor(self.wake)
        await self.executor.start()
        self._loop_task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        """Stop dispatching and the workers; jobs they held go back to the queue without using up an attempt."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self.executor is not None:
            await self.executor.stop()
        if self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)
        self.store.close()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _dispatch(self) -> None:
        next_sweep = 0.0
        while True:
            while self.executor.idle() > 0:
                job = self.store.claim()
                if job is None:
                    break
                self._start(job)
            if time.monotonic() >= next_sweep:
                expired = self.store.expire(self.result_ttl_s)
                if expired:
                    log.info("expired %d finished job(s) older than %.0f s", len(expired), self.result_ttl_s)
                next_sweep = time.monotonic() + SWEEP_INTERVAL_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    def _start(self, job: Job) -> None:
        start_images, end_images = self.store.inputs(job.id)
        payload = {
            "id": job.id, "options": job.options,
            "images": [base64.b64encode(data).decode() for data in start_images],
            "end_images": [base64.b64encode(data).decode() for data in end_images],
        }  # fmt: skip
        out = self.store.result_path(job.id)

        def on_progress(stage: str, done: int, total: int) -> None:
            self.store.progress(job.id, stage, done, total)

        running = self.executor.run(payload, out, on_progress)  # takes the worker now
        if job.cancel_requested:
            self.executor.cancel(job.id)
        self._running[job.id] = asyncio.create_task(self._finish(job, running))

    async def _finish(self, job: Job, running) -> None:
        try:
            stats = await running
            self.store.finish(job.id, self.store.result_path(job.id), stats)
            log.info("job %s done in %.1f s", job.id, stats.get("run_seconds", 0.0))
        except JobCancelled:
            self.store.mark_cancelled(job.id)
            log.info("job %s cancelled while running", job.id)
        except JobFailed as exc:
            self.store.fail(job.id, str(exc))
            log.warning("job %s failed: %s", job.id, exc)
        except WorkerLost as exc:
            state = self.store.requeue(job.id, str(exc), counted=not self._stopping)
            log.warning("job %s lost its worker (%s): now %s", job.id, exc, state)
        except Exception as exc:
            state = self.store.requeue(job.id, f"{type(exc).__name__}: {exc}", counted=not self._stopping)
            log.exception("job %s lost its worker; now %s", job.id, state)
        finally:
            self._running.pop(job.id, None)
            self.wake()

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now; ask the worker of a running one to stop. The job as it is after that."""
        job = self.store.cancel(job_id)
        if job is not None and job.state == "running" and self.executor is not None:
            self.executor.cancel(job_id)
        return job

    def health(self) -> dict:
        workers = self.executor.describe() if self.executor is not None else []
        ready = sum(w["state"] in ("ready", "busy") for w in workers)
        return {"status": "ok" if ready else "starting", "workers": workers, "jobs": self.store.counts(),
                "uptime_s": round(time.time() - self.started_at, 1)}  # fmt: skip
