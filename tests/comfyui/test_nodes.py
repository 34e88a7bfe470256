"""The ComfyUI nodes: declarations, widget defaults, an end-to-end sample on the tiny model, the ComfyUI
hooks (model folders and dropdown, one progress bar over the job, Cancel, previews, progress text, memory
management) through stand-in modules, messages in node terms, cheap imports and a ComfyUI-style load. The real
ComfyUI runs in tests/comfyui/test_real_comfyui.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from ruyi_trt.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, managed, nodes
from ruyi_trt.comfyui.convert import images_to_pil, video_to_images
from ruyi_trt.comfyui.errors import comfy_message
from ruyi_trt.models.checkpoint_io import CheckpointError
from ruyi_trt.runtime.pipeline import Video
from ruyi_trt.runtime.stats import RunStats
from ruyi_trt.testing import gradient_image

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFYUI_SRC = REPO_ROOT.parent / "shared" / "comfyui" / "src"
SAMPLE_ARGS = {"video_length": 8, "base_resolution": "512", "seed": 1, "steps": 2, "cfg": 7.0, "scheduler": "DDIM",
               "motion": "2", "camera": "static", "height": 64, "width": 96}  # fmt: skip


def comfy_images(*images) -> torch.Tensor:
    """PIL images as a ComfyUI IMAGE batch [B, H, W, 3] in [0, 1]."""
    return torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255) for image in images])


def load_tiny(**overrides):
    args = {"model": "tiny", "backend": "torch", "dtype": "auto", "memory_mode": "auto", "fp8": "none",
            "fp8_storage": "auto"}  # fmt: skip
    return nodes.RuyiTRTLoadModel().load(**{**args, **overrides})[0]


@pytest.fixture()
def comfy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.SimpleNamespace:
    """Stand-ins for the ComfyUI modules the nodes use: folder_paths, comfy.utils, comfy.model_management,
    comfy.cli_args and the server's progress text, recording what the nodes do with them."""
    record = types.SimpleNamespace(updates=[], previews=[], texts=[], interrupt=False, loaded=[],
                                   loras=tmp_path / "loras", models=tmp_path / "models")  # fmt: skip
    record.loras.mkdir()
    (record.loras / "style.safetensors").write_bytes(b"")
    folders: dict[str, list[str]] = {}

    class ProgressBar:
        def __init__(self, total: int, node_id: str | None = None):
            record.updates.append(("total", total))

        def update_absolute(self, value: int, total: int, preview=None) -> None:
            if preview is None:
                record.updates.append((value, total))
            else:
                record.previews.append((value, preview))

    class Interrupted(Exception):
        pass

    def throw_exception_if_processing_interrupted() -> None:
        if record.interrupt:
            raise Interrupted()

    def add_model_folder_path(kind: str, path: str, is_default: bool = False) -> None:
        if path not in folders.setdefault(kind, []):
            folders[kind].append(path)

    folder_paths = types.SimpleNamespace(
        models_dir=str(record.models),
        add_model_folder_path=add_model_folder_path,
        get_folder_paths=lambda kind: list(folders[kind]),
        get_filename_list=lambda kind: sorted(p.name for p in record.loras.iterdir()),
        get_full_path=lambda kind, name: str(record.loras / name) if (record.loras / name).is_file() else None,
    )
    model_management = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"),
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        load_models_gpu=lambda models: record.loaded.append(models),
    )
    methods = types.SimpleNamespace(NoPreviews="none", Auto="auto")
    record.args = types.SimpleNamespace(preview_size=512, preview_method="auto")
    cli_args = types.SimpleNamespace(LatentPreviewMethod=methods, args=record.args)
    server = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=types.SimpleNamespace(
        send_progress_text=lambda text, node_id: record.texts.append((node_id, text)))))  # fmt: skip
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", model_management)
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    monkeypatch.setitem(sys.modules, "server", server)
    monkeypatch.setattr(managed, "_managed", [])
    record.Interrupted, record.folders = Interrupted, folders
    return record


def test_mappings_share_keys_and_nodes_declare_everything() -> None:
    assert list(NODE_CLASS_MAPPINGS) == list(NODE_DISPLAY_NAME_MAPPINGS) == [n.__name__ for n in nodes.NODES]
    for key, node in NODE_CLASS_MAPPINGS.items():
        assert NODE_DISPLAY_NAME_MAPPINGS[key].startswith("Ruyi-TRT ")
        assert node.CATEGORY == "Ruyi-TRT"
        assert callable(getattr(node, node.FUNCTION))
        assert isinstance(node.RETURN_TYPES, tuple) and len(node.RETURN_NAMES) == len(node.RETURN_TYPES)
        assert set(node.INPUT_TYPES()) <= {"required", "optional", "hidden"}
    assert nodes.RuyiTRTSampler.RETURN_TYPES == ("IMAGE", "FLOAT")  # + VIDEO inside a ComfyUI that has it


def test_widget_defaults_lie_within_their_ranges() -> None:
    for node in nodes.NODES:
        for name, spec in {**node.INPUT_TYPES()["required"], **node.INPUT_TYPES().get("optional", {})}.items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list):
                assert options.get("default", kind[0]) in kind, name
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], name
                if kind == "INT":
                    assert (options["default"] - options["min"]) % options["step"] == 0, name


def test_sampler_on_the_tiny_model_returns_image_frames(tiny_dir: Path) -> None:
    spec = load_tiny()
    assert spec.model == str(tiny_dir) and spec.options.dtype == "fp32" and spec.options.device == "cpu"
    start = comfy_images(gradient_image(90, 60))
    frames, fps = nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)
    assert frames.shape == (8, 64, 96, 3) and frames.dtype == torch.float32 and fps == 24.0
    assert 0 <= frames.min() and frames.max() <= 1 and torch.isfinite(frames).all()


def test_rerun_reuses_the_loaded_pipeline_and_one_bar_covers_the_job(tiny_dir: Path, comfy) -> None:
    nodes.pipelines().clear()  # loaded by an earlier test
    spec = load_tiny()
    start = comfy_images(gradient_image(90, 60))
    nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS, unique_id="7")
    loaded = nodes.pipelines()._pipeline
    # first run: load (4 steps: three models, then the runner), VAE encode (2 chunks), 2 steps, VAE decode (2
    # latents: 1 chunk) on one bar
    assert comfy.updates[0] == ("total", 9) and [v for v, _ in comfy.updates[1:]] == list(range(1, 10))
    assert [text for _, text in comfy.texts[:5]] == [f"loading the model {i}/4" for i in (1, 2, 3, 4)] + ["VAE encode 1/2"]
    assert {node for node, _ in comfy.texts} == {"7"} and comfy.texts[-1][1] == "VAE decode 1/1"
    assert [step for step, _ in comfy.previews] == [7, 8]  # after each denoising step
    kind, image, size = comfy.previews[0][1]
    assert (kind, image.size, size) == ("JPEG", (96, 64), 512)
    assert len(comfy.loaded) == 1 and comfy.loaded[0][0].model is loaded  # listed with ComfyUI's model management
    comfy.updates.clear()
    comfy.previews.clear()
    comfy.args.preview_method = "none"
    nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)
    assert nodes.pipelines()._pipeline is loaded
    assert comfy.updates == [("total", 5), *((value, 5) for value in range(1, 6))]  # loaded already: no load stage
    assert not comfy.previews  # ComfyUI's preview method "none" is honoured
    comfy.interrupt = True
    with pytest.raises(comfy.Interrupted):
        nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)
    assert comfy.updates[-1] == ("total", 5)  # Cancel is seen at the first report (the first VAE chunk)


def test_frames_that_are_not_a_multiple_of_8_are_rounded_with_a_warning(tiny_dir: Path, comfy) -> None:
    frames, _ = nodes.RuyiTRTSampler().sample(load_tiny(), comfy_images(gradient_image(90, 60)),
                                              **{**SAMPLE_ARGS, "video_length": 12}, unique_id="3")  # fmt: skip
    assert frames.shape[0] == 8
    warning = "video_length 12 is not a multiple of 8: making 8 frames"
    assert comfy.texts[0] == ("3", warning) and all(text.startswith(warning) for _, text in comfy.texts)


def test_comfyui_freeing_memory_unloads_the_pipeline(tiny_dir: Path, comfy) -> None:
    spec = load_tiny()
    nodes.RuyiTRTSampler().sample(spec, comfy_images(gradient_image(90, 60)), **SAMPLE_ARGS)
    model = comfy.loaded[-1][0]
    pipe = nodes.pipelines().get(spec)
    assert model.model is pipe and pipe.is_loaded
    assert model.loaded_size() == model.model_size() > 0 and model.current_loaded_device() == torch.device("cpu")
    assert model.partially_unload(torch.device("cpu"), 1) == 0  # all or nothing: ComfyUI then detaches it
    model.detach()
    assert not pipe.is_loaded and model.loaded_size() == 0
    nodes.RuyiTRTSampler().sample(spec, comfy_images(gradient_image(90, 60)), **SAMPLE_ARGS)
    assert pipe.is_loaded and comfy.loaded[-1][0] is model  # loaded again for the next sample, listed again


def test_comfyui_model_management_lists_once_and_unloads(tiny_dir: Path, tmp_path: Path) -> None:
    """Against ComfyUI's own comfy.model_management (from ../shared/comfyui/src, on the CPU): samples list the
    pipeline once however often they claim it, "Unload Models" unloads it, and the next claim lists it again."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(COMFYUI_SRC)!r})\n"
        "from comfy.cli_args import args\n"
        "args.cpu = True\n"
        "import comfy.model_management as mm\n"
        "from ruyi_trt import RuyiPipeline\n"
        "from ruyi_trt.comfyui.managed import claim_memory\n"
        f"pipe = RuyiPipeline.from_pretrained({str(tiny_dir)!r}, device='cpu')\n"
        "claim_memory(pipe); claim_memory(pipe)\n"
        "seen = [len(mm.current_loaded_models), pipe.is_loaded]\n"
        "mm.unload_all_models()\n"
        "seen += [len(mm.current_loaded_models), pipe.is_loaded]\n"
        "claim_memory(pipe); pipe.load(); mm.cleanup_models_gc()\n"
        "seen += [len(mm.current_loaded_models), pipe.is_loaded, mm.loaded_models()[0] is not None]\n"
        "print(json.dumps(seen))\n"
    )
    assert run_python(code, tmp_path) == [1, True, 0, False, 1, True, True]


def test_tea_cache_and_enhance_a_video_nodes_set_options(tiny_dir: Path) -> None:
    spec = load_tiny(offload_steps="1")
    assert spec.options.offload_steps == 1 and load_tiny().options.offload_steps is None
    (cached,) = nodes.RuyiTRTTeaCache().tea_cache(spec, True, 0.15, 2, 3)
    options = cached.options
    assert (options.teacache_threshold, options.teacache_skip_start, options.teacache_skip_end) == (0.15, 2, 3)
    assert nodes.RuyiTRTTeaCache().tea_cache(spec, False, 0.15, 2, 3)[0].options.teacache_threshold is None
    (enhanced,) = nodes.RuyiTRTEnhanceAVideo().enhance_a_video(cached, True, 2.5, 1, 0)
    options = enhanced.options
    assert (options.enhance_a_video, options.enhance_a_video_skip_start, options.enhance_a_video_skip_end) == (2.5, 1, 0)
    assert enhanced.options.teacache_threshold == 0.15 and enhanced.model == spec.model
    assert nodes.RuyiTRTEnhanceAVideo().enhance_a_video(spec, False, 2.5, 0, 0)[0].options.enhance_a_video is None
    with pytest.raises(ValueError, match=r"^backend ort: \['teacache'\] only apply to the torch backend; drop them or "
                       r"use backend torch\.$"):  # fmt: skip
        nodes.RuyiTRTTeaCache().tea_cache(load_tiny(backend="ort"), True, 0.1, 3, 1)


class RecordingCache:
    """Stands in for the pipeline cache and its pipeline: keeps the request and returns a blank video of its size."""

    vae_config = types.SimpleNamespace(mini_batch_encoder=8)

    def get(self, spec):
        return self

    def progress_totals(self, request):
        return {"denoise": request.steps}

    def generate(self, request, callback=None, preview=None):
        self.request = request
        return Video(torch.zeros(request.frames, *request.size, 3, dtype=torch.uint8), 24, RunStats())


def test_image_batches_map_to_leading_and_trailing_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RecordingCache()
    monkeypatch.setattr(nodes, "pipelines", lambda: cache)
    starts = [gradient_image(48, 32, phase=p) for p in (0.0, 1.0)]
    end = gradient_image(48, 32, phase=2.0)
    frames, _ = nodes.RuyiTRTSampler().sample(None, comfy_images(*starts), end_image=comfy_images(end), **SAMPLE_ARGS)
    request = cache.request
    assert frames.shape == (8, 64, 96, 3)
    assert [np.asarray(i).tolist() for i in request.start_images] == [np.asarray(i).tolist() for i in starts]
    assert np.array_equal(np.asarray(request.end_images[0]), np.asarray(end))
    assert (request.frames, request.size, request.guidance_scale, request.camera) == (8, (64, 96), 7.0, "static")


def test_library_validation_errors_surface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes, "pipelines", RecordingCache)
    six = comfy_images(*[gradient_image(48, 32)] * 6)
    with pytest.raises(ValueError, match="at most 5"):
        nodes.RuyiTRTSampler().sample(None, six, **SAMPLE_ARGS)
    with pytest.raises(ValueError, match="size"):
        nodes.RuyiTRTSampler().sample(None, six[:1], **{**SAMPLE_ARGS, "width": 0})
    with pytest.raises(ValueError, match="ComfyUI IMAGE"):
        images_to_pil(torch.zeros(1, 8, 8, 4), "start_image")
    with pytest.raises(ValueError, match="bf16"):
        load_tiny(backend="ort", dtype="bf16")


def test_messages_name_node_inputs_and_types_read_as_class_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert comfy_message("use --backend torch or ort; try --dtype fp32/bf16, fewer --frames or --resolution 512") == (
        "use backend torch or ort; try dtype fp32/bf16, fewer video_length or base_resolution 512")
    assert comfy_message("pass --model PATH (or use --model tiny), or omit --model") == (
        "pass a checkpoint folder in models/Ruyi (Load Model's model) (or use model tiny), or choose Ruyi-Mini-7B "
        "in Load Model's model")  # fmt: skip
    assert comfy_message("no GPU to plan for: pass --vram-budget GB (e.g. 24)") == (
        "no GPU to plan for: pass a GPU (ComfyUI plans for the free GPU memory)")
    command = "build them with `ruyi-trt build --model x --resolution 512 --frames 8:24:120`"
    assert comfy_message(command) == command  # commands to run elsewhere stay as they are

    def broken(spec):
        raise CheckpointError("model folder x does not exist. Pass --model PATH to a Ruyi-Mini-7B folder.")

    class Cache:
        def get(self, spec):
            broken(spec)

    monkeypatch.setattr(nodes, "pipelines", Cache)
    with pytest.raises(RuntimeError) as caught:
        nodes.RuyiTRTSampler().sample(None, comfy_images(gradient_image(48, 32)), **SAMPLE_ARGS)
    assert type(caught.value) is RuntimeError and isinstance(caught.value.__cause__, CheckpointError)
    assert str(caught.value) == "model folder x does not exist. Pass a checkpoint folder in models/Ruyi (Load Model's " \
                                "model) to a Ruyi-Mini-7B folder."  # fmt: skip


def test_conversions_round_trip() -> None:
    image = gradient_image(20, 10)
    assert np.array_equal(np.asarray(images_to_pil(comfy_images(image)[0], "start_image")[0]), np.asarray(image))
    frames = torch.randint(0, 256, (8, 10, 20, 3), dtype=torch.uint8)
    images = video_to_images(frames)
    assert images.dtype == torch.float32 and torch.equal(images[3], frames[3].float() / 255)


def test_models_and_loras_come_from_comfyui_folders(tiny_dir: Path, comfy, tmp_path: Path) -> None:
    extra = tmp_path / "extra"  # a `Ruyi:` path of extra_model_paths.yaml, registered before the nodes load
    comfy.folders["Ruyi"] = [str(extra)]
    for root, name in ((comfy.models / "Ruyi", "mine"), (extra, "theirs"), (extra, "mine")):
        root.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(tiny_dir, target_is_directory=True)
    (extra / "half-downloaded").mkdir()
    choices = nodes.RuyiTRTLoadModel.INPUT_TYPES()["required"]["model"]
    assert choices == (["mine", "theirs", "Ruyi-Mini-7B", "tiny", "full-random"], choices[1])
    assert choices[1]["default"] == "Ruyi-Mini-7B"
    assert comfy.folders["Ruyi"] == [str(extra), str(comfy.models / "Ruyi")]
    assert load_tiny(model="mine").model == str(extra / "mine")  # the first folder that has the name
    assert load_tiny(model="theirs").model == str(extra / "theirs")
    with pytest.raises(ValueError, match=r"^model: 'absent' is not a folder in .*extra, .*Ruyi; put the checkpoint"):
        load_tiny(model="absent")
    for hostile in ("../mine", str(tiny_dir), "..", "mine/../../extra"):
        with pytest.raises(ValueError, match=r"is outside .*extra or .*Ruyi; names with '\.\.' or absolute paths"):
            load_tiny(model=hostile)
    for folder in ("", ".", str(extra)):
        with pytest.raises(ValueError, match="is not a checkpoint folder name; choose one from the list"):
            load_tiny(model=folder)
    assert load_tiny(model=str(extra / "theirs")).model == str(extra / "theirs")  # an absolute path inside is fine
    with pytest.raises(RuntimeError, match="half-downloaded is not a complete Ruyi checkpoint"):
        load_tiny(model="half-downloaded")

    spec = load_tiny(model="mine")
    lora_node = nodes.RuyiTRTLoadLora()
    assert lora_node.INPUT_TYPES()["required"]["lora"] == (["style.safetensors"],)
    (with_lora,) = lora_node.load_lora(spec, "style.safetensors", 0.5)
    assert with_lora.options.loras == ((str(comfy.loras / "style.safetensors"), 0.5),)
    assert with_lora.model == spec.model and spec.options.loras == ()
    (chained,) = lora_node.load_lora(with_lora, "style.safetensors", -1.0)  # chained, as the original's node
    assert chained.options.loras == ((str(comfy.loras / "style.safetensors"), 0.5), (str(comfy.loras / "style.safetensors"), -1.0))
    with pytest.raises(ValueError, match="is not a file"):
        lora_node.load_lora(spec, "missing.safetensors", 1.0)


def test_the_default_model_downloads_with_progress_and_cancel(comfy, monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing Ruyi-Mini-7B while it is missing downloads it into the first Ruyi folder with the node's progress
    bar in bytes; Cancel stops it (the download itself is models/download.py, tested against a local Hub)."""
    calls = []

    def fake_download(folder: Path, repo_id: str = "", progress=None) -> Path:
        calls.append(folder)
        for done in (0, 2**30, 3 * 2**30):
            progress(done, 3 * 2**30)
        raise comfy.Interrupted()

    monkeypatch.setattr("ruyi_trt.models.checkpoint.download_checkpoint", fake_download)
    comfy.interrupt = False
    with pytest.raises(comfy.Interrupted):
        load_tiny(model="Ruyi-Mini-7B", unique_id="5")
    assert calls == [comfy.models / "Ruyi" / "Ruyi-Mini-7B"]
    assert comfy.updates == [("total", 1), (0, 3 * 2**30), (2**30, 3 * 2**30), (3 * 2**30, 3 * 2**30)]
    assert comfy.texts[-1] == ("5", "downloading Ruyi-Mini-7B: 3.00 of 3.00 GiB")
    comfy.interrupt = True
    with pytest.raises(comfy.Interrupted):
        load_tiny(model="Ruyi-Mini-7B")
    assert len(comfy.updates) == 5  # the first report saw Cancel


def test_lora_without_comfyui_is_a_path(tmp_path: Path, tiny_dir: Path) -> None:
    assert nodes.RuyiTRTLoadLora.INPUT_TYPES()["required"]["lora"][0] == "STRING"
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")
    (spec,) = nodes.RuyiTRTLoadLora().load_lora(load_tiny(), str(lora), 1.0)
    assert spec.options.loras == ((str(lora), 1.0),)
    with pytest.raises(ValueError, match="torch backend"):
        nodes.RuyiTRTLoadLora().load_lora(load_tiny(backend="ort"), str(lora), 1.0)


def run_python(code: str, cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, "PYTHONPATH": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_mappings_imports_neither_comfy_tensorrt_nor_torch(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from ruyi_trt import NODE_CLASS_MAPPINGS\n"
        "from ruyi_trt.comfyui import NODE_DISPLAY_NAME_MAPPINGS\n"
        "heavy = [m for m in ('comfy', 'folder_paths', 'tensorrt', 'torch', 'onnxruntime') if m in sys.modules]\n"
        "print(json.dumps({'nodes': len(NODE_CLASS_MAPPINGS), 'heavy': heavy}))\n"
    )
    assert run_python(code, tmp_path) == {"nodes": 5, "heavy": []}


def test_comfyui_loads_the_repo_folder_under_another_name(tmp_path: Path, tiny_dir: Path) -> None:
    """As ComfyUI's `load_custom_node` does for a folder: the module is named after the folder's path."""
    folder = tmp_path / "custom_nodes" / "ruyi-trt"
    folder.parent.mkdir()
    folder.symlink_to(REPO_ROOT, target_is_directory=True)
    code = (
        "import importlib.util, json, os, sys\n"
        f"module_path = {str(folder)!r}\n"
        "name = module_path.replace('.', '_x_')\n"
        "spec = importlib.util.spec_from_file_location(name, os.path.join(module_path, '__init__.py'))\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[name] = module\n"
        "spec.loader.exec_module(module)\n"
        "loader = module.NODE_CLASS_MAPPINGS['RuyiTRTLoadModel']\n"
        "widgets = {key: list(node.INPUT_TYPES()['required']) for key, node in module.NODE_CLASS_MAPPINGS.items()}\n"
        "spec = loader().load('tiny', 'torch', 'auto', 'auto', 'none', 'fp8_e4m3fn')[0]\n"
        "print(json.dumps({'display': module.NODE_DISPLAY_NAME_MAPPINGS, 'widgets': len(widgets), 'model': spec.model,\n"
        "                  'installed_copy_used': 'ruyi_trt' in sys.modules, 'package': loader.__module__}))\n"
    )
    result = run_python(code, tmp_path)
    assert result["display"] == NODE_DISPLAY_NAME_MAPPINGS and result["widgets"] == 5
    assert result["model"] == str(tiny_dir)
    assert not result["installed_copy_used"] and result["package"].endswith("ruyi-trt.comfyui.nodes")
