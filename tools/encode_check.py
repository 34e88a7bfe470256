"""Compare mp4 encoder settings in one run: determinism, quality (PSNR against the frames), encode time, size.

    python -m ruyi_trt.tools.encode_check [--frames 48] [--repeat 5]

Settings: `x264 crf 18` (libx264's defaults at crf 18: what runtime/video.py used before) and `ours`
(`runtime.video.encoder_options()`). Clips: `photo pan`, a slow pan and zoom over assets/example.png (natural
content), and `noisy`, a moving gradient with strong per-frame noise (the worst case for rate control). Every
setting encodes every clip `--repeat` times; the table gives the number of distinct bitstreams (1 = deterministic),
the mean RGB PSNR of the decoded frames against the input frames, the median encode time and the file size.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import scratch_folder
from ..runtime.video import CRF, encode_mp4, encoder_options, read_video

ASSET = Path(__file__).resolve().parents[1] / "assets" / "example.png"
SETTINGS = {"x264 crf 18": {"crf": str(CRF)}, "ours": encoder_options()}


def photo_pan(frames: int, height: int = 320, width: int = 576) -> torch.Tensor:
    """uint8 [F, H, W, 3]: a window panning right and zooming in slowly over the example picture."""
    image = Image.open(ASSET).convert("RGB")
    out = []
    for index in range(frames):
        t = index / max(frames - 1, 1)
        scale = 1.0 - 0.15 * t
        box_w, box_h = image.width * scale * 0.85, image.height * scale * 0.85
        left = (image.width - box_w) * t
        top = (image.height - box_h) * 0.5
        crop = image.resize((width, height), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
        out.append(torch.from_numpy(np.asarray(crop).copy()))
    return torch.stack(out)


def noisy(frames: int, height: int = 320, width: int = 576) -> torch.Tensor:
    """uint8 [F, H, W, 3]: a moving colour gradient plus N(0, 24) noise drawn per frame."""
    generator = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    out = []
    for index in range(frames):
        base = torch.stack([x + 4 * index, y + 2 * index, x + y], -1).float() % 256
        out.append((base + 24 * torch.randn(base.shape, generator=generator)).clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def psnr(decoded: torch.Tensor, frames: torch.Tensor) -> float:
    """Mean over frames of the RGB PSNR (dB, peak 255)."""
    error = (decoded.double() - frames.double()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / error)).mean())


def measure(frames: torch.Tensor, repeat: int, folder: Path) -> dict[str, dict[str, float]]:
    """Per setting: distinct bitstreams, PSNR, median encode seconds and bytes; the settings take turns, so that
    the machine's load changes hit them alike."""
    digests: dict[str, set[str]] = {name: set() for name in SETTINGS}
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(repeat):
        for name, options in SETTINGS.items():
            path = folder / f"{len(seconds[name])}-{name.replace(' ', '_')}.mp4"
            started = time.perf_counter()
            encode_mp4(frames, path, 24, options)
            seconds[name].append(time.perf_counter() - started)
            digests[name].add(hashlib.sha256(path.read_bytes()).hexdigest())
    return {name: {"distinct": len(digests[name]), "psnr": psnr(read_video(path), frames),
                   "seconds": statistics.median(seconds[name]), "bytes": path.stat().st_size}
            for name, path in ((n, folder / f"0-{n.replace(' ', '_')}.mp4") for n in SETTINGS)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    clips = {"photo pan": photo_pan(args.frames), "noisy": noisy(args.frames)}
    print(f"{args.frames} frames 576x320 per clip, {args.repeat} encodes per setting (taking turns)")
    print("| clip | setting | distinct bitstreams | PSNR dB | encode s (median) | bytes |")
    print("|---|---|---|---|---|---|")
    with scratch_folder(Path.cwd() / "encode_check") as folder:
        for clip, frames in clips.items():
            for name, m in measure(frames, args.repeat, folder).items():
                options = " ".join(f"{k}={v}" for k, v in SETTINGS[name].items())
                print(f"| {clip} | {name} ({options}) | {m['distinct']}/{args.repeat} | {m['psnr']:.2f} | "
                      f"{m['seconds']:.3f} | {m['bytes']} |")


if __name__ == "__main__":
    main()
