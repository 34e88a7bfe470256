"""--parallel parsing, the checks made before any process group exists, the rank layout and the token split."""

from __future__ import annotations

import re

import pytest

from ruyi_trt.models.transformer import TransformerConfig
from ruyi_trt.runtime.parallel import ParallelConfig, ParallelConfigError, join
from ruyi_trt.runtime.parallel.config import RankCoords, offsets, split_sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ulysses=4", (4, 1, 1)),
        ("cfg=2", (1, 1, 2)),
        ("ulysses=2,cfg=2", (2, 1, 2)),
        ("ring=2, ulysses=8 ,cfg=2", (8, 2, 2)),
        ("RING=3", (1, 3, 1)),
    ],
)
def test_parse(text: str, expected: tuple[int, int, int]) -> None:
    config = ParallelConfig.parse(text, timeout_s=30)
    assert (config.ulysses, config.ring, config.cfg) == expected
    assert config.world_size == expected[0] * expected[1] * expected[2]
    assert config.timeout_s == 30


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "name at least one"),
        ("ulysses", "is not KEY=N"),
        ("heads=2", "is not KEY=N"),
        ("ulysses=two", "not a whole number"),
        ("ulysses=0", ">= 1"),
        ("cfg=3", "2 halves"),
        ("ulysses=2,ulysses=4", "given twice"),
    ],
)
def test_bad_values_are_refused(text: str, match: str) -> None:
    with pytest.raises(ParallelConfigError, match=match):
        ParallelConfig.parse(text)


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ParallelConfigError, match="positive"):
        ParallelConfig(ulysses=2, timeout_s=0)


def test_heads_must_divide_by_ulysses() -> None:
    full = TransformerConfig.full()  # 16 heads
    ParallelConfig(ulysses=16).check_heads(full.num_attention_heads)
    with pytest.raises(ParallelConfigError, match=r"16 attention heads.*\[1, 2, 4, 8, 16\].*ulysses=4,ring=2"):
        ParallelConfig(ulysses=6).check_heads(full.num_attention_heads)
    with pytest.raises(ParallelConfigError, match="2 attention heads"):
        ParallelConfig(ulysses=4).check_heads(TransformerConfig.tiny().num_attention_heads)
    ParallelConfig(ring=8).check_heads(2)  # the ring has no head constraint


def test_process_count_and_guidance_checks() -> None:
    ParallelConfig(ulysses=2, cfg=2).check_world(4)
    with pytest.raises(ParallelConfigError, match="needs 4 processes .* has 2: launch it as torchrun --nproc-per-node 4"):
        ParallelConfig(ulysses=2, cfg=2).check_world(2)
    with pytest.raises(ParallelConfigError, match="guidance is off"):
        ParallelConfig(cfg=2).check_guidance(cfg_on=False)
    with pytest.raises(ParallelConfigError, match="3 tokens per sample cannot be split over 4"):
        ParallelConfig(ring=4).check_tokens(3)


def test_join_outside_torchrun_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ParallelConfigError, match=r"torchrun --nproc-per-node 4 \$\(which ruyi-trt\) run"):
        join(ParallelConfig(ulysses=2, cfg=2), "cpu")


def test_layout_groups_partition_the_ranks() -> None:
    config = ParallelConfig(ulysses=2, ring=2, cfg=2)
    ranks = list(range(config.world_size))
    for groups in (config.sequence_groups(), config.cfg_groups(), config.ulysses_groups(), config.ring_groups()):
        assert sorted(r for g in groups for r in g) == ranks
    assert config.sequence_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert config.cfg_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert config.ulysses_groups() == [[0, 1], [2, 3], [4, 5], [6, 7]]  # neighbours: the heaviest traffic
    assert config.ring_groups() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    for rank in ranks:
        assert config.rank_of(config.coords(rank)) == rank
    assert config.coords(5) == RankCoords(cfg_rank=1, ring_rank=0, ulysses_rank=1)
    assert config.label == "ulysses=2,ring=2,cfg=2"


def test_token_split_is_even_and_frame_aligned_when_frames_divide() -> None:
    assert split_sizes(18, 4) == [5, 5, 4, 4]
    assert offsets([5, 5, 4, 4]) == [0, 5, 10, 14]
    per_frame, frames = 2304, 30  # 768x768, 120 frames
    sizes = split_sizes(per_frame * frames, 6)
    assert all(size % per_frame == 0 for size in sizes)  # 30 frames over 6 ranks: 5 whole frames each
    assert max(split_sizes(per_frame * frames, 8)) - min(split_sizes(per_frame * frames, 8)) <= 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--parallel", "ulysses=2,cfg=2"], "needs 4 processes .* but this job has 2"),  # more ranks than processes
        (["--parallel", "ulysses=4"], "the transformer has 2 attention heads"),  # the tiny model
        (["--parallel", "cfg=2", "--cfg", "1"], "guidance is off"),
        (["--parallel", "ulysses=2", "--backend", "ort"], "torch backend only"),
        (["--parallel", "ulysses=2", "--enhance-a-video", "1"], "drop one of them"),
        (["--parallel", "ulysses=2:ring=2"], "is not a whole number"),
    ],
)
def test_run_refuses_bad_parallel_values_before_loading(
    args: list[str], match: str, monkeypatch: pytest.MonkeyPatch, tmp_path, start_png, tiny_dir
) -> None:
    """Inside a (pretended) 2-process torchrun job: the checks run before any process group or weight."""
    from click.testing import CliRunner

    from ruyi_trt.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "video.mp4"
    result = CliRunner().invoke(main, ["run", "--model", "tiny", "--image", str(start_png), "--out", str(out), *args])
    assert result.exit_code != 0
    assert re.search(match, result.output), result.output
    assert not out.exists()
