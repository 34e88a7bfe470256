"""Inference runtime: request validation, conditioning inputs, the pipeline, backends and video output."""
