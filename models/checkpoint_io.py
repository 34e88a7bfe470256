"""Reading checkpoint folders: config.json into config dataclasses, safetensors into strict state dicts.

Every component folder of a Ruyi checkpoint (`transformer/`, `vae/`, ...) holds a `config.json` and
weights as one `*.safetensors` file or shards listed by a `*.safetensors.index.json`. Loading is strict:
a missing, unexpected or mis-shaped key is an error whose message names the first offenders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_write

log = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CHECKPOINT_REPO = "IamCreateAI/Ruyi-Mini-7B"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT_HINT = (
    "Convert it on a machine you trust: python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\""
)


class CheckpointError(RuntimeError):
    """A checkpoint folder or file that cannot be used as it is; the message says what to do."""


def read_config(folder: str | Path, name: str = CONFIG_NAME) -> dict[str, Any]:
    """Read `folder/name` as a JSON object, with errors that name the file and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist. Pass --model PATH to a Ruyi-Mini-7B folder, "
            "--model tiny for the small random test model, or let ruyi-trt download models/Ruyi-Mini-7B."
        )
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the folder {folder} is not a complete checkpoint component.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download the checkpoint.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}.")
    return data


def config_from_dict(cls: type[ConfigT], data: Mapping[str, Any], source: str = "config") -> ConfigT:
    """Build the dataclass `cls` from a config dict: field names equal JSON keys.

    A missing required field raises CheckpointError; unknown keys (diffusers bookkeeping such as
    `_class_name`, or options this model does not use) are logged and ignored.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CheckpointError(f"{source}: required key(s) {missing} missing for {cls.__name__}.")
    unknown = sorted(k for k in data if k not in fields and not k.startswith("_"))
    if unknown:
        log.debug("%s: ignoring keys not used by %s: %s", source, cls.__name__, unknown)
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fields}
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """The JSON-ready dict of a config dataclass (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def safetensors_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a safetensors file (a pickle, truncated, corrupt), or None when it can.

    Only the header is read (safetensors checks that the file covers every tensor); a pickle is recognised by
    its first bytes and never unpickled, since unpickling runs whatever code the file holds."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc}); check its permissions"
    if len(head) == 9 and head[8:9] != b"{":  # a safetensors file starts with a u64 header size, then '{'
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1] in range(2, 6)):
            return ("a PyTorch pickle (.pt/.ckpt/.bin), not safetensors. Pickles can run code when they are "
                    f"loaded, so ruyi-trt never opens them. {CONVERT_HINT}")  # fmt: skip
        return "not a safetensors file (its header is missing); use a .safetensors file"
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except (SafetensorError, OSError, ValueError) as exc:
        return f"not a readable safetensors file ({exc}); it is probably truncated or corrupt: download it again"


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    problem = safetensors_problem(path)
    try:
        if problem is None:
            return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        problem = f"not a readable safetensors file ({exc}); it is probably truncated or corrupt: download it again"
    raise CheckpointError(f"{path} is {problem} (the whole checkpoint: huggingface-cli download {CHECKPOINT_REPO}).")


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a component's weights: the shards of an index, or the single file."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{indexes[0]} is not a valid shard index ({exc}).") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{folder}: shard(s) {absent} listed in {indexes[0].name} are missing.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickles:
            raise CheckpointError(
                f"{folder} holds PyTorch pickle weights ({', '.join(pickles[:3])}), not safetensors. Pickles can run "
                f"code when they are loaded, so ruyi-trt never opens them. {CONVERT_HINT}"
            )
        raise CheckpointError(f"no *.safetensors weights in {folder}; the checkpoint is incomplete.")
    return files


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a component folder, merged over shards."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        part = _read_safetensors(path)
        clash = state.keys() & part.keys()
        if clash:
            raise CheckpointError(f"{path}: key {sorted(clash)[0]} appears in more than one shard.")
        state.update(part)
    return state


def check_state_dict(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected and mis-shaped keys, if any."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
    raise CheckpointError(
        f"{source} does not match the model built from its config.json: " + "; ".join(parts) + ". "
        "Check that config.json belongs to these weights (a different model or a partial download)."
    )


def load_into(
    module: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    computed: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Load `state` into `module` strictly (the module may live on the meta device).

    `computed` returns the deterministic, non-trained tensors (fixed sin-cos tables) that the released
    checkpoint may omit; they fill in for missing keys only. Floating tensors are cast to `dtype`.
    """
    state = dict(state)
    if computed is not None:
        for key, value in computed().items():
            state.setdefault(key, value)
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    check_state_dict(expected, state, source)
    cast = {
        k: (v.to(device=device, dtype=dtype) if (dtype is not None and v.is_floating_point()) else v.to(device=device))
        for k, v in state.items()
    }
    module.load_state_dict(cast, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def save_component(folder: str | Path, config: dict[str, Any], state: Mapping[str, torch.Tensor]) -> Path:
    """Write `config.json` and `diffusion_pytorch_model.safetensors` into `folder`, each atomically."""
    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return folder

