"""Calibration (ModelOpt, CPU) of the tiny transformer: the scales file and record, and the Q/DQ graphs made from
them: standard ONNX only, TensorRT-ready, and run by ONNX Runtime within a stated distance of the fp32 graph."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ruyi_trt.calib.scales import FORMAT, LayerScales, Scales, ScalesError, read_scales, write_scales
from ruyi_trt.calib.store import load_calibration
from ruyi_trt.cli import main
from ruyi_trt.models.checkpoint import Checkpoint

pytest.importorskip("modelopt")
onnx = pytest.importorskip("onnx")

TINY_LAYERS = 4 * 11 + 1  # 11 recipe layers per block, skip_linear in the one long-skip block


def test_scales_file_round_trip_and_refusals(tmp_path: Path):
    layers = {"blocks.0.attn1.to_q": LayerScales(torch.tensor(0.5), torch.rand(8) + 0.1, torch.rand(4) + 0.5)}
    path = write_scales(tmp_path / "scales.safetensors", Scales("int8", layers, "sha256:abc", 0.5))
    back = read_scales(path, "sha256:abc")
    assert back.precision == "int8" and back.smoothquant_alpha == 0.5 and back.qmax == 127.0
    torch.testing.assert_close(back.layers["blocks.0.attn1.to_q"].smooth, layers["blocks.0.attn1.to_q"].smooth)
    with pytest.raises(ScalesError, match="another checkpoint"):
        read_scales(path, "sha256:other")
    (tmp_path / "bad.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ScalesError, match="re-run ruyi-trt calibrate"):
        read_scales(tmp_path / "bad.safetensors")


def test_calibration_folders(tiny_calibrations: dict[str, Path]):
    checkpoint = Checkpoint.resolve("tiny")
    for precision, folder in tiny_calibrations.items():
        scales, record = load_calibration(folder, precision, checkpoint.weights_hash("transformer"))
        assert record["checkpoint_hash"] == checkpoint.weights_hash("transformer")
        assert record["versions"]["nvidia_modelopt"] == "0.47.0" and record["versions"]["torch"]
        assert record["settings"]["steps"] == 2 and len(record["requests"]) == 2
        assert len(scales.layers) == TINY_LAYERS and read_scales(folder / "scales.safetensors").extra == {}
        layer = scales.layers["blocks.0.attn1.to_q"]
        assert layer.input_scale.ndim == 0 and float(layer.input_scale) > 0
        assert layer.weight_scale.shape == (32,)  # per output channel (both precisions)
        if precision == "int8":  # SmoothQuant: a smoothing vector per input channel
            assert layer.smooth.shape == (32,) and bool((layer.smooth > 0).all())
        else:
            assert layer.smooth is None
        assert not any(".to_k" in name for name in scales.layers if ".attn2." in name)  # text K/V stay unquantized
        with pytest.raises(ScalesError, match="calibration, this run needs"):
            load_calibration(folder, "fp8" if precision == "int8" else "int8", checkpoint.weights_hash("transformer"))


def test_calibrate_command(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "calib"
    result = CliRunner().invoke(main, ["calibrate", "--model", "tiny", "--precision", "fp8", "--out", str(out), "--size",
                                       "64x64", "--steps", "1", "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "calibration.json").read_text())
    assert record["precision"] == "fp8" and record["layers"] == TINY_LAYERS and record["model"] == "tiny"
    assert read_scales(out / "scales.safetensors").metadata()["format"] == FORMAT
    bad = CliRunner().invoke(main, ["calibrate", "--model", "tiny", "--precision", "int8", "--out", str(tmp_path / "x"),
                                    "--resolution", "640"])  # fmt: skip
    assert bad.exit_code != 0 and "512, 768" in bad.output and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def qdq_graphs(exported_dir: Path, tiny_calibrations: dict[str, Path]) -> dict[str, Path]:
    from ruyi_trt.export.manifest import graph_path, read_manifest
    from ruyi_trt.runtime.backends.ort_backend import quantized_transformer

    source = graph_path(exported_dir, read_manifest(exported_dir), "transformer")
    checkpoint = Checkpoint.resolve("tiny")
    return {p: quantized_transformer(checkpoint, source, p, folder) for p, folder in tiny_calibrations.items()} | {
        "fp32": source}


def test_qdq_graphs_are_standard_onnx_and_tensorrt_ready(qdq_graphs: dict[str, Path]):
    from ruyi_trt.export.readiness import check_tensorrt_ready

    for precision in ("int8", "fp8"):
        model = onnx.load(str(qdq_graphs[precision]))
        assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
        assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
        kinds = [n.op_type for n in model.graph.node]
        assert kinds.count("QuantizeLinear") == TINY_LAYERS and kinds.count("DequantizeLinear") == 2 * TINY_LAYERS
        zero = next(i for i in model.graph.initializer if i.name == "blocks.0.attn1.to_q.qdq.input_zero")
        expected = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
        assert zero.data_type == expected
        weight = next(i for i in model.graph.initializer if i.name == "blocks.0.attn1.to_q.qdq.weight_q")
        assert weight.data_type == expected  # the float weight is gone, the quantized one is stored
        smooth = [n for n in model.graph.node if n.name.endswith("/Smooth")]
        assert len(smooth) == (TINY_LAYERS if precision == "int8" else 0)
        assert check_tensorrt_ready(qdq_graphs[precision]) == []


# ORT CPU, float32 activations, tiny random model, inputs unlike the calibration's (random latents at another size):
# int8 SmoothQuant and fp8 E4M3 (Q/DQ in float, fusion off) within cosine 0.995 of the fp32 graph's output, and within
# 15% (int8) / 10% (fp8) of its max |out| at the worst element (measured: 0.998 / 9% and 0.9988 / 5%).
@pytest.mark.parametrize("precision, min_cosine, max_rel", [("int8", 0.995, 0.15), ("fp8", 0.995, 0.10)])
def test_ort_runs_qdq_graphs_close_to_fp32(qdq_graphs: dict[str, Path], precision: str, min_cosine: float, max_rel: float):
    from ruyi_trt.export.qdq import qdq_session_config
    from ruyi_trt.runtime.backends.ort_backend import OrtGraph
    from ruyi_trt.tools.bench_models import Shape, denoiser_inputs

    checkpoint = Checkpoint.resolve("tiny")
    inputs = denoiser_inputs(checkpoint.transformer, checkpoint.vae, Shape(64, 96, 16), checkpoint.clip_geometry[1:],
                             torch.device("cpu"), torch.float32)  # fmt: skip
    cos, sin = inputs.pop("image_rotary_emb")
    feeds = {**inputs, "rope_cos": cos, "rope_sin": sin}
    expected = OrtGraph(qdq_graphs["fp32"], torch.device("cpu")).run(**feeds)[0]
    config = qdq_session_config(precision, "cpu")
    actual = OrtGraph(qdq_graphs[precision], torch.device("cpu"), config=config).run(**feeds)[0]
    cosine = torch.nn.functional.cosine_similarity(actual.flatten().double(), expected.flatten().double(), dim=0)
    assert cosine >= min_cosine
    assert (actual - expected).abs().max() <= max_rel * expected.abs().max()


def test_ort_int8_and_fp8_backends_run_the_pipeline(tiny_calibrations: dict[str, Path], exported_dir: Path):
    from ruyi_trt.runtime.pipeline import RuyiPipeline
    from ruyi_trt.testing import gradient_image

    for backend in ("ort-int8", "ort-fp8"):  # the cached calibration is found without naming it
        pipe = RuyiPipeline.from_pretrained("tiny", backend=backend, device="cpu")
        video = pipe(gradient_image(64, 64), frames=8, size=(64, 64), steps=2, progress=False)
        assert video.frames.shape == (8, 64, 64, 3)
        pipe.unload()


def test_quantized_build_inputs_without_tensorrt(tiny_calibrations: dict[str, Path], exported_dir: Path):
    from ruyi_trt.engine.quantized import quantized_transformer
    from ruyi_trt.engine.settings import BuildSettings

    for precision in ("int8", "fp8"):
        settings = BuildSettings.from_strings("tiny", precision, "64x64", "8:16:16").resolved(0, (10, 15))
        assert settings.export_settings().dtype == "fp16" and not settings.per_block
        graph = quantized_transformer(settings, Checkpoint.resolve("tiny"), progress=False)
        assert graph.problems == [] and graph.calibration == tiny_calibrations[precision]
        [(_, profile)] = graph.profiles  # one size: one engine
        low, _, high = profile["hidden_states"]
        assert low[0] == 1 and high[0] == 2 and high[2] == 4  # batch 1..2, 16 frames = 4 latent frames
        model = onnx.load(str(graph.path), load_external_data=False)
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)  # fp16 elsewhere


def test_int8_runs_unfused_on_x86_cpus_without_vnni():
    from ruyi_trt.export.qdq import UNFUSED_QDQ, cpu_int8_exact, qdq_session_config, this_cpu_int8_exact

    avx2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
    assert not cpu_int8_exact("x86_64", avx2) and not cpu_int8_exact("x86_64", "")
    assert cpu_int8_exact("x86_64", avx2.replace("avx2", "avx2 avx512f avx512_vnni")) and cpu_int8_exact("aarch64", "")
    assert qdq_session_config("fp8", "cpu") == qdq_session_config("fp8", "cuda") == UNFUSED_QDQ
    assert qdq_session_config("int8", "cuda") is None
    assert qdq_session_config("int8", "cpu") == (None if this_cpu_int8_exact() else UNFUSED_QDQ)


# The Q/DQ graph computes what ModelOpt's fake-quantized torch model computes (float32, CPU): fp8 to 1e-5 of max
# |out|; int8 to 1e-2 (ModelOpt clamps to [-127, 127] and rounds in torch, ONNX saturates to [-128, 127]), in the
# session qdq_session_config gives (fused int8 kernels on VNNI CPUs; unfused elsewhere: 3e-7 on an AVX2-only EPYC).
@pytest.mark.parametrize("precision, max_rel", [("fp8", 1e-5), ("int8", 1e-2)])
def test_qdq_graph_equals_modelopt_fake_quantization(exported_dir: Path, precision: str, max_rel: float, tmp_path: Path):
    from ruyi_trt.calib.quantize import calibrate_module
    from ruyi_trt.export.manifest import graph_path, read_manifest
    from ruyi_trt.export.qdq import insert_qdq, qdq_session_config
    from ruyi_trt.runtime.backends.ort_backend import OrtGraph
    from ruyi_trt.tools.bench_models import Shape, denoiser_inputs

    checkpoint = Checkpoint.resolve("tiny")
    model = checkpoint.load_transformer(torch.float32)
    inputs = denoiser_inputs(checkpoint.transformer, checkpoint.vae, Shape(64, 64, 8), checkpoint.clip_geometry[1:],
                             torch.device("cpu"), torch.float32)  # fmt: skip
    scales = calibrate_module(model, lambda m: m(**inputs), precision, "sha256:test")
    with torch.no_grad():
        fake = model(**inputs)[0]
    graph = onnx.load(str(graph_path(exported_dir, read_manifest(exported_dir), "transformer")))
    insert_qdq(graph, scales.layers, precision)
    onnx.save_model(graph, str(tmp_path / "q.onnx"))
    cos, sin = inputs.pop("image_rotary_emb")
    config = qdq_session_config(precision, "cpu")
    out = OrtGraph(tmp_path / "q.onnx", torch.device("cpu"), config=config).run(**inputs, rope_cos=cos, rope_sin=sin)[0]
    assert (out - fake).abs().max() <= max_rel * fake.abs().max()
