"""The HTTP API (FastAPI): jobs, their progress as server-sent events, their videos, and the web page.

    POST   /v1/jobs              multipart: image (repeatable), end_image, frames, steps, seed, ... -> {"id", ...}
    GET    /v1/jobs              the newest jobs (?limit=N), oldest first
    GET    /v1/jobs/{id}         state (queued, running, done, failed, cancelled), stage, done/total, step/steps,
                                 seconds, queue_seconds, error
    GET    /v1/jobs/{id}/events  text/event-stream: the job as JSON whenever it changes, until it has finished
    GET    /v1/jobs/{id}/video   the mp4 once done
    DELETE /v1/jobs/{id}         cancel (a running job stops at its next progress report)
    GET    /healthz              workers and queue counts
    GET    /                     the web page (web/), which holds no data itself

`Guard`, an ASGI middleware, runs before any of it: with a token, every request but the page's own files needs
`Authorization: Bearer <token>` (401 otherwise), and a body larger than the upload limit is refused with 413
while it is read (it is drained, not stored, so nothing is written). Job ids are made by the server and checked
against their pattern; no part of a request is ever used as a file path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .dispatcher import Service
from .forms import SubmissionError, parse_submission
from .jobs import FINISHED, QueueFull

WEB_DIR = Path(__file__).with_name("web")
PAGE_FILES = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript"),
              "/style.css": ("style.css", "text/css")}  # fmt: skip
MAX_FORM_FILES = 10
KEEPALIVE_S = 15.0
DRAIN_LIMIT = 1 << 30  # a refused body is read (and dropped) up to this size so the client sees the 413


class BodyTooLarge(Exception):
    pass


class Guard:
    """Bearer-token check and upload size limit (see the module docstring)."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.token is not None and not (scope["method"] == "GET" and scope["path"] in PAGE_FILES):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                await _drain(receive)
                return await _reply(send, 401, "a valid bearer token is needed: Authorization: Bearer <token>",
                                    [(b"www-authenticate", b"Bearer")])  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _drain(receive)
            return await _reply(send, 413, self._too_large())
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await _drain(receive)
            await _reply(send, 413, self._too_large())

    def _too_large(self) -> str:
        return (
            f"the request is larger than the upload limit of {self.max_body_bytes / 2**20:.0f} MiB (--max-upload-mb)."
        )


async def _drain(receive) -> None:
    read = 0
    while read < DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        read += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def create_app(service: Service | None = None, token: str | None = None, max_upload_mb: float = 20.0,
               manage_service: bool = True) -> FastAPI:  # fmt: skip
    """The app over `service` (set later through `app.state.service` when None); with `manage_service` the app's
    lifespan starts and stops it."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_service:
            await app.state.service.start()
        yield
        if manage_service:
            await app.state.service.stop()

    app = FastAPI(title="ruyi-trt serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.service = service
    app.add_middleware(Guard, token=token, max_body_bytes=int(max_upload_mb * 2**20))
    add_routes(app)
    return app


def _service(request: Request) -> Service:
    return request.app.state.service


def _job_or_404(request: Request, job_id: str):
    job = _service(request).store.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r} (unknown, or expired)")
    return job


def add_routes(app: FastAPI) -> None:
    @app.exception_handler(SubmissionError)
    async def bad_submission(request: Request, exc: SubmissionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "field": exc.field}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict:
        return _service(request).health()

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request) -> dict:
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=50)
        except BodyTooLarge:
            raise
        except Exception as exc:  # malformed multipart, too many parts
            raise HTTPException(400, f"the body is not a valid multipart form ({exc}); send image=@file ...") from exc
        try:
            fields = []
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    fields.append((name, (value.filename or "upload", await value.read())))
                else:
                    fields.append((name, value))
        finally:
            await form.close()
        submission = await run_in_threadpool(parse_submission, fields)
        store = _service(request).store
        try:
            job = await run_in_threadpool(store.submit, submission.options, submission.start_images,
                                          submission.end_images)  # fmt: skip
        except QueueFull as exc:
            raise HTTPException(429, str(exc), headers={"Retry-After": "10"}) from exc
        _service(request).wake()
        return job.to_json()

    @app.get("/v1/jobs")
    async def list_jobs(request: Request, limit: int = 100) -> dict:
        service = _service(request)
        return {"jobs": [job.to_json() for job in service.store.list(max(1, min(limit, 1000)))],
                "counts": service.store.counts()}  # fmt: skip

    @app.get("/v1/jobs/{job_id}")
    async def get_job(request: Request, job_id: str) -> dict:
        return _job_or_404(request, job_id).to_json()

    @app.delete("/v1/jobs/{job_id}")
    async def cancel_job(request: Request, job_id: str) -> dict:
        job = _job_or_404(request, job_id)
        if job.state in FINISHED:
            raise HTTPException(409, f"job {job_id} has already finished ({job.state}); nothing to cancel")
        return _service(request).cancel(job_id).to_json()

    @app.get("/v1/jobs/{job_id}/video")
    async def get_video(request: Request, job_id: str) -> FileResponse:
        job = _job_or_404(request, job_id)
        if job.state != "done":
            raise HTTPException(409, f"job {job_id} is {job.state}; the video exists once it is done")
        path = _service(request).store.result_path(job.id)
        if not path.is_file():
            raise HTTPException(410, f"the video of job {job_id} is gone (expired or deleted)")
        return FileResponse(path, media_type="video/mp4", filename=f"ruyi-{job.id}.mp4")

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(request: Request, job_id: str) -> StreamingResponse:
        _job_or_404(request, job_id)
        return StreamingResponse(_events(request, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})  # fmt: skip

    for route, (name, media_type) in PAGE_FILES.items():
        app.add_api_route(route, _page_file(WEB_DIR / name, media_type), methods=["GET"], include_in_schema=False)


def _page_file(path: Path, media_type: str):
    async def page() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})

    return page


async def _events(request: Request, job_id: str):
    """One `job` event per change of the job (every progress report, none skipped), a comment line as keep-alive;
    ends once the job has finished."""
    loop = asyncio.get_running_loop()
    changes: asyncio.Queue = asyncio.Queue()
    store = _service(request).store
    stop_watching = store.watch(job_id, lambda job: loop.call_soon_threadsafe(changes.put_nowait, job))
    last = None
    try:
        while not await request.is_disconnected():
            try:
                job = await asyncio.wait_for(changes.get(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if job is None:
                yield "event: gone\ndata: {}\n\n"
                return
            data = job.to_json()
            data.pop("seconds")
            if data != last:
                last = data
                yield f"event: job\ndata: {json.dumps(job.to_json())}\n\n"
                if job.state in FINISHED:
                    return
    finally:
        stop_watching()
