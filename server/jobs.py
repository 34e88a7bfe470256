"""The job queue: one SQLite database (WAL, synchronous FULL) under the server's data folder.

A job is accepted only once its row and its input images are committed in one transaction, so an answered
`POST /v1/jobs` survives a crash. States: queued -> running -> done | failed | cancelled (queued -> cancelled
too). A job found `running` when the server starts was interrupted: it is queued again, or marked failed with the
reason once it has been interrupted `max_attempts` times. Results are files under `results/`, named by the job id
the server made (never by anything a request sent); `expire` deletes finished jobs older than the retention age.

All access goes through one connection guarded by a lock (the HTTP handlers and the dispatcher share it).
`watch` hands every change of one job to a callback, in order, under that lock (the progress event stream).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
JOB_ID = re.compile(r"[0-9a-f]{32}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    options TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    stage TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    step INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    video TEXT,
    stats TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS inputs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    position INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (job_id, role, position)
);
"""


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs already."""


@dataclass
class Job:
    """One row of the queue, as the API reports it."""

    id: str
    state: str
    options: dict
    created: float
    started: float | None = None
    finished: float | None = None
    stage: str | None = None
    done: int = 0
    total: int = 0
    step: int = 0
    attempts: int = 0
    cancel_requested: bool = False
    error: str | None = None
    video: str | None = None
    stats: dict = field(default_factory=dict)

    @property
    def queue_seconds(self) -> float | None:
        """Seconds from acceptance to the start of its (last) run; None while still queued."""
        return None if self.started is None else max(0.0, self.started - self.created)

    def seconds(self, now: float | None = None) -> float:
        """Seconds it has run (so far, or in all)."""
        if self.started is None:
            return 0.0
        end = self.finished if self.finished is not None else (now or time.time())
        return max(0.0, end - self.started)

    def to_json(self) -> dict:
        return {
            "id": self.id, "state": self.state, "stage": self.stage, "done": self.done, "total": self.total,
            "step": self.step, "steps": self.options.get("steps"), "seconds": round(self.seconds(), 3),
            "queue_seconds": None if self.queue_seconds is None else round(self.queue_seconds, 3),
            "created": self.created, "started": self.started, "finished": self.finished, "attempts": self.attempts,
            "cancel_requested": self.cancel_requested, "error": self.error, "options": self.options,
            "video": f"/v1/jobs/{self.id}/video" if self.state == "done" and self.video else None,
            "stats": self.stats,
        }  # fmt: skip


class JobStore:
    """The queue database under `data_dir` (created when missing); see the module docstring."""

    def __init__(self, data_dir: str | Path, max_queue: int = 100, max_attempts: int = 2):
        self.data_dir = Path(data_dir)
        self.results_dir = self.data_dir / "results"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "queue.sqlite3"
        self.max_queue, self.max_attempts = max_queue, max_attempts
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._watchers: dict[str, list[Callable[[Job | None], None]]] = {}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, *changing: str) -> Iterator[sqlite3.Connection]:
        """One write transaction; the watchers of the jobs in `changing` hear of it once it is committed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._changed(*changing)

    def _query(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- accepting ----------------------------------------------------------------------------------
    def submit(self, options: dict, start_images: Sequence[bytes], end_images: Sequence[bytes] = ()) -> Job:
        """Store a new queued job and its images in one transaction; QueueFull when `max_queue` are waiting."""
        job_id = uuid.uuid4().hex
        now = time.time()
        with self._transaction() as db:
            (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
            if waiting >= self.max_queue:
                raise QueueFull(f"the queue holds {waiting} waiting jobs (--max-queue {self.max_queue}); retry later.")
            db.execute("INSERT INTO jobs (id, state, options, created) VALUES (?, 'queued', ?, ?)",
                       (job_id, json.dumps(options), now))  # fmt: skip
            rows = [(job_id, "start", i, data) for i, data in enumerate(start_images)]
            rows += [(job_id, "end", i, data) for i, data in enumerate(end_images)]
            db.executemany("INSERT INTO inputs (job_id, role, position, data) VALUES (?, ?, ?, ?)", rows)
        return Job(id=job_id, state="queued", options=options, created=now)

    # -- reading ------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, limit: int = 100) -> list[Job]:
        """The newest `limit` jobs, oldest first."""
        rows = self._query("SELECT * FROM (SELECT * FROM jobs ORDER BY seq DESC LIMIT ?) ORDER BY seq", (limit,))
        return [_job(row) for row in rows]

    def counts(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {state: 0 for state in STATES} | {row["state"]: row["n"] for row in rows}

    def inputs(self, job_id: str) -> tuple[list[bytes], list[bytes]]:
        """(start images, end images) as the bytes that were uploaded."""
        rows = self._query("SELECT role, data FROM inputs WHERE job_id = ? ORDER BY role, position", (job_id,))
        return [r["data"] for r in rows if r["role"] == "start"], [r["data"] for r in rows if r["role"] == "end"]

    def result_path(self, job_id: str) -> Path:
        """Where the video of `job_id` (an id this store made) is written."""
        if not JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.results_dir / f"{job_id}.mp4"

    # -- running ------------------------------------------------------------------------------------
    def claim(self) -> Job | None:
        """The oldest queued job, now marked running (attempts + 1); None when nothing waits."""
        with self._lock:
            with self._transaction() as db:
                row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
                if row is None:
                    return None
                db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, stage = NULL, "
                           "done = 0, total = 0, step = 0 WHERE id = ?", (time.time(), row["id"]))  # fmt: skip
            self._changed(row["id"])
        return self.get(row["id"])

    def progress(self, job_id: str, stage: str, done: int, total: int) -> None:
        step = ", step = ?" if stage == "denoise" else ""
        args = (stage, done, total, *((done,) if step else ()), job_id)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET stage = ?, done = ?, total = ?{step} WHERE id = ? AND state = 'running'",
                             args)  # fmt: skip
            self._changed(job_id)

    def finish(self, job_id: str, video: Path, stats: dict) -> None:
        self._end(job_id, "done", video=str(video), stats=json.dumps(stats), error=None)

    def fail(self, job_id: str, error: str) -> None:
        self._end(job_id, "failed", error=error)

    def mark_cancelled(self, job_id: str) -> None:
        self._end(job_id, "cancelled", error="cancelled while running")

    def _end(self, job_id: str, state: str, **values: str | None) -> None:
        sets = "".join(f", {name} = ?" for name in values)
        with self._transaction(job_id) as db:
            db.execute(f"UPDATE jobs SET state = ?, finished = ?{sets} WHERE id = ? AND state = 'running'",
                       (state, time.time(), *values.values(), job_id))  # fmt: skip
            db.execute("DELETE FROM inputs WHERE job_id = ?", (job_id,))

    def requeue(self, job_id: str, reason: str, counted: bool = True) -> str:
        """Put an interrupted running job back in the queue, or fail it after `max_attempts` runs; the new state.
        An uncounted interruption (the server was told to stop) does not use up an attempt."""
        with self._transaction(job_id) as db:
            row = db.execute("SELECT attempts, state, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] != "running":
                return row["state"] if row else "missing"
            if row["cancel_requested"]:
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = ? WHERE id = ?",
                           (time.time(), f"cancelled ({reason})", job_id))  # fmt: skip
                db.execute("DELETE FROM inputs WHERE job_id = ?", (job_id,))
                return "cancelled"
            if not counted:
                db.execute("UPDATE jobs SET attempts = attempts - 1 WHERE id = ?", (job_id,))
            elif row["attempts"] >= self.max_attempts:
                db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                           (time.time(), f"{reason}; given up after {row['attempts']} attempts", job_id))  # fmt: skip
                db.execute("DELETE FROM inputs WHERE job_id = ?", (job_id,))
                return "failed"
            db.execute("UPDATE jobs SET state = 'queued', started = NULL, stage = NULL, done = 0, total = 0, "
                       "step = 0, error = ? WHERE id = ?", (reason, job_id))  # fmt: skip
            return "queued"

    def recover(self) -> dict[str, str]:
        """At start-up: every job left `running` by a stopped server is re-queued (or failed); {id: new state}."""
        running = [row["id"] for row in self._query("SELECT id FROM jobs WHERE state = 'running' ORDER BY seq")]
        return {job_id: self.requeue(job_id, "the server stopped while the job ran") for job_id in running}

    # -- watching -----------------------------------------------------------------------------------
    def watch(self, job_id: str, callback: Callable[[Job | None], None]) -> Callable[[], None]:
        """Call `callback` with the job as it is now, then again after each change to it (None once it is gone),
        in the order of the changes and under the store's lock (so it must be quick); the function returned stops
        that."""
        with self._lock:
            self._watchers.setdefault(job_id, []).append(callback)
            callback(self.get(job_id))

        def stop() -> None:
            with self._lock:
                callbacks = self._watchers.get(job_id, [])
                if callback in callbacks:
                    callbacks.remove(callback)
                if not callbacks:
                    self._watchers.pop(job_id, None)

        return stop

    def _changed(self, *job_ids: str) -> None:
        for job_id in job_ids:
            callbacks = self._watchers.get(job_id)
            if callbacks:
                job = self.get(job_id)
                for callback in list(callbacks):
                    callback(job)

    # -- cancelling and expiring --------------------------------------------------------------------
    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job now, or flag a running one (its worker stops at its next progress report)."""
        with self._transaction(job_id) as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = 'cancelled before it ran' "
                       "WHERE id = ? AND state = 'queued'", (time.time(), job_id))  # fmt: skip
            db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,))
            db.execute("DELETE FROM inputs WHERE job_id = ? AND (SELECT state FROM jobs WHERE id = ?) = 'cancelled'",
                       (job_id, job_id))  # fmt: skip
        return self.get(job_id)

    def expire(self, max_age_s: float) -> list[str]:
        """Delete finished jobs (and their videos) that finished more than `max_age_s` seconds ago; their ids."""
        cutoff = time.time() - max_age_s
        marks = ",".join("?" * len(FINISHED))
        with self._lock:
            with self._transaction() as db:
                rows = db.execute(f"SELECT id, video FROM jobs WHERE state IN ({marks}) AND finished < ?",
                                  (*FINISHED, cutoff)).fetchall()  # fmt: skip
                db.executemany("DELETE FROM jobs WHERE id = ?", [(row["id"],) for row in rows])
            self._changed(*(row["id"] for row in rows))
        for row in rows:
            self.result_path(row["id"]).unlink(missing_ok=True)
        return [row["id"] for row in rows]


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], state=row["state"], options=json.loads(row["options"]), created=row["created"],
        started=row["started"], finished=row["finished"], stage=row["stage"], done=row["done"], total=row["total"],
        step=row["step"], attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]),
        error=row["error"], video=row["video"], stats=json.loads(row["stats"]) if row["stats"] else {},
    )  # fmt: skip
