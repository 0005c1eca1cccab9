"""Wan 2.1 transformer key names, as pure string facts: what an original key is, and original <->
diffusers names. No torch, so the command line can import the layout choices at once.

- original: Wan-Video/Wan2.1 names (`blocks.0.self_attn.q.weight`), what ComfyUI and Kijai's
  wrapper load, optionally behind `model.diffusion_model.`.
- diffusers: `WanTransformer3DModel` / `WanVACETransformer3DModel` names (`blocks.0.attn1.to_q.weight`).

original -> diffusers is diffusers' own `convert_wan_transformer_to_diffusers`, run on names alone.
diffusers has no reverse converter, so `diffusers_to_original` is written here; it is position
aware (`proj_out` / `scale_shift_table` mean the head at the top level, `after_proj` inside
`vace_blocks`, `modulation` inside blocks) and undoes the norm2/norm3 swap.
"""

from __future__ import annotations

import re

from sftools.errors import SftoolsError

LAYOUTS = ("original", "diffusers")

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
