"""The settings of a sampling run and the presets for the recipes people run today.

Frozen, built by keyword, validated once: a value out of range raises `SettingsError`, which the
command line reports as a usage error naming the option. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sftools.errors import SettingsError

VAE_TIME_STRIDE, VAE_SPACE_STRIDE, TOKEN_STRIDE = 4, 8, 16  # Wan 2.1 VAE (4, 8, 8) and 2x2 patches: 16 px per token side
TEXT_LEN = 512  # umT5 context rows; Wan attends over all of them, padding included
ROPE_FRAMES = 1024  # rows of Wan's RoPE table: the last latent frame position there is


@dataclass(frozen=True, kw_only=True)
class SampleSettings:
    frames: int = 81  # video frames, 4k + 1
    height: int = 480
    width: int = 832
    frames_per_block: int | None = 3  # latent frames per block; None: all at once (bidirectional models)
    steps: int = 4
    shift: float = 5.0
    warp: bool = True  # see schedules: Self Forcing / ComfyUI warp the step list onto the shifted grid
    cfg: float = 1.0
    local_attn_frames: int | None = None  # rolling window in latent frames, the block being denoised included
    sink_frames: int = 0
    cache_frames: int | None = None  # without a window: the most latent frames the cache takes (None: all)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % VAE_TIME_STRIDE:
            raise SettingsError(f"--frames must be of the form 4k+1 (81, 161, ...), got {self.frames}")
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value < TOKEN_STRIDE or value % TOKEN_STRIDE:
                raise SettingsError(f"{name} must be a positive multiple of 16, got {value}")
        if self.frames_per_block is not None and self.frames_per_block < 1:
            raise SettingsError(f"--frames-per-block must be at least 1 or 'all', got {self.frames_per_block}")
        if self.steps < 1 or self.steps > 1000:
            raise SettingsError(f"--steps must be in 1..1000, got {self.steps}")
        if not 0 < self.shift < 1000 or not self.cfg >= 0:
            raise SettingsError(f"--shift must be positive and --cfg >= 0, got {self.shift} and {self.cfg}")
        if self.sink_frames < 0 or (self.cache_frames is not None and self.cache_frames < 1):
            raise SettingsError("--sink-frames must be >= 0 and --cache-frames >= 1")
        block = self.frames_per_block or self.latent_frames
        if self.local_attn_frames is not None:
            if self.local_attn_frames < block + self.sink_frames or self.local_attn_frames <= block:
                raise SettingsError(f"--local-attn-frames ({self.local_attn_frames}) must be more than the block "
                                    f"({block} frames) and at least the block plus --sink-frames ({self.sink_frames})")
        elif self.sink_frames:
            raise SettingsError("--sink-frames needs --local-attn-frames (sinks are kept by the rolling window)")
        elif self.cache_frames is not None and self.latent_frames > self.cache_frames and self.latent_frames > block:
            raise SettingsError(f"--frames {self.frames} needs {self.latent_frames} latent frames and the KV cache holds "
                                f"{self.cache_frames}; roll it with --local-attn-frames (e.g. {self.cache_frames}) "
                                "and --sink-frames, or raise --cache-frames")
        if self.latent_frames > ROPE_FRAMES:
            raise SettingsError(f"--frames {self.frames} needs {self.latent_frames} latent frames; Wan's RoPE table "
                                f"positions {ROPE_FRAMES} (4093 video frames)")

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TIME_STRIDE + 1

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_SPACE_STRIDE, self.width // VAE_SPACE_STRIDE

    @property
    def frame_tokens(self) -> int:
        return (self.height // TOKEN_STRIDE) * (self.width // TOKEN_STRIDE)


PRESETS: dict[str, dict] = {
    # guandeh17/Self-Forcing configs/self_forcing_dmd.yaml: 3 latent frames per block, [1000, 750, 500, 250]
    # warped with shift 5; the released checkpoint was trained on 21 latent frames (81 video frames).
    "self-forcing": dict(frames_per_block=3, steps=4, shift=5.0, warp=True, cfg=1.0, cache_frames=21),
    # Causal Forcing's frame-wise weights: the same sampler one latent frame at a time.
    "causal-forcing-framewise": dict(frames_per_block=1, steps=4, shift=5.0, warp=True, cfg=1.0, cache_frames=21),
    # lightx2v's bidirectional step/CFG-distilled models as ComfyUI runs them: all frames at once,
    # 4 steps of the `simple` scheduler at shift 8 with the `lcm` sampler (x0, then re-noise), cfg 1.
    "lightx2v": dict(frames_per_block=None, steps=4, shift=8.0, warp=True, cfg=1.0, cache_frames=None),
}


def from_preset(preset: str, **overrides) -> SampleSettings:
    """The preset's settings with every explicitly given value (not None) on top."""
    if preset not in PRESETS:
        raise SettingsError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("frames_per_block") == "all":
        given["frames_per_block"] = None
    if "local_attn_frames" in given:
        given.setdefault("cache_frames", None)  # a window bounds the cache itself
    return replace(SampleSettings(**PRESETS[preset]), **given) if given else SampleSettings(**PRESETS[preset])
