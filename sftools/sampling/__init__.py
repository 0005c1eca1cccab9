"""Loops that call models: schedules, the block-wise causal sampler, rolling window, verify, video writing; no training."""
