"""Where a checkpoint comes from: a folder, the `tiny` preset, the released model (downloaded when missing),
or `full-random` (the released architecture with random weights: no folder, configs from the code)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..models.checkpoint_io import CheckpointError, read_config
from ..models.transformer import TransformerConfig
from ..models.vae_config import VAEConfig
from .memory.model import ClipSpec

log = logging.getLogger(__name__)

REPO_ID = "IamCreateAI/Ruyi-Mini-7B"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = PACKAGE_ROOT / "models" / "Ruyi-Mini-7B"
REQUIRED = ("transformer", "vae", "image_encoder", "scheduler", "embeddings.safetensors")
FULL_RANDOM = "full-random"


def missing_parts(folder: Path) -> list[str]:
    """The parts of the checkpoint layout that `folder` lacks."""
    return [name for name in REQUIRED if not (folder / name).exists()]


def download_checkpoint(folder: Path, repo_id: str = REPO_ID) -> Path:
    """Download (or resume) the released checkpoint into `folder`, with huggingface_hub's progress bars."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    log.info("downloading %s (about 17 GB) into %s", repo_id, folder)
    try:
        snapshot_download(repo_id=repo_id, local_dir=str(folder))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise CheckpointError(
            f"could not download {repo_id} into {folder} ({exc}). If this machine is offline, download it "
            f"elsewhere with `huggingface-cli download {repo_id} --local-dir Ruyi-Mini-7B`, copy the folder here "
            "and pass --model PATH (or use --model tiny to try the pipeline with a small random model)."
        ) from exc
    return folder


def resolve_model(spec: str | Path | None = None, download: bool = True) -> Path:
    """`tiny` -> the cached tiny preset (built on first use); a path -> that folder (checked);
    None -> the default `models/Ruyi-Mini-7B`, downloaded when missing and `download` is set.
    `full-random` has no folder: load it with `runtime.loading.load_random_pipeline`."""
    if spec is not None and str(spec) == FULL_RANDOM:
        raise CheckpointError(f"--model {FULL_RANDOM} has no checkpoint folder; it is built with random weights.")
    if spec is not None and str(spec) == "tiny":
        from ..models.presets import tiny_checkpoint_dir

        return tiny_checkpoint_dir()
    folder = Path(spec) if spec is not None else DEFAULT_MODEL_DIR
    if spec is None and missing_parts(folder) and download:
        download_checkpoint(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"model folder {folder} does not exist. Pass --model PATH to a Ruyi-Mini-7B folder, --model tiny for "
            "the small random test model, or omit --model to download the released checkpoint."
        )
    absent = missing_parts(folder)
    if absent:
        raise CheckpointError(
            f"{folder} is not a complete Ruyi checkpoint: missing {', '.join(absent)}. "
            f"Download it again (huggingface-cli download {REPO_ID} --local-dir {folder})."
        )
    return folder


def model_configs(spec: str | Path | None = None) -> tuple[TransformerConfig, VAEConfig, ClipSpec]:
    """The transformer, VAE and CLIP configs of a model spec, reading only config.json files (no weights).

    `full-random`, and the default model while it is not downloaded, use the released architecture's configs."""
    if spec is None and not all((DEFAULT_MODEL_DIR / part / "config.json").is_file() for part in REQUIRED[:3]):
        spec = FULL_RANDOM
    if spec is not None and str(spec) == FULL_RANDOM:
        return TransformerConfig.full(), VAEConfig.full(), ClipSpec()
    folder = resolve_model(spec, download=False) if str(spec) == "tiny" else Path(spec or DEFAULT_MODEL_DIR)
    return (
        TransformerConfig.from_dict(read_config(folder / "transformer"), source=str(folder / "transformer")),
        VAEConfig.from_dict(read_config(folder / "vae"), source=str(folder / "vae")),
        ClipSpec.from_config(read_config(folder / "image_encoder")),
    )
