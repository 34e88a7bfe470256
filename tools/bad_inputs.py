"""Hostile and broken inputs for `ruyi-trt run`, each with the message it must be refused with.

    python -m ruyi_trt.tools.bad_inputs          # runs every case as a real `ruyi-trt run`, prints a table

Each `BadInput` makes its files in a fresh folder and gives the `run` options that differ from a good tiny run
(`base_options`). tests/test_bad_inputs.py runs every case and asserts exit code 2, the message, and that no file
appeared (no output, no temporary file, no payload of a pickle); this tool prints the same as a markdown table:
the input, the exit code, the message seen and the files left behind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from ..testing import gradient_image

Options = dict[str, str | None]
PAYLOAD_MARKER = "UNPICKLED"  # a file the pickle payloads create when (wrongly) unpickled


@dataclass(frozen=True)
class BadInput:
    """One bad input: `make(folder, tiny)` writes its files into `folder` and returns the changed `run` options."""

    name: str
    expect: str  # part of the message `ruyi-trt run` must print
    make: Callable[[Path, Path], Options]


def base_options(folder: Path, good_image: Path) -> Options:
    """A good, small tiny-model run whose outputs go to `folder/out`."""
    return {"--model": "tiny", "--image": str(good_image), "--out": str(folder / "out" / "video.mp4"),
            "--frames-dir": str(folder / "out" / "frames"), "--frames": "8", "--size": "64x96", "--steps": "1",
            "--no-progress": None}  # fmt: skip


def arguments(options: Options) -> list[str]:
    """`run` command-line arguments from an options dict (None: a flag)."""
    args = ["run"]
    for key, value in options.items():
        args += [key] if value is None else [key, value]
    return args


# -- files ------------------------------------------------------------------------------------------------------
def _png(folder: Path, name: str = "good.png", size: tuple[int, int] = (96, 64)) -> Path:
    path = folder / name
    gradient_image(*size).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int = 30_000, height: int = 30_000) -> Path:
    """A PNG header claiming width x height RGB pixels (2.7 GB decoded) with almost no data: a decompression bomb."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    return path


class _Payload:
    """Pickles to a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_lora(path: Path) -> Path:
    """A kohya-keyed LoRA saved with torch.save (a zip pickle) that also carries a payload."""
    up, down = "lora_unet_blocks_0_attn1_to_q.lora_up.weight", "lora_unet_blocks_0_attn1_to_q.lora_down.weight"
    torch.save({up: torch.zeros(4, 1), down: torch.zeros(1, 4), "x": _Payload(path.parent / PAYLOAD_MARKER)}, path)
    return path


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _lora(path: Path, keys: dict[str, torch.Tensor]) -> Path:
    save_file(keys, str(path))
    return path


def _copy_checkpoint(tiny: Path, folder: Path) -> Path:
    target = folder / "checkpoint"
    shutil.copytree(tiny, target)
    return target


def _pickled_checkpoint(tiny: Path, folder: Path) -> Path:
    target = _copy_checkpoint(tiny, folder)
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"payload": _Payload(folder / PAYLOAD_MARKER)}, target / "transformer" / "diffusion_pytorch_model.bin")
    return target


def _truncated_checkpoint(tiny: Path, folder: Path) -> Path:
    target = _copy_checkpoint(tiny, folder)
    weights = target / "transformer" / "diffusion_pytorch_model.safetensors"
    _truncated(weights, weights)
    return target


def _broken_config(tiny: Path, folder: Path) -> Path:
    target = _copy_checkpoint(tiny, folder)
    (target / "vae" / "config.json").write_text('{"in_channels": 3,')
    return target


def _image(option: str, make: Callable[[Path], Path]) -> Callable[[Path, Path], Options]:
    return lambda folder, tiny: {option: str(make(folder))}


def _write(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name

    return make


def _corrupt_png(folder: Path) -> Path:
    data = bytearray(_png(folder, "source.png").read_bytes())
    for index in range(60, len(data) - 20, 7):  # keep the signature and IHDR, scramble the image data
        data[index] ^= 0x5A
    (folder / "corrupt.png").write_bytes(bytes(data))
    (folder / "source.png").unlink()
    return folder / "corrupt.png"


def _truncated_image(suffix: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        source = folder / f"source{suffix}"
        gradient_image(96, 64).save(source)
        target = _truncated(source, folder / f"truncated{suffix}")
        source.unlink()
        return target

    return make


def _float_tiff(folder: Path) -> Path:
    Image.fromarray(np.linspace(0, 1, 64 * 96, dtype=np.float32).reshape(64, 96), mode="F").save(folder / "f.tiff")
    return folder / "f.tiff"


def _blocked_out(folder: Path, tiny: Path) -> Options:
    (folder / "blocker").write_text("a file where a folder should be")
    return {"--out": str(folder / "blocker" / "video.mp4")}


def _folder_out(folder: Path, tiny: Path) -> Options:
    (folder / "taken.mp4").mkdir()
    return {"--out": str(folder / "taken.mp4")}


def _file_frames_dir(folder: Path, tiny: Path) -> Options:
    (folder / "frames.txt").write_text("a file")
    return {"--frames-dir": str(folder / "frames.txt")}


def _bad_lora(make: Callable[[Path], Path]) -> Callable[[Path, Path], Options]:
    return lambda folder, tiny: {"--lora": str(make(folder))}


# fmt: off
BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("image: empty file (0 bytes)", "is empty (0 bytes)", _image("--image", _write("empty.png", b""))),
    BadInput("image: a text file named .png", "not a readable image",
             _image("--image", _write("text.png", b"hello, not an image\n"))),
    BadInput("image: PNG truncated to half", "truncated or corrupt", _image("--image", _truncated_image(".png"))),
    BadInput("image: JPEG truncated to half", "truncated or corrupt", _image("--image", _truncated_image(".jpg"))),
    BadInput("image: PNG with scrambled data", "truncated or corrupt", _image("--image", _corrupt_png)),
    BadInput("image: 1 x 1 pixels", "at least 16 px", _image("--image", lambda f: _png(f, "dot.png", (1, 1)))),
    BadInput("image: 30000 x 30000 PNG (decompression bomb)", "too large to open safely",
             _image("--image", lambda f: bomb_png(f / "bomb.png"))),
    BadInput("image: 32-bit float TIFF", "32-bit float", _image("--image", _float_tiff)),
    BadInput("image: a folder", "is not a file", _image("--image", lambda f: f)),
    BadInput("image: missing file", "does not exist", _image("--image", lambda f: f / "missing.png")),
    BadInput("end image: PNG truncated to half", "--end-image", _image("--end-image", _truncated_image(".png"))),
    BadInput("--out: an existing folder", "is a folder", _folder_out),
    BadInput("--out: not an .mp4", "must end in .mp4", lambda folder, tiny: {"--out": str(folder / "video.avi")}),
    BadInput("--out: a file is in the way of its folder", "cannot write into", _blocked_out),
    BadInput("--frames-dir: an existing file", "is a file", _file_frames_dir),
    BadInput("lora: a torch.save pickle (.pt) with a payload", "PyTorch pickle",
             _bad_lora(lambda f: pickle_lora(f / "style.pt"))),
    BadInput("lora: a pickle renamed .safetensors", "PyTorch pickle",
             _bad_lora(lambda f: pickle_lora(f / "style.safetensors"))),
    BadInput("lora: safetensors truncated to half", "truncated or corrupt",
             _bad_lora(lambda f: _truncated(_lora(f / "full.safetensors", {"lora_unet_x.alpha": torch.ones(64, 64)}),
                                            f / "half.safetensors"))),
    BadInput("lora: empty file", "not a readable safetensors", _bad_lora(_write("empty.safetensors", b""))),
    BadInput("lora: keys that match no module", "match no module",
             _bad_lora(lambda f: _lora(f / "other.safetensors", {
                 "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.zeros(8, 2),
                 "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.zeros(2, 8)}))),
    BadInput("lora: missing file", "does not exist", lambda folder, tiny: {"--lora": str(folder / "none.safetensors")}),
    BadInput("model: missing folder", "does not exist", lambda folder, tiny: {"--model": str(folder / "nothing")}),
    BadInput("model: folder without the checkpoint layout", "not a complete Ruyi checkpoint",
             lambda folder, tiny: {"--model": str(folder)}),
    BadInput("model: transformer weights as a .bin pickle", "PyTorch pickle",
             lambda folder, tiny: {"--model": str(_pickled_checkpoint(tiny, folder))}),
    BadInput("model: transformer safetensors truncated to half", "truncated or corrupt",
             lambda folder, tiny: {"--model": str(_truncated_checkpoint(tiny, folder))}),
    BadInput("model: vae/config.json cut off", "not valid JSON",
             lambda folder, tiny: {"--model": str(_broken_config(tiny, folder))}),
    BadInput("--frames 5", "rounds down to 0", lambda folder, tiny: {"--frames": "5"}),
    BadInput("--cfg nan", "--cfg: nan is outside", lambda folder, tiny: {"--cfg": "nan"}),
    BadInput("--seed -1", "--seed: -1 is outside", lambda folder, tiny: {"--seed": "-1"}),
    BadInput("--size 100x100", "multiples of 16", lambda folder, tiny: {"--size": "100x100"}),
    BadInput("--device cuda:x", "not a device", lambda folder, tiny: {"--device": "cuda:x"}),
)
# fmt: on


def files_under(folder: Path) -> set[str]:
    """Every file and folder under `folder`, as relative paths."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")}


def prepare(case: BadInput, folder: Path, tiny: Path) -> tuple[list[str], set[str]]:
    """Make the case's files in `folder`: (the `run` arguments, the files present before the run)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _png(folder)
    options = {**base_options(folder, good), **case.make(folder, tiny)}
    return arguments(options), files_under(folder)


def main(argv: list[str] | None = None) -> None:
    from ..models.checkpoint import Checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/bad_inputs"), help="Folder for the cases' files.")
    args = parser.parse_args(argv)
    tiny = Checkpoint.resolve("tiny").folder
    command = Path(sys.executable).with_name("ruyi-trt")
    shutil.rmtree(args.work, ignore_errors=True)
    print("| bad input | exit code | message seen | files left behind |")
    print("|---|---|---|---|")
    for index, case in enumerate(BAD_INPUTS):
        folder = args.work / f"case{index:02d}"
        run_args, before = prepare(case, folder, tiny)
        done = subprocess.run([str(command), *run_args], capture_output=True, text=True, check=False)
        message = " ".join(line for line in done.stderr.splitlines() if line.startswith("Error"))
        left = sorted(files_under(folder) - before)
        print(f"| {case.name} | {done.returncode} | {message.replace('|', '/')} | {json.dumps(left) if left else 'none'} |")
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
