"""Self Forcing's few-step sampler, block by block over a KV cache.

Per block of `frames_per_block` latent frames (guandeh17/Self-Forcing @ 33593df,
`pipeline/causal_inference.py`): start from the block's noise; at each step the model predicts the
flow, x0 = x_t - sigma_t * flow (in float64, as upstream), and but for the last step x0 is
re-noised to the next step's sigma with a fresh draw; the last x0 is the block's output. Then one
more call on that x0 at t = 0 overwrites the block's K/V with clean ones (the refresh), and the next
block starts. With `frames_per_block` None the whole video is one block: the same loop samples
bidirectional models (lightx2v) as ComfyUI's `lcm` sampler does. With cfg > 1 the unconditional
branch keeps its own cache and is refreshed too.

With a VACE model every call takes its frames' slice of the VACE context (`vace_context`), both
branches the same one, as diffusers' `WanVACEPipeline` gives both the whole context. Reference
images (frames diffusers prepends in time, which it denoises from noise with the video and then
drops) enter causal generation as a clean prefix: before the first block, one call at t = 0 on
their own latents writes their K/V into the cache at latent frames 0..R-1, as the refresh writes a
finished block, and the video's frames follow at R onwards (their RoPE positions in diffusers
too). They are never denoised: their clean latents are known, so a block of steps would only
approximate them, and the video's draws stay those of a run without them. The cache holds them on
top of the window, as sinks a rolling window never evicts. A video with reference images is never
run as one cache-less block, so `--frames-per-block all` sees them in the cache as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from sftools.models.causal_wan import CausalWanModel
from sftools.models.kv_cache import CacheSpec
from sftools.sampling.schedules import Step, few_step_schedule
from sftools.sampling.settings import TEXT_LEN, SampleSettings
from sftools.sampling.vace_context import VaceContext
from sftools.wan.config import WanConfig


class Noise(Protocol):
    def initial(self, start: int, frames: int) -> torch.Tensor: ...
    def renoise(self, step: int, start: int, frames: int) -> torch.Tensor: ...


@dataclass
class BlockDone:
    index: int
    start: int  # first latent frame
    latents: torch.Tensor  # [1, C, frames, h, w], the block's final x0
    seconds: float


def pad_context(embeds: torch.Tensor, rows: int = TEXT_LEN) -> torch.Tensor:
    """Zero rows up to the model's `text_len` (512 for every Wan model), as umT5 pipelines pass them
    (the padded rows still matter: text_embedding of zero is its bias, and cross-attention has no
    mask). Zero rows past `rows` are padding from a longer encoding and are dropped: umT5 masks its
    padding, so the tokens before it encode the same at any length."""
    if embeds.shape[1] > rows:
        if embeds[:, rows:].any():
            raise ValueError(f"prompt embeddings have {prompt_tokens(embeds)} tokens, more than the model's {rows}")
        embeds = embeds[:, :rows]
    return torch.nn.functional.pad(embeds, (0, 0, 0, rows - embeds.shape[1]))


def prompt_tokens(embeds: torch.Tensor) -> int:
    """Rows of [B, rows, dim] embeddings up to the last that is not zero padding."""
    nonzero = embeds.abs().sum(dim=(0, 2)).nonzero()
    return int(nonzero[-1]) + 1 if nonzero.numel() else 0


def cache_spec(settings: SampleSettings, references: int = 0) -> CacheSpec:
    """The cache one video needs: the window when rolling, else every frame (up to --cache-frames),
    plus `references` reference frames in front (kept as sinks when rolling)."""
    if settings.local_attn_frames is not None:
        return CacheSpec(frame_tokens=settings.frame_tokens, capacity_frames=settings.local_attn_frames + references,
                         rolling=True, sink_frames=settings.sink_frames + references)
    capacity = settings.latent_frames if settings.cache_frames is None else settings.cache_frames
    return CacheSpec(frame_tokens=settings.frame_tokens, capacity_frames=capacity + references)


def blocks(settings: SampleSettings) -> list[tuple[int, int]]:
    """(start, frames) of every block; a last block may be shorter."""
    size = settings.frames_per_block or settings.latent_frames
    return [(s, min(size, settings.latent_frames - s)) for s in range(0, settings.latent_frames, size)]


@dataclass
class _Video:
    """What every model call of one video takes besides its latents, on the model's device."""

    context: torch.Tensor
    negative: torch.Tensor | None  # None: no guidance
    control: VaceContext | None
    cached: bool  # False: the whole video is one block, run bidirectionally without a cache


class CausalSampler:
    def __init__(self, model: CausalWanModel, config: WanConfig, settings: SampleSettings) -> None:
        self.model, self.config, self.settings = model, config, settings
        self.schedule: list[Step] = few_step_schedule(settings.steps, settings.shift, settings.warp)

    def _call(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, start: int, branch: str,
              video: _Video) -> torch.Tensor:
        control, scale = None, 1.0
        if video.control is not None:
            control, scale = video.control.frames_at(start, x.shape[2]), video.control.scale
        if not video.cached:
            return self.model.bidirectional(x, timestep, context, control, scale)
        return self.model(x, timestep, context, start, branch, control, scale)

    def _flow(self, x: torch.Tensor, t: float, start: int, video: _Video) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        cond = self._call(x, timestep, video.context, start, "cond", video)
        if video.negative is None:
            return cond
        uncond = self._call(x, timestep, video.negative, start, "uncond", video)
        return uncond + self.settings.cfg * (cond - uncond)

    @torch.no_grad()
    def sample(self, context: torch.Tensor, noise: Noise, negative: torch.Tensor | None = None,
               on_block: Callable[[BlockDone], None] | None = None, keep: bool = True,
               control: VaceContext | None = None) -> torch.Tensor | None:
        """The final latents [B, C, T, h, w] (None with `keep` False: each block goes to `on_block`
        only, so nothing grows with the video). `context` / `negative` are [B, tokens, text_dim]
        prompt embeddings (padded here), one row per video `noise` draws; `negative` is used only
        with cfg > 1. `control` is the VACE context a VACE model needs, its reference frames first."""
        s = self.settings
        # The patch embedding has the model's dtype (norms and modulation tables stay fp32).
        weight = self.model.transformer.patch_embedding.weight
        device, dtype = weight.device, weight.dtype
        rows = self.config.text_len
        context = pad_context(context, rows).to(device, dtype)
        negative = pad_context(negative, rows).to(device, dtype) if negative is not None and s.cfg != 1 else None
        if s.cfg != 1 and negative is None:
            raise ValueError("cfg != 1 needs negative prompt embeddings")
        references = control.reference_frames if control is not None else 0
        if control is not None:
            latents = control.latents.to(device, dtype)
            control = replace(control, latents=latents.expand(len(context), *latents.shape[1:]))
        plan = blocks(s)
        video = _Video(context, negative, control, cached=len(plan) > 1 or references > 0)
        self.model.reset(cache_spec(s, references))
        if references:  # the clean prefix (module docstring); its output is not needed
            self._flow(control.references(), 0.0, 0, video)
        h, w = s.latent_size
        out = torch.empty(len(context), self.config.out_dim, s.latent_frames, h, w, dtype=torch.float32) if keep else None
        for index, (start, frames) in enumerate(plan):
            began = time.perf_counter()
            at = references + start  # the block's first frame in the model's sequence
            x = noise.initial(start, frames).to(device, dtype)
            for i, step in enumerate(self.schedule):
                flow = self._flow(x, step.timestep, at, video)
                x0 = (x.double() - step.sigma * flow.double()).to(dtype)
                if i + 1 < len(self.schedule):
                    sigma = self.schedule[i + 1].sigma
                    x = (1 - sigma) * x0 + sigma * noise.renoise(i, start, frames).to(device, dtype)
            if out is not None:
                out[:, :, start:start + frames] = x0.float().cpu()
            if index + 1 < len(plan):  # the last block's clean K/V would serve no later block
                self._flow(x0, 0.0, at, video)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # so the seconds per block are the GPU's, not the launch's
            if on_block:
                on_block(BlockDone(index, start, x0, time.perf_counter() - began))
        return out
