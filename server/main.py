"""Starting the server: check the configuration, then run the app on uvicorn over local worker processes, or
hand it to Ray Serve (`--ray`, see `ray_serve`)."""

from __future__ import annotations

import importlib.util
import logging
import os

from .config import ServerConfig

log = logging.getLogger(__name__)

SERVE_MODULES = ("fastapi", "uvicorn", "multipart")


def resolve_model(model: str | None) -> str:
    """What workers load: the checkpoint folder (downloaded now when it is the default and missing), or the name
    of a folderless model (`full-random`). Raises CheckpointError with what to do when it is not usable."""
    from ..models.checkpoint import Checkpoint

    checkpoint = Checkpoint.resolve(model, download=True)
    return str(checkpoint.folder) if checkpoint.folder is not None else checkpoint.name


def check(config: ServerConfig) -> str:
    """Validate everything before anything starts; the model the workers load."""
    from ..runtime.loading import RuntimeOptions

    missing = [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]
    if config.ray and importlib.util.find_spec("ray") is None:
        missing.append("ray")
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed (needed by `ruyi-trt serve`). Install them with: "
                          "pip install 'ruyi-trt[serve]'")  # fmt: skip
    config.validate()
    RuntimeOptions.make(**config.run_options)  # ValueError naming the option
    return resolve_model(config.model)


def local_service(config: ServerConfig, model: str):
    """The service over worker processes on this machine: one per GPU (or GPU group), or on the CPU."""
    import torch

    from .dispatcher import Service
    from .executors import LocalWorkers, plan_groups
    from .jobs import JobStore

    groups = plan_groups(config.run_options.get("device"), config.parallel_world, config.workers_per_gpu,
                         torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))  # fmt: skip
    store = JobStore(config.data_dir, config.max_queue, config.max_attempts)
    options = {k: v for k, v in config.run_options.items() if v is not None}
    return Service(store, lambda on_change: LocalWorkers(model, options, groups, on_change), config.result_ttl_s)


def serve(config: ServerConfig) -> None:
    """Run `ruyi-trt serve` until interrupted (Ctrl-C / SIGTERM stop it cleanly; queued jobs stay queued)."""
    model = check(config)
    if config.ray:
        from .ray_serve import serve_on_ray

        serve_on_ray(config, model)
        return
    import uvicorn

    from .app import create_app

    app = create_app(local_service(config, model), config.token, config.max_upload_mb)
    log.info("serving %s on http://%s:%d (data in %s)", model, config.host, config.port, config.data_dir)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
