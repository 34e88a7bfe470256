"""The build plan at full size, on the full-width per-block graphs (the code `ruyi-trt build --dry-run` runs).

The block graphs of the real architecture (hidden 2816, 16 heads x 176) are exported without weights (they
are graph inputs), planned for --resolution 768 --frames 8:120:120 --batch 2, and checked by shape
inference at the profile's max: decomposed attention materializes [2, 16, 69120, 69120] scores and is
refused (2^31), ONNX Attention keeps every tensor below 2^31 elements.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from ruyi_trt.engine.plan import BuildPlanError, PlannedEngine, check_engine, write_plan
from ruyi_trt.engine.profiles import FrameRange, graph_profiles
from ruyi_trt.engine.settings import BuildSettings
from ruyi_trt.export import graph_passes
from ruyi_trt.export.graph_stats import INT32_LIMIT, attention_score_shapes
from ruyi_trt.export.onnx_export import ExportSettings, export_graph
from ruyi_trt.export.specs import example_block, transformer_stage_specs
from ruyi_trt.export.wrappers import TransformerBlockGraph
from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.models.vae_config import VAEConfig

FULL = TransformerConfig.full()
FRAMES = FrameRange(8, 120, 120)
SETTINGS = BuildSettings(model="full-random", precision="fp16", resolutions=("768",), frames=FRAMES, per_block=True,
                         attention="onnx")  # fmt: skip
TOKENS = 30 * 48 * 48  # 768 x 768 x 120 frames: 30 latent frames of 48 x 48 patches


@pytest.fixture(scope="module")
def block_graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{'decomposed' | 'onnx': {graph: path}} for the full-width plain and skip block graphs (fp16)."""
    folder = tmp_path_factory.mktemp("full-width-blocks")
    _, plain, skip, _ = transformer_stage_specs(FULL, VAEConfig.full(), "float16", clip_tokens=576)
    paths: dict[str, dict[str, Path]] = {"decomposed": {}, "onnx": {}}
    for spec, has_skip in ((plain, False), (skip, True)):
        module = TransformerBlockGraph(example_block(FULL, has_skip))  # meta weights: they are graph inputs
        entry = export_graph(module, spec, folder, ExportSettings(dtype="fp16"))
        paths["decomposed"][spec.name] = folder / entry["file"]
        fused, count, left = graph_passes.fuse_attention(onnx.load(str(folder / entry["file"])), softmax_in_float32=True)
        assert (count, left) == (3, 0)  # self-attention, text cross-attention, CLIP cross-attention
        paths["onnx"][spec.name] = folder / f"{spec.name}.attention.onnx"
        onnx.save(fused, str(paths["onnx"][spec.name]))
    return paths


def _planned(graph: str) -> PlannedEngine:
    from ruyi_trt.engine.profiles import graph_specs

    spec = graph_specs("full-random", "fp16")[graph]
    ((group, profile),) = graph_profiles(spec, "transformer", SETTINGS.resolutions, FRAMES, SETTINGS.batch)
    return PlannedEngine(graph, graph, "transformer", group, profile)


@pytest.mark.parametrize("graph", ["transformer_block_plain", "transformer_block_skip"])
def test_onnx_attention_block_fits_int32_at_768_by_120(block_graphs, graph: str):
    planned = _planned(graph)
    report = check_engine(planned, block_graphs["onnx"][graph])
    assert report["inputs"]["tokens"]["max"] == [2, 30, 2304, 2816]  # 768x768, a real bucket
    assert report["attention"] == {"form": "onnx-attention", "nodes": 3}
    assert report["tensorrt_min_version"] == "10.14" and report["problems"] == []
    ffn = 2 * TOKENS * FULL.ff_inner_dim  # the FFN intermediate is the largest tensor
    assert report["max_tensor_elements"] == ffn < INT32_LIMIT
    assert report["largest_tensor"]["shape"] == [2, TOKENS, FULL.ff_inner_dim]
    hidden = 2 * TOKENS * FULL.inner_dim * 2  # one fp16 hidden state
    assert 4 * hidden < report["activation_bytes_at_max"] < 40 * hidden
    planned.report = report
    assert planned.refusal is None


def test_decomposed_attention_is_refused_at_768_by_120(block_graphs, tmp_path: Path):
    """The [B, H, N, N] score tensor reaches 2^31 elements: the plan is written, then the build refused."""
    graph = "transformer_block_plain"
    planned = _planned(graph)
    scores = attention_score_shapes(block_graphs["decomposed"][graph], {n: hi for n, (_, _, hi) in planned.profile.items()})
    assert (2, 16, TOKENS, TOKENS) in scores.values()
    data = {"components": {"transformer": {"graphs": {graph: {"file": block_graphs["decomposed"][graph].name}}}}}
    settings = BuildSettings(**{**SETTINGS.__dict__, "attention": "decomposed"})
    with pytest.raises(BuildPlanError, match=r"(?s)transformer_block_plain: tensor .* not below 2\^31.*--attention onnx"):
        write_plan(settings, [planned], block_graphs["decomposed"][graph].parent, data, {"attention": "decomposed"},
                   tmp_path, progress=False)  # fmt: skip
    plan = json.loads((tmp_path / "build-plan.json").read_text())
    assert plan["refused"][0]["engine"] == graph
    report = plan["engines"][graph]
    assert report["max_tensor_elements"] == 2 * 16 * TOKENS * TOKENS >= INT32_LIMIT
    assert report["attention"] == {"form": "decomposed", "nodes": 3} and report["tensorrt_min_version"] == "10.8"
    assert report["inputs"]["rope_cos"]["max"] == [2304, 176]


def test_plan_of_accepted_engines(block_graphs, tmp_path: Path):
    engines = [_planned("transformer_block_plain"), _planned("transformer_block_skip")]
    folder = block_graphs["onnx"]["transformer_block_plain"].parent
    data = {"components": {"transformer": {"graphs": {e.graph: {"file": block_graphs["onnx"][e.graph].name}
                                                      for e in engines}}}}  # fmt: skip
    path = write_plan(SETTINGS, engines, folder, data, {"dry_run": True, "attention": "onnx"}, tmp_path, progress=False)
    plan = json.loads(path.read_text())
    assert plan["refused"] == [] and plan["dry_run"] is True and set(plan["engines"]) == {e.graph for e in engines}
    assert plan["command"].startswith("ruyi-trt build --model full-random --precision fp16 --resolution 768")
    assert all(e["sizes"][0] == "768x768" and len(e["sizes"]) > 30 for e in plan["engines"].values())
