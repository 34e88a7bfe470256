"""Communication volume per step (hand count on the tiny config, the full-size figures of the README), the speed-up
estimate, and the memory plan of one rank."""

from __future__ import annotations

import pytest

from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.runtime.memory.model import ClipSpec
from ruyi_trt.runtime.memory.plan import PlanRequest, plan_memory
from ruyi_trt.runtime.parallel import ParallelConfig
from ruyi_trt.runtime.parallel.cost import PCIE_BYTES_PER_S, estimated_speedup, step_communication

GiB = 2**30
TOKENS_768_120F = 30 * 48 * 48


def test_tiny_hand_count() -> None:
    tiny = TransformerConfig.tiny()  # D 32, 4 blocks, proj_out 2*2*32 = 128 channels
    comm = step_communication(tiny, 18, True, ParallelConfig(ulysses=2, ring=2), dtype_bytes=4)
    local = 2 * 5 * 32 * 4  # batch 2, largest shard 5 of 18 tokens over 4 ranks
    assert comm.ulysses == 4 * 4 * local // 2
    assert comm.ring == 4 * 2 * local * 1
    assert comm.gather == 2 * 5 * 128 * 4 * 3
    assert comm.total == comm.ulysses + comm.ring + comm.gather
    cfg_only = step_communication(tiny, 18, True, ParallelConfig(cfg=2), dtype_bytes=4)
    assert (cfg_only.ulysses, cfg_only.ring, cfg_only.gather) == (0, 0, 18 * 128 * 4)


def test_full_size_figures_in_the_readme() -> None:
    full = TransformerConfig.full()

    def gib(spec: str) -> float:
        return step_communication(full, TOKENS_768_120F, True, ParallelConfig.parse(spec), 2).total / GiB

    assert gib("ulysses=2") == pytest.approx(29.0, abs=0.05)
    assert gib("ulysses=8") == pytest.approx(12.7, abs=0.05)
    assert gib("ulysses=4,cfg=2") == pytest.approx(10.9, abs=0.05)
    assert gib("cfg=2") < 0.05  # CFG parallelism only gathers the output once per step


def test_speedup_estimate_grows_with_ranks_and_falls_with_slow_links() -> None:
    full = TransformerConfig.full()
    ranks = {spec: estimated_speedup(full, TOKENS_768_120F, True, ParallelConfig.parse(spec), 2)
             for spec in ("cfg=2", "ulysses=2,cfg=2", "ulysses=4,cfg=2", "ulysses=8,cfg=2")}  # fmt: skip
    values = list(ranks.values())
    assert values == sorted(values) and values[0] == pytest.approx(2.0, abs=0.01)
    assert all(v <= ParallelConfig.parse(s).world_size for s, v in ranks.items())
    slow = estimated_speedup(full, TOKENS_768_120F, True, ParallelConfig(ulysses=8), 2, PCIE_BYTES_PER_S)
    assert slow < estimated_speedup(full, TOKENS_768_120F, True, ParallelConfig(ulysses=8), 2)


def test_each_rank_plans_for_its_own_slice() -> None:
    full, vae, clip = TransformerConfig.full(), VAEConfig.full(), ClipSpec()
    base = {"height": 768, "width": 768, "frames": 120, "memory_mode": "full_gpu", "budget_bytes": 80 * GiB}
    serial = plan_memory(full, vae, clip, PlanRequest(**base))
    ranked = plan_memory(full, vae, clip, PlanRequest(**base, sequence_parallel=4, cfg_parallel=True))
    assert ranked.tokens == serial.tokens // 4
    assert ranked.denoise_breakdown["long skips"] == serial.denoise_breakdown["long skips"] // 8  # 1/4 tokens, 1 sample
    assert ranked.denoise_activation_bytes < serial.denoise_activation_bytes / 5
    assert ranked.denoise_breakdown["weights (non-block + resident blocks)"] == (
        serial.denoise_breakdown["weights (non-block + resident blocks)"]
    )  # every rank holds the whole model
    text = ranked.describe()
    assert "sequence parallel: 4 ranks" in text and "one sample on this rank" in text
    with pytest.raises(ValueError, match="cfg_parallel needs"):
        PlanRequest(**base, cfg=False, cfg_parallel=True).validate()


def test_bench_rows_carry_the_mode_and_the_communication() -> None:
    from ruyi_trt.tools.bench import BenchConfig
    from ruyi_trt.tools.report import BenchResults, Measurement, markdown

    row = Measurement("torch", "denoise", 768, 768, 120, "ok", times_s=[2.0], parallel="ulysses=8",
                      comm_bytes_per_step=step_communication(TransformerConfig.full(), TOKENS_768_120F, True,
                                                             ParallelConfig(ulysses=8), 2).total)  # fmt: skip
    environment = {"gpu": None, "torch": "x", "cuda": None, "cudnn": None, "ruyi_trt": "x", "git_commit": "x",
                   "python": "x", "platform": "x"}  # fmt: skip
    config = {"model": "full-random", "dtype": "bf16", "device": "cuda", "warmup": 1, "repeat": 1, "steps": 1}
    text = markdown(BenchResults(config=config, environment=environment, backends=[], peak=None, measurements=[row]))
    assert "| torch --parallel ulysses=8 | denoise | 768x768x120f |" in text
    assert "| 13,023.3 | ok |" in text  # 12.7 GiB per rank and step, in MiB
    assert row.to_dict()["comm_bytes_per_step"] == row.comm_bytes_per_step
    with pytest.raises(ValueError, match="torch backend only"):
        BenchConfig(backends=("torch", "ort"), parallel=ParallelConfig(ulysses=2)).validate()
