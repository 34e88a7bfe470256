"""The original's options end to end on the tiny model through `RuyiPipeline`: latents and timestep in the stored
embeddings' dtype, the aspect_ratio embedding key, TeaCache and Enhance-A-Video step options, chained LoRAs, FP8
storage "auto", the frame-rounding warning, the noise device, and the precision each model ran in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ruyi_trt.models.control_embeddings import load_control_embeddings
from ruyi_trt.runtime.backends.block_runner import TeaCacheSettings
from ruyi_trt.runtime.denoising import initial_noise
from ruyi_trt.runtime.pipeline import RuyiPipeline
from ruyi_trt.runtime.request import VideoRequest
from ruyi_trt.testing import gradient_image
from ruyi_trt.weights.lora import load_lora, merge_lora

SIZE = (32, 48)


def request(**options) -> VideoRequest:
    return VideoRequest([gradient_image(96, 64)], **{"frames": 1, "size": SIZE, "steps": 3, "seed": 5, **options})


class Recorder:
    """Wraps a denoiser and keeps the timestep and latent dtype of every call."""

    def __init__(self, inner):
        self.inner, self.timesteps, self.dtypes = inner, [], []

    def start(self, num_calls: int, num_steps: int | None = None) -> None:
        self.inner.start(num_calls, num_steps)

    def __call__(self, **inputs):
        self.timesteps.append(inputs["timestep"][0].item())
        self.dtypes.append(inputs["hidden_states"].dtype)
        return self.inner(**inputs)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def bf16_embeddings_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its control embeddings stored in bf16."""
    folder = tmp_path_factory.mktemp("tiny-bf16-embeddings")
    for part in ("transformer", "vae", "image_encoder", "scheduler", "model_index.json"):
        (folder / part).symlink_to(tiny_dir / part)
    tensors = load_file(str(tiny_dir / "embeddings.safetensors"))
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in tensors.items()},
              str(folder / "embeddings.safetensors"))  # fmt: skip
    return folder


@pytest.mark.parametrize(("stored", "first_timestep"), [("float32", 667.0), ("bfloat16", 668.0)])
def test_latents_and_timestep_follow_the_stored_embeddings(tiny_dir, bf16_embeddings_dir, stored, first_timestep):
    """bf16 run: the latents live in the embeddings' dtype and DDIM's first timestep 667 reaches the model as the
    original casts it, exact from float32 embeddings, rounded to 668 from bf16 ones."""
    folder = tiny_dir if stored == "float32" else bf16_embeddings_dir
    assert load_control_embeddings(folder).tensors["p.default.emb1"].dtype == getattr(torch, stored)
    pipe = RuyiPipeline.from_pretrained(folder, device="cpu", dtype="bf16")
    recorder = Recorder(pipe.components.denoiser)
    pipe.components.denoiser = recorder
    video, stats = pipe.run(request(), progress=False)
    assert torch.isfinite(video).all()
    assert recorder.timesteps[0] == first_timestep and set(recorder.dtypes) == {getattr(torch, stored)}
    assert stats.precision == {"image_encoder": "bf16", "vae": "bf16", "transformer": "bf16"}


def test_aspect_ratio_picks_the_embedding_key(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through the public call `pipe(image, ...)`, with the noise device beside it."""
    pipe = RuyiPipeline.from_pretrained(tiny_dir, device="cpu")
    with caplog.at_level("INFO", logger="ruyi_trt.models.control_embeddings"):
        video = pipe(gradient_image(96, 64), frames=1, size=SIZE, steps=1, camera="left", motion=3, aspect_ratio="4:3",
                     noise_device="cpu", progress=False)  # fmt: skip
    assert tuple(video.frames.shape) == (1, *SIZE, 3)
    assert "no control embeddings for p.4x3movie3left; using p.default" in caplog.text
    with pytest.raises(ValueError, match="aspect_ratio: aspect must look like '16:9'"):
        request(aspect_ratio="wide")


def test_enhance_a_video_skip_steps_and_the_frame_rounding_warning(tiny_dir: Path, caplog) -> None:
    """Enhance-A-Video skipping every step is the plain video; skipping none changes it. 9 frames make 8, with a
    logged warning."""
    video_request = request(frames=9, steps=2)
    plain, _ = RuyiPipeline.from_pretrained(tiny_dir, device="cpu").run(video_request, progress=False)
    skipped = RuyiPipeline.from_pretrained(tiny_dir, device="cpu", enhance_a_video=4.0, enhance_a_video_skip_start=1,
                                           enhance_a_video_skip_end=1)  # fmt: skip
    with caplog.at_level("WARNING", logger="ruyi_trt.runtime.pipeline"):
        same, _ = skipped.run(video_request, progress=False)
    enhanced, _ = RuyiPipeline.from_pretrained(tiny_dir, device="cpu", enhance_a_video=4.0).run(video_request, progress=False)
    assert plain.shape[2] == 8 and torch.equal(same, plain) and not torch.equal(enhanced, plain)
    assert "frames: 9 is not a multiple of 8; making 8 frames" in caplog.text


def test_teacache_step_options_reach_the_denoiser(tiny_dir: Path) -> None:
    pipe = RuyiPipeline.from_pretrained(tiny_dir, device="cpu", teacache=1.0, teacache_skip_start=1,
                                        teacache_skip_end=1, teacache_offload_cpu=False)  # fmt: skip
    assert pipe.components.denoiser.teacache == TeaCacheSettings(1.0, 1, 1, offload_cpu=False)
    video, _ = pipe.run(request(steps=6), progress=False)
    assert torch.isfinite(video).all() and 0 < pipe.components.denoiser.skipped_calls <= 6 - 1 - 1
    with pytest.raises(ValueError, match=r"teacache_skip_start: 0 is outside 1\.\.1000"):
        RuyiPipeline.from_pretrained(tiny_dir, device="cpu", teacache=0.1, teacache_skip_start=0)
    with pytest.raises(ValueError, match="applies only with teacache turned on"):
        RuyiPipeline.from_pretrained(tiny_dir, device="cpu", teacache_skip_end=2)


def write_lora(path: Path, model: torch.nn.Module, seed: int) -> Path:
    """A kohya-style LoRA (rank 2, alpha 1) on two layers of the tiny transformer."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in ("blocks.0.attn1.to_q", "blocks.1.ff.net.2"):
        out_dim, in_dim = model.get_submodule(name).weight.shape
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_up.weight"] = torch.randn(out_dim, 2, generator=gen)
        state[f"{key}.lora_down.weight"] = torch.randn(2, in_dim, generator=gen)
        state[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(state, str(path))
    return path


def test_several_loras_chain_with_their_own_strengths(tiny_dir: Path, tmp_path: Path) -> None:
    base = RuyiPipeline.from_pretrained(tiny_dir, device="cpu").components.denoiser.model
    a, b = write_lora(tmp_path / "a.safetensors", base, 1), write_lora(tmp_path / "b.safetensors", base, 2)
    pipe = RuyiPipeline.from_pretrained(tiny_dir, device="cpu", lora=[(a, 0.8), b], lora_strength=0.5)
    assert pipe.options.loras == ((str(a), 0.8), (str(b), 0.5))
    merge_lora(base, load_lora(a), 0.8)
    merge_lora(base, load_lora(b), 0.5)
    merged = pipe.components.denoiser.model
    for name in ("blocks.0.attn1.to_q.weight", "blocks.1.ff.net.2.weight"):
        assert torch.equal(merged.get_parameter(name), base.get_parameter(name))


def test_fp8_storage_auto_is_e4m3fn_and_named_in_the_summary(tiny_dir: Path) -> None:
    pipe = RuyiPipeline.from_pretrained(tiny_dir, device="cpu", fp8="extreme", fp8_storage="auto")
    assert pipe.options.fp8_storage == "fp8_e4m3fn"
    block = pipe.components.denoiser.model.blocks[0]
    assert block.norm2.parametrizations.weight.original0.dtype == torch.float8_e4m3fn
    _, stats = pipe.run(request(steps=1), progress=False)
    assert stats.precision["transformer"] == "fp32, fp8 extreme weights (fp8_e4m3fn)"
    assert "precision image_encoder fp32, vae fp32, transformer fp32, fp8 extreme weights (fp8_e4m3fn) (the " \
           "original runs bf16)" in stats.summary()  # fmt: skip


def test_noise_device() -> None:
    """cpu noise is the CPU generator's float32 draw (the same on every machine and in every dtype)."""
    cpu = initial_noise((1, 4, 2, 3, 3), torch.Generator().manual_seed(7), torch.device("cpu"), torch.bfloat16, 1.0)
    assert torch.equal(cpu, torch.randn((1, 4, 2, 3, 3), generator=torch.Generator().manual_seed(7)).bfloat16())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="noise_device: cuda needs a CUDA GPU"):
            request(noise_device="cuda")
    with pytest.raises(ValueError, match="noise_device: 'tpu' is unknown"):
        request(noise_device="tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_noise_is_the_originals_first_draw() -> None:
    """As the original: randn(shape, generator=torch.Generator("cuda").manual_seed(seed), dtype) on the GPU."""
    shape, seed = (1, 16, 2, 8, 12), 42
    expected = torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda", dtype=torch.bfloat16)
    got = initial_noise(shape, torch.Generator("cuda").manual_seed(seed), torch.device("cuda"), torch.bfloat16, 1.0)
    assert torch.equal(got, expected)
