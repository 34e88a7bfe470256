"""FP8/INT8 calibration: explicit Q/DQ ONNX graphs for TensorRT's strongly typed FP8 engines.

Not written yet. Until it exists, `ruyi-trt build --precision fp8` stops with a message saying so.
The reference's own FP8 is weight storage only (weights/fp8_storage.py); true FP8 GEMMs need calibrated scales.
"""
