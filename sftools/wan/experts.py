"""Wan 2.2 A14B experts: which folder or file holds the high-noise and which the low-noise model.

An A14B model is two full 14B transformers with identical key names and shapes, switched at a
timestep boundary; nothing in the weights tells them apart, only names do (reference wan22.md §2, §5):

- Wan-AI folders: `high_noise_model/` and `low_noise_model/`, each a model folder (config.json +
  `diffusion_pytorch_model*.safetensors`), as Wan2.2's `WanModel.from_pretrained(dir, subfolder=...)`
  reads them;
- diffusers pipelines: `transformer/` is the high-noise expert and `transformer_2/` the low-noise
  one (`WanPipeline` runs `transformer` for t >= boundary_ratio * 1000);
- single files: names such as `wan2.2_t2v_high_noise_14B_fp16.safetensors` (ComfyUI repackages) or
  `..._low_noise_lora_rank64...` (LightX2V).
"""

from __future__ import annotations

import os
import re

from sftools.errors import SftoolsError

EXPERTS = ("high_noise", "low_noise")  # in diffusers' order: transformer, transformer_2
# The sub-folder each layout gives each expert (Wan-AI's for original names, diffusers' pipeline's).
EXPERT_FOLDERS = {
    "original": {"high_noise": "high_noise_model", "low_noise": "low_noise_model"},
    "diffusers": {"high_noise": "transformer", "low_noise": "transformer_2"},
}
_NAMED = re.compile(r"(high|low)[_-]?noise", re.IGNORECASE)


def expert_folders(path: str) -> dict[str, str] | None:
    """{expert: sub-folder} when `path` is an A14B folder in either layout, else None."""
    if not os.path.isdir(path):
        return None
    for names in EXPERT_FOLDERS.values():
        found = {e: os.path.join(path, sub) for e, sub in names.items() if os.path.isdir(os.path.join(path, sub))}
        if len(found) == len(EXPERTS):
            return found
    return None


def expert_from_name(path: str) -> str | None:
    """'high_noise' or 'low_noise' when the file name (else its folder's name) says which expert it
    holds; None when neither does, or a name says both."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    for part in reversed(parts[-2:]):  # the file first: `low_noise_runs/model_high_noise.safetensors` is high
        said = {m.group(1).lower() + "_noise" for m in _NAMED.finditer(part)}
        if len(said) == 1:
            return said.pop()
        if said:
            return None
    return None


def refuse_crossed_experts(base: str, tuned: str) -> None:
    """Extracting a high-noise expert against a low-noise one is the characteristic Wan 2.2 mistake:
    refuse it when both names say which expert they hold."""
    a, b = expert_from_name(base), expert_from_name(tuned)
    if a and b and a != b:
        raise SftoolsError(f"{base} is the {a} expert but {tuned} is the {b} one; "
                           f"extract each A14B expert against the same expert of its base")


def expert_pairs(base: str, tuned: str) -> dict[str, tuple[str, str]] | None:
    """{expert: (base folder, tuned folder)} when both are A14B folders, None when neither is;
    one A14B folder against one model is refused."""
    a, b = expert_folders(base), expert_folders(tuned)
    if a is None and b is None:
        return None
    if a is None or b is None:
        two, one = (base, tuned) if a else (tuned, base)
        raise SftoolsError(f"{two} holds two A14B experts but {one} is one model; give two A14B folders, "
                           f"or one expert of each (such as {two}/{os.path.basename(next(iter((a or b).values())))})")
    return {e: (a[e], b[e]) for e in EXPERTS}
