"""How to run a checkpoint: `RuntimeOptions`, the memory plan for a video, and loading the four components.

`load_components(checkpoint, options, plan)` builds the backends `runtime.pipeline.RuyiPipeline` calls: PyTorch
modules (with LoRA, FP8 storage and the block runner that executes the memory plan), ONNX Runtime sessions over
the exported graphs, or TensorRT engines from `ruyi-trt build`. `memory_plan` makes the plan from configs alone,
so it also works without the weights (`ruyi-trt run --plan-only`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.checkpoint import Checkpoint
from ..weights.fp8_storage import FP8_DTYPES, FP8_MODES, store_weights_fp8
from ..weights.lora import load_lora, merge_lora
from .backends.block_runner import BlockRunner, EnhanceAVideoSettings, TeaCacheSettings
from .backends.protocol import Components
from .backends.torch_backend import torch_components
from .memory.model import ClipSpec
from .memory.plan import (
    PLAN_MODES,
    MemoryPlan,
    PlanRequest,
    PlanSettings,
    device_budget_bytes,
    mode_settings,
    plan_memory,
)

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "ort", "trt")  # ort: runtime/backends/ort_backend.py over exported ONNX graphs; trt: trt_backend.py
MEMORY_MODES = PLAN_MODES


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: backend, device, dtype and the reference's memory/speed options.

    memory_mode: full_gpu keeps every model on the device; normal moves each model to the device only
    while it runs (the reference's normal_mode); low_gpu also streams every transformer block (the
    reference's sequential offload, block-granular); auto follows a `MemoryPlan` made for the video size
    and the device budget (`runtime.memory_plan`). offload_steps is the reference's GPU_offload_steps
    (long-skip activations moved to the host in groups of k; None: 0, or the planner's choice in auto).
    vram_budget_gb caps what the plan may use (GiB; default: the GPU's free memory).
    enhance_a_video is Enhance-A-Video's weight (None: off; torch backend only): every block's self-attention
    output is scaled by a temporal score (`runtime.block_runner.EnhanceAVideoSettings`).
    teacache_skip_steps / enhance_a_video_skip_steps: (first, last) denoiser calls that TeaCache always computes
    (the reference's defaults 3 and 1, each at least 1) / that Enhance-A-Video leaves alone (defaults 0 and 0).
    """

    backend: str = "torch"
    device: str = "cpu"
    dtype: str = "fp32"
    memory_mode: str = "full_gpu"
    offload_steps: int | None = None
    fp8: str = "none"
    fp8_storage: str = "fp8_e4m3fn"
    teacache_threshold: float | None = None
    lora: str | None = None
    lora_strength: float = 1.0
    vram_budget_gb: float | None = None
    enhance_a_video: float | None = None
    teacache_skip_steps: tuple[int, int] = (3, 1)
    enhance_a_video_skip_steps: tuple[int, int] = (0, 0)

    @classmethod
    def make(
        cls,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        memory_mode: str = "auto",
        vram_budget: float | None = None,
        offload_steps: int | None = None,
        fp8: str = "none",
        fp8_storage: str = "fp8_e4m3fn",
        teacache: float | None = None,
        enhance_a_video: float | None = None,
        lora: str | Path | None = None,
        lora_strength: float = 1.0,
        teacache_skip_steps: tuple[int, int] = (3, 1),
        enhance_a_video_skip_steps: tuple[int, int] = (0, 0),
    ) -> RuntimeOptions:
        """Validated options from `RuyiPipeline.from_pretrained`'s keywords: device defaults to cuda when a GPU is
        visible (else cpu), dtype to `default_dtype(device, backend)`."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = cls(
            backend=backend, device=device, dtype=dtype or default_dtype(device, backend), memory_mode=memory_mode,
            offload_steps=offload_steps, fp8=fp8, fp8_storage=fp8_storage, teacache_threshold=teacache,
            lora=str(lora) if lora is not None else None, lora_strength=lora_strength, vram_budget_gb=vram_budget,
            enhance_a_video=enhance_a_video, teacache_skip_steps=tuple(teacache_skip_steps),
            enhance_a_video_skip_steps=tuple(enhance_a_video_skip_steps),
        )  # fmt: skip
        options.validate()
        return options

    def validate(self) -> None:
        choices = {
            "backend": (self.backend, BACKENDS),
            "dtype": (self.dtype, tuple(DTYPES)),
            "memory_mode": (self.memory_mode, MEMORY_MODES),
            "fp8": (self.fp8, FP8_MODES),
            "fp8_storage": (self.fp8_storage, tuple(FP8_DTYPES)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not supported; use one of {allowed}.")
        if self.offload_steps is not None and self.offload_steps < 0:
            raise ValueError(f"offload_steps: {self.offload_steps} must be >= 0.")
        if self.teacache_threshold is not None and not 0.0 < self.teacache_threshold <= 1.0:
            raise ValueError(f"teacache_threshold: {self.teacache_threshold} must be within (0, 1].")
        if self.enhance_a_video is not None and not 0.0 <= self.enhance_a_video <= 100.0:
            raise ValueError(f"enhance_a_video: {self.enhance_a_video} must be within [0, 100] (the reference suggests < 10).")
        if self.enhance_a_video is not None and self.backend != "torch":
            raise ValueError(f"backend {self.backend}: ['enhance_a_video'] only applies to the torch backend; drop it or "
                             "use --backend torch.")
        for name, low in (("teacache_skip_steps", 1), ("enhance_a_video_skip_steps", 0)):
            skips = getattr(self, name)
            if len(skips) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < low for k in skips):
                raise ValueError(f"{name}: {skips!r} must be two whole numbers >= {low} (first, last).")
        if self.vram_budget_gb is not None and self.vram_budget_gb <= 0:
            raise ValueError(f"vram_budget_gb: {self.vram_budget_gb} must be positive (GiB).")
        if self.backend == "ort" and self.dtype == "bf16":
            raise ValueError("dtype: bf16 is not supported by backend ort (ONNX Runtime's Python API has no bfloat16 "
                             "arrays); use fp16 or fp32.")
        if self.backend == "ort":
            torch_only = {"fp8": self.fp8 != "none", "lora": self.lora is not None, "offload_steps": bool(self.offload_steps),
                          "teacache": self.teacache_threshold is not None,
                          "memory_mode": self.memory_mode not in ("auto", "full_gpu")}  # ORT places its own memory
            used = [name for name, on in torch_only.items() if on]
            if used:
                raise ValueError(f"backend ort: {used} only apply to the torch backend; drop them or use --backend torch.")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA GPU is visible; use --device cpu.")


def default_dtype(device: str, backend: str) -> str:
    """bf16 on a GPU (fp16 with ONNX Runtime, which has no bf16 arrays), fp32 on the CPU."""
    if not device.startswith("cuda"):
        return "fp32"
    return "fp16" if backend == "ort" else "bf16"


def run_settings(options: RuntimeOptions, num_blocks: int, plan: MemoryPlan | None = None) -> PlanSettings:
    """The memory settings to execute: the plan's, else the fixed settings of `options.memory_mode`.

    auto without a plan is only allowed on the CPU, where everything simply stays in host memory."""
    if plan is not None:
        if plan.num_blocks != num_blocks:
            raise ValueError(f"the memory plan is for {plan.num_blocks} blocks, the model has {num_blocks}.")
        return plan.settings
    if options.memory_mode == "auto":
        if torch.device(options.device).type != "cpu":
            raise ValueError("memory_mode auto needs a MemoryPlan for the video size (runtime.loading.memory_plan; "
                             "RuyiPipeline makes one).")
        return mode_settings("full_gpu", options.offload_steps, num_blocks)
    return mode_settings(options.memory_mode, options.offload_steps, num_blocks)


def plan_depends_on_video(options: RuntimeOptions) -> bool:
    """Whether the memory plan (and so what is loaded) depends on the video size: memory_mode auto on the torch or
    TensorRT backend with a CUDA device or a --vram-budget to plan for."""
    planned = options.vram_budget_gb is not None or torch.device(options.device).type == "cuda"
    return options.memory_mode == "auto" and options.backend != "ort" and planned


def memory_plan(
    checkpoint: Checkpoint,
    options: RuntimeOptions,
    height: int,
    width: int,
    frames: int,
    cfg: bool,
    steps: int,
    plan_only: bool = False,
) -> MemoryPlan | None:
    """The memory plan for a video of `frames` (already rounded) x `height` x `width`, from configs alone.

    None when there is nothing to plan for: memory_mode auto with neither a CUDA GPU nor --vram-budget (the run
    then stays in host memory); with `plan_only` that case raises instead."""
    budget = device_budget_bytes(options.device, options.vram_budget_gb)
    if budget is None and options.memory_mode == "auto":
        if plan_only:
            raise ValueError("no CUDA GPU is present to plan for: pass --vram-budget GB (e.g. 24) to plan for a card.")
        log.info("no CUDA GPU and no VRAM budget: running without a memory plan, in host memory")
        return None
    request = PlanRequest(
        height=height, width=width, frames=frames, cfg=cfg, dtype=options.dtype, fp8=options.fp8,
        teacache=options.teacache_threshold is not None, steps=steps, memory_mode=options.memory_mode,
        offload_steps=options.offload_steps, budget_bytes=budget,
    )  # fmt: skip
    return plan_memory(checkpoint.transformer, checkpoint.vae, ClipSpec.from_config(checkpoint.image_encoder), request)


def teacache_settings(options: RuntimeOptions) -> TeaCacheSettings | None:
    """The block runner's TeaCache settings for `options` (None: off)."""
    if not options.teacache_threshold:
        return None
    start, end = options.teacache_skip_steps
    return TeaCacheSettings(threshold=options.teacache_threshold, skip_start_steps=start, skip_end_steps=end)


def enhance_a_video_settings(options: RuntimeOptions) -> EnhanceAVideoSettings | None:
    """The block runner's Enhance-A-Video settings for `options` (None: off)."""
    if options.enhance_a_video is None:
        return None
    start, end = options.enhance_a_video_skip_steps
    return EnhanceAVideoSettings(weight=options.enhance_a_video, skip_start_steps=start, skip_end_steps=end)


def load_steps(options: RuntimeOptions) -> int:
    """How many steps `load_components` reports through `progress`: on the torch backend one per model
    (transformer, VAE, CLIP) and per weight edit (LoRA, FP8); one for ort and trt."""
    if options.backend != "torch":
        return 1
    return 3 + bool(options.lora) + (options.fp8 != "none")


def load_components(
    checkpoint: Checkpoint,
    options: RuntimeOptions,
    plan: MemoryPlan | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Components:
    """Load the checkpoint's four components for `options.backend`, following `plan` (torch and TensorRT).

    `progress(done, total)` is called after each of the `load_steps(options)` steps; it may raise to stop."""
    options.validate()
    total, done = load_steps(options), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    if options.backend == "ort":
        from .backends.ort_backend import ort_components

        components = ort_components(checkpoint, options.device, options.dtype)  # ONNX Runtime places its own memory
        step()
        return components
    if options.backend == "trt":
        from .backends.trt_backend import trt_components

        budget = plan.trt_weight_streaming_budget_bytes if plan is not None else None
        lora = (options.lora, options.lora_strength) if options.lora else None
        components = trt_components(checkpoint, options.dtype, budget, False, lora)
        step()
        return components
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    settings = run_settings(options, checkpoint.transformer.num_layers, plan)
    # Models are loaded to the host first whenever something stays there between uses.
    all_resident = not settings.offload_models and settings.resident_blocks == checkpoint.transformer.num_layers
    load_device = device if (device.type == "cuda" and all_resident) else torch.device("cpu")
    log.info("loading %s (%s) on %s", checkpoint.name, options.dtype, load_device)
    transformer = checkpoint.load_transformer(dtype, load_device)
    step()
    vae = checkpoint.load_vae(dtype, load_device)
    step()
    image_encoder = checkpoint.load_image_encoder(dtype, load_device)
    step()
    if options.lora:
        merged = merge_lora(transformer, load_lora(options.lora), options.lora_strength)
        log.info("LoRA %s merged into %d layers (strength %s)", options.lora, len(merged), options.lora_strength)
        step()
    if options.fp8 != "none":
        count = store_weights_fp8(transformer, options.fp8, transformer.config.hidden_size, options.fp8_storage)
        log.info("FP8 (%s, %s): %d transformer layers stored in fp8", options.fp8, options.fp8_storage, count)
        step()
    offload_models = settings.offload_models and device.type == "cuda"
    denoiser = BlockRunner(
        transformer,
        device=device,
        dtype=dtype,
        resident_blocks=settings.resident_blocks,
        skip_offload_group=settings.skip_offload_group,
        cfg_split=settings.cfg_split,
        offload_between_runs=offload_models,
        teacache=teacache_settings(options),
        enhance_a_video=enhance_a_video_settings(options),
    )
    return torch_components(
        transformer, vae, image_encoder, device=device, dtype=dtype, offload_models=offload_models, denoiser=denoiser
    )
