"""The self-attention KV cache of block-wise causal generation, as state.

Written by hand because no library has it: diffusers 0.42 has no rolling KV cache for Wan (issue
#12600, PRs #13569 / #13681 open). The indexing follows Self Forcing's `CausalWanSelfAttention`
(guandeh17/Self-Forcing @ 33593df, `wan/modules/causal_model.py` l.196-235), value by value:

- keys are stored after the q/k RMS norm and after RoPE at their absolute frame position;
- every call writes its block's K/V: the first call of a new block appends, later calls for the
  same block (the remaining denoising steps, then the refresh pass at t = 0) overwrite its slots;
- attention runs over everything stored up to the end of the current block (history + itself);
- rolling (a window was asked for): when a NEW block does not fit, the oldest tokens after the first
  `sink_frames` frames are dropped, the rest shift left keeping their RoPE, and the block is written
  at the end. The window includes the block being denoised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftools.errors import SftoolsError


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    frame_tokens: int  # tokens per latent frame: (H/16) * (W/16) for Wan's 8x VAE and 2x2 patches
    capacity_frames: int  # frames the cache holds: the window when rolling, else the longest video it takes
    rolling: bool = False
    sink_frames: int = 0

    def __post_init__(self) -> None:
        if self.frame_tokens < 1 or self.capacity_frames < 1:
            raise ValueError("a KV cache needs at least one frame of one token")
        if self.rolling and not 0 <= self.sink_frames < self.capacity_frames:
            raise ValueError(f"sink frames ({self.sink_frames}) must be fewer than the window ({self.capacity_frames})")

    @property
    def capacity(self) -> int:
        return self.capacity_frames * self.frame_tokens


class LayerCache:
    """K/V of one self-attention layer for one branch (cond / uncond), [B, capacity, heads, head_dim]."""

    def __init__(self, spec: CacheSpec) -> None:
        self.spec = spec
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.global_end = 0  # end of the newest block written, in absolute tokens
        self.local_end = 0  # where that block ends inside the buffer

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the K/V of the block starting at absolute token `start`; return the keys and values
        its queries attend to (every stored token up to the end of the block)."""
        n, end, size = k.shape[1], start + k.shape[1], self.spec.capacity
        if self.k is None:
            self.k = k.new_zeros(k.shape[0], size, *k.shape[2:])
            self.v = v.new_zeros(v.shape[0], size, *v.shape[2:])
        new_block = end > self.global_end
        local_end = self.local_end + end - self.global_end
        if self.spec.rolling and new_block and n + self.local_end > size:
            evicted = n + self.local_end - size
            sink = self.spec.sink_frames * self.spec.frame_tokens
            kept = self.local_end - evicted - sink
            for buf in (self.k, self.v):
                buf[:, sink:sink + kept] = buf[:, sink + evicted:sink + evicted + kept].clone()
            local_end -= evicted
        if local_end > size:
            first, last = start // self.spec.frame_tokens, end // self.spec.frame_tokens - 1
            raise SftoolsError(f"the KV cache holds {self.spec.capacity_frames} latent frames and frames {first}-{last} "
                               "do not fit; roll it with --local-attn-frames, or raise --cache-frames")
        if torch.is_grad_enabled() and k.requires_grad:
            # Training: the block's own K/V keep their gradient, the stored history carries none
            # (Self Forcing refreshes it without gradients), and the buffer is never part of a graph.
            self.k[:, local_end - n:local_end] = k.detach()
            self.v[:, local_end - n:local_end] = v.detach()
            keys = torch.cat([self.k[:, :local_end - n], k], dim=1)
            values = torch.cat([self.v[:, :local_end - n], v], dim=1)
        else:
            self.k[:, local_end - n:local_end] = k
            self.v[:, local_end - n:local_end] = v
            keys, values = self.k[:, :local_end], self.v[:, :local_end]
        self.global_end, self.local_end = end, local_end
        return keys, values


def visible_frames(frames: int, per_block: int, window: int | None = None, sink: int = 0,
                   prefix: int = 0) -> torch.Tensor:
    """[frames, frames] bool: which frames each frame's block attends to under the cache, as a mask.
    A block sees itself and everything before it; with a rolling `window` (the block included),
    once the video outgrows it, the first `sink` frames and the newest window - sink frames. The
    first `prefix` frames (a VACE run's reference frames) are one block of their own."""
    visible = torch.zeros(frames, frames, dtype=torch.bool)
    bounds = [(0, prefix)] if prefix else []
    bounds += [(start, min(start + per_block, frames)) for start in range(prefix, frames, per_block)]
    for start, end in bounds:
        keys = torch.arange(frames)
        seen = keys < end
        if window is not None and end > window:
            seen &= (keys < sink) | (keys >= end - (window - sink))
        visible[start:end] = seen
    return visible
