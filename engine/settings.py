"""`BuildSettings`: what `ruyi-trt build` was asked for, validated in one place, and the command that asks it.

The same dataclass drives the CLI, the library call (`engine.build.build_engines`) and the refusal
messages of a run (`command()` prints the exact `ruyi-trt build ...` that makes the missing engines).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from ..export.onnx_export import ExportSettings
from .profiles import FrameRange, parse_frames, parse_resolutions, resolution_sizes

PRECISIONS = ("fp16", "bf16", "fp8", "int8")  # TensorRT; fp8/int8: Q/DQ graphs from a calibration (calib/)
AOTI_PRECISIONS = ("fp32", "fp16", "bf16")  # --engine aoti: the run dtype
ENGINES = ("tensorrt", "aoti")
QUANTIZED = ("fp8", "int8")
BATCHES = (1, 2)


@dataclass(frozen=True)
class BuildSettings:
    """One build request. `resolutions` holds normalized --resolution entries ('512', '384x672')."""

    model: str = "tiny"
    precision: str = "fp16"
    resolutions: tuple[str, ...] = ("512",)
    frames: FrameRange = FrameRange(24, 24, 24)  # noqa: RUF009 - frozen, so sharing the default is safe
    batch: int = 2
    per_block: bool = False
    weight_streaming: bool = False
    refit: bool = False
    timing_cache: Path | None = None
    workspace_gb: float | None = None
    out: Path | None = None  # engine folder root; default cache_root()/engines
    engine: str = "tensorrt"  # or "aoti": AOTInductor packages of the transformer blocks (engine/aoti.py)
    calibration: Path | None = None  # fp8/int8: the calibration folder (ruyi-trt calibrate --out)

    @classmethod
    def from_strings(cls, model: str, precision: str, resolution: str, frames: str, **kwargs) -> BuildSettings:
        """Parse the CLI's strings (`--resolution 512,768`, `--frames 24:48:120`) and validate."""
        settings = cls(model=model, precision=precision, resolutions=parse_resolutions(resolution),
                       frames=parse_frames(frames), **kwargs)  # fmt: skip
        settings.validate()
        return settings

    def validate(self) -> None:
        """ValueError naming the option, the value and what is allowed."""
        if self.engine not in ENGINES:
            raise ValueError(f"--engine: {self.engine!r} is not supported; use one of {ENGINES}.")
        allowed = AOTI_PRECISIONS if self.engine == "aoti" else PRECISIONS
        if self.precision not in allowed:
            raise ValueError(f"--precision: {self.precision!r} is not supported with --engine {self.engine}; use one of {allowed}.")
        if self.engine == "aoti" and (self.weight_streaming or self.refit or self.per_block):
            raise ValueError("--engine aoti: --weight-streaming, --refit and --per-block are TensorRT options (AOTInductor "
                             "packages are always per block and load their weights at run time).")
        if self.precision in QUANTIZED and self.refit:
            raise ValueError(f"--precision {self.precision}: --refit cannot refit quantized weights; rebuild instead.")
        if self.precision in QUANTIZED and self.per_block:
            raise ValueError(f"--precision {self.precision}: the Q/DQ transformer is one whole graph (its weights are "
                             "quantized initializers); drop --per-block.")
        if self.calibration is not None and self.precision not in QUANTIZED:
            raise ValueError(f"--calibration applies to --precision fp8/int8 only (got {self.precision}).")
        if self.batch not in BATCHES:
            raise ValueError(f"--batch: {self.batch} is not supported; use 1 (no CFG / cfg_split) or 2 (CFG).")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"--workspace: {self.workspace_gb} must be a positive number of GiB.")
        if self.timing_cache is not None and Path(self.timing_cache).is_dir():
            raise ValueError(f"--timing-cache: {self.timing_cache} is a folder; pass a file path.")
        resolution_sizes(self.resolutions)
        parse_frames(str(self.frames))

    def export_settings(self) -> ExportSettings:
        """The ONNX export these engines are built from (the graph's dtypes carry the precision; fp8/int8 graphs are
        fp16 graphs with Q/DQ added, export/qdq.py)."""
        return ExportSettings(dtype="fp16" if self.precision in QUANTIZED else self.precision, per_block=self.per_block)

    def widened(self, height: int, width: int, frames: int, batch: int) -> BuildSettings:
        """These settings grown to also cover one request size (for 'rebuild with ...' messages)."""
        size = f"{height}x{width}"
        covered = size in self.resolutions or (height, width) in resolution_sizes(self.resolutions)
        resolutions = self.resolutions if covered else (*self.resolutions, size)
        low, high = min(self.frames.min, frames), max(self.frames.max, frames)
        return replace(self, resolutions=resolutions, frames=FrameRange(low, min(max(self.frames.opt, low), high), high),
                       batch=max(self.batch, batch))  # fmt: skip

    def command(self) -> str:
        """The exact `ruyi-trt build ...` command line for these settings."""
        parts = ["ruyi-trt", "build", "--model", self.model, "--precision", self.precision,
                 "--resolution", ",".join(self.resolutions), "--frames", str(self.frames), "--batch", str(self.batch)]  # fmt: skip
        for flag, on in (("--per-block", self.per_block), ("--weight-streaming", self.weight_streaming), ("--refit", self.refit)):
            if on:
                parts.append(flag)
        if self.timing_cache is not None:
            parts += ["--timing-cache", str(self.timing_cache)]
        if self.workspace_gb is not None:
            parts += ["--workspace", f"{self.workspace_gb:g}"]
        if self.out is not None:
            parts += ["--out", str(self.out)]
        if self.engine != "tensorrt":
            parts += ["--engine", self.engine]
        if self.calibration is not None:
            parts += ["--calibration", str(self.calibration)]
        return " ".join(shlex.quote(p) for p in parts)

    def to_json(self) -> dict:
        return {
            "model": self.model, "precision": self.precision, "resolutions": list(self.resolutions),
            "frames": str(self.frames), "batch": self.batch, "per_block": self.per_block,
            "weight_streaming": self.weight_streaming, "refit": self.refit,
            "timing_cache": None if self.timing_cache is None else str(self.timing_cache),
            "workspace_gb": self.workspace_gb, "out": None if self.out is None else str(self.out),
            "engine": self.engine, "calibration": None if self.calibration is None else str(self.calibration),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> BuildSettings:
        return cls(
            model=data["model"], precision=data["precision"], resolutions=tuple(data["resolutions"]),
            frames=parse_frames(data["frames"]), batch=data["batch"], per_block=data["per_block"],
            weight_streaming=data["weight_streaming"], refit=data["refit"],
            timing_cache=None if data["timing_cache"] is None else Path(data["timing_cache"]),
            workspace_gb=data["workspace_gb"], out=None if data["out"] is None else Path(data["out"]),
            engine=data.get("engine", "tensorrt"),
            calibration=None if data.get("calibration") is None else Path(data["calibration"]),
        )  # fmt: skip

