"""Control-embedding selection (models/control_embeddings.py).

Golden: control_embeddings_selection.json resolved from control_embeddings_synthetic.safetensors; the selected
tensors must be the stored ones exactly (same dtype, torch.equal).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ruyi_trt.models.checkpoint_io import CheckpointError
from ruyi_trt.models.control_embeddings import (
    CAMERAS,
    ControlEmbeddings,
    load_control_embeddings,
    make_random_control_embeddings,
    save_control_embeddings,
)

# reference return-dict names -> our field names
_REFERENCE_FIELDS = {"embeds": "emb1", "attention_mask": "mask1", "embeds_2": "emb2", "attention_mask_2": "mask2"}


def test_golden_selection(golden_dir):
    path = golden_dir / "control_embeddings_synthetic.safetensors"
    stored = load_file(str(path))
    embeddings = load_control_embeddings(path)
    queries = json.loads((golden_dir / "control_embeddings_selection.json").read_text())["queries"]
    assert queries
    for query in queries:
        args = (query["camera_direction"], query["motion"], query["aspect_ratio"])
        positive_keys, negative_keys = embeddings.resolve(*args)
        positive, negative = embeddings.select(*args)
        for side, keys, tensors in (("positive", positive_keys, positive), ("negative", negative_keys, negative)):
            for ref_name, field in _REFERENCE_FIELDS.items():
                expected_key = query["resolved_keys"][f"{side}_{ref_name}"]
                assert keys[field] == expected_key, query
                assert tensors[field].dtype == stored[expected_key].dtype
                assert torch.equal(tensors[field], stored[expected_key]), query


def test_random_embeddings_roundtrip(tmp_path):
    tensors = make_random_control_embeddings(5, 8, 6, 12, seed=3)
    assert len(tensors) == (5 * len(CAMERAS) + 2) * 4
    again = make_random_control_embeddings(5, 8, 6, 12, seed=3)
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert not torch.equal(
        tensors["p.default.emb1"], make_random_control_embeddings(5, 8, 6, 12, seed=4)["p.default.emb1"]
    )
    path = save_control_embeddings(tmp_path / "embeddings.safetensors", tensors)
    embeddings = load_control_embeddings(tmp_path)  # a folder holding embeddings.safetensors works too
    positive, negative = embeddings.select("left", 2)
    assert torch.equal(positive["emb1"], tensors["p.16x9movie2left.emb1"])
    assert positive["emb1"].shape == (1, 5, 8) and positive["mask2"].shape == (1, 6)
    assert positive["mask1"].dtype == torch.int64 and positive["mask1"][0, 0] == 1
    assert torch.equal(negative["emb2"], tensors["n.default.emb2"])
    auto, _ = embeddings.select("auto", "auto")
    assert torch.equal(auto["emb2"], tensors["p.16x9movie0auto.emb2"])
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["embeddings.safetensors"]


def test_fallback_to_default_per_field():
    tensors = make_random_control_embeddings(2, 3, 2, 3, seed=0)
    del tensors["p.16x9movie3up.mask1"]
    positive_keys, _ = ControlEmbeddings(tensors).resolve("up", "3")
    assert positive_keys["emb1"] == "p.16x9movie3up.emb1" and positive_keys["mask1"] == "p.default.mask1"


@pytest.mark.parametrize(
    "camera, motion, aspect, match",
    [
        ("zoom", "1", "16:9", "camera"),
        ("left", "5", "16:9", "motion"),
        ("left", 0, "16:9", "motion"),
        ("left", "1", "wide", "aspect"),
    ],
)
def test_bad_selection(camera, motion, aspect, match):
    embeddings = ControlEmbeddings(make_random_control_embeddings(2, 3, 2, 3, seed=0))
    with pytest.raises(ValueError, match=match):
        embeddings.select(camera, motion, aspect)


def test_int_motion_accepted():
    tensors = make_random_control_embeddings(2, 3, 2, 3, seed=0)
    positive, _ = ControlEmbeddings(tensors).select("down", 4)
    assert torch.equal(positive["emb1"], tensors["p.16x9movie4down.emb1"])


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_control_embeddings(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_control_embeddings(bad)
    tensors = make_random_control_embeddings(2, 3, 2, 3, seed=0)
    del tensors["n.default.mask2"]
    with pytest.raises(CheckpointError, match="n.default.mask2"):
        ControlEmbeddings(tensors)
    with pytest.raises(CheckpointError):
        save_control_embeddings(tmp_path / "x.safetensors", tensors)
    assert not (tmp_path / "x.safetensors").exists()
