"""A whole sampling run, from files to a file: prompt embeddings, the model with its LoRAs (and a
VACE add-on with its control context), the draws, the block loop, and the output (latents as
safetensors, or an mp4 decoded and appended block by block so memory does not grow with the video). `sftools sample`, `verify` and the demo call this."""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass, field

import torch

from sftools import __version__
from sftools.devices import check_device_name, resolve_device
from sftools.errors import SettingsError, SftoolsError
from sftools.io.dtypes import torch_dtype
from sftools.io.output import check_destination, refuse_overwrite
from sftools.models.causal_wan import CausalWanModel
from sftools.sampling.causal import BlockDone, CausalSampler, prompt_tokens
from sftools.sampling.load import ModelPlan, default_dtype, load_transformer, plan_model
from sftools.sampling.noise import FileNoise, SeededNoise
from sftools.sampling.settings import SampleSettings
from sftools.sampling.text import encode_prompts, load_prompt_embeds
from sftools.sampling.vace_context import ControlSource, VaceContext, build_context
from sftools.sampling.video import Mp4Writer, StreamingDecoder, write_latents

OUTPUT_KINDS = (".safetensors", ".mp4")


@dataclass(frozen=True, kw_only=True)
class PromptSource:
    """Either text and a local umT5 folder, or a safetensors file of embeddings."""

    text: str | None = None
    negative: str | None = None
    text_encoder: str | None = None
    embeds_file: str | None = None

    def __post_init__(self) -> None:
        if self.embeds_file and (self.text or self.text_encoder):
            raise SettingsError("give --prompt-embeds FILE, or --prompt TEXT with --text-encoder DIR, not both")
        if not self.embeds_file and not (self.text and self.text_encoder):
            raise SettingsError("give --prompt TEXT with --text-encoder DIR (a local Wan diffusers folder), "
                                "or --prompt-embeds FILE")


@dataclass(frozen=True, kw_only=True)
class Runtime:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # bf16 | fp16 | fp32; None: bf16 on a GPU, fp32 on the CPU

    def __post_init__(self) -> None:
        check_device_name(self.device)

    def resolve(self) -> tuple[torch.device, torch.dtype]:
        device = resolve_device(self.device)
        return device, torch_dtype(self.dtype) if self.dtype else default_dtype(device)


@dataclass
class SampleReport:
    model: str
    output: str | None
    frames: int
    latent_frames: int
    block_seconds: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def prompt_embeddings(prompt: PromptSource, device: torch.device, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if prompt.embeds_file:
        return load_prompt_embeds(prompt.embeds_file)
    return encode_prompts(prompt.text_encoder, prompt.text, prompt.negative, device, dtype)


def generate(model: str | ModelPlan, settings: SampleSettings, context: torch.Tensor, negative: torch.Tensor | None,
             loras=(), select: str | None = None, noise_file: str | None = None,
             device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
             on_block=None, keep: bool = True, control: VaceContext | None = None) -> torch.Tensor | None:
    """The final latents of one run (None with `keep` False); the model is freed before returning.
    `control` is the VACE context a VACE model takes."""
    transformer, config = load_transformer(model, list(loras), select, device, dtype)
    h, w = settings.latent_size
    shape = (1, config.out_dim, settings.latent_frames, h, w)
    noise = FileNoise(noise_file, settings.steps, shape) if noise_file else SeededNoise(settings.seed, config.out_dim, h, w)
    sampler = CausalSampler(CausalWanModel(transformer), config, settings)
    latents = sampler.sample(context, noise, negative, on_block, keep, control)
    del sampler, transformer
    gc.collect()
    return latents


def check_output(output: str, inputs: list[str], vae: str | None) -> str:
    """'latents' or 'mp4', refusing before any work what could not be written."""
    kind = next((k for k in OUTPUT_KINDS if output.endswith(k)), None)
    if kind is None:
        raise SettingsError(f"-o {output}: name a .safetensors file (latents) or a .mp4 file (video, with --vae)")
    if kind == ".mp4" and not vae:
        raise SettingsError(f"-o {output}: an mp4 needs --vae DIR (a local Wan VAE or diffusers folder)")
    refuse_overwrite(output, [p for p in inputs if p])
    check_destination(output)
    return "mp4" if kind == ".mp4" else "latents"


def check_embeddings(model_path: str, plan: ModelPlan, settings: SampleSettings, prompt: PromptSource,
                     context: torch.Tensor, negative: torch.Tensor | None) -> None:
    if context.shape[-1] != plan.config.text_dim:
        raise SftoolsError(f"prompt embeddings are {context.shape[-1]} wide; the model takes {plan.config.text_dim}")
    used = [("prompt_embeds", "--prompt", context)]
    if negative is not None and settings.cfg != 1:  # the sampler ignores the negative at cfg 1
        used.append(("negative_prompt_embeds", "--negative-prompt", negative))
    for key, option, embeds in used:
        tokens = prompt_tokens(embeds)
        if tokens > plan.config.text_len:
            what = f"{prompt.embeds_file}: {key}" if prompt.embeds_file else option
            raise SftoolsError(f"{what} has {tokens} tokens; {model_path} takes {plan.config.text_len} (its text_len)")
    if settings.cfg != 1 and negative is None:
        raise SettingsError("--cfg other than 1 needs --negative-prompt or negative_prompt_embeds")


def check_vace(model_path: str, plan: ModelPlan, control: ControlSource | None, graft_option: str = "--vace") -> None:
    """A VACE model samples with a control and only a VACE model takes one (`graft_option`: the
    option that grafts an add-on onto this model, for the message)."""
    vace = plan.config.model_type == "vace"
    if vace and control is None:
        raise SftoolsError(f"{model_path}: is a VACE model; give --control CTRL.mp4 (with --vae) or a precomputed "
                           "vace_context .safetensors")
    if control is not None and not vace:
        raise SftoolsError(f"--control {control.control}: {model_path} has no VACE add-on; "
                           f"graft one with {graft_option} MODULE")


def sample_to_file(model_path: str, output: str, settings: SampleSettings, prompt: PromptSource,
                   loras: list[tuple[str, float]] = (), select: str | None = None, noise_file: str | None = None,
                   vae: str | None = None, runtime: Runtime = Runtime(), on_block=None,
                   vace: str | None = None, control: ControlSource | None = None) -> SampleReport:
    """`vace` is an add-on module grafted onto the model in memory; `control` the VACE control."""
    inputs = [model_path, noise_file, prompt.embeds_file, prompt.text_encoder, vae, vace, *(p for p, _ in loras),
              *(control.files if control else [])]
    kind = check_output(output, inputs, vae)
    if settings.cfg != 1 and prompt.text and prompt.negative is None:
        raise SettingsError("--cfg other than 1 needs --negative-prompt")
    plan = plan_model(model_path, list(loras), select, vace)
    refuse_overwrite(output, plan.files)  # the shards and LoRA files behind the paths given
    check_vace(model_path, plan, control)
    device, dtype = runtime.resolve()
    vace_context = None
    if control is not None:  # before the text encoder: a clip that does not fit costs no encoding
        vace_context = build_context(control, settings, vae, device).fitted(settings, plan.config.vace_in_dim)
    context, negative = prompt_embeddings(prompt, device, dtype)
    check_embeddings(model_path, plan, settings, prompt, context, negative)
    report = SampleReport(model_path, output, settings.frames, settings.latent_frames,
                          settings=dataclasses.asdict(settings))
    if control is not None:
        report.settings.update(control=dataclasses.asdict(control), reference_frames=vace_context.reference_frames)

    def done(block: BlockDone, writer=None, decoder=None) -> None:
        if writer is not None:
            writer.append(decoder.decode(block.latents))
        report.block_seconds.append(block.seconds)
        if on_block:
            on_block(block)

    if kind == "mp4":
        decoder = StreamingDecoder(vae, device, dtype)
        with Mp4Writer(output) as writer:
            generate(plan, settings, context, negative, noise_file=noise_file, device=device, dtype=dtype,
                     on_block=lambda b: done(b, writer, decoder), keep=False, control=vace_context)
    else:
        latents = generate(plan, settings, context, negative, noise_file=noise_file, device=device, dtype=dtype,
                           on_block=done, control=vace_context)
        write_latents(output, latents, {"sftools.source": os.path.basename(os.path.normpath(model_path)),
                                        "sftools.version": __version__})
    return report
