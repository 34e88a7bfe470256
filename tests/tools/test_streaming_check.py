"""The GPU streaming check's CPU-side parts: arguments, the case list, the report, the no-GPU exit, and one case
over the tiny pipeline on the CPU with torch.cuda's bookkeeping stubbed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ruyi_trt.tools import streaming_check
from ruyi_trt.tools.streaming_check import Case, build_cases, parse_args, to_markdown


def test_arguments_and_defaults(tmp_path: Path) -> None:
    args = parse_args(["--out", str(tmp_path)])
    assert args.out == tmp_path and args.sizes == [(768, 768), (576, 1008)] and args.frames == 120
    assert args.budgets == [24.0, 12.0]
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--frames", "12"])
    with pytest.raises(SystemExit):
        parse_args([])


def test_cases_start_unconstrained_per_size() -> None:
    cases = build_cases([(768, 768), (576, 1008)], 120, [12.0, 24.0])
    assert [c.budget_gib for c in cases] == [None, 24.0, 12.0] * 2
    assert cases[1].name == "768x768 x 120f, 24 GiB" and cases[3].name == "576x1008 x 120f, unconstrained"


def test_markdown_report_lists_every_case_with_the_step_ratio() -> None:
    meta = {"gpu": "test", "total_gib": 140.0, "torch": torch.__version__}
    stages = {name: {"predicted_gib": 10.0, "measured_gib": 9.5} for name in ("vae encode", "clip", "denoise", "vae decode")}
    settings = {"fp8": "none", "resident_blocks": 40, "skip_offload_group": 0, "cfg_split": False, "vae_tile": None}
    records = [
        {"case": Case(768, 768, 120, None).name, "height": 768, "width": 768, "budget_gib": None, "status": "ok",
         "plan": "Memory plan ...", "settings": settings, "stages": stages, "step_s": 4.0, "predicted_step_ratio": 1.0},
        {"case": Case(768, 768, 120, 24.0).name, "height": 768, "width": 768, "budget_gib": 24.0, "status": "ok",
         "settings": settings, "stages": stages, "step_s": 4.4, "predicted_step_ratio": 1.03},
        {"case": Case(768, 768, 120, 12.0).name, "height": 768, "width": 768, "budget_gib": 12.0, "status": "oom",
         "error": "CUDA out of memory"},
    ]  # fmt: skip
    text = to_markdown(meta, records)
    assert "| 768x768 x 120f, 24 GiB | none / 40 / 0 / False / None | 10.00 / 9.50 |" in text
    assert "| 4.40 | 1.100 (1.030) | ok |" in text
    assert "oom: CUDA out of memory" in text and "Memory plan ..." in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_exits_cleanly_without_a_gpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert streaming_check.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA GPU" in caplog.text
    assert not (tmp_path / "out").exists()


def stub_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    for name in ("set_per_process_memory_fraction", "empty_cache", "synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 2**30)


def test_one_case_measures_every_stage(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path) -> None:
    """run_case over the tiny pipeline on the CPU: plan -> load -> four stages -> timed step."""
    from ruyi_trt.models.checkpoint import Checkpoint
    from ruyi_trt.runtime.memory.model import ClipSpec
    from ruyi_trt.runtime.memory.plan import PlanRequest, plan_memory
    from ruyi_trt.runtime.pipeline import load_pipeline

    stub_cuda(monkeypatch)
    request = PlanRequest(64, 96, 8, budget_bytes=2**30, host_ram_bytes=64 * 2**30)
    tiny = Checkpoint.resolve(tiny_dir)
    tiny_plan = plan_memory(tiny.transformer, tiny.vae, ClipSpec.from_config(tiny.image_encoder), request)
    monkeypatch.setattr(streaming_check, "plan_case", lambda case, options: tiny_plan)
    monkeypatch.setattr(streaming_check, "load_case", lambda options, plan: load_pipeline(tiny))
    record = streaming_check.run_case(Case(64, 96, 8, 1.0), 80 * 2**30, steps_timed=1)
    assert record["status"] == "ok", record
    assert set(record["stages"]) == {"vae encode", "clip", "denoise", "vae decode"}
    assert all(v["measured_gib"] == 1.0 and v["predicted_gib"] > 0 for v in record["stages"].values())
    assert record["step_s"] > 0

    def failing(*args, **kwargs):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    monkeypatch.setattr(streaming_check, "load_case", failing)
    record = streaming_check.run_case(Case(64, 96, 8, 1.0), 80 * 2**30, steps_timed=1)
    assert record["status"] == "oom" and "ALLOC_FAILED" in record["error"]
