"""What a LoRA file is: its form, rank and targets, from its key names and shapes alone."""

from __future__ import annotations

from sftools.lora.keys import KOHYA_PREFIX, parse_key, target_param, target_pattern
from sftools.wan.detect import Description
from sftools.wan.keys import diffusers_name_to_original


def lora_form(names: list[str]) -> str:
    """comfyui | lightx2v | diffusers | kohya | unknown."""
    if any(n.startswith(KOHYA_PREFIX) for n in names):
        return "kohya"
    if all(n.startswith("diffusion_model.") for n in names):
        return "lightx2v" if any(n.endswith(".diff_m") for n in names) else "comfyui"
    if all(n.startswith("transformer.") for n in names):
        return "diffusers"
    return "unknown"


def describe_lora(shapes: dict[str, tuple[int, ...]]) -> Description:
    names = list(shapes)
    keys = {n: parse_key(n) for n in names}
    downs = {n: s for n, s in shapes.items() if keys[n] and keys[n].part == "down"}
    ranks = sorted({s[0] for s in downs.values()})
    targets = set()
    for key in filter(None, keys.values()):
        module = key.module
        if key.spelling == "diffusers":
            module = (diffusers_name_to_original(module + ".weight") or module).removesuffix(".weight")
        targets.add(target_pattern(target_param(module, key.part)))
    details = {
        "form": lora_form(names),
        "targets": sorted(targets),
        "rank": ranks[-1] if len(ranks) == 1 else (f"{ranks[0]}-{ranks[-1]}" if ranks else 0),
        "lora_modules": len(downs),
        "full_diffs": sum(1 for k in keys.values() if k and k.part in ("diff", "diff_b", "diff_m")),
        "alpha_keys": sum(1 for k in keys.values() if k and k.part == "alpha"),
    }
    return Description("lora", details["form"], "", None, details)
