"""The control inputs of a VACE add-on run: one VACE context per control, taken in turn with the prompts.

A control is what `sftools sample --control` takes, read by the sampler's own code
(`sampling.vace_context`): a precomputed `vace_context` file, or a control clip (with an optional
`NAME.mask.mp4` beside it) encoded by diffusers' `WanVACEPipeline` helpers on the VAE. Clips are
encoded once into `cache/controls.safetensors`, so the VAE is not held while training. Reference
images are not taken: a rollout's cache starts empty, as Self Forcing's does.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from sftools.errors import SftoolsError
from sftools.sampling.settings import SampleSettings
from sftools.sampling.vace_context import (LATENT_CHANNELS, ControlSource, VaceContext, encode_clips, read_clips,
                                           read_context_file)
from sftools.sampling.video import load_vae
from sftools.training.config import VideoSettings

MASK_SUFFIX = ".mask.mp4"
TINY_CONTROLS = 4  # built-in random contexts of the tiny add-on


def control_files(folder: str) -> list[str]:
    """The controls in `folder`, sorted: .safetensors contexts and .mp4 clips (not their masks)."""
    names = sorted(n for n in os.listdir(folder)
                   if n.endswith(".safetensors") or (n.endswith(".mp4") and not n.endswith(MASK_SUFFIX)))
    if not names:
        raise SftoolsError(f"{folder}: holds no controls (vace_context .safetensors files or .mp4 clips) "
                           "(data.controls)")
    return [os.path.join(folder, n) for n in names]


def mask_of(path: str) -> str | None:
    """The mask clip beside control clip `path`, if there is one."""
    mask = path.removesuffix(".mp4") + MASK_SUFFIX
    return mask if path.endswith(".mp4") and os.path.exists(mask) else None


def cache_key(files: list[str], video: VideoSettings, vae: str | None) -> str:
    """What the encoded contexts depend on: the files (masks included) as they are now, the video
    size and length, the VAE."""
    paths = [p for f in files for p in (f, mask_of(f)) if p]
    stats = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
    return hashlib.sha256(json.dumps([stats, video.frames, video.height, video.width, vae]).encode()).hexdigest()


def read_controls(files: list[str], video: VideoSettings, vae_dir: str | None, channels: int,
                  device: torch.device) -> list[torch.Tensor]:
    """[1, 96, latent frames, h, w] per file, cut to the run's frames, or one line saying why one does
    not fit. Clips are read one at a time (so memory holds one), encoded by one VAE on `device`."""
    settings = SampleSettings(frames=video.frames, height=video.height, width=video.width)
    if vae_dir is None:
        clip = next((f for f in files if f.endswith(".mp4")), None)
        if clip:
            raise SftoolsError(f"{clip}: a control clip is encoded with a VAE: set data.vae")
    vae, out = None, []
    for path in files:
        if path.endswith(".safetensors"):
            context = read_context_file(path)
        else:
            clips = read_clips(ControlSource(control=path, mask=mask_of(path)), settings)
            vae = vae or load_vae(vae_dir, device, torch.float32)
            context = encode_clips(vae, clips, settings)
        out.append(_fitted(context, settings, channels))
    return out


def _fitted(context: VaceContext, settings: SampleSettings, channels: int) -> torch.Tensor:
    if context.reference_frames:
        raise SftoolsError(f"{context.source}: has {context.reference_frames} reference frames; training takes "
                           "controls without reference images")
    return context.fitted(settings, channels).latents.cpu().contiguous()


def tiny_controls(video: VideoSettings, channels: int, seed: int) -> list[torch.Tensor]:
    """Random contexts for the tiny add-on: latents of unit scale, the mask all ones (all generated)."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, channels, video.latent_frames, video.height // 8, video.width // 8)
    controls = []
    for _ in range(TINY_CONTROLS):
        context = torch.randn(shape, generator=g)
        context[:, 2 * LATENT_CHANNELS:] = 1.0  # channels 32-95: the mask
        controls.append(context)
    return controls
