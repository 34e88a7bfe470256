"""Checking a submission before it is stored: images decoded, options validated with the field named."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from ruyi_trt.server.forms import SubmissionError, parse_submission, request_options
from ruyi_trt.testing import gradient_image


def image_bytes(kind: str = "PNG", size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    gradient_image(*size).save(buffer, format=kind)
    return buffer.getvalue()


def test_a_good_submission() -> None:
    start, end = image_bytes(), image_bytes("JPEG")
    submission = parse_submission([("image", ("a.png", start)), ("end_image", ("b.jpg", end)), ("frames", "16"),
                                   ("size", "64x96"), ("cfg", "1"), ("camera", "left"), ("motion", "auto")])  # fmt: skip
    assert submission.start_images == [start] and submission.end_images == [end]
    assert submission.options == {"frames": 16, "resolution": 512, "size": [64, 96], "camera": "left",
                                  "motion": "auto", "steps": 25, "cfg": 1.0, "seed": 42, "scheduler": "DDIM"}  # fmt: skip
    keywords = request_options(submission.options)
    assert keywords["guidance_scale"] == 1.0 and keywords["size"] == (64, 96) and "cfg" not in keywords


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ([("frames", "8")], "image", "at least one start image"),
        ([("frames", "0")], "frames", "outside 1..120"),
        ([("frames", "5")], "frames", "rounds down to 0"),
        ([("frames", "eight")], "frames", "not an integer"),
        ([("resolution", "640")], "resolution", "not supported"),
        ([("size", "65x64")], "size", "multiples of 16"),
        ([("camera", "zoom")], "camera", "unknown"),
        ([("cfg", "-1")], "cfg", "outside 0.."),
        ([("scheduler", "PNDM"), ("steps", "2")], "steps", "PNDM needs at least 4"),
        ([("steps", "900")], "steps", "more than"),
        ([("steps", "2"), ("steps", "3")], "steps", "twice"),
        ([("negative_prompt", "x")], "negative_prompt", "not a job option"),
    ],
)
def test_bad_options_name_the_field(fields, field, message) -> None:
    uploads = [] if field == "image" else [("image", ("a.png", image_bytes()))]
    with pytest.raises(SubmissionError, match=message) as caught:
        parse_submission(uploads + fields)
    assert caught.value.field == field and caught.value.status == 422


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (b"%PDF-1.4 not an image", "not an image PIL can read"),
        (image_bytes("GIF"), "is GIF"),
        (image_bytes()[:60], "not a readable image"),  # a truncated PNG
    ],
)
def test_uploads_are_decoded_as_images(data, message) -> None:
    with pytest.raises(SubmissionError, match=message) as caught:
        parse_submission([("image", ("upload.bin", data))])
    assert caught.value.field == "image"


def test_huge_images_are_refused_before_decoding(monkeypatch) -> None:
    from ruyi_trt.server import forms

    monkeypatch.setattr(forms, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(SubmissionError, match="more than 1,000"):
        parse_submission([("image", ("big.png", image_bytes(size=(48, 32))))])


def test_text_where_an_image_belongs() -> None:
    with pytest.raises(SubmissionError, match="uploaded image file"):
        parse_submission([("image", "start.png")])
    assert Image.open(io.BytesIO(image_bytes("WEBP"))).format == "WEBP"
    parse_submission([("image", ("a.webp", image_bytes("WEBP")))])
