"""`BuildSettings`: what `ruyi-trt build` was asked for, validated in one place, and the command that asks it.

The same dataclass drives the CLI, the library call (`engine.build.build_engines`) and the refusal
messages of a run (`command()` prints the exact `ruyi-trt build ...` that makes the missing engines).

Two choices default to "auto" and are resolved per build (`resolved`):
- per_block: None builds per-block transformer engines (embed, plain block, skip block, unembed; block
  weights bound at run time) when the transformer's weights exceed WHOLE_ENGINE_MAX_BYTES, else one
  whole-model engine. At full size (14.4 GB in fp16) per-block is the default: a whole engine per size
  group would carry every weight (17 groups at --resolution 768), its build needs them all on the
  GPU, while two block engines serve all 40 blocks and every aspect bucket.
- attention: "auto" exports attention as ONNX `Attention` nodes when the targeted TensorRT parses them
  (>= 10.14), else decomposed (export/onnx_export.py).
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
ATTENTION_CHOICES = ("auto", "onnx", "decomposed")
ONNX_ATTENTION_MIN_TENSORRT = (10, 14)  # the first TensorRT whose ONNX parser maps Attention to IAttention
WHOLE_ENGINE_MAX_BYTES = 4 * 2**30  # transformer weights above this build per-block by default


@dataclass(frozen=True)
class BuildSettings:
    """One build request. `resolutions` holds normalized --resolution entries ('512', '384x672')."""

    model: str = "tiny"
    precision: str = "fp16"
    resolutions: tuple[str, ...] = ("512",)
    frames: FrameRange = FrameRange(24, 24, 24)  # noqa: RUF009 - frozen, so sharing the default is safe
    batch: int = 2
    per_block: bool | None = None  # None: per-block above WHOLE_ENGINE_MAX_BYTES of transformer weights
    weight_streaming: bool = False
    refit: bool = False
    timing_cache: Path | None = None
    workspace_gb: float | None = None
    out: Path | None = None  # engine folder root; default cache_root()/engines
    attention: str = "auto"
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
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"--attention: {self.attention!r} is not supported; use one of {ATTENTION_CHOICES}.")
        if self.batch not in BATCHES:
            raise ValueError(f"--batch: {self.batch} is not supported; use 1 (no CFG / cfg_split) or 2 (CFG).")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise ValueError(f"--workspace: {self.workspace_gb} must be a positive number of GiB.")
        if self.timing_cache is not None and Path(self.timing_cache).is_dir():
            raise ValueError(f"--timing-cache: {self.timing_cache} is a folder; pass a file path.")
        resolution_sizes(self.resolutions)
        parse_frames(str(self.frames))

    def resolved(self, transformer_weight_bytes: int, tensorrt_version: tuple[int, ...]) -> BuildSettings:
        """These settings with per_block and attention decided for a model of that weight size and a target
        TensorRT version (see the module docstring)."""
        per_block = self.per_block
        if per_block is None:  # a Q/DQ transformer is one whole graph
            per_block = self.precision not in QUANTIZED and transformer_weight_bytes > WHOLE_ENGINE_MAX_BYTES
        attention = self.attention
        if attention == "auto":
            attention = "onnx" if tensorrt_version >= ONNX_ATTENTION_MIN_TENSORRT else "decomposed"
        return replace(self, per_block=per_block, attention=attention)

    def export_settings(self) -> ExportSettings:
        """The ONNX export these engines are built from (the graph's dtypes carry the precision; fp8/int8 graphs are
        fp16 graphs with Q/DQ added, export/qdq.py); call it on `resolved` settings."""
        if self.per_block is None or self.attention == "auto":
            raise ValueError("export_settings needs resolved settings (BuildSettings.resolved).")
        return ExportSettings(dtype=self.graph_dtype, per_block=self.per_block, attention=self.attention)

    @property
    def graph_dtype(self) -> str:
        """The exported graphs' dtype: the precision, fp16 for fp8/int8 (their Q/DQ transformer is made from it)."""
        return "fp16" if self.precision in QUANTIZED else self.precision

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
        for flag, on in (("--per-block", self.per_block is True), ("--whole", self.per_block is False),
                         ("--weight-streaming", self.weight_streaming), ("--refit", self.refit)):  # fmt: skip
            if on:
                parts.append(flag)
        if self.attention != "auto":
            parts += ["--attention", self.attention]
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
            "attention": self.attention,
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
            attention=data.get("attention", "auto"),
            engine=data.get("engine", "tensorrt"),
            calibration=None if data.get("calibration") is None else Path(data["calibration"]),
        )  # fmt: skip

