"""Benchmark results: the record of one measurement, and the JSON, markdown and PNG files written from them.

Every file is written atomically (files.atomic_write: a temp file in the same folder, fsync, then a rename), so
a benchmark killed by a timeout leaves the previous complete version of each file, never a truncated one.
"""

from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..deps import require
from ..files import atomic_write

log = logging.getLogger(__name__)

SCHEMA = "ruyi-trt-bench/1"
GIB = 2**30


@dataclass
class Measurement:
    """One (backend, stage, shape): status 'ok', 'error', 'unavailable' or 'skipped' (with the reason)."""

    backend: str
    stage: str
    height: int
    width: int
    frames: int
    status: str
    reason: str | None = None
    latent: tuple[int, int, int] | None = None  # latent frames, height, width
    tokens: int | None = None  # transformer tokens per sample
    times_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None  # all warm-up calls together (compilation and graph capture land here)
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    host_rss_bytes: int | None = None  # after the stage
    host_peak_rss_bytes: int | None = None  # the process's peak so far
    flops: dict[str, int] | None = None  # transformer FLOPs of one call (the run: all steps)
    peak_tflops: float | None = None  # the GPU's datasheet dense rate for the run dtype
    parallel: str | None = None  # the --parallel mode (e.g. "ulysses=2,cfg=2"); None: one process
    comm_bytes_per_step: int | None = None  # bytes one rank sends per denoising step (runtime.parallel.cost)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def tflops_per_s(self) -> float | None:
        if not self.flops or not self.median_s:
            return None
        return self.flops["total"] / self.median_s / 1e12

    @property
    def peak_fraction(self) -> float | None:
        rate = self.tflops_per_s
        return rate / self.peak_tflops if rate is not None and self.peak_tflops else None

    def to_dict(self) -> dict:
        times = self.times_s
        return {
            **asdict(self),
            "median_s": self.median_s,
            "min_s": min(times) if times else None,
            "max_s": max(times) if times else None,
            "tflops_per_s": self.tflops_per_s,
            "peak_fraction": self.peak_fraction,
        }


@dataclass
class BenchResults:
    """Everything one `bench` invocation produced."""

    config: dict
    environment: dict
    backends: list[dict]  # name, kind, available, reason
    peak: dict | None  # the GPU's datasheet rate used for % of peak, with its source
    measurements: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "config": self.config,
            "environment": self.environment,
            "backends": self.backends,
            "peak": self.peak,
            "notes": self.notes,
            "measurements": [m.to_dict() for m in self.measurements],
        }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _mib(value: int | None) -> str:
    if value is None:
        return "-"
    mib = value / 2**20
    return f"{mib:,.1f}" if mib >= 1 else f"{mib:.2g}"


def markdown(results: BenchResults) -> str:
    """A summary table per measurement, then the unavailable backends, notes and the environment."""
    env, cfg = results.environment, results.config
    gpu = env.get("gpu") or {}
    cap = f" (fewer once timed calls reach {cfg['max_stage_seconds']} s)" if cfg.get("max_stage_seconds") else ""
    lines = [
        f"# ruyi-trt bench: {cfg['model']} ({cfg['dtype']}, {cfg['device']})",
        "",
        (
            f"warm-up {cfg['warmup']}, repeat {cfg['repeat']}{cap}, whole run with {cfg['steps']} steps; times are "
            "seconds per call (median, min, max); denoise = one transformer forward on the CFG batch (2)."
        ),
        "",
        "x torch: the `torch` row's median over this row's (same stage and shape, same run), > 1 is faster.",
        "",
        (
            "| backend | stage | shape | median s | min s | max s | x torch | TFLOP/s | % peak | peak alloc GiB "
            "| peak reserved GiB | host RSS GiB | comm MiB/step | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    torch_median = {
        (m.stage, m.height, m.width, m.frames): m.median_s
        for m in results.measurements if m.backend == "torch" and not m.parallel
    }  # fmt: skip
    for m in results.measurements:
        d = m.to_dict()
        status = m.status if m.status == "ok" else f"{m.status}: {m.reason}"
        fraction = _fmt(m.peak_fraction * 100, ".1f") if m.peak_fraction is not None else "-"
        backend = f"{m.backend} --parallel {m.parallel}" if m.parallel else m.backend
        comm = _mib(m.comm_bytes_per_step)
        base = torch_median.get((m.stage, m.height, m.width, m.frames))
        speed = base / m.median_s if base and m.median_s else None
        lines.append(
            f"| {backend} | {m.stage} | {m.height}x{m.width}x{m.frames}f | {_fmt(d['median_s'], '.4f')} "
            f"| {_fmt(d['min_s'], '.4f')} | {_fmt(d['max_s'], '.4f')} | {_fmt(speed, '.2f')} "
            f"| {_fmt(m.tflops_per_s, '.3g')} | {fraction} "
            f"| {_gib(m.peak_allocated_bytes)} | {_gib(m.peak_reserved_bytes)} | {_gib(m.host_rss_bytes)} | {comm} "
            f"| {status} |"
        )
    unavailable = [b for b in results.backends if not b["available"]]
    if unavailable:
        lines += ["", "## Unavailable backends", ""]
        lines += [f"- **{b['name']}**: {b['reason']}" for b in unavailable]
    if results.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in results.notes]
    peak = results.peak
    peak_text = f"{peak['tflops']} TFLOP/s dense {peak['dtype']}, {peak['gpu']} ({peak['source']})" if peak else "none"
    lines += [
        "",
        "## Environment",
        "",
        (
            f"- GPU: {gpu.get('name', 'none')}, driver {gpu.get('driver', '-')}, torch {env['torch']}, "
            f"CUDA {env['cuda']}, cuDNN {env['cudnn']}"
        ),
        f"- peak used for %: {peak_text}",
        f"- ruyi-trt {env['ruyi_trt']}, commit {env['git_commit']}, Python {env['python']}, {env['platform']}",
    ]
    return "\n".join(lines) + "\n"


def plot_png(results: BenchResults) -> bytes:
    """Denoising step time (median) against frames, one line per backend and resolution, as PNG bytes."""
    import io

    require("matplotlib", "the bench plot").use("Agg")
    from matplotlib import pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for m in results.measurements:
        if m.stage == "denoise" and m.median_s is not None:
            label = f"{m.backend} --parallel {m.parallel}" if m.parallel else m.backend
            series.setdefault(f"{label} @ {m.height}x{m.width}", []).append((m.frames, m.median_s))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, points in sorted(series.items()):
        frames, seconds = zip(*sorted(points))
        ax.plot(frames, seconds, marker="o", label=label)
    if series:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no denoise measurement succeeded", ha="center", va="center", transform=ax.transAxes)
    cfg = results.config
    ax.set_xlabel("video frames")
    ax.set_ylabel("seconds per denoising step (CFG batch)")
    ax.set_title(f"ruyi-trt denoising step: {cfg['model']}, {cfg['dtype']}, {cfg['device']}")
    ax.grid(True, which="both", alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def write_report(results: BenchResults, out: Path, plot: bool = True) -> dict[str, Path]:
    """Write bench.json, bench.md and (with `plot`) bench.png into `out`; returns their paths."""
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    text = json.dumps(results.to_dict(), indent=2, default=str) + "\n"
    atomic_write(paths["json"], lambda tmp: tmp.write_text(text))
    atomic_write(paths["markdown"], lambda tmp: tmp.write_text(markdown(results)))
    if plot:
        paths["png"] = out / "bench.png"
        png = plot_png(results)
        atomic_write(paths["png"], lambda tmp: tmp.write_bytes(png))
    return paths
