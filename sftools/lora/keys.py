"""The LoRA key grammar, stated once: every spelling sftools reads and writes.

A LoRA key is `<prefix><module><suffix>`:
- prefix: `diffusion_model.` (ComfyUI, Kijai, LightX2V; `model.diffusion_model.` read too) or none,
  with the module in original Wan names; `lora_unet_` (kohya / musubi) with the module's dots as
  underscores; `transformer.` (diffusers / peft) with the module in diffusers names.
- suffix: the part of the change it holds: `lora_up` / `lora_B` (up), `lora_down` / `lora_A`
  (down), `.alpha`, `.diff` (a dense change of the module's weight, or of the parameter itself for
  `modulation`), `.diff_b` / `lora_B.bias` (its bias), `.diff_m` (LightX2V: the block's modulation).

No torch here: the command line imports the form names at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sftools.errors import SftoolsError
from sftools.wan.keys import ORIGINAL_KEY, diffusers_name_to_original

FORMS = ("comfyui", "diffusers")
COMFYUI_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
_ORIGINAL_PREFIXES = ("model.diffusion_model.", COMFYUI_PREFIX)
PREFIXES = (DIFFUSERS_PREFIX, KOHYA_PREFIX, *_ORIGINAL_PREFIXES, "")
# suffix -> part; longest first where one ends another (`.diff_b` before `.diff`).
SUFFIXES = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.bias", "diff_b"), (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
)
FACTOR_PARTS = ("up", "down")
# Underscored names kohya / musubi write, restored before the dots of the rest come back.
_KOHYA_WORDS = ("vace_patch_embedding", "patch_embedding", "text_embedding", "time_embedding", "time_projection",
                "self_attn", "cross_attn", "norm_k_img", "k_img", "v_img", "norm_q", "norm_k", "img_emb",
                "emb_pos", "vace_blocks", "before_proj", "after_proj")


@dataclass(frozen=True)
class LoraKey:
    spelling: str  # "original" (comfyui, kohya after un-underscoring) | "diffusers"
    module: str  # in original names for "original", in diffusers names for "diffusers"
    part: str  # up | down | alpha | diff | diff_b | diff_m
    prefix: str = ""  # as written: one of PREFIXES
    suffix: str = ""  # as written: one of SUFFIXES' spellings


def parse_key(name: str) -> LoraKey | None:
    """The parts of a LoRA key, or None when `name` is no LoRA key."""
    suffix, part = next(((s, p) for s, p in SUFFIXES if name.endswith(s)), (None, None))
    if suffix is None:
        return None
    prefix = next(p for p in PREFIXES if name.startswith(p))
    module = name[len(prefix): -len(suffix)]
    if prefix == DIFFUSERS_PREFIX:
        return LoraKey("diffusers", module, part, prefix, suffix)
    if prefix == KOHYA_PREFIX:
        module = kohya_module(module)
    return LoraKey("original", module, part, prefix, suffix)


def is_lora(names) -> bool:
    """Whether a file's keys are a LoRA's (model weights never carry these suffixes)."""
    return any(parse_key(n) is not None or n.startswith(KOHYA_PREFIX) for n in names)


def refuse_lora(path: str, names) -> None:
    """For commands that take a model: a LoRA given in its place is one clear line."""
    if is_lora(names):
        raise SftoolsError(f"{path}: is a LoRA, not a model (sftools lora convert / merge handle LoRAs)")


def kohya_module(name: str) -> str:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q`."""
    dotted = name.replace("_", ".")
    for word in _KOHYA_WORDS:
        dotted = dotted.replace(word.replace("_", "."), word)
    return dotted


def target_param(module: str, part: str) -> str:
    """The original parameter a part of `module` changes: factors and `.diff` its weight (or the
    parameter itself, for `blocks.N.modulation.diff`), `.diff_b` its bias, `.diff_m` its modulation."""
    if part == "diff_b":
        return module + ".bias"
    if part == "diff_m":
        return module + ".modulation"
    if part == "diff" and not ORIGINAL_KEY.match(module + ".weight"):
        return module
    return module + ".weight"


def lora_param(key: LoraKey) -> str | None:
    """The original parameter a parsed key changes; None when its diffusers name has no original one."""
    module = key.module
    if key.spelling == "diffusers":
        try:
            weight = diffusers_name_to_original(module + ".weight")
        except SftoolsError:
            return None
        if weight is None:
            return None
        module = weight.removesuffix(".weight")
    return target_param(module, key.part)


def comfyui_key(param: str, part: str) -> str:
    """The comfyui-form key of a factor (`up`, `down`) or dense change (`diff`) of original `param`;
    `diff_m` spells a `modulation` change LightX2V's way (`blocks.N.diff_m`)."""
    if part == "diff_m":
        return f"{COMFYUI_PREFIX}{param.removesuffix('.modulation')}.diff_m"
    if part in FACTOR_PARTS:
        return f"{COMFYUI_PREFIX}{param.removesuffix('.weight')}.lora_{part}.weight"
    if param.endswith(".bias"):
        return f"{COMFYUI_PREFIX}{param.removesuffix('.bias')}.diff_b"
    return f"{COMFYUI_PREFIX}{param.removesuffix('.weight')}.diff"


def diffusers_key(module: str, part: str) -> str:
    """The peft key of diffusers-named `module`: `up` -> lora_B.weight, `down` -> lora_A.weight,
    `diff_b` -> lora_B.bias."""
    suffix = {"up": "lora_B.weight", "down": "lora_A.weight", "diff_b": "lora_B.bias"}[part]
    return f"{DIFFUSERS_PREFIX}{module}.{suffix}"


def target_pattern(param: str) -> str:
    """`blocks.3.self_attn.q.weight` -> `blocks.N.self_attn.q`: what `inspect` lists as targets."""
    module = re.sub(r"\.(weight|bias)$", "", param)
    return re.sub(r"(^|[._])\d+(?=[._])", r"\1N", module)
