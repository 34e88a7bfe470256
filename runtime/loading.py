"""How to run a checkpoint: `RuntimeOptions`, the memory plan for a video, and loading the four components.

`load_components(checkpoint, options, plan)` builds the backends `runtime.pipeline.RuyiPipeline` calls: PyTorch
modules (with LoRA, FP8 storage and the block runner that executes the memory plan), ONNX Runtime sessions over
the exported graphs, or TensorRT engines from `ruyi-trt build`. `memory_plan` makes the plan from configs alone,
so it also works without the weights (`ruyi-trt run --plan-only`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.checkpoint import Checkpoint
from ..models.image_encoder import CLIPImageEncoder
from ..models.transformer import RuyiTransformer3D
from ..models.vae import RuyiVAE
from ..models.vae_tiling import SpatialTiling
from ..weights.fp8_storage import FP8_DTYPES, FP8_MODES, store_weights_fp8
from ..weights.lora import check_lora_file, load_lora, merge_lora
from .backends.block_runner import BlockRunner, EnhanceAVideoSettings, TeaCacheSettings
from .backends.fast_compute import FastCompute, apply_fast_compute
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
from .parallel.config import ParallelConfig
from .request import check_number

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "ort", "trt")  # ort: runtime/backends/ort_backend.py over exported ONNX graphs; trt: trt_backend.py
MEMORY_MODES = PLAN_MODES
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d{1,3})?")
MAX_OFFLOAD_STEPS = 1000
MIN_VRAM_BUDGET_GB, MAX_VRAM_BUDGET_GB = 0.5, 4096.0
MAX_LORA_STRENGTH = 100.0


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
    parallel spreads one video over the processes of a torchrun job (torch backend; `runtime.parallel`);
    each rank then runs on its own device (cuda:LOCAL_RANK, or the CPU).
    compute / attention / scales / fused_kernels: the torch backend's 8-bit GEMMs (fp8, int8), FP8 attention kernel
    (fp8, fp8-full) and fused Triton glue kernels (`runtime.backends.fast_compute.FastCompute`); `fp8` above is the
    reference's storage-only FP8 and cannot be combined with `compute`.
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
    parallel: ParallelConfig | None = None
    compute: str = "none"
    attention: str = "sdpa"
    scales: str | None = None
    fused_kernels: bool = False

    @property
    def fast_compute(self) -> FastCompute:
        return FastCompute(self.compute, self.attention, self.scales, self.fused_kernels)

    @classmethod
    def make(
        cls,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        memory_mode: str = "auto",
        vram_budget: float | None = None,
        offload_steps: int | None = None,
        fp8: str = "auto",
        fp8_storage: str = "fp8_e4m3fn",
        teacache: float | None = None,
        enhance_a_video: float | None = None,
        lora: str | Path | None = None,
        lora_strength: float = 1.0,
        teacache_skip_steps: tuple[int, int] = (3, 1),
        enhance_a_video_skip_steps: tuple[int, int] = (0, 0),
        parallel: ParallelConfig | str | None = None,
        compute: str = "none",
        scales: str | Path | None = None,
        attention: str = "sdpa",
        fused_kernels: bool = False,
    ) -> RuntimeOptions:
        """Validated options from `RuyiPipeline.from_pretrained`'s keywords: device defaults to cuda when a GPU is
        visible (else cpu), dtype to `default_dtype(device, backend)`; `parallel` is a ParallelConfig or its
        `ulysses=N[,ring=M][,cfg=2]` string."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = cls(
            backend=backend, device=device, dtype=dtype or default_dtype(device, backend), memory_mode=memory_mode,
            offload_steps=offload_steps, fp8=fp8, fp8_storage=fp8_storage, teacache_threshold=teacache,
            lora=str(lora) if lora is not None else None, lora_strength=lora_strength, vram_budget_gb=vram_budget,
            enhance_a_video=enhance_a_video, teacache_skip_steps=tuple(teacache_skip_steps),
            enhance_a_video_skip_steps=tuple(enhance_a_video_skip_steps),
            parallel=ParallelConfig.parse(parallel) if isinstance(parallel, str) else parallel,
            compute=compute, scales=str(scales) if scales is not None else None, attention=attention,
            fused_kernels=fused_kernels,
        )  # fmt: skip
        options.validate()
        if options.lora is not None:
            check_lora_file(options.lora)  # before minutes of loading
        return options

    def validate(self) -> None:
        choices = {
            "backend": (self.backend, BACKENDS),
            "dtype": (self.dtype, tuple(DTYPES)),
            "memory_mode": (self.memory_mode, MEMORY_MODES),
            "fp8": (self.fp8, (*FP8_MODES, "auto")),
            "fp8_storage": (self.fp8_storage, tuple(FP8_DTYPES)),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not supported; use one of {allowed}.")
        if self.offload_steps is not None:
            check_number("offload_steps", self.offload_steps, 0, MAX_OFFLOAD_STEPS, integer=True)
        if self.teacache_threshold is not None and not 0.0 < self.teacache_threshold <= 1.0:
            raise ValueError(f"teacache_threshold: {self.teacache_threshold} must be within (0, 1].")
        if self.enhance_a_video is not None:
            check_number("enhance_a_video", self.enhance_a_video, 0.0, 100.0)  # the reference suggests < 10
        if self.enhance_a_video is not None and self.backend != "torch":
            raise ValueError(f"backend {self.backend}: ['enhance_a_video'] only applies to the torch backend; drop it or "
                             "use --backend torch.")
        for name, low in (("teacache_skip_steps", 1), ("enhance_a_video_skip_steps", 0)):
            skips = getattr(self, name)
            if len(skips) != 2 or any(isinstance(k, bool) or not isinstance(k, int) or k < low for k in skips):
                raise ValueError(f"{name}: {skips!r} must be two whole numbers >= {low} (first, last).")
        if self.parallel is not None and self.backend != "torch":
            raise ValueError(f"backend {self.backend}: --parallel runs the torch backend only; use --backend torch.")
        if self.parallel is not None and self.enhance_a_video is not None:
            raise ValueError("--enhance-a-video scores attention over every frame and the whole batch, which no rank "
                             "holds under --parallel; drop one of them.")
        if self.vram_budget_gb is not None:
            check_number("vram_budget_gb", self.vram_budget_gb, MIN_VRAM_BUDGET_GB, MAX_VRAM_BUDGET_GB)
        check_number("lora_strength", self.lora_strength, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH)
        if self.backend == "ort" and self.dtype == "bf16":
            raise ValueError("dtype: bf16 is not supported by backend ort (ONNX Runtime's Python API has no bfloat16 "
                             "arrays); use fp16 or fp32.")
        if self.backend == "ort":
            torch_only = {"fp8": self.fp8 not in ("none", "auto"), "lora": self.lora is not None, "offload_steps": bool(self.offload_steps),
                          "teacache": self.teacache_threshold is not None,
                          "memory_mode": self.memory_mode not in ("auto", "full_gpu")}  # ORT places its own memory
            used = [name for name, on in torch_only.items() if on]
            if used:
                raise ValueError(f"backend ort: {used} only apply to the torch backend; drop them or use --backend torch.")
        if not isinstance(self.device, str) or not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"device: {self.device!r} is not a device; use cpu, cuda or cuda:N (N = 0..GPUs - 1).")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: cuda was requested but no CUDA GPU is visible; use --device cpu.")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device: {self.device} does not exist; use cuda:0..cuda:{torch.cuda.device_count() - 1}.")
        self._validate_fast_compute(device)

    def _validate_fast_compute(self, device: torch.device) -> None:
        fast = self.fast_compute
        fast.validate()
        if not fast.active:
            return
        if self.backend != "torch":
            raise ValueError(f"backend {self.backend}: compute/attention/fused kernels are torch backend options; use "
                             "--backend torch (engines take their precision from `ruyi-trt build --precision`).")
        if self.parallel is not None and self.parallel.sequence > 1 and self.attention != "sdpa":
            raise ValueError(f"attention {self.attention}: under --parallel {self.parallel.label} the sequence-parallel "
                             "attention runs over the gathered sequence with SDPA; use --attention sdpa.")
        if self.fp8 not in ("none", "auto") and self.compute != "none":
            raise ValueError(f"fp8 {self.fp8} (weight storage) and compute {self.compute} exclude each other: 8-bit "
                             "compute already keeps its weights in 8 bits; drop --fp8.")
        reason = fast.unavailable_reason(device)
        if reason:
            raise ValueError(reason)


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
        return mode_settings("full_gpu", options.offload_steps, num_blocks, options.fp8)
    return mode_settings(options.memory_mode, options.offload_steps, num_blocks, options.fp8)


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
    if options.parallel is not None:
        options.parallel.check_heads(checkpoint.transformer.num_attention_heads)
        options.parallel.check_guidance(cfg)
    budget = device_budget_bytes(options.device, options.vram_budget_gb)
    if budget is None and options.memory_mode == "auto":
        if plan_only:
            raise ValueError("no CUDA GPU is present to plan for: pass --vram-budget GB (e.g. 24) to plan for a card.")
        log.info("no CUDA GPU and no VRAM budget: running without a memory plan, in host memory")
        return None
    # 8-bit compute keeps the block linears in 1 byte, as fp8 "strong" storage does (except norm1's adaLN linear,
    # ~0.3 GB at full size in bf16, which it leaves in the run dtype)
    stored_fp8 = options.fp8 if options.compute == "none" else "strong"
    request = PlanRequest(
        height=height, width=width, frames=frames, cfg=cfg, dtype=options.dtype, fp8=stored_fp8,
        teacache=options.teacache_threshold is not None, steps=steps, memory_mode=options.memory_mode,
        offload_steps=options.offload_steps, budget_bytes=budget,
        sequence_parallel=options.parallel.sequence if options.parallel else 1,
        cfg_parallel=bool(options.parallel and options.parallel.cfg > 1),
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
    (transformer, VAE, CLIP) and one for the weight edits and the block runner; one for ort and trt."""
    return 4 if options.backend == "torch" else 1


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
    scales_hash = checkpoint.weights_hash("transformer") if options.scales and not checkpoint.is_random else None
    components = assemble_torch_components(transformer, vae, image_encoder, options, settings, scales_hash)
    step()
    return components


def assemble_torch_components(
    transformer: RuyiTransformer3D,
    vae: RuyiVAE,
    image_encoder: CLIPImageEncoder,
    options: RuntimeOptions,
    settings: PlanSettings,
    scales_hash: str | None = None,
) -> Components:
    """The torch backend over loaded modules: LoRA merged, the plan's FP8 storage and VAE tiling applied, 8-bit
    compute swapped in (`scales_hash`: the transformer weights' hash a scales file must match), and the block
    runner that executes the memory settings (per rank under --parallel)."""
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    if options.lora:
        lora_state = load_lora(options.lora)
        try:
            merged = merge_lora(transformer, lora_state, options.lora_strength)
        except ValueError as exc:
            raise ValueError(f"lora: {options.lora} does not fit this model: {exc}") from exc
        log.info("LoRA %s merged into %d layers (strength %s)", options.lora, len(merged), options.lora_strength)
    if settings.fp8 != "none" and options.compute == "none":  # the plan's choice (options.fp8, or what auto picked)
        count = store_weights_fp8(transformer, settings.fp8, transformer.config.hidden_size, options.fp8_storage)
        log.info("FP8 (%s, %s): %d transformer layers stored in fp8", settings.fp8, options.fp8_storage, count)
    if settings.vae_tile:
        vae.enable_tiling(SpatialTiling(settings.vae_tile, vae.config.tile_overlap_factor))
    if options.fast_compute.active:
        apply_fast_compute(transformer, options.fast_compute, device, scales_hash)

    offload_models = settings.offload_models and device.type == "cuda"
    runner, context = BlockRunner, {}
    if options.parallel is not None:
        from .parallel import ParallelBlockRunner, join

        runner, context = ParallelBlockRunner, {"context": join(options.parallel, options.device)}
    denoiser = runner(
        transformer,
        device=device,
        dtype=dtype,
        resident_blocks=settings.resident_blocks,
        skip_offload_group=settings.skip_offload_group,
        cfg_split=settings.cfg_split,
        offload_between_runs=offload_models,
        teacache=teacache_settings(options),
        enhance_a_video=enhance_a_video_settings(options),
        **context,
    )
    components = torch_components(
        transformer, vae, image_encoder, device=device, dtype=dtype, offload_models=offload_models, denoiser=denoiser
    )
    if options.parallel is not None:
        from .parallel import spread_vae

        components = spread_vae(components, vae, context["context"], torch.device("cpu") if offload_models else device)
    return components
