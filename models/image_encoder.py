"""CLIP image encoder: transformers' CLIPVisionModelWithProjection, reduced to what Ruyi uses.

Ruyi feeds the start frame (resized to the video bucket) through CLIPImageProcessor and keeps
`vision_model(pixel_values).last_hidden_state[:, 1:]`: the patch tokens after the last encoder layer,
without the CLS token, post-layernorm or projection. Shape [B, (image_size/patch)^2, hidden].

The forward walks transformers' vision tower layer by layer with the precision it has under the reference's
CUDA autocast, made explicit: the LayerNorms run in float32 and return float32, so the residual stream (from
pre_layrnorm on) is float32; attention and MLP run in the weights' dtype on their rounded inputs. The output is
float32 in every dtype (in float32 the result equals transformers' own forward).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from .checkpoint_io import CheckpointError, read_config
from .norms import layer_norm_fp32

PREPROCESSOR_NAME = "preprocessor_config.json"


class CLIPImageEncoder(nn.Module):
    """pixel_values [B,3,S,S] -> CLIP patch tokens [B, N, hidden] (no CLS)."""

    def __init__(self, vision_model: nn.Module, processor_config: dict[str, Any]):
        super().__init__()
        self.vision_model = vision_model
        self.processor_config = dict(processor_config)

    @property
    def num_tokens(self) -> int:
        cfg = self.vision_model.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @property
    def hidden_size(self) -> int:
        return self.vision_model.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.vision_model.config.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> last_hidden_state[:, 1:] [B, N, hidden], float32."""
        tower = self.vision_model.vision_model
        dtype = tower.embeddings.patch_embedding.weight.dtype
        hidden = layer_norm_fp32(tower.pre_layrnorm, tower.embeddings(pixel_values.to(dtype)))  # (B, 1+N, C) float32
        for layer in tower.encoder.layers:
            attended = layer.self_attn(layer_norm_fp32(layer.layer_norm1, hidden).to(dtype))[0]  # no masks (4.x and 5.x)
            hidden = hidden + attended
            hidden = hidden + layer.mlp(layer_norm_fp32(layer.layer_norm2, hidden).to(dtype))
        return hidden[:, 1:]  # drop CLS

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        config: dict[str, Any] | None = None,
        processor_config: dict[str, Any] | None = None,
    ) -> CLIPImageEncoder:
        """Load `image_encoder/` as the reference does (a full CLIPConfig or a vision-only config both work).

        `config` / `processor_config` are the folder's config.json / preprocessor_config.json when the caller has
        read them already (`models.checkpoint.Checkpoint`); otherwise they are read here."""
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        if config is None:
            config = read_config(folder)  # clear errors for a missing folder or config.json
        if processor_config is None:
            processor_path = folder / PREPROCESSOR_NAME
            if not processor_path.is_file():
                raise CheckpointError(f"{processor_path} is missing: the CLIP image preprocessing settings are needed.")
            processor_config = json.loads(processor_path.read_text())
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(
                str(folder), config=vision_config(config, str(folder)), torch_dtype=dtype
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(
                f"cannot load the CLIP image encoder from {folder} ({exc}). The weights are missing, truncated "
                "or do not match config.json: download the checkpoint again."
            ) from exc
        return cls(model, processor_config).to(device).eval().requires_grad_(False)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write config.json, model.safetensors and preprocessor_config.json into `folder`."""
        folder = Path(folder)
        self.vision_model.save_pretrained(str(folder), safe_serialization=True)
        (folder / PREPROCESSOR_NAME).write_text(json.dumps(self.processor_config, indent=2) + "\n")
        return folder


def _vision_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The vision part of an image_encoder/config.json dict (vision-only, or a full CLIPConfig)."""
    if data.get("model_type") == "clip" or "vision_config" in data:
        return dict(data.get("vision_config") or {})
    return dict(data)


def vision_config(data: dict[str, Any], source: str = "image_encoder/config.json"):
    """transformers' CLIPVisionConfig from an image_encoder/config.json dict."""
    from transformers import CLIPVisionConfig

    try:
        return CLIPVisionConfig.from_dict({k: v for k, v in _vision_dict(data).items() if k != "model_type"})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} is not a CLIP vision config ({exc}); download the checkpoint again.") from exc


def vision_geometry(config: dict[str, Any], source: str = "image_encoder/config.json") -> tuple[int, int, int]:
    """(image size, patch tokens, hidden size) of a CLIP tower, from its config.json dict alone (missing keys take
    CLIPVisionConfig's defaults: 224 px, patch 32, width 768; transformers is not imported)."""
    vision = _vision_dict(config)
    image_size, patch_size, hidden = vision.get("image_size", 224), vision.get("patch_size", 32), vision.get("hidden_size", 768)
    if not all(isinstance(v, int) and v > 0 for v in (image_size, patch_size, hidden)):
        raise CheckpointError(f"{source}: image_size, patch_size and hidden_size must be positive integers, got "
                              f"{image_size!r}, {patch_size!r}, {hidden!r}; download the checkpoint again.")  # fmt: skip
    return image_size, (image_size // patch_size) ** 2, hidden


def clip_processor_config(image_size: int) -> dict[str, Any]:
    """CLIPImageProcessor settings of the real checkpoint, at another crop size (336 for the real model)."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "CLIPImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def build_random_image_encoder(
    hidden_size: int, image_size: int, patch_size: int, num_layers: int, num_heads: int, seed: int
) -> CLIPImageEncoder:
    """A CLIP ViT of the given size with deterministic random weights (tiny preset, tests)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
    return CLIPImageEncoder(model, clip_processor_config(image_size)).eval().requires_grad_(False)
