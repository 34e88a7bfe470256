"""`ruyi-trt bench`: time each pipeline stage per backend and shape, with peak memory, model FLOPs and the
achieved fraction of the GPU's datasheet peak; results go to bench.json, bench.md and bench.png.

For every backend (opened once) and every shape: each requested stage runs `warmup` untimed calls, then
`repeat` timed calls (CUDA-synchronized); peak device memory is reset per stage. Stages:
- image_encoder: one CLIP call on a random crop;
- vae_encode / vae_decode: one VAE call on a random video / latents of the shape (the pipeline makes two
  encode calls, for the mask and the masked video);
- denoise: one transformer forward on the CFG batch (2) with random inputs;
- run: the whole pipeline (encode, `steps` denoising steps, decode) on a synthetic start image;
- block (only when asked for): one full-width transformer block on `block_tokens` tokens, once per backend
  (tools/bench_models.py), so that every backend has a real-width row even on CPU.
A failing measurement (out of memory, an unsupported kernel) is recorded with its reason and the rest go on.
Results are rewritten after every measurement, so a benchmark cut short by a timeout still leaves them.

`--parallel ulysses=N[,ring=M][,cfg=2]` (under `torchrun --nproc-per-node K`): every rank runs the same calls
with its part of the work (runtime.parallel); rank 0 times them and writes the files, and its rows carry the
mode and the bytes one rank sends per denoising step (runtime.parallel.cost, from the shapes). Rank 0 also takes
every stop decision (time budget, max stage seconds) for all ranks, so they stay in step; a failing measurement
ends a parallel bench instead of being skipped, since the other ranks would wait for it.
"""

from __future__ import annotations

import gc
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..runtime.parallel import ParallelConfig, ParallelContext, join
from .bench_models import (
    ALL_STAGES,
    BLOCK_GRID_WIDTH,
    BLOCK_STAGE,
    DTYPES,
    FULL_RANDOM,
    STAGES,
    BackendStatus,
    Shape,
    backend_statuses,
    latent_shape,
    open_model,
    stage_call,
)
from .environment import collect_environment, peak_rate
from .report import BenchResults, Measurement, write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What to benchmark. `time_budget_s`: measurements that would start later than this are skipped;
    `max_stage_seconds`: fewer than `repeat` timed calls for slow stages (e.g. one 768x768x120f step)."""

    model: str = "tiny"
    backends: tuple[str, ...] = ("torch",)
    shapes: tuple[Shape, ...] = (Shape(512, 512, 24),)
    stages: tuple[str, ...] = STAGES
    steps: int = 2
    warmup: int = 1
    repeat: int = 3
    dtype: str = "fp32"
    device: str = "cpu"
    time_budget_s: float | None = None
    max_stage_seconds: float | None = None  # stop timing a stage once its timed calls add up to this (>= 1 call)
    parallel: ParallelConfig | None = None  # under torchrun: one process per rank
    block_tokens: int = 2048  # tokens of the `block` stage (a multiple of BLOCK_GRID_WIDTH)

    def validate(self) -> None:
        if not self.backends:
            raise ValueError("backends: name at least one backend, e.g. torch.")
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages: {unknown or 'none'} given; use some of {ALL_STAGES}.")
        if self.block_tokens < BLOCK_GRID_WIDTH or self.block_tokens % BLOCK_GRID_WIDTH:
            raise ValueError(f"block_tokens: {self.block_tokens} must be a positive multiple of {BLOCK_GRID_WIDTH}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {tuple(DTYPES)}.")
        for name, value, low in (("steps", self.steps, 1), ("warmup", self.warmup, 0), ("repeat", self.repeat, 1)):
            if value < low:
                raise ValueError(f"{name}: {value} must be >= {low}.")
        if not self.shapes:
            raise ValueError("shapes: give at least one resolution/size and frame count.")
        for shape in self.shapes:
            if min(shape.height, shape.width) <= 0 or shape.height % 16 or shape.width % 16:
                raise ValueError(f"size: {shape.height}x{shape.width} must be positive multiples of 16.")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA GPU is visible; use --device cpu.")
        if self.parallel is not None and any(b != "torch" for b in self.backends):
            raise ValueError(f"backends: --parallel runs the torch backend only, not {list(self.backends)}.")

    def to_dict(self) -> dict:
        return {**asdict(self), "shapes": [asdict(s) for s in self.shapes]}


def host_memory() -> tuple[int | None, int]:
    """(current RSS via psutil when installed, else None; the process's peak RSS via getrusage), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        import psutil
    except ImportError:
        return None, peak
    return psutil.Process().memory_info().rss, peak


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(
    row: Measurement, call, warmup: int, repeat: int, device: torch.device, max_seconds: float | None = None,
    agree=bool,
) -> None:
    """Warm up, then time up to `repeat` calls of `call` into `row` (stopping once they add up to `max_seconds`),
    with the peak memory of this stage alone. `agree` turns this process's stop wish into the job's decision."""
    _release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(warmup):
            call()
        _synchronize(device)
        row.warmup_s = time.perf_counter() - start
        for _ in range(repeat):
            _synchronize(device)
            start = time.perf_counter()
            call()
            _synchronize(device)
            row.times_s.append(time.perf_counter() - start)
            if agree(max_seconds is not None and sum(row.times_s) >= max_seconds):
                break
    if device.type == "cuda":
        row.peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
        row.peak_reserved_bytes = torch.cuda.max_memory_reserved(device)
    row.host_rss_bytes, row.host_peak_rss_bytes = host_memory()
    row.status = "ok"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400] if text else ''}"


def _check_frames(config: BenchConfig, chunk: int) -> None:
    for shape in config.shapes:
        if shape.frames != 1 and (shape.frames < chunk or shape.frames % chunk):
            raise ValueError(f"frames: {shape.frames} is not 1 or a multiple of {chunk} (the VAE's frame chunk).")


class _Bench:
    """The measurement loop over backends, shapes and stages, writing results as it goes."""

    def __init__(self, config: BenchConfig, out: Path):
        self.config, self.out = config, out
        self.context: ParallelContext | None = None
        if config.parallel is not None:
            self.context = join(config.parallel, config.device)
        self.device = self.context.device if self.context else torch.device(config.device)
        self.model = open_model(config.model, self.device, config.dtype, config.stages, self.context)
        _check_frames(config, self.model.vae_config.mini_batch_encoder)
        full_random = config.model == FULL_RANDOM
        self.statuses = backend_statuses(list(config.backends), full_random, self.device)
        environment = collect_environment(self.device)
        gpu_name = (environment["gpu"] or {}).get("name", "")
        peak = peak_rate(gpu_name, config.dtype) if gpu_name else None
        self.results = BenchResults(
            config={**config.to_dict(), "model_path": self.model.name},
            environment=environment,
            backends=[asdict(s) for s in self.statuses],
            peak=asdict(peak) if peak else None,
            notes=self._notes(full_random, gpu_name, peak),
        )
        self.started = time.perf_counter()
        self.plot_ok = True

    def _notes(self, full_random: bool, gpu_name: str, peak) -> list[str]:
        notes = ["FLOPs count the transformer only (architecture doc section 7); the run row counts all its steps."]
        if full_random:
            notes.append(
                f"{FULL_RANDOM}: the real architecture at full size with random weights, built on the device; "
                "timings equal the real model's, outputs are meaningless; the whole run is not timed."
            )
        if gpu_name and peak is None:
            notes.append(
                f"no datasheet peak for {gpu_name!r} in {self.config.dtype} (tools/gpu_peaks.json): no % of peak."
            )
        return notes

    def agree(self, stop: bool) -> bool:
        """Rank 0's decision for every rank (a parallel job must make the same calls everywhere)."""
        if self.context is None:
            return stop
        from ..runtime.parallel.comm import from_main

        return bool(from_main(torch.tensor([float(stop)], device=self.device)).item())

    def write(self, plot: bool) -> None:
        if self.context is not None and not self.context.is_main:
            return
        plot = plot and self.plot_ok
        try:
            write_report(self.results, self.out, plot=plot)
        except ImportError as exc:  # matplotlib missing: keep the JSON and markdown
            self.plot_ok = False
            self.results.notes.append(f"no PNG plot: {exc}")
            write_report(self.results, self.out, plot=False)

    def row(self, backend: str, stage: str, shape: Shape) -> Measurement:
        if stage == BLOCK_STAGE:  # a one-frame grid of block_tokens patches, BLOCK_GRID_WIDTH wide (16 px each)
            tokens = self.config.block_tokens
            rows, p = tokens // BLOCK_GRID_WIDTH, self.model.transformer_config.patch_size
            latent = (1, rows * p, BLOCK_GRID_WIDTH * p)
            factor = self.model.vae_config.spatial_factor
            return Measurement(backend, stage, latent[1] * factor, latent[2] * factor, 1, status="pending",
                               latent=latent, tokens=tokens)  # fmt: skip
        latent = latent_shape(self.model.vae_config, shape)
        p = self.model.transformer_config.patch_size
        tokens = latent[0] * (latent[1] // p) * (latent[2] // p)
        row = Measurement(
            backend, stage, shape.height, shape.width, shape.frames, status="pending", latent=latent, tokens=tokens,
        )  # fmt: skip
        if self.config.parallel is not None:
            from ..runtime.memory.model import DTYPE_BYTES
            from ..runtime.parallel.cost import step_communication

            row.parallel = self.config.parallel.label
            if stage in ("denoise", "run"):
                comm = step_communication(self.model.transformer_config, tokens, True, self.config.parallel,
                                          DTYPE_BYTES[self.config.dtype])  # fmt: skip
                row.comm_bytes_per_step = comm.total
        return row

    def over_budget(self) -> bool:
        budget = self.config.time_budget_s
        return self.agree(budget is not None and time.perf_counter() - self.started > budget)

    def bench_backend(self, status: BackendStatus) -> None:
        cfg = self.config
        try:
            session = self.model.open(status)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot load is recorded; the others still run
            log.warning("%s: could not open (%s)", status.name, exc)
            for index, shape in enumerate(cfg.shapes):
                for stage in cfg.stages:
                    if stage == BLOCK_STAGE and index:
                        continue
                    row = self.row(status.name, stage, shape)
                    row.status, row.reason = "error", f"could not load: {_reason(exc)}"
                    self.results.measurements.append(row)
            return
        try:
            for index, shape in enumerate(cfg.shapes):
                for stage in cfg.stages:
                    if stage == BLOCK_STAGE and index:  # the block's size does not depend on the shape
                        continue
                    self.results.measurements.append(self.bench_stage(session, status.name, stage, shape))
                    self.write(plot=False)
        finally:
            session.close()
            _release(self.device)

    def bench_stage(self, session, backend: str, stage: str, shape: Shape) -> Measurement:
        cfg, row = self.config, self.row(backend, stage, shape)
        unsupported = self.model.unsupported(stage)
        if unsupported:
            row.status, row.reason = "unavailable", unsupported
            return row
        if self.over_budget():
            row.status, row.reason = "skipped", f"time budget of {cfg.time_budget_s:.0f} s spent"
            return row
        log.info("%s %s %s: warm-up %d, repeat %d", backend, stage, shape.label, cfg.warmup, cfg.repeat)
        try:
            call, flops = stage_call(
                self.model, session, stage, shape, cfg.steps, cfg.warmup + cfg.repeat, cfg.block_tokens
            )
            row.flops = flops.to_dict() if flops else None
            row.peak_tflops = self.results.peak["tflops"] if self.results.peak else None
            measure(row, call, cfg.warmup, cfg.repeat, self.device, cfg.max_stage_seconds, self.agree)
        except LookupError as exc:
            row.status, row.reason = "unavailable", str(exc)
        except Exception as exc:  # OOM or an unsupported kernel: record it, free memory, go on (alone)
            if self.context is not None:
                raise
            log.warning("%s %s %s failed: %s", backend, stage, shape.label, exc)
            row.status, row.reason, row.times_s = "error", _reason(exc), []
            _release(self.device)
        return row

    def run(self) -> BenchResults:
        for status in self.statuses:
            if status.available:
                self.bench_backend(status)
            else:
                log.info("%s: unavailable (%s)", status.name, status.reason)
            self.write(plot=True)
        self.write(plot=True)
        return self.results


def run_bench(config: BenchConfig, out: str | Path) -> BenchResults:
    """Run the benchmark described by `config` and write bench.json, bench.md and bench.png into `out`."""
    config.validate()
    return _Bench(config, Path(out)).run()


def parse_shapes(resolutions: str | None, frames: str, sizes: str | None) -> tuple[Shape, ...]:
    """`--resolution 512,768` (square) or `--size 64x64,96x160`, crossed with `--frames 24,120`."""
    try:
        frame_counts = [int(f) for f in frames.split(",") if f.strip()]
        if sizes:
            pairs = [tuple(int(v) for v in s.lower().split("x")) for s in sizes.split(",") if s.strip()]
        else:
            pairs = [(int(r), int(r)) for r in (resolutions or "512").split(",") if r.strip()]
    except ValueError as exc:
        raise ValueError(
            f"sizes: cannot parse --resolution {resolutions!r} / --size {sizes!r} / --frames {frames!r} "
            "(comma lists of integers, sizes as HEIGHTxWIDTH)"
        ) from exc
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"size: {sizes!r} must be HEIGHTxWIDTH items, e.g. 64x64,96x160")
    return tuple(Shape(h, w, f) for (h, w) in pairs for f in frame_counts)
