"""Engine memory arithmetic, the shared scratch buffer, the fused-attention check on inspector output and the
process-wide TensorRT logger, all without TensorRT or a GPU (pure functions and a stand-in `trt` module)."""

from __future__ import annotations

import enum
import logging
import threading
import types

import pytest
import torch

from ruyi_trt.engine.attention import unfused_attention
from ruyi_trt.engine.device_memory import (
    STREAMING_RESERVE_BYTES,
    EngineFigures,
    ScratchMemory,
    engine_device_bytes,
    weight_streaming_budget,
)
from ruyi_trt.engine.trt_api import process_logger

GiB = 2**30


def test_streaming_budget_from_engine_figures():
    """14.4 GB whole transformer on a 24 GiB card: free memory pays the resident weights, the context and what
    the stage still needs first; the rest of the streamable weights stays on the device."""
    figures = EngineFigures(weight_bytes=int(14.4e9), streamable_bytes=int(13.9e9), context_bytes=3 * GiB)
    assert figures.resident_weight_bytes == int(0.5e9)
    free = 16 * GiB  # after the other resident engines and tensors
    budget = weight_streaming_budget(free, figures, keep_free_bytes=2 * GiB)
    assert budget == free - 2 * GiB - STREAMING_RESERVE_BYTES - int(0.5e9) - 3 * GiB
    assert weight_streaming_budget(80 * GiB, figures) == figures.streamable_bytes  # all of it fits: no streaming
    assert weight_streaming_budget(2 * GiB, figures, keep_free_bytes=2 * GiB) == 0  # stream every weight
    assert engine_device_bytes(figures, budget) == figures.resident_weight_bytes + budget
    assert engine_device_bytes(figures, None) == figures.weight_bytes


def test_streaming_budget_ignores_engines_without_streamable_weights():
    figures = EngineFigures(weight_bytes=600 * 2**20, streamable_bytes=0, context_bytes=GiB)
    assert weight_streaming_budget(10 * GiB, figures) == 0
    assert engine_device_bytes(figures, 0) == figures.weight_bytes


def test_scratch_grows_and_counts_generations():
    scratch = ScratchMemory("cpu")
    assert scratch.address(0) == 0 and scratch.generation == 0
    first = scratch.address(1000)
    assert scratch.size == 1024 and scratch.generation == 1
    assert scratch.address(512) == first and scratch.generation == 1  # smaller requests reuse the buffer
    scratch.address(5000)
    assert scratch.size == 5120 and scratch.generation == 2  # a captured CUDA graph of generation 1 is stale now
    scratch.release()
    assert scratch.size == 0 and scratch.generation == 3


def _layer(name: str, outputs: list[list[int]]) -> dict:
    return {"Name": name, "LayerType": "x", "Outputs": [{"Name": f"{name}_out{i}", "Dimensions": d} for i, d in enumerate(outputs)]}


def test_unfused_attention_finds_materialized_scores():
    scores = {"attn1": (2, 16, 4096, 4096), "attn2": (2, 16, 4096, 333)}
    fused = {"Layers": [_layer("qkv", [[2, 4096, 8448]]), _layer("fmha attn1", [[2, 16, 4096, 176]]),
                        _layer("fmha attn2", [[2, 16, 4096, 176]])]}  # fmt: skip
    assert unfused_attention(fused, scores) == []
    split = {"Layers": [*fused["Layers"], _layer("bmm1", [[32, 4096, 333]]), _layer("softmax", [[32, 4096, 333]])]}
    assert unfused_attention(split, scores) == ["attn2"]  # the [B*H, Sq, Skv] scores of attn2 are written
    with pytest.raises(ValueError, match="DETAILED"):
        unfused_attention({"Layers": ["a layer name only"]}, scores)


class _Severity(enum.Enum):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


def _fake_trt() -> types.SimpleNamespace:
    class ILogger:
        Severity = _Severity

        def __init__(self) -> None:
            pass

    return types.SimpleNamespace(ILogger=ILogger)


def test_process_logger_is_one_per_process_and_attributes_messages(caplog: pytest.LogCaptureFixture):
    trt = _fake_trt()
    logger = process_logger(trt)
    assert process_logger(trt) is logger  # TensorRT keeps the first logger: every engine must share it
    with caplog.at_level(logging.DEBUG, logger="ruyi_trt.engine.trt_api"):
        with logger.capture("transformer") as outer:
            logger.logger.log(_Severity.ERROR, "no fused kernel")
            with logger.capture("refit") as inner:
                logger.logger.log(_Severity.WARNING, "missing weights")
                logger.logger.log(_Severity.VERBOSE, "details")  # dropped: capture not verbose
            worker = threading.Thread(target=logger.logger.log, args=(_Severity.INFO, "from a builder thread"))
            worker.start()
            worker.join()
        logger.logger.log(_Severity.ERROR, "after every capture")
    assert outer == ["[ERROR] no fused kernel", "[WARNING] missing weights", "[INFO] from a builder thread"]
    assert inner == ["[WARNING] missing weights"]
    assert "TensorRT (refit): missing weights" in caplog.text and "TensorRT (tensorrt): after every capture" in caplog.text


def test_device_memory_figures_are_none_off_cuda():
    from ruyi_trt.runtime.memory.device_usage import device_peak

    with device_peak("cpu") as peak:
        torch.ones(10)
    assert peak.result is None
