"""A Wan transformer in memory, from any source, with LoRAs merged in, on a device and in a dtype.

Weights come through `wan.source.load_model` (any file form, unwrapped, fp8 dequantized), LoRAs are
added one tensor at a time in fp32 (`lora.merge`), and each tensor is renamed to diffusers' name and
assigned into a `WanTransformer3DModel` built without initializing its parameters, so peak memory is
the model in its final dtype. Modules diffusers keeps in fp32 (`_keep_in_fp32_modules`: norms,
modulation tables, the time embedder) stay fp32 when a 16-bit dtype is asked for, as its
`from_pretrained(torch_dtype=...)` does.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

from sftools.errors import SftoolsError
from sftools.lora.forms import read_lora_file
from sftools.lora.keys import refuse_lora
from sftools.lora.merge import check_fits, merged_tensors
from sftools.wan.config import WanConfig, diffusers_config
from sftools.wan.keys import original_to_diffusers
from sftools.wan.source import load_model, model_config


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow and inexact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_transformer(path: str, loras: list[tuple[str, float]] = (), select: str | None = None,
                     device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                     ) -> tuple[WanTransformer3DModel, WanConfig]:
    """The model at `path` (any form sftools reads) plus each LORA x STRENGTH, ready to run."""
    ckpt = load_model(path, select, layout="original", dequant=True)
    refuse_lora(path, ckpt.tensors)
    config = model_config(ckpt)
    if config.model_type not in ("t2v", "i2v", "flf2v"):
        raise SftoolsError(f"{path}: is a {config.model_type} model; sample takes Wan 2.1 T2V/I2V transformers")
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    loaded = []
    for lora_path, strength in loras:
        lora = read_lora_file(lora_path)
        check_fits(lora_path, lora, shapes, path)
        loaded.append((lora, strength))
    tensors = merged_tensors(ckpt, loaded, None)
    names = original_to_diffusers(tensors)
    settings = {k: v for k, v in diffusers_config(config).items() if not k.startswith("_")}
    settings.pop("vace_layers", None), settings.pop("vace_in_channels", None)
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**settings)
    keep_fp32 = model._keep_in_fp32_modules or []
    state = {}
    for name, lazy in tensors.items():
        target = names[name]
        wanted = torch.float32 if any(m in target.split(".") for m in keep_fp32) else dtype
        state[target] = lazy.load().to(device=device, dtype=wanted)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope.to(device)  # its tables are buffers built at construction, on the CPU
    return model.eval().requires_grad_(False), config
