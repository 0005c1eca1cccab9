"""The networks a training run updates, and the one it learns from, behind one interface.

Two ways to hold them:
- `LoraNetworks` (the default, `model.train: lora`): the generator and the critic are LoRA adapters
  on one frozen base (`adapters.py`); the teacher is the base with adapters off. Memory is one model
  plus adapters.
- `FullNetworks` (`model.train: full`): the generator and the critic are full trainable copies of the
  base, as Self Forcing trains them, and the frozen base is the teacher. Three models: for small ones.

On a VACE model (`vace=True`) the generator is the add-on: its adapter covers the `vace_blocks`
only (or, full, only the add-on's weights train), so the base stays what it was and the result is
an add-on module; the critic covers the blocks and the add-on, as it must model the generator's
videos under the control.

The trainer asks for a role (GENERATOR, CRITIC, or None for the teacher's view) and gets the
`CausalWanModel` that plays it; parameter names are unique across roles, so checkpoints and the EMA
key them the same way in both.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator

import torch
from diffusers import WanTransformer3DModel

from sftools.errors import SftoolsError
from sftools.lora.forms import Lora
from sftools.models.causal_wan import CausalWanModel
from sftools.training.adapters import (CRITIC, GENERATOR, TARGETS, VACE_TARGETS, adapter_lora, add_adapters,
                                      load_adapter, named_adapter_parameters, using)
from sftools.wan.keys import diffusers_name_to_original, original_to_diffusers

ROLES = (GENERATOR, CRITIC)


class LoraNetworks:
    """Generator and critic adapters on one frozen base, switched per call."""

    kind = "lora"

    def __init__(self, transformer: WanTransformer3DModel, rank: int, seed: int, init: Lora | None = None,
                 vace: bool = False) -> None:
        targets = {GENERATOR: VACE_TARGETS, CRITIC: f"(?:{TARGETS})|(?:{VACE_TARGETS})"} if vace else None
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
            torch.manual_seed(seed)
            add_adapters(transformer, rank, targets=targets)
        if init is not None:
            load_adapter(transformer, GENERATOR, init)
        self.transformer = transformer
        self.model = CausalWanModel(transformer)

    def sharded(self, transformer: WanTransformer3DModel) -> None:
        """After FSDP sharded the base and its adapters (FSDP2 shards the module in place, so its
        processors and RoPE hook stay installed)."""
        self.transformer = self.model.transformer = transformer

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer]

    @contextlib.contextmanager
    def playing(self, role: str | None) -> Iterator[CausalWanModel]:
        with using(self.transformer, role):
            yield self.model

    def named(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        return named_adapter_parameters(self.transformer, role)

    def generator_weights(self, values: dict[str, torch.Tensor]) -> Lora:
        """The generator adapter as a LoRA in original names, `values` (the EMA) where given."""
        return adapter_lora(self.transformer, GENERATOR, values)

    @torch.no_grad()
    def addon_weights(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The VACE add-on in original names, fp32, with the generator adapter (`values` where given) merged in."""
        lora = self.generator_weights(values)
        out = {}
        for name, param in self.transformer.named_parameters():
            if name.startswith("vace_") and ".lora_" not in name:
                original = diffusers_name_to_original(name.replace(".base_layer.", "."))
                weight = param.detach().float().cpu()
                delta = lora.delta(original, tuple(weight.shape))
                out[original] = (weight if delta is None else weight + delta).contiguous()
        return out


class FullNetworks:
    """Full trainable copies of the base as generator and critic; the base itself is the frozen teacher."""

    kind = "full"

    def __init__(self, transformer: WanTransformer3DModel, init: Lora | None = None, vace: bool = False) -> None:
        transformer.requires_grad_(False)
        self.transformer = transformer
        self.copies = {role: copy.deepcopy(transformer).requires_grad_(True) for role in ROLES}
        if vace:  # the generator is the add-on: the base's weights in it stay the base's
            for name, param in self.copies[GENERATOR].named_parameters():
                param.requires_grad_(name.startswith("vace_"))
        self.teacher = CausalWanModel(transformer)  # after the copies: each gets its own processors and hook
        if init is not None:
            merge_into(self.copies[GENERATOR], init)
        self.models = {role: CausalWanModel(module) for role, module in self.copies.items()}

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, *self.copies.values()]

    @contextlib.contextmanager
    def playing(self, role: str | None) -> Iterator[CausalWanModel]:
        yield self.teacher if role is None else self.models[role]

    def named(self, role: str) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"{role}.{n}", p) for n, p in self.copies[role].named_parameters() if p.requires_grad]

    def generator_weights(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator's trained state in original Wan names (the whole model, or the add-on),
        `values` (the EMA) where given."""
        return {diffusers_name_to_original(n.removeprefix(f"{GENERATOR}.")): values.get(n, p).detach().cpu().contiguous()
                for n, p in self.named(GENERATOR)}

    def addon_weights(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The VACE add-on in original names, fp32 (`values` where given)."""
        return {n: t.float() for n, t in self.generator_weights(values).items()}


@torch.no_grad()
def merge_into(transformer: WanTransformer3DModel, lora: Lora) -> None:
    """Add a LoRA's change to the weights it targets (a full generator starting from a LoRA)."""
    params = dict(transformer.named_parameters())
    for original, name in original_to_diffusers(lora.params).items():
        if name not in params:
            raise SftoolsError(f"the LoRA changes {original}, which the base does not have")
        param = params[name]
        if not _fits(lora, original, tuple(param.shape)):
            raise SftoolsError(f"the LoRA's change to {original} does not fit the base's {list(param.shape)}")
        param.add_(lora.delta(original, tuple(param.shape)).to(param.dtype))


def _fits(lora: Lora, original: str, shape: tuple[int, ...]) -> bool:
    if original in lora.factors:
        up, down = lora.factors[original]
        if up.shape[0] != shape[0] or down[0].numel() != math.prod(shape[1:]):
            return False
    return original not in lora.diffs or lora.diffs[original].numel() == math.prod(shape)
