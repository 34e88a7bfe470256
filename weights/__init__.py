"""Edits of the transformer's weights before a run: LoRA merging and the reference's FP8 weight storage."""
