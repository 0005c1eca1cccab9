"""The VACE context of a sampling run: the 96 channels a VACE model takes beside the latents.

Built as diffusers' `WanVACEPipeline.__call__` builds its `conditioning_latents`
(pipelines/wan/pipeline_wan_vace.py, diffusers 0.42.1), by calling the pipeline's own helpers:

- `preprocess_conditions`: frames to [-1, 1], the mask to [0, 1] (no mask: all ones, every pixel
  reactive, i.e. generated), each reference image scaled to fit and centred on a white canvas;
- `prepare_video_latents`: the mask thresholded at 0.5, inactive = video * (1 - mask) and
  reactive = video * mask VAE-encoded (the distribution's mode) and normalised like the latents,
  channels 0-15 and 16-31; each reference image encoded alone as [its latent, zeros] and prepended
  in time (in turn, so the last one given comes first);
- `prepare_masks`: each 8x8 pixel block of the mask unshuffled into 64 channels on the latent grid,
  its frames taken nearest-exact onto the latent frames, zeros for reference frames: channels 32-95.

They run on `_PipelineParts`, the few attributes of `self` they read, so neither the text encoder
nor the transformer is loaded for it. The VAE runs in float32, as diffusers' Wan VACE examples load
it. A safetensors file holding `vace_context` ([96, F, h, w] or [1, 96, F, h, w]; its metadata
`sftools.reference_frames` says how many of the F frames are reference images, default 0) is
such a context already made, and needs no VAE.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch

from sftools.errors import SettingsError, SftoolsError
from sftools.io.sources import open_checkpoint
from sftools.sampling.settings import SampleSettings
from sftools.sampling.video import load_vae

CONTEXT_KEY = "vace_context"
REFERENCE_FRAMES_KEY = "sftools.reference_frames"
LATENT_CHANNELS = 16  # the inactive and the reactive latents come first, 16 channels each


@dataclass(frozen=True, kw_only=True)
class ControlSource:
    """The control of a run as the command line names it: a video (with an optional mask video and
    reference images) or a precomputed context file, and the hints' scale."""

    control: str
    mask: str | None = None
    reference_images: tuple[str, ...] = ()
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.precomputed and (self.mask or self.reference_images):
            raise SettingsError(f"--control {self.control}: a precomputed vace_context holds its mask and reference "
                                "frames already; --control-mask and --reference-image go with a control video")

    @property
    def precomputed(self) -> bool:
        return self.control.endswith(".safetensors")

    @property
    def files(self) -> list[str]:
        return [self.control, *([self.mask] if self.mask else []), *self.reference_images]


@dataclass
class VaceContext:
    """[B, 96, reference_frames + frames, h, w]: the reference images' frames, then the video's."""

    latents: torch.Tensor
    reference_frames: int = 0
    scale: float = 1.0
    source: str = "the control"

    @property
    def frames(self) -> int:
        return self.latents.shape[2] - self.reference_frames

    def references(self) -> torch.Tensor:
        """The reference images' own latents (the inactive channels of their frames), [B, 16, R, h, w]."""
        return self.latents[:, :LATENT_CHANNELS, :self.reference_frames]

    def frames_at(self, start: int, frames: int) -> torch.Tensor:
        """The context of `frames` model frames from `start` (reference frames count from 0)."""
        return self.latents[:, :, start:start + frames]

    def fitted(self, settings: SampleSettings, channels: int) -> "VaceContext":
        """This context cut to the run's frames, or one line saying why it does not fit."""
        _, c, _, h, w = self.latents.shape
        if c != channels:
            raise SftoolsError(f"{self.source}: the VACE context has {c} channels; the model takes {channels}")
        if (h, w) != settings.latent_size:
            raise SftoolsError(f"{self.source}: the VACE context is {w}x{h} latents ({8 * w}x{8 * h} pixels); this run "
                               f"makes {settings.width}x{settings.height} (--width, --height)")
        if self.frames < settings.latent_frames:
            raise SftoolsError(f"{self.source}: the VACE context covers {self.frames} latent frames; --frames "
                               f"{settings.frames} needs {settings.latent_frames}")
        end = self.reference_frames + settings.latent_frames
        return replace(self, latents=self.latents[:, :, :end])


def read_context_file(path: str, scale: float = 1.0) -> VaceContext:
    """A precomputed context: `vace_context` [96, F, h, w] or [1, 96, F, h, w] in a safetensors file."""
    ckpt = open_checkpoint(path)
    if CONTEXT_KEY not in ckpt.tensors:
        raise SftoolsError(f"{path}: has no tensor {CONTEXT_KEY!r} (a precomputed VACE context [96, frames, h, w])")
    lazy = ckpt.tensors[CONTEXT_KEY]
    if len(lazy.shape) not in (4, 5) or (len(lazy.shape) == 5 and lazy.shape[0] != 1):
        raise SftoolsError(f"{path}: {CONTEXT_KEY} is {list(lazy.shape)}; expected [96, frames, h, w] "
                           "or [1, 96, frames, h, w]")
    try:
        references = int(ckpt.metadata.get(REFERENCE_FRAMES_KEY, 0))
    except ValueError:
        references = -1
    if not 0 <= references < lazy.shape[-3]:
        raise SftoolsError(f"{path}: metadata {REFERENCE_FRAMES_KEY} is {ckpt.metadata.get(REFERENCE_FRAMES_KEY)!r}; "
                           f"expected a count of reference frames below {lazy.shape[-3]}")
    latents = lazy.load().float()
    return VaceContext(latents if latents.dim() == 5 else latents[None], references, scale, path)


def read_clip(path: str, frames: int, height: int, width: int) -> list:
    """The first `frames` frames of a video file, as RGB PIL images of exactly width x height."""
    import av

    images = []
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                if (frame.width, frame.height) != (width, height):
                    raise SftoolsError(f"{path}: frames are {frame.width}x{frame.height}; this run makes "
                                       f"{width}x{height} (--width, --height)")
                images.append(frame.to_image().convert("RGB"))
                if len(images) == frames:
                    break
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise SftoolsError(f"{path}: cannot be read as a video ({str(exc).splitlines()[0]})") from None
    if len(images) < frames:
        raise SftoolsError(f"{path}: has {len(images)} frames; --frames {frames} needs at least {frames}")
    return images


def read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise SftoolsError(f"{path}: cannot be read as an image ({str(exc).splitlines()[0]})") from None


class _PipelineParts:
    """What WanVACEPipeline's condition helpers read of `self`, set as its `__init__` sets them
    (pipeline_wan_vace.py): the VAE, its strides, the video processor, the transformer's patch size."""

    def __init__(self, vae, patch_size: tuple[int, int, int]) -> None:
        from diffusers.video_processor import VideoProcessor

        self.vae = vae
        self.vae_scale_factor_temporal = 2 ** sum(vae.temperal_downsample)
        self.vae_scale_factor_spatial = 2 ** len(vae.temperal_downsample)
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        self.transformer = SimpleNamespace(config=SimpleNamespace(patch_size=patch_size))


@torch.no_grad()
def encode_context(vae, frames: list, mask: list | None, references: list, height: int, width: int,
                   patch_size: tuple[int, int, int] = (1, 2, 2)) -> torch.Tensor:
    """[1, 96, R + latent frames, h, w] from PIL frames, mask frames and reference images, by the
    steps of `WanVACEPipeline.__call__` ("5. Prepare latent variables") on the VAE's device."""
    from diffusers import WanVACEPipeline

    parts = _PipelineParts(vae, patch_size)
    device = next(vae.parameters()).device
    video, mask, refs = WanVACEPipeline.preprocess_conditions(
        parts, frames, mask, references or None, 1, height, width, len(frames), torch.float32, device)
    latents = WanVACEPipeline.prepare_video_latents(parts, video, mask, refs, None, device)
    masks = WanVACEPipeline.prepare_masks(parts, mask, refs, None)
    return torch.cat([latents, masks], dim=1)


@dataclass
class ControlClips:
    """A control video's frames, its mask's and its reference images, read and checked (PIL images)."""

    source: ControlSource
    frames: list
    mask: list | None
    references: list


def read_clips(source: ControlSource, settings: SampleSettings) -> ControlClips:
    """The pictures of a control video source, each checked against the run's size and length."""
    size = (settings.frames, settings.height, settings.width)
    return ControlClips(source, read_clip(source.control, *size),
                        read_clip(source.mask, *size) if source.mask else None,
                        [read_image(p) for p in source.reference_images])


def encode_clips(vae, clips: ControlClips, settings: SampleSettings) -> VaceContext:
    latents = encode_context(vae, clips.frames, clips.mask, clips.references, settings.height, settings.width)
    return VaceContext(latents.float().cpu(), len(clips.references), clips.source.scale, clips.source.control)


def build_context(source: ControlSource, settings: SampleSettings, vae_dir: str | None,
                  device: torch.device) -> VaceContext:
    """The context `source` names, for `settings`: read, or encoded with the VAE at `vae_dir` (freed after)."""
    if source.precomputed:
        return read_context_file(source.control, source.scale)
    if not vae_dir:
        raise SettingsError(f"--control {source.control}: a control video is encoded with --vae DIR (a local Wan "
                            "VAE or diffusers folder); or give a precomputed vace_context .safetensors")
    clips = read_clips(source, settings)  # before the VAE loads: a clip that does not fit costs nothing
    vae = load_vae(vae_dir, device, torch.float32)
    context = encode_clips(vae, clips, settings)
    del vae
    gc.collect()
    return context
