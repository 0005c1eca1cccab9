"""Run city96's ComfyUI-GGUF loader on a GGUF file, offline, without ComfyUI.

The oracle for `sftools convert --quant`: the upstream files are vendored UNCHANGED in
`tests/upstream/comfyui_gguf/` (city96/ComfyUI-GGUF @ UPSTREAM_COMMIT, Apache-2.0; see NOTICE.md
there) and imported under a private package name; the ComfyUI modules `ops.py` imports are stood
in for only while it is imported (see NOTICE.md).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

UPSTREAM_REPO = "city96/ComfyUI-GGUF"
UPSTREAM_COMMIT = "795e45156ece99afbc3efef911e63fcb46e6a20d"
UPSTREAM_DIR = Path(__file__).resolve().with_name("comfyui_gguf")
VENDORED_BLOBS = {
    "LICENSE": "261eeb9e9f8b2b4b0d119366dda99c6fd7d35c64",
    "loader.py": "1948027f9e70d75f0e1ab8d0bb3446b22fc6cbdd",
    "ops.py": "88a352e2abc78055a7a6e3933fc46b77b8a5c4ac",
    "dequant.py": "78f5f266aaffd1a7f2502e0bf924a8260e7cf9b4",
}
_PRIVATE = "_sftools_upstream_comfyui_gguf"
_loaded: types.SimpleNamespace | None = None


class _ManualCast:
    """Stands in for `comfy.ops.manual_cast`: ops.py subclasses its layer classes."""

    Linear, Conv2d, Embedding = torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding
    LayerNorm, GroupNorm = torch.nn.LayerNorm, torch.nn.GroupNorm


def comfyui_gguf() -> types.SimpleNamespace:
    """The vendored modules `loader`, `ops` and `dequant`, imported once per process."""
    global _loaded
    if _loaded is not None:
        return _loaded
    comfy = {"comfy": types.ModuleType("comfy"), "comfy.ops": types.ModuleType("comfy.ops"),
             "comfy.lora": types.ModuleType("comfy.lora"),
             "comfy.model_management": types.ModuleType("comfy.model_management")}
    comfy["comfy.ops"].manual_cast = _ManualCast
    for name, module in comfy.items():
        if "." in name:
            setattr(comfy["comfy"], name.split(".")[1], module)
    saved = {name: sys.modules.get(name) for name in comfy}
    root = types.ModuleType(_PRIVATE)
    root.__path__ = [str(UPSTREAM_DIR)]
    sys.modules[_PRIVATE] = root
    sys.modules.update(comfy)
    try:
        modules = {}
        for name in ("dequant", "ops", "loader"):  # each imports the ones before it
            spec = importlib.util.spec_from_file_location(f"{_PRIVATE}.{name}", UPSTREAM_DIR / f"{name}.py")
            modules[name] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    _loaded = types.SimpleNamespace(**modules)
    return _loaded


def load_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict of GGMLTensors, architecture) as ComfyUI-GGUF's UnetLoaderGGUF reads `path`."""
    return comfyui_gguf().loader.gguf_sd_loader(path, return_arch=True)


def linear_weight(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  dequant_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a `GGMLOps.Linear` computes with, once these tensors are loaded into it
    (its own `_load_from_state_dict` and `get_weight`). `dequant_dtype` None is the node's default."""
    out_features, in_features = weight.shape
    layer = comfyui_gguf().ops.GGMLOps.Linear(in_features, out_features)
    layer.dequant_dtype = dequant_dtype
    layer.load_state_dict({"weight": weight, **({"bias": bias} if bias is not None else {})})
    return layer.get_weight(layer.weight, dtype), layer.get_weight(layer.bias, dtype)
