"""Start/end-frame conditioning, pipeline mask preprocessing and CLIP pixels (runtime/conditioning.py).

Golden: preprocess.safetensors `image.*`, `cond.*`, `pipe.start_end.*`, `clip.pixel_values` with preprocess.json.
The conditioning tensors and the pipeline mask/masked video must match exactly (same dtype, torch.equal); CLIP pixel
values (float32) within 1e-6 absolute.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ruyi_trt.runtime.conditioning import (
    clip_pixel_values,
    generates_every_frame,
    image_to_video_condition,
    prepare_mask_and_masked_video,
)


@pytest.fixture(scope="module")
def golden(golden_dir):
    meta = json.loads((golden_dir / "preprocess.json").read_text())
    tensors = load_file(str(golden_dir / "preprocess.safetensors"))
    return meta, tensors


@pytest.fixture(scope="module")
def images(golden):
    """The golden input images, decoded from their PNG bytes as the reference did (PIL open + convert RGB)."""
    _, tensors = golden
    out = {}
    for key, value in tensors.items():
        if key.startswith("image.") and key.endswith(".png"):
            name = key[len("image.") : -len(".png")]
            out[name] = Image.open(io.BytesIO(value.numpy().tobytes())).convert("RGB")
            assert np.array_equal(np.array(out[name]), tensors[f"image.{name}"].numpy())
    return out


def _call(meta, images, case):
    target = meta["conditioning"]["target"]
    starts = [images[name] for name in case["start_images"]]
    ends = [images[name] for name in case["end_images"]] if case["end_images"] else None
    height, width = target["sample_size_hw"]
    return image_to_video_condition(starts, ends, target["video_length"], height, width)


def test_golden_conditioning_cases(golden, images):
    meta, tensors = golden
    cases = meta["conditioning"]["cases"]
    assert cases
    for name, case in cases.items():
        video, mask, clip_image = _call(meta, images, case)
        expected_video = tensors[f"cond.{name}.input_video"]
        expected_mask = tensors[f"cond.{name}.input_video_mask"]
        assert video.dtype == expected_video.dtype and torch.equal(video, expected_video), name
        assert mask.dtype == expected_mask.dtype and torch.equal(mask, expected_mask), name
        assert str(mask.dtype).removeprefix("torch.") == case["input_video_mask"]["dtype"], name
        assert mask[0, 0, :, 0, 0].tolist() == case["mask_per_frame"], name
        expected_clip = tensors[f"cond.{name}.clip_image"]
        assert torch.equal(torch.from_numpy(np.array(clip_image)), expected_clip), name


def test_golden_pipeline_mask_and_masked_video(golden, images):
    meta, tensors = golden
    pipe = meta["conditioning"]["pipeline_case"]
    case_name = pipe["case"]
    video, mask, _ = _call(meta, images, meta["conditioning"]["cases"][case_name])
    mask01, masked = prepare_mask_and_masked_video(video, mask)
    expected_mask = tensors[f"pipe.{case_name}.mask_condition"]
    expected_masked = tensors[f"pipe.{case_name}.masked_video"]
    assert mask01.dtype == expected_mask.dtype and torch.equal(mask01, expected_mask)
    assert masked.dtype == expected_masked.dtype and torch.equal(masked, expected_masked)
    assert mask01[0, 0, :, 0, 0].tolist() == pipe["mask_condition_per_frame"]
    all_black = [bool((masked[0, :, f] == -1).all()) for f in range(masked.shape[2])]
    assert all_black == pipe["masked_video_frames_all_minus_one"]


def test_golden_clip_pixel_values(golden):
    meta, tensors = golden
    clip = meta["clip"]
    image = Image.fromarray(tensors[clip["input"]].numpy())
    assert list(image.size[::-1]) == clip["input_size_hw"]
    pixels = clip_pixel_values(image, clip["processor"])
    expected = tensors["clip.pixel_values"]
    assert pixels.dtype == expected.dtype and pixels.shape == expected.shape
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-6)


def test_float_mask_also_binarises():
    video = torch.rand(1, 3, 4, 16, 24)
    mask = torch.tensor([0.0, 255.0, 255.0, 0.0]).view(1, 1, 4, 1, 1).expand(1, 1, 4, 16, 24)
    mask01, masked = prepare_mask_and_masked_video(video, mask)
    assert mask01[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert torch.equal(masked[:, :, 0], 2 * video[:, :, 0] - 1)
    assert (masked[:, :, 1:3] == -1).all()
    assert not generates_every_frame(mask)
    assert generates_every_frame(torch.full((1, 1, 2, 8, 8), 255.0))


def _img(w=20, h=10, color=(10, 20, 30)):
    return Image.new("RGB", (w, h), color)


def test_rejects_bad_image_lists():
    with pytest.raises(ValueError, match="at least one start image"):
        image_to_video_condition([], None, 8, 16, 16)
    with pytest.raises(ValueError, match="at most 5 start images"):
        image_to_video_condition([_img()] * 6, None, 8, 16, 16)
    with pytest.raises(ValueError, match="at most 1 end image"):
        image_to_video_condition([_img()], [_img(), _img()], 8, 16, 16)
    with pytest.raises(ValueError, match="do not fit in video_length=4"):
        image_to_video_condition([_img()] * 4, [_img()], 4, 16, 16)
    with pytest.raises(TypeError, match="PIL"):
        image_to_video_condition([np.zeros((4, 4, 3), np.uint8)], None, 8, 16, 16)


def test_single_frame_and_rgba_input():
    video, mask, clip = image_to_video_condition([Image.new("RGBA", (30, 20), (1, 2, 3, 4))], None, 1, 16, 32)
    assert video.shape == (1, 3, 1, 16, 32) and mask.dtype == torch.float32
    assert mask.sum() == 0 and clip.size == (32, 16) and clip.mode == "RGB"


def test_prepare_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiples of 8"):
        prepare_mask_and_masked_video(torch.rand(1, 3, 2, 12, 16), torch.zeros(1, 1, 2, 12, 16))
    with pytest.raises(ValueError, match="mask must have shape"):
        prepare_mask_and_masked_video(torch.rand(1, 3, 2, 16, 16), torch.zeros(1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prepare_mask_and_masked_video(torch.rand(1, 3, 2, 16, 16) * 255, torch.zeros(1, 1, 2, 16, 16))
