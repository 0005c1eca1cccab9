"""Random Wan 2.1 and 2.2 checkpoints in every real file layout, for tests and `sftools demo`.

Nothing is downloaded: weights are drawn from a seeded generator with the shapes of `WanConfig`, and
written the way the real files are (a bare safetensors file, ComfyUI's `model.diffusion_model.`
prefix, a diffusers folder with `config.json`, or a Self Forcing `.pt` with `generator`,
`generator_ema` and `critic` under `model.` and FSDP wrappers), and Wan 2.2 A14B folders with both
experts (Wan-AI's `high_noise_model/` + `low_noise_model/`, or a diffusers pipeline's
`transformer/` + `transformer_2/`).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from sftools.wan.config import TINY, WanConfig, diffusers_config, model_shapes, wan_config
from sftools.wan.experts import EXPERT_FOLDERS
from sftools.wan.keys import original_to_diffusers

LAYOUTS = ("original", "comfyui", "diffusers", "self-forcing")


def random_state_dict(config: WanConfig = TINY, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Original-named random weights; norms near 1 and modulations small, like trained models."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in model_shapes(config).items():
        t = torch.randn(shape, generator=gen) * (0.5 / max(1, shape[-1]) ** 0.5 if len(shape) >= 2 else 0.02)
        if ".norm" in name and name.endswith(".weight") or name.startswith("img_emb.proj.0.weight"):
            t = 1.0 + t
        if name.endswith("modulation"):
            t = torch.randn(shape, generator=gen) / config.dim**0.5
        out[name] = t.to(dtype)
    return out


def perturbed(
    state: dict[str, torch.Tensor],
    rank: int | None = 4,
    scale: float = 0.05,
    seed: int = 1,
    unchanged: tuple[str, ...] = ("patch_embedding.bias",),
) -> dict[str, torch.Tensor]:
    """A "distilled" copy of `state`: changes of rank `rank` (full rank if None) on Linear weights,
    small dense changes on biases, norms and modulation, and the `unchanged` tensors kept."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in state.items():
        if name in unchanged:
            out[name] = w.clone()
        elif w.dim() == 2:
            m, n = w.shape
            d = torch.randn(m, n, generator=gen) if rank is None else \
                torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)
            out[name] = w + scale * d / n**0.5
        else:
            out[name] = w + 0.01 * torch.randn(w.shape, generator=gen)
    return out


def write_checkpoint(
    path: str,
    state: dict[str, torch.Tensor],
    layout: str = "original",
    config: WanConfig = TINY,
) -> str:
    """Write original-named `state` in `layout`; returns the path to hand to sftools."""
    meta = {"format": "pt", "sftools.config": config.to_json()}
    if layout == "original":
        save_file(_contiguous(state), path, metadata=meta)
    elif layout == "comfyui":
        save_file(_contiguous({f"model.diffusion_model.{k}": v for k, v in state.items()}), path, metadata=meta)
    elif layout == "diffusers":
        os.makedirs(path, exist_ok=True)
        names = original_to_diffusers(state)
        save_file(_contiguous({names[k]: v for k, v in state.items()}),
                  os.path.join(path, "diffusion_pytorch_model.safetensors"), metadata=meta)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(diffusers_config(config), f, indent=2)
    elif layout == "self-forcing":
        wrapped = {f"model._fsdp_wrapped_module.{k}": v for k, v in state.items()}
        torch.save({
            "generator": {f"model.{k}": v.clone() for k, v in state.items()},
            "generator_ema": {f"model.{k}": v for k, v in state.items()},
            "critic": {k: torch.zeros_like(v) for k, v in wrapped.items()},
            "step": 100,
        }, path)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    return path


def write_a14b(
    folder: str,
    experts: dict[str, dict[str, torch.Tensor]],
    layout: str = "original",
    config: WanConfig = TINY,
    shards: int = 1,
) -> str:
    """A Wan 2.2 A14B folder from original-named `experts` ({"high_noise": state, "low_noise": state}):
    Wan-AI's (`layout` original: each expert a folder with its `WanModel` config.json and
    `diffusion_pytorch_model.safetensors`, or `shards` files plus their index) or a diffusers
    pipeline's (`transformer/`, `transformer_2/`); returns `folder`."""
    for expert, state in experts.items():
        sub = os.path.join(folder, EXPERT_FOLDERS[layout][expert])
        if layout == "diffusers":
            write_checkpoint(sub, state, "diffusers", config)
            continue
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "config.json"), "w") as f:
            json.dump(wan_config(config), f, indent=2)
        _write_shards(sub, state, config, shards)
    return folder


def _write_shards(folder: str, state: dict[str, torch.Tensor], config: WanConfig, shards: int) -> None:
    meta = {"format": "pt", "sftools.config": config.to_json()}
    if shards == 1:
        save_file(_contiguous(state), os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata=meta)
        return
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i::shards]}
        save_file(_contiguous(part), os.path.join(folder, file), metadata=meta)
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}
