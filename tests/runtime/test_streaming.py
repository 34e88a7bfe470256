"""Block streaming on the CPU (device == host): bit-identical outputs and a bounded number of block weight sets."""

from __future__ import annotations

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

