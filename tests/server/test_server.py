"""`ruyi-trt serve` as a real process on 127.0.0.1 with the tiny model: submit -> poll -> download, progress
events, bad requests (no files left), queue full, cancel while running, a restart mid-queue, a small load."""

from __future__ import annotations

import json
import signal
import subprocess

from serving import SMALL_JOB, TOKEN, ServerProcess, submit, wait_for

from ruyi_trt.runtime.video import read_video


def test_submit_poll_download(server, tmp_path) -> None:
    with server.client() as client:
        response = submit(client, seed="7")
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["state"] == "queued" and len(job["id"]) == 32
        done = wait_for(client, job["id"], ("done", "failed"))
        assert done["state"] == "done", done
        assert done["step"] == done["steps"] == 2 and done["queue_seconds"] is not None and done["seconds"] > 0
        assert done["options"]["seed"] == 7 and done["stats"]["frames"] == 8
        video = client.get(done["video"])
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        path = tmp_path / "video.mp4"
        path.write_bytes(video.content)
        frames = read_video(path)
        assert tuple(frames.shape) == (8, 32, 32, 3)
        listed = client.get("/v1/jobs").json()
        assert job["id"] in [j["id"] for j in listed["jobs"]] and listed["counts"]["done"] >= 1
        events = client.get(f"/v1/jobs/{job['id']}/events").text  # a finished job: one event, then the end
        assert json.loads(events.split("data: ", 1)[1])["state"] == "done"


def test_events_stream_progress(server) -> None:
    with server.client() as client:
        job = submit(client, steps="6").json()
        seen = []
        with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=180) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
    assert seen[-1]["state"] == "done"
    steps = [event["step"] for event in seen if event["state"] == "running" and event["stage"] == "denoise"]
    assert steps and steps == sorted(steps) and max(steps) >= 1, seen
    assert seen[-1]["step"] == 6


def test_bad_requests_get_4xx_and_leave_no_files(server) -> None:
    before = {p.relative_to(server.data_dir) for p in server.data_dir.rglob("*") if "queue.sqlite3" not in p.name}
    with server.client() as client:
        counts = client.get("/v1/jobs").json()["counts"]
        cases = {
            "no image": (client.post("/v1/jobs", data=SMALL_JOB), 422, "image"),
            "frames 0": (submit(client, frames="0"), 422, "frames"),
            "a 30 MB non-image": (submit(client, image=b"\x00not an image" * (30 * 2**20 // 13)), 413, None),
            "a small non-image": (submit(client, image=b"GIF89a no really"), 422, "image"),
            "an unknown option": (submit(client, guidance="3"), 422, "guidance"),
            "a bad size": (submit(client, size="big"), 422, "size"),
            "too many steps": (submit(client, steps="501"), 422, "steps"),
        }
        for name, (response, status, field) in cases.items():
            assert response.status_code == status, (name, response.status_code, response.text)
            if field is not None:
                assert response.json()["field"] == field, (name, response.json())
                assert field in response.json()["detail"], (name, response.json())
        with server.client(token="wrong-token-0123456789") as wrong, server.client(token=None) as anonymous:
            for response in (submit(wrong), anonymous.get("/v1/jobs"), wrong.get("/healthz")):
                assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            page = anonymous.get("/")  # the page itself holds no data: it loads without the token
            assert page.status_code == 200 and "ruyi-trt" in page.text
        assert client.get("/v1/jobs").json()["counts"] == counts
        assert client.get("/v1/jobs/../../etc/passwd").status_code == 404
        assert client.get("/v1/jobs/" + "0" * 32 + "/video").status_code == 404
    after = {p.relative_to(server.data_dir) for p in server.data_dir.rglob("*") if "queue.sqlite3" not in p.name}
    assert after == before
    assert list(server.tmp_dir.iterdir()) == []


def test_queue_full_and_cancel_while_running(server) -> None:
    with server.client() as client:
        long = submit(client, steps="500").json()
        running = wait_for(client, long["id"], ("running",), until=lambda job: job["step"] >= 1)
        assert running["stage"] == "denoise" and running["total"] == 500
        waiting = [submit(client).json() for _ in range(2)]  # --max-queue 2
        full = submit(client)
        assert full.status_code == 429 and "max-queue" in full.json()["detail"], full.text
        assert full.headers["retry-after"]
        cancelled = client.delete(f"/v1/jobs/{waiting[0]['id']}").json()
        assert cancelled["state"] == "cancelled"
        flagged = client.delete(f"/v1/jobs/{long['id']}")
        assert flagged.status_code == 200 and flagged.json()["cancel_requested"]
        stopped = wait_for(client, long["id"], ("cancelled", "done", "failed"), timeout=60)
        assert stopped["state"] == "cancelled" and stopped["step"] < 500, stopped
        assert client.get(f"/v1/jobs/{long['id']}/video").status_code == 409
        assert client.delete(f"/v1/jobs/{long['id']}").status_code == 409
        assert wait_for(client, waiting[1]["id"], ("done", "failed"))["state"] == "done"  # the worker carried on
    assert not (server.data_dir / "results" / f"{long['id']}.mp4").exists()


def test_restart_mid_queue_loses_no_job(tiny_dir, tmp_path) -> None:
    server = ServerProcess(tmp_path, "--max-queue", "10").start()
    try:
        with server.client() as client:
            first = submit(client, steps="40").json()
            wait_for(client, first["id"], ("running",), until=lambda job: job["step"] >= 1)
            rest = [submit(client, seed=str(seed)).json() for seed in range(3)]
        server.kill()  # a crash: the server and its worker die at once, mid-job
        assert server.session_processes() == []
        server.start()
        with server.client() as client:
            jobs = [wait_for(client, job["id"], ("done", "failed")) for job in [first, *rest]]
            assert [job["state"] for job in jobs] == ["done"] * 4, jobs
            assert jobs[0]["attempts"] == 2 and all(job["attempts"] == 1 for job in jobs[1:])
            for job in jobs:
                assert client.get(job["video"]).content[4:8] == b"ftyp"
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
        assert "Application shutdown complete" in server.log_text()
        assert server.session_processes() == []
    finally:
        server.kill()


def test_bad_configuration_fails_before_serving(tmp_path) -> None:
    server = ServerProcess(tmp_path, "--max-queue", "0")
    result = subprocess.run(server.command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "max-queue: 0 must be at least 1" in result.stderr
    assert not server.data_dir.exists()


def test_small_load_loses_no_job(server) -> None:
    from ruyi_trt.server.loadtest import run_load

    report = run_load(server.url, jobs=6, clients=3, fields=SMALL_JOB, token=TOKEN, timeout_s=300)
    assert (report.accepted, report.completed, report.failed, report.lost) == (6, 6, 0, 0), report
    assert 0 < report.queue_p50_s <= report.queue_p95_s and report.errors == []
