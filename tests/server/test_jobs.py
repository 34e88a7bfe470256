"""The SQLite job queue: acceptance, the queue limit, claiming in order, recovery after a stop, cancel, expiry;
and the worker layout over GPUs and --parallel groups."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from ruyi_trt.server.executors import plan_groups
from ruyi_trt.server.jobs import JobStore, QueueFull

OPTIONS = {"frames": 8, "steps": 2}


def test_submit_claim_progress_finish(tmp_path) -> None:
    store = JobStore(tmp_path, max_queue=5)
    first = store.submit(OPTIONS, [b"start-a", b"start-b"], [b"end"])
    second = store.submit(OPTIONS | {"seed": 3}, [b"x"])
    assert store.inputs(first.id) == ([b"start-a", b"start-b"], [b"end"])
    claimed = store.claim()
    assert claimed.id == first.id and claimed.state == "running" and claimed.attempts == 1
    store.progress(first.id, "vae_encode", 1, 1)
    store.progress(first.id, "denoise", 1, 2)
    job = store.get(first.id)
    assert (job.stage, job.done, job.total, job.step) == ("denoise", 1, 2, 1)
    store.finish(first.id, store.result_path(first.id), {"run_seconds": 1.0})
    done = store.get(first.id).to_json()
    assert done["state"] == "done" and done["video"] == f"/v1/jobs/{first.id}/video" and done["steps"] == 2
    assert store.inputs(first.id) == ([], [])  # inputs go once a job has finished
    assert store.claim().id == second.id and store.claim() is None
    assert store.counts() == {"queued": 0, "running": 1, "done": 1, "failed": 0, "cancelled": 0}
    assert [j.id for j in store.list()] == [first.id, second.id]


def test_watch_hears_every_change_in_order_until_stopped(tmp_path) -> None:
    store = JobStore(tmp_path)
    job = store.submit(OPTIONS, [b"x"])
    heard = []
    stop = store.watch(job.id, lambda j: heard.append(None if j is None else (j.state, j.stage, j.step)))
    store.claim()
    for step in (1, 2):
        store.progress(job.id, "denoise", step, 2)
    store.progress(job.id, "vae_decode", 1, 1)
    store.finish(job.id, store.result_path(job.id), {})
    assert heard == [("queued", None, 0), ("running", None, 0), ("running", "denoise", 1), ("running", "denoise", 2),
                     ("running", "vae_decode", 2), ("done", "vae_decode", 2)]  # fmt: skip
    store.expire(-1.0)
    assert heard[-1] is None  # gone
    stop()
    other = store.submit(OPTIONS, [b"y"])
    store.claim()
    assert len(heard) == 7 and store.get(other.id).state == "running"


def test_queue_limit_counts_waiting_jobs(tmp_path) -> None:
    store = JobStore(tmp_path, max_queue=2)
    store.submit(OPTIONS, [b"1"])
    store.claim()  # a running job does not wait
    store.submit(OPTIONS, [b"2"])
    store.submit(OPTIONS, [b"3"])
    with pytest.raises(QueueFull, match="max-queue 2"):
        store.submit(OPTIONS, [b"4"])
    assert store.counts()["queued"] == 2


def test_reopened_store_keeps_jobs_and_recovers_running_ones(tmp_path) -> None:
    store = JobStore(tmp_path, max_attempts=2)
    running = store.submit(OPTIONS, [b"a"])
    waiting = store.submit(OPTIONS, [b"b"])
    store.claim()
    store.close()  # a crash leaves `running` behind

    store = JobStore(tmp_path, max_attempts=2)
    assert store.recover() == {running.id: "queued"}
    job = store.get(running.id)
    assert job.state == "queued" and "server stopped" in job.error and store.inputs(running.id) == ([b"a"], [])
    assert store.claim().id == running.id  # it keeps its place ahead of later jobs
    assert store.recover() == {running.id: "failed"}  # interrupted twice: given up, with the reason
    assert "given up after 2 attempts" in store.get(running.id).error
    assert store.get(waiting.id).state == "queued"
    mode = sqlite3.connect(tmp_path / "queue.sqlite3").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_stop_on_request_uses_no_attempt(tmp_path) -> None:
    store = JobStore(tmp_path, max_attempts=1)
    job = store.submit(OPTIONS, [b"a"])
    store.claim()
    assert store.requeue(job.id, "the server was stopped", counted=False) == "queued"
    assert store.claim().attempts == 1


def test_cancel_queued_and_running(tmp_path) -> None:
    store = JobStore(tmp_path)
    running, queued = store.submit(OPTIONS, [b"a"]), store.submit(OPTIONS, [b"b"])
    store.claim()
    assert store.cancel(queued.id).state == "cancelled" and store.inputs(queued.id) == ([], [])
    flagged = store.cancel(running.id)
    assert flagged.state == "running" and flagged.cancel_requested
    assert store.requeue(running.id, "worker lost") == "cancelled"  # a cancelled job is not run again


def test_expire_deletes_old_finished_jobs_and_videos(tmp_path) -> None:
    store = JobStore(tmp_path)
    old, fresh, waiting = (store.submit(OPTIONS, [b"x"]) for _ in range(3))
    for job in (old, fresh):
        store.claim()
        store.result_path(job.id).write_bytes(b"mp4")
        store.finish(job.id, store.result_path(job.id), {})
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE jobs SET finished = ? WHERE id = ?", (time.time() - 7200, old.id))
    assert store.expire(3600) == [old.id]
    assert store.get(old.id) is None and not store.result_path(old.id).exists()
    assert store.result_path(fresh.id).exists() and store.get(waiting.id).state == "queued"


def test_ids_never_become_paths(tmp_path) -> None:
    store = JobStore(tmp_path)
    assert store.get("../queue") is None and store.get("0" * 31 + "/") is None
    with pytest.raises(ValueError):
        store.result_path("../../etc/passwd")
    job = store.submit({"note": "../../x"}, [b"a"])
    assert json.loads(json.dumps(job.to_json()))["id"] == job.id


def test_worker_layout() -> None:
    cpu = plan_groups("cpu", 1, 2, gpu_count=4, visible=None)
    assert [g.name for g in cpu] == ["cpu-0", "cpu-1"] and cpu[0].envs == [{}]
    gpus = plan_groups(None, 1, 1, gpu_count=2, visible="3,5")
    assert [g.envs[0]["CUDA_VISIBLE_DEVICES"] for g in gpus] == ["3", "5"] and gpus[0].device == "cuda"
    assert [g.envs[0]["CUDA_VISIBLE_DEVICES"] for g in plan_groups("cuda:1", 1, 2, 2, None)] == ["1", "1"]
    pairs = plan_groups("cuda", 2, 1, gpu_count=5, visible=None)  # the fifth GPU has no partner
    assert [g.envs[0]["CUDA_VISIBLE_DEVICES"] for g in pairs] == ["0,1", "2,3"]
    assert [env["RANK"] for env in pairs[0].envs] == ["0", "1"] and pairs[0].envs[0]["WORLD_SIZE"] == "2"
    assert pairs[0].envs[0]["MASTER_PORT"] != pairs[1].envs[0]["MASTER_PORT"]
    ranks = plan_groups("cpu", 2, 1, gpu_count=0, visible=None)[0].envs
    assert [env["LOCAL_RANK"] for env in ranks] == ["0", "1"] and "CUDA_VISIBLE_DEVICES" not in ranks[0]
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        plan_groups(None, 4, 1, gpu_count=2, visible=None)
    with pytest.raises(ValueError, match="not visible"):
        plan_groups("cuda:3", 1, 1, gpu_count=2, visible=None)
