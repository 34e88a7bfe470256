"""Fused GPU kernels (Triton) for the spots where the generic PyTorch path is slow.

Each kernel file will hold the `@triton.jit` kernel, a launcher with the same signature as its torch
reference, and the reference itself (`<op>_ref`); backends choose between them, and the model code never
imports Triton. No kernel has been written yet: the first candidates are the fp32 LayerNorm + shift
(AdaLayerNormShift) and RoPE application around attention (docs/ruyi-architecture.md section 9).
"""
