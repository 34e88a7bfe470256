"""The nodes in a real ComfyUI: the snapshot in ../shared/comfyui/src (0.3.64), started on 127.0.0.1 with this
checkout in custom_nodes/ and the tiny model in a `Ruyi:` folder of an extra_model_paths.yaml. API-format
workflows are posted to it and followed on its websocket: a start + end image video (8 frames, 2 steps) whose saved
PNG frames and mp4 are read back, one progress bar over the whole job with latent previews, ComfyUI's "free
memory" unloading the pipeline, Cancel during VAE encode, an error in node terms; and every example workflow is
checked against /object_info. Every wait is bounded and the server is stopped by its PID.

This needs ComfyUI's own environment: `bash tools/comfyui_check.sh` makes it and runs this file (a CI step of
`.ci/run`); elsewhere these tests are skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ruyi_trt.testing import gradient_image

REPO = Path(__file__).resolve().parents[2]
SRC = Path(os.environ.get("RUYI_COMFYUI_SRC", REPO.parent / "shared" / "comfyui" / "src")).resolve()  # ComfyUI runs in its base folder
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
NODE_TYPES = {"RuyiTRTLoadModel", "RuyiTRTLoadLora", "RuyiTRTTeaCache", "RuyiTRTEnhanceAVideo", "RuyiTRTSampler"}
STARTUP_SECONDS, JOB_SECONDS, LOG_SECONDS = 240, 300, 60
TEXT, PREVIEW_IMAGE = 3, 1  # ComfyUI's binary websocket events (protocol.BinaryEventTypes)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(os.environ.get("RUYI_COMFYUI_TEST") != "1",
                       reason="needs ComfyUI's environment: run `bash tools/comfyui_check.sh` (a CI step)"),
]  # fmt: skip


@dataclass
class Job:
    """What the websocket said about one prompt."""

    prompt_id: str
    progress: list[tuple[str, int, int]] = field(default_factory=list)  # (node, value, max)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (node, text)
    previews: list[bytes] = field(default_factory=list)
    end: tuple[str, dict] | None = None  # execution_success / execution_error / execution_interrupted

    def read(self, message: object) -> None:
        if isinstance(message, bytes):
            (event,) = struct.unpack(">I", message[:4])
            if event == TEXT:
                (length,) = struct.unpack(">I", message[4:8])
                self.texts.append((message[8 : 8 + length].decode(), message[8 + length :].decode()))
            elif event == PREVIEW_IMAGE:
                self.previews.append(message[8:])
            return
        kind, data = message["type"], message.get("data", {})
        if data.get("prompt_id") != self.prompt_id:
            return
        if kind == "progress":
            self.progress.append((data["node"], data["value"], data["max"]))
        elif kind in ("execution_success", "execution_error", "execution_interrupted"):
            self.end = (kind, data)


class Comfy:
    """A ComfyUI server started by the fixture, and the HTTP / websocket calls the tests make to it."""

    def __init__(self, port: int, base: Path, log: Path, process: subprocess.Popen):
        self.url, self.base, self.log, self.process = f"http://127.0.0.1:{port}", base, log, process

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, data: dict) -> None:
        request = urllib.request.Request(self.url + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()

    def run(self, prompt: dict, react=None, timeout: float = JOB_SECONDS) -> Job:
        """Post an API-format `prompt` and follow it until it succeeds, fails or is interrupted (at most `timeout`
        seconds); `react(job, post)` is called after every message (e.g. to interrupt)."""
        return asyncio.run(self._run(prompt, react, timeout))

    async def _run(self, prompt: dict, react, timeout: float) -> Job:
        import aiohttp  # ComfyUI's own dependency: present in its environment

        client_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
            async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as reply:
                body = await reply.json()
                assert reply.status == 200, body
            job = Job(body["prompt_id"])

            async def post(path: str, data: dict) -> None:
                async with session.post(self.url + path, json=data) as response:
                    assert response.status == 200

            while job.end is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no end of the job within {timeout} s; server log:\n{self.log_tail()}")
                message = await ws.receive(timeout=left)
                if message.type == aiohttp.WSMsgType.BINARY:
                    job.read(message.data)
                elif message.type == aiohttp.WSMsgType.TEXT:
                    job.read(json.loads(message.data))
                else:
                    pytest.fail(f"the websocket closed ({message.type}); server log:\n{self.log_tail()}")
                if react is not None:
                    await react(job, post)
            return job

    def wait_for_log(self, text: str, timeout: float = LOG_SECONDS, repost: tuple[str, dict] | None = None) -> None:
        """Wait until `text` is in the server log, posting `repost` (path, data) every 2 s meanwhile."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not in the server log within {timeout} s:\n{self.log_tail()}")
            if repost is not None:
                self.post(*repost)
            time.sleep(2)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Comfy:
    base = tmp_path_factory.mktemp("comfyui")
    for folder in ("custom_nodes", "input", "output", "user", "extra/ruyi"):
        (base / folder).mkdir(parents=True)
    (base / "custom_nodes" / "ruyi-trt").symlink_to(REPO, target_is_directory=True)
    (base / "extra" / "ruyi" / "mine").symlink_to(tiny_dir, target_is_directory=True)
    paths = base / "extra_model_paths.yaml"
    paths.write_text(f"ruyi_test:\n    base_path: {base / 'extra'}\n    Ruyi: ruyi\n")
    gradient_image(96, 64).save(base / "input" / "start.png")
    gradient_image(96, 64, phase=2.0).save(base / "input" / "end.png")
    port, log = free_port(), base / "comfyui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # never download 17 GB from a test
    command = [sys.executable, str(SRC / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(paths), "--preview-method", "auto"]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=base)
    server = Comfy(port, base, log, process)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{server.log_tail()}")
            try:
                server.get("/system_stats")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {STARTUP_SECONDS} s:\n{server.log_tail()}")
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def video_prompt(model: str = "mine", seed: int = 1, **sampler: object) -> dict:
    """LoadImage x2 -> Load Model -> Sampler (start + end image) -> Save Image, and its VIDEO -> Save Video."""
    settings = {"video_length": 8, "base_resolution": "512", "seed": seed, "steps": 2, "cfg": 7.0,
                "scheduler": "DDIM", "motion": "2", "camera": "static", "height": 64, "width": 96, **sampler}  # fmt: skip
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "start.png"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "end.png"}},
        "3": {"class_type": "RuyiTRTLoadModel", "inputs": {"model": model, "backend": "torch", "dtype": "auto",
              "memory_mode": "auto", "offload_steps": "auto", "fp8": "none", "fp8_storage": "fp8_e4m3fn"}},
        "4": {"class_type": "RuyiTRTSampler", "inputs": {"pipeline": ["3", 0], "start_image": ["1", 0],
              "end_image": ["2", 0], **settings}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": f"ruyi{seed}"}},
        "6": {"class_type": "SaveVideo", "inputs": {"video": ["4", 2], "filename_prefix": f"video/ruyi{seed}",
              "format": "mp4", "codec": "h264"}},
    }  # fmt: skip


def texts_of(job: Job, node: str) -> list[str]:
    return [text for where, text in job.texts if where == node]


def test_object_info_lists_the_nodes_and_the_model_folders(comfy: Comfy) -> None:
    info = comfy.get("/object_info")
    assert NODE_TYPES <= set(info)
    assert info["RuyiTRTSampler"]["output"] == ["IMAGE", "FLOAT", "VIDEO"]
    # "mine" comes from the `Ruyi:` folder of extra_model_paths.yaml, then the downloadable default and the presets
    assert info["RuyiTRTLoadModel"]["input"]["required"]["model"][0] == ["mine", "Ruyi-Mini-7B", "tiny", "full-random"]
    assert all(info[node]["category"] == "Ruyi-TRT" for node in NODE_TYPES)


def test_start_and_end_image_video(comfy: Comfy) -> None:
    job = comfy.run(video_prompt())
    assert job.end[0] == "execution_success", job.end
    bar = [(value, total) for node, value, total in job.progress if node == "4"]
    # one bar over load (4 steps), VAE encode (2 chunks), 2 steps and VAE decode (1 chunk)
    assert bar[-1] == (9, 9) and [v for v, _ in bar] == sorted(v for v, _ in bar) and bar[0][0] <= 1
    texts = texts_of(job, "4")
    assert texts[0] == "loading the model 1/4" and "VAE encode 2/2" in texts and "denoising 2/2" in texts
    assert texts[-1] == "VAE decode 1/1"
    assert len(job.previews) == 2 and all(p[:2] == b"\xff\xd8" for p in job.previews)  # a JPEG after each step

    from PIL import Image

    frames = sorted((comfy.base / "output").glob("ruyi1_*.png"))
    assert len(frames) == 8
    pixels = [Image.open(path).convert("RGB") for path in frames]
    assert all(image.size == (96, 64) for image in pixels)
    assert len({image.tobytes() for image in pixels}) > 1  # not one frame repeated

    import av

    (video,) = (comfy.base / "output" / "video").glob("ruyi1_*.mp4")
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        assert stream.average_rate == 24 and len(decoded) == 8 and decoded[0].shape == (64, 96, 3)


def test_free_memory_unloads_then_cancel_during_vae_encode(comfy: Comfy) -> None:
    # ComfyUI's worker reads /free's flag when it starts waiting for a prompt, or when woken while waiting: a flag set
    # while it is still tidying up after the last job waits for the next one. So post it until it is seen.
    comfy.wait_for_log("Ruyi-TRT: ComfyUI freed memory, the pipeline is unloaded", repost=("/free", {"unload_models": True}))
    interrupted = []

    async def cancel_in_vae_encode(job: Job, post) -> None:
        if not interrupted and any(text.startswith("VAE encode 1/") for text in texts_of(job, "4")):
            interrupted.append(time.monotonic())
            await post("/interrupt", {})

    job = comfy.run(video_prompt(seed=2), react=cancel_in_vae_encode)
    assert interrupted and job.end[0] == "execution_interrupted", job.end
    assert job.end[1]["node_type"] == "RuyiTRTSampler"
    texts = texts_of(job, "4")
    assert texts[:4] == [f"loading the model {i}/4" for i in (1, 2, 3, 4)]  # unloaded by /free: loaded again
    assert texts[-1] == "VAE encode 1/2" and not any(text.startswith("denoising") for text in texts)
    assert not list((comfy.base / "output").glob("ruyi2_*"))


def test_errors_read_in_node_terms(comfy: Comfy) -> None:
    """Ruyi-Mini-7B is in no Ruyi folder and the server is offline: its download fails in Load Model."""
    job = comfy.run(video_prompt(model="Ruyi-Mini-7B", seed=3))
    kind, data = job.end
    assert kind == "execution_error" and data["node_type"] == "RuyiTRTLoadModel"
    assert data["exception_type"] == "RuntimeError"  # not a path-named module's CheckpointError
    message = data["exception_message"]
    assert message.startswith("could not download IamCreateAI/Ruyi-Mini-7B") and "--model" not in message
    assert "(Load Model's model)" in message and "model tiny" in message
    # the first Ruyi folder (extra_model_paths.yaml's) would receive it: nothing was left there
    assert not (comfy.base / "extra" / "ruyi" / "Ruyi-Mini-7B").exists()


def input_type(info: dict, node: str, name: str) -> str:
    inputs = info[node]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}[name]
    return "COMBO" if isinstance(spec[0], list) else spec[0]


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_loads(comfy: Comfy, path: Path) -> None:
    """Every node type is known to this ComfyUI, every node's slots are its outputs, every link joins an output
    and an input of its type, and our nodes' widget values are valid choices and numbers in range."""
    info = comfy.get("/object_info")
    workflow = json.loads(path.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in info, f"{path.name}: unknown node type {node['type']}"
        assert [o["type"] for o in node.get("outputs", [])] == info[node["type"]]["output"], node["type"]
    assert len(workflow["links"]) > 0
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert info[nodes[source]["type"]]["output"][source_slot] == kind, (path.name, link_id)
        slot = nodes[target]["inputs"][target_slot]
        assert slot["link"] == link_id and slot["type"] == kind, (path.name, link_id)
        assert input_type(info, nodes[target]["type"], slot["name"]) == kind, (path.name, link_id)
        assert link_id in nodes[source]["outputs"][source_slot]["links"], (path.name, link_id)
    for node in nodes.values():
        if node["type"] in NODE_TYPES:
            check_widgets(info, node)


def check_widgets(info: dict, node: dict) -> None:
    """widgets_values hold, in input order, one value per widget input (a seed is followed by its
    control_after_generate choice), each a valid choice (but the LoRA file) or a number within the input's range."""
    inputs = info[node["type"]]["input"]
    linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
    values = list(node["widgets_values"])
    for name, spec in {**inputs.get("required", {}), **inputs.get("optional", {})}.items():
        kind = spec[0]
        if name in linked or not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")):
            continue
        value = values.pop(0)
        options = spec[1] if len(spec) > 1 else {}
        if isinstance(kind, list) and name != "lora":  # the LoRA list is the user's models/loras folder
            assert value in kind, (node["type"], name, value)
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= value <= options["max"], (node["type"], name, value)
        if name == "seed":
            assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), (node["type"], name)
    assert not values, (node["type"], "extra widget values", values)
