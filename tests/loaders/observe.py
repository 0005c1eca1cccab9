"""What a loader did with each key of a LoRA, read off the weights its own code merged.

A loader run gives merged weights (or raises: it refused the file). Each key's intended change is
known (a factor pair's `up @ down`, scaled by `alpha / rank` when an alpha comes with it; a diff; a
bias diff); for every parameter, exactly one combination of the changes aimed at it must add up to
what the loader changed it by. The keys in that combination were applied, the others ignored. A
parameter whose change no combination explains is reported as unexplained: the loader changed it
in a way no key asks for (a key applied to the wrong parameter, a wrong scale).
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from sftools.lora.keys import lora_param, parse_key

Runner = Callable[[], dict[str, torch.Tensor]]  # merged original-named weights; raises when it refuses


def _options(keys: list[str], tensors: dict[str, torch.Tensor], shape: tuple[int, ...]) -> list[list[tuple[set, torch.Tensor]]]:
    """Per change aimed at one parameter, its alternative forms: (keys it takes, delta)."""
    by_part = {parse_key(k).part: k for k in keys}
    changes = []
    if "up" in by_part and "down" in by_part:
        up, down = tensors[by_part["up"]].float(), tensors[by_part["down"]].float()
        product = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        pair = {by_part["up"], by_part["down"]}
        forms = [(pair, product)]
        if "alpha" in by_part:
            forms.append((pair | {by_part["alpha"]}, product * float(tensors[by_part["alpha"]]) / down.shape[0]))
        changes.append(forms)
    for part in ("diff", "diff_b", "diff_m"):
        if part in by_part:
            changes.append([({by_part[part]}, tensors[by_part[part]].float().reshape(shape))])
    return changes


def _explain(delta: torch.Tensor, changes) -> set | None:
    """The keys of the one combination of changes that adds up to `delta`, or None."""
    for choice in itertools.product(*[[None, *forms] for forms in changes]):
        picked = [c for c in choice if c is not None]
        total = sum((d for _, d in picked), torch.zeros_like(delta))
        if torch.allclose(total, delta, rtol=1e-4, atol=1e-5):
            return set().union(*(k for k, _ in picked))
    return None


def observe(run: Runner, tensors: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """{"applied": [keys], "ignored": [keys], "refused": bool, "unexplained": [params], "deltas": {param: norm}}."""
    try:
        merged = run()
    except Exception:  # noqa: BLE001 - any failure of the loader's code on the file is its refusal
        return {"applied": [], "ignored": [], "refused": True, "unexplained": [], "deltas": {}}
    aimed: dict[str, list[str]] = {}
    for k in tensors:
        aimed.setdefault(lora_param(parse_key(k)) or k, []).append(k)
    applied, unexplained, deltas = set(), [], {}
    for param in base:
        delta = merged[param].float() - base[param].float()
        if delta.abs().max() > 0:
            deltas[param] = round(float(delta.norm()), 5)
        keys = _explain(delta, _options(aimed.get(param, []), tensors, tuple(base[param].shape)))
        if keys is None:
            unexplained.append(param)
        else:
            applied |= keys
    return {"applied": sorted(applied), "ignored": sorted(set(tensors) - applied), "refused": False,
            "unexplained": unexplained, "deltas": deltas}
