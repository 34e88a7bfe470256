"""Model FLOPs of one transformer forward, from the config and the latent shape (architecture doc section 7).

Counts multiply-adds as 2 FLOPs and follows the doc's three terms exactly:
- linear: per token and sample, every block's token-wise Linear layers
  (attn1 q/k/v/out, attn2 and attn_clip q/out, the GEGLU projection D -> 2D, the FFN), plus skip_linear
  in the long-skip blocks: L*(20*D^2 + 4*D*Dff) + S*4*D^2, i.e. 2 x the weights touched per token;
- self-attention: 4*N^2*D per block and sample (Q K^T and A V);
- cross-attention: 4*N*(text_tokens + n_query)*D per block and sample.
Per-sample terms (conditioning embeddings, the text/CLIP key and value projections, norm1's Linear on temb)
and the patch embedding / output projection are left out: together they are far below 0.1% at real sizes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..models.transformer import TransformerConfig


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one transformer forward over the whole batch (CFG: batch 2)."""

    linear: int
    self_attention: int
    cross_attention: int
    tokens: int  # per sample
    batch: int

    @property
    def total(self) -> int:
        return self.linear + self.self_attention + self.cross_attention

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def token_count(config: TransformerConfig, frames: int, latent_h: int, latent_w: int) -> int:
    """Tokens per sample: latent frames x (latent_h / patch) x (latent_w / patch)."""
    p = config.patch_size
    if latent_h % p or latent_w % p:
        raise ValueError(f"latent size {latent_h}x{latent_w} must be a multiple of patch_size={p}")
    return frames * (latent_h // p) * (latent_w // p)


def transformer_flops(
    config: TransformerConfig, frames: int, latent_h: int, latent_w: int, batch: int = 2
) -> FlopCount:
    """FLOPs of one forward on `batch` samples of `frames` latent frames of latent_h x latent_w.

    For video frames F and pixels H x W: frames = VAEConfig.latent_frames(F) (30 for 120), latent = H/8 x W/8.
    """
    if frames < 1 or batch < 1:
        raise ValueError(f"frames={frames} and batch={batch} must be >= 1")
    n = token_count(config, frames, latent_h, latent_w)
    d, dff, layers = config.inner_dim, config.ff_inner_dim, config.num_layers
    per_token = layers * (20 * d * d + 4 * d * dff) + len(config.skip_blocks) * 4 * d * d
    context = config.text_tokens + config.n_query
    return FlopCount(
        linear=batch * n * per_token,
        self_attention=batch * layers * 4 * n * n * d,
        cross_attention=batch * layers * 4 * n * context * d,
        tokens=n,
        batch=batch,
    )
