"""Communication volume per denoising step and the speed-up that the FLOPs and the links allow, from shapes only.

Per rank and per step (B = 2 with CFG, b = B / cfg samples on a rank, n = its largest token shard, D the width,
L blocks, e bytes per element; "local" = b * n * D * e, one hidden state of the slice):
- Ulysses: 4 all-to-alls per block (q, k, v and the output); (U-1)/U of each leaves the rank:
  L * 4 * local * (U-1)/U.
- Ring: k and v after the all-to-all are local-sized (b x the group's U*n tokens x D/U); each makes R-1 hops:
  L * 2 * local * (R-1). They overlap with the attention of the block in hand.
- Output gathers: proj_out rows (p*p*C channels) over the sequence group, then the CFG halves.
TeaCache's two scalars and the per-run VAE all-reduce (the video once per pass) are left out of the step figure.

The estimate: one process takes FLOPs / rate; a rank takes FLOPs / (world * rate) plus the exposed
communication (Ulysses and gathers in full, the ring's hops beyond the attention they hide behind).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...models.transformer import TransformerConfig
from ..memory.model import step_flops
from ..memory.plan import DEVICE_FLOPS
from .config import ParallelConfig, split_sizes

NVLINK_BYTES_PER_S = 300e9  # assumed all-to-all bandwidth per GPU over NVLink (A100/H100 SXM)
PCIE_BYTES_PER_S = 20e9  # assumed GPU-to-GPU over PCIe 4.0 x16 without NVLink


@dataclass(frozen=True)
class StepCommunication:
    """Bytes one rank sends in one denoising step, by collective."""

    ulysses: int
    ring: int
    gather: int

    @property
    def total(self) -> int:
        return self.ulysses + self.ring + self.gather

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def samples_per_rank(config: ParallelConfig, cfg_on: bool) -> int:
    config.check_guidance(cfg_on)
    return (2 if cfg_on else 1) // config.cfg


def step_communication(
    tcfg: TransformerConfig, tokens: int, cfg_on: bool, config: ParallelConfig, dtype_bytes: int
) -> StepCommunication:
    """Bytes sent by the busiest rank per step for `tokens` tokens per sample (see the module docstring)."""
    config.check_tokens(tokens)
    batch = samples_per_rank(config, cfg_on)
    shard = split_sizes(tokens, config.sequence)[0]
    local = batch * shard * tcfg.inner_dim * dtype_bytes
    layers, u, r = tcfg.num_layers, config.ulysses, config.ring
    out_row = tcfg.patch_size**2 * tcfg.output_channels * dtype_bytes
    gather = batch * shard * out_row * (config.sequence - 1) + (config.cfg - 1) * tokens * out_row
    return StepCommunication(
        ulysses=layers * 4 * local * (u - 1) // u,
        ring=layers * 2 * local * (r - 1),
        gather=gather,
    )


def estimated_step_seconds(
    tcfg: TransformerConfig,
    tokens: int,
    cfg_on: bool,
    config: ParallelConfig,
    dtype_bytes: int,
    link_bytes_per_s: float = NVLINK_BYTES_PER_S,
    device_flops: float = DEVICE_FLOPS,
) -> float:
    """Seconds per step on one rank of `config` (compute at `device_flops`, unhidden communication on the link)."""
    batch = 2 if cfg_on else 1
    compute = step_flops(tcfg, batch, tokens) / device_flops / config.world_size
    comm = step_communication(tcfg, tokens, cfg_on, config, dtype_bytes)
    exposed = (comm.ulysses + comm.gather) / link_bytes_per_s
    if config.ring > 1:
        hop_bytes = comm.ring / (tcfg.num_layers * (config.ring - 1))
        attention_per_hop = 4 * tokens * tokens * tcfg.inner_dim * batch / config.world_size / config.ring
        hidden_behind = attention_per_hop / device_flops
        exposed += tcfg.num_layers * (config.ring - 1) * max(0.0, hop_bytes / link_bytes_per_s - hidden_behind)
    return compute + exposed


def estimated_speedup(
    tcfg: TransformerConfig,
    tokens: int,
    cfg_on: bool,
    config: ParallelConfig,
    dtype_bytes: int,
    link_bytes_per_s: float = NVLINK_BYTES_PER_S,
    device_flops: float = DEVICE_FLOPS,
) -> float:
    """One process's step time over one rank's, for the transformer (the step's whole cost at full size)."""
    serial = step_flops(tcfg, 2 if cfg_on else 1, tokens) / device_flops
    return serial / estimated_step_seconds(tcfg, tokens, cfg_on, config, dtype_bytes, link_bytes_per_s, device_flops)
