"""`sftools demo`: the whole chain that exists so far, on built-in tiny models, no downloads."""

from __future__ import annotations

import os
from typing import Callable

from sftools.convert import convert
from sftools.inspect import inspect_path
from sftools.io.scan import scan_file
from sftools.wan.config import TINY
from sftools.wan.tiny import random_state_dict, write_checkpoint


def run_demo(workdir: str, say: Callable[[str], None]) -> dict:
    """Write a Self Forcing-style `.pt`, scan it, convert it both ways, inspect the results."""
    os.makedirs(workdir, exist_ok=True)
    pt = write_checkpoint(os.path.join(workdir, "self_forcing_dmd.pt"), random_state_dict(TINY, seed=0), "self-forcing")
    say(f"1. wrote a tiny Self Forcing checkpoint {pt} (generator, generator_ema, critic; torch zip pickle)")

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
    return {"scan": scan, "convert": r, "convert_diffusers": r2, "inspect": info}
