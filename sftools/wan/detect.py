"""What a set of weights is: Wan model kind and size, or VACE module, from names and shapes.

The rules follow ComfyUI's `detect_unet_config` and diffusers' single-file detection: `head.modulation`
marks a Wan transformer, `vace_patch_embedding` a VACE model, `img_emb` an image-conditioned one; the
dimensions come from the tensor shapes, so tiny test models are described as exactly as real ones.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from sftools.wan.config import WanConfig, model_shapes, vace_shapes
from sftools.wan.keys import detect_layout, diffusers_to_original

SIZES = {(1536, 30): "1.3B", (5120, 40): "14B"}
BASE_LAYERS = {1536: 30, 5120: 40}


@dataclass
class Description:
    kind: str  # "wan2.1 t2v" | "wan2.1 i2v" | "wan2.1 flf2v" | "wan2.1 vace" | "vace module" | "lora" | "unknown"
    layout: str
    size: str = ""
    config: WanConfig | None = None
    details: dict = field(default_factory=dict)

    @property
    def title(self) -> str:
        return " ".join(p for p in (self.kind, self.size) if p)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "size": self.size, "layout": self.layout, **self.details}
        if self.config is not None:
            out["config"] = {**asdict(self.config), "vace_layers": list(self.config.vace_layers)}
        return out


def describe_weights(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> Description:
    """Describe model weights given by clean (unwrapped) names and shapes."""
    names = list(shapes)
    layout = detect_layout(names)
    if layout == "diffusers":
        mapping, _ = diffusers_to_original(names)
        shapes = {mapping[n]: s for n, s in shapes.items() if n in mapping}
    if layout == "unknown":
        return Description("unknown", layout)
    config = infer_config(shapes, num_heads)
    if config is None:
        return Description("unknown", layout)
    expected = model_shapes(config) if "head.modulation" in shapes else vace_shapes(config)
    kind = "vace module" if "head.modulation" not in shapes else f"wan2.1 {config.model_type}"
    details = {"missing": sorted(set(expected) - set(shapes)), "unexpected": sorted(set(shapes) - set(expected))}
    details["mismatched"] = sorted(n for n in set(expected) & set(shapes) if tuple(expected[n]) != tuple(shapes[n]))
    size = SIZES.get((config.dim, config.num_layers), f"custom (dim {config.dim}, {config.num_layers} layers)")
    return Description(kind, layout, size, config, details)


def infer_config(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None) -> WanConfig | None:
    """The configuration implied by original-named shapes (a whole model or a VACE module)."""
    if "head.modulation" in shapes:
        dim = shapes["head.modulation"][-1]
    elif "vace_patch_embedding.weight" in shapes:
        dim = shapes["vace_patch_embedding.weight"][0]
    else:
        return None
    num_layers = _count(shapes, "blocks")
    ffn = shapes.get("blocks.0.ffn.0.weight") or shapes.get("vace_blocks.0.ffn.0.weight") or (0,)
    n_vace = _count(shapes, "vace_blocks")
    model_type = "t2v"
    if "vace_patch_embedding.weight" in shapes:
        model_type = "vace"
    elif "img_emb.emb_pos" in shapes:
        model_type = "flf2v"
    elif "img_emb.proj.1.weight" in shapes or "blocks.0.cross_attn.k_img.weight" in shapes:
        model_type = "i2v"
    # Head count is not stored in the weights: real Wan models use head_dim 128 (ComfyUI's rule).
    heads = num_heads or (dim // 128 if dim % 128 == 0 else 1)
    if not num_layers and n_vace:
        # A VACE module alone: assume the base it was cut from (Kijai's wrapper does the same).
        num_layers = BASE_LAYERS.get(dim, 2 * n_vace)
    return WanConfig(
        model_type=model_type,
        dim=dim,
        ffn_dim=ffn[0],
        num_heads=heads,
        num_layers=num_layers,
        in_dim=shapes.get("patch_embedding.weight", (0, 16))[1],
        out_dim=shapes.get("head.head.weight", (64,))[0] // 4,
        text_dim=shapes.get("text_embedding.0.weight", (0, 4096))[1],
        freq_dim=shapes.get("time_embedding.0.weight", (0, 256))[1],
        image_dim=shapes.get("img_emb.proj.1.weight", (1280,))[0],
        # The layer list is not stored either; ComfyUI spreads n add-on blocks evenly.
        vace_layers=tuple(range(0, num_layers, max(1, num_layers // n_vace)))[:n_vace] if n_vace else (),
        vace_in_dim=shapes.get("vace_patch_embedding.weight", (0, 96))[1],
    )


def _count(shapes, group: str) -> int:
    idx = {int(m.group(1)) for n in shapes if (m := re.match(rf"^{group}\.(\d+)\.", n))}
    return max(idx) + 1 if idx else 0
