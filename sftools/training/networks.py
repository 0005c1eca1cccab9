"""The networks a training run updates, and the one it learns from, behind one interface.

Two ways to hold them:
- `LoraNetworks` (the default, `model.train: lora`): the generator and the critic are LoRA adapters
  on one frozen base (`adapters.py`); the teacher is the base with adapters off. Memory is one model
  plus adapters.
- `FullNetworks` (`model.train: full`): the generator and the critic are full trainable copies of the
  base, as Self Forcing trains them, and the frozen base is the teacher. Three models: for small ones.

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
from sftools.training.adapters import (CRITIC, GENERATOR, adapter_lora, add_adapters, load_adapter,
                                      named_adapter_parameters, using)
from sftools.wan.keys import diffusers_name_to_original, original_to_diffusers

ROLES = (GENERATOR, CRITIC)


class LoraNetworks:
    """Generator and critic adapters on one frozen base, switched per call."""

    kind = "lora"

    def __init__(self, transformer: WanTransformer3DModel, rank: int, seed: int, init: Lora | None = None) -> None:
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
            torch.manual_seed(seed)
            add_adapters(transformer, rank)
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


class FullNetworks:
    """Full trainable copies of the base as generator and critic; the base itself is the frozen teacher."""

    kind = "full"

    def __init__(self, transformer: WanTransformer3DModel, init: Lora | None = None) -> None:
        transformer.requires_grad_(False)
        self.transformer = transformer
        self.copies = {role: copy.deepcopy(transformer).requires_grad_(True) for role in ROLES}
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
        return [(f"{role}.{n}", p) for n, p in self.copies[role].named_parameters()]

    def generator_weights(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The generator's whole state in original Wan names, `values` (the EMA) where given."""
        return {diffusers_name_to_original(n.removeprefix(f"{GENERATOR}.")): values.get(n, p).detach().cpu().contiguous()
                for n, p in self.named(GENERATOR)}


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
