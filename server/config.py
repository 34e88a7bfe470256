"""`ServerConfig`: everything `ruyi-trt serve` was told, checked once before anything starts."""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerConfig:
    """model: as `RuyiPipeline.from_pretrained` takes it; run_options: its keywords (backend, device, dtype, ...,
    parallel); data_dir: the queue database and results/. Limits: max_queue waiting jobs, max_upload_mb per request,
    result_ttl_s before a finished job and its video are deleted, max_attempts runs of a job that keeps being
    interrupted. token: the bearer token every request needs (None: none)."""

    model: str
    data_dir: Path
    run_options: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    workers_per_gpu: int = 1
    max_queue: int = 100
    max_upload_mb: float = 20.0
    result_ttl_s: float = 7 * 24 * 3600.0
    max_attempts: int = 2
    token: str | None = None
    ray: bool = False
    ray_address: str | None = None
    ray_workers: int | None = None

    def validate(self) -> None:
        for name in ("workers_per_gpu", "max_queue", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}: {getattr(self, name)} must be at least 1.")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max-upload-mb: {self.max_upload_mb} must be positive.")
        if self.result_ttl_s <= 0:
            raise ValueError(f"result-ttl-hours: must be positive, got {self.result_ttl_s / 3600:g}.")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port.")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ValueError(f"ray-workers: {self.ray_workers} must be at least 1.")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("token-file: the token is shorter than 16 characters; use e.g. `openssl rand -hex 32`.")
        if not is_local(self.host):
            if self.token is None:
                log.warning("serving on %s without --token-file: anyone who reaches it can submit jobs", self.host)
            log.warning("serving on %s: plain HTTP; put a TLS proxy in front of it beyond a trusted network", self.host)

    @property
    def parallel_world(self) -> int:
        """Processes per worker: the --parallel layout's world size (1 without it)."""
        from ..runtime.loading import RuntimeOptions

        parallel = RuntimeOptions.make(**self.run_options).parallel
        return 1 if parallel is None else parallel.world_size


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str | Path) -> str:
    """The bearer token: the first line of `path`, stripped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"token-file: {path} does not exist; write a token into it (e.g. `openssl rand -hex 32`).")
    token = path.read_text().strip().splitlines()[0].strip() if path.read_text().strip() else ""
    if not token:
        raise ValueError(f"token-file: {path} is empty.")
    return token
