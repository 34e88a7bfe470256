"""The pieces of the denoising loop: initial noise, fixed transformer inputs, one guided step, posterior sampling.

They follow the reference `RuyiInpaintPipeline.__call__` (docs/ruyi-architecture.md section 6); the loop that
strings them together is `RuyiPipeline.run` (runtime/pipeline.py). Dtypes follow the reference too: the latents
live in the stored control embeddings' dtype (in bf16/fp16 runs), the timestep is cast to it before the model,
and classifier-free guidance combines the model's output in the model's dtype.
"""

from __future__ import annotations

import torch

from ..models.transformer import TransformerConfig, rotary_embedding

NOISE_DEVICES = ("cpu", "cuda")


def latent_dtype(run_dtype: torch.dtype, embeddings_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the latents, the scheduler's arithmetic and the timestep's rounding.

    The reference keeps its latents in the stored embeddings' dtype (`prepare_latents(prompt_embeds.dtype)`)
    while the model runs bf16; runs in bf16/fp16 do the same. fp32 runs (ours only) keep everything in fp32."""
    return torch.float32 if run_dtype == torch.float32 else embeddings_dtype


def initial_noise(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype, sigma: float
) -> torch.Tensor:
    """The initial latents N(0, 1) * `sigma` (the scheduler's init_noise_sigma), the run generator's first draw.

    A CUDA generator draws on the GPU in `dtype`, as the reference's `torch.Generator("cuda")` does, so a seed
    gives its noise on the same GPU; a CPU generator draws float32 on the CPU (the same numbers on every machine
    and in every dtype), then casts."""
    if generator.device.type == "cuda":
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    else:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype=dtype)
    return (noise * sigma).to(device)


def sample_posterior(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw from the diagonal Gaussian whose (mean | logvar) are stacked on dim 1, with a seeded CPU generator."""
    mean, logvar = moments.float().chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise


def transformer_conditioning(
    positive: dict[str, torch.Tensor],
    negative: dict[str, torch.Tensor],
    clip_tokens: torch.Tensor,
    inpaint_latents: torch.Tensor,
    height: int,
    width: int,
    config: TransformerConfig,
    cfg_on: bool,
) -> tuple[dict[str, torch.Tensor | tuple], dict[str, torch.Tensor | tuple]]:
    """The transformer inputs that stay fixed over the loop, for the early steps (CLIP branch off: zero tokens,
    mask 0 for every sample) and the late steps (positive sample sees the CLIP tokens, the negative zeros).
    Batches are [negative, positive] when `cfg_on`, else [positive]."""
    batch = 2 if cfg_on else 1

    def stack(key: str) -> torch.Tensor:
        return torch.cat([negative[key], positive[key]]) if cfg_on else positive[key]

    latent_h, latent_w = inpaint_latents.shape[-2:]
    cos, sin = rotary_embedding(latent_h, latent_w, config.patch_size, config.attention_head_dim)
    fixed = {
        "encoder_hidden_states": stack("emb1"),
        "text_embedding_mask": stack("mask1"),
        "encoder_hidden_states_t5": stack("emb2"),
        "text_embedding_mask_t5": stack("mask2"),
        "image_meta_size": torch.tensor([[1024.0, 1024.0, height, width, 0.0, 0.0]]).repeat(batch, 1),
        "style": torch.zeros(batch, dtype=torch.long),
        "image_rotary_emb": (cos, sin),
        "inpaint_latents": inpaint_latents.repeat(batch, 1, 1, 1, 1),
    }
    zeros = torch.zeros_like(clip_tokens)
    early = {
        **fixed,
        "clip_encoder_hidden_states": zeros.repeat(batch, 1, 1),
        "clip_attention_mask": torch.zeros(batch, config.n_query),
    }
    late = {
        **fixed,
        "clip_encoder_hidden_states": torch.cat([zeros, clip_tokens]) if cfg_on else clip_tokens,
        "clip_attention_mask": torch.cat([torch.zeros(1, config.n_query), torch.ones(1, config.n_query)])
        if cfg_on
        else torch.ones(1, config.n_query),
    }
    return early, late


def guided_velocity(output: torch.Tensor, guidance_scale: float, latent_channels: int) -> torch.Tensor:
    """Keep the v-prediction channels (drop learned sigma) and apply CFG when the batch is [uncond, cond]."""
    velocity = output[:, :latent_channels]
    if velocity.shape[0] == 2:
        uncond, cond = velocity.chunk(2)
        velocity = uncond + guidance_scale * (cond - uncond)
    return velocity


def denoise_step(
    denoiser,
    scheduler,
    latents: torch.Tensor,
    t: torch.Tensor,
    inputs: dict,
    guidance_scale: float,
    latent_channels: int,
    step_kwargs: dict,
) -> torch.Tensor:
    """One loop iteration: scale input, call the denoiser on the CFG batch, guide, scheduler step.

    The timestep is cast to the latents' dtype (bf16 rounds 961 to 960, as in the reference) and handed over as
    float32 holding that value."""
    batch = inputs["style"].shape[0]
    model_in = scheduler.scale_model_input(torch.cat([latents] * batch), t)
    timestep = torch.as_tensor(t).reshape(1).expand(batch).to(model_in.dtype).float()
    output = denoiser(hidden_states=model_in, timestep=timestep, **inputs)
    velocity = guided_velocity(output.to(latents.device), guidance_scale, latent_channels)
    return scheduler.step(velocity, t, latents, **step_kwargs, return_dict=False)[0]
