"""Baking LoRAs into a base model, streaming over the base one tensor at a time."""

from __future__ import annotations

import math
import os

import torch

from sftools import __version__
from sftools.errors import SettingsError, SftoolsError
from sftools.io.dtypes import torch_dtype
from sftools.io.lazy import Checkpoint, LazyTensor
from sftools.io.output import check_output_file, write_file
from sftools.lora.forms import Lora, read_lora_file
from sftools.lora.keys import refuse_lora
from sftools.wan.source import load_model

DEFAULT_STRENGTH = 1.0


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`path[:strength]` (default strength 1.0): what follows the last colon is the strength unless
    the whole argument is an existing path (colons are legal in file names)."""
    path, _, tail = arg.rpartition(":")
    if not path or os.path.exists(arg):
        return arg, DEFAULT_STRENGTH
    try:
        strength = float(tail)
    except ValueError:
        raise SettingsError(f"{arg}: strength {tail!r} is not a number") from None
    if not math.isfinite(strength):
        raise SettingsError(f"{arg}: strength {tail!r} is not a finite number")
    return path, strength


def check_fits(path: str, lora: Lora, shapes: dict[str, tuple[int, ...]], model: str) -> None:
    """Every parameter `lora` changes exists in the model with a shape its delta fits."""
    for param in lora.params:
        if param not in shapes:
            raise SftoolsError(f"{path}: targets {param}, which {model} does not have")
        shape, n = shapes[param], math.prod(shapes[param])
        if param in lora.factors:
            up, down = lora.factors[param]
            if up.shape[0] * math.prod(down.shape[1:]) != n or up.shape[0] != shape[0]:
                raise SftoolsError(f"{path}: LoRA for {param} is {up.shape[0]}x{math.prod(down.shape[1:])}, "
                                   f"the model's tensor is {list(shape)}")
        if param in lora.diffs and lora.diffs[param].numel() != n:
            raise SftoolsError(f"{path}: diff for {param} has shape {list(lora.diffs[param].shape)}, "
                               f"the model's tensor is {list(shape)}")


def merged_tensors(base: Checkpoint, loras: list[tuple[Lora, float]], dtype: torch.dtype | None) -> dict[str, LazyTensor]:
    """Lazy base + sum(strength * delta) per tensor, in fp32, cast to `dtype` (None: the base's)."""
    out = {}
    for name, lazy in base.tensors.items():
        patches = [(lora, s) for lora, s in loras if name in lora.factors or name in lora.diffs]
        target = dtype or lazy.dtype
        out[name] = lazy.map(_patch(name, lazy.shape, patches, target), target) if patches else lazy.cast(target)
    return out


def _patch(name: str, shape: tuple[int, ...], patches: list[tuple[Lora, float]], dtype: torch.dtype):
    def apply(w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        for lora, strength in patches:
            w += strength * lora.delta(name, shape)
        return w.to(dtype)

    return apply


def merge(base_path: str, loras: list[tuple[str, float]], out: str, dtype: str = "keep") -> dict:
    """Write base + sum(strength * delta); every LoRA is checked against the base before writing."""
    check_output_file(out, [base_path, *(path for path, _ in loras)])
    base = load_model(base_path, layout="original", dequant=True)
    refuse_lora(base_path, base.tensors)
    loaded = [(path, strength, read_lora_file(path)) for path, strength in loras]
    check_output_file(out, [*base.files, *(f for _, _, lora in loaded for f in lora.files)])
    shapes = {n: t.shape for n, t in base.tensors.items()}
    for path, _, lora in loaded:
        check_fits(path, lora, shapes, base_path)
    tensors = merged_tensors(base, [(lora, s) for _, s, lora in loaded], torch_dtype(dtype))
    # The base's config (head count, text_len) survives: a LoRA changes no fact its shapes do not say.
    kept = {k: v for k, v in base.metadata.items() if k == "sftools.config"}
    metadata = {**kept, "format": "pt", "sftools.version": __version__,
                "sftools.source": os.path.basename(os.path.normpath(base_path)),
                "sftools.merged": ", ".join(f"{os.path.basename(p)}:{s}" for p, s, _ in loaded)}
    write_file(out, tensors, metadata, desc="merging")
    patched = sum(1 for name in base.tensors if any(name in lo.params for _, _, lo in loaded))
    return {"base": base_path, "loras": [(p, s) for p, s, _ in loaded], "output": out, "patched": patched,
            "tensors": len(tensors)}
