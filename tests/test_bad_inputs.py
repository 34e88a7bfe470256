"""Hostile and broken inputs: every case of tools/bad_inputs.py is refused by `ruyi-trt run` with exit code 2 and
its message, leaving no file behind (and never unpickling); pictures that are odd but valid are read as a viewer
shows them; a read-only or full disk (a real tmpfs where the machine allows one); ComfyUI names that leave their
folder; damaged engine and ONNX cache entries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ruyi_trt.cli import main
from ruyi_trt.files import file_digest
from ruyi_trt.runtime.request import load_image, load_images
from ruyi_trt.testing import gradient_image
from ruyi_trt.tools.bad_inputs import BAD_INPUTS, PAYLOAD_MARKER, arguments, base_options, files_under, prepare

CLI = str(Path(sys.executable).with_name("ruyi-trt"))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_bad_input_is_refused_and_leaves_nothing(case, tiny_dir: Path, tmp_path: Path) -> None:
    args, before = prepare(case, tmp_path / "case", tiny_dir)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert case.expect in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert files_under(tmp_path / "case") == before  # no output, no temp file, no unpickled payload
    assert not list(tmp_path.rglob(PAYLOAD_MARKER))


# -- odd but valid pictures ---------------------------------------------------------------------------------------
def test_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[:, 24:, 3] = 255  # left half fully transparent (its RGB is hidden junk: 200, 0, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        image = np.asarray(load_image(tmp_path / name))
        assert image.shape == (32, 48, 3)
        assert (image[:, :24] == 255).all()  # transparent -> white
    assert tuple(np.asarray(load_image(tmp_path / "rgba.png"))[0, 30]) == (200, 0, 0)
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    palette.save(tmp_path / "p.png", transparency=0)
    image = np.asarray(load_image(tmp_path / "p.png"))
    assert tuple(image[0, 0]) == (40, 50, 60) and tuple(image[0, 31]) == (255, 255, 255)
    in_memory = load_images(Image.fromarray(rgba, "RGBA"), "image")[0]  # PIL inputs go the same way
    assert in_memory.mode == "RGB" and tuple(np.asarray(in_memory)[0, 0]) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = np.asarray(load_image(tmp_path / "g16.png")).astype(int)
    expected = np.rint(values / 257.0).astype(int)
    assert np.abs(image[..., 0] - expected).max() == 0 and (image[..., 0] == image[..., 2]).all()
    assert image.max() == 255 and image.min() == 0 and 120 <= image[16, 16, 0] <= 136  # mid-grey stays mid-grey


def test_cmyk_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    image = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert image.shape == (32, 32, 3)
    assert image[..., 0].mean() > 230 and image[..., 1].mean() < 25 and image[..., 2].mean() < 25  # red


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    picture = gradient_image(96, 64)  # landscape pixels, as a phone stores a portrait photo
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    picture.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "phone.jpg")
    assert image.size == (64, 96)
    expected = np.asarray(picture.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert np.abs(np.asarray(image).astype(int) - expected).mean() < 4  # JPEG, uint8


# -- read-only and full disks -------------------------------------------------------------------------------------
def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, check=False)
    return done.returncode == 0


def run_on_small_disk(tmp_path: Path, mount_options: str, args: list[str]) -> tuple[int, str, list[str]]:
    """`ruyi-trt run ARGS` with `tmp_path/disk` a fresh tmpfs (`mount_options`) in a private mount namespace:
    (exit code, output, files on that disk afterwards)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f'mount -t tmpfs -o {mount_options} tmpfs "{disk}" || exit 99; "{CLI}" "$@"; rc=$?; '
              f'echo "LEFT:$(ls -A "{disk}" | tr "\\n" " ")"; exit $rc')  # fmt: skip
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode != 99, done.stderr
    left = done.stdout.rsplit("LEFT:", 1)[-1].split()
    return done.returncode, done.stdout + done.stderr, left


needs_mount = pytest.mark.skipif(not _can_mount(), reason="no user+mount namespaces here (unshare) for a tmpfs")


@needs_mount
def test_read_only_output_folder_is_refused_up_front(tiny_dir: Path, start_png: Path, tmp_path: Path) -> None:
    options = {**base_options(tmp_path, start_png), "--out": str(tmp_path / "disk" / "video.mp4")}
    options.pop("--frames-dir")
    code, output, left = run_on_small_disk(tmp_path, "ro,size=1m", arguments(options))
    assert code == 2 and "--out: cannot write into" in output and left == []


@needs_mount
def test_full_disk_is_a_clear_failure_that_leaves_nothing(tiny_dir: Path, start_png: Path, tmp_path: Path) -> None:
    options = {**base_options(tmp_path, start_png), "--out": str(tmp_path / "disk" / "video.mp4")}
    options.pop("--frames-dir")
    code, output, left = run_on_small_disk(tmp_path, "size=8k", arguments(options))
    assert code == 1 and "no space left on the disk" in output and "Traceback" not in output
    assert left == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a folder without write permission")
def test_unwritable_output_folder_is_refused(start_png: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = CliRunner().invoke(main, arguments({**base_options(tmp_path, start_png), "--out": str(locked / "v.mp4")}))
    assert result.exit_code == 2 and "cannot write into" in result.output and os.listdir(locked) == []


def test_disk_full_while_writing_the_video(tiny_dir: Path, start_png: Path, tmp_path: Path, monkeypatch) -> None:
    """ENOSPC as filesystems report it at fsync (delayed allocation), wherever mounting a tmpfs is not allowed."""
    import errno

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    result = CliRunner().invoke(main, arguments(base_options(tmp_path, start_png)))
    assert result.exit_code == 1 and "no space left on the disk" in result.output and "free some space" in result.output
    assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == set()


# -- ComfyUI names ------------------------------------------------------------------------------------------------
@pytest.fixture()
def comfy_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> types.SimpleNamespace:
    models, loras = tmp_path / "models", tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    (loras / "style.safetensors").write_bytes(b"")
    (tmp_path / "secret.safetensors").write_bytes(b"")
    folder_paths = types.SimpleNamespace(
        models_dir=str(models),
        get_full_path=lambda kind, name: str(loras / name) if (loras / name).is_file() else None,
        add_model_folder_path=lambda kind, path: None,
        get_folder_paths=lambda kind: [str(models / kind)],
    )
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    return types.SimpleNamespace(root=tmp_path, models=models, loras=loras)


@pytest.mark.parametrize("name", ["../secret.safetensors", "sub/../../secret.safetensors", "..\\secret.safetensors",
                                  "{root}/secret.safetensors", "C:\\secret.safetensors", "~/secret.safetensors"])  # fmt: skip
def test_comfyui_lora_names_may_not_leave_the_loras_folder(comfy_folders, name: str) -> None:
    from ruyi_trt.comfyui import host

    with pytest.raises(ValueError, match="is outside ComfyUI's models/loras folder"):
        host.lora_path(name.format(root=comfy_folders.root))
    assert host.lora_path("style.safetensors") == str(comfy_folders.loras / "style.safetensors")


def test_comfyui_model_names_may_not_leave_the_ruyi_folder(comfy_folders, tiny_dir: Path) -> None:
    from ruyi_trt.comfyui import host

    ruyi = comfy_folders.models / "Ruyi"
    ruyi.mkdir()
    (ruyi / "mine").symlink_to(tiny_dir, target_is_directory=True)  # a link placed in the folder is fine
    for name in ("../loras", "mine/../../loras", str(tiny_dir), "/", str(comfy_folders.models)):
        with pytest.raises(ValueError, match="is outside"):
            host.model_folder(name)
    assert host.model_folder("mine") == str(ruyi / "mine")
    assert host.model_folder(str(ruyi / "mine")) == str(ruyi / "mine")  # an absolute path inside is fine


# -- damaged cache entries ----------------------------------------------------------------------------------------
@pytest.fixture()
def onnx_copy(exported_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's exported tiny graphs (so damaging it affects no other test)."""
    copy = tmp_path / "onnx"
    shutil.copytree(exported_dir, copy)
    return copy


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_onnx_cache_graph_is_exported_again(onnx_copy: Path, tiny_dir: Path, damage: str) -> None:
    from ruyi_trt.export import ExportSettings, export_checkpoint

    graph = onnx_copy / "image_encoder.onnx"
    good = file_digest(graph)
    data = bytearray(graph.read_bytes())
    if damage == "truncate":
        graph.write_bytes(bytes(data[: len(data) // 2]))
    else:  # same size, one byte changed: only the sha256 notices
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    result = export_checkpoint(tiny_dir, onnx_copy, ExportSettings(), ["image-encoder"], progress=False)
    assert result.exported == ["image-encoder"] and file_digest(graph) == good
    assert not [p.name for p in onnx_copy.parent.iterdir() if p.name.startswith(".")]  # no scratch, no lock


def test_damaged_manifest_refused_in_a_user_folder_and_replaced_in_the_cache(onnx_copy: Path, tiny_dir: Path) -> None:
    from ruyi_trt.export import ExportSettings, export_checkpoint

    (onnx_copy / "manifest.json").write_bytes(b"\x00\xff not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON .*delete it to re-export"):
        export_checkpoint(tiny_dir, onnx_copy, ExportSettings(), ["image-encoder"], progress=False)
    result = export_checkpoint(tiny_dir, onnx_copy, ExportSettings(), ["image-encoder"], progress=False,
                               reset_damaged=True)  # fmt: skip
    assert result.exported == ["image-encoder"]
    assert "image-encoder" in json.loads((onnx_copy / "manifest.json").read_text())["components"]
