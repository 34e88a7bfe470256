"""Control embeddings (`embeddings.safetensors`): the precomputed "prompts" that select motion and camera.

Ruyi has no text encoder. The checkpoint ships one set of text-encoder outputs per control setting (architecture
doc section 5), stored under `{prefix}.{emb1,mask1,emb2,mask2}`:

    p.{aspect}movie{motion}{camera}   positive, e.g. p.16x9movie2static (aspect "16:9" -> "16x9", motion "auto" -> "0")
    p.default                         positive fallback, used field by field when a key is absent
    n.default                         negative, always used

`ControlEmbeddings.select` returns the positive and negative tensors as dicts with the keys emb1/mask1/emb2/mask2;
under CFG the pipeline batches them as [negative, positive]. Tensors keep their stored dtype, which sets the
latent dtype in the reference.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..files import atomic_write
from .checkpoint_io import CheckpointError

log = logging.getLogger(__name__)

FIELDS = ("emb1", "mask1", "emb2", "mask2")
POSITIVE_DEFAULT = "p.default"
NEGATIVE_DEFAULT = "n.default"
CAMERAS = ("static", "left", "right", "up", "down", "auto")
MOTIONS = ("1", "2", "3", "4", "auto")
DEFAULT_ASPECT = "16:9"  # hard-coded by the reference ("currently 16:9 works better"), whatever the video's aspect
EMBEDDINGS_NAME = "embeddings.safetensors"

_ASPECT_PATTERN = re.compile(r"^\d+:\d+$")


def normalize_motion(motion: str | int) -> str:
    """The motion key digit: "1".."4" (or int 1..4) as is, "auto" -> "0"."""
    text = str(motion).strip().lower() if not isinstance(motion, bool) else ""
    if text not in MOTIONS:
        raise ValueError(f"motion must be one of 1, 2, 3, 4 or 'auto', got {motion!r}")
    return "0" if text == "auto" else text


def positive_prefix(camera: str, motion: str | int, aspect: str = DEFAULT_ASPECT) -> str:
    """The positive key prefix the reference looks up, e.g. ('static', 2) -> 'p.16x9movie2static'."""
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {', '.join(CAMERAS)}, got {camera!r}")
    if not isinstance(aspect, str) or not _ASPECT_PATTERN.match(aspect):
        raise ValueError(f"aspect must look like '16:9', got {aspect!r}")
    return f"p.{aspect.replace(':', 'x')}movie{normalize_motion(motion)}{camera}"


@dataclass(frozen=True, eq=False)
class ControlEmbeddings:
    """The tensors of an embeddings.safetensors file, with the reference's selection rule."""

    tensors: Mapping[str, torch.Tensor]
    source: str = "embeddings"

    def __post_init__(self) -> None:
        required = [f"{prefix}.{field}" for prefix in (POSITIVE_DEFAULT, NEGATIVE_DEFAULT) for field in FIELDS]
        missing = [key for key in required if key not in self.tensors]
        if missing:
            raise CheckpointError(
                f"{self.source} lacks the required key(s) {missing}; every control-embeddings file needs "
                f"{POSITIVE_DEFAULT}.* and {NEGATIVE_DEFAULT}.*. Re-download embeddings.safetensors."
            )
        for key, value in self.tensors.items():
            field = key.rsplit(".", 1)[-1]
            reference = self.tensors.get(f"{POSITIVE_DEFAULT}.{field}")
            if field in FIELDS and reference is not None and value.shape != reference.shape:
                raise CheckpointError(
                    f"{self.source}: {key} has shape {tuple(value.shape)} but {POSITIVE_DEFAULT}.{field} has "
                    f"{tuple(reference.shape)}; the file is inconsistent."
                )

    def prefixes(self) -> list[str]:
        """All key prefixes in the file, sorted."""
        return sorted({key.rsplit(".", 1)[0] for key in self.tensors})

    def resolve(
        self, camera: str, motion: str | int, aspect: str = DEFAULT_ASPECT
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The keys `select` reads: ({field: positive key}, {field: negative key}).

        Each positive field falls back to `p.default.<field>` on its own when its key is absent, as the
        reference's `dict.get(key, default)` does.
        """
        prefix = positive_prefix(camera, motion, aspect)
        positive = {}
        for field in FIELDS:
            key = f"{prefix}.{field}"
            positive[field] = key if key in self.tensors else f"{POSITIVE_DEFAULT}.{field}"
        if positive["emb1"] != f"{prefix}.emb1":
            log.info("no control embeddings for %s; using %s", prefix, POSITIVE_DEFAULT)
        negative = {field: f"{NEGATIVE_DEFAULT}.{field}" for field in FIELDS}
        return positive, negative

    def select(
        self, camera: str, motion: str | int, aspect: str = DEFAULT_ASPECT
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(positive, negative) dicts with keys emb1 [1,L1,C1], mask1 [1,L1], emb2 [1,L2,C2], mask2 [1,L2].

        camera: static, left, right, up, down or auto; motion: 1..4 or 'auto'; aspect: 'W:H' (default 16:9).
        """
        positive_keys, negative_keys = self.resolve(camera, motion, aspect)
        positive = {field: self.tensors[key] for field, key in positive_keys.items()}
        negative = {field: self.tensors[key] for field, key in negative_keys.items()}
        return positive, negative


def load_control_embeddings(path: str | Path) -> ControlEmbeddings:
    """Read an embeddings.safetensors file (or a checkpoint folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDINGS_NAME
    if not path.is_file():
        raise CheckpointError(
            f"control embeddings file {path} is missing; it ships with the Ruyi-Mini-7B checkpoint as "
            f"{EMBEDDINGS_NAME}. Re-download the checkpoint."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it is probably truncated: download it again."
        ) from exc
    return ControlEmbeddings(tensors, source=str(path))


def save_control_embeddings(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write control-embedding tensors to `path` atomically (temp file, then rename)."""
    ControlEmbeddings(tensors, source=str(path))  # refuse to write a file that could not be read back
    data = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp)))


def make_random_control_embeddings(
    text_len: int,
    dim1: int,
    text_len_t5: int,
    dim2: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Deterministic random tensors for every real key: 16x9, motions 0..4, all cameras, p.default, n.default.

    emb1 [1, text_len, dim1] and emb2 [1, text_len_t5, dim2] are N(0, 1) in `dtype`; mask1/mask2 are int64
    attention masks with a random number (at least 1) of leading ones. Used by the tiny test model.
    """
    for name, value in (("text_len", text_len), ("dim1", dim1), ("text_len_t5", text_len_t5), ("dim2", dim2)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    generator = torch.Generator().manual_seed(seed)
    aspect = DEFAULT_ASPECT.replace(":", "x")
    prefixes = [f"p.{aspect}movie{motion}{camera}" for motion in "01234" for camera in CAMERAS]
    prefixes += [POSITIVE_DEFAULT, NEGATIVE_DEFAULT]

    def mask(length: int) -> torch.Tensor:
        valid = int(torch.randint(1, length + 1, (1,), generator=generator))
        return (torch.arange(length) < valid).to(torch.int64).unsqueeze(0)

    tensors: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        tensors[f"{prefix}.emb1"] = torch.randn(1, text_len, dim1, generator=generator).to(dtype)
        tensors[f"{prefix}.mask1"] = mask(text_len)
        tensors[f"{prefix}.emb2"] = torch.randn(1, text_len_t5, dim2, generator=generator).to(dtype)
        tensors[f"{prefix}.mask2"] = mask(text_len_t5)
    return tensors
