"""Fake CUDA on a CPU-only torch: full-size device memory measured without a GPU and without allocating.

Recipe (see shared docs/fake-cuda-memory.md): tensors on device "cuda" are made inside `FakeTensorMode`
(shapes, dtypes and devices only), after a fake CUDA DeviceGuard is registered (a 3-line C++ shim built with
g++ against torch's headers: the CPU build has none, and indexing or `.to("cuda")` need one). `LivePeak` counts
live storage bytes per device (CUDA ones rounded to the caching allocator's 512 B) and keeps the peak.
`FlashSDPA` routes `F.scaled_dot_product_attention` to the flash kernel (mem-efficient where flash does not
apply), as a GPU would pick: without a CUDA build the fake SDPA would run the math kernel and materialise the
N x N scores. `sequential_streams` replaces CUDA streams and events (which fake mode cannot follow) with
in-order stand-ins, and maps the page-locked host buffers as fake host tensors; the model code is untouched.
"""

from __future__ import annotations

import collections
import ctypes
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary

GUARD_SHIM = """#include <c10/core/impl/FakeGuardImpl.h>
using namespace c10;
namespace { struct R { R() { if (!impl::hasDeviceGuardImpl(DeviceType::CUDA)) {
  static impl::FakeGuardImpl<DeviceType::CUDA> g; impl::registerDeviceGuard(DeviceType::CUDA, &g); } } } r; }
"""
CUDA_BLOCK_BYTES = 512  # the CUDA caching allocator's rounding
REPLACED = (
    ("CUDA streams and events: in-order stand-ins (copies complete at once; the device tensors the code keeps "
     "referenced until a copy's consumer runs are counted as they are on a GPU)"),
    "page-locked host buffers (cudaHostRegister): fake host tensors of the same size",
    ("nn.Module.to between devices: before torch swaps a fake parameter, the fake mode's real-to-fake memo "
     "(whose weak references forbid the swap) is cleared"),
)


class FakeCudaUnavailable(RuntimeError):
    """The fake CUDA guard shim cannot be built; the message says what to install."""


def register_fake_cuda_guard(cache_dir: Path | None = None) -> None:
    """Build (once per torch version) and load the C++ shim that registers c10's fake CUDA DeviceGuard."""
    if torch.cuda.is_available():
        raise FakeCudaUnavailable("a CUDA GPU is visible: measure on it (tools/streaming_check.py) instead of fake CUDA.")
    folder = Path(cache_dir or tempfile.gettempdir())
    shim = folder / f"ruyi-cuda-guard-shim-{torch.__version__}.so"
    if not shim.exists():
        compiler = shutil.which("g++")
        if compiler is None:
            raise FakeCudaUnavailable(
                "g++ is needed to build the fake CUDA device guard (3 lines of C++ against torch's headers): "
                "install it with `apt-get install g++` (Debian/Ubuntu) and run again."
            )
        folder.mkdir(parents=True, exist_ok=True)
        source = shim.with_suffix(".cpp")
        source.write_text(GUARD_SHIM)
        torch_dir = Path(torch.__file__).parent
        partial = shim.with_suffix(".so.part")
        cmd = [compiler, "-shared", "-fPIC", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               f"-I{torch_dir / 'include'}", str(source), f"-L{torch_dir / 'lib'}", "-lc10",
               f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(partial)]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise FakeCudaUnavailable(f"building the fake CUDA guard shim failed:\n{result.stderr[-2000:]}")
        partial.rename(shim)
    ctypes.CDLL(str(shim))


class FlashSDPA(TorchFunctionMode):
    """F.scaled_dot_product_attention -> the flash aten op (else mem-efficient), whose meta kernels make out + lse."""

    def __init__(self) -> None:
        super().__init__()
        self.used: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        a = {**dict(zip(names, args)), **kwargs}
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        p, causal, scale = a.get("dropout_p", 0.0), a.get("is_causal", False), a.get("scale")
        if mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.size(-1) % 8 == 0 and q.size(-1) <= 256:
            self.used["flash"] += 1
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, p, causal, scale=scale)[0]
        self.used["efficient"] += 1
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, False, p, causal, scale=scale)[0]


class LivePeak(TorchDispatchMode):
    """Live storage bytes per device type ("cuda", "cpu") and their peaks since the last `reset_peak`."""

    def __init__(self) -> None:
        super().__init__()
        self.live: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()
        self._seen = WeakIdKeyDictionary()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen or tensor.device.type == "meta":
            return
        kind = tensor.device.type
        nbytes = storage.nbytes()
        if kind == "cuda":
            nbytes = -(-nbytes // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
        self._seen[storage] = nbytes
        self.live[kind] += nbytes
        self.peak[kind] = max(self.peak[kind], self.live[kind])
        weakref.finalize(storage, self.live.subtract, {kind: nbytes})

    def reset_peak(self) -> None:
        self.peak = collections.Counter(self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out


class _Event:
    def record(self, stream=None) -> None: ...

    def synchronize(self) -> None: ...

    def query(self) -> bool:
        return True


class _Stream:
    def __init__(self, device=None, **kwargs) -> None: ...

    def wait_event(self, event) -> None: ...

    def wait_stream(self, stream) -> None: ...

    def synchronize(self) -> None: ...


@contextmanager
def sequential_streams() -> Iterator[None]:
    """CUDA streams/events as in-order no-ops, and page-locked host buffers as fake host tensors (see REPLACED)."""
    from ..runtime.memory.host import PinnedBuffer

    compute = _Stream()
    patches = [
        mock.patch.object(torch.cuda, "Stream", _Stream),
        mock.patch.object(torch.cuda, "Event", _Event),
        mock.patch.object(torch.cuda, "stream", lambda stream=None: _null()),
        mock.patch.object(torch.cuda, "current_stream", lambda device=None: compute),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        mock.patch.object(torch.Tensor, "record_stream", lambda self, stream: None),
        mock.patch.object(PinnedBuffer, "map_memory", staticmethod(lambda n: torch.empty(n, dtype=torch.uint8))),
        mock.patch.object(torch.utils, "swap_tensors", _swap_fake),
    ]
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


@contextmanager
def _null() -> Iterator[None]:
    yield


_SWAP = torch.utils.swap_tensors


def _swap_fake(t1: torch.Tensor, t2: torch.Tensor) -> None:
    """torch.utils.swap_tensors for fake parameters: it refuses tensors with weak references, and the fake mode's
    memo of converted real tensors holds one to every fake tensor made from a real one."""
    from torch._subclasses.fake_tensor import FakeTensor

    for t in (t1, t2):
        if isinstance(t, FakeTensor):
            t.fake_mode.fake_tensor_converter.meta_converter.tensor_memo.clear()
    _SWAP(t1, t2)
