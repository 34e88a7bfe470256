"""The memory planner: predict a run's peak device memory from configs and pick how to fit a budget.

Knobs, all executable by the torch runtime (`runtime.block_runner`):
- offload_models: CLIP, the VAE and the transformer visit the device only while they run (reference
  normal_mode), so the VAE decode never shares the device with the transformer's weights;
- resident_blocks: the first R transformer blocks stay on the device, the others stream from pinned host
  memory through two device slots per block type (`runtime.streaming`);
- skip_offload_group: the reference's GPU_offload_steps k (long-skip activations go to the host in groups
  of k; 0 keeps all on the device);
- cfg_split: classifier-free guidance as two batch-1 passes instead of one batch of 2 (halves activations);
- fp8: FP8 weight storage (`weights.fp8_storage`), chosen by auto only when `--fp8 auto` and nothing fits
  without it (it changes the numbers slightly);
- vae_tile: VAE spatial tiling (`models.vae_tiling`) of every encode/decode chunk, when a chunk does not fit.
The VAE always works in temporal chunks of `mini_batch_encoder` frames / `mini_batch_decoder` latents.

Host memory is modelled too (`host_bytes`): the page-locked flat buffers of the streamed blocks and of the
long skips sent to the host (`runtime.memory.host`: page-rounded, no power-of-two rounding), the pageable
copies of models kept off the device between uses, the run's host tensors (conditioning and decoded video)
and a fixed process baseline; a plan whose host memory does not fit the host's RAM is refused.

`--memory-mode` maps onto the knobs: full_gpu (everything resident), normal (models offloaded between uses),
low_gpu (normal + every block streamed), auto (the cheapest feasible combination under a simple transfer
cost model: PCIe bytes that cannot hide behind compute).

Under `--parallel` (runtime.parallel) each rank plans for its own part: `sequence_parallel` ranks share the
tokens of a sample (activations scale with the largest token shard, plus the all-to-all / ring buffers of the
self-attention), and `cfg_parallel` gives each rank one CFG sample. Weights are whole on every rank.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass, field, replace

from ...models.transformer import TransformerConfig
from ...models.vae_config import VAEConfig
from ...weights.fp8_storage import FP8_MODES
from .host import host_ram_bytes, page_rounded
from .model import (
    DTYPE_BYTES,
    CallShape,
    ClipSpec,
    GiB,
    block_transient_bytes,
    clip_activation_bytes,
    clip_weight_bytes,
    conditioning_bytes,
    flat_block_bytes,
    gib,
    hidden_bytes,
    step_flops,
    transformer_weights,
    vae_decode_bytes,
    vae_encode_bytes,
    vae_weight_bytes,
)
from .skip_offload import skip_residency

log = logging.getLogger(__name__)

PLAN_MODES = ("auto", "full_gpu", "normal", "low_gpu")
SKIP_OFFLOAD_GROUPS = (0, 10, 7, 5, 1)  # the reference's GPU_offload_steps choices, most device memory first
HEADROOM_FRACTION = 0.05  # kept free for allocator fragmentation, cuBLAS/cuDNN workspaces
HEADROOM_MIN_BYTES = 512 * 2**20
PCIE_BYTES_PER_S = 20e9  # pinned host <-> device copies, PCIe 4.0 x16 in practice
DEVICE_FLOPS = 4e14  # effective bf16 throughput assumed when deciding whether streaming hides behind compute
CFG_SPLIT_OVERHEAD = 0.03  # fraction of compute lost to two half-size passes
DEVICE_BYTES_PER_S = 2e12  # device memory bandwidth assumed for the per-call fp8 -> bf16 weight up-cast
FP8_CHOICES = ("none", "lite", "strong")  # what `--fp8 auto` may pick, least change to the numbers first
VAE_TILES = (None, 512, 384, 256)  # VAE tile sizes (pixels) the planner may pick, no tiling first
HOST_BASELINE_BYTES = 3 * GiB  # the process itself: Python, torch and CUDA libraries, the CUDA context
HOST_RAM_FRACTION = 0.9  # of the host's RAM a plan may use (the OS and page cache keep the rest)
HOST_VIDEO_FP32_COPIES = 6  # conditioning video, mask and masked video, decoded video and its [0, 1] copies


class MemoryPlanError(ValueError):
    """No combination of the knobs fits the budget; the message says what to reduce."""


@dataclass(frozen=True)
class PlanSettings:
    """What the runtime executes."""

    offload_models: bool
    resident_blocks: int
    skip_offload_group: int
    cfg_split: bool
    fp8: str = "none"  # FP8 weight storage mode of the transformer
    vae_tile: int | None = None  # VAE spatial tile size in pixels (None: no tiling)


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
    sequence_parallel: int = 1  # ranks sharing one sample's tokens (ulysses x ring)
    cfg_parallel: bool = False  # the two CFG samples on two rank groups
    host_ram_bytes: int | None = None  # None: this machine's RAM

    def validate(self) -> None:
        if self.memory_mode not in PLAN_MODES:
            raise ValueError(f"memory_mode: {self.memory_mode!r} is not supported; use one of {PLAN_MODES}.")
        if self.fp8 not in (*FP8_MODES, "auto"):
            raise ValueError(f"fp8: {self.fp8!r} is not supported; use one of {(*FP8_MODES, 'auto')}.")
        if self.host_ram_bytes is not None and self.host_ram_bytes <= 0:
            raise ValueError(f"host RAM: {self.host_ram_bytes} bytes must be positive.")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: {self.dtype!r} is not supported; use one of {tuple(DTYPE_BYTES)}.")
        if self.height <= 0 or self.width <= 0 or self.frames <= 0:
            raise ValueError(f"video size {self.height}x{self.width}x{self.frames} must be positive.")
        if self.offload_steps is not None and self.offload_steps < 0:
            raise ValueError(f"offload_steps: {self.offload_steps} must be >= 0.")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise ValueError(f"vram budget: {self.budget_bytes} bytes must be positive.")
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel: {self.sequence_parallel} must be >= 1.")
        if self.cfg_parallel and not self.cfg:
            raise ValueError("cfg_parallel needs classifier-free guidance (cfg=True).")
        if self.memory_mode == "auto" and self.budget_bytes is None:
            raise ValueError("memory_mode auto needs a budget: pass --vram-budget GB (no CUDA GPU to measure).")


@dataclass(frozen=True)
class MemoryPlan:
    """A chosen setting with its predicted device memory (bytes) per stage and the denoise breakdown."""

    request: PlanRequest
    settings: PlanSettings
    num_blocks: int
    latent_shape: tuple[int, int, int]  # (T, h, w) latent frames and size
    tokens: int  # transformer tokens per sample (this rank's largest shard under sequence parallelism)
    stages: dict[str, int]
    denoise_breakdown: dict[str, int]
    slot_bytes: int  # device weight slots for streamed blocks
    skips_on_device: int  # most long-skip tensors on the device at once
    total_skips: int
    vae_chunk: tuple[int, int]  # (latents, frames) per VAE decode chunk
    trt_weight_streaming_budget_bytes: int | None  # for a TensorRT engine: usable budget minus activations
    est_transfer_s_per_step: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    host_bytes: dict[str, int] = field(default_factory=dict)  # host memory by part (see the module docstring)
    host_limit_bytes: int = 0  # the share of the host's RAM a plan may use
    est_compute_s_per_step: float = 0.0  # the step's compute at DEVICE_FLOPS, everything resident
    skips_to_host: int = 0  # long-skip tensors sent to the host per pass

    @property
    def host_pinned_bytes(self) -> int:
        return sum(v for k, v in self.host_bytes.items() if k.startswith("pinned"))

    @property
    def host_total_bytes(self) -> int:
        return sum(self.host_bytes.values())

    @property
    def host_fits(self) -> bool:
        return self.host_total_bytes <= self.host_limit_bytes

    @property
    def est_step_s(self) -> float:
        """Predicted seconds per denoising step: compute plus the transfers that do not hide behind it."""
        return self.est_compute_s_per_step + self.est_transfer_s_per_step

    @property
    def step_time_ratio(self) -> float:
        """Predicted step time relative to the unconstrained plan (everything resident, nothing moved)."""
        return self.est_step_s / self.est_compute_s_per_step if self.est_compute_s_per_step else 1.0

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
    def device_fits(self) -> bool | None:
        return None if self.usable_bytes is None else self.peak_bytes <= self.usable_bytes

    @property
    def fits(self) -> bool | None:
        """Device and host: None without a device budget (then only the host is checked, by plan_memory)."""
        return None if self.device_fits is None else self.device_fits and self.host_fits

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
            f"(latents {t}x{lh}x{lw}, {self.tokens:,} tokens per sample{' on this rank' if r.sequence_parallel > 1 else ''}"
            f"), {r.dtype}, fp8 {s.fp8}; {budget}"
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
            "one sample on this rank (the other half on the other CFG rank group)" if r.cfg_parallel else
            "one batch of 2" if r.cfg else "off (batch 1)")))
        if r.sequence_parallel > 1:
            lines.append(f"  sequence parallel: {r.sequence_parallel} ranks share each sample's tokens; this rank "
                         f"holds at most {self.tokens:,} (activations scale with it, weights do not)")
        lines.append("  models: " + ("CLIP, VAE and transformer on the device only while each runs"
                                     if s.offload_models else "all kept on the device"))
        latents, frames = self.vae_chunk
        tiling = f"spatial tiles of {s.vae_tile} px" if s.vae_tile else "no spatial tiling"
        lines.append(f"  VAE: decode in temporal chunks of {latents} latents ({frames} frames), {tiling}")
        verdict = {None: "", True: " - fits", False: " - DOES NOT FIT"}[self.device_fits]
        lines.append(f"  predicted peak: {gib(self.peak_bytes)} in {self.peak_stage}{verdict}")
        lines.append("    stages: " + ", ".join(f"{k} {gib(v)}" for k, v in self.stages.items()))
        lines.append("    denoise: " + ", ".join(f"{k} {gib(v)}" for k, v in self.denoise_breakdown.items()))
        if self.trt_weight_streaming_budget_bytes is not None:
            lines.append(f"  TensorRT weight-streaming budget: {gib(self.trt_weight_streaming_budget_bytes)}")
        host_verdict = "fits" if self.host_fits else "DOES NOT FIT"
        lines.append(f"  host memory: {gib(self.host_total_bytes)} ({gib(self.host_pinned_bytes)} page-locked) of "
                     f"the {gib(self.host_limit_bytes)} a plan may use - {host_verdict}")
        lines.append("    host: " + ", ".join(f"{k} {gib(v)}" for k, v in self.host_bytes.items()))
        lines.append(f"  est. exposed host<->device transfer: {self.est_transfer_s_per_step:.2f} s per step; "
                     f"predicted step time {self.step_time_ratio:.3f}x the unconstrained plan's")
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


def mode_settings(memory_mode: str, offload_steps: int | None, num_blocks: int, fp8: str = "none") -> PlanSettings:
    """The fixed settings of an explicit memory mode (auto is searched instead); fp8 "auto" stores nothing in fp8."""
    group = offload_steps or 0
    fp8 = "none" if fp8 == "auto" else fp8
    if memory_mode == "full_gpu":
        return PlanSettings(False, num_blocks, group, False, fp8)
    if memory_mode == "normal":
        return PlanSettings(True, num_blocks, group, False, fp8)
    if memory_mode == "low_gpu":
        return PlanSettings(True, 0, group, False, fp8)
    raise ValueError(f"memory_mode: {memory_mode!r} has no fixed settings; use one of {PLAN_MODES[1:]}.")


class _Planner:
    """Evaluates settings for one request: stage peaks, host memory and a transfer-time cost."""

    def __init__(self, tcfg: TransformerConfig, vcfg: VAEConfig, clip: ClipSpec, request: PlanRequest):
        request.validate()
        self.tcfg, self.vcfg, self.clip, self.request = tcfg, vcfg, clip, request
        self.a = DTYPE_BYTES[request.dtype]
        self.vae_w, self.clip_w = vae_weight_bytes(vcfg, self.a), clip_weight_bytes(clip, self.a)
        scale, p = vcfg.spatial_factor, tcfg.patch_size
        self.latent = (vcfg.latent_frames(request.frames), request.height // scale, request.width // scale)
        t, lh, lw = self.latent
        whole = t * (lh // p) * (lw // p)
        self.tokens = -(-whole // request.sequence_parallel)  # this rank's largest token shard
        self.batch = 1 if request.cfg_parallel else 2 if request.cfg else 1
        self.sources = tcfg.skip_sources
        ranks = request.sequence_parallel * (2 if request.cfg_parallel else 1)
        self.compute_s = step_flops(tcfg, 2 if request.cfg else 1, whole) / DEVICE_FLOPS / ranks
        self.host_limit = int(HOST_RAM_FRACTION * (request.host_ram_bytes or host_ram_bytes()))

    @functools.cache  # noqa: B019 - one planner per request, a handful of fp8 modes
    def weights(self, fp8: str):
        return transformer_weights(self.tcfg, self.a, fp8)

    def working_sets(self, tile: int | None) -> dict[str, int]:
        r, v = self.request, self.vcfg
        return {  # per stage, without weights
            "clip": clip_activation_bytes(self.clip, self.a),
            "vae encode": vae_encode_bytes(v, r.height, r.width, r.frames, self.a, tile),
            "vae decode": vae_decode_bytes(v, r.height, r.width, r.frames, self.a, tile),
        }

    def slot_bytes(self, resident: int, fp8: str) -> int:
        w = self.weights(fp8)
        by_size: dict[int, int] = {}
        for i in range(resident, w.num_blocks):
            by_size[w.block(i)] = by_size.get(w.block(i), 0) + 1
        return sum(size * min(2, count) for size, count in by_size.items())

    def host_bytes(self, s: PlanSettings, h: int, skips_on_host: int) -> dict[str, int]:
        w, r = self.weights(s.fp8), self.request
        streamed = sum(page_rounded(flat_block_bytes(self.tcfg, w, i)) for i in range(s.resident_blocks, w.num_blocks))
        resident_w = w.other + sum(w.block(i) for i in range(s.resident_blocks))
        video = 3 * r.frames * r.height * r.width * 4
        return {
            "pinned streamed blocks": streamed,
            "pinned long skips": skips_on_host * page_rounded(h),
            "models off the device": (resident_w + self.vae_w + self.clip_w) if s.offload_models else 0,
            "video tensors": HOST_VIDEO_FP32_COPIES * video,
            "process baseline": HOST_BASELINE_BYTES,
        }

    def evaluate(self, s: PlanSettings) -> MemoryPlan:
        r, w, tcfg = self.request, self.weights(s.fp8), self.tcfg
        batch = 1 if s.cfg_split else self.batch
        call = CallShape(batch, self.tokens)
        h = hidden_bytes(tcfg, call, self.a)
        full_h = hidden_bytes(tcfg, CallShape(self.batch, self.tokens), self.a)
        resident_w = w.other + sum(w.block(i) for i in range(s.resident_blocks))
        slots = self.slot_bytes(s.resident_blocks, s.fp8)
        skips = skip_residency(self.sources, s.skip_offload_group, w.num_blocks)
        transient = block_transient_bytes(tcfg, call, self.a)
        latent_elems = self.latent[0] * self.latent[1] * self.latent[2]
        breakdown = {
            "weights (non-block + resident blocks)": resident_w,
            "weights (streaming slots)": slots,
            "hidden states": full_h + h + (h if s.cfg_split else 0) + (2 * full_h if r.teacache else 0),
            "long skips": skips.device_peak * h,
            "block working set": max(transient.values()) + _sequence_parallel_buffers(r.sequence_parallel, h),
            "conditioning": conditioning_bytes(tcfg, self.batch, call, latent_elems, self.a),
        }
        ws = self.working_sets(s.vae_tile)
        if s.offload_models:  # each stage holds only its own model
            stages = {"clip": self.clip_w + ws["clip"], "vae encode": self.vae_w + ws["vae encode"],
                      "denoise": sum(breakdown.values()), "vae decode": self.vae_w + ws["vae decode"]}
        else:  # every model stays on the device
            everything = w.total + self.vae_w + self.clip_w
            stages = {"clip": everything + ws["clip"], "vae encode": everything + ws["vae encode"],
                      "denoise": sum(breakdown.values()) + self.vae_w + self.clip_w,
                      "vae decode": everything + ws["vae decode"]}
        passes = 2 if s.cfg_split and self.batch == 2 else 1
        h2d = passes * (sum(w.block(i) for i in range(s.resident_blocks, w.num_blocks)) + skips.sent * h)
        d2h = passes * skips.sent * h
        transfer = max(0.0, h2d / PCIE_BYTES_PER_S - self.compute_s) + max(0.0, d2h / PCIE_BYTES_PER_S - self.compute_s)
        transfer += self.compute_s * CFG_SPLIT_OVERHEAD if s.cfg_split else 0.0
        if s.fp8 != "none":  # every fp8 weight is up-cast once per pass: read 1 byte, write and read 2
            stored_fp8 = transformer_weights(tcfg, self.a, "none").total - w.total
            transfer += passes * 3 * stored_fp8 / DEVICE_BYTES_PER_S
        if s.offload_models:
            transfer += 2 * (w.total + self.vae_w + self.clip_w) / PCIE_BYTES_PER_S / r.steps
        usable = usable_budget(r.budget_bytes)
        activations = sum(v for k, v in breakdown.items() if not k.startswith("weights"))
        return MemoryPlan(
            request=r, settings=s, num_blocks=w.num_blocks, latent_shape=self.latent, tokens=self.tokens,
            stages=stages, denoise_breakdown=breakdown, slot_bytes=slots, skips_on_device=skips.device_peak,
            total_skips=len(self.sources), vae_chunk=(self.vcfg.mini_batch_decoder,
                                                      self.vcfg.mini_batch_decoder * self.vcfg.temporal_factor),
            trt_weight_streaming_budget_bytes=None if usable is None else max(0, usable - activations),
            est_transfer_s_per_step=transfer, host_bytes=self.host_bytes(s, h, skips.host_peak),
            host_limit_bytes=self.host_limit, est_compute_s_per_step=self.compute_s, skips_to_host=skips.sent,
        )  # fmt: skip

    def candidates(self) -> list[PlanSettings]:
        n, r = self.tcfg.num_layers, self.request
        groups = SKIP_OFFLOAD_GROUPS if r.offload_steps is None else (r.offload_steps,)
        splits = (False, True) if self.batch == 2 else (False,)
        fp8s = FP8_CHOICES if r.fp8 == "auto" else (r.fp8,)
        found = []
        for fp8 in fp8s:
            found += [PlanSettings(False, n, g, c, fp8) for g, c in itertools.product(groups, splits)]
            found += [PlanSettings(True, k, g, c, fp8) for k, g, c in itertools.product(range(n, -1, -1), groups, splits)]
        return found

    def vae_tile(self, s: PlanSettings) -> int | None:
        """The largest VAE tile (None first) with which the VAE stages of `s` fit the budget."""
        usable = usable_budget(self.request.budget_bytes)
        for tile in VAE_TILES:
            plan = self.evaluate(replace(s, vae_tile=tile))
            if usable is None or max(plan.stages["vae encode"], plan.stages["vae decode"]) <= usable:
                return tile
        return VAE_TILES[-1]


def _preference(plan: MemoryPlan) -> tuple:
    """auto's order among plans that fit: fp8 storage only when nothing fits without it (it changes the numbers),
    then the least exposed transfer, then the least that moves: streamed blocks, skips sent to the host, the
    CFG split. (VAE tiling is already the least each plan needs.)"""
    s = plan.settings
    return (FP8_CHOICES.index(s.fp8) if s.fp8 in FP8_CHOICES else 0, round(plan.est_transfer_s_per_step, 3),
            plan.streamed_blocks, plan.skips_to_host, s.cfg_split, plan.peak_bytes)


def plan_memory(tcfg: TransformerConfig, vcfg: VAEConfig, clip: ClipSpec, request: PlanRequest) -> MemoryPlan:
    """Predict and choose. Explicit modes return their fixed settings (check `fits`); auto returns the
    cheapest setting that fits the budget and the host's RAM, or raises MemoryPlanError naming what to change."""
    planner = _Planner(tcfg, vcfg, clip, request)
    if request.memory_mode != "auto":
        settings = mode_settings(request.memory_mode, request.offload_steps, tcfg.num_layers, request.fp8)
        plan = planner.evaluate(replace(settings, vae_tile=planner.vae_tile(settings)))
        if plan.device_fits is False:
            log.warning("the %s plan needs %s, more than the usable %s; try --memory-mode auto",
                        request.memory_mode, gib(plan.peak_bytes), gib(plan.usable_bytes))
        if not plan.host_fits:
            raise MemoryPlanError(_explain_host(plan))
        return plan
    plans = [planner.evaluate(replace(s, vae_tile=planner.vae_tile(s))) for s in planner.candidates()]
    feasible = [p for p in plans if p.device_fits]
    if not feasible:
        raise MemoryPlanError(_explain_infeasible(min(plans, key=lambda p: p.peak_bytes)))
    on_host = [p for p in feasible if p.host_fits]
    if not on_host:
        raise MemoryPlanError(_explain_host(min(feasible, key=lambda p: p.host_total_bytes)))
    return _with_notes(min(on_host, key=_preference))


def _sequence_parallel_buffers(sequence_parallel: int, h: int) -> int:
    """Extra self-attention memory of a sequence-parallel rank, in hidden states h of its shard: the all-to-all
    send copy and receive buffer next to q, k, v (2 h), plus the ring's key/value messages in flight and its
    float32 output accumulator (about 3 h more)."""
    return 0 if sequence_parallel == 1 else 5 * h


def _with_notes(plan: MemoryPlan) -> MemoryPlan:
    notes = []
    s, r = plan.settings, plan.request
    if s.cfg_split:
        notes.append("CFG split: the blocks run once per sample; outputs equal the batched run up to rounding")
    if s.fp8 != "none" and r.fp8 == "auto":
        notes.append(f"fp8 {s.fp8} weight storage was chosen because no plan fits without it (--fp8 none forbids it)")
    if s.vae_tile:
        notes.append(f"VAE tiles of {s.vae_tile} px: one chunk does not fit untiled; tile borders are blended")
    if plan.streamed_blocks and s.fp8 == "none" and r.fp8 == "none":
        notes.append("--fp8 lite/strong would shrink every weight and let more blocks stay resident")
    return replace(plan, notes=tuple(notes))


def _explain_host(plan: MemoryPlan) -> str:
    r, s = plan.request, plan.settings
    parts = ", ".join(f"{k} {gib(v)}" for k, v in plan.host_bytes.items() if v)
    advice = []
    if plan.streamed_blocks:
        advice.append("a larger --vram-budget (fewer streamed blocks)")
        if s.fp8 == "none":
            advice.append("--fp8 lite or strong (half-size streamed blocks)")
    if plan.host_bytes.get("pinned long skips"):
        advice.append("--offload-steps 0 or a larger group (fewer long skips on the host)")
    if s.offload_models:
        advice.append("--memory-mode full_gpu where the card has room (models stay on the device)")
    advice.append("fewer --frames or a lower --resolution, or a machine with more RAM")
    return (f"the memory plan for {r.height}x{r.width}x{r.frames} frames needs {gib(plan.host_total_bytes)} of host "
            f"memory ({parts}), more than the {gib(plan.host_limit_bytes)} ({HOST_RAM_FRACTION:.0%}) of this host's "
            f"RAM a run may use. Use " + "; or ".join(advice) + ".")


def _explain_infeasible(plan: MemoryPlan) -> str:
    r = plan.request
    stage = plan.peak_stage
    head = (f"no memory plan fits {r.height}x{r.width}x{r.frames} frames in the usable {gib(plan.usable_bytes)} "
            f"of the {gib(r.budget_bytes)} budget: even the leanest plan needs {gib(plan.peak_bytes)} ({stage}).")
    if stage.startswith("vae"):
        advice = (f"Even VAE tiles of {VAE_TILES[-1]} px do not fit: use --resolution 512 or a smaller --size, "
                  "or a larger --vram-budget.")
    elif stage == "denoise":
        fp8 = "" if r.fp8 in ("auto", "strong", "extreme") else ", use --fp8 auto (or strong)"
        advice = ("Reduce --frames or use --resolution 512 / a smaller --size (activations grow with tokens)"
                  f"{fp8}, or give a larger --vram-budget.")
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
