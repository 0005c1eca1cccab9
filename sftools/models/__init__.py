"""nn.Modules on diffusers' Wan blocks: the causal transformer, its KV cache and attention processors."""
