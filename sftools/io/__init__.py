"""Bytes <-> lazy tensors: readers, the streaming writer, atomic outputs. Knows no model and no LoRA."""
