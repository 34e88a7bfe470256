"""What runs the four components: the protocol, and the torch, ONNX Runtime and TensorRT backends.

`block_runner` is the torch transformer runner that executes a memory plan (resident and streamed blocks,
long-skip offload, CFG split) and the step-skipping/attention tweaks (TeaCache, Enhance-A-Video).
"""
