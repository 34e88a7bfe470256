"""The ONNX Runtime backend on the tiny checkpoint (CPU, float32): the whole pipeline against the torch backend,
the VAE chunk loops (odd counts, context chunks) against RuyiVAE, and option checks.

Tolerances: the video matches the torch backend's at PSNR >= 40 dB (pixel range [0, 1]); VAE moments and
decoded frames match RuyiVAE within max abs err <= 1e-4 x max(1, max |expected|).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from ruyi_trt.models.vae import RuyiVAE
from ruyi_trt.runtime.backends.ort_backend import ort_components
from ruyi_trt.runtime.loading import RuntimeOptions
from ruyi_trt.runtime.pipeline import load_pipeline
from ruyi_trt.runtime.request import VideoRequest
from ruyi_trt.testing import assert_close_scaled, gradient_image


@pytest.fixture(scope="module")
def ort_parts(tiny_dir: Path):
    return ort_components(tiny_dir, progress=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def test_pipeline_ort_matches_torch(tiny_dir: Path) -> None:
    """Same request on both backends: same shape, PSNR >= 40 dB (fp32; measured about 118 dB)."""
    request = VideoRequest(start_images=[gradient_image(144, 96)], frames=16, size=(64, 96), steps=2, seed=3)
    reference, _ = load_pipeline(tiny_dir).run(request, progress=False)
    video, stats = load_pipeline(tiny_dir, RuntimeOptions(backend="ort")).run(request, progress=False)
    assert video.shape == reference.shape == (1, 3, 16, 64, 96)
    assert psnr(video, reference) >= 40.0
    assert set(stats.seconds) >= {"vae_encode", "image_encoder", "denoise", "vae_decode"}


@pytest.mark.parametrize("frames", [9, 17])
def test_vae_encoder_chunks_match_ruyi_vae(tiny_dir: Path, ort_parts, frames: int) -> None:
    """Odd frame counts: a lone first frame, then full and partial chunks; moments equal (mean | logvar)."""
    vae = RuyiVAE.from_pretrained(tiny_dir / "vae")
    video = torch.rand(1, 3, frames, 48, 80, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(video)
    moments = ort_parts.vae_encoder(video=video)
    mean, logvar = moments.chunk(2, dim=1)
    assert_close_scaled(mean, posterior.mean, name="mean")
    assert_close_scaled(logvar.clamp(-30.0, 20.0), posterior.logvar, name="logvar")


@pytest.mark.parametrize("latent_frames", [3, 6])
def test_vae_decoder_chunks_match_ruyi_vae(tiny_dir: Path, ort_parts, latent_frames: int) -> None:
    """3 latents: the one-frame chunk then a chunk without context; 6: chunks with before/after context."""
    vae = RuyiVAE.from_pretrained(tiny_dir / "vae")
    latents = torch.randn(1, 16, latent_frames, 6, 10, generator=torch.Generator().manual_seed(latent_frames))
    with torch.no_grad():
        expected = vae.decode(latents)
    assert_close_scaled(ort_parts.vae_decoder(latents=latents), expected, name="decoded")


def test_denoiser_rejects_a_single_latent_frame(ort_parts) -> None:
    with pytest.raises(ValueError, match="backend torch"):
        ort_parts.denoiser(hidden_states=torch.zeros(1, 16, 1, 8, 8), image_rotary_emb=(torch.zeros(16, 16),) * 2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (RuntimeOptions(backend="ort", fp8="lite"), "fp8"),
        (RuntimeOptions(backend="ort", teacache_threshold=0.1), "teacache"),
        (RuntimeOptions(backend="ort", memory_mode="low_gpu"), "memory_mode"),
        (RuntimeOptions(backend="ort", dtype="bf16"), "bf16"),
    ],
)
def test_torch_only_options_are_rejected(options: RuntimeOptions, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        options.validate()


def test_cuda_device_without_a_cuda_provider_runs_on_host_copies(tmp_path: Path) -> None:
    """A CPU-only onnxruntime (as on a bare GPU image) cannot bind device memory: no IO binding then."""
    import onnx
    from onnx import TensorProto, helper

    from ruyi_trt.runtime.backends.ort_backend import OrtGraph

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    on_cuda = OrtGraph(path, torch.device("cuda"), providers=["CPUExecutionProvider"])
    assert not on_cuda.bound
    on_cpu = OrtGraph(path, torch.device("cpu"))
    assert not on_cpu.bound
    torch.testing.assert_close(on_cpu.run(x=torch.tensor([1.0, 2.0]))[0], torch.tensor([2.0, 4.0]))


def test_provider_choices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CUDA EP with an exact-size arena; the TensorRT EP only with a profile and an engine cache folder."""
    import ctypes.util

    import onnxruntime as ort

    from ruyi_trt.runtime.backends.ort_backend import default_providers, tensorrt_provider_options

    assert default_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])  # fmt: skip
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libnvinfer.so.10")
    cuda = torch.device("cuda:1")
    plain = default_providers(cuda)
    assert plain == [("CUDAExecutionProvider", {"device_id": 1, "arena_extend_strategy": "kSameAsRequested"}),
                     "CPUExecutionProvider"]  # fmt: skip
    assert default_providers(cuda, trt_profile={"x": ((1, 2), (1, 4), (2, 8))}) == plain  # no cache folder: no TRT EP
    profile = {"x": ((1, 2), (1, 4), (2, 8)), "y": ((3,), (3,), (3,))}
    name, options = default_providers(cuda, profile, tmp_path, fp16=True)[0]
    assert name == "TensorrtExecutionProvider" and options == tensorrt_provider_options(1, profile, tmp_path, True)
    assert options["trt_profile_min_shapes"] == "x:1x2,y:3" and options["trt_profile_max_shapes"] == "x:2x8,y:3"
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)


def test_onnxruntime_minimum_version() -> None:
    from ruyi_trt.runtime.backends.ort_backend import check_onnxruntime_version

    check_onnxruntime_version("1.26.0")
    check_onnxruntime_version("1.31.1+cu130")
    with pytest.raises(ImportError, match="onnxruntime-gpu>=1.26"):
        check_onnxruntime_version("1.25.1")
