"""Optimization profiles: parsing, buckets x frames -> min/opt/max per size group, checked against the exported
graphs' inputs; at full size every profile's max is a real bucket (never one bucket's height with another's width)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ruyi_trt.engine.profiles import (
    FrameRange,
    component_shapes,
    graph_profiles,
    graph_specs,
    outside_profile,
    parse_frames,
    parse_resolutions,
    resolution_sizes,
    size_groups,
)
from ruyi_trt.export.manifest import read_manifest
from ruyi_trt.export.specs import VideoShape

SMALL = ("64x64", "64x96")  # sizes the tiny model runs quickly on the CPU
FRAMES = FrameRange(8, 8, 16)


def test_parse_frames():
    assert parse_frames("24:48:120") == FrameRange(24, 48, 120)
    assert parse_frames("16") == FrameRange(16, 16, 16)
    for bad in ("9:5:3", "24:16:8", "1:8:16", "8:12:16", "8:16:128", "a:b:c", "8:16"):
        with pytest.raises(ValueError, match="--frames"):
            parse_frames(bad)


def test_parse_resolutions():
    assert parse_resolutions("512, 384x672") == ("512", "384x672")
    assert parse_resolutions("400") == ("400",)  # any base resolution of the original: 384..1024 in steps of 16
    for bad in ("650", "368", "1040", "100x100", "abc", "", "512x"):
        with pytest.raises(ValueError, match="--resolution"):
            parse_resolutions(bad)


def test_base_resolution_means_every_bucket():
    sizes = resolution_sizes(("512",))
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (384, 672) in sizes
    assert len(sizes) == len(set(sizes)) > 30
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)
    assert (768, 768) in resolution_sizes(("512", "768")) and resolution_sizes(("384x672",)) == [(384, 672)]


def test_batches_per_component():
    shapes, opt = component_shapes("transformer", SMALL, FRAMES, batch=2)
    assert {s.batch for s in shapes} == {1, 2} and opt.batch == 2 and (opt.height, opt.width, opt.frames) == (64, 64, 8)
    shapes, opt = component_shapes("vae-encoder", SMALL, FRAMES, batch=2)
    assert {s.batch for s in shapes} == {1} and opt.batch == 1


def _only_profile(spec, component: str, entries, frames: FrameRange, batch: int = 2):
    ((_, profile),) = graph_profiles(spec, component, entries, frames, batch)
    return profile


def test_profile_values(tiny_dir: Path):
    specs = graph_specs(tiny_dir, "fp16")
    transformer = _only_profile(specs["transformer"], "transformer", SMALL, FRAMES)
    # 64x64 px -> 8x8 latents (4x4 patches of 2); 8 frames -> 2 latents, 16 -> 4
    assert transformer["hidden_states"] == ((1, 16, 2, 8, 8), (2, 16, 2, 8, 8), (2, 16, 4, 8, 12))
    assert transformer["rope_cos"] == ((16, 16), (16, 16), (24, 16))
    encoder = _only_profile(specs["vae_encoder"], "vae-encoder", SMALL, FRAMES)
    assert encoder["video"] == ((1, 3, 1, 64, 64), (1, 3, 8, 64, 64), (1, 3, 8, 64, 96))  # 1..mini_batch_encoder frames
    decoder = _only_profile(specs["vae_decoder"], "vae-decoder", SMALL, FRAMES)
    assert decoder["latents"][0][2] == 1 and decoder["latents"][2][2] == 2  # 1..mini_batch_decoder latents
    assert decoder["context_before"][0][2] == 0 and decoder["context_after"][2][2] == 2


def _graph_inputs(path: Path) -> dict[str, list]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}


def test_profiles_match_the_exported_graphs(tiny_dir: Path, exported_dir: Path):
    """Every input named, ranks and static dims equal, one value per symbolic dim at each of min/opt/max."""
    specs = graph_specs(tiny_dir, "fp32")
    manifest = read_manifest(exported_dir)
    checked = 0
    for component, entry in manifest["components"].items():
        for graph, info in entry["graphs"].items():
            inputs = _graph_inputs(exported_dir / info["file"])
            for _, profile in graph_profiles(specs[graph], component, ("512", *SMALL), FrameRange(8, 24, 120), 2):
                assert set(profile) == set(inputs), graph
                for level in range(3):
                    values: dict[str, int] = {}
                    for name, dims in inputs.items():
                        shape = profile[name][level]
                        assert len(shape) == len(dims), (graph, name)
                        for dim, size in zip(dims, shape):
                            if isinstance(dim, str):
                                assert values.setdefault(dim, size) == size, f"{graph}: {dim} differs between inputs"
                            else:
                                assert size == dim, (graph, name)
                for low, opt, high in profile.values():
                    assert all(a <= b <= c for a, b, c in zip(low, opt, high))
            checked += 1
    assert checked == 5


@pytest.mark.parametrize("graph,component", [("transformer", "transformer"), ("vae_encoder", "vae-encoder"),
                                             ("vae_decoder", "vae-decoder")])  # fmt: skip
def test_graphs_run_at_profile_min_and_max(tiny_dir: Path, exported_dir: Path, graph: str, component: str):
    """ONNX Runtime accepts the profile's min and max shapes: the ranges are consistent with the graph."""
    from ruyi_trt.runtime.backends.ort_backend import OrtGraph

    spec = graph_specs(tiny_dir, "fp32")[graph]
    profile = _only_profile(spec, component, SMALL, FRAMES)
    session = OrtGraph(exported_dir / f"{graph}.onnx", torch.device("cpu"))
    for level in (0, 2):
        inputs = {name: torch.ones(ranges[level]) for name, ranges in profile.items()}
        for name in ("text_embedding_mask", "text_embedding_mask_t5", "style"):
            if name in inputs:
                inputs[name] = inputs[name].long() * (name != "style")
        out = session.run(**inputs)[0]
        assert torch.isfinite(out).all()


def test_outside_profile():
    profile = {"x": ((1, 2), (1, 4), (2, 8))}
    assert outside_profile(profile, {"x": (2, 8)}) == []
    assert "outside" in outside_profile(profile, {"x": (3, 8)})[0]
    assert "not an input" in outside_profile(profile, {"y": (1, 2)})[0]


GRAPH_COMPONENTS = {"transformer": "transformer", "transformer_embed": "transformer", "transformer_block_plain": "transformer",
                    "transformer_block_skip": "transformer", "transformer_unembed": "transformer",
                    "vae_encoder": "vae-encoder", "vae_decoder": "vae-decoder", "vae_decoder_one_frame": "vae-decoder",
                    "image_encoder": "image-encoder"}  # fmt: skip


@pytest.mark.parametrize("base", ["512", "768"])
def test_every_profile_max_is_a_real_bucket_at_full_size(base: str):
    """Per graph, each group's max dims are exactly those of one requested bucket (at the largest batch and
    frame count), every bucket is served, and groups cover sizes that the max dominates."""
    specs = graph_specs("full-random", "fp16")
    frames = FrameRange(8, 120, 120)
    sizes = resolution_sizes((base,))
    for graph, component in GRAPH_COMPONENTS.items():
        spec = specs[graph]
        batch = 2 if component == "transformer" else 1
        profiles = graph_profiles(spec, component, (base,), frames, 2)
        assert sorted(s for group, _ in profiles for s in group.sizes) == sorted(sizes), graph
        for group, profile in profiles:
            real = spec.dims_for(VideoShape(batch, frames.max, *group.sizes[0]))
            expected = {t.name: t.resolve({**real, **{k: hi for k, (_, hi) in spec.dim_bounds.items()}}) for t in spec.inputs}
            assert {name: high for name, (_, _, high) in profile.items()} == expected, (graph, group.label)


def test_block_graphs_need_one_engine_and_whole_graphs_one_per_bucket_group():
    specs = graph_specs("full-random", "fp16")
    frames = FrameRange(8, 120, 120)
    block = size_groups(specs["transformer_block_plain"], "transformer", ("768",), frames, 2)
    assert len(block) == 1 and len(block[0].sizes) == len(resolution_sizes(("768",)))
    ((_, profile),) = graph_profiles(specs["transformer_block_plain"], "transformer", ("768",), frames, 2)
    assert profile["tokens"][2] == (2, 30, 2304, 2816)  # 768x768: 48 x 48 patches per frame, 30 latent frames
    assert profile["tokens"][1][2] == 2304 and profile["tokens"][0] == (1, 2, min(
        (h // 16) * (w // 16) for h, w in resolution_sizes(("768",))), 2816)  # fmt: skip
    whole = size_groups(specs["transformer"], "transformer", ("768",), frames, 2)
    assert 1 < len(whole) < len(resolution_sizes(("768",)))
    for group in whole:  # within a group every size fits under the first in both height and width
        top_h, top_w = group.sizes[0]
        assert all(h <= top_h and w <= top_w for h, w in group.sizes)
    assert len(size_groups(specs["image_encoder"], "image-encoder", ("768",), frames, 2)) == 1
