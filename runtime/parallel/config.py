"""`--parallel ulysses=N[,ring=M][,cfg=2]`: how one video is spread over several processes, as plain arithmetic.

No torch.distributed here: the layout of ranks, the groups they form and the token split are pure functions
of the config, so they are checked up front (before any process group or weight) and unit-tested alone.

Layout: the `cfg` groups each compute one half of the classifier-free-guidance batch ([negative, positive]);
inside a CFG group the `ulysses * ring` ranks split the tokens. rank = (cfg_rank * ring + ring_rank) * ulysses +
ulysses_rank, so the ranks of one Ulysses group are neighbours (the all-to-all is the heaviest traffic and
stays on the fastest links) and the ring joins the Ulysses groups. Ulysses group g holds the token shards
g*ulysses .. g*ulysses + ulysses - 1, a contiguous range, so the ring passes contiguous key/value ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this ends the job (the torch default is 30 min)
KEYS = ("ulysses", "ring", "cfg")


class ParallelConfigError(ValueError):
    """A --parallel value that cannot run; the message says what to change."""


@dataclass(frozen=True)
class RankCoords:
    """Where one rank sits: its CFG half, its ring position and its Ulysses position (head group)."""

    cfg_rank: int
    ring_rank: int
    ulysses_rank: int


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of each kind of parallelism (1 = off) and the collective timeout in seconds."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in KEYS:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"--parallel {name}={value!r}: must be a whole number >= 1.")
        if self.cfg not in (1, 2):
            raise ParallelConfigError(f"--parallel cfg={self.cfg}: classifier-free guidance has 2 halves; use cfg=2.")
        if not self.timeout_s > 0:
            raise ParallelConfigError(f"--parallel-timeout {self.timeout_s}: must be a positive number of seconds.")

    @classmethod
    def parse(cls, text: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelConfig:
        """'ulysses=2,ring=2,cfg=2' (any subset, any order) -> ParallelConfig."""
        values: dict[str, int] = {}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            name = name.strip().lower()
            if not sep or name not in KEYS:
                raise ParallelConfigError(
                    f"--parallel {text!r}: {item!r} is not KEY=N with KEY one of {', '.join(KEYS)} "
                    "(e.g. ulysses=2,cfg=2)."
                )
            if name in values:
                raise ParallelConfigError(f"--parallel {text!r}: {name} is given twice; give each of {', '.join(KEYS)} "
                                          "once (e.g. ulysses=2,cfg=2).")
            try:
                values[name] = int(value)
            except ValueError:
                raise ParallelConfigError(f"--parallel {text!r}: {name}={value!r} is not a whole number; use "
                                          f"{name}=N with N >= 1.") from None
        if not values:
            raise ParallelConfigError(f"--parallel {text!r}: name at least one of {', '.join(KEYS)}, e.g. ulysses=2.")
        return cls(**values, timeout_s=timeout_s)

    # Sizes ------------------------------------------------------------------------------------------
    @property
    def sequence(self) -> int:
        """Ranks that split the tokens of one sample (ulysses x ring)."""
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence * self.cfg

    @property
    def label(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in KEYS if getattr(self, name) > 1]
        return ",".join(parts) or "serial"

    # Checks against the model, the request and the launched job ---------------------------------------
    def check_heads(self, num_heads: int) -> None:
        """Ulysses gives every rank of its group num_heads / ulysses whole heads."""
        if num_heads % self.ulysses:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ParallelConfigError(
                f"--parallel ulysses={self.ulysses}: the transformer has {num_heads} attention heads, which Ulysses "
                f"splits evenly over its ranks; use ulysses in {divisors} and ring=M for more ranks "
                f"(e.g. ulysses={max(d for d in divisors if d <= self.ulysses)},ring=2)."
            )

    def check_guidance(self, cfg_on: bool) -> None:
        if self.cfg > 1 and not cfg_on:
            raise ParallelConfigError(
                "--parallel cfg=2 puts the two classifier-free-guidance halves on two rank groups, but guidance is "
                "off (--cfg <= 1): drop cfg=2 or use --cfg > 1."
            )

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ParallelConfigError(
                f"--parallel {self.label} needs {self.world_size} processes (ulysses x ring x cfg), but this job has "
                f"{world_size}: launch it as torchrun --nproc-per-node {self.world_size} $(which ruyi-trt) run ..."
            )

    def check_tokens(self, tokens: int) -> None:
        if tokens < self.sequence:
            raise ParallelConfigError(
                f"--parallel {self.label}: {tokens} tokens per sample cannot be split over {self.sequence} ranks; "
                "use fewer sequence ranks or a larger video."
            )

    # Layout -----------------------------------------------------------------------------------------
    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank {rank} is outside 0..{self.world_size - 1}")
        ulysses_rank = rank % self.ulysses
        ring_rank = (rank // self.ulysses) % self.ring
        return RankCoords(rank // self.sequence, ring_rank, ulysses_rank)

    def rank_of(self, coords: RankCoords) -> int:
        return (coords.cfg_rank * self.ring + coords.ring_rank) * self.ulysses + coords.ulysses_rank

    def sequence_groups(self) -> list[list[int]]:
        """The ranks of each CFG half, in sequence-shard order."""
        return [list(range(c * self.sequence, (c + 1) * self.sequence)) for c in range(self.cfg)]

    def cfg_groups(self) -> list[list[int]]:
        """Ranks holding the same token shard of the two CFG halves (negative first)."""
        return [[c * self.sequence + s for c in range(self.cfg)] for s in range(self.sequence)]

    def ulysses_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(RankCoords(c, r, u)) for u in range(self.ulysses)]
            for c in range(self.cfg)
            for r in range(self.ring)
        ]

    def ring_groups(self) -> list[list[int]]:
        return [
            [self.rank_of(RankCoords(c, r, u)) for r in range(self.ring)]
            for c in range(self.cfg)
            for u in range(self.ulysses)
        ]


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` items in `parts` contiguous runs differing by at most one, longest first.

    For tokens this is a split by whole frames whenever the frame count divides by `parts` (every frame has the
    same number of tokens); otherwise shards end inside a frame, and each token's frame is looked up instead."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def offsets(sizes: list[int]) -> list[int]:
    """Start of each run of `sizes` (the exclusive prefix sum)."""
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts
