"""How to run a checkpoint: `RuntimeOptions`, the memory plan for a video, and loading the four components.

`load_components(checkpoint, options, plan)` builds the backends `runtime.pipeline.RuyiPipeline` calls: PyTorch
modules (with LoRA, FP8 storage and the block runner that executes the memory plan), ONNX Runtime sessions over
the exported graphs, or TensorRT engines from `ruyi-trt build`. `memory_plan` makes the plan from configs alone,
so it also works without the weights (`ruyi-trt run --plan-only`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..models.checkpoint import Checkpoint
from ..models.image_encoder import CLIPImageEncoder
from ..models.transformer import RuyiTransformer3D
from ..models.vae import RuyiVAE
from ..models.vae_tiling import SpatialTiling
from ..weights.fp8_storage import FP8_DTYPES, FP8_MODES, resolve_fp8_storage, store_weights_fp8
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
from .request import MAX_STEPS, check_number

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "ort", "trt", "ort-int8", "ort-fp8", "torch-compile", "aoti")
# ort: runtime/backends/ort_backend.py over exported ONNX graphs; trt: runtime/backends/trt_backend.py;
# ort-int8/ort-fp8: ort with the transformer's calibrated Q/DQ graph (needs `calibration`, see runtime/calibration.py);
# torch-compile: torch with every block torch.compile'd (runtime/backends/compiled.py); aoti: torch with the
# transformer as AOTInductor packages made by `ruyi-trt build --engine aoti` (runtime/backends/aoti_backend.py)
ORT_BACKENDS = ("ort", "ort-int8", "ort-fp8")
QUANTIZED_ORT = {"ort-int8": "int8", "ort-fp8": "fp8"}
MEMORY_MODES = PLAN_MODES
DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d{1,3})?")
MAX_OFFLOAD_STEPS = 1000
MIN_VRAM_BUDGET_GB, MAX_VRAM_BUDGET_GB = 0.5, 4096.0
MAX_LORA_STRENGTH = 100.0


LoraSpec = tuple[str, float]  # (path of a kohya-style .safetensors file, strength)


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run: backend, device, dtype and the reference's memory/speed options.

    memory_mode: full_gpu keeps every model on the device; normal moves each model to the device only
    while it runs (the reference's normal_mode); low_gpu also streams every transformer block (the
    reference's sequential offload, block-granular); auto follows a `MemoryPlan` made for the video size
    and the device budget (`runtime.memory_plan`). offload_steps is the reference's GPU_offload_steps
    (long-skip activations moved to the host in groups of k; None: 0, or the planner's choice in auto).
    vram_budget_gb caps what the plan may use (GiB; default: the GPU's free memory).
    teacache_*: TeaCache (threshold None: off) with the reference's skip_start_steps, skip_end_steps (each >= 1)
    and offload_cpu (its cached tensors kept in host memory). enhance_a_video is Enhance-A-Video's weight (None:
    off; torch backend only) with the reference's skip_start_steps/skip_end_steps (`EnhanceAVideoSettings`).
    loras: LoRAs merged in order, each with its own strength (the reference's LoRA list).
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
    teacache_skip_start: int = 3
    teacache_skip_end: int = 1
    teacache_offload_cpu: bool = True
    loras: tuple[LoraSpec, ...] = ()
    vram_budget_gb: float | None = None
    enhance_a_video: float | None = None
    enhance_a_video_skip_start: int = 0
    enhance_a_video_skip_end: int = 0
    calibration: str | None = None  # ort-int8 / ort-fp8: the calibration folder (ruyi-trt calibrate --out)
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
        fp8_storage: str = "auto",
        teacache: float | None = None,
        teacache_skip_start: int | None = None,
        teacache_skip_end: int | None = None,
        teacache_offload_cpu: bool | None = None,
        enhance_a_video: float | None = None,
        enhance_a_video_skip_start: int | None = None,
        enhance_a_video_skip_end: int | None = None,
        lora: str | Path | Sequence[str | Path | tuple[str | Path, float]] | None = None,
        lora_strength: float = 1.0,
        calibration: str | Path | None = None,
        parallel: ParallelConfig | str | None = None,
        compute: str = "none",
        scales: str | Path | None = None,
        attention: str = "sdpa",
        fused_kernels: bool = False,
    ) -> RuntimeOptions:
        """Validated options from `RuyiPipeline.from_pretrained`'s keywords: device defaults to cuda when a GPU is
        visible (else cpu), dtype to `default_dtype(device, backend)`, fp8_storage "auto" to fp8_e4m3fn;
        `parallel` is a ParallelConfig or its `ulysses=N[,ring=M][,cfg=2]` string.

        `lora` is one LoRA file or a list of files and (file, strength) pairs, merged in that order; files given
        without a strength get `lora_strength`. The TeaCache / Enhance-A-Video step options (None: the
        reference's defaults) need their feature turned on."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tea = {"teacache_skip_start": teacache_skip_start, "teacache_skip_end": teacache_skip_end,
               "teacache_offload_cpu": teacache_offload_cpu}  # fmt: skip
        eav = {"enhance_a_video_skip_start": enhance_a_video_skip_start,
               "enhance_a_video_skip_end": enhance_a_video_skip_end}  # fmt: skip
        for feature, on, settings in (("teacache", teacache, tea), ("enhance_a_video", enhance_a_video, eav)):
            given = sorted(name for name, value in settings.items() if value is not None)
            if given and on is None:
                raise ValueError(f"{given[0]}: applies only with {feature} turned on; give {feature} too.")
        options = cls(
            backend=backend, device=device, dtype=dtype or default_dtype(device, backend), memory_mode=memory_mode,
            offload_steps=offload_steps, fp8=fp8, fp8_storage=resolve_fp8_storage(fp8_storage),
            teacache_threshold=teacache, loras=lora_list(lora, lora_strength), vram_budget_gb=vram_budget,
            enhance_a_video=enhance_a_video, calibration=str(calibration) if calibration is not None else None,
            parallel=ParallelConfig.parse(parallel) if isinstance(parallel, str) else parallel,
            compute=compute, scales=str(scales) if scales is not None else None, attention=attention,
            fused_kernels=fused_kernels,
            **{name: value for name, value in {**tea, **eav}.items() if value is not None},
        )  # fmt: skip
        options.validate()
        for path, _ in options.loras:
            check_lora_file(path)  # before minutes of loading
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
        for name in ("teacache_skip_start", "teacache_skip_end"):
            check_number(name, getattr(self, name), 1, MAX_STEPS, integer=True)  # the first/last step always computed
        for name in ("enhance_a_video_skip_start", "enhance_a_video_skip_end"):
            check_number(name, getattr(self, name), 0, MAX_STEPS, integer=True)
        if self.enhance_a_video is not None and self.backend not in ("torch", "torch-compile"):
            raise ValueError(f"backend {self.backend}: ['enhance_a_video'] only applies to the torch backend; drop it or "
                             "use --backend torch.")
        if self.parallel is not None and self.backend != "torch":
            raise ValueError(f"backend {self.backend}: --parallel runs the torch backend only; use --backend torch.")
        if self.parallel is not None and self.enhance_a_video is not None:
            raise ValueError("--enhance-a-video scores attention over every frame and the whole batch, which no rank "
                             "holds under --parallel; drop one of them.")
        if self.vram_budget_gb is not None:
            check_number("vram_budget_gb", self.vram_budget_gb, MIN_VRAM_BUDGET_GB, MAX_VRAM_BUDGET_GB)
        for _, strength in self.loras:
            check_number("lora_strength", strength, -MAX_LORA_STRENGTH, MAX_LORA_STRENGTH)
        if self.backend in ORT_BACKENDS and self.dtype == "bf16":
            raise ValueError(f"dtype: bf16 is not supported by backend {self.backend} (ONNX Runtime's Python API has no "
                             "bfloat16 arrays); use fp16 or fp32.")
        if self.backend in ORT_BACKENDS:
            torch_only = {"fp8": self.fp8 not in ("none", "auto"), "lora": bool(self.loras), "offload_steps": bool(self.offload_steps),
                          "teacache": self.teacache_threshold is not None,
                          "memory_mode": self.memory_mode not in ("auto", "full_gpu")}  # ORT places its own memory
            used = [name for name, on in torch_only.items() if on]
            if used:
                raise ValueError(f"backend {self.backend}: {used} only apply to the torch backend; drop them or use --backend torch.")
        if self.backend == "aoti":
            torch_only = {"fp8": self.fp8 not in ("none", "auto"), "offload_steps": bool(self.offload_steps),
                          "teacache": self.teacache_threshold is not None, "enhance_a_video": self.enhance_a_video is not None,
                          "memory_mode": self.memory_mode not in ("auto", "full_gpu")}  # fmt: skip
            used = [name for name, on in torch_only.items() if on]
            if used:
                raise ValueError(f"backend aoti: {used} only apply to the torch backend (the AOTInductor blocks hold "
                                 "the whole model on the device); drop them or use --backend torch.")
        if self.calibration is not None:
            if self.backend not in QUANTIZED_ORT:
                raise ValueError(f"calibration: applies to backend ort-int8 / ort-fp8 only (not {self.backend}); drop it "
                                 "or use one of those.")
            from ..calib.store import RECORD_NAME

            if not (Path(self.calibration) / RECORD_NAME).is_file():
                raise ValueError(f"calibration: {self.calibration} holds no {RECORD_NAME}; make one with ruyi-trt "
                                 f"calibrate --precision {QUANTIZED_ORT[self.backend]} --out DIR, or drop it to use "
                                 "the cached calibration.")
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

    @property
    def teacache(self) -> TeaCacheSettings | None:
        """The TeaCache settings to run with (None: off)."""
        if self.teacache_threshold is None:
            return None
        return TeaCacheSettings(self.teacache_threshold, self.teacache_skip_start, self.teacache_skip_end,
                                self.teacache_offload_cpu)  # fmt: skip

    @property
    def enhance_a_video_settings(self) -> EnhanceAVideoSettings | None:
        """The Enhance-A-Video settings to run with (None: off)."""
        if self.enhance_a_video is None:
            return None
        return EnhanceAVideoSettings(self.enhance_a_video, self.enhance_a_video_skip_start,
                                     self.enhance_a_video_skip_end)  # fmt: skip


def lora_list(
    lora: str | Path | Sequence[str | Path | tuple[str | Path, float]] | None, strength: float = 1.0
) -> tuple[LoraSpec, ...]:
    """((path, strength), ...) from one path, or a list of paths and (path, strength) pairs."""
    if lora is None:
        return ()
    entries = [lora] if isinstance(lora, (str, Path)) else list(lora)
    loras = []
    for entry in entries:
        if not isinstance(entry, (str, Path)) and not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"lora: {entry!r} is neither a file nor a (file, strength) pair.")
        path, value = (entry, strength) if isinstance(entry, (str, Path)) else entry
        loras.append((str(path), value))  # the strength is checked by `RuntimeOptions.validate`
    return tuple(loras)


def transformer_precision(options: RuntimeOptions, fp8: str) -> str:
    """What the torch transformer computes in, for the run summary: the run dtype, then the FP8 weight storage
    (`fp8`: the plan's mode), 8-bit GEMMs and the attention kernel when they are on."""
    parts = [options.dtype]
    if fp8 != "none" and options.compute == "none":
        parts.append(f"fp8 {fp8} weights ({options.fp8_storage})")
    if options.compute != "none":
        parts.append(f"{options.compute} GEMMs ({'calibrated' if options.scales else 'dynamic'} scales)")
    if options.attention != "sdpa":
        parts.append(f"{options.attention} attention")
    return ", ".join(parts)


def default_dtype(device: str, backend: str) -> str:
    """bf16 on a GPU (fp16 with ONNX Runtime, which has no bf16 arrays), fp32 on the CPU."""
    if not device.startswith("cuda"):
        return "fp32"
    return "fp16" if backend in ORT_BACKENDS else "bf16"


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
    return options.memory_mode == "auto" and options.backend not in (*ORT_BACKENDS, "aoti") and planned


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
        # TeaCache's cached tensors take device memory unless they are kept on the host (offload_cpu)
        teacache=options.teacache_threshold is not None and not options.teacache_offload_cpu, steps=steps,
        memory_mode=options.memory_mode, offload_steps=options.offload_steps, budget_bytes=budget,
        sequence_parallel=options.parallel.sequence if options.parallel else 1,
        cfg_parallel=bool(options.parallel and options.parallel.cfg > 1),
    )  # fmt: skip
    return plan_memory(checkpoint.transformer, checkpoint.vae, ClipSpec.from_config(checkpoint.image_encoder), request)


def calibration_folder(checkpoint: Checkpoint, options: RuntimeOptions) -> Path:
    """ort-int8 / ort-fp8: `options.calibration`, else the cached calibration of the checkpoint (default settings);
    ValueError naming the calibrate command when there is none (`ruyi-trt run` and `bench` calibrate first)."""
    from ..calib.store import CalibrationSettings, cache_dir, read_record

    precision = QUANTIZED_ORT[options.backend]
    if options.calibration is not None:
        return Path(options.calibration)
    folder = cache_dir(checkpoint.weights_hash("transformer"), precision, CalibrationSettings())
    if read_record(folder) is None:
        raise ValueError(f"backend {options.backend}: no calibration of {checkpoint.name} is cached; make one with "
                         f"ruyi-trt calibrate --model {checkpoint.name} --precision {precision} --out DIR and pass "
                         "calibration=DIR (--calibration DIR), or use ruyi-trt run, which calibrates on first use.")
    return folder


def load_steps(options: RuntimeOptions) -> int:
    """How many steps `load_components` reports through `progress`: on the torch backends one per model
    (transformer, VAE, CLIP) and one for the weight edits and the block runner; one for ort and trt."""
    return 1 if options.backend in (*ORT_BACKENDS, "trt") else 4


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

    if options.backend in ORT_BACKENDS:
        from .backends.ort_backend import ort_components

        quantized = None
        if options.backend in QUANTIZED_ORT:
            quantized = (QUANTIZED_ORT[options.backend], calibration_folder(checkpoint, options))
        components = ort_components(checkpoint, options.device, options.dtype, quantized=quantized)  # ORT places its own memory
        step()
        return components
    if options.backend == "trt":
        from .backends.trt_backend import trt_components

        components = trt_components(checkpoint, options.dtype, plan, False, options.loras)
        step()
        return components
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    memory = replace(options, memory_mode="full_gpu") if options.backend == "aoti" else options  # see validate
    settings = run_settings(memory, checkpoint.transformer.num_layers, plan)
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
    components = assemble_torch_components(transformer, vae, image_encoder, options, settings, scales_hash, checkpoint)
    step()
    return components


def assemble_torch_components(
    transformer: RuyiTransformer3D,
    vae: RuyiVAE,
    image_encoder: CLIPImageEncoder,
    options: RuntimeOptions,
    settings: PlanSettings,
    scales_hash: str | None = None,
    checkpoint: Checkpoint | None = None,
) -> Components:
    """The torch backend over loaded modules: the LoRAs merged, the plan's FP8 storage and VAE tiling applied, 8-bit
    compute swapped in (`scales_hash`: the transformer weights' hash a scales file must match), and the block
    runner that executes the memory settings (per rank under --parallel), compiled (torch-compile) or replaced by
    the AOTInductor packages (aoti, which needs `checkpoint`)."""
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    for path, strength in options.loras:  # in order, each rounded into the weights' dtype, as the reference
        try:
            merged = merge_lora(transformer, load_lora(path), strength)
        except ValueError as exc:
            raise ValueError(f"lora: {path} does not fit this model: {exc}") from exc
        log.info("LoRA %s merged into %d layers (strength %s)", path, len(merged), strength)
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
        teacache=options.teacache,
        enhance_a_video=options.enhance_a_video_settings,
        **context,
    )
    if options.backend == "torch-compile":
        from .backends.compiled import CompiledBlocks

        denoiser = CompiledBlocks(denoiser)
    elif options.backend == "aoti":
        from .backends.aoti_backend import AotiDenoiser

        if checkpoint is None:
            raise ValueError("backend aoti: assemble_torch_components needs the checkpoint (the packages' cache keys).")
        denoiser = AotiDenoiser(transformer, checkpoint, device, dtype)
    components = torch_components(
        transformer, vae, image_encoder, device=device, dtype=dtype, offload_models=offload_models, denoiser=denoiser
    )
    components.precision["transformer"] = transformer_precision(options, settings.fp8)
    if options.parallel is not None:
        from .parallel import spread_vae

        components = spread_vae(components, vae, context["context"], torch.device("cpu") if offload_models else device)
    return components
