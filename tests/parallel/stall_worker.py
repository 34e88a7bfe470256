"""Run by test_parallel_jobs under torchrun (2 processes): Ulysses self-attention calls in a loop; rank 1 stops
itself (SIGSTOP) after a few calls, like a hung GPU or a stuck host. Rank 0 must fail with a ParallelError once
the collective timeout (argv[1] seconds) has passed, and exit 3."""

from __future__ import annotations

import os
import signal
import sys
import time

import torch

from ruyi_trt.runtime.parallel import ParallelConfig, ParallelError, join
from ruyi_trt.runtime.parallel.attention import SequenceParallelAttention


def main() -> int:
    context = join(ParallelConfig(ulysses=2, timeout_s=float(sys.argv[1])), "cpu")
    attend = SequenceParallelAttention(context, [8, 8])
    q = k = v = torch.randn(1, 2, 8, 16)
    for call in range(10_000):
        if context.rank == 1 and call == 3:
            print("rank 1 stopping", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        started = time.monotonic()
        try:
            attend(q, k, v)
        except ParallelError as exc:
            print(f"rank {context.rank} gave up after {time.monotonic() - started:.1f} s: {exc}", flush=True)
            return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
