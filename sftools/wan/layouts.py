"""Wan 2.1 key layouts: unwrapping training checkpoints, and original <-> diffusers names.

- original: Wan-Video/Wan2.1 names (`blocks.0.self_attn.q.weight`), what ComfyUI and Kijai's
  wrapper load, optionally behind `model.diffusion_model.`.
- diffusers: `WanTransformer3DModel` / `WanVACETransformer3DModel` names (`blocks.0.attn1.to_q.weight`).
- wrapped: Self Forcing / CausVid / training saves, a dict of `generator_ema`, `generator`, `critic`...
  whose names carry `model.` and FSDP / activation-checkpoint / compile infixes.

original -> diffusers is diffusers' own `convert_wan_transformer_to_diffusers`, run on names alone.
diffusers has no reverse converter, so `diffusers_to_original` is written here; it is position
aware (`proj_out` / `scale_shift_table` mean the head at the top level, `after_proj` inside
`vace_blocks`, `modulation` inside blocks) and undoes the norm2/norm3 swap.
"""

from __future__ import annotations

import re
from collections import Counter

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint
from sftools.io.torch_pickle import NEST

DEFAULT_SELECT = ("generator_ema", "generator", "state_dict", "model", "module", "ema")
WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
COMMON_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "module.", "model.")

_BLOCK = r"(?:blocks|vace_blocks)\.\d+\."
ORIGINAL_KEY = re.compile(
    r"^(?:"
    r"(?:vace_)?patch_embedding\.(?:weight|bias)"
    r"|(?:text_embedding|time_embedding)\.[02]\.(?:weight|bias)"
    r"|time_projection\.1\.(?:weight|bias)"
    r"|head\.head\.(?:weight|bias)|head\.modulation"
    r"|img_emb\.proj\.[0134]\.(?:weight|bias)|img_emb\.emb_pos"
    rf"|{_BLOCK}(?:self_attn|cross_attn)\.[qkvo]\.(?:weight|bias)"
    rf"|{_BLOCK}(?:self_attn|cross_attn)\.norm_[qk]\.weight"
    rf"|{_BLOCK}cross_attn\.(?:k_img|v_img)\.(?:weight|bias)|{_BLOCK}cross_attn\.norm_k_img\.weight"
    rf"|{_BLOCK}norm3\.(?:weight|bias)|{_BLOCK}ffn\.[02]\.(?:weight|bias)|{_BLOCK}modulation"
    r"|vace_blocks\.\d+\.(?:before_proj|after_proj)\.(?:weight|bias)"
    r")$"
)

# diffusers -> original, for the part of a name after `blocks.N.` / `vace_blocks.N.`
_BLOCK_RENAMES = (
    ("attn1.to_out.0.", "self_attn.o."), ("attn2.to_out.0.", "cross_attn.o."),
    ("attn1.to_", "self_attn."), ("attn2.to_", "cross_attn."),
    ("attn2.add_k_proj.", "cross_attn.k_img."), ("attn2.add_v_proj.", "cross_attn.v_img."),
    ("attn2.norm_added_k.", "cross_attn.norm_k_img."),
    ("attn1.norm_", "self_attn.norm_"), ("attn2.norm_", "cross_attn.norm_"),
    ("norm2.", "norm3."), ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
    ("scale_shift_table", "modulation"),
)
_VACE_BLOCK_RENAMES = (("proj_in.", "before_proj."), ("proj_out.", "after_proj."))
_TOP_RENAMES = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("proj_out.", "head.head."), ("scale_shift_table", "head.modulation"),
    ("patch_embedding.", "patch_embedding."), ("vace_patch_embedding.", "vace_patch_embedding."),
)
# diffusers I2V files may carry these; the model ignores them (`_keys_to_ignore_on_load_unexpected`).
DROPPED_DIFFUSERS = re.compile(r"\.attn2\.norm_added_q\.")
_BLOCK_NAME = re.compile(r"^((?:vace_)?blocks)\.(\d+)\.(.*)$")


def detect_layout(names) -> str:
    """'original', 'diffusers' or 'unknown', from the names alone."""
    names = list(names)
    if any(n.startswith("condition_embedder.") or ".attn1." in n or n == "scale_shift_table" for n in names):
        return "diffusers"
    if any(ORIGINAL_KEY.match(n) for n in names):
        return "original"
    return "unknown"


def original_to_diffusers(names) -> dict[str, str]:
    """original name -> diffusers name, by diffusers' own converter; refuses names it cannot map back."""
    names = list(names)
    for n in names:
        if not ORIGINAL_KEY.match(n):
            raise SftoolsError(f"key {n} is not a Wan 2.1 transformer key; cannot rename it to diffusers")
    # Imported here: diffusers' loaders take seconds to import and most commands never rename.
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({n: n for n in names})
    mapping = {old: new for new, old in converted.items()}
    for old, new in mapping.items():
        if diffusers_name_to_original(new) != old:
            raise SftoolsError(f"key {old} does not round-trip through the diffusers layout")
    return mapping


def diffusers_name_to_original(name: str) -> str | None:
    """One diffusers name in original spelling; None for names diffusers itself ignores."""
    if DROPPED_DIFFUSERS.search(name):
        return None
    m = _BLOCK_NAME.match(name)
    if m:
        group, idx, rest = m.groups()
        renames = (_VACE_BLOCK_RENAMES if group == "vace_blocks" else ()) + _BLOCK_RENAMES
        rest = _apply_first(rest, renames)
        new = f"{group}.{idx}.{rest}"
    else:
        new = _apply_first(name, _TOP_RENAMES)
    if not ORIGINAL_KEY.match(new):
        raise SftoolsError(f"key {name} is not a diffusers Wan transformer key")
    return new


def _apply_first(rest: str, renames) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def diffusers_to_original(names) -> tuple[dict[str, str], list[str]]:
    """diffusers name -> original name, and the names dropped (ignored by diffusers too)."""
    mapping, dropped = {}, []
    for n in names:
        new = diffusers_name_to_original(n)
        if new is None:
            dropped.append(n)
        else:
            mapping[n] = new
    return mapping, dropped


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
    return Checkpoint(ckpt.path, ckpt.format, {clean[n]: t for n, t in tensors.items() if n in clean},
                      dict(ckpt.metadata), ckpt.notes + notes + prefix_notes)


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
