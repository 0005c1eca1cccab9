"""`sftools demo`: the whole chain that exists so far, on built-in tiny models, no downloads.

Each stage prints what it did and the `sftools ...` command that does the same, so a newcomer can
copy it onto real files.
"""

from __future__ import annotations

import os
import shlex
from typing import Callable

import torch
from safetensors.torch import load_file

from sftools.convert import convert_model
from sftools.inspection import inspect_file
from sftools.io.scan import scan_file
from sftools.lora.extract import extract_to_file
from sftools.lora.merge import merge
from sftools.lora.settings import ExtractSettings, RankRule
from sftools.wan.config import TINY
from sftools.wan.tiny import perturbed, random_state_dict, write_checkpoint


def run_demo(workdir: str, say: Callable[[str], None]) -> dict:
    """Write a tiny base and a Self Forcing-style `.pt` distilled from it, scan and convert the `.pt`
    both ways, inspect, extract a LoRA from the pair, merge it back and measure what it recovers."""
    os.makedirs(workdir, exist_ok=True)

    def stage(text: str, *command: str) -> None:
        say(text)
        if command:
            say("   $ sftools " + " ".join(shlex.quote(c) for c in command))

    base_state = random_state_dict(TINY, seed=0)
    tuned_state = perturbed(base_state, rank=4)
    base = write_checkpoint(os.path.join(workdir, "Wan2.1-T2V-tiny-Diffusers"), base_state, "diffusers")
    pt = write_checkpoint(os.path.join(workdir, "self_forcing_dmd.pt"), tuned_state, "self-forcing")
    stage(f"1. wrote a tiny Wan 2.1 base {base}/ (diffusers layout) and a Self Forcing checkpoint {pt} "
          "(generator, generator_ema, critic; torch zip pickle) whose weights differ from it")

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
    return {"scan": scan, "convert": r, "convert_diffusers": r2, "inspect": info, "lora": report.to_dict(),
            "merge_error": worst}
