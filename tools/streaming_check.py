"""GPU check of the memory plans: `python -m ruyi_trt.tools.streaming_check --out DIR` (the GPU twin of memory_check).

The full Ruyi-Mini-7B architecture with random bf16 weights, 120 frames at 768x768 and at 576x1008 (the 768 base's
16:9 bucket). Per size, three plans (`--memory-mode auto --fp8 auto`): unconstrained (the whole card), 24 GiB and
12 GiB. Each case loads the pipeline with its plan (`runtime.pipeline.load_pipeline` on `full-random`: resident/streamed
blocks, skip offload, CFG split, fp8 storage, VAE tiling), caps the process at the budget
(`torch.cuda.set_per_process_memory_fraction`) and runs the four stages as `RuyiPipeline` calls them
(`tools.pipeline_stages`): the stage's `torch.cuda.max_memory_allocated` beside the planner's prediction, the
same table as tools/memory_check measures with fake tensors. The denoise stage then runs twice more (warm-up,
timed): the step time of each plan and its ratio to the unconstrained plan's. Cases run in order and the JSON
and markdown are rewritten after each, so a run cut short keeps what it measured; without a CUDA GPU it says so
and exits 0.
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
SIZES = ((768, 768), (576, 1008))


@dataclass(frozen=True)
class Case:
    """One plan to measure: a size and a budget (None: the whole card)."""

    height: int
    width: int
    frames: int
    budget_gib: float | None

    @property
    def name(self) -> str:
        budget = "unconstrained" if self.budget_gib is None else f"{self.budget_gib:g} GiB"
        return f"{self.height}x{self.width} x {self.frames}f, {budget}"


def build_cases(sizes: list[tuple[int, int]], frames: int, budgets: list[float]) -> list[Case]:
    """Per size: unconstrained first (the step-time reference), then the budgets, largest first."""
    return [Case(h, w, frames, b) for h, w in sizes for b in (None, *sorted(budgets, reverse=True))]


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ruyi_trt.tools.streaming_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="Folder for streaming_check.json and .md")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=list(SIZES), help="HxW, e.g. 768x768")
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--budgets", type=float, nargs="+", default=[24.0, 12.0], help="GiB")
    parser.add_argument("--steps-timed", type=int, default=1, help="Timed denoise steps after the warm-up")
    args = parser.parse_args(argv)
    if args.frames < 8 or args.frames % 8:
        parser.error(f"--frames {args.frames} must be a positive multiple of 8")
    if any(b <= 0 for b in args.budgets):
        parser.error("--budgets must be positive")
    return args


def plan_case(case: Case, options):
    """The memory plan of the full architecture for this case's video (CFG on, 25 steps)."""
    from ..models.checkpoint import Checkpoint
    from ..runtime.loading import memory_plan

    return memory_plan(Checkpoint.full_random(), options, case.height, case.width, case.frames, True, 25)


def load_case(options, plan):
    """The full architecture with random weights, loaded as `plan` says."""
    from ..runtime.pipeline import load_pipeline

    return load_pipeline("full-random", options, plan)


def run_case(case: Case, card_bytes: int, steps_timed: int) -> dict:
    """Plan, load, cap, measure the four stages, then time the denoise step; returns the record."""
    import torch

    from ..runtime.loading import RuntimeOptions
    from ..runtime.memory.plan import MemoryPlanError
    from .pipeline_stages import STAGES, run_pipeline_stages

    device = torch.device("cuda")
    budget = card_bytes if case.budget_gib is None else int(case.budget_gib * GiB)
    record: dict[str, Any] = {"case": case.name, **asdict(case), "budget_used_gib": budget / GiB}
    options = RuntimeOptions(device="cuda", dtype="bf16", memory_mode="auto", fp8="auto", vram_budget_gb=budget / GiB)
    try:
        plan = plan_case(case, options)
    except MemoryPlanError as exc:
        return {**record, "status": "no-plan", "error": str(exc)}
    record.update(plan=plan.describe(), settings=asdict(plan.settings), predicted_step_ratio=plan.step_time_ratio,
                  host_total_gib=plan.host_total_bytes / GiB, host_pinned_gib=plan.host_pinned_bytes / GiB,
                  stages={name: {"predicted_gib": plan.stages[name] / GiB} for name in STAGES})  # fmt: skip
    pipeline = None
    try:
        pipeline = load_case(options, plan)
        gc.collect()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)

        def measure(name: str, fn) -> dict:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            log.info("%s: %s %.2f GiB measured, %.2f predicted", case.name, name, peak / GiB, plan.stages[name] / GiB)
            return {"measured_gib": peak / GiB, "reserved_gib": torch.cuda.max_memory_reserved(device) / GiB,
                    "seconds": time.perf_counter() - start}  # fmt: skip

        for name, got in run_pipeline_stages(pipeline, plan, measure).items():  # also the warm-up
            record["stages"][name].update(got, within_budget=got["measured_gib"] * GiB <= budget)
        times = [run_pipeline_stages(pipeline, plan, measure, until="denoise")["denoise"]["seconds"]
                 for _ in range(steps_timed)]  # fmt: skip
        record.update(status="ok", step_s=min(times))
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # cuBLAS/cuDNN report some OOMs as RuntimeError
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in message.lower() or "ALLOC_FAILED" in message
        record.update(status="oom" if oom else "error", error=message,
                      peak_before_oom_gib=torch.cuda.max_memory_allocated(device) / GiB)  # fmt: skip
    finally:
        if pipeline is not None:
            pipeline.components.close()
        del pipeline
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return record


def to_markdown(meta: dict, records: list[dict]) -> str:
    from .pipeline_stages import STAGES

    lines = [f"# Streaming check: {meta['gpu']} ({meta['total_gib']:.1f} GiB), torch {meta['torch']}", "",
             "| case | fp8 / resident / skip group / CFG split / VAE tile | "
             + " | ".join(f"{s} predicted / measured GiB" for s in STAGES) + " | host GiB (pinned) | step s | "
             "step / unconstrained (predicted) | status |",
             "|---|---|" + "---|" * len(STAGES) + "---|---|---|---|"]  # fmt: skip
    reference: dict[tuple, float] = {}
    for r in records:
        s = r.get("settings") or {}
        plan = " / ".join(str(s.get(k, "-")) for k in ("fp8", "resident_blocks", "skip_offload_group", "cfg_split",
                                                       "vae_tile"))  # fmt: skip
        stages = r.get("stages") or {}
        cells = [r["case"], plan]
        for name in STAGES:
            got = stages.get(name, {})
            cells.append(f"{got.get('predicted_gib', float('nan')):.2f} / {got.get('measured_gib', float('nan')):.2f}")
        size = (r["height"], r["width"])
        if r.get("budget_gib") is None and "step_s" in r:
            reference[size] = r["step_s"]
        ratio = r["step_s"] / reference[size] if "step_s" in r and size in reference else float("nan")
        cells += [f"{r.get('host_total_gib', float('nan')):.1f} ({r.get('host_pinned_gib', float('nan')):.1f})",
                  f"{r.get('step_s', float('nan')):.2f}", f"{ratio:.3f} ({r.get('predicted_step_ratio', float('nan')):.3f})",
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
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    card_bytes = torch.cuda.mem_get_info(device)[0]
    meta = {"gpu": props.name, "total_gib": props.total_memory / GiB, "torch": torch.__version__,
            "free_at_start_gib": card_bytes / GiB}  # fmt: skip
    records: list[dict] = []

    def write() -> None:  # after every case: a run cut short by a timeout still leaves what it measured
        text = json.dumps({"meta": meta, "cases": records}, indent=2) + "\n"
        atomic_write(args.out / "streaming_check.json", lambda tmp: tmp.write_text(text))
        atomic_write(args.out / "streaming_check.md", lambda tmp: tmp.write_text(to_markdown(meta, records)))

    for case in build_cases(args.sizes, args.frames, args.budgets):
        log.info("case %s", case.name)
        record = run_case(case, card_bytes, args.steps_timed)
        log.info("-> %s", {k: v for k, v in record.items() if k != "plan"})
        records.append(record)
        write()
    log.info("wrote %s", args.out / "streaming_check.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
