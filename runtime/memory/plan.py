"""The memory planner: predict a run's peak device memory from configs and pick how to fit a budget.

Knobs, all executable by the torch runtime (`runtime.block_runner`):
- offload_models: CLIP, the VAE and the transformer visit the device only while they run (reference
  normal_mode), so the VAE decode never shares the device with the transformer's weights;
- resident_blocks: the first R transformer blocks stay on the device, the others stream from pinned host
  memory through two device slots per block type (`runtime.streaming`);
- skip_offload_group: the reference's GPU_offload_steps k (long-skip activations go to the host in groups
  of k; 0 keeps all on the device);
- cfg_split: classifier-free guidance as two batch-1 passes instead of one batch of 2 (halves activations).
The VAE always decodes in temporal chunks of `mini_batch_decoder` latents; VAE spatial tiling is not
implemented, so it is never planned: when one chunk does not fit, the planner says to lower the resolution.

`--memory-mode` maps onto the knobs: full_gpu (everything resident), normal (models offloaded between uses),
low_gpu (normal + every block streamed), auto (the cheapest feasible combination under a simple transfer
cost model: PCIe bytes that cannot hide behind compute).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

from ...models.transformer import TransformerConfig
from ...models.vae_config import VAEConfig
from .model import (
    DTYPE_BYTES,
    CallShape,
    ClipSpec,
    GiB,
    block_transient_bytes,
    clip_activation_bytes,
    clip_weight_bytes,
    conditioning_bytes,
    gib,
    hidden_bytes,
    step_flops,
    transformer_weights,
    vae_decode_bytes,
    vae_encode_bytes,
    vae_weight_bytes,
)

log = logging.getLogger(__name__)

PLAN_MODES = ("auto", "full_gpu", "normal", "low_gpu")
SKIP_OFFLOAD_GROUPS = (0, 10, 7, 5, 1)  # the reference's GPU_offload_steps choices, most device memory first
HEADROOM_FRACTION = 0.05  # kept free for allocator fragmentation, cuBLAS/cuDNN workspaces
HEADROOM_MIN_BYTES = 512 * 2**20
PCIE_BYTES_PER_S = 20e9  # pinned host <-> device copies, PCIe 4.0 x16 in practice
DEVICE_FLOPS = 4e14  # effective bf16 throughput assumed when deciding whether streaming hides behind compute
CFG_SPLIT_OVERHEAD = 0.03  # fraction of compute lost to two half-size passes


class MemoryPlanError(ValueError):
    """No combination of the knobs fits the budget; the message says what to reduce."""


@dataclass(frozen=True)
class PlanSettings:
    """What the runtime executes."""

    offload_models: bool
    resident_blocks: int
    skip_offload_group: int
    cfg_split: bool


@dataclass(frozen=True)
class PlanRequest:
    """What is being planned for: the video (pixels, rounded frames), precision and the device budget."""

    height: int
    width: int
    frames: int
    cfg: bool = True
    dtype: str = "bf16"
    fp8: str = "none"
    teacache: bool = False
    steps: int = 25
    memory_mode: str = "auto"
    offload_steps: int | None = None  # None: the mode's default (auto: planner's choice, otherwise 0)
    budget_bytes: int | None = None

    def validate(self) -> None:
        if self.memory_mode not in PLAN_MODES:
            raise ValueError(f"memory_mode: {self.memory_mode!r} is not supported; use one of {PLAN_MODES}.")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {tuple(DTYPE_BYTES)}.")
        if self.height <= 0 or self.width <= 0 or self.frames <= 0:
            raise ValueError(f"video size {self.height}x{self.width}x{self.frames} must be positive.")
        if self.offload_steps is not None and self.offload_steps < 0:
            raise ValueError(f"offload_steps: {self.offload_steps} must be >= 0.")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"vram budget: {self.budget_bytes} bytes must be positive.")
        if self.memory_mode == "auto" and self.budget_bytes is None:
            raise ValueError("memory_mode auto needs a budget: pass --vram-budget GB (no CUDA GPU to measure).")


@dataclass(frozen=True)
class MemoryPlan:
    """A chosen setting with its predicted device memory (bytes) per stage and the denoise breakdown."""

    request: PlanRequest
    settings: PlanSettings
    num_blocks: int
    latent_shape: tuple[int, int, int]  # (T, h, w) latent frames and size
    tokens: int  # transformer tokens per sample
    stages: dict[str, int]
    denoise_breakdown: dict[str, int]
    slot_bytes: int  # device weight slots for streamed blocks
    skips_on_device: int  # most long-skip tensors on the device at once
    total_skips: int
    vae_chunk: tuple[int, int]  # (latents, frames) per VAE decode chunk
    trt_block_loop_bytes: int  # what the TensorRT per-block loop keeps outside its engines (tokens, every skip)
    est_transfer_s_per_step: float
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def peak_bytes(self) -> int:
        return max(self.stages.values())

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.stages.get)

    @property
    def usable_bytes(self) -> int | None:
        return usable_budget(self.request.budget_bytes)

    @property
    def fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.peak_bytes <= self.usable_bytes

    @property
    def streamed_blocks(self) -> int:
        return self.num_blocks - self.settings.resident_blocks

    @property
    def denoise_activation_bytes(self) -> int:
        return sum(v for k, v in self.denoise_breakdown.items() if not k.startswith("weights"))

    def describe(self) -> str:
        r, s = self.request, self.settings
        t, lh, lw = self.latent_shape
        budget = "no budget" if r.budget_bytes is None else (
            f"budget {gib(r.budget_bytes)} (usable {gib(self.usable_bytes)} after headroom)"
        )
        head = (
            f"Memory plan ({r.memory_mode}) for {r.height}x{r.width}, {r.frames} frames "
            f"(latents {t}x{lh}x{lw}, {self.tokens:,} tokens per sample), {r.dtype}, fp8 {r.fp8}; {budget}"
        )
        lines = [head]
        if self.streamed_blocks:
            lines.append(
                f"  transformer: {s.resident_blocks} of {self.num_blocks} blocks resident, {self.streamed_blocks} "
                f"streamed from pinned host memory (double-buffered device slots: {gib(self.slot_bytes)})"
            )
        else:
            lines.append(f"  transformer: all {self.num_blocks} blocks resident")
        if s.skip_offload_group:
            lines.append(
                f"  long skips: to the host in groups of {s.skip_offload_group} "
                f"(at most {self.skips_on_device} of {self.total_skips} on the device)"
            )
        else:
            lines.append(f"  long skips: all {self.total_skips} kept on the device")
        lines.append("  CFG: " + ("two passes of batch 1" if s.cfg_split else (
            "one batch of 2" if r.cfg else "off (batch 1)")))
        lines.append("  models: " + ("CLIP, VAE and transformer on the device only while each runs"
                                     if s.offload_models else "all kept on the device"))
        latents, frames = self.vae_chunk
        lines.append(f"  VAE: decode in temporal chunks of {latents} latents ({frames} frames); "
                     "spatial tiling not implemented")
        verdict = {None: "", True: " - fits", False: " - DOES NOT FIT"}[self.fits]
        lines.append(f"  predicted peak: {gib(self.peak_bytes)} in {self.peak_stage}{verdict}")
        lines.append("    stages: " + ", ".join(f"{k} {gib(v)}" for k, v in self.stages.items()))
        lines.append("    denoise: " + ", ".join(f"{k} {gib(v)}" for k, v in self.denoise_breakdown.items()))
        lines.append(f"  TensorRT: the per-block loop keeps {gib(self.trt_block_loop_bytes)} outside its engines (the "
                     f"batch-{r.cfg + 1} tokens in and out, every long skip); each engine's weight-streaming budget is "
                     "set from its own figures when it loads")
        lines.append(f"  est. exposed host<->device transfer: {self.est_transfer_s_per_step:.2f} s per step")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def usable_budget(budget_bytes: int | None) -> int | None:
    """The budget minus headroom for fragmentation and library workspaces."""
    if budget_bytes is None:
        return None
    return budget_bytes - max(HEADROOM_MIN_BYTES, int(HEADROOM_FRACTION * budget_bytes))


def device_budget_bytes(device: str, vram_budget_gb: float | None) -> int | None:
    """--vram-budget (GiB) when given, else the free memory of a CUDA device, else None (no GPU)."""
    if vram_budget_gb is not None:
        if vram_budget_gb <= 0:
            raise ValueError(f"vram_budget_gb: {vram_budget_gb} must be positive.")
        return int(vram_budget_gb * GiB)
    import torch

    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(target)
    return free


def mode_settings(memory_mode: str, offload_steps: int | None, num_blocks: int) -> PlanSettings:
    """The fixed settings of an explicit memory mode (auto is searched instead)."""
    group = offload_steps or 0
    if memory_mode == "full_gpu":
        return PlanSettings(False, num_blocks, group, False)
    if memory_mode == "normal":
        return PlanSettings(True, num_blocks, group, False)
    if memory_mode == "low_gpu":
        return PlanSettings(True, 0, group, False)
    raise ValueError(f"memory_mode: {memory_mode!r} has no fixed settings; use one of {PLAN_MODES[1:]}.")


def skip_residency(sources: dict[int, int], group: int) -> tuple[int, int]:
    """(most skips on the device at once, skips sent to the host per pass) under BlockRunner's policy."""
    kept = set(sources.values())
    on_device, on_host, peak, sent = 0, 0, 0, 0
    for i in range(max([*sources, *kept], default=-1) + 1):
        popped = 0
        if i in sources:
            if on_device:  # LIFO: the newest skips are the ones still on the device
                on_device -= 1
            else:
                on_host -= 1
            popped = 1
        peak = max(peak, on_device + popped)
        if i in kept:
            on_device += 1
            peak = max(peak, on_device)
            if group and on_device >= group:
                sent += on_device
                on_host += on_device
                on_device = 0
    return peak, sent


class _Planner:
    """Evaluates settings for one request: stage peaks and a transfer-time cost."""

    def __init__(self, tcfg: TransformerConfig, vcfg: VAEConfig, clip: ClipSpec, request: PlanRequest):
        request.validate()
        self.tcfg, self.vcfg, self.clip, self.request = tcfg, vcfg, clip, request
        self.a = DTYPE_BYTES[request.dtype]
        self.weights = transformer_weights(tcfg, self.a, request.fp8)
        self.vae_w, self.clip_w = vae_weight_bytes(vcfg, self.a), clip_weight_bytes(clip, self.a)
        scale, p = vcfg.spatial_factor, tcfg.patch_size
        self.latent = (vcfg.latent_frames(request.frames), request.height // scale, request.width // scale)
        t, lh, lw = self.latent
        self.tokens = t * (lh // p) * (lw // p)
        self.batch = 2 if request.cfg else 1
        self.sources = tcfg.skip_sources
        self.working_sets = {  # per stage, without weights
            "clip": clip_activation_bytes(clip, self.a),
            "vae encode": vae_encode_bytes(vcfg, request.height, request.width, request.frames, self.a),
            "vae decode": vae_decode_bytes(vcfg, request.height, request.width, request.frames, self.a),
        }
        self.compute_s = step_flops(tcfg, self.batch, self.tokens) / DEVICE_FLOPS

    def slot_bytes(self, resident: int) -> int:
        streamed = range(resident, self.weights.num_blocks)
        by_size: dict[int, int] = {}
        for i in streamed:
            size = self.weights.block(i)
            by_size[size] = by_size.get(size, 0) + 1
        return sum(size * min(2, count) for size, count in by_size.items())

    def evaluate(self, s: PlanSettings) -> MemoryPlan:
        r, w, tcfg = self.request, self.weights, self.tcfg
        batch = 1 if s.cfg_split else self.batch
        call = CallShape(batch, self.tokens)
        h = hidden_bytes(tcfg, call, self.a)
        full_h = hidden_bytes(tcfg, CallShape(self.batch, self.tokens), self.a)
        resident_w = w.other + sum(w.block(i) for i in range(s.resident_blocks))
        slots = self.slot_bytes(s.resident_blocks)
        skips_peak, skips_sent = skip_residency(self.sources, s.skip_offload_group)
        transient = block_transient_bytes(tcfg, call, self.a)
        latent_elems = self.latent[0] * self.latent[1] * self.latent[2]
        breakdown = {
            "weights (non-block + resident blocks)": resident_w,
            "weights (streaming slots)": slots,
            "hidden states": full_h + h + (h if s.cfg_split else 0) + (2 * full_h if r.teacache else 0),
            "long skips": skips_peak * h,
            "block working set": max(transient.values()),
            "conditioning": conditioning_bytes(tcfg, self.batch, call, latent_elems, self.a),
        }
        ws = self.working_sets
        if s.offload_models:  # each stage holds only its own model
            stages = {"clip": self.clip_w + ws["clip"], "vae encode": self.vae_w + ws["vae encode"],
                      "denoise": sum(breakdown.values()), "vae decode": self.vae_w + ws["vae decode"]}
        else:  # every model stays on the device
            everything = w.total + self.vae_w + self.clip_w
            stages = {"clip": everything + ws["clip"], "vae encode": everything + ws["vae encode"],
                      "denoise": sum(breakdown.values()) + self.vae_w + self.clip_w,
                      "vae decode": everything + ws["vae decode"]}
        passes = 2 if s.cfg_split and self.batch == 2 else 1
        stream_s = passes * sum(w.block(i) for i in range(s.resident_blocks, w.num_blocks)) / PCIE_BYTES_PER_S
        transfer = max(0.0, stream_s - self.compute_s) + passes * 2 * skips_sent * h / PCIE_BYTES_PER_S
        transfer += self.compute_s * CFG_SPLIT_OVERHEAD if s.cfg_split else 0.0
        if s.offload_models:
            transfer += 2 * (w.total + self.vae_w + self.clip_w) / PCIE_BYTES_PER_S / r.steps
        return MemoryPlan(
            request=r, settings=s, num_blocks=w.num_blocks, latent_shape=self.latent, tokens=self.tokens,
            stages=stages, denoise_breakdown=breakdown, slot_bytes=slots, skips_on_device=skips_peak,
            total_skips=len(self.sources), vae_chunk=(self.vcfg.mini_batch_decoder,
                                                      self.vcfg.mini_batch_decoder * self.vcfg.temporal_factor),
            trt_block_loop_bytes=(2 + skip_residency(self.sources, 0)[0]) * full_h,
            est_transfer_s_per_step=transfer,
        )  # fmt: skip

    def candidates(self) -> list[PlanSettings]:
        n, r = self.weights.num_blocks, self.request
        groups = SKIP_OFFLOAD_GROUPS if r.offload_steps is None else (r.offload_steps,)
        splits = (False, True) if self.batch == 2 else (False,)
        found = [PlanSettings(False, n, g, c) for g, c in itertools.product(groups, splits)]
        found += [PlanSettings(True, k, g, c) for k, g, c in itertools.product(range(n, -1, -1), groups, splits)]
        return found


def plan_memory(tcfg: TransformerConfig, vcfg: VAEConfig, clip: ClipSpec, request: PlanRequest) -> MemoryPlan:
    """Predict and choose. Explicit modes return their fixed settings (check `fits`); auto returns the
    cheapest setting that fits the budget, or raises MemoryPlanError naming what to reduce."""
    planner = _Planner(tcfg, vcfg, clip, request)
    if request.memory_mode != "auto":
        plan = planner.evaluate(mode_settings(request.memory_mode, request.offload_steps, tcfg.num_layers))
        if plan.fits is False:
            log.warning("the %s plan needs %s, more than the usable %s; try --memory-mode auto",
                        request.memory_mode, gib(plan.peak_bytes), gib(plan.usable_bytes))
        return plan
    plans = [planner.evaluate(s) for s in planner.candidates()]
    feasible = [p for p in plans if p.fits]
    if feasible:
        best = min(feasible, key=lambda p: (round(p.est_transfer_s_per_step, 3), p.streamed_blocks, p.peak_bytes))
        return _with_notes(best)
    leanest = min(plans, key=lambda p: p.peak_bytes)
    raise MemoryPlanError(_explain_infeasible(leanest))


def _with_notes(plan: MemoryPlan) -> MemoryPlan:
    notes = []
    if plan.settings.cfg_split:
        notes.append("CFG split: the blocks run once per sample; outputs equal the batched run up to rounding")
    if plan.streamed_blocks and plan.request.fp8 == "none":
        notes.append("--fp8 lite/strong would shrink every weight and let more blocks stay resident")
    return MemoryPlan(**{**plan.__dict__, "notes": tuple(notes)})


def _explain_infeasible(plan: MemoryPlan) -> str:
    r = plan.request
    stage = plan.peak_stage
    head = (f"no memory plan fits {r.height}x{r.width}x{r.frames} frames in the usable {gib(plan.usable_bytes)} "
            f"of the {gib(r.budget_bytes)} budget: even the leanest plan needs {gib(plan.peak_bytes)} ({stage}).")
    if stage == "vae decode":
        advice = ("The VAE decode of one chunk does not fit and VAE spatial tiling is not implemented: "
                  "use --resolution 512 or a smaller --size, or a larger --vram-budget.")
    elif stage == "denoise":
        advice = ("Reduce --frames or use --resolution 512 / a smaller --size (activations grow with tokens), "
                  "use --fp8 strong, or give a larger --vram-budget.")
    else:
        advice = "Give a larger --vram-budget."
    return f"{head} {advice}"


__all__ = [
    "PLAN_MODES",
    "MemoryPlan",
    "MemoryPlanError",
    "PlanRequest",
    "PlanSettings",
    "device_budget_bytes",
    "mode_settings",
    "plan_memory",
    "skip_residency",
    "usable_budget",
]  # fmt: skip
