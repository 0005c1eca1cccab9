"""`sftools demo`: the whole chain that exists so far, on built-in tiny models, no downloads.

Each stage prints what it did and the `sftools ...` command that does the same, so a newcomer can
copy it onto real files.
"""

from __future__ import annotations

import os
import shlex
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file

from sftools.convert import convert_model
from sftools.errors import SftoolsError
from sftools.inspection import inspect_file
from sftools.io.scan import scan_file
from sftools.lora.extract import extract_to_file
from sftools.lora.merge import merge
from sftools.lora.settings import ExtractSettings, RankRule
from sftools.sampling.run import PromptSource, sample_to_file
from sftools.sampling.settings import from_preset
from sftools.sampling.vace_context import ControlSource
from sftools.sampling.video import Mp4Writer
from sftools.sampling.verify import verify
from sftools.training.config import Recipe
from sftools.training.trainer import Trainer
from sftools.wan.config import TINY_128, TINY_128_VACE
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint
from sftools.wan.tiny_parts import write_tiny_text_encoder, write_tiny_vae
from sftools.wan.vace import extract_module, graft_module


# recipes/tiny-cpu.yaml with run.steps=6 (a test holds the two equal), written out so an installed
# package needs no recipe file.
TRAIN_RECIPE = {
    "model": {"base": "tiny", "rank": 4},
    "video": {"frames": 9, "height": 32, "width": 32, "frames_per_block": 3, "steps": 4, "shift": 5.0},
    "optim": {"lr": 1e-3, "lr_critic": 1e-3, "critic_ratio": 2, "guidance": 3.0},
    "run": {"steps": 6, "seed": 0, "ema_decay": 0.9, "ema_start": 4, "checkpoint_every": 10, "keep_checkpoints": 2,
            "log_every": 5},
}


def run_demo(workdir: str, say: Callable[[str], None]) -> dict:
    """Write a tiny base and a Self Forcing-style `.pt` distilled from it, scan and convert the `.pt`
    both ways, inspect, extract a LoRA from the pair, merge it back and measure what it recovers."""
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise SftoolsError(f"{workdir}: the demo writes into an empty or new folder (this one holds "
                           f"{sorted(os.listdir(workdir))[0]}, ...)")
    os.makedirs(workdir, exist_ok=True)

    def stage(text: str, *command: str) -> None:
        say(text)
        if command:
            say("   $ sftools " + " ".join(shlex.quote(c) for c in command))

    base_state = random_state_dict(TINY_128, seed=0)
    tuned_state = perturbed(base_state, rank=4, scale=0.2)
    base = write_checkpoint(os.path.join(workdir, "Wan2.1-T2V-tiny-Diffusers"), base_state, "diffusers", TINY_128)
    write_tiny_text_encoder(base, text_dim=TINY_128.text_dim)
    write_tiny_vae(base)
    pt = write_checkpoint(os.path.join(workdir, "self_forcing_dmd.pt"), tuned_state, "self-forcing", TINY_128)
    stage(f"1. wrote a tiny Wan 2.1 pipeline {base}/ (diffusers layout: transformer, umT5 text encoder, tokenizer, "
          f"VAE) and a Self Forcing checkpoint {pt} (generator, generator_ema, critic; torch zip pickle) whose "
          "weights differ from the base")

    scan = scan_file(pt)
    stage(f"2. scan: {scan['format']}, {'safe' if scan['safe'] else 'REFUSED'}; globals "
          f"{', '.join(g['name'] for g in scan['globals'])}; {scan['tensors']} tensors in {scan['sub_dicts']}",
          "scan", pt)

    sf = os.path.join(workdir, "sf.safetensors")
    r = convert_model(pt, sf, dtype="bf16")
    stage(f"3. convert -> {sf}: {r['model']}, {r['tensors']} tensors, bf16, original (ComfyUI) names; "
          + "; ".join(r["notes"]), "convert", pt, sf, "--dtype", "bf16")

    diffusers_dir = os.path.join(workdir, "sf-diffusers")
    r2 = convert_model(pt, diffusers_dir, layout="diffusers", max_shard_bytes=100_000)
    stage(f"4. convert --layout diffusers -> {diffusers_dir}/: {len(r2['files'])} shards + index + config.json",
          "convert", pt, diffusers_dir, "--layout", "diffusers", "--max-shard-size", "100KB")

    info = inspect_file(sf)
    info2 = inspect_file(diffusers_dir)
    stage(f"5. inspect: {sf} is {info['title']} ({info['layout']}), {info['parameters']:,} parameters; "
          f"{diffusers_dir} is {info2['title']} ({info2['layout']})", "inspect", sf)

    lora_path = os.path.join(workdir, "sf_lora_rank8.safetensors")
    report = extract_to_file(base, pt, lora_path, ExtractSettings(rank=RankRule(rank=8)))
    s = report.summary
    stage(f"6. lora extract (base vs .pt, mixed layouts) -> {lora_path}: {s['lora_modules']} LoRA modules at rank "
          f"{s['ranks']}, {s['full_diffs']} full diffs, {s['unchanged']} unchanged; weighted relative error "
          f"{s['weighted_rel_error']:.2e} (bf16 factors)", "lora", "extract", base, pt, "-o", lora_path, "--rank", "8")

    merged = os.path.join(workdir, "base_plus_lora.safetensors")
    merge(base, [(lora_path, 1.0)], merged)
    weights = load_file(merged)
    worst = max(float((weights[k] - v).norm() / (v - base_state[k]).norm())
                for k, v in tuned_state.items() if not torch.equal(v, base_state[k]))
    stage(f"7. lora merge base + LoRA -> {merged}: worst relative distance to the distilled weights {worst:.2e}",
          "lora", "merge", base, lora_path + ":1.0", "-o", merged)

    video = os.path.join(workdir, "fox.mp4")
    prompt = PromptSource(text="a fox in the snow", text_encoder=base)
    settings = from_preset("self-forcing", frames=33, height=64, width=64)
    sampled = sample_to_file(pt, video, settings, prompt, vae=base)
    stage(f"8. sample the Self Forcing model block by block with its KV cache -> {video}: {sampled.frames} frames "
          f"({sampled.latent_frames} latent) in {len(sampled.block_seconds)} blocks of 3, each block decoded and "
          "appended as it finished", "sample", pt, "--prompt", prompt.text, "--text-encoder", base, "--vae", base,
          "--frames", "33", "--height", "64", "--width", "64", "-o", video)

    check = verify(pt, base, settings, prompt, candidate_loras=[(lora_path, 1.0)], min_psnr=30)
    without = verify(pt, base, settings, prompt, min_psnr=30)
    stage(f"9. verify base + extracted LoRA against the distilled model on the same noise: worst latent frame "
          f"{check.worst_psnr:.1f} dB PSNR, min cosine {min(check.cosine):.5f}: {'PASS' if check.passed else 'FAIL'} "
          f"at --min-psnr 30 (the base alone: {without.worst_psnr:.1f} dB, {'PASS' if without.passed else 'FAIL'})",
          "verify", pt, base, "--candidate-lora", lora_path, "--prompt", prompt.text, "--text-encoder", base,
          "--frames", "33", "--height", "64", "--width", "64", "--min-psnr", "30")

    run_dir = os.path.join(workdir, "run")
    trained = Trainer(Recipe.from_dict(TRAIN_RECIPE), run_dir).train()
    stage(f"10. train a causal LoRA with Self Forcing (self-rollouts with the KV cache, DMD against the frozen base, a "
          f"critic adapter) for {trained['steps']} iterations -> {trained['outputs']['comfyui']}",
          "train", "recipes/tiny-cpu.yaml", "--set", "run.steps=6", "--output-dir", run_dir)

    vace = vace_stages(workdir, base_state, pt, base, settings, prompt, stage)
    return {"scan": scan, "convert": r, "convert_diffusers": r2, "inspect": info, "lora": report.to_dict(),
            "merge_error": worst, "sample": sampled, "verify": check.to_dict(), "train": trained, **vace}


def moving_square(path: str, frames: int, height: int, width: int) -> str:
    """A control clip: a white square crossing a black frame (as a scribble or depth map would steer)."""
    clip = np.zeros((frames, height, width, 3), dtype=np.uint8)
    side = min(height, width) // 4
    for f in range(frames):
        x = f * (width - side) // max(frames - 1, 1)
        clip[f, side:2 * side, x:x + side] = 255
    with Mp4Writer(path) as writer:
        writer.append(clip)
    return path


def vace_stages(workdir: str, base_state: dict, pt: str, vae: str, settings, prompt: PromptSource, stage) -> dict:
    """Cut the add-on of a tiny VACE model, graft it onto the tiny Self Forcing model, and stream it under a control."""
    addon = {n: t for n, t in random_state_dict(TINY_128_VACE, seed=5).items() if n.startswith("vace_")}
    vace_model = write_checkpoint(os.path.join(workdir, "Wan2.1-VACE-tiny.safetensors"), {**base_state, **addon},
                                  "original", TINY_128_VACE)
    module = os.path.join(workdir, "vace_module_tiny.safetensors")
    cut = extract_module(vace_model, module)
    stage(f"11. vace extract {vace_model} -> {module}: {cut['tensors']} add-on tensors alone, {cut['vace_blocks']} "
          f"blocks after layers {cut['vace_layers']}", "vace", "extract", vace_model, "-o", module)

    grafted = os.path.join(workdir, "sf_vace.safetensors")
    g = graft_module(pt, module, grafted)
    stage(f"12. vace graft the add-on onto the Self Forcing model -> {grafted}: {g['model']}, {g['base_tensors']} base "
          f"+ {g['vace_tensors']} add-on tensors, one ComfyUI-ready file", "vace", "graft", pt, module, "-o", grafted)

    control = moving_square(os.path.join(workdir, "square.mp4"), settings.frames, settings.height, settings.width)
    video = os.path.join(workdir, "fox_square.mp4")
    source = ControlSource(control=control)
    sampled = sample_to_file(grafted, video, settings, prompt, vae=vae, control=source)
    stage(f"13. sample the grafted model under the control {control} -> {video}: {sampled.frames} frames in "
          f"{len(sampled.block_seconds)} blocks, each block's control latents entering with that block",
          "sample", grafted, "--control", control, "--prompt", prompt.text, "--text-encoder", vae, "--vae", vae,
          "--frames", str(settings.frames), "--height", str(settings.height), "--width", str(settings.width),
          "-o", video)
    return {"vace_extract": cut, "vace_graft": g, "vace_sample": sampled}
