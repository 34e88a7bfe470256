"""What the exporter reads a model from: a checkpoint folder, or `full-random` (no folder at all).

A `ModelSource` gives the component configs, a content hash per component (the export cache key),
the small models whole (VAE, CLIP), and the transformer piece by piece: `transformer(dtype, keys)`
materializes only the tensors named by `keys` on a meta-device model, and `transformer_tensor(key,
dtype)` reads or makes one tensor. So a full-size export never holds the 14.4 GB of transformer weights
at once: the per-block graphs need only the embed/unembed weights (about 0.35 GB in fp16) and the
whole-model graph is written block by block (export/stitch.py).

Configs come from the `Checkpoint` (models/checkpoint.py) the source wraps (`model_source(spec)`):
- `CheckpointSource(checkpoint)`: reads safetensors lazily (safe_open, tensor by tensor, over shards).
- `RandomSource(seed)`: `full-random`, the released architecture with the preset's weights, tensor for
  tensor what `models.presets.full_random_transformer` makes (same generator per tensor position).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..models.checkpoint import FULL_RANDOM, Checkpoint
from ..models.checkpoint_io import CheckpointError, check_state_dict, config_to_dict, weight_files
from ..models.image_encoder import CLIPImageEncoder
from ..models.transformer import RuyiTransformer3D, TransformerConfig, computed_state
from ..models.vae import RuyiVAE
from ..models.vae_config import VAEConfig

RANDOM_RECIPE = "models.presets.random_value v1"  # part of full-random's hash: change it with the recipe
# exported component -> the checkpoint part whose config and weights it is made from
COMPONENT_PARTS = {"transformer": "transformer", "vae-encoder": "vae", "vae-decoder": "vae",
                   "image-encoder": "image_encoder"}  # fmt: skip


class ModelSource(abc.ABC):
    """Configs, hashes and weights of one checkpoint (models.checkpoint.Checkpoint); see the module docstring."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.name = checkpoint.name

    def transformer_config(self) -> TransformerConfig:
        return self.checkpoint.transformer

    def vae_config(self) -> VAEConfig:
        return self.checkpoint.vae

    def clip_geometry(self) -> tuple[int, int, int]:
        """(image size, patch tokens, hidden size) of the CLIP vision tower."""
        return self.checkpoint.clip_geometry

    @abc.abstractmethod
    def component_hash(self, component: str) -> str:
        """'sha256:...' over everything the component's graphs depend on (the export cache key)."""

    @abc.abstractmethod
    def transformer_tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """One transformer state-dict entry, on the CPU, floating tensors cast to `dtype`."""

    def vae(self, dtype: torch.dtype) -> RuyiVAE:
        """The whole VAE on the CPU in `dtype`."""
        return self.checkpoint.load_vae(dtype)

    def image_encoder(self, dtype: torch.dtype) -> CLIPImageEncoder:
        """The CLIP image encoder on the CPU in `dtype`."""
        return self.checkpoint.load_image_encoder(dtype)

    def transformer(self, dtype: torch.dtype, keys: Callable[[str], bool] = lambda key: True) -> RuyiTransformer3D:
        """The transformer with the state-dict entries `keys` selects loaded (on the CPU, in `dtype`); every
        other tensor stays on the meta device (shapes only)."""
        config = self.transformer_config()
        with torch.device("meta"):
            model = RuyiTransformer3D(config).to(dtype)
        state = {key: self.transformer_tensor(key, dtype) for key in model.state_dict() if keys(key)}
        model.load_state_dict(state, strict=False, assign=True)
        return model.eval().requires_grad_(False)

    def transformer_weight_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of every transformer tensor in `dtype` (from shapes alone)."""
        with torch.device("meta"):
            model = RuyiTransformer3D(self.transformer_config())
        size = torch.empty((), dtype=dtype).element_size()
        return sum(t.numel() * size for t in model.state_dict().values())


class CheckpointSource(ModelSource):
    """A checkpoint folder in the released layout (transformer/, vae/, image_encoder/)."""

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint)
        self.folder = checkpoint.part("transformer").parent

    def component_hash(self, component: str) -> str:
        return self.checkpoint.weights_hash(COMPONENT_PARTS[component])

    def transformer_tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        reader = _lazy_reader(str(self.folder / "transformer"))
        if key in reader.files:
            tensor = reader.get(key)
        else:
            fixed = computed_state(self.transformer_config())
            if key not in fixed:
                raise CheckpointError(f"{self.folder / 'transformer'} has no tensor {key}; download the checkpoint again.")
            tensor = fixed[key]
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def transformer(self, dtype: torch.dtype, keys: Callable[[str], bool] = lambda key: True) -> RuyiTransformer3D:
        reader = _lazy_reader(str(self.folder / "transformer"))
        config = self.transformer_config()
        with torch.device("meta"):
            model = RuyiTransformer3D(config)
        shapes = {key: torch.empty(shape, device="meta") for key, shape in reader.shapes.items()}
        shapes.update({k: v for k, v in computed_state(config).items() if k not in shapes})
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, shapes, str(self.folder / "transformer"))
        return super().transformer(dtype, keys)


class RandomSource(ModelSource):
    """`full-random`: the released architecture (Checkpoint.full_random()) with deterministic random weights."""

    def __init__(self, seed: int = 0, checkpoint: Checkpoint | None = None):
        super().__init__(checkpoint or Checkpoint.full_random())
        self.seed = seed

    def component_hash(self, component: str) -> str:
        checkpoint = self.checkpoint
        configs = {"transformer": config_to_dict(checkpoint.transformer), "vae": config_to_dict(checkpoint.vae),
                   "clip": checkpoint.image_encoder}  # fmt: skip
        payload = {"preset": FULL_RANDOM, "recipe": RANDOM_RECIPE, "seed": self.seed, "component": component,
                   "configs": configs}  # fmt: skip
        return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def transformer_tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        from ..models.presets import random_value

        fixed = computed_state(self.transformer_config())
        if key in fixed:
            value = fixed[key]
        else:
            index, shape = _random_layout()[key]
            value = random_value(key, shape, index, self.seed)
        return value.to(dtype)

    def vae(self, dtype: torch.dtype) -> RuyiVAE:
        from ..models.presets import full_random_vae

        return full_random_vae("cpu", dtype, self.seed + 1)

    def image_encoder(self, dtype: torch.dtype) -> CLIPImageEncoder:
        from ..models.presets import full_random_image_encoder

        return full_random_image_encoder("cpu", dtype, self.seed + 2)


def model_source(model: Checkpoint | str | Path | ModelSource) -> ModelSource:
    """A source for `model`: a ModelSource as it is, else the checkpoint it names (Checkpoint.resolve, no download)."""
    if isinstance(model, ModelSource):
        return model
    checkpoint = Checkpoint.resolve(model, download=False)
    return RandomSource(checkpoint=checkpoint) if checkpoint.is_random else CheckpointSource(checkpoint)


@functools.lru_cache(maxsize=1)
def _random_layout() -> dict[str, tuple[int, tuple[int, ...]]]:
    """{state key: (position in named_parameters() + named_buffers(), shape)} of the full transformer."""
    with torch.device("meta"):
        model = RuyiTransformer3D(TransformerConfig.full())
    entries = list(model.named_parameters()) + list(model.named_buffers())
    return {name: (index, tuple(tensor.shape)) for index, (name, tensor) in enumerate(entries)}


class _LazyReader:
    """The tensors of a component folder's safetensors, read one at a time (shards included)."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in weight_files(folder):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        if key in self.files:
                            raise CheckpointError(f"{path}: key {key} appears in more than one shard.")
                        self.files[key] = path
                        self.shapes[key] = tuple(handle.get_slice(key).get_shape())
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); download the checkpoint "
                                      "again.") from exc  # fmt: skip

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[key]), framework="pt") as handle:
            return handle.get_tensor(key)


@functools.lru_cache(maxsize=4)
def _lazy_reader(folder: str) -> _LazyReader:
    return _LazyReader(Path(folder))
