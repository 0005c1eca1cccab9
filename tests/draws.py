"""Explicit sampler draws for tests, as a --noise file gives them."""

from __future__ import annotations

import torch

from sftools.sampling.settings import SampleSettings


class Draws:
    """Explicit draws, as a --noise file gives them."""

    def __init__(self, settings: SampleSettings, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        h, w = settings.latent_size
        self.noise = torch.randn(1, 16, settings.latent_frames, h, w, generator=g)
        self.draws = torch.randn(max(settings.steps - 1, 1), 1, 16, settings.latent_frames, h, w, generator=g)

    def initial(self, start, frames):
        return self.noise[:, :, start:start + frames]

    def renoise(self, step, start, frames):
        return self.draws[step][:, :, start:start + frames]
