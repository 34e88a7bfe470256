"""The GPU streaming check's CPU-side parts: arguments, the case list, the report and the no-GPU exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ruyi_trt.tools import streaming_check
from ruyi_trt.tools.streaming_check import Case, build_cases, parse_args, to_markdown


def test_arguments_and_defaults(tmp_path: Path) -> None:
    args = parse_args(["--out", str(tmp_path)])
    assert args.out == tmp_path and args.resolutions == [768, 512] and args.frames == 120 and args.cap_gib == 24.0
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--frames", "12"])
    with pytest.raises(SystemExit):
        parse_args([])


def test_cases_are_16_9_buckets_smallest_first() -> None:
    unconstrained, capped = build_cases([768, 512], 120, 24.0)
    assert [c.resolution for c in unconstrained] == [512, 768] and all(c.cap_gib is None for c in unconstrained)
    assert [c.cap_gib for c in capped] == [24.0, 24.0]
    assert [c.size() for c in capped] == [(384, 672), (576, 1008)]
    assert capped[1].name == "768px x 120f, cap 24 GiB"


def test_markdown_report_lists_every_case() -> None:
    meta = {"gpu": "test", "total_gib": 80.0, "torch": torch.__version__}
    records = [
        {"case": Case(512, 120, 24.0).name, "height": 384, "width": 672, "status": "ok", "plan": "Memory plan ...",
         "settings": {"resident_blocks": 40, "skip_offload_group": 0, "cfg_split": False},
         "predicted_peak_gib": 20.0, "measured_peak_gib": 19.0, "step_s": 3.0},
        {"case": Case(768, 120, 24.0).name, "height": 576, "width": 1008, "status": "oom", "error": "CUDA out of memory"},
    ]  # fmt: skip
    text = to_markdown(meta, records)
    assert "| 512px x 120f, cap 24 GiB | 384x672 | 40 / 0 / False | 20.00 | 19.00 | 3.00 | ok |" in text
    assert "oom: CUDA out of memory" in text and "Memory plan ..." in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_exits_cleanly_without_a_gpu(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert streaming_check.main(["--out", str(tmp_path / "out")]) == 0
    assert "no CUDA GPU" in caplog.text
    assert not (tmp_path / "out").exists()


def test_one_case_runs_with_the_cuda_calls_stubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The measuring loop on the tiny model on the CPU, torch.cuda's bookkeeping calls replaced by stubs."""
    from types import SimpleNamespace

    from ruyi_trt.models.presets import tiny_transformer

    for name in ("set_per_process_memory_fraction", "empty_cache", "synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 2**30)
    model = tiny_transformer().to(torch.bfloat16)
    record = streaming_check.run_case(Case(512, 8, 24.0), model, torch.device("cpu"), 80 * 2**30)
    assert record["status"] == "ok", record
    assert record["latent"] == [2, 48, 84] and record["measured_peak_gib"] == 1.0
    assert record["step_s"] > 0 and record["settings"]["resident_blocks"] == 4


def test_a_cuda_runtime_error_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuBLAS/cuDNN failures (some of them out-of-memory) come as RuntimeError: the case records it and the check
    goes on to write its results."""

    from ruyi_trt.models.presets import tiny_transformer
    from ruyi_trt.runtime.backends import block_runner

    for name in ("set_per_process_memory_fraction", "empty_cache", "synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 2**30)

    def failing(message: str):
        def runner(*args, **kwargs):
            raise RuntimeError(message)

        return runner

    model = tiny_transformer().to(torch.bfloat16)
    monkeypatch.setattr(block_runner, "BlockRunner", failing("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    record = streaming_check.run_case(Case(512, 8, 24.0), model, torch.device("cpu"), 80 * 2**30)
    assert record["status"] == "oom" and "ALLOC_FAILED" in record["error"]
    monkeypatch.setattr(block_runner, "BlockRunner", failing("CUDA error: an illegal memory access was encountered"))
    record = streaming_check.run_case(Case(512, 8, 24.0), model, torch.device("cpu"), 80 * 2**30)
    assert record["status"] == "error" and "illegal memory access" in record["error"]
