"""How the dispatcher reaches workers: the `Executor` protocol and `LocalWorkers`, worker processes on this machine.

`LocalWorkers` starts one worker process per GPU (`workers_per_gpu` of them per GPU), or one process group per GPU
group under `--parallel` (torchrun's environment set for each rank), or `workers_per_gpu` processes on the CPU. Each
loads its pipeline once and keeps it. A worker that exits is started again; the job it held is reported as
`WorkerLost`, so the dispatcher re-queues it. The Ray Serve executor (`ray_serve.RayWorkers`) has the same shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
RESTART_DELAY_S = 2.0


class JobFailed(Exception):
    """The worker ran the job and it failed (bad input found late, out of memory, ...); the message says why."""


class JobCancelled(Exception):
    """The worker stopped the job because it was cancelled."""


class WorkerLost(Exception):
    """The worker went away while it held the job (it crashed or was killed); the job can run again."""


class Executor(Protocol):
    async def start(self) -> None: ...

    def idle(self) -> int:
        """How many jobs could start now."""

    def run(self, payload: dict, out: Path, on_progress: Progress) -> Awaitable[dict]:
        """Take an idle worker now (synchronously) and run the job on it, writing its video to `out`; awaiting
        gives its stats or raises JobFailed, JobCancelled or WorkerLost."""

    def cancel(self, job_id: str) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> list[dict]: ...


@dataclass
class GroupSpec:
    """One worker: its name, and one environment per rank (a single rank outside --parallel)."""

    name: str
    device: str
    envs: list[dict[str, str]]


def plan_groups(device: str | None, parallel_world: int, workers_per_gpu: int, gpu_count: int,
                visible: str | None) -> list[GroupSpec]:  # fmt: skip
    """The workers to start: per GPU (or group of `parallel_world` GPUs), `workers_per_gpu` of them; on the CPU
    `workers_per_gpu` workers. `visible` is CUDA_VISIBLE_DEVICES as the server got it (worker i sees its own)."""
    if workers_per_gpu < 1:
        raise ValueError(f"workers_per_gpu: {workers_per_gpu} must be at least 1.")
    on_cpu = device == "cpu" or (device is None and gpu_count == 0)
    world = max(1, parallel_world)
    if on_cpu:
        return [GroupSpec(f"cpu-{i}", "cpu", _rank_envs(world, {})) for i in range(workers_per_gpu)]
    physical = [p.strip() for p in visible.split(",")] if visible else [str(i) for i in range(gpu_count)]
    if device not in (None, "cuda"):
        index = int(device.split(":")[1])
        if index >= len(physical):
            raise ValueError(
                f"device: {device} is not visible ({len(physical)} GPU(s)); use cuda:0..{len(physical) - 1}."
            )
        physical = [physical[index]]
    if len(physical) < world:
        raise ValueError(f"--parallel needs {world} GPUs per worker, {len(physical)} are visible.")
    groups = [physical[i : i + world] for i in range(0, len(physical) - world + 1, world)]
    return [
        GroupSpec(f"gpu{'+'.join(gpus)}-{w}", "cuda", _rank_envs(world, {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}))
        for gpus in groups
        for w in range(workers_per_gpu)
    ]


def _rank_envs(world: int, base: dict[str, str]) -> list[dict[str, str]]:
    if world == 1:
        return [dict(base)]
    port = str(_free_port())
    return [base | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} for r in range(world)]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class _Pending:
    job_id: str
    on_progress: Progress
    results: list[asyncio.Future] = field(default_factory=list)


class WorkerGroup:
    """The processes of one worker (one per rank), talking JSON lines (see `worker`)."""

    def __init__(self, spec: GroupSpec, model: str, options: dict):
        self.spec, self.model, self.options = spec, model, options
        self.processes: list[asyncio.subprocess.Process] = []
        self.state = "stopped"  # starting, ready, busy, lost, broken, stopping, stopped
        self.error: str | None = None
        self.pending: _Pending | None = None
        self.jobs_done = 0
        self._ready: list[asyncio.Future] = []
        self._readers: list[asyncio.Task] = []

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.pending is None

    async def start(self) -> None:
        """Start every rank and wait until each has loaded its pipeline; raises RuntimeError when one cannot."""
        self.state, self.error = "starting", None
        loop = asyncio.get_running_loop()
        self._ready = [loop.create_future() for _ in self.spec.envs]
        options = self.options | {"device": self.spec.device}
        for rank, env in enumerate(self.spec.envs):
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ruyi_trt.server.worker", "--model", self.model, "--options", json.dumps(options),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=os.environ | env,
                limit=2**20,
            )  # fmt: skip
            self.processes.append(process)
            self._readers.append(asyncio.create_task(self._read(rank, process)))
        try:
            await asyncio.gather(*self._ready)
        except RuntimeError as exc:
            self.state, self.error = "broken", str(exc)
            await self.stop()
            self.state = "broken"
            raise
        self.state = "ready"
        log.info("worker %s ready (%d process(es))", self.spec.name, len(self.processes))

    def _send(self, message: dict) -> None:
        line = (json.dumps(message) + "\n").encode()
        for process in self.processes:
            if process.stdin is not None and not process.stdin.is_closing():
                process.stdin.write(line)

    def run(self, payload: dict, out: Path, on_progress: Progress) -> Awaitable[dict]:
        """Reserve this worker for the job now; the returned awaitable runs it."""
        loop = asyncio.get_running_loop()
        self.pending = _Pending(payload["id"], on_progress, [loop.create_future() for _ in self.processes])
        self.state = "busy"
        return self._run(payload, out)

    async def _run(self, payload: dict, out: Path) -> dict:
        try:
            self._send({"type": "job", **payload, "out": str(out)})
            for process in self.processes:
                await process.stdin.drain()
            outcomes = await asyncio.gather(*self.pending.results, return_exceptions=True)
        finally:
            self.pending = None
            if self.state == "busy":
                self.state = "ready"
        lost = [o for o in outcomes if isinstance(o, WorkerLost)]
        if lost:
            raise lost[0]
        failed = [o[1] for o in outcomes if o[0] == "failed"]
        if failed:
            if len(self.processes) > 1:  # a rank that failed alone leaves the others' collectives broken
                await self.restart("a rank failed")
            raise JobFailed(failed[0])
        if outcomes[0][0] == "cancelled":
            raise JobCancelled(payload["id"])
        self.jobs_done += 1
        return outcomes[0][1]

    def cancel(self, job_id: str) -> None:
        self._send({"type": "cancel", "id": job_id})

    async def _read(self, rank: int, process: asyncio.subprocess.Process) -> None:
        while line := await process.stdout.readline():
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("worker %s rank %d: unreadable line %r", self.spec.name, rank, line[:200])
                continue
            self._handle(rank, message)
        code = await process.wait()
        reason = f"worker {self.spec.name} (pid {process.pid}) exited with code {code}"
        if not self._ready[rank].done():
            self._ready[rank].set_exception(RuntimeError(self.error or reason))
        if self.pending is not None and not self.pending.results[rank].done():
            self.pending.results[rank].set_exception(WorkerLost(reason))
        if self.state in ("ready", "busy"):
            log.error("%s; starting it again", reason)
            self.state = "lost"

    def _handle(self, rank: int, message: dict) -> None:
        kind = message["type"]
        if kind == "ready":
            self._ready[rank].set_result(message)
        elif kind == "broken":
            self.error = f"worker {self.spec.name} could not load the pipeline: {message['error']}"
        elif self.pending is None or message.get("id") != self.pending.job_id:
            return
        elif kind == "progress":
            self.pending.on_progress(message["stage"], int(message["done"]), int(message["total"]))
        elif kind in ("done", "failed", "cancelled"):
            value = message.get("stats") if kind == "done" else message.get("error")
            if not self.pending.results[rank].done():
                self.pending.results[rank].set_result((kind, value))

    async def restart(self, reason: str) -> None:
        log.warning("restarting worker %s: %s", self.spec.name, reason)
        await self.stop()
        await self.start()

    async def stop(self, grace_s: float = 5.0) -> None:
        """Ask every rank to stop, then end (SIGKILL) those still running after `grace_s`."""
        self.state = "stopping"
        self._send({"type": "stop"})
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                process.kill()
                await process.wait()
        for reader in self._readers:
            reader.cancel()
        self.processes, self._readers = [], []
        self.state = "stopped"

    def describe(self) -> dict:
        return {"name": self.spec.name, "state": self.state, "ranks": len(self.spec.envs),
                "pids": [p.pid for p in self.processes], "job": self.pending.job_id if self.pending else None,
                "jobs_done": self.jobs_done, "error": self.error}  # fmt: skip


class LocalWorkers:
    """Worker processes on this machine (see the module docstring); `on_change` is called when one becomes free."""

    def __init__(
        self, model: str, options: dict, groups: list[GroupSpec], on_change: Callable[[], None] = lambda: None
    ):
        self.groups = [WorkerGroup(spec, model, options) for spec in groups]
        self.on_change = on_change
        self._supervisor: asyncio.Task | None = None

    async def start(self) -> None:
        """Start the workers in the background (the API serves, and jobs queue, while they load)."""
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        while True:
            for group in self.groups:
                if group.state in ("stopped", "lost", "broken") and group.pending is None:
                    await self._start(group)
            await asyncio.sleep(RESTART_DELAY_S)

    async def _start(self, group: WorkerGroup) -> None:
        if group.processes:
            await group.stop()
        try:
            await group.start()
        except RuntimeError as exc:
            log.error("%s", exc)
        self.on_change()

    def idle(self) -> int:
        return sum(group.idle for group in self.groups)

    def run(self, payload: dict, out: Path, on_progress: Progress) -> Awaitable[dict]:
        group = next(g for g in self.groups if g.idle)
        return self._run(group.run(payload, out, on_progress))

    async def _run(self, job: Awaitable[dict]) -> dict:
        try:
            return await job
        finally:
            self.on_change()

    def cancel(self, job_id: str) -> None:
        for group in self.groups:
            if group.pending is not None and group.pending.job_id == job_id:
                group.cancel(job_id)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        await asyncio.gather(*(group.stop() for group in self.groups))

    def describe(self) -> list[dict]:
        return [group.describe() for group in self.groups]
