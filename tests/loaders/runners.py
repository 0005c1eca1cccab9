"""Run the real key-handling code of the Apache-2.0 loaders on a LoRA file, on CPU, offline.

- LightX2V: `lora_loader.py` vendored unchanged (see NOTICE.md); `LoRALoader().apply_lora` on the
  original-named weights, as `LoraAdapter.apply_lora` calls it for merged LoRAs.
- DiffSynth-Studio: `general.py` vendored unchanged; `convert_state_dict` then `fuse_lora_to_base_model`
  on a module tree with Wan's names, as `BasePipeline.load_lora` calls them (base_pipeline.py
  l.261 and l.280 at fed7b18), on the file read as `load_state_dict_from_safetensors` reads it.
- diffusers (installed, Apache-2.0): `WanPipeline.load_lora_weights`, then `fuse_lora`.

Each returns the merged original-named weights, or raises when the loader fails on the file.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import sys
import types

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
# git blob ids of the vendored files at the commits NOTICE.md names; test_lora_loaders checks them
VENDORED_BLOBS = {
    "lightx2v/lora_loader.py": "1f873140afe865da63cb0987cf5d43d1470e7a50",
    "lightx2v/LICENSE": "261eeb9e9f8b2b4b0d119366dda99c6fd7d35c64",
    "diffsynth/general.py": "85ada77598b563c597bdd9d638076eeadc896669",
    "diffsynth/LICENSE": "0e5a49f5f70af9e9d37278f72315d1b1afd34895",
}


def _load(relative: str, name: str) -> types.ModuleType:
    """Import a vendored file under a private name; LightX2V's loguru logger becomes stdlib logging
    when loguru is not installed (only its log calls use it)."""
    if "loguru" not in sys.modules and importlib.util.find_spec("loguru") is None:
        sys.modules["loguru"] = types.SimpleNamespace(logger=logging.getLogger("lightx2v"))
    spec = importlib.util.spec_from_file_location(name, HERE / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_lightx2v(path: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    loader = _load("lightx2v/lora_loader.py", "_sftools_vendored_lightx2v_lora_loader").LoRALoader()
    weights = {k: v.clone() for k, v in base.items()}
    loader.apply_lora(weight_dict=weights, lora_weights=load_file(path), strength=1.0)
    return weights


class _RMSNorm(nn.Module):
    """A norm with a weight and no bias, as Wan's RMSNorm (its forward is never run here)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


def _leaf(weight: torch.Tensor, has_bias: bool) -> nn.Module:
    if weight.dim() == 2:
        return nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    if weight.dim() == 5:
        return nn.Conv3d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=has_bias)
    return nn.LayerNorm(weight.shape[0]) if has_bias else _RMSNorm(weight.shape[0])


def module_tree(state: dict[str, torch.Tensor]) -> nn.Module:
    """Modules named as Wan's (Linear, Conv3d, LayerNorm, RMSNorm; modulation as a Parameter),
    holding `state`."""
    root = nn.Module()
    for name, value in state.items():
        *path, leaf = name.split(".")
        owner, module_path = (path, None) if leaf not in ("weight", "bias") else (path[:-1], path[-1])
        parent = root
        for part in owner:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if module_path is None:
            parent.register_parameter(leaf, nn.Parameter(value.clone()))
        elif not hasattr(parent, module_path):
            stem = ".".join(path)
            parent.add_module(module_path, _leaf(state[f"{stem}.weight"], f"{stem}.bias" in state))
    root.load_state_dict(state)
    return root


def run_diffsynth(path: str, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    general = _load("diffsynth/general.py", "_sftools_vendored_diffsynth_general")
    with safe_open(path, framework="pt") as f:
        lora = {k: f.get_tensor(k) for k in f.keys()}
    model = module_tree(base)
    loader = general.GeneralLoRALoader(torch_dtype=torch.float32, device="cpu")
    lora = loader.convert_state_dict(lora)
    loader.fuse_lora_to_base_model(model, lora, alpha=1)
    return {k: v.detach() for k, v in model.state_dict().items()}


def run_diffusers(path: str, base: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    from loaders.cases import CONFIGS
    from test_lora import diffusers_fused

    return diffusers_fused(path, base, CONFIGS[kind])
