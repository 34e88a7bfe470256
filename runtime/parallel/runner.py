"""The torch denoiser of one rank of a parallel job: a `BlockRunner` that computes only its part of each call.

Per call: every rank embeds the whole input (the patch conv and the conditioning are cheap), then keeps
- its CFG half (cfg=2: sample 0 = negative on the first rank group, sample 1 = positive on the second), and
- its token shard (ulysses x ring > 1): hidden states, the RoPE rows and each token's frame for the temporal PE.
The blocks run on that slice with the sequence-parallel self-attention hook; long skips stay on the rank that
made them. After norm_out and proj_out the outputs are gathered (tokens over the sequence group, then the CFG
halves), so every rank holds the full output and takes the same scheduler step.

Memory settings (block streaming, skip offload) work per rank on its slice. TeaCache: each rank keeps its slice
of the previous modulated input and of the cached residual; the change signal is summed over every rank and
rank 0's value is broadcast, so all ranks take the same skip decision.
"""

from __future__ import annotations

import torch

from ...models.transformer import BlockInputs, RuyiTransformer3D
from ..backends.block_runner import BlockRunner
from .attention import SequenceParallelAttention
from .comm import from_main, gather_batch, gather_tokens, sum_over
from .config import offsets, split_sizes
from .context import ParallelContext


class ParallelBlockRunner(BlockRunner):
    """`BlockRunner` over this rank's slice of every call (see the module docstring)."""

    def __init__(
        self, model: RuyiTransformer3D, device: torch.device | str, dtype: torch.dtype, *, context: ParallelContext,
        **settings,
    ):  # fmt: skip
        if torch.device(device).type != context.device.type:
            raise ValueError(f"device {device}: this rank of the parallel job runs on {context.device}.")
        if settings.get("enhance_a_video") is not None:
            raise ValueError(
                "Enhance-A-Video scores frame-to-frame attention over the whole batch and every frame, which no "
                "single rank holds under --parallel; drop --enhance-a-video or run without --parallel."
            )
        context.config.check_heads(model.config.num_attention_heads)
        super().__init__(model, context.device, dtype, **settings)
        self.context = context
        self._shard_tokens: list[int] = []

    def _local(self, embedded: BlockInputs) -> BlockInputs:
        context, config = self.context, self.context.config
        if config.cfg > 1:
            if embedded.hidden.shape[0] != config.cfg:
                raise ValueError(
                    f"--parallel cfg={config.cfg} needs the CFG batch of {config.cfg} (guidance on); this call has "
                    f"batch {embedded.hidden.shape[0]}."
                )
            b = slice(context.coords.cfg_rank, context.coords.cfg_rank + 1)
            embedded = embedded._replace(
                hidden=embedded.hidden[b], temb=embedded.temb[b],
                text_states=embedded.text_states[b], clip_states=embedded.clip_states[b],
            )  # fmt: skip
        if config.sequence == 1:
            return embedded
        tokens = embedded.hidden.shape[1]
        config.check_tokens(tokens)
        self._shard_tokens = split_sizes(tokens, config.sequence)
        start = offsets(self._shard_tokens)[context.sequence_rank]
        stop = start + self._shard_tokens[context.sequence_rank]
        per_frame = tokens // embedded.num_frames
        frame_index = torch.arange(start, stop, device=embedded.hidden.device) // per_frame
        self.attend = SequenceParallelAttention(context, self._shard_tokens)
        return embedded._replace(
            hidden=embedded.hidden[:, start:stop].clone(),  # a copy: the whole embedded sequence can be freed
            rope_cos=embedded.rope_cos[start:stop], rope_sin=embedded.rope_sin[start:stop], frame_index=frame_index,
        )  # fmt: skip

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        context, config = self.context, self.context.config
        if config.sequence > 1:
            x = gather_tokens(x, context.sequence_group, self._shard_tokens)
        if config.cfg > 1:
            x = gather_batch(x, context.cfg_group, config.cfg)
        return x

    def _relative_change(self, modulated: torch.Tensor, previous: torch.Tensor) -> float:
        """mean |modulated - previous| / mean |previous| over every rank's part (the means' counts cancel)."""
        sums = sum_over(torch.stack([(modulated - previous).abs().sum(), previous.abs().sum()]).to(torch.float64))
        change = (sums[0] / sums[1]).reshape(1)
        return float(from_main(change).item())
