"""PyTorch fast paths, benchmarked against eager torch as pseudo-backends named `torch-*` in `bench --backends`.

| name                 | what changes (only the denoiser; the other stages run as eager torch)                      |
|----------------------|---------------------------------------------------------------------------------------------|
| torch-compile        | torch.compile of every transformer block (regional compilation: the 40 identical blocks     |
|                      | share one compiled graph, so compiling takes about one block's time), default mode          |
| torch-compile-max    | the same with mode="max-autotune-no-cudagraphs" (long autotuning in the warm-up)            |
| torch-cudagraph      | the whole denoiser call captured into a CUDA graph once per input shape, then replayed      |
| torch-sdpa-flash     | scaled_dot_product_attention restricted to FlashAttention                                   |
| torch-sdpa-cudnn     | ... restricted to cuDNN attention                                                            |
| torch-sdpa-efficient | ... restricted to the memory-efficient kernel                                                |
| torch-sdpa-math      | ... restricted to the unfused math reference (materializes N x N: small shapes only)         |
| torch-lowgpu         | block streaming, RuntimeOptions(memory_mode="low_gpu"): block weights visit the GPU one at a |
|                      | time (slower, about 2 GB of weights resident instead of 14)                                  |
| torch-int8           | INT8 GEMMs in the blocks' token-wise linears (torchao, dynamic per-token scales); CPU too    |
| torch-fp8            | FP8 GEMMs in the same linears (torch._scaled_mm, dynamic per-token scales; cc >= 8.9)        |
| torch-fp8-attn       | self-attention through the Triton FP8 kernel (Q.K^T e4m3, P.V in the run dtype; cc >= 8.9)   |
| torch-fp8-all        | FP8 GEMMs + FP8 attention with P.V in e4m3 + the fused Triton glue kernels (cc >= 8.9)       |
| torch-fused          | the fused Triton glue kernels alone (norm1 + shift, QK-norm + RoPE, GELU-tanh; CUDA)         |
Compilation, graph capture and autotuning happen in the warm-up calls, which are timed separately (warmup_s).
The 8-bit and kernel paths are runtime.backends.fast_compute.FastCompute settings (`run --compute/--attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..runtime.backends.fast_compute import FastCompute, apply_fast_compute
from ..runtime.backends.protocol import Denoiser


@dataclass(frozen=True)
class FastPath:
    """A torch denoiser variant: how to wrap the denoiser, and whether it needs a CUDA device."""

    name: str
    description: str
    needs_cuda: bool
    memory_mode: str = "full_gpu"  # the RuntimeOptions memory mode the torch pipeline is loaded with
    compile_mode: str | None = None  # torch.compile mode of each block; None: no compilation
    sdpa: str | None = None  # SDPBackend member name
    cuda_graph: bool = False
    fast_compute: FastCompute = field(default_factory=FastCompute)  # 8-bit GEMMs, FP8 attention, fused kernels
    cuda_reason: str = ""  # why it needs CUDA, when that is not obvious

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this path runs on `device`, else why not."""
        if self.needs_cuda and device.type != "cuda":
            return f"{self.name} needs --device cuda" + (f" ({self.cuda_reason})" if self.cuda_reason else "")
        return self.fast_compute.unavailable_reason(device)


FAST_PATHS: dict[str, FastPath] = {
    path.name: path
    for path in (
        FastPath("torch-compile", "torch.compile of each transformer block (default mode)", False, compile_mode="default"),
        FastPath("torch-compile-max", "torch.compile of each block, mode max-autotune-no-cudagraphs", True,
                 compile_mode="max-autotune-no-cudagraphs"),
        FastPath("torch-cudagraph", "CUDA graph of the whole denoiser call, captured per shape", True, cuda_graph=True),
        FastPath("torch-sdpa-flash", "SDPA restricted to FlashAttention", True, sdpa="FLASH_ATTENTION"),
        FastPath("torch-sdpa-cudnn", "SDPA restricted to cuDNN attention", True, sdpa="CUDNN_ATTENTION"),
        FastPath("torch-sdpa-efficient", "SDPA restricted to the memory-efficient kernel", False,
                 sdpa="EFFICIENT_ATTENTION"),
        FastPath("torch-sdpa-math", "SDPA restricted to the unfused math kernel", False, sdpa="MATH"),
        FastPath("torch-lowgpu", "block streaming (memory_mode low_gpu)", True, memory_mode="low_gpu"),
        FastPath("torch-int8", "INT8 GEMMs via torchao (dynamic per-token scales)", False,
                 fast_compute=FastCompute(compute="int8")),
        FastPath("torch-fp8", "FP8 GEMMs via torch._scaled_mm (dynamic per-token scales)", True,
                 fast_compute=FastCompute(compute="fp8"),
                 cuda_reason="FP8 GEMMs need compute capability >= 8.9; on CPU torch._scaled_mm only emulates them"),
        FastPath("torch-fp8-attn", "self-attention through the Triton FP8 kernel (P.V in the run dtype)", True,
                 fast_compute=FastCompute(attention="fp8"), cuda_reason="a Triton kernel, FP8 tl.dot: cc >= 8.9"),
        FastPath("torch-fp8-all", "FP8 GEMMs + FP8 attention (P.V e4m3) + fused Triton glue kernels", True,
                 fast_compute=FastCompute(compute="fp8", attention="fp8-full", fused_kernels=True),
                 cuda_reason="FP8 GEMMs and Triton kernels: cc >= 8.9"),
        FastPath("torch-fused", "fused Triton glue kernels (norm1 + shift, QK-norm + RoPE, GELU-tanh)", True,
                 fast_compute=FastCompute(fused_kernels=True), cuda_reason="Triton kernels"),
    )
}  # fmt: skip


def _inner_model(denoiser: Denoiser) -> torch.nn.Module:
    """The torch model a denoiser runs: a RuyiTransformer3D, or anything else with `.blocks` (the bench's block)."""
    model = getattr(denoiser, "model", None)
    if not isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
        raise TypeError(f"{type(denoiser).__name__} holds no torch transformer blocks to change")
    return model


class CompiledBlocks:
    """Compiles each transformer block's forward in place (whoever holds the blocks, e.g. a block streamer,
    runs the compiled code); `close` puts the plain forwards back."""

    def __init__(self, base: Denoiser, mode: str):
        self.base = base
        self.blocks = list(_inner_model(base).blocks)
        compile_mode = None if mode == "default" else mode
        for block in self.blocks:
            block.forward = torch.compile(block.forward, mode=compile_mode)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.base(**inputs)

    def start(self, num_calls: int) -> None:
        self.base.start(num_calls)

    def close(self) -> None:
        for block in self.blocks:
            del block.forward  # the instance attribute; the class's forward shows again
        self.base.close()


class FastComputeDenoiser:
    """Applies a FastCompute setting (8-bit GEMMs, FP8 attention, fused kernels) to the denoiser's model; `close`
    undoes it (the model may be shared by other backends)."""

    def __init__(self, base: Denoiser, settings: FastCompute, device: torch.device):
        self.base = base
        self.undo = apply_fast_compute(_inner_model(base), settings, device)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.base(**inputs)

    def start(self, num_calls: int) -> None:
        self.base.start(num_calls)

    def close(self) -> None:
        self.undo()
        self.base.close()


class SdpaKernel:
    """Runs the denoiser with scaled_dot_product_attention limited to one kernel."""

    def __init__(self, base: Denoiser, backend: str):
        from torch.nn.attention import SDPBackend

        self.base, self.backend = base, getattr(SDPBackend, backend)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self.backend):
            return self.base(**inputs)

    def start(self, num_calls: int) -> None:
        self.base.start(num_calls)

    def close(self) -> None:
        self.base.close()


def _signature(value) -> object:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, tuple):
        return tuple(_signature(v) for v in value)
    return value


class CudaGraphDenoiser:
    """Captures `base(**inputs)` into a CUDA graph on the first call with a new input shape, then replays it.

    Inputs are copied into the graph's static device tensors (cast to `dtype`, as the torch backends do),
    so host tensors are fine. The output is cloned: the next replay overwrites the graph's buffer.
    """

    def __init__(self, base: Denoiser, device: torch.device, dtype: torch.dtype):
        self.base, self.device, self.dtype = base, device, dtype
        self.graphs: dict[object, tuple[dict, torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _static(self, value):
        if isinstance(value, tuple):  # the RoPE tables stay float32
            return tuple(v.to(self.device, copy=True) for v in value)
        if isinstance(value, torch.Tensor):
            dtype = self.dtype if value.is_floating_point() else value.dtype
            return value.to(self.device, dtype, copy=True)
        return value

    def _capture(self, inputs: dict) -> tuple[dict, torch.cuda.CUDAGraph, torch.Tensor]:
        static = {name: self._static(value) for name, value in inputs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: lazy initialisation, autotuning
            self.base(**static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.base(**static)
        return static, graph, output

    @torch.inference_mode()
    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((name, _signature(value)) for name, value in sorted(inputs.items()))
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        static, graph, output = self.graphs[key]
        for name, value in inputs.items():
            targets, values = (static[name], value) if isinstance(value, tuple) else ((static[name],), (value,))
            for target, new in zip(targets, values):
                if isinstance(target, torch.Tensor):
                    target.copy_(new)
        graph.replay()
        return output.clone()

    def start(self, num_calls: int) -> None:
        self.base.start(num_calls)

    def close(self) -> None:
        self.graphs.clear()
        self.base.close()


def wrap_denoiser(path: FastPath, base: Denoiser, device: torch.device, dtype: torch.dtype) -> Denoiser:
    """The denoiser of `path` around a torch denoiser (block streaming is set when loading, not here)."""
    if path.compile_mode is not None:
        return CompiledBlocks(base, path.compile_mode)
    if path.sdpa is not None:
        return SdpaKernel(base, path.sdpa)
    if path.cuda_graph:
        return CudaGraphDenoiser(base, device, dtype)
    if path.fast_compute.active:
        return FastComputeDenoiser(base, path.fast_compute, device)
    return base
