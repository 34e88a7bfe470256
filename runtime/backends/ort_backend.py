"""The ONNX Runtime backend: the pipeline's four components as ORT sessions over the exported graphs.

Graphs come from the artifact cache (`cache_root()/onnx/<key>`, exported on first use by
`export.ensure_exported`). The VAE runs chunk by chunk through the same loops as `RuyiVAE`
(`encode_in_chunks` / `decode_in_chunks`), with one session call per chunk. On CUDA, inputs and outputs
are bound to device memory (IO binding) and outputs reach torch through DLPack, so tensors never pass
through the host (onnxruntime-gpu >= MIN_ONNXRUNTIME: its OrtValue implements `__dlpack__`).

Providers (`default_providers`): on a CUDA device the CUDA EP with `arena_extend_strategy`
kSameAsRequested (the default kNextPowerOfTwo grows the arena to the next power of two: a 9 GB request
reserves 16 GB), then CPU. ONNX Runtime's TensorRT EP is used only when given an engine cache folder and
the graph's profile shapes (`ort_components(..., trt_profiles=..., trt_cache_dir=...)`, and libnvinfer
loads): without them it would rebuild every engine, the 14 GB transformer included, on every run, for
whatever shapes the first call has.

`ort-int8` / `ort-fp8`: the same, with the transformer graph replaced by its Q/DQ version (export/qdq.py) made from
a calibration folder (calib/); FP8 sessions run with ORT's QDQ fusion off (it has no float8 MatMul kernel).

Limits: fp32 and fp16 only (ORT's Python API has no bfloat16 arrays), slice-mode VAEs only, and at least
two latent frames for the transformer (one-frame requests need --backend torch).
"""

from __future__ import annotations

import ctypes.util
import logging
from pathlib import Path

import torch

from ...deps import require
from ...export.qdq import qdq_session_config
from ...models.checkpoint import Checkpoint
from ...models.vae import decode_in_chunks, encode_in_chunks
from .protocol import CallableBackend, Components

log = logging.getLogger(__name__)

ORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MIN_ONNXRUNTIME = (1, 26)  # OrtValue.__dlpack__ in the public Python class (pyproject pins onnxruntime-gpu>=1.26)
_TORCH_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def default_providers(device: torch.device, trt_profile: Profile | None = None, trt_cache_dir: Path | None = None,
                      fp16: bool = False) -> list:  # fmt: skip
    """ORT execution providers for `device`, best first, limited to those this onnxruntime build has."""
    ort = require("onnxruntime", "the ONNX Runtime backend")
    available = set(ort.get_available_providers())
    wanted: list = ["CPUExecutionProvider"]
    if device.type == "cuda":
        index = device.index or 0
        wanted = [("CUDAExecutionProvider", {"device_id": index, "arena_extend_strategy": "kSameAsRequested"}), *wanted]
        if trt_profile is not None and trt_cache_dir is not None and ctypes.util.find_library("nvinfer"):
            wanted = [("TensorrtExecutionProvider", tensorrt_provider_options(index, trt_profile, trt_cache_dir, fp16)),
                      *wanted]  # fmt: skip
    return [p for p in wanted if (p[0] if isinstance(p, tuple) else p) in available]


def tensorrt_provider_options(device_id: int, profile: Profile, cache_dir: Path, fp16: bool) -> dict[str, object]:
    """TensorRT EP options: engines and timing cache kept in `cache_dir`, one explicit optimization profile."""
    shapes = ({name: ranges[level] for name, ranges in profile.items()} for level in range(3))
    low, opt, high = (",".join(f"{name}:{'x'.join(map(str, dims))}" for name, dims in s.items()) for s in shapes)
    return {
        "device_id": device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir), "trt_fp16_enable": fp16,
        "trt_profile_min_shapes": low, "trt_profile_opt_shapes": opt, "trt_profile_max_shapes": high,
    }  # fmt: skip


def check_onnxruntime_version(version: str) -> None:
    """ImportError with the pip command when `version` is older than MIN_ONNXRUNTIME."""
    numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if numbers < MIN_ONNXRUNTIME:
        wanted = ".".join(map(str, MIN_ONNXRUNTIME))
        raise ImportError(f"onnxruntime {version} is too old for the CUDA path of --backend ort (its OrtValue has no "
                          f"DLPack interface); pip install -U 'onnxruntime-gpu>={wanted}'")  # fmt: skip


class OrtGraph:
    """One inference session: named tensors in (cast to the graph's input dtypes), a list of tensors out."""

    def __init__(self, path: Path, device: torch.device, providers: list | None = None, config: dict | None = None):
        ort = require("onnxruntime", "the ONNX Runtime backend")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about every provider it skips
        for key, value in (config or {}).items():
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers(device))
        self.device = device
        self.input_types = {i.name: _TORCH_TYPES[i.type] for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # IO binding to device memory needs a CUDA provider; a CPU-only onnxruntime runs on host copies
        gpu_providers = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}
        self.bound = device.type == "cuda" and bool(gpu_providers & set(self.session.get_providers()))
        if self.bound:
            check_onnxruntime_version(ort.__version__)
        if device.type == "cuda" and not self.bound:
            log.warning("%s: onnxruntime has no CUDA provider here (%s); it runs on the CPU", path.name,
                        self.session.get_providers())  # fmt: skip
        log.debug("%s on %s", path.name, self.session.get_providers())

    def run(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        missing = sorted(set(self.input_types) - set(inputs))
        if missing:
            raise ValueError(f"graph inputs {missing} were not given (got {sorted(inputs)})")
        if not self.bound:  # numpy views on the host (no copies when the device is the CPU)
            feeds = {name: inputs[name].to("cpu", dtype).contiguous() for name, dtype in self.input_types.items()}
            outputs = self.session.run(self.output_names, {k: v.numpy() for k, v in feeds.items()})
            return [torch.from_numpy(out).to(self.device) for out in outputs]
        feeds = {name: inputs[name].to(self.device, dtype).contiguous() for name, dtype in self.input_types.items()}
        return self._run_bound(feeds)

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """CUDA: bind torch's device buffers as inputs and let ORT allocate outputs on the device."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, tensor in feeds.items():
            numpy_dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
            binding.bind_input(name, "cuda", index, numpy_dtype, tuple(tensor.shape), tensor.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        torch.cuda.current_stream(self.device).synchronize()  # inputs written on torch's stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return [torch.from_dlpack(value) for value in binding.get_outputs()]


def quantized_transformer(checkpoint: Checkpoint, graph: Path, precision: str, calibration: Path) -> Path:
    """The Q/DQ version of the transformer graph `graph` from the scales in the calibration folder `calibration`."""
    from ...calib.store import load_calibration
    from ...export.qdq import ensure_qdq_graph

    scales, record = load_calibration(calibration, precision, checkpoint.weights_hash("transformer"))
    return ensure_qdq_graph(graph, scales.layers, record["scales_sha256"], precision)


def ort_components(checkpoint: Checkpoint | str | Path, device: torch.device | str = "cpu", dtype: str = "fp32",
                   providers: list | None = None, progress: bool = True, trt_profiles: dict[str, Profile] | None = None,
                   trt_cache_dir: Path | None = None, quantized: tuple[str, Path] | None = None) -> Components:  # fmt: skip
    """ORT backends for the checkpoint's graphs (exported into the artifact cache when missing). `trt_profiles`
    ({graph: profile}) with `trt_cache_dir` lets those graphs use the TensorRT EP (see the module docstring);
    `quantized` (precision, calibration folder) runs the transformer as its fp8/int8 Q/DQ graph."""
    from ...export import manifest
    from ...export.onnx_export import ExportSettings, ensure_exported

    if dtype not in ORT_DTYPES:
        raise ValueError(
            f"dtype: {dtype!r} is not supported by the ONNX Runtime backend; use one of {tuple(ORT_DTYPES)}."
        )
    checkpoint = Checkpoint.resolve(checkpoint, download=False)
    device, vae_config = torch.device(device), checkpoint.vae
    out = ensure_exported(checkpoint, ExportSettings(dtype=dtype), progress=progress)
    listing = manifest.read_manifest(out)

    def graph(name: str) -> OrtGraph:
        chosen = providers or default_providers(device, (trt_profiles or {}).get(name), trt_cache_dir, dtype == "fp16")
        return OrtGraph(manifest.graph_path(out, listing, name), device, chosen)

    clip, encoder = graph("image_encoder"), graph("vae_encoder")
    if quantized is None:
        transformer = graph("transformer")
    else:
        precision, calibration = quantized
        path = quantized_transformer(checkpoint, manifest.graph_path(out, listing, "transformer"), precision, Path(calibration))
        transformer = OrtGraph(path, device, providers, qdq_session_config(precision, device))
    decoder, one_frame = graph("vae_decoder"), graph("vae_decoder_one_frame")

    def encode_video(video: torch.Tensor) -> torch.Tensor:
        return encode_in_chunks(vae_config, video, lambda chunk: encoder.run(video=chunk)[0])

    def decode_chunk(latents, before, after, one: bool) -> torch.Tensor:
        if one:
            return one_frame.run(latents=latents)[0]
        empty = latents[:, :, :0]  # no neighbour chunk: a context of 0 frames
        return decoder.run(latents=latents, context_before=empty if before is None else before,
                           context_after=empty if after is None else after)[0]  # fmt: skip

    def denoise(image_rotary_emb: tuple[torch.Tensor, torch.Tensor], **inputs: torch.Tensor) -> torch.Tensor:
        frames = inputs["hidden_states"].shape[2]
        if frames < 2:
            raise ValueError(f"the ONNX transformer needs >= 2 latent frames (got {frames}); use --backend torch "
                             "for single-frame requests.")  # fmt: skip
        cos, sin = image_rotary_emb
        return transformer.run(rope_cos=cos, rope_sin=sin, **inputs)[0]

    return Components(
        image_encoder=CallableBackend(lambda pixel_values: clip.run(pixel_values=pixel_values)[0], lambda: None),
        vae_encoder=CallableBackend(encode_video, lambda: None),
        vae_decoder=CallableBackend(
            lambda latents: decode_in_chunks(vae_config, latents, decode_chunk), lambda: None
        ),
        denoiser=CallableBackend(denoise, lambda: None),
        device=device,
        dtype=ORT_DTYPES[dtype],
    )
