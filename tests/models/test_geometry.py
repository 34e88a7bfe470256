"""Resolution buckets, frame-count rounding and request validation (models/geometry.py).

Golden: preprocess.json `buckets` and `video_length` (reference-exact integers; compared with ==).
"""

from __future__ import annotations

import json

import pytest

from ruyi_trt.models.geometry import (
    ASPECT_RATIO_512,
    closest_bucket,
    closest_ratio_key,
    latent_frames,
    round_video_length,
    scaled_bucket_size,
    validate_request,
)


@pytest.fixture(scope="module")
def preprocess(golden_dir):
    return json.loads((golden_dir / "preprocess.json").read_text())


def test_golden_table_key_order(preprocess):
    assert list(ASPECT_RATIO_512) == preprocess["buckets"]["table_key_order"]


def test_golden_buckets(preprocess):
    """Every recorded (image size, base) case: key, scaled float size, floored size and latent size, exactly."""
    for case in preprocess["buckets"]["cases"]:
        w, h, base = case["image_width"], case["image_height"], case["base_resolution"]
        key = closest_ratio_key(w, h)
        assert key == case["closest_ratio_key"], case
        assert float(key) == case["closest_ratio"], case
        assert list(scaled_bucket_size(key, base)) == case["closest_size_hw"], case
        height, width = closest_bucket(w, h, base)
        assert (height, width) == (case["height"], case["width"]), case
        assert (height // 16 * 16, width // 16 * 16) == (case["pipeline_height"], case["pipeline_width"]), case
        assert [height // 8, width // 8] == case["latent_hw"], case


def test_golden_video_length(preprocess):
    table = preprocess["video_length"]
    enc, dec = table["mini_batch_encoder"], table["mini_batch_decoder"]
    for case in table["cases"]:
        rounded = round_video_length(case["requested"], enc)
        assert rounded == case["video_length"], case
        assert latent_frames(rounded, enc, dec) == case["latent_frames"], case


def test_tie_first_minimum_wins():
    # 640x480: h/w = 0.75 is equally far from 0.72 and 0.78 in float64; the first key in dict order wins.
    assert closest_ratio_key(640, 480) == "0.72"
    assert closest_bucket(1920, 1080, 512) == (384, 672)
    assert closest_bucket(1920, 1080, 768) == (576, 1008)


def test_invalid_image_size():
    with pytest.raises(ValueError, match="positive"):
        closest_bucket(0, 10, 512)


@pytest.mark.parametrize("frames, expected", [(1, 1), (8, 8), (9, 8), (120, 120), (63, 56), (119, 112)])
def test_validate_request_accepts(frames, expected):
    assert validate_request(frames, 512) == expected


@pytest.mark.parametrize("frames", [0, -3, 2, 7, 121, 200])
def test_validate_request_rejects_frames(frames):
    with pytest.raises(ValueError, match="frames"):
        validate_request(frames, 512)


@pytest.mark.parametrize("frames", [8.0, True, "8"])
def test_validate_request_rejects_frame_type(frames):
    with pytest.raises(TypeError, match="frames"):
        validate_request(frames, 512)


@pytest.mark.parametrize("resolution", [368, 1040, 500, 0, True, "512"])
def test_validate_request_rejects_resolution(resolution):
    with pytest.raises(ValueError, match="resolution must be 384..1024 in steps of 16"):
        validate_request(24, resolution)


@pytest.mark.parametrize("resolution", [384, 400, 896, 1024])
def test_validate_request_accepts_any_base_resolution_of_the_original(resolution):
    assert validate_request(24, resolution) == 24


def test_rounded_frame_count_is_a_warning(caplog):
    with caplog.at_level("WARNING", logger="ruyi_trt.models.geometry"):
        assert validate_request(30, 512) == 24
    assert "frames: 30 is not a multiple of 8; making 24 frames" in caplog.text
