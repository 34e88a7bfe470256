"""`--backend aoti`: the torch pipeline with the transformer blocks run by AOTInductor packages
(`ruyi-trt build --engine aoti`, engine/aoti.py).

The embedding and the output layers stay eager torch (a tiny share of the work); every block call goes to
the package of its type, after loading that block's own tensors into it (`load_constants`, no copy), so the
weights are the loaded checkpoint's, LoRA merges included. Per call the packages are chosen from the cache
like TensorRT engines (engine.cache.select_engine: this platform, architecture, precision, and a profile
that covers the shapes), and a shape outside every profile is refused with the build command that covers it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ...engine import cache
from ...engine.aoti import AOTI_GRAPHS, ENGINE, AotiPackage, aoti_platform, aoti_root, config_hash
from ...models.checkpoint import Checkpoint
from ...models.transformer import RuyiTransformer3D
from .protocol import move_inputs

log = logging.getLogger(__name__)

PRECISION_OF = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


class AotiDenoiser:
    """A denoiser `Backend` over a RuyiTransformer3D whose blocks run as AOTInductor packages."""

    def __init__(self, model: RuyiTransformer3D, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype,
                 root: Path | None = None):  # fmt: skip
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        vae = checkpoint.vae  # pixels per latent cell and video frames per latent frame, for the refusals' command
        self.video_scale = (vae.spatial_factor, vae.mini_batch_encoder // vae.mini_batch_decoder)
        self.model_name = model_name = checkpoint.name
        self.precision = PRECISION_OF[dtype]
        self.platform = aoti_platform(self.device)
        self.architecture = config_hash(checkpoint)
        self.records = cache.read_records(aoti_root(root))
        self.loaded: dict[Path, AotiPackage] = {}
        self.constants = [{f"block.{k}": v for k, v in block.state_dict().items()} for block in model.blocks]
        if not any(record.graph in AOTI_GRAPHS for _, record in self.records):
            raise cache.EngineMismatchError(
                f"no AOTInductor packages in {aoti_root(root)}; build them with: ruyi-trt build --engine aoti "
                f"--model {model_name} --precision {self.precision} --resolution HEIGHTxWIDTH --frames F"
            )

    def _package(self, graph: str, request: tuple[int, int, int, int], shapes: dict) -> AotiPackage:
        need = cache.Requirement(graph, self.precision, self.architecture, self.platform, self.model_name, request,
                                 shapes, engine=ENGINE)  # fmt: skip
        folder, record = cache.select_engine(self.records, need)
        if folder not in self.loaded:
            self.loaded[folder] = AotiPackage(folder, record, self.device)
        return self.loaded[folder]

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        inputs = move_inputs(inputs, self.device, self.dtype)
        inputs.pop("return_dict", None)
        model, config = self.model, self.model.config
        embedded = model.embed(**inputs)
        batch, frames = embedded.hidden.shape[0], embedded.num_frames
        per_frame = embedded.grid_height * embedded.grid_width
        dim = embedded.hidden.shape[-1]
        shared = {"temb": embedded.temb, "text_states": embedded.text_states, "clip_states": embedded.clip_states,
                  "rope_cos": embedded.rope_cos[:per_frame], "rope_sin": embedded.rope_sin[:per_frame]}  # fmt: skip
        tokens = embedded.hidden.reshape(batch, frames, per_frame, dim)
        pixels, frame_scale = self.video_scale
        factor = config.patch_size * pixels
        request = (embedded.grid_height * factor, embedded.grid_width * factor, frames * frame_scale, batch)
        shapes = {"tokens": tuple(tokens.shape), **{k: tuple(v.shape) for k, v in shared.items()}}
        plain = self._package(AOTI_GRAPHS[0], request, shapes)
        skip_package = self._package(AOTI_GRAPHS[1], request, {**shapes, "skip": shapes["tokens"]}) if config.skip_blocks else None
        sources = config.skip_sources
        kept, skips = set(sources.values()), {}
        for i in range(config.num_layers):
            if i in sources:
                tokens = skip_package.run(self.constants[i], tokens=tokens, skip=skips.pop(sources[i]), **shared)
            else:
                tokens = plain.run(self.constants[i], tokens=tokens, **shared)
            if i in kept:
                skips[i] = tokens
        x = model.norm_out(tokens.reshape(batch, frames * per_frame, dim), embedded.temb)
        return model.unpatchify(model.proj_out(x), frames, embedded.grid_height, embedded.grid_width)

    def start(self, num_calls: int, num_steps: int | None = None) -> None:
        """Stateless: nothing to reset between runs."""

    def close(self) -> None:
        self.loaded.clear()
