"""ComfyUI nodes for ruyi-trt (load model, sampler, TensorRT engine loader).

Not written yet. The nodes will be plain classes calling library functions (runtime.loading,
runtime.pipeline), with both mapping dicts built from one list of classes.
"""
