"""`sftools demo`: the whole chain that exists so far, on built-in tiny models, no downloads."""

from __future__ import annotations

import os
from typing import Callable

import torch
from safetensors.torch import load_file

from sftools.convert import convert
from sftools.inspect import inspect_path
from sftools.io.scan import scan_file
from sftools.lora.extract import ExtractOptions, extract, lora_metadata
from sftools.lora.forms import write_lora
from sftools.lora.merge import merge
from sftools.wan.config import TINY
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint


def run_demo(workdir: str, say: Callable[[str], None]) -> dict:
    """Write a tiny base and a Self Forcing-style `.pt` distilled from it, scan and convert the `.pt`
    both ways, inspect, extract a LoRA from the pair, merge it back and measure what it recovers."""
    os.makedirs(workdir, exist_ok=True)
    base_state = random_state_dict(TINY, seed=0)
    tuned_state = perturbed(base_state, rank=4)
    base = write_checkpoint(os.path.join(workdir, "Wan2.1-T2V-tiny-Diffusers"), base_state, "diffusers")
    pt = write_checkpoint(os.path.join(workdir, "self_forcing_dmd.pt"), tuned_state, "self-forcing")
    say(f"1. wrote a tiny Wan 2.1 base {base}/ (diffusers layout) and a Self Forcing checkpoint {pt} "
        "(generator, generator_ema, critic; torch zip pickle) whose weights differ from it")

    scan = scan_file(pt)
    say(f"2. scan: {scan['format']}, {'safe' if scan['safe'] else 'REFUSED'}; globals "
        f"{', '.join(g['name'] for g in scan['globals'])}; {scan['tensors']} tensors in {scan['sub_dicts']}")

    sf = os.path.join(workdir, "sf.safetensors")
    r = convert(pt, sf, dtype="bf16")
    say(f"3. convert -> {sf}: {r['model']}, {r['tensors']} tensors, bf16, original (ComfyUI) names; "
        + "; ".join(r["notes"]))

    diffusers_dir = os.path.join(workdir, "sf-diffusers")
    r2 = convert(pt, diffusers_dir, layout="diffusers", max_shard_size="100KB")
    say(f"4. convert --layout diffusers -> {diffusers_dir}/: {len(r2['files'])} shards + index + config.json")

    info = inspect_path(sf)
    info2 = inspect_path(diffusers_dir)
    say(f"5. inspect: {sf} is {info['title']} ({info['layout']}), {info['parameters']:,} parameters; "
        f"{diffusers_dir} is {info2['title']} ({info2['layout']})")

    lora_path = os.path.join(workdir, "sf_lora_rank8.safetensors")
    lora, report = extract(base, pt, ExtractOptions(rank=8))
    write_lora(lora_path, lora, "comfyui", torch.bfloat16, lora_metadata(report))
    s = report["summary"]
    say(f"6. lora extract (base vs .pt, mixed layouts) -> {lora_path}: {s['lora_modules']} LoRA modules at rank "
        f"{s['ranks']}, {s['full_diffs']} full diffs, {s['unchanged']} unchanged; weighted relative error "
        f"{s['weighted_rel_error']:.2e} (bf16 factors)")

    merged = os.path.join(workdir, "base_plus_lora.safetensors")
    merge(base, [(lora_path, 1.0)], merged)
    weights = load_file(merged)
    worst = max(float((weights[k] - v).norm() / (v - base_state[k]).norm())
                for k, v in tuned_state.items() if not torch.equal(v, base_state[k]))
    say(f"7. lora merge base + LoRA -> {merged}: worst relative distance to the distilled weights {worst:.2e}")
    return {"scan": scan, "convert": r, "convert_diffusers": r2, "inspect": info, "lora": report, "merge_error": worst}
