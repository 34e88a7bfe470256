"""ONNX export of the tiny checkpoint: validity, parity with PyTorch at untraced shapes, per-block chaining,
fp32 islands in half-precision graphs, caching, clean failures, the dynamo exporter and the CLI.

Parity tolerance (float32 graphs, ONNX Runtime CPU): max |ort - torch| <= 1e-4 x max(1, max |torch|).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

from ruyi_trt.cli import main
from ruyi_trt.export import (
    ExportSettings,
    VideoShape,
    check_tensorrt_ready,
    export_checkpoint,
    video_shapes,
)
from ruyi_trt.export.manifest import read_manifest
from ruyi_trt.export.onnx_export import reference_graph
from ruyi_trt.export.specs import transformer_spec, vae_decoder_specs
from ruyi_trt.models.checkpoint_io import CheckpointError
from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.models.vae_config import VAEConfig
from ruyi_trt.runtime.backends.ort_backend import OrtGraph
from ruyi_trt.testing import assert_close_scaled

CPU = torch.device("cpu")
ALL_GRAPHS = ("transformer", "vae_encoder", "vae_decoder", "vae_decoder_one_frame", "image_encoder")
GRAPH_COMPONENT = {"transformer": "transformer", "vae_encoder": "vae-encoder", "vae_decoder": "vae-decoder",
                   "vae_decoder_one_frame": "vae-decoder", "image_encoder": "image-encoder"}  # fmt: skip
# Two shapes per graph, both unlike the traced one: another frame count and another aspect ratio.
TEST_DIMS = {
    "transformer": [
        {"batch": 1, "latent_frames": 2, "grid_height": 4, "grid_width": 6},  # fewer frames, landscape
        {"batch": 2, "latent_frames": 5, "grid_height": 6, "grid_width": 3},  # more frames, portrait
    ],
    "vae_encoder": [
        {"batch": 1, "chunk_frames": 1, "height": 48, "width": 80},  # the lone first frame of an odd count
        {"batch": 1, "chunk_frames": 8, "height": 64, "width": 32},
    ],
    "vae_decoder": [
        {
            "batch": 1,
            "chunk_latents": 2,
            "context_before": 0,
            "context_after": 2,
            "latent_height": 6,
            "latent_width": 10,
        },
        {
            "batch": 1,
            "chunk_latents": 2,
            "context_before": 2,
            "context_after": 0,
            "latent_height": 8,
            "latent_width": 4,
        },
    ],
    "vae_decoder_one_frame": [
        {"batch": 1, "latent_height": 6, "latent_width": 10},
        {"batch": 2, "latent_height": 8, "latent_width": 4},
    ],
    "image_encoder": [{"batch": 1}, {"batch": 3}],
}


def _with_grid(dims: dict) -> dict:
    if "grid_height" not in dims:
        return dims
    h, w = dims["grid_height"], dims["grid_width"]
    return {**dims, "latent_height": 2 * h, "latent_width": 2 * w, "tokens_per_frame": h * w}


def _reference(module: torch.nn.Module, name: str, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        if name == "vae_decoder":  # what RuyiVAE.decode passes: None instead of a 0-frame context
            before, after = inputs["context_before"], inputs["context_after"]
            return module.vae.decode_chunk(inputs["latents"], before if before.shape[2] else None,
                                           after if after.shape[2] else None)  # fmt: skip
        return module(*inputs.values())


def test_manifest_lists_every_graph(exported_dir: Path) -> None:
    manifest = read_manifest(exported_dir)
    graphs = {g: entry for c in manifest["components"].values() for g, entry in c["graphs"].items()}
    assert set(graphs) == set(ALL_GRAPHS)
    entry = manifest["components"]["transformer"]
    assert entry["checkpoint_hash"].startswith("sha256:")
    assert entry["settings"] == {"dtype": "fp32", "opset": 18, "per_block": False, "exporter": "torchscript",
                                 "attention": "decomposed"}  # fmt: skip
    assert entry["seconds"] > 0 and entry["peak_host_rss_bytes"] > 0
    assert {"torch", "onnx", "onnx_graphsurgeon", "ruyi_trt"} <= set(entry["versions"])
    hidden = next(t for t in graphs["transformer"]["inputs"] if t["name"] == "hidden_states")
    assert hidden == {"name": "hidden_states", "shape": ["batch", 16, "latent_frames", "latent_height", "latent_width"],
                      "dtype": "float32"}  # fmt: skip
    assert graphs["vae_decoder"]["dim_bounds"]["context_before"] == [0, 2]


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_graph_is_valid_and_tensorrt_ready(exported_dir: Path, name: str) -> None:
    path = exported_dir / f"{name}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    assert check_tensorrt_ready(path) == []
    model = onnx.load(str(path))
    spec_inputs = read_manifest(exported_dir)["components"][GRAPH_COMPONENT[name]]["graphs"][name]["inputs"]
    for value, spec in zip(model.graph.input, spec_inputs, strict=True):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert (value.name, dims) == (spec["name"], spec["shape"])


@pytest.mark.parametrize("name", ALL_GRAPHS)
def test_ort_matches_torch_at_untraced_shapes(tiny_dir: Path, exported_dir: Path, name: str) -> None:
    """fp32: ORT CPU vs the PyTorch wrapper at two shapes unlike the traced one; max abs err <= 1e-4 x scale.
    The transformer graph is the one stitched from the per-block graphs."""
    spec, module = reference_graph(tiny_dir, name)
    session = OrtGraph(exported_dir / f"{name}.onnx", CPU)
    for seed, dims in enumerate(TEST_DIMS[name]):
        dims = _with_grid(dims)
        assert any(dims[k] != v for k, v in spec.trace_dims.items())
        inputs = spec.sample_inputs(dims, seed=seed + 1)
        assert_close_scaled(session.run(**inputs)[0], _reference(module, name, inputs), name=f"{name} {dims}")


def test_per_block_graphs_chain_to_the_whole_model(tiny_dir: Path, per_block_dir: Path) -> None:
    """embed -> blocks (weights fed per block index, long skips wired as in run_blocks) -> unembed reproduces the
    PyTorch transformer at an untraced shape; fp32, max abs err <= 1e-4 x scale."""
    names = ["transformer_block_plain", "transformer_block_skip", "transformer_embed", "transformer_unembed"]
    assert sorted(p.stem for p in per_block_dir.glob("*.onnx")) == names
    spec, whole = reference_graph(tiny_dir, "transformer")
    model, config = whole.model, whole.model.config
    inputs = spec.sample_inputs(_with_grid({"batch": 2, "latent_frames": 4, "grid_height": 3, "grid_width": 5}), seed=7)
    graph = {
        name: OrtGraph(per_block_dir / f"transformer_{name}.onnx", CPU)
        for name in ("embed", "block_plain", "block_skip", "unembed")
    }
    grid, temb, text_states, clip_states = graph["embed"].run(**inputs)
    tokens = grid.flatten(2, 3)  # the block graphs take [B, T, S, D]
    shared = {"temb": temb, "text_states": text_states, "clip_states": clip_states,
              "rope_cos": inputs["rope_cos"], "rope_sin": inputs["rope_sin"]}  # fmt: skip
    kept: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        weights = block.state_dict()
        if i in config.skip_sources:
            tokens = graph["block_skip"].run(tokens=tokens, skip=kept.pop(config.skip_sources[i]), **shared, **weights)[
                0
            ]
        else:
            tokens = graph["block_plain"].run(tokens=tokens, **shared, **weights)[0]
        if i in config.skip_sources.values():
            kept[i] = tokens
    out = graph["unembed"].run(tokens=tokens.reshape(grid.shape), temb=temb)[0]
    assert_close_scaled(out, _reference(whole, "transformer", inputs), name="chained blocks")


@pytest.mark.parametrize(("component", "dtype", "exporter"),
                         [("transformer", "fp16", "torchscript"), ("image-encoder", "bf16", "dynamo")])  # fmt: skip
def test_half_precision_graphs_keep_norms_and_softmax_in_fp32(tiny_dir: Path, tmp_path: Path, component: str,
                                                              dtype: str, exporter: str) -> None:  # fmt: skip
    settings = ExportSettings(dtype=dtype, exporter=exporter)
    result = export_checkpoint(tiny_dir, tmp_path, settings, components=[component], progress=False)
    (entry,) = result.manifest["components"][component]["graphs"].values()
    low = onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.BFLOAT16
    # CLIP's tokens leave in float32 (its residual stream is float32, as the original's under autocast)
    _assert_fp32_islands(tmp_path / entry["file"], entry, onnx.TensorProto.FLOAT if component == "image-encoder" else low)


def _assert_fp32_islands(path: Path, entry: dict, output_type: int) -> None:
    """Every norm and softmax of the half-precision graph at `path` reads float32; its outputs are `output_type`."""
    from ruyi_trt.export.graph_passes import FP32_OPS, elem_types

    model = onnx.load(str(path))
    types = elem_types(model)
    nodes = [n for n in model.graph.node if n.op_type in FP32_OPS]
    assert nodes and entry["fp32_nodes"] > 0
    for node in nodes:
        assert types[node.input[0]] == onnx.TensorProto.FLOAT, (
            f"{node.name} ({node.op_type}) is not computed in float32"
        )
    assert {types[v.name] for v in model.graph.output} == {output_type}
    assert check_tensorrt_ready(path) == []


def test_auto_exporter_traces_half_precision_vae_graphs_with_dynamo() -> None:
    """The tracing exporter runs the graph once on the CPU in the export dtype; half-precision Conv3d is slow there
    (the full VAE encoder took 937 s in fp16), so auto takes torch.export, which traces on fake tensors."""
    half, full = ExportSettings(dtype="fp16"), ExportSettings()
    assert [half.exporter_for(c) for c in ("transformer", "vae-encoder", "vae-decoder", "image-encoder")] == [
        "torchscript", "dynamo", "dynamo", "torchscript"]  # fmt: skip
    assert {full.exporter_for(c) for c in ("vae-encoder", "vae-decoder")} == {"torchscript"}
    assert ExportSettings(dtype="fp16", exporter="torchscript").exporter_for("vae-encoder") == "torchscript"


def test_fp16_vae_encoder_from_dynamo_matches_torch_at_untraced_shapes(tiny_dir: Path, tmp_path: Path) -> None:
    """The fp16 VAE encoder as auto exports it (dynamo): GroupNorm in float32, fp16 moments, and ONNX Runtime (CPU)
    equals the fp16 PyTorch encoder at two untraced shapes within fp16 rounding (max abs err <= 1e-2 x scale)."""
    pytest.importorskip("onnxscript")
    settings = ExportSettings(dtype="fp16")
    result = export_checkpoint(tiny_dir, tmp_path, settings, components=["vae-encoder"], progress=False)
    component = result.manifest["components"]["vae-encoder"]
    assert component["settings"]["exporter"] == "dynamo"
    _assert_fp32_islands(tmp_path / "vae_encoder.onnx", component["graphs"]["vae_encoder"], onnx.TensorProto.FLOAT16)
    spec, module = reference_graph(tiny_dir, "vae_encoder", settings)
    graph = OrtGraph(tmp_path / "vae_encoder.onnx", CPU)
    for dims in TEST_DIMS["vae_encoder"]:
        inputs = spec.sample_inputs(dims, seed=2)
        assert_close_scaled(graph.run(**inputs)[0], _reference(module, "vae_encoder", inputs), rel=1e-2,
                            name=f"vae_encoder fp16 at {dims}")  # fmt: skip


def test_second_export_reuses_the_cache_and_settings_invalidate_it(tiny_dir: Path, tmp_path: Path) -> None:
    first = export_checkpoint(tiny_dir, tmp_path, components=["image-encoder"], progress=False)
    stamp = (tmp_path / "image_encoder.onnx").stat().st_mtime_ns
    again = export_checkpoint(tiny_dir, tmp_path, components=["image-encoder"], progress=False)
    assert (first.exported, again.exported, again.reused) == (["image-encoder"], [], ["image-encoder"])
    assert (tmp_path / "image_encoder.onnx").stat().st_mtime_ns == stamp
    changed = export_checkpoint(
        tiny_dir, tmp_path, ExportSettings(opset=17), components=["image-encoder"], progress=False
    )
    assert changed.exported == ["image-encoder"]
    assert read_manifest(tmp_path)["components"]["image-encoder"]["settings"]["opset"] == 17


@pytest.mark.parametrize("damage", ["missing_vae", "corrupt_weights"])
def test_broken_checkpoint_fails_clearly_and_leaves_no_files(tiny_dir: Path, tmp_path: Path, damage: str) -> None:
    checkpoint = shutil.copytree(tiny_dir, tmp_path / "checkpoint")
    if damage == "missing_vae":
        shutil.rmtree(checkpoint / "vae")
    else:
        weights = checkpoint / "vae" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "graphs"
    with pytest.raises(CheckpointError, match="vae"):
        export_checkpoint(checkpoint, out, components=["vae-encoder"], progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp folder left behind


def test_settings_are_validated(tiny_dir: Path, tmp_path: Path) -> None:
    for bad, match in ((ExportSettings(dtype="int8"), "dtype"), (ExportSettings(opset=23), "opset"),
                       (ExportSettings(dtype="bf16", exporter="torchscript"), "exporter auto or dynamo"),
                       (ExportSettings(attention="flash"), "attention"),
                       (ExportSettings(exporter="jit"), "exporter")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            export_checkpoint(tiny_dir, tmp_path, bad, progress=False)
    with pytest.raises(ValueError, match="components"):
        export_checkpoint(tiny_dir, tmp_path, components=["unet"], progress=False)


def test_dynamo_exporter_matches_torch(tiny_dir: Path, tmp_path: Path) -> None:
    """The dynamo (torch.export) route on the smallest graph: dims renamed, parity at another batch (fp32, 1e-4)."""
    pytest.importorskip("onnxscript")
    export_checkpoint(
        tiny_dir, tmp_path, ExportSettings(exporter="dynamo"), components=["image-encoder"], progress=False
    )
    spec, module = reference_graph(tiny_dir, "image_encoder")
    model = onnx.load(str(tmp_path / "image_encoder.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    inputs = spec.sample_inputs({"batch": 3}, seed=2)
    assert_close_scaled(
        OrtGraph(tmp_path / "image_encoder.onnx", CPU).run(**inputs)[0], _reference(module, "image_encoder", inputs)
    )


def test_profiles_cover_the_requested_sizes() -> None:
    tcfg, vcfg = TransformerConfig.tiny(), VAEConfig.tiny()
    spec = transformer_spec(tcfg, vcfg, "float16", clip_tokens=16)
    shapes = video_shapes([(384, 672), (512, 512)], frames=[8, 24], batch=[2])
    profile = spec.profile(shapes)
    assert profile["hidden_states"] == ((2, 16, 2, 48, 64), (2, 16, 6, 64, 64), (2, 16, 6, 64, 84))
    # each dim's range over the real sizes: tokens per frame 24*42 (384x672) .. 32*32 (512x512), never 32*42
    assert profile["rope_cos"] == ((24 * 42, 16), (32 * 32, 16), (32 * 32, 16)) and profile["style"] == (
        (2,),
        (2,),
        (2,),
    )
    decoder, _ = vae_decoder_specs(vcfg, "float16")
    context = decoder.profile([VideoShape(1, 16, 384, 672)])["context_before"]
    assert context == ((1, 16, 0, 48, 84), (1, 16, 2, 48, 84), (1, 16, 2, 48, 84))


def test_cli_export_check(exported_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["export", "--out", str(exported_dir), "--check"])
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("TensorRT-ready") == len(ALL_GRAPHS)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    graph = onnx.helper.make_graph([onnx.helper.make_node("Unique", ["x"], ["y"], name="dedupe")], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])  # fmt: skip
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(bad_dir / "bad.onnx")
    )
    failed = runner.invoke(main, ["export", "--out", str(bad_dir), "--check"])
    assert failed.exit_code == 1 and "dedupe" in failed.output
    missing = runner.invoke(main, ["export", "--out", str(tmp_path / "none")])
    assert missing.exit_code != 0 and "--model" in missing.output
