"""`load_pipeline`: a checkpoint folder + runtime options (+ a memory plan) -> a ready `RuyiPipeline`.

`load_random_pipeline` builds the same pipeline over the full Ruyi-Mini-7B architecture with random
weights (the `full-random` model: benchmarks and memory checks without the 17 GB download).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.checkpoint_io import read_config
from ..models.control_embeddings import ControlEmbeddings, load_control_embeddings
from ..models.image_encoder import PREPROCESSOR_NAME, CLIPImageEncoder, vision_geometry
from ..models.transformer import RuyiTransformer3D, TransformerConfig
from ..models.vae import RuyiVAE
from ..models.vae_config import VAEConfig
from ..weights.fp8_storage import FP8_DTYPES, FP8_MODES, store_weights_fp8
from ..weights.lora import load_lora, merge_lora
from .backends.block_runner import BlockRunner, EnhanceAVideoSettings, TeaCacheSettings
from .backends.protocol import Components
from .backends.torch_backend import torch_components
from .memory.plan import PLAN_MODES, MemoryPlan, PlanSettings, mode_settings
from .pipeline import RuyiPipeline

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("torch", "ort", "trt")  # ort: runtime/backends/ort_backend.py over exported ONNX graphs; trt: runtime/backends/trt_backend.py
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
    output is scaled by a temporal score on every step (the reference's defaults, no skipped steps;
    `runtime.block_runner.EnhanceAVideoSettings`).
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
            raise ValueError("memory_mode auto needs a MemoryPlan for the video size (runtime.memory_plan."
                             "plan_memory; generate_video makes one).")
        return mode_settings("full_gpu", options.offload_steps, num_blocks)
    return mode_settings(options.memory_mode, options.offload_steps, num_blocks)


def pipeline_from_files(folder: Path, components: Components) -> RuyiPipeline:
    """A `RuyiPipeline` over prepared components (ONNX Runtime, TensorRT); the configs, control embeddings and
    CLIP preprocessing come from the checkpoint's files, no PyTorch weights are loaded."""
    _, tokens, hidden = vision_geometry(folder / "image_encoder")
    return RuyiPipeline(
        components=components,
        transformer_config=TransformerConfig.from_dict(read_config(folder / "transformer")),
        vae_config=VAEConfig.from_dict(read_config(folder / "vae")),
        embeddings=load_control_embeddings(folder / "embeddings.safetensors"),
        scheduler_config=read_config(folder / "scheduler", "scheduler_config.json"),
        clip_processor_config=read_config(folder / "image_encoder", PREPROCESSOR_NAME),
        clip_tokens=(tokens, hidden),
    )


def load_pipeline(
    folder: str | Path, options: RuntimeOptions = RuntimeOptions(), plan: MemoryPlan | None = None
) -> RuyiPipeline:
    """Load every component of the checkpoint in `folder` and wrap it for `options.backend`."""
    options.validate()
    folder = Path(folder)
    if options.backend == "ort":
        from .backends.ort_backend import ort_components

        # a memory plan does not apply: ONNX Runtime places its own memory
        return pipeline_from_files(folder, ort_components(folder, options.device, options.dtype))
    if options.backend == "trt":
        from .backends.trt_backend import trt_components

        lora = (options.lora, options.lora_strength) if options.lora else None
        return pipeline_from_files(folder, trt_components(folder, str(folder), options.dtype, plan, False, lora))
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    config = TransformerConfig.from_dict(read_config(folder / "transformer"))
    settings = run_settings(options, config.num_layers, plan)
    # Models are loaded to the host first whenever something stays there between uses.
    all_resident = not settings.offload_models and settings.resident_blocks == config.num_layers
    load_device = device if (device.type == "cuda" and all_resident) else torch.device("cpu")

    transformer = RuyiTransformer3D.from_pretrained(folder / "transformer", dtype=dtype, device=load_device)
    vae = RuyiVAE.from_pretrained(folder / "vae", dtype=dtype, device=load_device)
    image_encoder = CLIPImageEncoder.from_pretrained(folder / "image_encoder", dtype=dtype, device=load_device)
    return _assemble(
        transformer, vae, image_encoder, load_control_embeddings(folder / "embeddings.safetensors"),
        read_config(folder / "scheduler", "scheduler_config.json"), options, settings,
    )  # fmt: skip


def load_random_pipeline(
    options: RuntimeOptions = RuntimeOptions(), plan: MemoryPlan | None = None, seed: int = 0
) -> RuyiPipeline:
    """The full Ruyi-Mini-7B architecture with random weights (the video is noise; for speed/memory checks)."""
    from ..models.control_embeddings import make_random_control_embeddings
    from ..models.image_encoder import build_random_image_encoder
    from ..models.presets import full_random_transformer, randomize_
    from ..models.scheduler import default_scheduler_config

    options.validate()
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    config = TransformerConfig.full()
    settings = run_settings(options, config.num_layers, plan)
    all_resident = not settings.offload_models and settings.resident_blocks == config.num_layers
    load_device = device if (device.type == "cuda" and all_resident) else torch.device("cpu")
    log.info("building the full architecture with random weights on %s", load_device)
    transformer = full_random_transformer(device=load_device, dtype=dtype, seed=seed)
    vae = randomize_(RuyiVAE(VAEConfig.full()).to(load_device, dtype), seed + 1).eval().requires_grad_(False)
    image_encoder = build_random_image_encoder(
        hidden_size=config.projection_dim, image_size=336, patch_size=14, num_layers=24, num_heads=16, seed=seed + 2
    ).to(load_device, dtype)
    embeddings = make_random_control_embeddings(
        config.text_len, config.cross_attention_dim, config.text_len_t5, config.cross_attention_dim_t5, seed + 3
    )
    return _assemble(
        transformer, vae, image_encoder, ControlEmbeddings(embeddings), default_scheduler_config(), options, settings
    )


def _assemble(
    transformer: RuyiTransformer3D,
    vae: RuyiVAE,
    image_encoder: CLIPImageEncoder,
    embeddings: ControlEmbeddings,
    scheduler_config: dict,
    options: RuntimeOptions,
    settings: PlanSettings,
) -> RuyiPipeline:
    device, dtype = torch.device(options.device), DTYPES[options.dtype]
    if options.lora:
        merged = merge_lora(transformer, load_lora(options.lora), options.lora_strength)
        log.info("LoRA %s merged into %d layers (strength %s)", options.lora, len(merged), options.lora_strength)
    if options.fp8 != "none":
        count = store_weights_fp8(transformer, options.fp8, transformer.config.hidden_size, options.fp8_storage)
        log.info("FP8 (%s, %s): %d transformer layers stored in fp8", options.fp8, options.fp8_storage, count)

    offload_models = settings.offload_models and device.type == "cuda"
    denoiser = BlockRunner(
        transformer,
        device=device,
        dtype=dtype,
        resident_blocks=settings.resident_blocks,
        skip_offload_group=settings.skip_offload_group,
        cfg_split=settings.cfg_split,
        offload_between_runs=offload_models,
        teacache=TeaCacheSettings(threshold=options.teacache_threshold) if options.teacache_threshold else None,
        enhance_a_video=(
            EnhanceAVideoSettings(weight=options.enhance_a_video) if options.enhance_a_video is not None else None
        ),
    )
    components = torch_components(
        transformer, vae, image_encoder, device=device, dtype=dtype, offload_models=offload_models, denoiser=denoiser
    )
    return RuyiPipeline(
        components=components,
        transformer_config=transformer.config,
        vae_config=vae.config,
        embeddings=embeddings,
        scheduler_config=scheduler_config,
        clip_processor_config=image_encoder.processor_config,
        clip_tokens=(image_encoder.num_tokens, image_encoder.hidden_size),
    )
