"""The CPU speed table of the fast paths, measured in one run: per backend, the tiny model's denoiser step (one
transformer call on the CFG batch, `ruyi-trt bench --stages denoise`) and one full-width block
(tools/block_bench.py), each as a ratio to torch fp32 measured in the same run.

    python -m ruyi_trt.tools.cpu_table --out outputs/cpu-table     (wrap in `flock /work/locks/heavy.lock`: ~GBs, minutes)

Writes cpu_table.json and cpu_table.md (the tiny bench's own bench.json / bench.md beside them).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from ..files import atomic_write
from .bench import BenchConfig, run_bench
from .bench_models import Shape
from .block_bench import BLOCK_BACKENDS, bench_block


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}"


TINY_SHAPE = Shape(256, 256, 16)  # 4 latent frames x 16 x 16 = 1024 tokens per sample


def cpu_table(out: Path, backends: tuple[str, ...] = BLOCK_BACKENDS, tiny_shape: Shape = TINY_SHAPE,
              block_frames: int = 2, block_per_frame: int = 1024, repeat: int = 3) -> dict:  # fmt: skip
    """Measure both columns and write the table; returns its JSON form."""
    results = run_bench(BenchConfig(model="tiny", backends=backends, shapes=(tiny_shape,), stages=("denoise",),
                                    warmup=2, repeat=repeat), out / "tiny")  # fmt: skip
    tiny = {m.backend: m for m in results.measurements}
    blocks = {t.backend: t for t in bench_block(backends, block_frames, block_per_frame, repeat=repeat)}
    base_tiny = tiny["torch"].median_s if "torch" in tiny else None
    base_block = blocks["torch"].median_s if "torch" in blocks else None
    rows = []
    for backend in backends:
        step, block = tiny.get(backend), blocks.get(backend)
        rows.append({
            "backend": backend,
            "tiny_step_s": step.median_s if step else None, "tiny_ratio": (step.median_s / base_tiny) if step and step.median_s and base_tiny else None,
            "tiny_status": step.status if step else "missing", "tiny_reason": step.reason if step else None,
            "block_s": block.median_s if block else None, "block_ratio": (block.median_s / base_block) if block and block.median_s and base_block else None,
            "block_setup_s": block.setup_s if block else None, "block_rel_err": block.max_abs_err if block else None,
            "block_error": block.error if block else None,
        })  # fmt: skip
    tokens = block_frames * block_per_frame
    data = {"tiny_shape": asdict(tiny_shape), "block": {"hidden": 2816, "heads": "16 x 176", "tokens": tokens, "batch": 2},
            "environment": results.environment, "rows": rows}  # fmt: skip
    lines = [
        (f"# CPU fast paths: tiny denoiser step ({tiny_shape.label}, CFG batch 2) and one full-width block "
         f"(hidden 2816, 16 x 176 heads, {tokens} tokens, batch 2), fp32 host, medians of {repeat}"),
        "",
        "| backend | tiny step s | x torch | block s | x torch | block setup s | block max err (rel) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        step = f"{row['tiny_step_s']:.4f}" if row["tiny_step_s"] else f"- ({row['tiny_reason']})"
        block = f"{row['block_s']:.3f}" if row["block_s"] else f"- ({row['block_error']})"
        setup = f"{row['block_setup_s']:.1f}" if row["block_setup_s"] else "-"
        err = f"{row['block_rel_err']:.2e}" if row["block_rel_err"] is not None else "-"
        lines.append(f"| {row['backend']} | {step} | {_ratio(row['tiny_step_s'], base_tiny)} | {block} "
                     f"| {_ratio(row['block_s'], base_block)} | {setup} | {err} |")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "cpu_table.json", lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
    atomic_write(out / "cpu_table.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/cpu-table"))
    parser.add_argument("--backends", default=",".join(BLOCK_BACKENDS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--per-frame", type=int, default=1024, help="block tokens per latent frame (2 frames)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cpu_table(args.out, tuple(b for b in args.backends.split(",") if b), block_per_frame=args.per_frame, repeat=args.repeat)
    print((args.out / "cpu_table.md").read_text())


if __name__ == "__main__":
    main()
