"""GPU check of the memory planner and block streaming: `python -m ruyi_trt.tools.streaming_check --out DIR`.

The full Ruyi-Mini-7B transformer with random bf16 weights runs one denoising step (one transformer forward
on the CFG batch of 2, or two batch-1 passes when the plan splits CFG) per case, at 16:9 buckets: 768 px ->
576x1008 (latents 30x72x126, 68,040 tokens per sample) and 512 px -> 384x672 (30x48x84, 30,240), 120 frames.
Each size runs (a) unconstrained (planned for the whole card) and (b) under a 24 GiB cap
(`torch.cuda.set_per_process_memory_fraction`), with one warm-up and one timed call. The record holds the
plan, its predicted peak (transformer weights + denoise activations) beside `torch.cuda.max_memory_allocated`,
and the step time. Cases of a group run smallest first; the first OOM ends that group with a clear record.
Writes streaming_check.json and streaming_check.md into --out. Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..files import atomic_write

log = logging.getLogger(__name__)

GiB = 2**30
ASPECT_16_9 = (1920, 1080)  # a 16:9 start image (width, height): picks the 0.57 bucket


@dataclass(frozen=True)
class Case:
    """One measured step: a bucket resolution and an optional memory cap (None: the whole card)."""

    resolution: int
    frames: int
    cap_gib: float | None

    @property
    def name(self) -> str:
        cap = "unconstrained" if self.cap_gib is None else f"cap {self.cap_gib:g} GiB"
        return f"{self.resolution}px x {self.frames}f, {cap}"

    def size(self) -> tuple[int, int]:
        from ..models.geometry import closest_bucket

        return closest_bucket(*ASPECT_16_9, self.resolution)


def build_cases(resolutions: list[int], frames: int, cap_gib: float) -> list[list[Case]]:
    """Groups of cases, smallest resolution first: [unconstrained..., capped...]."""
    ordered = sorted(set(resolutions))
    return [[Case(r, frames, None) for r in ordered], [Case(r, frames, cap_gib) for r in ordered]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ruyi_trt.tools.streaming_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="Folder for streaming_check.json and .md")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[768, 512], choices=[512, 768])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--cap-gib", type=float, default=24.0, help="Memory cap of the constrained cases (GiB)")
    args = parser.parse_args(argv)
    if args.frames < 8 or args.frames % 8:
        parser.error(f"--frames {args.frames} must be a positive multiple of 8")
    if args.cap_gib <= 0:
        parser.error(f"--cap-gib {args.cap_gib} must be positive")
    return args


def step_inputs(config: Any, batch: int, latent: tuple[int, int, int], device: Any) -> dict:
    """Random transformer inputs for one CFG step at latent (T, h, w), bf16 on `device`."""
    import torch

    from ..models.transformer import rotary_embedding

    t, h, w = latent
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    return {
        "hidden_states": randn(batch, 16, t, h, w),
        "timestep": torch.full((batch,), 961.0, device=device),
        "encoder_hidden_states": randn(batch, config.text_len, config.cross_attention_dim),
        "text_embedding_mask": torch.ones(batch, config.text_len, dtype=torch.int64, device=device),
        "encoder_hidden_states_t5": randn(batch, config.text_len_t5, config.cross_attention_dim_t5),
        "text_embedding_mask_t5": torch.ones(batch, config.text_len_t5, dtype=torch.int64, device=device),
        "image_meta_size": torch.tensor([[1024.0, 1024.0, h * 8, w * 8, 0.0, 0.0]] * batch, device=device),
        "style": torch.zeros(batch, dtype=torch.int64, device=device),
        "image_rotary_emb": rotary_embedding(h, w, config.patch_size, config.attention_head_dim),
        "inpaint_latents": randn(batch, config.in_channels - 16, t, h, w),
        "clip_encoder_hidden_states": randn(batch, 576, config.projection_dim),
        "clip_attention_mask": torch.ones(batch, config.n_query, device=device),
    }


def run_case(case: Case, model: Any, device: Any, card_bytes: int) -> dict:
    """Plan, place the weights, then one warm-up and one timed forward; returns the record."""
    import torch

    from ..models.vae_config import VAEConfig
    from ..runtime.backends.block_runner import BlockRunner
    from ..runtime.memory.model import ClipSpec
    from ..runtime.memory.plan import MemoryPlanError, PlanRequest, plan_memory

    height, width = case.size()
    budget = card_bytes if case.cap_gib is None else int(case.cap_gib * GiB)
    record: dict[str, Any] = {"case": case.name, **asdict(case), "height": height, "width": width,
                              "budget_gib": budget / GiB}  # fmt: skip
    try:
        plan = plan_memory(model.config, VAEConfig.full(), ClipSpec(),
                           PlanRequest(height, width, case.frames, budget_bytes=budget))  # fmt: skip
    except MemoryPlanError as exc:
        return {**record, "status": "no-plan", "error": str(exc)}
    predicted = sum(plan.denoise_breakdown.values())
    record.update(plan=plan.describe(), settings=asdict(plan.settings), latent=list(plan.latent_shape),
                  tokens=plan.tokens, predicted_peak_gib=predicted / GiB)  # fmt: skip
    runner = None
    try:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        runner = BlockRunner(model, device, torch.bfloat16, resident_blocks=plan.settings.resident_blocks,
                             skip_offload_group=plan.settings.skip_offload_group, cfg_split=plan.settings.cfg_split)
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        inputs = step_inputs(model.config, 2, plan.latent_shape, device)
        seconds = []
        for _ in range(2):  # warm-up, timed
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            out = runner(**inputs)
            torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - start)
            del out
        measured = torch.cuda.max_memory_allocated(device)
        record.update(status="ok", warmup_s=seconds[0], step_s=seconds[1], measured_peak_gib=measured / GiB,
                      reserved_peak_gib=torch.cuda.max_memory_reserved(device) / GiB,
                      predicted_over_measured=predicted / measured, slot_loads=runner.streamer.loads)  # fmt: skip
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # cuBLAS/cuDNN report some OOMs as RuntimeError
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in message.lower() or "ALLOC_FAILED" in message
        record.update(status="oom" if oom else "error", error=message,
                      peak_before_oom_gib=torch.cuda.max_memory_allocated(device) / GiB)  # fmt: skip
    finally:
        del runner
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return record


def to_markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"# Streaming check: {meta['gpu']} ({meta['total_gib']:.1f} GiB), torch {meta['torch']}", "",
             "| case | size | plan (resident / skip group / CFG split) | predicted GiB | measured GiB | step s | status |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        s = r.get("settings") or {}
        plan = f"{s.get('resident_blocks', '-')} / {s.get('skip_offload_group', '-')} / {s.get('cfg_split', '-')}"
        cells = [r["case"], f"{r['height']}x{r['width']}", plan, f"{r.get('predicted_peak_gib', float('nan')):.2f}",
                 f"{r.get('measured_peak_gib', float('nan')):.2f}", f"{r.get('step_s', float('nan')):.2f}",
                 r["status"] + (f": {r['error']}" if "error" in r else "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Plans:", ""]
    lines += [f"```\n{r['plan']}\n```" for r in records if "plan" in r]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        log.warning("no CUDA GPU is present: the streaming check needs one; nothing was run")
        return 0
    from ..models.presets import full_random_transformer

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    card_bytes = torch.cuda.mem_get_info(device)[0]
    meta = {"gpu": props.name, "total_gib": props.total_memory / GiB, "torch": torch.__version__,
            "free_at_start_gib": card_bytes / GiB}  # fmt: skip
    start = time.perf_counter()
    model = full_random_transformer(device=device, dtype=torch.bfloat16)
    meta["build_s"] = time.perf_counter() - start
    records = []

    def write() -> None:  # after every case: a run cut short by a timeout still leaves what it measured
        text = json.dumps({"meta": meta, "cases": records}, indent=2) + "\n"
        atomic_write(args.out / "streaming_check.json", lambda tmp: tmp.write_text(text))
        atomic_write(args.out / "streaming_check.md", lambda tmp: tmp.write_text(to_markdown(meta, records)))

    for group in build_cases(args.resolutions, args.frames, args.cap_gib):
        for case in group:
            log.info("case %s", case.name)
            record = run_case(case, model, device, card_bytes)
            log.info("-> %s", {k: v for k, v in record.items() if k != "plan"})
            records.append(record)
            if record["status"] == "oom":
                records += [{"case": c.name, **asdict(c), "height": c.size()[0], "width": c.size()[1],
                             "status": "skipped after OOM"} for c in group[group.index(case) + 1 :]]  # fmt: skip
                write()
                break
            write()
    write()
    log.info("wrote %s", args.out / "streaming_check.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
