"""The TensorRT backend (`--backend trt`): the pipeline's four components over cached TensorRT engines.

It mirrors the ONNX Runtime backend (runtime/backends/ort_backend.py): the same graphs, the same VAE chunk loops
(`encode_in_chunks` / `decode_in_chunks`), RoPE passed as rope_cos/rope_sin. Engines come from the
engine cache (engine/cache.py), made by `ruyi-trt build`; nothing is built here. Each call picks the
engine whose profile covers its shapes, for this GPU, TensorRT version, checkpoint and precision, and
activates it on first use; a run no engine fits is refused with the reason and the exact build command.

Device memory: all engines of a run share one `ScratchMemory` as their contexts' user-managed memory
(they run one at a time, on one private CUDA stream), sized for the shapes in use. Each stage's engines
are released when the next stage starts (`EngineSet.enter`: VAE encoder -> CLIP -> transformer -> VAE
decoder), and the decoder's when the decode ends. A --weight-streaming engine's budget is computed when it is
activated, from its own figures and the memory free at that moment (after the resident engines and
tensors) less what the stage still needs outside the engine: for the per-block loop the memory plan's
`trt_block_loop_bytes` (the CFG batch's tokens and every long skip); with a memory plan, never more than
its usable budget.

The transformer runs as the whole-model engine, or, when only per-block engines were built, as
embed -> 40 block calls (two engines, the block weights bound as inputs straight from device memory,
tokens as [B, T, S, D]) -> unembed; the RoPE tables are moved to the device once per run. A LoRA is
merged in PyTorch on the host and reaches a whole-model engine by refit (built with --refit) when that
engine is first selected: only it is refitted, from host memory, with the changed tensors and whatever
TensorRT reports missing filled from the merged state; per-block engines just take the merged weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ...engine import cache
from ...engine.device_memory import ScratchMemory, engine_device_bytes, free_device_bytes
from ...engine.plan import BLOCK_TRANSFORMER
from ...engine.runtime import TRTEngine
from ...engine.trt_api import require_tensorrt
from ...models.checkpoint import Checkpoint
from ...models.transformer import TransformerConfig
from ...models.vae import decode_in_chunks, encode_in_chunks
from ..memory.plan import MemoryPlan
from .protocol import CallableBackend, Components

log = logging.getLogger(__name__)

TRT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENT_OF = {"image_encoder": "image-encoder", "vae_encoder": "vae-encoder", "vae_decoder": "vae-decoder",
                "vae_decoder_one_frame": "vae-decoder", **{g: "transformer" for g in ("transformer", *BLOCK_TRANSFORMER)}}  # fmt: skip
OnActivate = Callable[[Path, cache.EngineRecord, TRTEngine], None]


class EngineSet:
    """The cached engines one run may use; `run(graph, request, **inputs)` picks, activates and runs one."""

    def __init__(self, checkpoint: Checkpoint, precision: str, memory_plan: MemoryPlan | None = None,
                 cuda_graphs: bool = False, root: Path | None = None):  # fmt: skip
        from ...export.manifest import component_hash

        trt = require_tensorrt("the TensorRT backend")
        self.model, self.precision = checkpoint.name, precision
        self.platform = cache.Platform.current(trt.__version__)
        self.cuda_graphs = cuda_graphs
        self.budget = memory_plan.usable_bytes if memory_plan is not None else None  # device bytes the run may use
        self.block_loop_bytes = memory_plan.trt_block_loop_bytes if memory_plan is not None else 0
        self.records = cache.read_records(cache.engines_root(root))
        self.hashes = {c: component_hash(checkpoint, c) for c in sorted(set(COMPONENT_OF.values()))}
        self.active: dict[Path, TRTEngine] = {}
        self.scratch = ScratchMemory()
        self.stream = torch.cuda.Stream()
        self.on_activate: dict[str, OnActivate] = {}  # graph -> called once per engine activated for it
        self.request = (512, 512, 24, 2)  # the video size named in refusals, until a video-sized call sets it

    def requirement(self, graph: str, request: tuple[int, int, int, int], inputs: dict[str, torch.Tensor]) -> cache.Requirement:
        return cache.Requirement(graph, self.precision, self.hashes[COMPONENT_OF[graph]], self.platform, self.model,
                                 request, {name: tuple(t.shape) for name, t in inputs.items()})  # fmt: skip

    def candidates(self, graph: str) -> list[tuple[Path, cache.EngineRecord]]:
        """Engines for `graph` usable here (this GPU, TensorRT, checkpoint, precision), whatever their profile."""
        need = self.requirement(graph, (0, 0, 0, 0), {})
        return [(folder, record) for folder, record in self.records if not cache.mismatches(record, need)]

    def free_bytes(self) -> int:
        """Device memory a new engine may take now: free memory, and with a plan what its budget leaves after
        torch's reservations and the active engines' weights."""
        free = free_device_bytes()
        if self.budget is None:
            return free
        engines = sum(engine_device_bytes(e.figures, e.budget) for e in self.active.values() if e.figures is not None)
        return min(free, self.budget - torch.cuda.memory_reserved() - engines)

    def activated(self, folder: Path, record: cache.EngineRecord) -> TRTEngine:
        """The engine in `folder`, activated on first use (streaming budget from its figures and free memory)."""
        if folder not in self.active:
            loaded = TRTEngine(folder, record, self.cuda_graphs, self.scratch, self.stream)
            keep = self.block_loop_bytes if record.graph in BLOCK_TRANSFORMER else 0
            loaded.activate(keep_free_bytes=keep, free_bytes=self.free_bytes)
            self.active[folder] = loaded
            if record.graph in self.on_activate:
                self.on_activate[record.graph](folder, record, loaded)
        return self.active[folder]

    def run_all(self, graph: str, request: tuple[int, int, int, int] | None, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of `graph` on `inputs`, by name; `request` (height, width, frames, batch) names the video
        (None: the last one seen, for graphs whose shapes do not depend on it)."""
        self.request = request or self.request
        folder, record = cache.select_engine(self.records, self.requirement(graph, self.request, inputs))
        return self.activated(folder, record).infer(inputs)

    def run(self, graph: str, request: tuple[int, int, int, int] | None, **inputs: torch.Tensor) -> torch.Tensor:
        """The (first) output of `graph`."""
        return next(iter(self.run_all(graph, request, **inputs).values()))

    def release(self, component: str) -> None:
        """Unload the engines of `component` (its stage has ended); the shared scratch stays for the next stage."""
        for folder in [f for f, e in self.active.items() if e.record.component == component]:
            self.active.pop(folder).unload()

    def enter(self, component: str) -> None:
        """`component`'s stage starts: release every other component's engines."""
        for other in {e.record.component for e in self.active.values()} - {component}:
            self.release(other)

    def close(self) -> None:
        for loaded in self.active.values():
            loaded.unload()
        self.active.clear()
        self.scratch.release()


def trt_components(checkpoint: Checkpoint, dtype: str, memory_plan: MemoryPlan | None = None,
                   cuda_graphs: bool = False, loras: tuple[tuple[str, float], ...] = ()) -> Components:  # fmt: skip
    """TensorRT components for the checkpoint's cached engines (see the module docstring)."""
    require_tensorrt("--backend trt")
    if dtype not in TRT_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported by the TensorRT backend; use one of {tuple(TRT_DTYPES)} "
                         "(the precision the engines were built in).")  # fmt: skip
    if not torch.cuda.is_available():
        raise ValueError("the TensorRT backend needs a CUDA GPU; none is visible (use --backend torch or ort).")
    vcfg = checkpoint.vae
    engines = EngineSet(checkpoint, dtype, memory_plan, cuda_graphs)
    scale = vcfg.mini_batch_encoder // vcfg.mini_batch_decoder  # video frames per latent frame

    def video_request(video: torch.Tensor) -> tuple[int, int, int, int]:
        return video.shape[3], video.shape[4], video.shape[2], video.shape[0]

    def latent_request(latents: torch.Tensor) -> tuple[int, int, int, int]:
        factor = vcfg.spatial_factor
        return latents.shape[3] * factor, latents.shape[4] * factor, latents.shape[2] * scale, latents.shape[0]

    def encode_image(pixel_values: torch.Tensor) -> torch.Tensor:
        engines.enter("image-encoder")
        return engines.run("image_encoder", None, pixel_values=pixel_values)

    def encode_video(video: torch.Tensor) -> torch.Tensor:
        engines.enter("vae-encoder")
        return encode_in_chunks(vcfg, video, lambda chunk: engines.run("vae_encoder", video_request(video), video=chunk))

    def decode_chunk(request, latents, before, after, one: bool) -> torch.Tensor:
        if one:
            return engines.run("vae_decoder_one_frame", request, latents=latents)
        empty = latents[:, :, :0]  # no neighbour chunk: a context of 0 frames
        return engines.run("vae_decoder", request, latents=latents, context_before=empty if before is None else before,
                           context_after=empty if after is None else after)  # fmt: skip

    def decode(latents: torch.Tensor) -> torch.Tensor:
        engines.enter("vae-decoder")  # denoising is over: the transformer's engines make room for the decoder
        request = latent_request(latents)
        out = decode_in_chunks(vcfg, latents, lambda *args: decode_chunk(request, *args))
        engines.release("vae-decoder")
        return out

    denoise = _denoiser(engines, checkpoint, TRT_DTYPES[dtype], latent_request, loras)
    return Components(
        image_encoder=CallableBackend(encode_image, engines.close),
        vae_encoder=CallableBackend(encode_video, engines.close),
        vae_decoder=CallableBackend(decode, engines.close),
        denoiser=CallableBackend(denoise, engines.close),
        device=torch.device("cuda"),
        dtype=TRT_DTYPES[dtype],
    )


def _denoiser(engines: EngineSet, checkpoint: Checkpoint, dtype: torch.dtype, latent_request, loras):
    """The transformer call: the whole engine (refitted with the merged LoRAs), or the per-block engines."""
    per_block = not engines.candidates("transformer") and bool(engines.candidates(BLOCK_TRANSFORMER[0]))
    tcfg = checkpoint.transformer
    weights = _merged_weights(checkpoint, dtype, loras) if (per_block or loras) else None
    if loras and not per_block:
        engines.on_activate["transformer"] = _refit_on_activate(weights)
    blocks = _block_weights(weights[0], tcfg.num_layers) if per_block else None
    rope: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def denoise(image_rotary_emb: tuple[torch.Tensor, torch.Tensor], **inputs: torch.Tensor) -> torch.Tensor:
        latents = inputs["hidden_states"]
        if latents.shape[2] < 2:
            raise ValueError(f"TensorRT transformer engines need >= 2 latent frames (got {latents.shape[2]}); use "
                             "--backend torch for single-frame requests.")  # fmt: skip
        request = latent_request(latents)
        engines.enter("transformer")
        cos, sin = _on_device(rope, image_rotary_emb)
        if blocks is None:
            return engines.run("transformer", request, rope_cos=cos, rope_sin=sin, **inputs)
        return _run_blocks(engines, tcfg, blocks, request, cos, sin, inputs)

    return denoise


def _on_device(cache_: dict, tables: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables on the device, moved once per run: the pipeline passes the same tensors at every step."""
    cos, sin = tables
    key = id(cos)
    if key not in cache_:
        cache_.clear()
        cache_[key] = (cos, sin, cos.to("cuda", torch.float32), sin.to("cuda", torch.float32))  # keeps cos alive: id stays unique
    return cache_[key][2], cache_[key][3]


def _merged_weights(checkpoint: Checkpoint, dtype: torch.dtype, loras: tuple[tuple[str, float], ...]) -> tuple[dict, list[str]]:
    """(transformer state dict in `dtype` on the host, with the LoRAs merged in order; the merged weight names)."""
    from ...weights.lora import load_lora, merge_lora

    model = checkpoint.load_transformer(dtype)
    changed: list[str] = []
    for path, strength in loras:
        merged = [f"{name}.weight" for name in merge_lora(model, load_lora(path), strength)]
        changed += [name for name in merged if name not in changed]
        log.info("LoRA %s merged into %d layers (strength %s)", path, len(merged), strength)
    return dict(model.state_dict()), changed


def _refit_on_activate(weights: tuple[dict, list[str]]) -> OnActivate:
    """Refit each whole-transformer engine when it is first selected, from the merged host state."""
    from ...engine.refit import initializer_tensors, read_refit_map, refit_tensors

    state, changed = weights

    def refit(folder: Path, record: cache.EngineRecord, loaded: TRTEngine) -> None:
        if not record.flags.get("refit"):
            raise ValueError(f"--lora with --backend trt needs transformer engines built with --refit ({folder} is not); "
                             f"rebuild: {record.settings.command()} --refit")  # fmt: skip
        mapping = read_refit_map(folder)
        count = loaded.refit(refit_tensors(mapping, state, changed), lambda names: initializer_tensors(mapping, state, names))
        log.info("refitted %d weights of %s", count, folder)

    return refit


def _block_weights(state: dict[str, torch.Tensor], num_layers: int) -> list[dict[str, torch.Tensor]]:
    """Per block i, its tensors on the device, keyed as the block graphs name their weight inputs (`blocks.i.` removed)."""
    blocks: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
    for key, value in state.items():
        if key.startswith("blocks."):
            index, _, name = key.removeprefix("blocks.").partition(".")
            blocks[int(index)][name] = value.to("cuda")
    return blocks


def _run_blocks(engines: EngineSet, tcfg: TransformerConfig, blocks, request, cos, sin, inputs) -> torch.Tensor:
    """embed -> every block (long skips as in RuyiTransformer3D.run_blocks) -> unembed, one engine call each;
    tokens go to the block engines as [B, T, S, D] views of embed's [B, T, hp, wp, D]."""
    embedded = engines.run_all("transformer_embed", request, **inputs)
    grid, temb, text_states, clip_states = (embedded[k] for k in ("tokens", "temb", "text_states", "clip_states"))
    tokens = grid.flatten(2, 3)
    sources = tcfg.skip_sources
    kept, skips = set(sources.values()), {}
    shared = {"temb": temb, "text_states": text_states, "clip_states": clip_states, "rope_cos": cos, "rope_sin": sin}
    for i, weights in enumerate(blocks):
        if i in sources:
            tokens = engines.run("transformer_block_skip", request, tokens=tokens, skip=skips.pop(sources[i]), **shared, **weights)
        else:
            tokens = engines.run("transformer_block_plain", request, tokens=tokens, **shared, **weights)
        if i in kept:
            skips[i] = tokens
    return engines.run("transformer_unembed", request, tokens=tokens.reshape(grid.shape), temb=temb)
