"""One video on several processes (GPUs): sequence parallelism (Ulysses all-to-all over heads, ring attention),
CFG parallelism and a chunk-parallel VAE, on torch.distributed (NCCL on GPUs, gloo on CPUs).

- config: `--parallel ulysses=N[,ring=M][,cfg=2]` and the rank layout (pure arithmetic, checked up front);
- context: joining the torchrun job, this rank's device and its process groups (always with a timeout);
- comm: the collectives for uneven token shards; attention: the self-attention hook over the whole sequence;
- runner: the per-rank denoiser; vae: chunks spread over the ranks; cost: communication volume and speed-up.

Layering: above runtime/backends and runtime/memory, below the pipeline-level modules of runtime/. models/ never
imports it: the transformer only exposes an `attend` hook and a per-token frame index.
"""

from .comm import ParallelError
from .config import DEFAULT_TIMEOUT_S, ParallelConfig, ParallelConfigError
from .context import ParallelContext, is_main_process, join, leave, prepare_run
from .runner import ParallelBlockRunner
from .vae import spread_vae

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ParallelBlockRunner",
    "ParallelConfig",
    "ParallelConfigError",
    "ParallelContext",
    "ParallelError",
    "is_main_process",
    "join",
    "leave",
    "prepare_run",
    "spread_vae",
]
