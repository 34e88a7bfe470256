"""Engine cache: keys, sidecar round trip, refusals with the build command, plan file checks."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from ruyi_trt.engine import cache
from ruyi_trt.engine.profiles import FrameRange
from ruyi_trt.engine.settings import BuildSettings

H200 = cache.Platform("NVIDIA H200", "9.0", "10.16.1.11")
PROFILE = {"hidden_states": ((1, 16, 2, 8, 8), (2, 16, 2, 8, 8), (2, 16, 4, 8, 12))}
SETTINGS = BuildSettings(model="tiny", precision="fp16", resolutions=("64x64", "64x96"), frames=FrameRange(8, 8, 16))
FLAGS = {"weight_streaming": False, "refit": False, "workspace_gb": None}


def make_record(plan: bytes = b"plan-bytes", **changes) -> cache.EngineRecord:
    record = cache.EngineRecord(
        key="k", graph="transformer", component="transformer", precision="fp16", platform=H200,
        checkpoint_hash="sha256:ckpt", onnx_hash="sha256:onnx", onnx_file="/x/transformer.onnx", profile=PROFILE,
        flags=FLAGS, settings=SETTINGS, engine_bytes=len(plan), engine_sha256=hashlib.sha256(plan).hexdigest(),
    )  # fmt: skip
    return replace(record, **changes)


def need(**changes) -> cache.Requirement:
    base = cache.Requirement("transformer", "fp16", "sha256:ckpt", H200, "tiny", (64, 64, 16, 2),
                             {"hidden_states": (2, 16, 4, 8, 8)}, "sha256:onnx")  # fmt: skip
    return replace(base, **changes)


def test_key_depends_on_everything():
    base = {"graph": "transformer", "onnx": "sha256:onnx", "precision": "fp16", "profile": PROFILE, "flags": FLAGS,
            "platform": H200}
    key = cache.engine_key(**base)
    assert key == cache.engine_key(**base) and len(key) == 20
    variants = [
        {"graph": "vae_encoder"}, {"onnx": "sha256:other"}, {"precision": "bf16"},
        {"profile": {"hidden_states": ((1, 16, 2, 8, 8),) * 3}}, {"flags": {**FLAGS, "refit": True}},
        {"platform": replace(H200, gpu="NVIDIA L40S")}, {"platform": replace(H200, compute_capability="8.9")},
        {"platform": replace(H200, tensorrt="11.4.0.106")},
    ]  # fmt: skip
    assert len({cache.engine_key(**{**base, **v}) for v in variants} | {key}) == len(variants) + 1


def test_onnx_hash_follows_the_manifest_entry():
    entry = {"checkpoint_hash": "sha256:a", "settings": {"dtype": "fp16"}, "versions": {"torch": "2.13"},
             "graphs": {"transformer": {"bytes": 10}, "other": {"bytes": 1}}}  # fmt: skip
    first = cache.onnx_hash(entry, "transformer")
    assert first == cache.onnx_hash({**entry, "graphs": {**entry["graphs"], "other": {"bytes": 2}}}, "transformer")
    assert first != cache.onnx_hash({**entry, "checkpoint_hash": "sha256:b"}, "transformer")
    assert first != cache.onnx_hash({**entry, "graphs": {"transformer": {"bytes": 11}}}, "transformer")


def test_sidecar_round_trip(tmp_path: Path):
    record = make_record(attention={"softmax": 4, "fusable": 4})
    cache.write_record(tmp_path / "abc", record)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / cache.RECORD_NAME).write_text("{not json")
    found = cache.read_records(tmp_path)
    assert found == [(tmp_path / "abc", record)]
    assert "ruyi-trt build --model tiny" in (tmp_path / "abc" / cache.RECORD_NAME).read_text()


def test_matching_engine_is_selected(tmp_path: Path):
    record = make_record()
    assert cache.select_engine([(tmp_path, record)], need()) == (tmp_path, record)


@pytest.mark.parametrize(
    "changes,reason",
    [
        ({"platform": replace(H200, gpu="NVIDIA L40S", compute_capability="8.9")}, "built for NVIDIA H200 (sm 9.0)"),
        ({"platform": replace(H200, tensorrt="11.4.0.106")}, "built with TensorRT 10.16.1.11"),
        ({"checkpoint_hash": "sha256:other"}, "another checkpoint"),
        ({"onnx_hash": "sha256:newer-export"}, "another ONNX graph"),
        ({"shapes": {"hidden_states": (2, 16, 6, 8, 8)}, "request": (64, 64, 24, 2)}, "outside the engine's profile"),
    ],
)
def test_refusals_say_why_and_how_to_rebuild(tmp_path: Path, changes: dict, reason: str):
    with pytest.raises(cache.EngineMismatchError) as info:
        cache.select_engine([(tmp_path, make_record())], need(**changes))
    message = str(info.value)
    assert reason in message
    assert "ruyi-trt build --model tiny --precision fp16 --resolution 64x64,64x96" in message
    if "request" in changes:  # the command widens the frame range to the request
        assert "--frames 8:8:24" in message


def test_refusal_for_a_size_not_in_the_profile_adds_it(tmp_path: Path):
    with pytest.raises(cache.EngineMismatchError, match="--resolution 64x64,64x96,96x128 --frames 8:8:16"):
        cache.select_engine([(tmp_path, make_record())], need(request=(96, 128, 16, 2), shapes={"hidden_states": (2, 16, 4, 12, 16)}))


def test_no_engine_at_all_gives_the_build_command():
    with pytest.raises(cache.EngineMismatchError) as info:
        cache.select_engine([], need(precision="bf16"))
    assert "ruyi-trt build --model tiny --precision bf16 --resolution 64x64 --frames 16:16:16 --batch 2" in str(info.value)


def test_plan_file_checks(tmp_path: Path):
    plan = bytes(range(256)) * 8
    record = make_record(plan)
    with pytest.raises(cache.EngineFileError, match="missing"):
        cache.read_plan(tmp_path, record)
    path = tmp_path / cache.PLAN_NAME
    path.write_bytes(plan[:-100])
    with pytest.raises(cache.EngineFileError, match="truncated.*ruyi-trt build"):
        cache.read_plan(tmp_path, record)
    path.write_bytes(plan[:-1] + b"\x00")
    with pytest.raises(cache.EngineFileError, match="corrupt"):
        cache.read_plan(tmp_path, record)
    path.write_bytes(plan)
    assert cache.read_plan(tmp_path, record) == plan


def test_engines_root_is_in_the_cache(private_cache: Path, tmp_path: Path):
    assert cache.engines_root() == private_cache / "engines"
    assert cache.engines_root(tmp_path) == tmp_path
