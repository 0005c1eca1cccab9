"""A Wan transformer in memory, from any source, with LoRAs merged in, on a device and in a dtype.

Weights come through `wan.source.load_model` (any file form, unwrapped, fp8 dequantized), a VACE
add-on module given apart is merged in by name, LoRAs are added one tensor at a time in fp32
(`lora.merge`), and each tensor is renamed to diffusers' name and assigned into a
`WanTransformer3DModel` (`WanVACETransformer3DModel` with an add-on) built without initializing its
parameters, so peak memory is the model in its final dtype. Modules diffusers keeps in fp32
(`_keep_in_fp32_modules`: norms, modulation tables, the time embedder) stay fp32 when a 16-bit
dtype is asked for, as its `from_pretrained(torch_dtype=...)` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint
from sftools.lora.forms import Lora, read_lora_file
from sftools.lora.keys import refuse_lora
from sftools.lora.merge import check_fits, merged_tensors
from sftools.wan.config import WanConfig, diffusers_config
from sftools.wan.keys import original_to_diffusers
from sftools.wan.source import load_model, model_config
from sftools.wan.vace import fit, read_addon


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow and inexact)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class ModelPlan:
    """A model opened for sampling: its lazy tensors, config and checked LoRAs; nothing loaded yet."""

    checkpoint: Checkpoint
    config: WanConfig
    loras: list[tuple[Lora, float]]

    @property
    def files(self) -> list[str]:
        return [*self.checkpoint.files, *(f for lora, _ in self.loras for f in lora.files)]


def plan_model(path: str, loras: list[tuple[str, float]] = (), select: str | None = None,
               vace: str | None = None) -> ModelPlan:
    """Open the model (with the VACE add-on module `vace` grafted on) and its LoRAs and check
    everything the sampler needs, before any weight is read: minutes of text encoding or loading
    are never spent on a model that cannot run."""
    ckpt = load_model(path, select, layout="original", dequant=True)
    refuse_lora(path, ckpt.tensors)
    config = model_config(ckpt)
    if config.model_type not in ("t2v", "vace") or config.wan_version != "2.1":
        raise SftoolsError(f"{path}: is a Wan {config.wan_version} {config.model_type} model; the sampler takes Wan 2.1 "
                           "T2V transformers (Self Forcing, CausVid, lightx2v's T2V models, and T2V + VACE), "
                           "with no image input")
    if vace:
        ckpt, config = graft_vace(path, ckpt, config, vace)
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    loaded = []
    for lora_path, strength in loras:
        lora = read_lora_file(lora_path)
        check_fits(lora_path, lora, shapes, path)
        loaded.append((lora, strength))
    return ModelPlan(ckpt, config, loaded)


def graft_vace(base_path: str, base: Checkpoint, config: WanConfig, module_path: str) -> tuple[Checkpoint, WanConfig]:
    """The base and the add-on module merged by name, in memory, and the config of the union, with
    the checks `sftools vace graft` makes before it writes the same union to a file."""
    if config.model_type == "vace":
        raise SftoolsError(f"{base_path}: already holds a VACE add-on; give it no add-on module ({module_path})")
    addon = read_addon(module_path)
    own, grafted = fit(base_path, base, addon, module_path)
    metadata = {**base.metadata, "sftools.config": grafted.to_json()}
    merged = Checkpoint(base.path, base.format, {**own, **addon.tensors}, metadata,
                        base.notes + addon.ckpt.notes, base.files + addon.ckpt.files)
    return merged, grafted


def load_transformer(path: str | ModelPlan, loras: list[tuple[str, float]] = (), select: str | None = None,
                     device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                     ) -> tuple[WanTransformer3DModel | WanVACETransformer3DModel, WanConfig]:
    """The model at `path` (any form sftools reads, or a plan of it) plus each LORA x STRENGTH, ready to run."""
    plan = path if isinstance(path, ModelPlan) else plan_model(path, loras, select)
    tensors = merged_tensors(plan.checkpoint, plan.loras, None)
    names = original_to_diffusers(tensors)
    settings = {k: v for k, v in diffusers_config(plan.config).items() if not k.startswith("_")}
    cls = WanVACETransformer3DModel if plan.config.model_type == "vace" else WanTransformer3DModel
    with init_empty_weights(include_buffers=False):
        model = cls(**settings)
    keep_fp32 = model._keep_in_fp32_modules or []
    state = {}
    for name, lazy in tensors.items():
        target = names[name]
        wanted = torch.float32 if any(m in target.split(".") for m in keep_fp32) else dtype
        state[target] = lazy.load().to(device=device, dtype=wanted)
    model.load_state_dict(state, strict=True, assign=True)
    model.rope.to(device)  # its tables are buffers built at construction, on the CPU
    return model.eval().requires_grad_(False), plan.config
