"""Kohya-style LoRA: merge low-rank updates into a model's weights before sampling, and take them out again.

A LoRA file holds, per adapted layer, `lora_unet_<module path with '.' replaced by '_'>.lora_up.weight` [out, r],
`.lora_down.weight` [r, in] and optionally `.alpha` (a scalar). Merging does, as the reference's `merge_lora`:

    W += strength * (alpha / r) * up @ down        (alpha / r = 1 when there is no alpha)

1x1 convolutions (4-D up/down) are handled the same way. There is no runtime LoRA: the update lives in the weights
until `unmerge_lora` subtracts it. The arithmetic runs in float32 and the result is cast back to the weight's dtype,
on the weight's device (the reference moves weights to the CPU; we leave them where they are).

Module paths are found as the reference does: walk the '_'-separated parts, taking the shortest run of parts that
names a child module at each level (so `to_q`, `ff_net_0_proj` and `attn_clip` resolve). Unlike the reference, a
dead end backtracks to longer names instead of crashing, and every key is checked before any weight changes.
Text-encoder keys (`lora_te_*`) are skipped, since Ruyi has no text encoder.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..models.checkpoint_io import safetensors_problem

log = logging.getLogger(__name__)

TRANSFORMER_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te"


@dataclass(frozen=True)
class _LoraUpdate:
    module_name: str
    module: nn.Module
    up: torch.Tensor
    down: torch.Tensor
    scale: float


def _find_module(root: nn.Module, parts: list[str], path: str = "") -> tuple[str, nn.Module] | None:
    """Depth-first, shortest name first: the module whose dotted name, with '.' -> '_', equals '_'.join(parts)."""
    if not parts:
        return path, root
    for end in range(1, len(parts) + 1):
        name = "_".join(parts[:end])
        child = root._modules.get(name)
        if child is not None:
            found = _find_module(child, parts[end:], f"{path}.{name}" if path else name)
            if found is not None:
                return found
    return None


def _group(lora_state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in lora_state.items():
        layer, _, element = key.partition(".")
        layers[layer][element] = value
    return layers


def _lora_delta(update: _LoraUpdate) -> torch.Tensor:
    up, down = update.up.float(), update.down.float()
    if up.ndim == 4:
        delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(-1).unsqueeze(-1)  # (out, in, 1, 1)
    else:
        delta = up @ down  # (out, in)
    return delta * update.scale


def _plan(model: nn.Module, lora_state: Mapping[str, torch.Tensor], strength: float) -> list[_LoraUpdate]:
    """Resolve and check every LoRA layer against `model`; raise before anything is modified."""
    layers = _group(lora_state)
    updates: list[_LoraUpdate] = []
    unmatched: list[str] = []
    skipped = 0
    for layer, elements in layers.items():
        if layer.startswith(TEXT_ENCODER_PREFIX):
            skipped += 1
            continue
        if not layer.startswith(TRANSFORMER_PREFIX) or layer == TRANSFORMER_PREFIX:
            unmatched.append(layer)
            continue
        found = _find_module(model, layer[len(TRANSFORMER_PREFIX) :].split("_"))
        weight = getattr(found[1], "weight", None) if found is not None else None
        if found is None or not isinstance(weight, torch.Tensor):
            unmatched.append(layer)
            continue
        if "lora_up.weight" not in elements or "lora_down.weight" not in elements:
            raise ValueError(
                f"LoRA layer {layer} needs both lora_up.weight and lora_down.weight, has {sorted(elements)}"
            )
        up, down = elements["lora_up.weight"], elements["lora_down.weight"]
        if up.ndim == 4 and (up.shape[2:] != (1, 1) or down.shape[2:] != (1, 1)):
            raise ValueError(f"LoRA layer {layer}: only 1x1 convolutions are supported, got up {tuple(up.shape)}")
        rank = up.shape[1]
        expected = (up.shape[0], down.shape[1], *up.shape[2:])
        if down.shape[0] != rank or tuple(weight.shape) != tuple(expected):
            raise ValueError(
                f"LoRA layer {layer}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not fit "
                f"{found[0]}.weight {tuple(weight.shape)}"
            )
        alpha = float(elements["alpha"].item()) / rank if "alpha" in elements else 1.0
        updates.append(_LoraUpdate(found[0], found[1], up, down, float(strength) * alpha))
    if skipped:
        log.info("skipped %d text-encoder LoRA layer(s) (lora_te*): Ruyi has no text encoder", skipped)
    if unmatched:
        more = f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else ""
        raise ValueError(
            f"{len(unmatched)} LoRA layer(s) match no module with a weight in the model: "
            f"{', '.join(unmatched[:5])}{more}. Expected keys like "
            f"'{TRANSFORMER_PREFIX}blocks_0_attn1_to_q.lora_up.weight'; is this a LoRA for Ruyi-Mini-7B?"
        )
    if not updates:
        raise ValueError("the LoRA holds no transformer layers (lora_unet_*); nothing to merge")
    return updates


def _apply(model: nn.Module, lora_state: Mapping[str, torch.Tensor], strength: float, sign: float) -> list[str]:
    updates = _plan(model, lora_state, strength)
    with torch.no_grad():
        for update in updates:
            weight = update.module.weight
            delta = _lora_delta(update).to(weight.device)
            weight.copy_((weight.float() + sign * delta).to(weight.dtype))
    return [update.module_name for update in updates]


def check_lora_file(path: str | Path) -> Path:
    """`path` when it is a readable LoRA safetensors file (header checked, nothing loaded), else ValueError saying
    why: missing, a folder, a pickle (never unpickled), truncated or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"lora: {path} does not exist or is not a file; pass the path of a kohya-style .safetensors LoRA.")
    problem = safetensors_problem(path)
    if problem is not None:
        raise ValueError(f"lora: {path} is {problem}.")
    return path


def load_lora(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LoRA `.safetensors` file onto the CPU (the reference reads only safetensors; pickles are refused)."""
    path = check_lora_file(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"lora: {path} is not a readable safetensors file ({exc}).") from exc


def merge_lora(model: nn.Module, lora_state: Mapping[str, torch.Tensor], strength: float = 1.0) -> list[str]:
    """Add `strength` x the LoRA update to the matching weights of `model`; return the merged module names.

    Raises ValueError, with nothing modified, when a transformer key matches no module or the shapes disagree.
    """
    names = _apply(model, lora_state, strength, +1.0)
    log.info("merged LoRA into %d module(s) at strength %s", len(names), strength)
    return names


def unmerge_lora(model: nn.Module, lora_state: Mapping[str, torch.Tensor], strength: float = 1.0) -> list[str]:
    """Subtract what `merge_lora(model, lora_state, strength)` added (exact up to the weight dtype's rounding)."""
    names = _apply(model, lora_state, strength, -1.0)
    log.info("unmerged LoRA from %d module(s)", len(names))
    return names
