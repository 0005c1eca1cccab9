"""The causal sampler's cost per block: with the KV cache against a full recompute, and with a
rolling window far past its length, on one CPU run with a small model.

  cache      `CausalSampler` (4 steps + 1 refresh call per block, each over the block's own tokens,
             attending to the cached history);
  recompute  the same few-step loop without a cache: every call runs the whole video so far through
             diffusers' forward with the block-causal mask (`CausalWanModel.masked`), earlier blocks
             clean at t = 0, the current one at its t (no refresh call is needed);
  rolling    the cached sampler with --local-attn-frames W --sink-frames S out to 20 W latent frames,
             per-block time, and the peak RSS of fresh processes (`sftools sample`) at 2 W and 20 W.

    python bench/bench_sampler.py [--workdir bench/out]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.measure import run_sftools  # noqa: E402
from sftools.models.causal_wan import CausalWanModel  # noqa: E402
from sftools.models.kv_cache import visible_frames  # noqa: E402
from sftools.sampling.causal import CausalSampler, blocks, pad_context  # noqa: E402
from sftools.sampling.load import load_transformer  # noqa: E402
from sftools.sampling.noise import SeededNoise  # noqa: E402
from sftools.sampling.schedules import few_step_schedule  # noqa: E402
from sftools.sampling.settings import SampleSettings  # noqa: E402
from sftools.wan.config import WanConfig  # noqa: E402
from sftools.wan.tiny import random_state_dict, write_checkpoint  # noqa: E402

# Small, with the real head_dim: 4 heads x 128, 4 layers; 256x256 px is 256 tokens per latent frame.
SMALL = WanConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=4, text_dim=64, freq_dim=256)
SIZE = 256


def recompute(model: CausalWanModel, s: SampleSettings, context: torch.Tensor,
              noise: SeededNoise) -> tuple[list[float], torch.Tensor]:
    """Seconds per block of the cache-free loop, and its latents (equal to the cached sampler's)."""
    schedule, done, seconds = few_step_schedule(s.steps, s.shift), [], []
    visible = visible_frames(s.latent_frames, s.frames_per_block)
    for start, frames in blocks(s):
        began = time.perf_counter()
        x = noise.initial(start, frames)
        end = start + frames
        for i, step in enumerate(schedule):
            t = torch.tensor([[0.0] * start + [step.timestep] * frames])
            flow = model.masked(torch.cat([*done, x], 2), t, context, visible[:end, :end])[:, :, start:]
            x0 = (x.double() - step.sigma * flow.double()).float()
            if i + 1 < len(schedule):
                x = (1 - schedule[i + 1].sigma) * x0 + schedule[i + 1].sigma * noise.renoise(i, start, frames)
        done.append(x0)
        seconds.append(time.perf_counter() - began)
    return seconds, torch.cat(done, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.path.join(os.path.dirname(__file__), "out"))
    parser.add_argument("--window", type=int, default=6, help="rolling window, latent frames")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    path = write_checkpoint(os.path.join(args.workdir, "small.safetensors"), random_state_dict(SMALL, seed=0),
                            "original", SMALL)
    model, config = load_transformer(path)
    causal = CausalWanModel(model)
    embeds = torch.randn(1, 20, SMALL.text_dim, generator=torch.Generator().manual_seed(0))
    save_file({"prompt_embeds": embeds[0]}, os.path.join(args.workdir, "embeds.safetensors"))

    s = SampleSettings(frames=81, height=SIZE, width=SIZE, frames_per_block=3)  # 21 latent frames, 7 blocks
    noise = SeededNoise(0, 16, SIZE // 8, SIZE // 8)
    cached_seconds = []
    with torch.no_grad():
        cached = CausalSampler(causal, config, s).sample(embeds, noise, on_block=lambda b: cached_seconds.append(b.seconds))
        slow, again = recompute(causal, s, pad_context(embeds), noise)
    print("block  cache s  recompute s")
    for i, (a, b) in enumerate(zip(cached_seconds, slow)):
        print(f"{i + 1:5d}  {a:7.3f}  {b:11.3f}")

    w, sink = args.window, 1
    long = SampleSettings(frames=4 * (20 * w) - 3, height=SIZE, width=SIZE, frames_per_block=3, local_attn_frames=w,
                          sink_frames=sink)
    rolling_seconds = []
    with torch.no_grad():
        CausalSampler(causal, config, long).sample(embeds, noise, on_block=lambda b: rolling_seconds.append(b.seconds))
    q = len(rolling_seconds) // 4
    early, late = statistics.median(rolling_seconds[1:q + 1]), statistics.median(rolling_seconds[-q:])
    peaks = {}
    for multiple in (2, 20):
        frames = 4 * (multiple * w) - 3
        _, peaks[multiple] = run_sftools("sample", path, "--prompt-embeds", os.path.join(args.workdir, "embeds.safetensors"),
                                         "--frames", str(frames), "--height", str(SIZE), "--width", str(SIZE),
                                         "--local-attn-frames", str(w), "--sink-frames", str(sink), "-o",
                                         os.path.join(args.workdir, f"rolling{multiple}.safetensors"))

    print(f"\nsmall model: dim {SMALL.dim} ({SMALL.num_heads} x 128 heads), {SMALL.num_layers} layers, {SIZE}x{SIZE} px "
          f"({s.frame_tokens} tokens per latent frame), 4 steps, 3 latent frames per block, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"cache vs recompute: the same latents (max |diff| {float((cached - again).abs().max()):.1e}, "
          f"scale {float(cached.abs().max()):.1f})")
    print(f"block 1 -> 7, cache:     {cached_seconds[0]:.3f} s -> {cached_seconds[-1]:.3f} s "
          f"(x{cached_seconds[-1] / cached_seconds[0]:.2f})")
    print(f"block 1 -> 7, recompute: {slow[0]:.3f} s -> {slow[-1]:.3f} s (x{slow[-1] / slow[0]:.2f})")
    print(f"speed-up at block 7: {slow[-1] / cached_seconds[-1]:.1f}x; whole 7-block video: "
          f"{sum(slow) / sum(cached_seconds):.1f}x")
    print(f"rolling window {w} (sink {sink}) to {long.latent_frames} latent frames ({long.latent_frames // w}x): "
          f"median s/block, second block to first quarter {early:.3f}, last quarter {late:.3f} (x{late / early:.2f})")
    print(f"peak RSS of `sftools sample`: {peaks[2] / 1e6:.0f} MB at {2 * w} latent frames, {peaks[20] / 1e6:.0f} MB at "
          f"{20 * w} (x{peaks[20] / peaks[2]:.2f})")


if __name__ == "__main__":
    main()
