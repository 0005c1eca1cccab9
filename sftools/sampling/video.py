"""From latents to files: the Wan VAE decoding block by block as the sampler produces them, an mp4
writer that encodes as it goes, and the latents as safetensors.

Pixels: the decoder's output x (clamped to [-1, 1] by the VAE, as diffusers does) becomes
`round(255 * clamp(x * 0.5 + 0.5, 0, 1))` in float32 (round half to even), which is diffusers'
`VideoProcessor.postprocess_video(output_type="np")` followed by `encode_video`'s `* 255` and round.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from sftools import __version__
from sftools.errors import SftoolsError
from sftools.io.lazy import LazyTensor
from sftools.io.output import atomic_target, write_file


def _vae_folder(folder: str) -> str:
    for candidate in (os.path.join(folder, "vae"), folder):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise SftoolsError(f"{folder}: no VAE (vae/ with a config.json) found; pass --vae a Wan diffusers folder "
                       "or its vae/ folder, or write latents with -o OUT.safetensors")


def load_vae(vae_dir: str, device: torch.device, dtype: torch.dtype):
    """The Wan 2.1 `AutoencoderKLWan` of a diffusers folder (or its vae/ folder), on `device`, in eval mode."""
    from diffusers import AutoencoderKLWan

    folder = _vae_folder(vae_dir)
    try:
        vae = AutoencoderKLWan.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except Exception as exc:  # diffusers raises many types for broken folders; all are one line here
        raise SftoolsError(f"{folder}: cannot load the VAE ({str(exc).splitlines()[0]})") from None
    if vae.config.patch_size is not None:
        raise SftoolsError(f"{folder}: a patchified (Wan 2.2) VAE; sftools decodes the Wan 2.1 VAE")
    return vae.to(device).eval()


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[1, 3, frames, H, W] decoder output in [-1, 1] -> [frames, H, W, 3] uint8 (the rule above)."""
    scaled = (pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255
    return scaled.round().to(torch.uint8)[0].permute(1, 2, 3, 0).contiguous().cpu()


class StreamingDecoder:
    """Decodes a video's latents in any number of consecutive pieces, with exactly the pixels of
    `AutoencoderKLWan.decode` on the whole tensor.

    The Wan VAE decoder is causal in time: diffusers decodes one latent frame at a time and carries
    each causal conv's last input frames in a feature cache. Keeping that cache between calls makes
    decoding block by block the same computation. Bit for bit, that holds as far as the backend's
    1x1x1 `post_quant_conv` gives each position the same result whatever the block's length: torch's
    CPU conv does, except on inputs of under about a dozen positions (1 or 2 frames of 2x2 latents),
    where the last bit can differ. Spatial tiling is never enabled (diffusers' tiled decode restarts
    the cache per tile, so it cannot stream).
    """

    def __init__(self, vae_dir: str, device: torch.device, dtype: torch.dtype) -> None:
        self.vae = load_vae(vae_dir, device, dtype)
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        # As WanPipeline: latents / (1 / std) + mean, in the VAE's dtype.
        self._inv_std = (1.0 / torch.tensor(config.latents_std).view(shape)).to(device, dtype)
        self._mean = torch.tensor(config.latents_mean).view(shape).to(device, dtype)
        self.vae.clear_cache()
        self._first = True
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next latent frames [1, 16, n, h, w] (normalized, as the transformer makes them) ->
        their pixel frames, uint8 [frames, H, W, 3]: 1 for the video's first latent frame, 4 for
        every other."""
        z_dim = self.vae.config.z_dim
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != z_dim or latents.shape[2] == 0:
            raise SftoolsError(f"latents of shape {list(latents.shape)}; the VAE decodes [1, {z_dim}, frames, h, w]")
        z = latents.to(self.device, self.dtype) / self._inv_std + self._mean
        # The coupling to diffusers' private decode loop (AutoencoderKLWan._decode, as read in 0.42.1;
        # the streaming-equals-whole test guards it):
        # post_quant_conv, then `decoder` on one latent frame at a time with `feat_cache=_feat_map`
        # and `feat_idx=_conv_idx` reset to [0] per frame, `first_chunk=True` for frame 0 only;
        # `clear_cache()` (called once, in __init__) empties `_feat_map`. _decode clears the cache
        # at its start and end, which is why it is not called here.
        vae = self.vae
        x = vae.post_quant_conv(z)
        frames = []
        for i in range(x.shape[2]):
            vae._conv_idx = [0]
            frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                      first_chunk=self._first))
            self._first = False
        return to_uint8(torch.clamp(torch.cat(frames, 2), -1.0, 1.0))


def _codec() -> str:
    """H.264 where PyAV's ffmpeg has it (its wheels do), MPEG-4 part 2 otherwise."""
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


class Mp4Writer:
    """`with Mp4Writer(path, fps) as w: w.append(frames)`: encodes each batch of uint8 frames
    [n, H, W, 3] as it comes (memory stays flat), into a temporary file beside `path` that becomes
    `path` only when the block ends without an exception."""

    CRF = "18"  # x264: visually lossless for generated video, a few MB per 5 s at 832x480

    def __init__(self, path: str, fps: int = 16) -> None:
        self.path, self.fps = path, fps
        self.frames = 0
        self._stack: contextlib.ExitStack | None = None
        self._container = None
        self._stream = None

    def __enter__(self) -> "Mp4Writer":
        import av

        with contextlib.ExitStack() as stack:  # if opening fails, the temporary file goes at once
            tmp = stack.enter_context(atomic_target(self.path))
            self._container = av.open(tmp, mode="w", format="mp4")  # the temporary name has no .mp4 to infer from
            self._stack = stack.pop_all()
        return self

    def _open_stream(self, height: int, width: int):
        if height % 2 or width % 2:
            raise SftoolsError(f"{self.path}: frames are {width}x{height}; "
                               "mp4 (yuv420p) needs an even width and height")
        codec = _codec()
        options = {"crf": self.CRF} if codec == "libx264" else {}
        stream = self._container.add_stream(codec, rate=self.fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec != "libx264":
            stream.bit_rate = 2 * width * height * self.fps  # about 2 bits a pixel: no visible blocks
        return stream

    def append(self, frames: torch.Tensor | np.ndarray) -> None:
        import av

        array = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
            raise SftoolsError(f"{self.path}: frames must be uint8 [n, H, W, 3], got {array.dtype} {list(array.shape)}")
        if self._stream is None:
            self._stream = self._open_stream(array.shape[1], array.shape[2])
        elif array.shape[1:3] != (self._stream.height, self._stream.width):
            raise SftoolsError(f"{self.path}: frames of {array.shape[2]}x{array.shape[1]} after "
                               f"{self._stream.width}x{self._stream.height} ones")
        for frame in array:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += len(array)

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack = self._stack
        if exc_type is not None:
            with contextlib.suppress(Exception):  # the error that stopped the writing is the one to report
                self._container.close()
            return stack.__exit__(exc_type, exc, tb)  # removes the temporary file, lets the error through
        with stack:  # renames the finished file into place, or removes it if finishing fails
            if self._stream is None:
                self._container.close()
                raise SftoolsError(f"{self.path}: no frames were written")
            self._container.mux(self._stream.encode(None))  # flush the frames the encoder holds back
            self._container.close()
        return False


def write_latents(path: str, latents: torch.Tensor, metadata: dict[str, str] | None = None) -> None:
    """`latents` [1, 16, frames, h, w] as float32 in the safetensors file `path` (atomic, verified)."""
    if latents.dim() != 5 or latents.shape[0] != 1:
        raise SftoolsError(f"{path}: latents of shape {list(latents.shape)}; expected [1, channels, frames, h, w]")
    value = latents.detach().to("cpu", torch.float32).contiguous()
    write_file(path, {"latents": LazyTensor.of(value)},
               {"format": "pt", "sftools.version": __version__, **(metadata or {})}, desc="writing latents")
