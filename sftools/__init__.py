"""sftools: safe weight tools, LoRA extraction and causal sampling for Wan 2.1 video models."""

__version__ = "0.1.0"
