"""Block streaming on the CPU (device == host): bit-identical outputs and a bounded number of block weight sets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ruyi_trt.models.presets import tiny_transformer
from ruyi_trt.models.transformer import RuyiTransformer3D, rotary_embedding
from ruyi_trt.runtime.backends.block_runner import BlockRunner, TeaCacheSettings
from ruyi_trt.runtime.memory.streaming import BlockStreamer
from ruyi_trt.weights.fp8_storage import store_weights_fp8


def make_inputs(model: RuyiTransformer3D, batch: int = 2, frames: int = 2, height: int = 8, width: int = 12) -> dict:
    cfg = model.config
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {
        "hidden_states": randn(batch, 16, frames, height, width),
        "timestep": torch.linspace(961, 481, batch),
        "encoder_hidden_states": randn(batch, cfg.text_len, cfg.cross_attention_dim),
        "text_embedding_mask": torch.ones(batch, cfg.text_len, dtype=torch.int64),
        "encoder_hidden_states_t5": randn(batch, cfg.text_len_t5, cfg.cross_attention_dim_t5),
        "text_embedding_mask_t5": torch.ones(batch, cfg.text_len_t5, dtype=torch.int64),
        "image_meta_size": torch.tensor([[1024.0, 1024.0, height * 8, width * 8, 0.0, 0.0]] * batch),
        "style": torch.zeros(batch, dtype=torch.int64),
        "image_rotary_emb": rotary_embedding(height, width, cfg.patch_size, cfg.attention_head_dim),
        "inpaint_latents": randn(batch, cfg.in_channels - 16, frames, height, width),
        "clip_encoder_hidden_states": randn(batch, 16, cfg.projection_dim),
        "clip_attention_mask": torch.tensor([[0.0] * cfg.n_query, [1.0] * cfg.n_query][:batch]),
    }


def count_block_calls(runner: BlockRunner) -> tuple[dict[int, int], list]:
    """Forward pre-hooks on every block module that can run: the originals and the device slots."""
    calls: dict[int, int] = {}
    handles = []
    modules = list(runner.model.blocks) + [slot.module for slot in runner.streamer.slots]

    def counter(key: int):
        def hook(module, args) -> None:
            calls[key] = calls.get(key, 0) + 1

        return hook

    for module in modules:
        handles.append(module.register_forward_pre_hook(counter(id(module))))
    return calls, handles


@pytest.fixture(scope="module")
def reference() -> tuple[dict, torch.Tensor]:
    model = tiny_transformer()
    inputs = make_inputs(model)
    with torch.inference_mode():
        return inputs, model(**inputs)[0]


@pytest.mark.parametrize("resident", [0, 1, 3, 4])
def test_streaming_is_bit_identical_and_bounded(reference, resident: int) -> None:
    inputs, expected = reference
    runner = BlockRunner(tiny_transformer(), "cpu", torch.float32, resident_blocks=resident)
    streamer = runner.streamer
    calls, handles = count_block_calls(runner)
    for _ in range(2):  # the second pass reuses slots that already hold blocks from the first
        assert torch.equal(runner(**inputs), expected)
    for handle in handles:
        handle.remove()

    streamed = 4 - resident  # the tiny model: plain blocks 0..2, long-skip block 3
    plain_streamed = len([i for i in range(resident, 4) if i != 3])
    expected_slots = min(2, plain_streamed) + (1 if streamed and 3 >= resident else 0)
    assert len(streamer.slots) == expected_slots
    assert streamer.device_weight_sets == resident + expected_slots
    # only the resident blocks and the slots ever run: the streamed host copies are never called
    ran = {key for key, count in calls.items() if count}
    resident_ids = {id(runner.model.blocks[i]) for i in range(resident)}
    slot_ids = {id(slot.module) for slot in streamer.slots}
    assert ran == resident_ids | slot_ids
    assert len(ran) <= resident + expected_slots
    # copies over two passes; a slot that still holds the block it needs is not reloaded. resident=0: plain
    # blocks 0,1,2 alternate slots A,B,A (3 loads), then 0->A, 1 stays in B, 2->A (2); skip block 3 once (1)
    assert streamer.loads == {0: 6, 1: 3, 3: 1, 4: 0}[resident]


def test_streaming_with_skip_offload_teacache_and_fp8() -> None:
    plain = tiny_transformer()
    store_weights_fp8(plain, "strong", plain.config.hidden_size)
    streamed = tiny_transformer()
    store_weights_fp8(streamed, "strong", streamed.config.hidden_size)
    settings = TeaCacheSettings(threshold=1.0, skip_start_steps=1, skip_end_steps=1)
    a = BlockRunner(plain, "cpu", torch.float32, teacache=settings)
    b = BlockRunner(streamed, "cpu", torch.float32, resident_blocks=0, skip_offload_group=1, teacache=settings)
    inputs = make_inputs(plain)
    a.start(4)
    b.start(4)
    for step in range(4):
        inputs["timestep"] = torch.full((2,), 900.0 - 10 * step)
        assert torch.equal(a(**inputs), b(**inputs))
    assert a.skipped_calls == b.skipped_calls > 0


def test_cfg_split_matches_batched_run(reference) -> None:
    inputs, expected = reference
    runner = BlockRunner(tiny_transformer(), "cpu", torch.float32, resident_blocks=2, cfg_split=True)
    torch.testing.assert_close(runner(**inputs), expected, rtol=1e-5, atol=1e-5)


def test_streamer_rejects_bad_resident_count() -> None:
    with pytest.raises(ValueError, match="resident_blocks"):
        BlockStreamer(tiny_transformer().blocks, "cpu", resident_blocks=5)


class _FakeEvent:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def record(self, stream) -> None:
        self.log.append(("record", self.name, stream.name))


class _FakeStream:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_event(self, event: _FakeEvent) -> None:
        self.log.append(("wait", self.name, event.name))


def test_cuda_stream_and_event_order(monkeypatch) -> None:
    """The CUDA path with fake streams and events: a copy into a slot waits for the slot's last compute to be
    released, a block computes only after waiting for its copy, and slot tensors written on the copy stream are
    recorded on it (so freeing them waits for the copy). Each load is one copy of the slot's flat buffer."""
    from contextlib import contextmanager

    log: list = []
    streamer = BlockStreamer(tiny_transformer().blocks, "cpu", resident_blocks=1)
    streamer.cuda = True
    streamer.copy_stream = _FakeStream(log, "copy")
    compute = _FakeStream(log, "compute")
    owner = {}
    for n, slot in enumerate(streamer.slots):
        slot.ready, slot.free = _FakeEvent(log, f"ready{n}"), _FakeEvent(log, f"free{n}")
        owner[id(slot.flat)] = n  # one flat device buffer per slot: one copy per load

    @contextmanager
    def on_stream(stream):
        log.append(("enter", stream.name))
        yield
        log.append(("exit", stream.name))

    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record_stream", owner[id(t)], s.name)))
    slot_index = {i: streamer.slots.index(slot) for i, slot in streamer.slot_of.items()}
    for _ in range(2):
        with streamer.loaded(1) as block:
            log.append(("compute", 1))
        for i, block in streamer:
            log.append(("compute", i))

    in_use = dict.fromkeys(range(len(streamer.slots)), False)  # computed on, and not released yet
    copy_may_write = dict.fromkeys(in_use, False)  # the copy stream waited for the slot's release
    compute_may_read = dict.fromkeys(in_use, False)  # the compute stream waited for the slot's last copy
    on_copy_stream, writes = False, 0
    for entry in log:
        match entry:
            case ("enter", "copy") | ("exit", "copy"):
                on_copy_stream = entry[0] == "enter"
            case ("wait", "copy", event):
                n = int(event.removeprefix("free"))
                assert on_copy_stream and not in_use[n], entry
                copy_may_write[n] = True
            case ("record_stream", n, stream):
                assert stream == "copy" and on_copy_stream and copy_may_write[n], entry
                writes += 1
            case ("record", event, "copy"):
                n = int(event.removeprefix("ready"))
                copy_may_write[n], compute_may_read[n] = False, False
            case ("wait", "compute", event):
                compute_may_read[int(event.removeprefix("ready"))] = True
            case ("compute", i) if i in slot_index:
                assert compute_may_read[slot_index[i]], entry
                in_use[slot_index[i]] = True
            case ("record", event, "compute"):
                in_use[int(event.removeprefix("free"))] = False
    loaded_slots = [int(e[1].removeprefix("ready")) for e in log if e[0] == "record" and e[2] == "copy"]
    assert streamer.loads == len(loaded_slots) > 0
    assert writes == len(loaded_slots)


def test_no_pinning_when_the_device_is_the_cpu(monkeypatch) -> None:
    """A visible GPU does not make CPU streaming pin its host blocks (pinning needs, and only helps, CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pytest.fail("pinned for a CPU device"))
    streamer = BlockStreamer(tiny_transformer().blocks, "cpu", resident_blocks=1)
    assert len(streamer.streamed) == 3


def test_enhance_a_video_step_rule_and_cfg_split() -> None:
    from ruyi_trt.runtime.backends.block_runner import EnhanceAVideoSettings

    # The reference's rule: call c is enhanced when skip_start <= c < num_steps - skip_end.
    rule = EnhanceAVideoSettings(weight=1.0, skip_start_steps=1, skip_end_steps=2)
    assert [rule.active(c, 6) for c in range(6)] == [False, True, True, True, False, False]
    assert all(EnhanceAVideoSettings().active(c, 4) for c in range(4))

    model = tiny_transformer(seed=0)
    inputs = make_inputs(model, batch=2, frames=3)
    plain = BlockRunner(model, "cpu", torch.float32)
    rule = EnhanceAVideoSettings(weight=1.0, skip_start_steps=1, skip_end_steps=1)  # of 4 calls: 1 and 2
    enhanced = BlockRunner(model, "cpu", torch.float32, enhance_a_video=rule)
    split = BlockRunner(model, "cpu", torch.float32, cfg_split=True, enhance_a_video=rule)
    for runner in (plain, enhanced, split):
        runner.start(4)
    outs = [[runner(**inputs) for _ in range(4)] for runner in (plain, enhanced, split)]
    for call in range(4):
        same = torch.equal(outs[1][call], outs[0][call])
        assert same == (call in (0, 3)), call  # skipped first and last call: unchanged
        if call in (1, 2):
            assert torch.equal(outs[2][call], outs[1][call])  # enhanced calls run the CFG batch whole
        else:
            torch.testing.assert_close(outs[2][call], outs[0][call])  # split per sample (may round differently)



def test_streamed_blocks_live_in_one_flat_host_buffer_each() -> None:
    """Every streamed block's tensors are views of one flat host buffer (no per-tensor allocation, no rounding
    beyond the 256-byte tensor alignment), and a load is one copy of it."""
    from ruyi_trt.runtime.memory.streaming import FLAT_ALIGN, FlatLayout
    from ruyi_trt.weights.fp8_storage import weight_bytes

    model = tiny_transformer()
    store_weights_fp8(model, "lite", model.config.hidden_size)  # mixed dtypes in one buffer
    streamer = BlockStreamer(model.blocks, "cpu", resident_blocks=1)
    for i in streamer.streamed:
        flat = streamer.host_flat[i]
        block = model.blocks[i]
        tensors = list(block.parameters()) + list(block.buffers())
        assert all(t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for t in tensors)
        layout = FlatLayout(block)
        assert flat.numel() == layout.nbytes <= weight_bytes(block) + FLAT_ALIGN * len(tensors)
    assert streamer.host_bytes == sum(streamer.host_flat[i].numel() for i in streamer.streamed)


def test_pinned_buffer_is_page_rounded_and_counted() -> None:
    from ruyi_trt.runtime.memory.host import PAGE_BYTES, PINNED, PinnedBuffer

    before = PINNED.now
    buffer = PinnedBuffer(69_206_016 + 1)  # an FFN weight and a byte: one page more, not the next power of two
    assert buffer.tensor.numel() == 69_206_017 and buffer.nbytes == 69_206_016 + PAGE_BYTES
    assert PINNED.now - before == buffer.nbytes and not buffer.registered  # no CUDA here: mapped, not registered
    buffer.close()
    assert PINNED.now == before


def deep_tiny(num_layers: int = 8) -> RuyiTransformer3D:
    """A tiny transformer with 3 long skips (blocks 5, 6, 7 take the outputs of 2, 1, 0)."""
    from ruyi_trt.models.checkpoint_io import config_to_dict
    from ruyi_trt.models.presets import randomize_
    from ruyi_trt.models.transformer import TransformerConfig, computed_state

    config = dataclasses.replace(TransformerConfig.tiny(), num_layers=num_layers)
    model = RuyiTransformer3D.from_config(config_to_dict(config))
    return randomize_(model, 0, keep=set(computed_state(config))).eval().requires_grad_(False)


@pytest.mark.parametrize("group", [0, 1, 2, 3])
def test_skip_offload_through_host_buffers_is_bit_identical(group: int) -> None:
    from ruyi_trt.runtime.memory.skip_offload import skip_residency

    model = deep_tiny()
    inputs = make_inputs(model)
    with torch.inference_mode():
        expected = model(**inputs)[0]
    runner = BlockRunner(model, "cpu", torch.float32, resident_blocks=2, skip_offload_group=group)
    for _ in range(2):  # the second call reuses the pooled host buffers
        assert torch.equal(runner(**inputs), expected)
    counted = skip_residency(model.config.skip_sources, group, 8)
    assert runner.skips.sent == 2 * counted.sent
    tokens = 2 * (8 // 2) * (12 // 2)  # make_inputs: 2 frames of 8 x 12 latents in 2 x 2 patches
    h = inputs["hidden_states"].shape[0] * tokens * model.config.inner_dim * 4  # one skip: [B, tokens, D] fp32
    assert runner.skips.host_bytes == counted.host_peak * h


def test_skip_schedule_counts() -> None:
    from ruyi_trt.models.transformer import TransformerConfig
    from ruyi_trt.runtime.memory.skip_offload import SkipResidency, skip_residency, skip_schedule

    sources = TransformerConfig.full().skip_sources
    assert skip_residency(sources, 0) == SkipResidency(19, 0, 0)
    assert skip_residency(sources, 1) == SkipResidency(2, 19, 19)  # one in flight + one prefetched at most
    assert skip_residency(sources, 5) == SkipResidency(5, 15, 15)  # 3 groups of 5 sent, 4 kept
    steps = skip_schedule(sources, 1, 40)
    assert steps[20].prefetch == 18 and steps[21].pop == 18 and steps[21].pop_from_host
    assert steps[0].send == (0,) and not steps[19].keep
