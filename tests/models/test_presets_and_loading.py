"""The tiny checkpoint folder (real layout, deterministic), loading every component back, the lazy full-size
preset, and clear errors for broken checkpoint folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ruyi_trt.models import CheckpointError, CLIPImageEncoder, RuyiTransformer3D, RuyiVAE
from ruyi_trt.models.checkpoint import Checkpoint, download_checkpoint
from ruyi_trt.models.checkpoint_io import load_weights, read_config
from ruyi_trt.models.presets import full_random_transformer, tiny_transformer, write_tiny_checkpoint


def test_tiny_checkpoint_has_the_real_layout(tiny_dir: Path) -> None:
    for part in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "image_encoder/config.json", "image_encoder/preprocessor_config.json",
                 "scheduler/scheduler_config.json", "embeddings.safetensors", "model_index.json"):
        assert (tiny_dir / part).is_file(), part
    assert Checkpoint.resolve("tiny").folder == tiny_dir


def test_tiny_round_trip_loads_identical_weights(tiny_dir: Path) -> None:
    loaded = RuyiTransformer3D.from_pretrained(tiny_dir / "transformer")
    built = tiny_transformer()
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(built.state_dict().items())):
        assert torch.equal(a, b), name
    vae = RuyiVAE.from_pretrained(tiny_dir / "vae", dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    clip = CLIPImageEncoder.from_pretrained(tiny_dir / "image_encoder")
    tokens = clip(torch.zeros(1, 3, clip.image_size, clip.image_size))
    assert tokens.shape == (1, clip.num_tokens, clip.hidden_size)
    assert clip.hidden_size == loaded.config.projection_dim


def test_tiny_checkpoint_is_deterministic(tmp_path: Path) -> None:
    a, b = write_tiny_checkpoint(tmp_path / "a"), write_tiny_checkpoint(tmp_path / "b")
    for part in ("transformer", "vae"):
        wa, wb = load_weights(a / part), load_weights(b / part)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_full_random_preset_is_lazy() -> None:
    model = full_random_transformer()  # meta device: no memory
    assert next(model.parameters()).device.type == "meta"
    count = sum(p.numel() for p in model.parameters())
    assert 7.1e9 < count < 7.3e9


@pytest.fixture()
def broken_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, folder)
    return folder


def test_missing_folder_and_config(broken_copy: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        RuyiTransformer3D.from_pretrained(broken_copy / "nothing-here")
    (broken_copy / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        RuyiVAE.from_pretrained(broken_copy / "vae")
    with pytest.raises(CheckpointError, match="missing vae"):
        shutil.rmtree(broken_copy / "vae")
        Checkpoint.resolve(broken_copy)


def test_truncated_safetensors(broken_copy: Path) -> None:
    weights = broken_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RuyiTransformer3D.from_pretrained(broken_copy / "transformer")


def test_key_mismatch_names_the_keys(broken_copy: Path) -> None:
    config = read_config(broken_copy / "transformer")
    config["num_layers"] = config["num_layers"] + 2
    (broken_copy / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.\d+\."):
        RuyiTransformer3D.from_pretrained(broken_copy / "transformer")


def test_corrupt_clip_weights(broken_copy: Path) -> None:
    weights = next((broken_copy / "image_encoder").glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="CLIP image encoder"):
        CLIPImageEncoder.from_pretrained(broken_copy / "image_encoder")


def test_offline_download_says_how_to_fetch_manually(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="hf download IamCreateAI/Ruyi-Mini-7B"):
        download_checkpoint(tmp_path / "Ruyi-Mini-7B")
    assert not (tmp_path / "Ruyi-Mini-7B").exists()
