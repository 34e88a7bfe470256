"""Real processes: the same seed gives the same mp4 bytes with ordinary file modes; Ctrl-C (SIGINT) during
download, export, engine build, sampling and encoding exits 130 and leaves nothing half-written; two processes
exporting or building the same thing at once take turns (the second reuses the first's result).

TensorRT cannot be installed here: the build tests run the real `engine.build.build_graph` (cache key, lock,
atomic engine folder, sidecar) with a stand-in for TensorRT's builder (`build_plan`) that sleeps and returns bytes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, serving

CLI = str(Path(sys.executable).with_name("ruyi-trt"))
SMALL_RUN = ["--model", "tiny", "--frames", "8", "--size", "64x96", "--steps", "2", "--no-progress"]


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A process whose stdout and stderr go to `log` (read while it runs)."""
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                umask=0o022)  # fmt: skip


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} too early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()}"
        time.sleep(0.02)


def interrupt(proc: subprocess.Popen, log: Path) -> str:
    """Ctrl-C: SIGINT, then the process must end by itself (130) within a minute; returns its output."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running a minute after SIGINT:\n{log.read_text()}") from None
    output = log.read_text()
    assert code == 130, output
    assert "interrupted (Ctrl-C)" in output and "Traceback" not in output
    return output


def everything(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# -- same seed, same file -----------------------------------------------------------------------------------------
def test_same_seed_twice_gives_byte_identical_mp4_with_ordinary_modes(tiny_dir: Path, start_png: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    videos = []
    for name in ("a", "b"):
        out = tmp_path / name / "video.mp4"
        done = subprocess.run([CLI, "run", *SMALL_RUN, "--image", str(start_png), "--out", str(out), "--frames-dir",
                               str(tmp_path / name / "frames"), "--seed", "7"], capture_output=True, text=True,
                              umask=0o022, check=False, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        videos.append(out.read_bytes())
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / name / "frames").stat().st_mode) == 0o755
        assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / name / "frames").iterdir()} == {0o644}
    assert videos[0] == videos[1]
    assert everything(tmp_path / "a") == {"video.mp4", "frames", *(f"frames/frame_{i:05d}.png" for i in range(8))}


# -- Ctrl-C -------------------------------------------------------------------------------------------------------
def test_ctrl_c_while_sampling(tiny_dir: Path, start_png: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out" / "video.mp4", tmp_path / "log"
    args = [CLI, "run", "--model", "tiny", "--frames", "8", "--size", "64x96", "--steps", "400", "--image",
            str(start_png), "--out", str(out)]  # fmt: skip
    proc = start(args, log)
    wait_for(lambda: "denoising" in log.read_text(), proc, log)
    time.sleep(0.3)
    interrupt(proc, log)
    assert not (tmp_path / "out").exists() or everything(tmp_path / "out") == set()


ENCODE_RUN = textwrap.dedent("""
    import sys, torch
    from ruyi_trt.runtime import pipeline
    from ruyi_trt.cli import main
    # the model's output stands in ready-made: 48 noisy 384 x 384 frames take seconds to encode
    frames = torch.randint(0, 256, (48, 384, 384, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pipeline.RuyiPipeline.generate = lambda self, request, progress=True: pipeline.Video(frames)
    main(sys.argv[1:])
""")


def test_ctrl_c_while_encoding(tiny_dir: Path, start_png: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "out" / "video.mp4", tmp_path / "log"
    proc = start([sys.executable, "-c", ENCODE_RUN, "run", *SMALL_RUN, "--image", str(start_png), "--out", str(out)], log)
    wait_for(lambda: (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir()), proc, log)
    time.sleep(0.3)
    interrupt(proc, log)
    assert everything(tmp_path / "out") == set()  # the temp file is gone, no video.mp4


def test_ctrl_c_while_exporting(tiny_dir: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "onnx", tmp_path / "log"
    proc = start([CLI, "export", "--model", "tiny", "--out", str(out), "--component", "transformer", "--no-progress"], log)
    wait_for(lambda: any(p.name.startswith(".onnx.transformer") for p in tmp_path.iterdir()), proc, log)
    time.sleep(0.5)
    interrupt(proc, log)
    assert everything(tmp_path) == {"log"}  # no graphs, no manifest, no scratch folder, no lock file


def test_two_exports_at_once_take_turns(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "onnx"
    args = [CLI, "export", "--model", "tiny", "--out", str(out), "--component", "image-encoder", "--no-progress"]
    procs = [start(args, tmp_path / f"log{i}") for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    logs = [(tmp_path / f"log{i}").read_text() for i in range(2)]
    states = sorted("exported" if "image-encoder: exported" in log else "cached" for log in logs)
    assert states == ["cached", "exported"], logs
    assert any("waiting for another process" in log for log in logs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["components"]) == ["image-encoder"]
    assert everything(tmp_path) == {"log0", "log1", "onnx", "onnx/manifest.json", "onnx/image_encoder.onnx"}


class StandInPlan:
    """What engine.builder.build_plan returns, as a stand-in for TensorRT makes it."""

    plan, num_layers, network_inputs, messages = b"stand-in plan " * 100, 1, {}, ["no TensorRT here"]


def build_once(onnx_dir: str, root: str, seconds: str, log: str) -> dict:
    """engine.build.build_graph for the tiny image encoder, with a stand-in builder that logs and sleeps (and no
    engine-inspector check of the attention, which needs TensorRT)."""
    from ruyi_trt.engine import build, cache
    from ruyi_trt.engine.builder import BuilderOptions
    from ruyi_trt.engine.plan import planned_engines
    from ruyi_trt.engine.profiles import FrameRange, graph_specs
    from ruyi_trt.engine.settings import BuildSettings
    from ruyi_trt.export import manifest
    from ruyi_trt.export.source import model_source

    def stand_in(onnx_path, profile, options, progress) -> StandInPlan:
        with open(log, "a") as handle:
            handle.write("build\n")
        time.sleep(float(seconds))
        return StandInPlan()

    build.build_plan = stand_in
    build.check_fused_attention = lambda plan, onnx_path, profile, name: 0
    source = model_source("tiny")
    settings = BuildSettings(model="tiny", precision="fp16", resolutions=("64x96",), frames=FrameRange(8, 8, 8))
    data = manifest.read_manifest(onnx_dir)
    specs = graph_specs(source.checkpoint, "fp16")
    (planned,) = [e for e in planned_engines(settings, specs, data, per_block=False) if e.graph == "image_encoder"]
    folder, built = build.build_graph(planned, data["components"]["image-encoder"], Path(onnx_dir), source, settings,
                                      BuilderOptions(), cache.Platform("stand-in GPU", "9.0", "10.0"), Path(root),
                                      False)  # fmt: skip
    cache.read_plan(folder, cache.read_record(folder))  # size and sha256 match the sidecar
    return {"folder": str(folder), "built": built}


BUILD = ("import json, sys; sys.path.insert(0, sys.argv.pop(1)); from test_processes import build_once; "
         "print(json.dumps(build_once(*sys.argv[1:])))")  # fmt: skip


def build_args(exported_dir: Path, root: Path, seconds: float, log: Path) -> list[str]:
    return [sys.executable, "-c", BUILD, str(Path(__file__).parent), str(exported_dir), str(root), str(seconds), str(log)]


def test_two_builds_of_one_engine_take_turns(exported_dir: Path, tmp_path: Path) -> None:
    root, builds = tmp_path / "engines", tmp_path / "builds"
    procs = [subprocess.Popen(build_args(exported_dir, root, 2.0, builds), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert builds.read_text() == "build\n"  # built once
    assert sorted(r["built"] for r in results) == [False, True] and results[0]["folder"] == results[1]["folder"]
    folder = Path(results[0]["folder"])
    assert everything(root) == {folder.name, *(f"{folder.name}/{n}" for n in ("engine.plan", "engine.json", "build.log"))}


def test_ctrl_c_while_building_leaves_no_engine_folder(exported_dir: Path, tmp_path: Path) -> None:
    root, log = tmp_path / "engines", tmp_path / "log"
    proc = start(build_args(exported_dir, root, 60.0, tmp_path / "builds"), log)
    wait_for(lambda: (tmp_path / "builds").exists(), proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) != 0 and "KeyboardInterrupt" in log.read_text()
    assert not root.exists() or everything(root) == set()  # no engine folder, no temp folder, no lock file


def test_damaged_engine_folder_is_rebuilt(exported_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from ruyi_trt.engine import build

    monkeypatch.setattr(build, "build_plan", build.build_plan)  # build_once replaces them: undone after the test
    monkeypatch.setattr(build, "check_fused_attention", build.check_fused_attention)
    root, builds = tmp_path / "engines", tmp_path / "builds"
    args = (str(exported_dir), str(root), "0", str(builds))
    folder = Path(build_once(*args)["folder"])
    plan = folder / "engine.plan"
    plan.write_bytes(plan.read_bytes()[:100])  # truncated, as a crash of an older version could leave it
    assert build_once(*args)["built"] is True
    (folder / "engine.json").unlink()  # a plan without its sidecar
    assert build_once(*args)["built"] is True and build_once(*args)["built"] is False
    assert builds.read_text() == "build\n" * 3


# -- Ctrl-C during the download -----------------------------------------------------------------------------------
DOWNLOAD_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ruyi_trt.models import checkpoint
    checkpoint.DEFAULT_MODEL_DIR = Path(sys.argv[1])  # where `run` without --model downloads Ruyi-Mini-7B
    if sys.argv[2] == "resume":
        checkpoint.download_checkpoint(checkpoint.DEFAULT_MODEL_DIR)
    else:
        from ruyi_trt.cli import main
        main(sys.argv[2:])
""")


@pytest.fixture()
def hub(tiny_dir: Path) -> Iterator[FakeHub]:
    with serving(FakeHub.of_folder("IamCreateAI/Ruyi-Mini-7B", tiny_dir)) as server:
        yield server


def test_ctrl_c_while_downloading_then_resume(hub: FakeHub, tiny_dir: Path, start_png: Path, tmp_path: Path) -> None:
    from ruyi_trt.models.checkpoint import Checkpoint, missing_parts

    target, log = tmp_path / "Ruyi-Mini-7B", tmp_path / "log"
    env = {**hub.env(), "HF_HOME": str(tmp_path / "hf")}
    hub.delay = 0.05
    proc = start([sys.executable, "-c", DOWNLOAD_RUN, str(target), "run", "--image", str(start_png), "--out",
                  str(tmp_path / "video.mp4")], log, env)  # fmt: skip
    wait_for(lambda: any(target.glob(".cache/huggingface/download/**/*.incomplete")), proc, log)
    interrupt(proc, log)
    assert "interrupted; the next run resumes it" in log.read_text()
    assert any("interrupted download" in part for part in missing_parts(target)), "\n".join(sorted(everything(target)))
    for path in target.rglob("*"):  # whatever has its final name is complete
        rel = path.relative_to(target).as_posix()
        if path.is_file() and not rel.startswith(".cache/"):
            assert path.read_bytes() == (tiny_dir / rel).read_bytes(), rel
    assert not (tmp_path / "video.mp4").exists()
    hub.delay = 0.0
    done = subprocess.run([sys.executable, "-c", DOWNLOAD_RUN, str(target), "resume"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert missing_parts(target) == []
    for name in hub.files:
        assert (target / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    Checkpoint.from_folder(target)


def test_readme_documents_the_exit_codes() -> None:
    from ruyi_trt.cli import EXIT_INTERRUPTED, InputError

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("Exit codes of `ruyi-trt run`", 1)[1].split("\n\n", 2)[1]
    codes = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert codes == ["0", str(InputError.exit_code), "1", str(EXIT_INTERRUPTED)] == ["0", "2", "1", "130"]
