"""The ComfyUI nodes: declarations, widget defaults, an end-to-end sample on the tiny model, the ComfyUI
hooks (folders, progress bar, Cancel) through stand-in modules, cheap imports and a ComfyUI-style load."""

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

from ruyi_trt.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, nodes
from ruyi_trt.comfyui.convert import images_to_pil, video_to_images
from ruyi_trt.runtime.pipeline import Video
from ruyi_trt.runtime.stats import RunStats
from ruyi_trt.testing import gradient_image

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    """Stand-ins for the ComfyUI modules the nodes use: folder_paths, comfy.utils, comfy.model_management."""
    record = types.SimpleNamespace(updates=[], interrupt=False, loras=tmp_path / "loras", models=tmp_path / "models")
    record.loras.mkdir()
    (record.loras / "style.safetensors").write_bytes(b"")

    class ProgressBar:
        def __init__(self, total: int):
            record.updates.append(("total", total))

        def update_absolute(self, value: int, total: int) -> None:
            record.updates.append((value, total))

    class Interrupted(Exception):
        pass

    def throw_exception_if_processing_interrupted() -> None:
        if record.interrupt:
            raise Interrupted()

    folder_paths = types.SimpleNamespace(
        models_dir=str(record.models),
        get_filename_list=lambda kind: sorted(p.name for p in record.loras.iterdir()),
        get_full_path=lambda kind, name: str(record.loras / name) if (record.loras / name).is_file() else None,
    )
    model_management = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"),
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
    )
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.setitem(sys.modules, "comfy", types.ModuleType("comfy"))
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    monkeypatch.setitem(sys.modules, "comfy.model_management", model_management)
    record.Interrupted = Interrupted
    return record


def test_mappings_share_keys_and_nodes_declare_everything() -> None:
    assert list(NODE_CLASS_MAPPINGS) == list(NODE_DISPLAY_NAME_MAPPINGS) == [n.__name__ for n in nodes.NODES]
    for key, node in NODE_CLASS_MAPPINGS.items():
        assert NODE_DISPLAY_NAME_MAPPINGS[key].startswith("Ruyi-TRT ")
        assert node.CATEGORY == "Ruyi-TRT"
        assert callable(getattr(node, node.FUNCTION))
        assert isinstance(node.RETURN_TYPES, tuple) and len(node.RETURN_NAMES) == len(node.RETURN_TYPES)
        assert set(node.INPUT_TYPES()) <= {"required", "optional"}
    assert nodes.RuyiTRTSampler.RETURN_TYPES == ("IMAGE",)


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
    (frames,) = nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)
    assert frames.shape == (8, 64, 96, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1 and torch.isfinite(frames).all()


def test_rerun_reuses_the_loaded_pipeline_and_reports_progress(tiny_dir: Path, comfy) -> None:
    spec = load_tiny()
    start = comfy_images(gradient_image(90, 60))
    nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)
    loaded = nodes.pipelines()._pipeline
    comfy.updates.clear()
    nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)
    assert nodes.pipelines()._pipeline is loaded
    assert comfy.updates == [("total", 2), (1, 2), (2, 2)]
    comfy.interrupt = True
    with pytest.raises(comfy.Interrupted):
        nodes.RuyiTRTSampler().sample(spec, start, **SAMPLE_ARGS)


class RecordingCache:
    """Stands in for the pipeline cache: keeps the request and returns a blank video of its size."""

    def get(self, spec):
        return self

    def generate(self, request, callback=None):
        self.request = request
        return Video(torch.zeros(request.frames, *request.size, 3, dtype=torch.uint8), 24, RunStats())


def test_image_batches_map_to_leading_and_trailing_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = RecordingCache()
    monkeypatch.setattr(nodes, "pipelines", lambda: cache)
    starts = [gradient_image(48, 32, phase=p) for p in (0.0, 1.0)]
    end = gradient_image(48, 32, phase=2.0)
    (frames,) = nodes.RuyiTRTSampler().sample(None, comfy_images(*starts), end_image=comfy_images(end), **SAMPLE_ARGS)
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


def test_conversions_round_trip() -> None:
    image = gradient_image(20, 10)
    assert np.array_equal(np.asarray(images_to_pil(comfy_images(image)[0], "start_image")[0]), np.asarray(image))
    frames = torch.randint(0, 256, (8, 10, 20, 3), dtype=torch.uint8)
    images = video_to_images(frames)
    assert images.dtype == torch.float32 and torch.equal(images[3], frames[3].float() / 255)


def test_models_and_loras_come_from_comfyui_folders(tiny_dir: Path, comfy) -> None:
    (comfy.models / "Ruyi").mkdir(parents=True)
    (comfy.models / "Ruyi" / "mine").symlink_to(tiny_dir, target_is_directory=True)
    spec = load_tiny(model="mine")
    assert spec.model == str(comfy.models / "Ruyi" / "mine")
    with pytest.raises(ValueError, match="'absent' is neither a folder"):
        load_tiny(model="absent")

    lora_node = nodes.RuyiTRTLoadLora()
    assert lora_node.INPUT_TYPES()["required"]["lora"] == (["style.safetensors"],)
    (with_lora,) = lora_node.load_lora(spec, "style.safetensors", 0.5)
    assert with_lora.options.loras == ((str(comfy.loras / "style.safetensors"), 0.5),)
    assert with_lora.model == spec.model and spec.options.loras == ()
    (chained,) = lora_node.load_lora(with_lora, "style.safetensors", -1.0)  # chained, as the original's node
    assert chained.options.loras == ((str(comfy.loras / "style.safetensors"), 0.5), (str(comfy.loras / "style.safetensors"), -1.0))
    with pytest.raises(ValueError, match="is not a file"):
        lora_node.load_lora(spec, "missing.safetensors", 1.0)


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
    assert run_python(code, tmp_path) == {"nodes": 3, "heavy": []}


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
    assert result["display"] == NODE_DISPLAY_NAME_MAPPINGS and result["widgets"] == 3
    assert result["model"] == str(tiny_dir)
    assert not result["installed_copy_used"] and result["package"].endswith("ruyi-trt.comfyui.nodes")
