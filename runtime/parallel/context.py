"""Joining the job torchrun started: the process group (NCCL on GPUs, gloo on CPUs), this rank's device and the
sub-groups of `ParallelConfig`'s layout.

`torchrun --nproc-per-node K $(which ruyi-trt) run ... --parallel ...` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; every process of the job runs the same command. The process group always gets a timeout
(`ParallelConfig.timeout_s`): a collective whose peers died or stopped raises after it instead of waiting for the
30 min default, and torchrun then stops every rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ...models.transformer import TransformerConfig
from .config import ParallelConfig, ParallelConfigError, RankCoords

log = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    """This rank's place in the job and the groups it talks to (None where a group has one member)."""

    config: ParallelConfig
    rank: int
    device: torch.device
    coords: RankCoords
    sequence_group: dist.ProcessGroup | None  # the ulysses x ring ranks of this CFG half
    cfg_group: dist.ProcessGroup | None  # this token shard in both CFG halves
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    ring_ranks: list[int]  # global ranks of this rank's ring, in ring order

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints the summary."""
        return self.rank == 0

    @property
    def sequence_rank(self) -> int:
        """Index of this rank's token shard inside its CFG half."""
        return self.coords.ring_rank * self.config.ulysses + self.coords.ulysses_rank

    def barrier(self) -> None:
        """Wait for every rank (bounded by the job's timeout)."""
        from .comm import checked

        checked("barrier", lambda: dist.barrier())


def is_main_process() -> bool:
    """True outside a launched job and on its rank 0."""
    launched = launched_world()
    return launched is None or launched[0] == 0


def launched_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, None outside a launched job."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str, local_rank: int) -> torch.device:
    """cuda -> cuda:LOCAL_RANK (one GPU per process); cpu stays cpu."""
    target = torch.device(device)
    if target.type != "cuda":
        return target
    if target.index not in (None, local_rank):
        raise ParallelConfigError(
            f"--device {device} with --parallel: every rank uses the GPU of its local rank; pass --device cuda."
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ParallelConfigError(
            f"local rank {local_rank} has no GPU: this machine shows {count}; start at most {count} processes "
            "per node (torchrun --nproc-per-node)."
        )
    return torch.device("cuda", local_rank)


_contexts: dict[ParallelConfig, ParallelContext] = {}
_owned = False  # whether join() made the process group (leave() then destroys it)


def join(config: ParallelConfig, device: str) -> ParallelContext:
    """Join the launched job (initialising the process group once) and build the groups of `config`.

    Idempotent per config: the CLI's planning and loading steps share one context."""
    if config in _contexts:
        return _contexts[config]
    launched = launched_world()
    if launched is None:
        raise ParallelConfigError(
            f"--parallel {config.label} needs {config.world_size} processes: launch with "
            f"torchrun --nproc-per-node {config.world_size} $(which ruyi-trt) run ... --parallel {config.label}"
        )
    rank, world_size, local_rank = launched
    config.check_world(world_size)
    target = rank_device(device, local_rank)
    global _owned
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(target)
        dist.init_process_group(
            backend,
            timeout=timedelta(seconds=config.timeout_s),
            device_id=target if backend == "nccl" else None,
        )
        _owned = True
        log.info("rank %d of %d joined (%s, %s, timeout %.0f s)", rank, world_size, backend, target, config.timeout_s)
    coords = config.coords(rank)

    def mine(groups: list[list[int]]) -> dist.ProcessGroup | None:
        """new_group is collective: every rank creates every group, in the same order, and keeps its own."""
        own = None
        for ranks in groups:
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks, timeout=timedelta(seconds=config.timeout_s))
            if rank in ranks:
                own = group
        return own

    ring_ranks = next(g for g in config.ring_groups() if rank in g)
    context = ParallelContext(
        config=config,
        rank=rank,
        device=target,
        coords=coords,
        sequence_group=mine(config.sequence_groups()),
        cfg_group=mine(config.cfg_groups()),
        ulysses_group=mine(config.ulysses_groups()),
        ring_group=mine(config.ring_groups()),
        ring_ranks=ring_ranks,
    )
    _contexts[config] = context
    return context


def prepare_run(
    config: ParallelConfig, device: str, transformer_config: TransformerConfig, cfg_on: bool
) -> ParallelContext:
    """Refuse what cannot run (head split, guidance, process count) before any weight loads, then join."""
    config.check_heads(transformer_config.num_attention_heads)
    config.check_guidance(cfg_on)
    return join(config, device)


def leave() -> None:
    """Forget every context and destroy the process group if `join` made it (a caller's own group stays).

    Call it once, when the process is done: a torchrun job's rendezvous cannot be joined a second time."""
    global _owned
    _contexts.clear()
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False
