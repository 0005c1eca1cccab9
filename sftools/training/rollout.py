"""Self Forcing's rollout: the generator samples a video with its own KV cache, as at inference,
and gradients reach it only through one step per block.

`pipeline/self_forcing_training.py::inference_with_trajectory` (guandeh17/Self-Forcing @ 33593df):
one exit step is drawn per rollout (the same for every block, and on every process); each block
runs the steps before it without gradients, the exit step with them, and stops there. The block's
x0 at the exit step is its output. The cache is then refreshed without gradients, so earlier
blocks reach later ones only as detached context, from x0 noised to the grid's smallest sigma
(Self Forcing's `add_noise(x0, noise, t = context_noise = 0)` lands on sigma ~ 0.005, not 0, in
training) and labelled t = 0.
"""

from __future__ import annotations

import torch

from sftools.models.causal_wan import CausalWanModel
from sftools.models.kv_cache import CacheSpec
from sftools.sampling.causal import pad_context
from sftools.sampling.schedules import Step, training_grid


def exit_step(steps: int, seed: int, iteration: int) -> int:
    """The step every block exits at in this iteration: drawn from (seed, iteration) alone, so every
    process draws the same one without a broadcast, and a resumed run draws what it would have."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + iteration)
    return int(torch.randint(0, steps, (1,), generator=generator))


def rollout(model: CausalWanModel, context: torch.Tensor, schedule: list[Step], shape: tuple[int, ...],
            frames_per_block: int, exit_at: int, generator: torch.Generator, shift: float,
            *, text_len: int, truth: torch.Tensor | None = None, control: torch.Tensor | None = None) -> torch.Tensor:
    """The generated latents [B, C, T, h, w], differentiable only through each block's exit step.
    `generator` draws every noise (on the CPU, so runs repeat across devices). With `truth` (a
    teacher's video of the same shape) the cache is refreshed from it instead of from the
    generator's own blocks: teacher forcing, everything else the same. A VACE model takes each
    block's frames of `control` (the VACE context, [B, 96, T, h, w]) in every call on that block,
    its refresh included. `text_len` is the model's (`WanConfig.text_len`): the rows `context` is
    padded to (no default: a wrong one would run, padded like another model)."""
    weight = model.transformer.patch_embedding.weight  # the model's dtype (norms stay fp32)
    device, dtype = weight.device, weight.dtype
    batch, channels, frames, h, w = shape
    context = pad_context(context, text_len).to(device, dtype)
    model.reset(CacheSpec(frame_tokens=(h // 2) * (w // 2), capacity_frames=frames))
    context_sigma = float(training_grid(shift)[-1])  # the grid point nearest t = 0
    outputs = []
    for start in range(0, frames, frames_per_block):
        n = min(frames_per_block, frames - start)
        x = torch.randn(batch, channels, n, h, w, generator=generator).to(device, dtype)
        hints = None if control is None else control[:, :, start:start + n].to(device, dtype)
        for i, step in enumerate(schedule[:exit_at + 1]):
            timestep = torch.full((batch,), step.timestep, device=device)
            with torch.set_grad_enabled(i == exit_at and torch.is_grad_enabled()):
                flow = model(x, timestep, context, start, control=hints)
                x0 = x - step.sigma * flow
            if i < exit_at:
                sigma = schedule[i + 1].sigma
                x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=generator).to(device, dtype)
        outputs.append(x0)
        with torch.no_grad():
            clean = x0.detach() if truth is None else truth[:, :, start:start + n].to(device, dtype)
            context_x = (1 - context_sigma) * clean + context_sigma * torch.randn(clean.shape, generator=generator).to(device, dtype)
            model(context_x, torch.zeros(batch, device=device), context, start, control=hints)
    return torch.cat(outputs, dim=2)
