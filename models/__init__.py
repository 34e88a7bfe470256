"""PyTorch re-implementation of Ruyi-Mini-7B: transformer, VAE, CLIP image encoder, control embeddings.

Every module loads the released checkpoint's state dict unchanged (strict key matching).
"""

from .checkpoint_io import CheckpointError
from .image_encoder import CLIPImageEncoder
from .transformer import RuyiTransformer3D, TransformerConfig
from .vae import RuyiVAE
from .vae_config import VAEConfig

__all__ = ["CLIPImageEncoder", "CheckpointError", "RuyiTransformer3D", "RuyiVAE", "TransformerConfig", "VAEConfig"]
