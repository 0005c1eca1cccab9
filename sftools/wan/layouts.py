"""Checkpoints in Wan 2.1 layouts: unwrapping training checkpoints, and renaming between layouts.

- wrapped: Self Forcing / CausVid / training saves, a dict of `generator_ema`, `generator`, `critic`...
  whose names carry `model.` and FSDP / activation-checkpoint / compile infixes; `unwrap` picks the
  model and strips them.
- original and diffusers (names in `wan.keys`): `to_layout` renames a clean checkpoint.
"""

from __future__ import annotations

from collections import Counter

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint
from sftools.io.torch_pickle import NEST
from sftools.wan.keys import detect_layout, diffusers_to_original, original_to_diffusers

DEFAULT_SELECT = ("generator_ema", "generator", "state_dict", "model", "module", "ema")
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
COMMON_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.")


def to_layout(ckpt: Checkpoint, layout: str) -> Checkpoint:
    """Rename a clean (unwrapped) checkpoint into `layout` ('original' or 'diffusers')."""
    current = detect_layout(ckpt.tensors)
    if current == layout:
        return ckpt
    if current == "unknown" and layout == "original":
        # Not a Wan transformer (a VAE, a text encoder, anything else): names stay as they are.
        return ckpt.renamed({n: n for n in ckpt.tensors}, ["not a Wan transformer: names kept as they are"])
    if current == "unknown":
        raise SftoolsError(f"{ckpt.path}: cannot tell the key layout (first key: {next(iter(ckpt.tensors), '-')})")
    notes: list[str] = []
    if current == "diffusers":
        mapping, dropped = diffusers_to_original(ckpt.tensors)
        if dropped:
            notes.append(f"dropped {len(dropped)} keys diffusers ignores ({dropped[0]}, ...)")
        ckpt = ckpt.renamed(mapping, notes + [f"renamed diffusers -> original ({len(mapping)} keys)"])
        if layout == "original":
            return ckpt
    mapping = original_to_diffusers(ckpt.tensors)
    return ckpt.renamed(mapping, [f"renamed original -> diffusers ({len(mapping)} keys)"])


def unwrap(ckpt: Checkpoint, select: str | None = None) -> Checkpoint:
    """Pick the model sub-dict of a training checkpoint and strip wrapper prefixes from its names."""
    tensors, notes = dict(ckpt.tensors), []
    path = [p for p in (select or "").split(NEST) if p]
    nested = ckpt.format.startswith("torch")  # only pickles have sub-dicts; "/" in a safetensors key is a name
    if path and not nested:
        raise SftoolsError(f"{ckpt.path}: --select picks a sub-dict of a pickled training checkpoint; this file has none")
    while nested and any(NEST in n for n in tensors):
        flat = [n for n in tensors if NEST not in n]
        groups = list(dict.fromkeys(n.split(NEST, 1)[0] for n in tensors if NEST in n))
        if flat and not path:
            notes.append(f"kept the {len(flat)} top-level tensors; ignored sub-dicts {', '.join(groups)}")
            tensors = {n: tensors[n] for n in flat}
            break
        choice = path.pop(0) if path else _default_group(ckpt.path, groups)
        if choice not in groups:
            raise SftoolsError(f"{ckpt.path}: no sub-dict {choice!r} holding tensors (has: {', '.join(groups)})")
        if len(groups) > 1:
            notes.append(f"selected {choice!r} (also present: {', '.join(g for g in groups if g != choice)})")
        tensors = {n.split(NEST, 1)[1]: t for n, t in tensors.items() if n.startswith(choice + NEST)}
    if path:
        raise SftoolsError(f"{ckpt.path}: no sub-dict {path[0]!r} to select")
    renamed = {n: _strip_infixes(n) for n in tensors}
    clean, prefix_notes = _strip_common_prefixes(renamed)
    if len(set(clean.values())) < len(clean):
        twice = next(n for n, count in Counter(clean.values()).items() if count > 1)
        raise SftoolsError(f"{ckpt.path}: two tensors become {twice} after unwrapping")
    return ckpt.replace({clean[n]: t for n, t in tensors.items() if n in clean}, notes + prefix_notes)


def _default_group(path: str, groups: list[str]) -> str:
    for name in DEFAULT_SELECT:
        if name in groups:
            return name
    if len(groups) == 1:
        return groups[0]
    raise SftoolsError(f"{path}: several sub-dicts hold tensors ({', '.join(groups)}); choose one with --select")


def _strip_infixes(name: str) -> str:
    for infix in WRAPPER_INFIXES:
        name = name.replace(infix, "")
    return name


def _strip_common_prefixes(names: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    notes = []
    changed = True
    while changed and names:
        changed = False
        for prefix in COMMON_PREFIXES:
            inside = [k for k, v in names.items() if v.startswith(prefix)]
            if not inside:
                continue
            if len(inside) < len(names):
                # ComfyUI whole checkpoints: the model sits under model.diffusion_model. beside
                # vae. / text_encoders. parts; keep the model, like ComfyUI's own loader.
                if prefix != "model.diffusion_model.":
                    continue
                notes.append(f"dropped {len(names) - len(inside)} tensors outside {prefix}")
            names = {k: names[k][len(prefix):] for k in inside}
            notes.append(f"stripped prefix {prefix!r}")
            changed = True
            break
    return names, notes
