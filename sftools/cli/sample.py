"""sftools sample (and the sampling options `verify` shares)."""

from __future__ import annotations

import functools

import click

from sftools.cli.common import JSON_OPTION, emit
from sftools.cli.inspect_cmd import SELECT_HELP
from sftools.io.dtypes import FLOAT_NAMES

PRESET_NAMES = ("self-forcing", "causal-forcing-framewise", "lightx2v")  # sampling.settings.PRESETS, checked by a test


def _block_size(value: str | None) -> int | str | None:
    if value is None or value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of latent frames or 'all'") from None


def sampling_options(command):
    """The flags every sampling command takes; explicit ones override the preset."""
    options = [
        click.option("--select", metavar="NAME", help=SELECT_HELP),
        click.option("--prompt", help="The text prompt (needs --text-encoder)."),
        click.option("--negative-prompt", help="The negative prompt (used with --cfg other than 1)."),
        click.option("--text-encoder", metavar="DIR", help="Local Wan diffusers folder (text_encoder/ + tokenizer/) for umT5."),
        click.option("--prompt-embeds", metavar="FILE", help="safetensors with prompt_embeds [tokens, dim] (and "
                     "negative_prompt_embeds), instead of --prompt and --text-encoder."),
        click.option("--frames", type=int, default=81, show_default=True, help="Video frames, 4k+1 (latent frames: (N-1)/4+1)."),
        click.option("--height", type=int, default=480, show_default=True, help="Pixels, a multiple of 16."),
        click.option("--width", type=int, default=832, show_default=True, help="Pixels, a multiple of 16."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of every draw (a shorter video's noise is a prefix of a longer one's)."),
        click.option("--preset", type=click.Choice(PRESET_NAMES), default="self-forcing", show_default=True,
                     help="self-forcing: causal, 3 frames per block, 4 warped steps, shift 5; causal-forcing-framewise: 1 frame "
                          "per block; lightx2v: bidirectional, 4 steps, shift 8, cfg 1 (ComfyUI simple + lcm)."),
        click.option("--steps", type=int, help="Denoising steps (preset: 4)."),
        click.option("--shift", type=float, help="Flow shift of the schedule (preset: 5, lightx2v 8)."),
        click.option("--cfg", type=float, help="Classifier-free guidance scale (preset: 1 = off)."),
        click.option("--frames-per-block", "frames_per_block", callback=lambda c, p, v: _block_size(v), metavar="N|all",
                     help="Latent frames per causal block (preset: 3), or all for bidirectional models."),
        click.option("--local-attn-frames", type=int, help="Rolling KV window in latent frames, the current block included."),
        click.option("--sink-frames", type=int, help="First latent frames the rolling window always keeps (attention sinks)."),
        click.option("--cache-frames", type=int, help="Without a window, the most latent frames the cache takes "
                     "(preset self-forcing: 21, what it was trained on)."),
        click.option("--noise", "noise_file", metavar="FILE", help="safetensors with every draw: noise [1,16,T,h,w] and "
                     "renoise [steps-1,1,16,T,h,w] (float32)."),
        click.option("--vae", metavar="DIR", help="Local Wan VAE (or diffusers) folder: decode to pixels."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--dtype", type=click.Choice(FLOAT_NAMES), help="Model dtype (default bf16 on a GPU, fp32 on the CPU)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def build(kw: dict):
    """Settings, prompt and runtime from the shared options (consumed from `kw`)."""
    from sftools.sampling.run import PromptSource, Runtime
    from sftools.sampling.settings import from_preset

    settings = from_preset(kw.pop("preset"), **{k: kw.pop(k) for k in (
        "frames", "height", "width", "seed", "steps", "shift", "cfg", "frames_per_block", "local_attn_frames",
        "sink_frames", "cache_frames")})
    prompt = PromptSource(text=kw.pop("prompt"), negative=kw.pop("negative_prompt"), text_encoder=kw.pop("text_encoder"),
                          embeds_file=kw.pop("prompt_embeds"))
    return settings, prompt, Runtime(device=kw.pop("device"), dtype=kw.pop("dtype"))


def lora_args(values) -> list[tuple[str, float]]:
    from sftools.lora.merge import parse_lora_arg

    return [parse_lora_arg(v) for v in values]


VACE_OPTION = click.option("--vace", "vace_module", metavar="MODULE", help="A VACE add-on module (vace_* keys) "
                           "grafted onto MODEL in memory.")


def control_options(command):
    """The VACE control (sample, and verify for both models)."""
    options = [
        click.option("--control", metavar="CTRL.mp4|CTRL.safetensors", help="VACE control video (encoded with --vae; "
                     "at least --frames frames of --width x --height), or a precomputed vace_context [96, F, h, w]."),
        click.option("--control-mask", metavar="MASK.mp4", help="Mask video for --control: white is generated, black "
                     "kept from the control (default: all white)."),
        click.option("--reference-image", "reference_images", multiple=True, metavar="IMAGE",
                     help="Reference image for a control video (repeatable); enters as clean frames before the video."),
        click.option("--control-scale", type=float, default=None,
                     help="Strength of the VACE hints (diffusers' conditioning_scale; default 1.0)."),
    ]
    return functools.reduce(lambda cmd, option: option(cmd), reversed(options), command)


def control_source(kw: dict):
    """The VACE control from the options (consumed from `kw`), or None without --control."""
    from sftools.errors import SettingsError
    from sftools.sampling.vace_context import ControlSource

    control, mask, references, scale = (kw.pop(k) for k in ("control", "control_mask", "reference_images",
                                                              "control_scale"))
    if control is None:
        if mask or references or scale is not None:
            raise SettingsError("--control-mask, --reference-image and --control-scale go with --control")
        return None
    return ControlSource(control=control, mask=mask, reference_images=tuple(references),
                         scale=1.0 if scale is None else scale)


@click.command("sample", short_help="Generate with the causal KV-cache sampler.")
@click.argument("model")
@click.option("--lora", "loras", multiple=True, metavar="LORA[:STRENGTH]", help="Merge a LoRA at load (repeatable; strength 1.0).")
@VACE_OPTION
@control_options
@sampling_options
@click.option("-o", "--output", required=True, metavar="OUT.safetensors|OUT.mp4",
              help="latents [1,16,T,H/8,W/8] as safetensors, or an mp4 decoded block by block (needs --vae).")
@JSON_OPTION
def sample_cmd(model, loras, output, as_json, vace_module, **kw) -> None:
    """Generate from MODEL (any form sftools reads) block by block with a KV cache, as Self Forcing
    does; with --local-attn-frames the cache rolls, so videos far longer than the training window
    cost the same per block. A VACE model (or MODEL with --vace MODULE) follows --control."""
    from sftools.io.output import progress
    from sftools.sampling.causal import blocks
    from sftools.sampling.run import sample_to_file

    control = control_source(kw)
    settings, prompt, runtime = build(kw)
    with progress(len(blocks(settings)), "sampling", unit="block") as bar:
        def tick(block) -> None:
            bar.set_postfix_str(f"{block.seconds:.2f} s/block")
            bar.update(1)

        report = sample_to_file(model, output, settings, prompt, lora_args(loras), kw["select"], kw["noise_file"],
                                kw["vae"], runtime, tick, vace=vace_module, control=control)
    seconds = report.block_seconds
    emit(vars(report), as_json, [f"{output}: {report.frames} frames ({report.latent_frames} latent) in {len(seconds)} "
                                 f"blocks, {sum(seconds):.1f} s ({sum(seconds) / len(seconds):.2f} s per block)"])
