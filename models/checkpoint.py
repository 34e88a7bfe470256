"""A Ruyi checkpoint: where it is and every config in it, read and validated once, then passed down.

`Checkpoint.resolve(spec)` takes what a user names: a checkpoint folder, `tiny` (the cached tiny preset, built on
first use), `full-random` (the released architecture with random weights: no folder, configs from the code), or
None for the default `models/Ruyi-Mini-7B`, downloaded when missing. Everything downstream (the pipeline, the
backends, export, engine builds, the memory planner) takes the configs and file locations from this object and
never reads a config file by path again. The weight hashes (for the export and engine caches) are computed on
first use and kept.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import file_digest
from .checkpoint_io import CHECKPOINT_REPO, CheckpointError, read_config, weight_files
from .control_embeddings import ControlEmbeddings, load_control_embeddings
from .download import DOWNLOAD_DONE, HF_CACHE_DIR, download_checkpoint
from .image_encoder import PREPROCESSOR_NAME, CLIPImageEncoder, vision_geometry
from .transformer import RuyiTransformer3D, TransformerConfig
from .vae import RuyiVAE
from .vae_config import VAEConfig

log = logging.getLogger(__name__)

REPO_ID = CHECKPOINT_REPO
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = PACKAGE_ROOT / "models" / "Ruyi-Mini-7B"
REQUIRED = ("transformer", "vae", "image_encoder", "scheduler", "embeddings.safetensors")
EMBEDDINGS_NAME = "embeddings.safetensors"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
TINY = "tiny"
FULL_RANDOM = "full-random"
# the config files hashed with each component folder's weights
HASHED_CONFIGS = {"transformer": ("config.json",), "vae": ("config.json",),
                  "image_encoder": ("config.json", PREPROCESSOR_NAME)}  # fmt: skip


def missing_parts(folder: Path) -> list[str]:
    """The parts of the checkpoint layout that `folder` lacks; a download into it that never finished (Ctrl-C,
    a lost connection) counts as missing too, so the next run resumes it."""
    missing = [name for name in REQUIRED if not (folder / name).exists()]
    if (folder / HF_CACHE_DIR).is_dir() and not (folder / DOWNLOAD_DONE).is_file():
        missing.append("the rest of an interrupted download")
    return missing


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint's location and configs. `folder` is None for `full-random` (nothing on disk).

    Two checkpoints are equal when they name the same folder (or are both `full-random`)."""

    name: str  # as the user gave it: "tiny", "full-random" or a folder
    folder: Path | None
    transformer: TransformerConfig = field(compare=False)
    vae: VAEConfig = field(compare=False)
    image_encoder: dict[str, Any] = field(compare=False, repr=False)  # image_encoder/config.json (CLIP vision)
    image_processor: dict[str, Any] = field(compare=False, repr=False)  # image_encoder/preprocessor_config.json
    scheduler: dict[str, Any] = field(compare=False, repr=False)  # scheduler/scheduler_config.json
    _hashes: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    # -- finding one ----------------------------------------------------------------------------
    @classmethod
    def resolve(cls, spec: str | Path | Checkpoint | None = None, download: bool = True) -> Checkpoint:
        """`tiny` -> the cached tiny preset; `full-random` -> no folder; a path -> that folder (checked);
        None -> the default `models/Ruyi-Mini-7B`, downloaded when missing and `download` is set."""
        if isinstance(spec, Checkpoint):
            return spec
        if spec is not None and str(spec) == FULL_RANDOM:
            return cls.full_random()
        if spec is not None and str(spec) == TINY:
            from .presets import tiny_checkpoint_dir

            return cls.from_folder(tiny_checkpoint_dir(), name=TINY)
        folder = Path(spec).expanduser() if spec is not None else DEFAULT_MODEL_DIR
        if spec is None and missing_parts(folder) and download:
            download_checkpoint(folder)
        return cls.from_folder(folder, name=str(spec) if spec is not None else str(folder))

    @classmethod
    def for_planning(cls, spec: str | Path | None = None) -> Checkpoint:
        """The checkpoint to plan memory for, without downloading: the default model while it is not downloaded
        plans with the released architecture's configs (those of `full-random`)."""
        if spec is None and missing_parts(DEFAULT_MODEL_DIR):
            log.info("%s is not downloaded: planning with the released architecture's configs", DEFAULT_MODEL_DIR)
            return cls.full_random()
        return cls.resolve(spec, download=False)

    @classmethod
    def from_folder(cls, folder: str | Path, name: str | None = None) -> Checkpoint:
        """Read and validate every config of a checkpoint folder (no weights are read)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(
                f"model folder {folder} does not exist. Pass --model PATH to a Ruyi-Mini-7B folder, --model tiny for "
                "the small random test model, or omit --model to download the released checkpoint."
            )
        absent = missing_parts(folder)
        if absent:
            raise CheckpointError(
                f"{folder} is not a complete Ruyi checkpoint: missing {', '.join(absent)}. "
                f"Download it again (`hf download {REPO_ID} --local-dir {folder}`)."
            )
        processor_path = folder / "image_encoder" / PREPROCESSOR_NAME
        if not processor_path.is_file():
            raise CheckpointError(f"{processor_path} is missing: the CLIP image preprocessing settings are needed.")
        image_encoder = read_config(folder / "image_encoder")
        vision_geometry(image_encoder, source=str(folder / "image_encoder"))  # refuse a config that is not CLIP's
        return cls(
            name=name or str(folder),
            folder=folder,
            transformer=TransformerConfig.from_dict(read_config(folder / "transformer"), source=str(folder / "transformer")),
            vae=VAEConfig.from_dict(read_config(folder / "vae"), source=str(folder / "vae")),
            image_encoder=image_encoder,
            image_processor=read_config(folder / "image_encoder", PREPROCESSOR_NAME),
            scheduler=read_config(folder / "scheduler", SCHEDULER_CONFIG_NAME),
        )

    @classmethod
    def full_random(cls) -> Checkpoint:
        """The released architecture's configs, for random weights built in memory (no files)."""
        from .image_encoder import clip_processor_config
        from .presets import FULL_CLIP_CONFIG
        from .scheduler import default_scheduler_config

        clip = dict(FULL_CLIP_CONFIG)
        return cls(
            name=FULL_RANDOM, folder=None, transformer=TransformerConfig.full(), vae=VAEConfig.full(),
            image_encoder=clip, image_processor=clip_processor_config(clip["image_size"]),
            scheduler=default_scheduler_config(),
        )  # fmt: skip

    # -- what it holds --------------------------------------------------------------------------
    @property
    def is_random(self) -> bool:
        """True for `full-random`: the weights are made in memory, there are no files."""
        return self.folder is None

    def part(self, name: str) -> Path:
        """The path of one part of the checkpoint (`transformer`, `vae`, `image_encoder`, `embeddings.safetensors`)."""
        if self.folder is None:
            raise CheckpointError(f"--model {FULL_RANDOM} has no checkpoint files (it is built with random weights); "
                                  "pass --model PATH or --model tiny for this.")  # fmt: skip
        return self.folder / name

    @property
    def embeddings_path(self) -> Path:
        return self.part(EMBEDDINGS_NAME)

    @property
    def clip_geometry(self) -> tuple[int, int, int]:
        """(image size, patch tokens, hidden size) of the CLIP vision tower."""
        return vision_geometry(self.image_encoder)

    def weights_hash(self, part: str) -> str:
        """sha256 over the names and contents of a component folder's config file(s) and safetensors weights
        (`transformer`, `vae` or `image_encoder`); computed once per checkpoint object."""
        if part not in self._hashes:
            folder = self.part(part)
            files = []
            for name in HASHED_CONFIGS[part]:
                path = folder / name
                if not path.is_file():
                    raise CheckpointError(f"{path} is missing; download the checkpoint again.")
                files.append(path)
            digest = hashlib.sha256()
            for path in files + weight_files(folder):
                digest.update(f"{path.name}:{file_digest(path)}\n".encode())
            self._hashes[part] = "sha256:" + digest.hexdigest()
        return self._hashes[part]

    # -- its weights ----------------------------------------------------------------------------
    # full-random builds each model with deterministic random weights directly on `device`.
    def load_transformer(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> RuyiTransformer3D:
        if self.is_random:
            from .presets import full_random_transformer

            return full_random_transformer(device=device, dtype=dtype)
        return RuyiTransformer3D.from_pretrained(self.part("transformer"), dtype, device, config=self.transformer)

    def load_vae(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> RuyiVAE:
        if self.is_random:
            from .presets import full_random_vae

            return full_random_vae(device=device, dtype=dtype)
        return RuyiVAE.from_pretrained(self.part("vae"), dtype, device, config=self.vae)

    def load_image_encoder(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> CLIPImageEncoder:
        if self.is_random:
            from .presets import full_random_image_encoder

            return full_random_image_encoder(device=device, dtype=dtype)
        return CLIPImageEncoder.from_pretrained(
            self.part("image_encoder"), dtype, device, config=self.image_encoder, processor_config=self.image_processor
        )

    def load_embeddings(self) -> ControlEmbeddings:
        """The camera/motion control embeddings (random ones of the right shapes for full-random)."""
        if self.is_random:
            from .control_embeddings import make_random_control_embeddings

            cfg = self.transformer
            return ControlEmbeddings(make_random_control_embeddings(
                cfg.text_len, cfg.cross_attention_dim, cfg.text_len_t5, cfg.cross_attention_dim_t5, seed=3
            ))  # fmt: skip
        return load_control_embeddings(self.embeddings_path)
