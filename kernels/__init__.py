"""Triton kernels for the spots where the generic PyTorch path is slow or has no 8-bit form.

- fp8_attention: FP8 (e4m3) attention for Ruyi's head size 176, online softmax, P.V in fp16/bf16 or e4m3.
- layernorm_shift: the block's norm1 (fp32 LayerNorm + adaLN shift) in one pass.
- qk_norm_rope: per-head QK LayerNorm + 2-D RoPE in one pass, straight into the attention layout.
- gelu_tanh: the FFN's tanh-approximate GELU.
Each file holds the `@triton.jit` kernel, a launcher with the same signature as its torch reference, and the
reference itself (`<op>_ref`). Backends choose between them (runtime/backends/fast_compute.py); the model code never
imports Triton, and importing this package imports none of them. They run on CUDA GPUs, and on CPU only under
Triton's interpreter (TRITON_INTERPRET=1, used by the tests; `triton_support`).
"""
