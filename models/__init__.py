"""PyTorch re-implementation of Ruyi-Mini-7B: transformer, VAE, CLIP image encoder, control embeddings.

Every module loads the released checkpoint's state dict unchanged (strict key matching).
"""
