"""What a set of weights is: Wan model kind and size, or VACE module, from names and shapes.

The rules follow ComfyUI's `detect_unet_config` and diffusers' single-file detection: `head.modulation`
marks a Wan transformer, `vace_patch_embedding` a VACE model, `img_emb` an image-conditioned one; the
dimensions come from the tensor shapes, so tiny test models are described as exactly as real ones.

Wan 2.2 (reference wan22.md §5): 48 latent channels out (and in) can only come from the Wan 2.2 VAE,
so that is TI2V; 36 channels in without the CLIP keys is an I2V-A14B expert (Wan 2.1 I2V and FLF2V
always have them). A T2V-A14B expert is shaped like Wan 2.1 T2V-14B: only a name saying
`high_noise` / `low_noise` tells it, and names which expert it is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from sftools.errors import SftoolsError
from sftools.wan.config import WanConfig, model_shapes, vace_shapes
from sftools.wan.experts import EXPERTS, expert_from_name
from sftools.wan.keys import detect_layout, diffusers_to_original

SIZES = {"2.1": {(1536, 30): "1.3B", (5120, 40): "14B"}, "2.2": {(3072, 30): "5B", (5120, 40): "A14B"}}
BASE_LAYERS = {1536: 30, 5120: 40}
WAN22_LATENT_CHANNELS = 48  # the Wan 2.2 VAE's z_dim; the Wan 2.1 VAE has 16


@dataclass
class Description:
    kind: str  # "wan2.1 t2v|i2v|flf2v|vace" | "wan2.2 t2v|i2v|ti2v" | "vace module" | "lora" | "unknown"
    layout: str
    size: str = ""
    config: WanConfig | None = None
    details: dict = field(default_factory=dict)
    expert: str = ""  # Wan 2.2 A14B: "high_noise" | "low_noise" when a name says it

    @property
    def is_model(self) -> bool:
        """A whole Wan transformer (not a VACE module alone, a LoRA or anything else)."""
        return self.kind.startswith("wan")

    @property
    def title(self) -> str:
        return " ".join(p for p in (self.kind, self.size, self.expert and f"{self.expert} expert") if p)

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "size": self.size, "layout": self.layout, **self.details}
        if self.expert:
            out["expert"] = self.expert
        if self.config is not None:
            out["config"] = {**asdict(self.config), "vace_layers": list(self.config.vace_layers)}
        return out


def describe_weights(shapes: dict[str, tuple[int, ...]], num_heads: int | None = None, name: str = "",
                     expert: str | None = None) -> Description:
    """Describe model weights given by clean (unwrapped) names and shapes. `expert` (the sub-folder
    of an A14B folder they came from), else `name` (their file or folder), tells a Wan 2.2 A14B
    expert (`high_noise` / `low_noise`) from Wan 2.1."""
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
    if config.model_type not in ("t2v", "i2v") or config.image_branch:
        expert = None  # Wan 2.1 I2V, FLF2V, VACE and TI2V-5B are single models whatever their name
    elif expert is None and name:
        expert = expert_from_name(name)
    if expert:
        config = replace(config, wan_version="2.2")
    expected = model_shapes(config) if "head.modulation" in shapes else vace_shapes(config)
    kind = "vace module" if "head.modulation" not in shapes else f"wan{config.wan_version} {config.model_type}"
    details = {"missing": sorted(set(expected) - set(shapes)), "unexpected": sorted(set(shapes) - set(expected))}
    details["mismatched"] = sorted(n for n in set(expected) & set(shapes) if tuple(expected[n]) != tuple(shapes[n]))
    size = SIZES[config.wan_version].get((config.dim, config.num_layers),
                                         f"custom (dim {config.dim}, {config.num_layers} layers)")
    return Description(kind, layout, size, config, details, expert or "")


def describe_experts(path: str, experts: dict[str, Description]) -> Description:
    """One A14B model from the descriptions of its experts, which must be of one kind and size."""
    high, low = (experts[e] for e in EXPERTS)
    if not high.is_model or (high.kind, high.size) != (low.kind, low.size):
        raise SftoolsError(f"{path}: the experts are not one A14B model: high_noise is {high.title or high.kind}, "
                           f"low_noise is {low.title or low.kind}")
    return Description(high.kind, high.layout, high.size, high.config, {"task": high.kind.split()[-1]})


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
    in_dim = shapes.get("patch_embedding.weight", (0, 16))[1]
    out_dim = shapes.get("head.head.weight", (64,))[0] // 4
    model_type, version = "t2v", "2.1"
    if "vace_patch_embedding.weight" in shapes:
        model_type = "vace"
    elif "img_emb.emb_pos" in shapes:
        model_type = "flf2v"
    elif any(n.startswith("img_emb.") or ".cross_attn.k_img." in n for n in shapes):
        model_type = "i2v"
    elif out_dim == WAN22_LATENT_CHANNELS:
        # Only the Wan 2.2 VAE has 48 latent channels (a 48-channel input alone may be Fun-Control's).
        model_type, version = "ti2v", "2.2"
    elif in_dim == 36:
        # Noise + mask + image latent, without the CLIP branch Wan 2.1 I2V always has.
        model_type, version = "i2v", "2.2"
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
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=shapes.get("text_embedding.0.weight", (0, 4096))[1],
        freq_dim=shapes.get("time_embedding.0.weight", (0, 256))[1],
        image_dim=shapes.get("img_emb.proj.1.weight", (1280,))[0],
        # The layer list is not stored either; ComfyUI spreads n add-on blocks evenly.
        vace_layers=tuple(range(0, num_layers, max(1, num_layers // n_vace)))[:n_vace] if n_vace else (),
        vace_in_dim=shapes.get("vace_patch_embedding.weight", (0, 96))[1],
        wan_version=version,
    )


def _count(shapes, group: str) -> int:
    idx = {int(m.group(1)) for n in shapes if (m := re.match(rf"^{group}\.(\d+)\.", n))}
    return max(idx) + 1 if idx else 0
