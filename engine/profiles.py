"""TensorRT optimization profiles from what the user asks for: resolutions x frame range x batch.

`--resolution 512` means every aspect bucket of the 512 base (models/geometry.py: 256x1024 .. 1024x256),
`--resolution 384x672` just that size; both can be listed (`512,768` or `512,384x672`). `--frames
MIN:OPT:MAX` is a video-frame range (each 1 or a multiple of the VAE's mini_batch_encoder, <= 120).
The request sizes (`VideoShape`s) go through each graph's `ExportSpec.profile`, which converts them to
latent/token units and pins the chunk dims of the VAE graphs to their temporal mini-batch bounds
(1..mini_batch_encoder video frames per encoder call, 1..mini_batch_decoder latents per decoder call).

Profiles only cover real work. TensorRT sizes its tactics and (by default) its scratch memory for a
profile's max, and takes each dim's range on its own, so one profile over buckets 384x1536 and 1536x384
would reach 1536x1536: four times the tokens of any real bucket. `size_groups` therefore splits the sizes,
per graph, into groups whose largest member is at least as large as every other member in every
size-dependent dim of that graph; each group gets its own engine, whose max is that real size. Graphs
whose shapes name no height or width (the per-block transformer graphs take [B, T, S, D] tokens, the CLIP
encoder a fixed crop) need one group for all sizes; the VAE and embed/unembed graphs need one per
dominating bucket.

Which batch sizes each component sees: the transformer runs at batch 2 under classifier-free guidance
and 1 without it (or with the memory plan's cfg_split), so its profile spans 1..`batch`; the VAE and
the CLIP encoder always run at batch 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..export import specs as export_specs
from ..export.specs import EXPORT_DTYPES, ExportSpec, Shape, VideoShape
from ..models.checkpoint import Checkpoint
from ..models.geometry import (
    ASPECT_RATIO_512,
    MAX_FRAMES,
    RESOLUTION_RULE,
    SIZE_MULTIPLE,
    SUPPORTED_RESOLUTIONS,
    scaled_bucket_size,
)

Profile = dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class FrameRange:
    """Video frames a build covers: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def parse_frames(text: str, mini_batch_encoder: int = 8) -> FrameRange:
    """'MIN:OPT:MAX' (or one number N for N:N:N) -> FrameRange; ValueError naming what is allowed."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 3):
        raise ValueError(f"--frames: {text!r} is not MIN:OPT:MAX (e.g. 24:48:120) or a single frame count.")
    low, opt, high = values * 3 if len(values) == 1 else values
    if not low <= opt <= high:
        raise ValueError(f"--frames: {text!r} must satisfy MIN <= OPT <= MAX.")
    for value in (low, opt, high):
        if value < mini_batch_encoder or value > MAX_FRAMES or value % mini_batch_encoder:
            raise ValueError(
                f"--frames: {value} is not a multiple of {mini_batch_encoder} from {mini_batch_encoder} to {MAX_FRAMES} "
                "(TensorRT transformer engines need at least two latent frames; one-frame videos run on --backend torch)."
            )
    return FrameRange(low, opt, high)


def parse_resolutions(text: str) -> tuple[str, ...]:
    """'512,768' / '512,384x672' -> normalized entries; ValueError for anything else."""
    entries = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not entries:
        raise ValueError("--resolution: give at least one of 512, 768 or HEIGHTxWIDTH.")
    for entry in entries:
        resolution_sizes((entry,))  # validates
    return entries


def resolution_sizes(entries: Sequence[str]) -> list[tuple[int, int]]:
    """(height, width) of every bucket/size the entries name, without duplicates, in order."""
    sizes: list[tuple[int, int]] = []
    for entry in entries:
        if entry.isdigit():
            base = int(entry)
            if base not in SUPPORTED_RESOLUTIONS:
                raise ValueError(f"--resolution: {entry} is not a base resolution; use {RESOLUTION_RULE} or HEIGHTxWIDTH.")
            new = [_floor16(scaled_bucket_size(key, base)) for key in ASPECT_RATIO_512]
        elif re.fullmatch(r"\d+x\d+", entry):
            height, width = (int(v) for v in entry.split("x"))
            if height < SIZE_MULTIPLE or width < SIZE_MULTIPLE or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
                raise ValueError(f"--resolution: {entry} must be HEIGHTxWIDTH in positive multiples of {SIZE_MULTIPLE}.")
            new = [(height, width)]
        else:
            raise ValueError(f"--resolution: {entry!r} is unknown; use a base resolution ({RESOLUTION_RULE}: all aspect "
                             "buckets) or HEIGHTxWIDTH.")
        sizes += [s for s in new if s not in sizes]
    return sizes


def opt_size(entries: Sequence[str]) -> tuple[int, int]:
    """The size TensorRT tunes for: the square bucket of the first base resolution, else the first HxW."""
    first = entries[0]
    if first.isdigit():
        return int(first), int(first)
    return resolution_sizes((first,))[0]


def component_batches(component: str, batch: int) -> list[int]:
    """The call batches a component's engines must take."""
    return sorted({1, batch}) if component == "transformer" else [1]


def component_shapes(component: str, entries: Sequence[str], frames: FrameRange, batch: int) -> tuple[list[VideoShape], VideoShape]:
    """(every request size the component's engines must take, the size to optimize for)."""
    batches = component_batches(component, batch)
    sizes = resolution_sizes(entries)
    shapes = [VideoShape(b, f, h, w) for b in batches for f in sorted({frames.min, frames.opt, frames.max}) for h, w in sizes]
    height, width = opt_size(entries)
    return shapes, VideoShape(max(batches), frames.opt, height, width)


@dataclass(frozen=True)
class SizeGroup:
    """The sizes one engine of a graph serves; `sizes[0]` is at least as large as the others in every
    size-dependent dim of the graph, so the profile's max is a real size."""

    sizes: tuple[tuple[int, int], ...]

    @property
    def label(self) -> str:
        height, width = self.sizes[0]
        return f"{height}x{width}"


def size_groups(spec: ExportSpec, component: str, entries: Sequence[str], frames: FrameRange, batch: int) -> list[SizeGroup]:
    """The requested sizes split into groups with a dominating member, largest first (see the module docstring)."""
    sizes = resolution_sizes(entries)
    top = max(component_batches(component, batch))
    names = spec.size_dims
    extent = {size: tuple(spec.dims_for(VideoShape(top, frames.max, *size))[n] for n in names) for size in sizes}
    opt = opt_size(entries)
    groups: list[list[tuple[int, int]]] = []
    for size in sorted(sizes, key=lambda s: (-math.prod(extent[s]), s != opt)):  # then the request order
        home = next((g for g in groups if all(a >= b for a, b in zip(extent[g[0]], extent[size]))), None)
        if home is None:
            groups.append([size])
        else:
            home.append(size)
    return [SizeGroup(tuple(group)) for group in groups]


def group_profile(spec: ExportSpec, component: str, group: SizeGroup, entries: Sequence[str], frames: FrameRange,
                  batch: int) -> Profile:  # fmt: skip
    """{input name: (min, opt, max)} of one engine: the group's sizes x frames x batches. TensorRT tunes for the
    build's opt size when the group has it, else for the group's largest size."""
    batches = component_batches(component, batch)
    counts = sorted({frames.min, frames.opt, frames.max})
    shapes = [VideoShape(b, f, h, w) for b in batches for f in counts for h, w in group.sizes]
    opt = opt_size(entries)
    height, width = opt if opt in group.sizes else group.sizes[0]
    return spec.profile(shapes, VideoShape(max(batches), frames.opt, height, width))


def graph_profiles(spec: ExportSpec, component: str, entries: Sequence[str], frames: FrameRange,
                   batch: int) -> list[tuple[SizeGroup, Profile]]:  # fmt: skip
    """(group, profile) of every engine one exported graph needs."""
    return [(group, group_profile(spec, component, group, entries, frames, batch))
            for group in size_groups(spec, component, entries, frames, batch)]  # fmt: skip


def graph_specs(checkpoint: Checkpoint | str | Path, precision: str) -> dict[str, ExportSpec]:
    """Every exportable graph's spec for a checkpoint (or what Checkpoint.resolve takes), from its configs alone."""
    checkpoint = Checkpoint.resolve(checkpoint, download=False)
    dtype = EXPORT_DTYPES[precision]
    transformer, vae = checkpoint.transformer, checkpoint.vae
    image_size, clip_tokens, clip_hidden = checkpoint.clip_geometry
    found = [
        export_specs.transformer_spec(transformer, vae, dtype, clip_tokens),
        *export_specs.transformer_stage_specs(transformer, vae, dtype, clip_tokens),
        export_specs.vae_encoder_spec(vae, dtype),
        *export_specs.vae_decoder_specs(vae, dtype),
        export_specs.image_encoder_spec(image_size, clip_tokens, clip_hidden, dtype),
    ]
    return {spec.name: spec for spec in found}


def profile_to_json(profile: Profile) -> dict[str, list[list[int]]]:
    return {name: [list(s) for s in ranges] for name, ranges in profile.items()}


def profile_from_json(data: dict[str, list[list[int]]]) -> Profile:
    return {name: tuple(tuple(s) for s in ranges) for name, ranges in data.items()}  # type: ignore[misc]


def outside_profile(profile: Profile, shapes: dict[str, Shape]) -> list[str]:
    """Why `shapes` cannot run on an engine with `profile` (one line per offending input; empty when it fits)."""
    problems = []
    for name, shape in shapes.items():
        if name not in profile:
            problems.append(f"{name}: not an input of the engine")
            continue
        low, _, high = profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            problems.append(f"{name}: shape {tuple(shape)} is outside the engine's profile {tuple(low)}..{tuple(high)}")
    return problems


def _floor16(size: tuple[float, float]) -> tuple[int, int]:
    height, width = size
    return int(height / SIZE_MULTIPLE) * SIZE_MULTIPLE, int(width / SIZE_MULTIPLE) * SIZE_MULTIPLE
