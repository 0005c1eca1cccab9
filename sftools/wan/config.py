"""Wan 2.1 and 2.2 transformer configurations and the tensor shapes they imply (original names).

The shapes follow Wan-Video/Wan2.1 `wan/modules/model.py` and `vace_model.py` and Wan-Video/Wan2.2
`wan/modules/model.py`; they are written out here, independently of diffusers, so that tests can
check diffusers' names against them.

Wan 2.2 uses the same `WanModel` keys. What differs: TI2V-5B (`model_type` ti2v) has 48 latent
channels in and out (the Wan 2.2 VAE); an I2V-A14B expert takes 36 channels but has no CLIP branch
(no `img_emb`, `k_img`, `v_img`, `norm_k_img`); a T2V-A14B expert is shaped exactly like Wan 2.1
T2V-14B. Which A14B expert (high or low noise) a file holds is not a config fact: only its folder
or file name says it (`wan.experts`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class WanConfig:
    model_type: str = "t2v"  # t2v | i2v | flf2v | vace (Wan 2.1); t2v | i2v | ti2v (Wan 2.2)
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int = 1280
    vace_layers: tuple[int, ...] = field(default=())
    vace_in_dim: int = 96
    wan_version: str = "2.1"  # "2.2": no CLIP branch for i2v (shapes differ); t2v shapes are alike
    # umT5 rows the model attends over, padding included: the original `WanModel(text_len=512)`. Every
    # Wan model has 512; it shapes no tensor, only what the sampler and trainer pad a prompt to.
    text_len: int = 512

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def image_branch(self) -> bool:
        """The CLIP image branch (`img_emb`, `k_img`/`v_img`): Wan 2.1 I2V and FLF2V only; Wan 2.2
        conditions I2V by channel concatenation alone."""
        return self.model_type in ("i2v", "flf2v") and self.wan_version == "2.1"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "vace_layers": list(self.vace_layers)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WanConfig":
        data = json.loads(text)
        data["vace_layers"] = tuple(data.get("vace_layers", ()))
        return cls(**data)


T2V_1_3B = WanConfig()
T2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
I2V_14B = replace(T2V_14B, model_type="i2v", in_dim=36)
VACE_1_3B = replace(T2V_1_3B, model_type="vace", vace_layers=tuple(range(0, 30, 2)))
VACE_14B = replace(T2V_14B, model_type="vace", vace_layers=tuple(range(0, 40, 5)))
# Small enough for CPU tests, shaped like the real thing (head_dim 16 keeps RoPE's 3-way split even).
TINY = WanConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)
TINY_VACE = replace(TINY, model_type="vace", num_layers=4, vace_layers=(0, 2))
# Tiny with the real head_dim 128: its head count is read back from the width alone (dim / 128, as
# ComfyUI does), so pickles, which carry no config, describe it exactly. The demo uses it.
TINY_128 = WanConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, freq_dim=256)
TINY_128_VACE = replace(TINY_128, model_type="vace", vace_layers=(0, 1))  # the training recipes' tiny add-on
# Wan 2.2 (Wan-Video/Wan2.2 `wan/configs/wan_{t2v,i2v}_A14B.py`, `wan_ti2v_5B.py`): each A14B expert.
T2V_A14B = replace(T2V_14B, wan_version="2.2")
I2V_A14B = replace(I2V_14B, wan_version="2.2")
TI2V_5B = WanConfig(model_type="ti2v", dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48,
                    wan_version="2.2")
PRESETS = {
    "t2v-1.3B": T2V_1_3B, "t2v-14B": T2V_14B, "i2v-14B": I2V_14B,
    "vace-1.3B": VACE_1_3B, "vace-14B": VACE_14B, "tiny": TINY, "tiny-vace": TINY_VACE, "tiny-128": TINY_128,
    "tiny-i2v": replace(TINY, model_type="i2v", in_dim=36, image_dim=16),
    "t2v-A14B": T2V_A14B, "i2v-A14B": I2V_A14B, "ti2v-5B": TI2V_5B,
    "tiny-t2v-a14b": replace(TINY, wan_version="2.2"),
    "tiny-i2v-a14b": replace(TINY, model_type="i2v", in_dim=36, wan_version="2.2"),
    "tiny-ti2v": replace(TINY, model_type="ti2v", in_dim=48, out_dim=48, wan_version="2.2"),
}


def _block_shapes(prefix: str, d: int, f: int, image: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for attn in ("self_attn", "cross_attn"):
        for p in "qkvo":
            shapes[f"{prefix}{attn}.{p}.weight"] = (d, d)
            shapes[f"{prefix}{attn}.{p}.bias"] = (d,)
        shapes[f"{prefix}{attn}.norm_q.weight"] = (d,)
        shapes[f"{prefix}{attn}.norm_k.weight"] = (d,)
    if image:
        for p in ("k_img", "v_img"):
            shapes[f"{prefix}cross_attn.{p}.weight"] = (d, d)
            shapes[f"{prefix}cross_attn.{p}.bias"] = (d,)
        shapes[f"{prefix}cross_attn.norm_k_img.weight"] = (d,)
    shapes[f"{prefix}norm3.weight"] = (d,)
    shapes[f"{prefix}norm3.bias"] = (d,)
    shapes[f"{prefix}ffn.0.weight"] = (f, d)
    shapes[f"{prefix}ffn.0.bias"] = (f,)
    shapes[f"{prefix}ffn.2.weight"] = (d, f)
    shapes[f"{prefix}ffn.2.bias"] = (d,)
    shapes[f"{prefix}modulation"] = (1, 6, d)
    return shapes


def base_shapes(c: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the base transformer (no VACE add-on), in original names."""
    d, image = c.dim, c.image_branch
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, c.in_dim, 1, 2, 2),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, c.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, c.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
    }
    for i in range(c.num_layers):
        shapes.update(_block_shapes(f"blocks.{i}.", d, c.ffn_dim, image))
    shapes["head.head.weight"] = (c.out_dim * 4, d)
    shapes["head.head.bias"] = (c.out_dim * 4,)
    shapes["head.modulation"] = (1, 2, d)
    if image:
        e = c.image_dim
        shapes.update({
            "img_emb.proj.0.weight": (e,), "img_emb.proj.0.bias": (e,),
            "img_emb.proj.1.weight": (e, e), "img_emb.proj.1.bias": (e,),
            "img_emb.proj.3.weight": (d, e), "img_emb.proj.3.bias": (d,),
            "img_emb.proj.4.weight": (d,), "img_emb.proj.4.bias": (d,),
        })
        if c.model_type == "flf2v":
            shapes["img_emb.emb_pos"] = (1, 514, e)
    return shapes


def vace_shapes(c: WanConfig) -> dict[str, tuple[int, ...]]:
    """The VACE add-on alone: `vace_patch_embedding.*` and `vace_blocks.*`."""
    d = c.dim
    shapes: dict[str, tuple[int, ...]] = {
        "vace_patch_embedding.weight": (d, c.vace_in_dim, 1, 2, 2),
        "vace_patch_embedding.bias": (d,),
    }
    for n in range(len(c.vace_layers)):
        prefix = f"vace_blocks.{n}."
        if n == 0:
            shapes[prefix + "before_proj.weight"] = (d, d)
            shapes[prefix + "before_proj.bias"] = (d,)
        shapes.update(_block_shapes(prefix, d, c.ffn_dim, False))
        shapes[prefix + "after_proj.weight"] = (d, d)
        shapes[prefix + "after_proj.bias"] = (d,)
    return shapes


def model_shapes(c: WanConfig) -> dict[str, tuple[int, ...]]:
    shapes = base_shapes(c)
    if c.model_type == "vace":
        shapes.update(vace_shapes(c))
    return shapes


def diffusers_config(c: WanConfig) -> dict:
    """The `config.json` of the matching diffusers transformer class."""
    config = {
        "_class_name": "WanVACETransformer3DModel" if c.model_type == "vace" else "WanTransformer3DModel",
        "patch_size": [1, 2, 2],
        "num_attention_heads": c.num_heads,
        "attention_head_dim": c.head_dim,
        "in_channels": c.in_dim,
        "out_channels": c.out_dim,
        "text_dim": c.text_dim,
        "freq_dim": c.freq_dim,
        "ffn_dim": c.ffn_dim,
        "num_layers": c.num_layers,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "image_dim": c.image_dim if c.image_branch else None,
        "added_kv_proj_dim": c.dim if c.image_branch else None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": 514 if c.model_type == "flf2v" else None,
    }
    if c.model_type == "vace":
        config["vace_layers"] = list(c.vace_layers)
        config["vace_in_channels"] = c.vace_in_dim
    return config


def wan_config(c: WanConfig) -> dict:
    """The `config.json` Wan-AI ships beside each model folder's safetensors (Wan2.2 loads every
    expert with `WanModel.from_pretrained(dir, subfolder=...)`): the `WanModel` fields, text_dim
    only when it is not the real 4096 (tiny models)."""
    config = {
        "_class_name": "WanModel", "model_type": c.model_type, "dim": c.dim, "ffn_dim": c.ffn_dim,
        "freq_dim": c.freq_dim, "in_dim": c.in_dim, "out_dim": c.out_dim, "num_heads": c.num_heads,
        "num_layers": c.num_layers, "text_len": c.text_len, "eps": 1e-6,
    }
    if c.text_dim != 4096:
        config["text_dim"] = c.text_dim
    return config
