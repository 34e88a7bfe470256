"""FP8 / INT8 post-training calibration of the transformer's linear layers (NVIDIA ModelOpt).

    ruyi-trt calibrate --model tiny --precision int8 --out DIR   -> DIR/scales.safetensors + DIR/calibration.json

Modules: recipe (which layers, ModelOpt configs: FP8 E4M3, INT8 SmoothQuant), quantize (ModelOpt's
calibration over a forward loop -> Scales), scales (the scales file format, `ruyi-trt-scales/1`), store (the
calibration folder, its record and the cache). The requests themselves run through the torch pipeline in
runtime/calibration.py. The scales feed the Q/DQ ONNX graphs (export/qdq.py: ONNX Runtime `ort-int8`/`ort-fp8`,
TensorRT `build --precision fp8|int8`) and the torch backend's 8-bit compute (weights/compute8.py, which takes
its layer list from recipe and its scales from scales.read_scales). calib/ sits in the layer of weights/ and
kernels/: it imports only models/ and below.
"""
