"""Driver-measured device memory (what TensorRT and ONNX Runtime allocate outside torch) and ONNX Runtime's CUDA
arena setting, on a real GPU. Skipped with the reason without one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ruyi_trt.runtime.memory.device_usage import device_peak

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


@pytest.fixture()
def cuda() -> torch.device:
    return torch.device("cuda")


def test_driver_peak_sees_memory_outside_torch(cuda: torch.device):
    """A cudaMalloc'd buffer torch does not track (here via the caching allocator's raw interface) is seen by the
    driver figure, and a torch tensor by both."""
    size = 512 * 2**20
    with device_peak(cuda) as peak:
        raw = torch.cuda.caching_allocator_alloc(size)
        torch.cuda.synchronize()
        torch.cuda.caching_allocator_delete(raw)
        tensor = torch.empty(size, dtype=torch.uint8, device=cuda)
        torch.cuda.synchronize()
        del tensor
    assert peak.result is not None and peak.result.driver_added_bytes >= size
    assert peak.result.driver_peak_bytes >= peak.result.driver_added_bytes


def test_ort_cuda_provider_uses_an_exact_size_arena(cuda: torch.device, tiny_dir: Path, tmp_path: Path):
    from ruyi_trt.export import export_checkpoint
    from ruyi_trt.runtime.backends.ort_backend import OrtGraph

    export_checkpoint(tiny_dir, tmp_path, components=["image-encoder"], progress=False)
    graph = OrtGraph(tmp_path / "image_encoder.onnx", cuda)
    if "CUDAExecutionProvider" not in graph.session.get_providers():
        pytest.skip(f"onnxruntime has no CUDA provider here ({graph.session.get_providers()})")
    options = graph.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    with device_peak(cuda) as peak:
        out = graph.run(pixel_values=torch.randn(1, 3, 56, 56, device=cuda))[0]
    assert out.is_cuda and peak.result is not None
