"""Causal VACE sampling, value by value: the KV cache (the VACE blocks' own included) against a masked
recompute, control scale 0 against the base model, the one-block path against diffusers'
`WanVACETransformer3DModel`, the VACE context against diffusers' `WanVACEPipeline`, and the command line."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, WanVACETransformer3DModel
from PIL import Image
from safetensors.torch import load_file, save_file

from cli_runner import run
from draws import Draws
from sftools.models.causal_wan import CausalWanModel
from sftools.models.kv_cache import visible_frames
from sftools.sampling.causal import CausalSampler, blocks, cache_spec, pad_context
from sftools.sampling.load import load_transformer
from sftools.sampling.noise import SeededNoise
from sftools.sampling.schedules import few_step_schedule
from sftools.sampling.settings import SampleSettings
from sftools.sampling.vace_context import ControlSource, VaceContext, build_context, encode_context
from sftools.sampling.video import Mp4Writer
from sftools.wan.config import TINY_VACE, diffusers_config
from sftools.wan.tiny import random_state_dict, write_checkpoint
from sftools.wan.tiny_parts import write_tiny_vae

BASE = replace(TINY_VACE, model_type="t2v", vace_layers=())
SIZE = ["--height", "64", "--width", "64"]


def settings(latent_frames=9, **kw) -> SampleSettings:
    return SampleSettings(frames=4 * (latent_frames - 1) + 1, height=64, width=64, **kw)


def embeds(seed=2):
    return torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(seed))


def context(latent_frames: int, references: int = 0, scale: float = 1.0, seed: int = 4) -> VaceContext:
    """A random VACE context; reference frames as diffusers makes them: [latent, zeros], zero masks."""
    latents = torch.randn(1, 96, references + latent_frames, 8, 8, generator=torch.Generator().manual_seed(seed))
    latents[:, 16:, :references] = 0
    return VaceContext(latents, references, scale)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vace")
    state = random_state_dict(TINY_VACE, seed=3)
    base = {k: v for k, v in state.items() if not k.startswith("vace_")}
    save_file({k: v.contiguous() for k, v in state.items() if k.startswith("vace_")}, str(d / "module.safetensors"))
    save_file({"prompt_embeds": embeds()[0]}, str(d / "embeds.safetensors"))
    return {"dir": d, "state": state, "embeds": str(d / "embeds.safetensors"), "module": str(d / "module.safetensors"),
            "vace": write_checkpoint(str(d / "vace.safetensors"), state, "original", TINY_VACE),
            "base": write_checkpoint(str(d / "base.safetensors"), base, "original", BASE)}


@pytest.fixture(scope="module")
def vace(files):
    transformer, config = load_transformer(files["vace"])
    return CausalWanModel(transformer), config


def diffusers_model() -> WanVACETransformer3DModel:
    """diffusers' own tiny VACE model, no sftools processor or hook in it."""
    return WanVACETransformer3DModel(**{k: v for k, v in diffusers_config(TINY_VACE).items()
                                        if not k.startswith("_")}).eval()


@pytest.fixture(scope="module")
def diffusers_vace(vace):
    reference = diffusers_model()
    reference.load_state_dict(vace[0].transformer.state_dict())
    return reference


def masked_recompute(model: CausalWanModel, s: SampleSettings, draws, control: VaceContext, negative=None):
    """Sample with NO cache: every call runs the whole sequence so far (the reference latents and the
    clean x0 of earlier blocks at t = 0, the block at its t) through one masked parallel forward."""
    refs = control.reference_frames
    window = s.local_attn_frames + refs if s.local_attn_frames else None
    visible = visible_frames(refs + s.latent_frames, s.frames_per_block or s.latent_frames, window,
                             s.sink_frames + refs, prefix=refs)
    schedule, done = few_step_schedule(s.steps, s.shift, s.warp), [control.references()]
    for start, frames in blocks(s):
        x, before, end = draws.initial(start, frames), refs + start, refs + start + frames
        for i, step in enumerate(schedule):
            seq, t = torch.cat([*done, x], 2), torch.tensor([[0.0] * before + [step.timestep] * frames])

            def flow(prompt):
                return model.masked(seq, t, pad_context(prompt), visible[:end, :end], control.latents[:, :, :end],
                                    control.scale)[:, :, before:]

            f = flow(embeds())
            if negative is not None:
                uncond = flow(negative)
                f = uncond + s.cfg * (f - uncond)
            x0 = (x.double() - step.sigma * f.double()).float()
            if i + 1 < len(schedule):
                x = (1 - schedule[i + 1].sigma) * x0 + schedule[i + 1].sigma * draws.renoise(i, start, frames)
        done.append(x0)
    return torch.cat(done[1:], 2)


@pytest.mark.parametrize("latent_frames,per_block,refs,window,sink,cfg", [
    (9, 3, 0, None, 0, 1.0), (9, 3, 1, None, 0, 3.0), (12, 3, 2, 7, 1, 1.0), (12, 3, 0, 6, 0, 1.0),
    (5, None, 1, None, 0, 1.0),
], ids=["causal", "reference+cfg", "2-references+rolling", "rolling", "one-block+reference"])
def test_kv_cached_vace_sampling_equals_a_masked_recompute(vace, latent_frames, per_block, refs, window, sink, cfg):
    model, config = vace
    s = settings(latent_frames, frames_per_block=per_block, local_attn_frames=window, sink_frames=sink, cfg=cfg)
    draws, control = Draws(s), context(latent_frames, refs)
    negative = embeds(9) if cfg != 1 else None
    cached = CausalSampler(model, config, s).sample(embeds(), draws, negative, control=control)
    caches = model.state.self_kv["cond"]
    assert len(caches) == 4 + 2 and all(c.k is not None for c in caches[4:])  # the VACE blocks' own caches were used
    with torch.no_grad():
        again = masked_recompute(model, s, draws, control, negative)
    assert torch.allclose(cached, again, atol=1e-5, rtol=0), (cached - again).abs().max()
    no_hints = CausalSampler(model, config, s).sample(embeds(), draws, negative, control=replace(control, scale=0.0))
    assert not torch.allclose(cached, no_hints, atol=1e-3)  # the control did steer it


def test_reference_frames_sit_in_front_of_the_window_as_sinks():
    s = settings(12, local_attn_frames=7, sink_frames=1)
    assert cache_spec(s, 2) == replace(cache_spec(s), capacity_frames=9, sink_frames=3)
    assert cache_spec(settings(9), 2).capacity_frames == 11
    visible = visible_frames(14, 3, 9, 3, prefix=2)
    assert visible[:2, :2].all() and not visible[:2, 2:].any()  # the references are one block, first
    assert visible[11:, :2].all()  # the last block still sees them after the window rolled


@pytest.mark.parametrize("per_block", [3, None], ids=["causal", "one-block"])
def test_control_scale_zero_samples_exactly_the_base_model(vace, files, per_block):
    model, config = vace
    base, base_config = load_transformer(files["base"])
    s = settings(6, frames_per_block=per_block)
    plain = CausalSampler(CausalWanModel(base), base_config, s).sample(embeds(), SeededNoise(1, 16, 8, 8))
    muted = CausalSampler(model, config, s).sample(embeds(), SeededNoise(1, 16, 8, 8), control=context(6, scale=0.0))
    assert torch.equal(plain, muted)


def test_the_one_block_path_is_diffusers_vace_forward(vace, diffusers_vace):
    model, config = vace
    x, c, t = torch.randn(1, 16, 3, 8, 8), context(3).latents, torch.tensor([700.0])
    scales = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        ours = model.bidirectional(x, t, pad_context(embeds()), c, scales)
        theirs = diffusers_vace(hidden_states=x, timestep=t, encoder_hidden_states=pad_context(embeds()),
                                control_hidden_states=c, control_hidden_states_scale=scales, return_dict=False)[0]
    assert torch.equal(ours, theirs)
    s = settings(5, frames_per_block=None, shift=8.0)
    draws, control = Draws(s), context(5, scale=0.8)
    sampled = CausalSampler(model, config, s).sample(embeds(), draws, control=control)
    x, schedule = draws.initial(0, 5), few_step_schedule(4, 8.0)
    with torch.no_grad():
        for i, step in enumerate(schedule):
            flow = diffusers_vace(hidden_states=x, timestep=torch.tensor([step.timestep]),
                                  encoder_hidden_states=pad_context(embeds()), control_hidden_states=control.latents,
                                  control_hidden_states_scale=torch.full((2,), 0.8), return_dict=False)[0]
            x0 = (x.double() - step.sigma * flow.double()).float()
            if i + 1 < len(schedule):
                x = (1 - schedule[i + 1].sigma) * x0 + schedule[i + 1].sigma * draws.renoise(i, 0, 5)
    assert torch.equal(sampled, x0)


def test_gradient_checkpointing_gives_the_same_gradients_with_control(files):
    transformer, _ = load_transformer(files["vace"])
    model = CausalWanModel(transformer.requires_grad_(True))
    x = torch.randn(1, 16, 3, 8, 8, requires_grad=True)
    t, ctx = torch.tensor([[900.0, 500.0, 0.0]]), pad_context(embeds())  # per-frame timesteps: diffusers' VACE has none
    grads = []
    for checkpointing in (False, True):
        transformer.gradient_checkpointing = checkpointing
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        # Two calls before one backward (a critic's cond and uncond): each keeps its own hints.
        loss = model.bidirectional(x, t, ctx, context(3).latents).square().sum()
        loss = loss + model.bidirectional(x, t, ctx, context(3, seed=5).latents, 0.5).sum()
        loss.backward()
        grads.append((x.grad.clone(), transformer.vace_blocks[1].attn1.to_q.weight.grad.clone()))
        x.grad = None
        transformer.zero_grad()
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(*grads))


def test_masked_calls_train_the_same_with_gradient_checkpointing_on(files):
    # A masked call (ODE regression, teacher forcing) is not checkpointed: a recompute in the backward
    # would run without its mask. With checkpointing enabled it still trains, to the same gradients.
    transformer, _ = load_transformer(files["vace"])
    model = CausalWanModel(transformer.requires_grad_(True))
    x = torch.randn(1, 16, 4, 8, 8)
    t, ctx = torch.tensor([[900.0, 900.0, 500.0, 500.0]]), pad_context(embeds())
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        model.masked(x, t, ctx, visible_frames(4, 2), context(4).latents).square().sum().backward()
        grads.append(transformer.vace_blocks[1].attn1.to_q.weight.grad.clone())
        transformer.zero_grad()
    assert transformer.gradient_checkpointing and torch.equal(grads[0], grads[1])


def test_model_calls_refuse_a_missing_or_unwanted_control(vace, files):
    model, _ = vace
    x, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0])
    with torch.no_grad(), pytest.raises(ValueError, match="needs `control`"):
        model.bidirectional(x, t, pad_context(embeds()))
    base = CausalWanModel(load_transformer(files["base"])[0])
    with torch.no_grad(), pytest.raises(ValueError, match="without a VACE add-on"):
        base.bidirectional(x, t, pad_context(embeds()), context(3).latents)


# --- the VACE context -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    folder = write_tiny_vae(str(tmp_path_factory.mktemp("vae")))
    return folder, AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae")).eval()


def pictures(count, height, width, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def test_the_context_is_the_one_diffusers_vace_pipeline_feeds_its_transformer(tiny_vae):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    _, vae = tiny_vae
    transformer = diffusers_model()
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.update(c=kw["control_hidden_states"]), with_kwargs=True)
    rng = np.random.default_rng(1)
    frames = pictures(9, 32, 48)
    mask = [Image.fromarray(((rng.random((32, 48)) > 0.5) * 255).astype(np.uint8)).convert("RGB") for _ in range(9)]
    references = pictures(2, 20, 30, seed=2)  # another shape: scaled to fit, centred on white
    pipe(video=frames, mask=mask, reference_images=references, prompt_embeds=torch.randn(1, 8, 32), height=32,
         width=48, num_frames=9, num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    assert torch.equal(encode_context(vae, frames, mask, references, 32, 48), seen["c"])


def test_context_channels_are_inactive_reactive_and_the_unshuffled_mask(tiny_vae):
    _, vae = tiny_vae
    frames = pictures(5, 32, 32)
    y, x = np.mgrid[:32, :32]
    binary = ((3 * y + 5 * x + 7 * (y // 8)) % 4 == 0).astype(np.uint8)  # varies inside each 8x8 block
    mask = [Image.fromarray(binary * 255).convert("RGB")] * 5
    references = pictures(2, 32, 32, seed=3)
    got = encode_context(vae, frames, mask, references, 32, 32)
    assert got.shape == (1, 96, 2 + 2, 4, 4)

    shape = (1, 16, 1, 1, 1)
    mean, std = torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)

    def encode(pixels):  # [frames, H, W, 3] in [-1, 1] -> normalised latents
        with torch.no_grad():
            z = vae.encode(torch.as_tensor(pixels).permute(3, 0, 1, 2)[None].float()).latent_dist.mode()
        return (z - mean) / std

    video = np.stack([np.asarray(f, dtype=np.float32) / 127.5 - 1 for f in frames])
    m = binary[None, :, :, None].astype(np.float32)
    assert torch.allclose(got[:, :16, 2:], encode(video * (1 - m)), atol=1e-4)  # inactive: kept where the mask is 0
    assert torch.allclose(got[:, 16:32, 2:], encode(video * m), atol=1e-4)  # reactive: generated where it is 1
    unshuffled = torch.nn.functional.pixel_unshuffle(torch.as_tensor(binary, dtype=torch.float32)[None, None], 8)[0]
    assert all(torch.equal(got[0, 32:, f], unshuffled) for f in (2, 3))  # channel 32 + 8 dy + dx at block (by, bx)
    for frame, ref in ((0, references[1]), (1, references[0])):  # prepended in turn: the last one first
        latent = encode(np.asarray(ref, dtype=np.float32)[None] / 127.5 - 1)
        assert torch.allclose(got[:, :16, frame], latent[:, :, 0], atol=1e-4)
        assert not got[:, 16:, frame].any()  # no reactive part, zero masks


# --- the command line -------------------------------------------------------------------------------

def write_clip(path, frames, height=64, width=64):
    with Mp4Writer(str(path)) as writer:
        writer.append(np.stack([np.asarray(p) for p in pictures(frames, height, width)]))
    return str(path)


def test_sampling_with_a_precomputed_context_writes_what_the_library_samples(files, vace, capsys, tmp_path):
    model, config = vace
    control = context(5)
    save_file({"vace_context": control.latents[0]}, str(tmp_path / "ctx.safetensors"))
    out = tmp_path / "latents.safetensors"
    code, _, err = run(capsys, "sample", files["vace"], "--prompt-embeds", files["embeds"], "--frames", "17", *SIZE,
                       "--control", str(tmp_path / "ctx.safetensors"), "--control-scale", "0.7", "-o", str(out))
    assert code == 0, err
    expected = CausalSampler(model, config, settings(5)).sample(embeds(), SeededNoise(0, 16, 8, 8),
                                                                 control=replace(control, scale=0.7))
    assert torch.equal(load_file(str(out))["latents"], expected)


def test_a_module_given_with_vace_samples_like_the_grafted_model(files, capsys, tmp_path):
    control = context(5, references=1)
    save_file({"vace_context": control.latents}, str(tmp_path / "ctx.safetensors"), {"sftools.reference_frames": "1"})
    common = ["--prompt-embeds", files["embeds"], "--frames", "17", *SIZE,
              "--control", str(tmp_path / "ctx.safetensors")]
    code, _, err = run(capsys, "sample", files["base"], "--vace", files["module"], *common,
                       "-o", str(tmp_path / "a.safetensors"))
    assert code == 0, err
    assert run(capsys, "sample", files["vace"], *common, "-o", str(tmp_path / "b.safetensors"))[0] == 0
    a, b = (load_file(str(tmp_path / n))["latents"] for n in ("a.safetensors", "b.safetensors"))
    assert a.shape == (1, 16, 5, 8, 8) and torch.equal(a, b)


def test_a_control_video_with_a_reference_image_is_encoded_as_the_library_encodes_it(files, vace, tiny_vae, capsys,
                                                                                     tmp_path):
    model, config = vace
    vae_dir, _ = tiny_vae
    clip, ref = write_clip(tmp_path / "ctrl.mp4", 21), str(tmp_path / "ref.png")
    pictures(1, 40, 24, seed=7)[0].save(ref)
    out = tmp_path / "latents.safetensors"
    code, _, err = run(capsys, "sample", files["vace"], "--prompt-embeds", files["embeds"], "--frames", "17", *SIZE,
                       "--control", clip, "--reference-image", ref, "--vae", vae_dir, "-o", str(out))
    assert code == 0, err
    s = settings(5)
    control = build_context(ControlSource(control=clip, reference_images=(ref,)), s, vae_dir, torch.device("cpu"))
    assert control.reference_frames == 1 and control.latents.shape == (1, 96, 1 + 5, 8, 8)  # 21 frames cut to 17
    expected = CausalSampler(model, config, s).sample(embeds(), SeededNoise(0, 16, 8, 8), control=control.fitted(s, 96))
    assert torch.equal(load_file(str(out))["latents"], expected)


@pytest.mark.parametrize("model,extra,message", [
    ("vace", [], "is a VACE model; give --control"),
    ("base", ["--control", "{ctx5}"], "has no VACE add-on"),
    ("vace", ["--control", "{ctx2}"], "covers 2 latent frames; --frames 17 needs 5"),
    ("vace", ["--control", "{ctx_small}"], "is 6x6 latents (48x48 pixels); this run makes 64x64"),
    ("vace", ["--control", "{ctx_c64}"], "the VACE context has 64 channels; the model takes 96"),
    ("vace", ["--control", "{short_mp4}", "--vae", "{vae}"], "has 9 frames; --frames 17 needs at least 17"),
    ("vace", ["--control", "{small_mp4}", "--vae", "{vae}"], "frames are 48x48; this run makes 64x64"),
    ("base", ["--vace", "{base}", "--control", "{ctx5}"], "holds no VACE add-on"),
    ("base", ["--vace", "{narrow}", "--control", "{ctx5}"], "is not a whole VACE add-on: mismatched"),
    ("vace", ["--vace", "{module}", "--control", "{ctx5}"], "already holds a VACE add-on"),
])
def test_vace_refusals_are_one_line_exit_1_and_no_output(files, tiny_vae, capsys, tmp_path, model, extra, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, frames, size, channels in (("ctx5", 5, 8, 96), ("ctx2", 2, 8, 96), ("ctx_small", 5, 6, 96),
                                         ("ctx_c64", 5, 8, 64)):
        save_file({"vace_context": torch.zeros(channels, frames, size, size)}, str(inputs / f"{name}.safetensors"))
    narrow = {k: v[:16].contiguous() if k == "vace_patch_embedding.weight" else v
              for k, v in load_file(files["module"]).items()}
    save_file(narrow, str(inputs / "narrow.safetensors"))
    fill = {**files, "vae": tiny_vae[0], "short_mp4": write_clip(inputs / "short.mp4", 9),
            "small_mp4": write_clip(inputs / "small.mp4", 17, 48, 48),
            **{n: str(inputs / f"{n}.safetensors") for n in ("ctx5", "ctx2", "ctx_small", "ctx_c64", "narrow")}}
    out = tmp_path / "out.safetensors"
    code, text, err = run(capsys, "sample", files[model], "--prompt-embeds", files["embeds"], "--frames", "17", *SIZE,
                          *[e.format(**fill) for e in extra], "-o", str(out))
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and text == "" and sorted(os.listdir(tmp_path)) == ["inputs"]


def test_control_options_without_a_control_are_a_usage_error(files, capsys, tmp_path):
    code, _, err = run(capsys, "sample", files["base"], "--prompt-embeds", files["embeds"], "--control-scale", "0.5",
                       "-o", str(tmp_path / "out.safetensors"))
    assert code == 2 and "--control-scale go with --control" in err and not os.listdir(tmp_path), err


def test_verify_compares_vace_models_under_one_control(files, capsys, tmp_path):
    control = context(5, references=1)
    save_file({"vace_context": control.latents}, str(tmp_path / "ctx.safetensors"), {"sftools.reference_frames": "1"})
    changed = {k: v + 0.05 if k.startswith("vace_blocks.0.") and v.dim() == 2 else v
               for k, v in load_file(files["module"]).items()}
    save_file(changed, str(tmp_path / "changed.safetensors"))
    common = ["--prompt-embeds", files["embeds"], "--frames", "17", *SIZE, "--control", str(tmp_path / "ctx.safetensors"),
              "--control-scale", "0.7", "--json"]
    code, text, err = run(capsys, "verify", files["vace"], files["base"], "--candidate-vace", files["module"], *common)
    assert code == 0, err
    assert json.loads(text)["psnr_db"] == [None] * 5  # the grafted file and base + --vace: the same samples
    code, text, err = run(capsys, "verify", files["base"], files["vace"], "--reference-vace", str(tmp_path / "changed.safetensors"),
                          *common, "--min-psnr", "60")
    report = json.loads(text)
    assert code == 1 and not report["passed"] and all(p is not None for p in report["psnr_db"]), err
    assert err.count("\n") == 1 and "is below --min-psnr 60" in err


@pytest.mark.parametrize("candidate,extra,message", [
    ("vace", [], "is a VACE model; give --control"),
    ("vace", ["--control", "{ctx}", "--candidate-vace", "{module}"], "already holds a VACE add-on"),
    ("base", ["--control", "{ctx}", "--candidate-vace", "{base}"], "holds no VACE add-on"),
    ("base", ["--control", "{ctx}"], "has no VACE add-on; graft one with --candidate-vace MODULE"),
    ("vace", ["--control", "{short}"], "covers 1 latent frames; --frames 5 needs 2"),
])
def test_verify_refuses_models_it_cannot_steer_alike_in_one_line(files, capsys, tmp_path, candidate, extra, message):
    save_file({"vace_context": torch.zeros(96, 2, 8, 8)}, str(tmp_path / "ctx.safetensors"))
    save_file({"vace_context": torch.zeros(96, 1, 8, 8)}, str(tmp_path / "short.safetensors"))
    fill = {**files, "ctx": str(tmp_path / "ctx.safetensors"), "short": str(tmp_path / "short.safetensors")}
    code, text, err = run(capsys, "verify", files["vace"], files[candidate], "--prompt-embeds", files["embeds"],
                          "--frames", "5", *SIZE, *[e.format(**fill) for e in extra])
    assert code == 1 and err.count("\n") == 1 and message in err and text == "", err
