"""The tiny LoRA files the loader tests feed to each loader's own code.

Built identically here and by `derive.py` (which ran the GPL / custom-licence loaders outside this
repository and recorded what they did in `observed.json`): seeded values on the tiny Wan configs, so
`fingerprint` of a case equals the one recorded.
"""

from __future__ import annotations

import zlib

import torch
from safetensors.torch import save_file

from sftools.io.sources import open_checkpoint
from sftools.lora.forms import Lora, convert_lora, lora_tensors
from sftools.wan.config import PRESETS, TINY, model_shapes
from sftools.wan.tiny import random_state_dict

CONFIGS = {"t2v": TINY, "i2v": PRESETS["tiny-i2v"]}
FOR_SOURCES = ("comfyui_t2v", "comfyui_i2v", "diffusers_t2v")  # the files `--for` is tested on


def base(kind: str) -> dict[str, torch.Tensor]:
    return random_state_dict(CONFIGS[kind], seed=0)


def planted(kind: str, rank: int = 2) -> Lora:
    """Factors for every 2-D weight and a dense change of everything else, as `lora extract` makes them."""
    gen = torch.Generator().manual_seed(11)
    lora = Lora()
    for name, shape in model_shapes(CONFIGS[kind]).items():
        if len(shape) == 2:
            lora.factors[name] = (0.3 * torch.randn(shape[0], rank, generator=gen),
                                  0.3 * torch.randn(rank, shape[1], generator=gen))
        else:
            lora.diffs[name] = 0.05 * torch.randn(shape, generator=gen)
    return lora


def _pair(gen: torch.Generator, out: int, inp: int, rank: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return 0.3 * torch.randn(out, rank, generator=gen), 0.3 * torch.randn(rank, inp, generator=gen)


def _edges() -> dict[str, dict[str, torch.Tensor]]:
    """Hand-made files, each for one corner of the key grammar (TINY: dim 32, ffn 64, 2 blocks)."""
    g = torch.Generator().manual_seed(12)
    dm = "diffusion_model."
    q, f0 = "blocks.0.self_attn.q", "blocks.0.ffn.0"

    def pair(prefix: str, module: str, out: int, inp: int, up="lora_up", down="lora_down") -> dict:
        u, d = _pair(g, out, inp)
        return {f"{prefix}{module}.{up}.weight": u, f"{prefix}{module}.{down}.weight": d}

    musubi = {}
    for b in range(2):
        for m in [*(f"{a}_attn_{x}" for a in ("self", "cross") for x in "qkvo"), "ffn_0", "ffn_2"]:
            out, inp = (64, 32) if m == "ffn_0" else (32, 64) if m == "ffn_2" else (32, 32)
            musubi |= pair("lora_unet_", f"blocks_{b}_{m}", out, inp) | {f"lora_unet_blocks_{b}_{m}.alpha": torch.tensor(3.0)}
    return {
        "edge_alpha": pair(dm, q, 32, 32) | {f"{dm}{q}.alpha": torch.tensor(3.0)}
        | pair(dm, f0, 64, 32, "lora_B", "lora_A") | {f"{dm}{f0}.alpha": torch.tensor(1.0)},
        "edge_global_alpha": pair(dm, q, 32, 32) | pair(dm, "head.head", 64, 32) | {f"{dm}head.head.alpha": torch.tensor(3.0)},
        "edge_bare": pair("", q, 32, 32) | pair("", "head.head", 64, 32) | {"blocks.0.norm3.diff": 0.05 * torch.randn(32, generator=g)},
        "edge_kohya": musubi,
        "edge_both": pair(dm, q, 32, 32) | pair(dm, f0, 64, 32) | {f"{dm}{f0}.diff": 0.05 * torch.randn(64, 32, generator=g)},
        "edge_5d": pair(dm, q, 32, 32) | {f"{dm}patch_embedding.lora_up.weight": 0.3 * torch.randn(32, 2, 1, 1, 1, generator=g),
                                          f"{dm}patch_embedding.lora_down.weight": 0.3 * torch.randn(2, 16, 1, 2, 2, generator=g)},
        "edge_lora_b_bias": pair(dm, q, 32, 32, "lora_B", "lora_A") | {f"{dm}{q}.lora_B.bias": 0.05 * torch.randn(32, generator=g)},
        "edge_model_prefix": pair("model." + dm, q, 32, 32) | {f"model.{dm}{q}.diff_b": 0.05 * torch.randn(32, generator=g)},
        "edge_dense": pair(dm, f0, 64, 32) | {f"{dm}{q}.diff": 0.05 * torch.randn(32, 32, generator=g),
                                              f"{dm}{q}.diff_b": 0.05 * torch.randn(32, generator=g),
                                              f"{dm}head.head.diff": 0.05 * torch.randn(64, 32, generator=g),
                                              f"{dm}head.head.diff_b": 0.05 * torch.randn(64, generator=g)},
        "edge_orphan_up": pair(dm, f0, 64, 32) | {f"{dm}{q}.lora_up.weight": 0.3 * torch.randn(32, 2, generator=g)},
    }


def cases() -> dict[str, tuple[str, dict[str, torch.Tensor], dict[str, str]]]:
    """name -> (model kind, key -> tensor, metadata)."""
    t2v, i2v = planted("t2v"), planted("i2v")
    out = {
        "comfyui_t2v": ("t2v", lora_tensors(t2v, "comfyui")[0], {}),
        "comfyui_i2v": ("i2v", lora_tensors(i2v, "comfyui")[0], {}),
        "diffusers_t2v": ("t2v", *lora_tensors(t2v, "diffusers")[:2]),
        "lightx2v_t2v": ("t2v", lora_tensors(t2v, "comfyui", modulation="diff_m")[0], {}),
    }
    return out | {name: ("t2v", tensors, {}) for name, tensors in _edges().items()}


def write(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata or None)
    return path


def for_loader(tmp: str, source: str, loader: str) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """`sftools lora convert SOURCE --for LOADER` of a case: the path written, its tensors, what was left out."""
    _, tensors, metadata = cases()[source]
    src = write(f"{tmp}/{source}.safetensors", tensors, metadata)
    out = f"{tmp}/{source}_for_{loader}.safetensors"
    left_out = convert_lora(src, out, None, "keep", loader)
    ckpt = open_checkpoint(out)
    return out, {k: t.load() for k, t in ckpt.tensors.items()}, left_out


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """CRC of names, shapes and bytes in name order: the same file the observations were made on."""
    crc = 0
    for name in sorted(tensors):
        t = tensors[name].contiguous().float()
        crc = zlib.crc32(f"{name}{list(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.numpy().tobytes(), crc)
    return f"{crc:08x}"
