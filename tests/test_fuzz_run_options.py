"""A hypothesis fuzz test of `ruyi-trt run`'s validation over every option: whatever the command line, there is no
traceback; a refusal exits 2 and its message names the option (as --flag) and what it accepts; an accepted command
reaches model loading (stopped there: nothing is loaded or written).

Bounded for CI: a fixed number of derandomized examples (the same every run) and a per-example deadline.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ruyi_trt.cli import main
from ruyi_trt.testing import gradient_image

CHOICES = {
    "--resolution": ["512", "768"], "--camera": ["static", "left", "right", "up", "down", "auto"],
    "--motion": ["1", "2", "3", "4", "auto"], "--scheduler": ["DDIM", "Euler", "Euler A", "DPM++", "PNDM"],
    "--backend": ["torch", "ort", "trt"], "--dtype": ["fp32", "bf16", "fp16"],
    "--memory-mode": ["auto", "full_gpu", "normal", "low_gpu"], "--fp8": ["none", "lite", "strong", "extreme"],
    "--fp8-storage": ["fp8_e4m3fn", "fp8_e5m2"], "--compute": ["none", "fp8", "int8"],
    "--attention": ["sdpa", "fp8", "fp8-full"],
}  # fmt: skip
INTEGERS = {"--frames": (-10, 200), "--steps": (-5, 2000), "--seed": (-(2**70), 2**70), "--offload-steps": (-3, 2000)}
NUMBERS = {"--cfg": (-5, 50), "--vram-budget": (-1, 5000), "--teacache": (-1, 2), "--enhance-a-video": (-10, 200),
           "--lora-strength": (-200, 200), "--parallel-timeout": (-10, 1e5)}  # fmt: skip
FLAGS = ("--plan-only", "--no-progress", "--fused-kernels")
# what a refusal says about the accepted values
ACCEPTED = re.compile(r"\.\.|one of|\buse\b|\bpass\b|\bgive\b|\bchoose\b|\bput\b|\bconvert\b|\bmust\b|\bneeds\b|"
                      r"\bwithin\b|\bdownload\b|\bdrop\b", re.IGNORECASE)  # fmt: skip
RUN_OPTIONS = {p.opts[0] for p in main.commands["run"].params} - {"--help"}

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)


class Validated(Exception):
    """Raised instead of loading the model: everything the command line said was accepted."""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path):
    """A folder with a good image, a text file, a good LoRA and a folder; the CLI runs in it with model loading
    replaced by `Validated`."""
    import torch
    from safetensors.torch import save_file

    from ruyi_trt.runtime.pipeline import RuyiPipeline

    folder = tmp_path_factory.mktemp("fuzz")
    gradient_image(96, 64).save(folder / "good.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    save_file({"lora_unet_blocks_0_attn1_to_q.alpha": torch.ones(())}, str(folder / "style.safetensors"))
    previous = os.getcwd()
    os.chdir(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RuyiPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(Validated())))
        yield folder
    os.chdir(previous)


def _valid() -> dict[str, st.SearchStrategy]:
    """Values `run` accepts, one strategy per option."""
    values: dict[str, st.SearchStrategy] = {
        "--model": st.sampled_from(["tiny", "full-random"]), "--image": st.lists(st.just("good.png"), min_size=1, max_size=2),
        "--end-image": st.lists(st.just("good.png"), max_size=1), "--out": st.sampled_from(["video.mp4", "out/v.mp4"]),
        "--frames-dir": st.just("frames"), "--device": st.just("cpu"), "--lora": st.just("style.safetensors"),
        "--size": st.builds(lambda h, w: f"{16 * h}x{16 * w}", st.integers(1, 48), st.integers(1, 48)),
        "--frames": st.sampled_from([1, 8, 16, 24, 120]).map(str), "--steps": st.integers(1, 1000).map(str),
        "--seed": st.integers(0, 2**64 - 1).map(str), "--offload-steps": st.integers(0, 1000).map(str),
        "--cfg": st.floats(0, 20).map(repr), "--vram-budget": st.floats(0.5, 4096).map(repr),
        "--teacache": st.floats(0.01, 1).map(repr), "--enhance-a-video": st.floats(0, 100).map(repr),
        "--lora-strength": st.floats(-100, 100).map(repr), "--parallel-timeout": st.floats(1, 1e4).map(repr),
    }  # fmt: skip
    for option, choices in CHOICES.items():
        values[option] = st.sampled_from(choices)
    # each valid alone, but refused with several other options: among "anything"
    values.update({"--backend": st.just("torch"), "--compute": st.just("none"), "--attention": st.just("sdpa")})
    for flag in FLAGS:
        values[flag] = st.booleans()
    values["--fused-kernels"] = st.just(False)  # needs CUDA
    return values  # --parallel and --scales have no value that is valid alone here: only among "anything"


def _anything() -> dict[str, st.SearchStrategy]:
    """Any value, mostly invalid, one strategy per option."""
    paths = st.sampled_from(["good.png", "missing.png", "notes.txt", "sub", "style.safetensors"]) | text
    values: dict[str, st.SearchStrategy] = {
        "--model": st.sampled_from(["sub", "missing-folder", ""]) | text,
        "--image": st.lists(paths, max_size=7), "--end-image": st.lists(paths, max_size=6),
        "--out": st.sampled_from(["video.avi", "sub", "notes.txt/v.mp4", "good.png/x.mp4"]) | text,
        "--frames-dir": st.sampled_from(["sub", "notes.txt", "good.png"]) | text,
        "--size": st.builds(lambda h, w: f"{h}x{w}", st.integers(-16, 2100), st.integers(-16, 2100)) | text,
        "--device": st.sampled_from(["cuda", "cuda:0", "cuda:x", "mps", "cpu:1"]) | text, "--lora": paths,
        "--scales": paths,
        "--parallel": st.sampled_from(["ulysses=2", "cfg=2", "ring=0", "x", "ulysses=2,ulysses=2", "cfg=3"]) | text,
    }  # fmt: skip
    for option, choices in CHOICES.items():
        values[option] = st.sampled_from(choices) | text
    for option, (low, high) in INTEGERS.items():
        values[option] = st.integers(low, high).map(str) | text
    for option, (low, high) in NUMBERS.items():
        values[option] = st.floats(low, high).map(repr) | st.sampled_from(["nan", "inf", "-inf", "1e400"]) | text
    for flag in FLAGS:
        values[flag] = st.booleans()
    return values


VALID, ANYTHING = _valid(), _anything()


@st.composite
def option_values(draw) -> dict[str, object]:
    """Some options with accepted values, then up to two of them (or others) given anything."""
    assert set(VALID) <= set(ANYTHING) == RUN_OPTIONS, "a `run` option is not fuzzed"
    optional = {option: value for option, value in VALID.items() if option != "--image"}
    options = draw(st.fixed_dictionaries({"--image": VALID["--image"]}, optional=optional))
    for option in draw(st.lists(st.sampled_from(sorted(ANYTHING)), max_size=2, unique=True)):
        options[option] = draw(ANYTHING[option])
    return options


def command_line(options: dict[str, object]) -> list[str]:
    args = ["run"]
    for option, value in options.items():
        if isinstance(value, bool):
            args += [option] if value else []
        elif isinstance(value, list):
            for item in value:
                args += [option, item]
        else:
            args += [option, str(value)]
    return args


@settings(max_examples=250, deadline=datetime.timedelta(seconds=10), derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(options=option_values())
def test_run_never_tracebacks_and_every_refusal_names_option_and_range(workspace: Path, options: dict) -> None:
    args = command_line(options)
    result = CliRunner().invoke(main, args)
    if isinstance(result.exception, Validated):
        return
    assert isinstance(result.exception, SystemExit) or result.exception is None, (args, result.exception)
    assert "Traceback" not in result.output, (args, result.output)
    if result.exit_code == 0:
        assert "--plan-only" in args
        return
    assert result.exit_code == 2, (args, result.output)
    message = result.output.split("Error: ", 1)[-1]
    named = [flag for flag in re.findall(r"--[a-z0-9-]+", message) if flag in RUN_OPTIONS]
    assert named, f"{args}: the refusal names no option: {message}"
    assert ACCEPTED.search(message), f"{args}: the refusal does not say what is accepted: {message}"
    assert not list(workspace.rglob("*.mp4")) and not (workspace / "out").exists() and not (workspace / "frames").exists()
