"""Several peft LoRA adapters on one frozen base transformer, chosen per call.

Self Forcing trains three full models (generator, critic, teacher). Here they share one frozen
base: the generator and the critic are peft LoRA adapters on it (`add_adapter` of diffusers'
`PeftAdapterMixin`), and the teacher is the base with adapters disabled, so memory is one model plus
adapters. Adapters are kept in original Wan names when they meet LoRA files (`lora.forms.Lora`), so a
generator can start from an extracted LoRA and be saved for `sftools sample --lora`.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig

from sftools.errors import SftoolsError
from sftools.lora.forms import Lora
from sftools.wan.keys import diffusers_name_to_original, original_to_diffusers

GENERATOR, CRITIC = "generator", "critic"
_LINEARS = r"attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2)"
# Every Linear of the blocks, as the lightx2v / Kijai LoRAs cover them.
TARGETS = rf"^blocks\.\d+\.({_LINEARS})$"
# Every Linear of a VACE add-on's blocks: the same, and the projections in (before_proj) and out (after_proj).
VACE_TARGETS = rf"^vace_blocks\.\d+\.({_LINEARS}|proj_in|proj_out)$"


def add_adapters(transformer: WanTransformer3DModel, rank: int, names: tuple[str, ...] = (GENERATOR, CRITIC),
                 targets: dict[str, str] | None = None) -> None:
    """Zero-initialized (lora_B = 0) adapters of `rank`, alpha = rank so the scale is 1 as in the
    LoRA files sftools writes, on the modules `targets[name]` matches (default: the blocks'
    Linears); the base is frozen."""
    transformer.requires_grad_(False)
    targets = targets or {}
    with warnings.catch_warnings():  # peft warns on a second adapter: several are the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        for name in names:
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets.get(name, TARGETS), init_lora_weights=True)
            transformer.add_adapter(config, adapter_name=name)


def named_adapter_parameters(transformer: WanTransformer3DModel, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in transformer.named_parameters() if f".{name}." in n and ".lora_" in n]


def adapter_parameters(transformer: WanTransformer3DModel, name: str) -> list[torch.nn.Parameter]:
    return [p for _, p in named_adapter_parameters(transformer, name)]


@contextlib.contextmanager
def using(transformer: WanTransformer3DModel, name: str | None) -> Iterator[None]:
    """Run with only adapter `name` active (None: the base alone, the teacher's view); its
    parameters are trainable, every other adapter's frozen."""
    if name is None:
        transformer.disable_adapters()
    else:
        transformer.enable_adapters()
        transformer.set_adapter(name)
        for p in adapter_parameters(transformer, name):
            p.requires_grad_(True)
    try:
        yield
    finally:
        transformer.enable_adapters()


def _lora_modules(transformer: WanTransformer3DModel, name: str) -> dict[str, torch.nn.Module]:
    """diffusers module name -> the peft layer holding adapter `name`."""
    return {n: m for n, m in transformer.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


@torch.no_grad()
def load_adapter(transformer: WanTransformer3DModel, name: str, lora: Lora) -> None:
    """Start adapter `name` from a LoRA read by `lora.forms` (any form sftools reads). Its factors
    must be of the adapter's rank and target its modules; dense diffs have no place in an adapter."""
    modules = _lora_modules(transformer, name)
    names = original_to_diffusers(lora.factors)
    for param, (up, down) in lora.factors.items():
        module = names[param].removesuffix(".weight")
        if module not in modules:
            raise SftoolsError(f"LoRA factor for {param} has no {name} adapter module (adapters cover the block Linears, "
                               "or a VACE add-on's)")
        layer = modules[module]
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if tuple(down.shape) != tuple(a.shape) or tuple(up.shape) != tuple(b.shape):
            raise SftoolsError(f"LoRA factor for {param} is rank {down.shape[0]}; the {name} adapter has rank {a.shape[0]}")
        a.copy_(down.to(a.dtype))
        b.copy_(up.to(b.dtype))


def adapter_lora(transformer: WanTransformer3DModel, name: str, values: dict[str, torch.Tensor] | None = None) -> Lora:
    """Adapter `name` as an in-memory LoRA in original names (scale 1: alpha = rank); `values`
    (parameter name -> tensor, such as an EMA) replaces the live weights where given."""
    values = values or {}
    params = dict(transformer.named_parameters())
    lora = Lora()
    for module in _lora_modules(transformer, name):
        a, b = f"{module}.lora_A.{name}.weight", f"{module}.lora_B.{name}.weight"
        up, down = (values.get(k, params[k]).detach().float().cpu().clone() for k in (b, a))
        lora.factors[diffusers_name_to_original(module + ".weight")] = (up, down)
    return lora
