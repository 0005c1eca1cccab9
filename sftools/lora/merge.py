"""Baking LoRAs into a base model (streaming over the base), and lowering a LoRA's rank."""

from __future__ import annotations

import math
import os

import torch

from sftools import __version__
from sftools.convert import DTYPES, load_model
from sftools.errors import SftoolsError
from sftools.io.output import write_file
from sftools.io.safetensors_io import PlannedTensor
from sftools.io.sources import open_checkpoint
from sftools.lora.forms import Lora, read_lora
from sftools.lora.svd import choose_rank


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`path[:strength]`: what follows the last colon is the strength unless the whole argument is an
    existing path (colons are legal in file names)."""
    path, _, tail = arg.rpartition(":")
    if not path or os.path.exists(arg):
        return arg, 1.0
    try:
        strength = float(tail)
    except ValueError:
        raise SftoolsError(f"{arg}: strength {tail!r} is not a number") from None
    if not math.isfinite(strength):
        raise SftoolsError(f"{arg}: strength {tail!r} is not a finite number")
    return path, strength


def merge(base_path: str, loras: list[tuple[str, float]], out: str, dtype: str = "keep") -> dict:
    """Write base + sum(strength * delta); every LoRA is checked against the base before writing."""
    base = load_model(base_path, layout="original", dequant=True)
    loaded = [(path, strength, read_lora(open_checkpoint(path))) for path, strength in loras]
    for path, _, lora in loaded:
        for param in lora.params:
            if param not in base.tensors:
                raise SftoolsError(f"{path}: targets {param}, which {base_path} does not have")
            _check_shape(path, lora, param, base.tensors[param].shape)
    target = DTYPES[dtype]
    planned = []
    for name, lazy in base.tensors.items():
        out_dtype = target or lazy.dtype
        patches = [(s, lora) for _, s, lora in loaded if name in lora.factors or name in lora.diffs]
        planned.append(PlannedTensor(name, out_dtype, lazy.shape, _merged(name, lazy, patches, out_dtype)))
    metadata = {"format": "pt", "sftools.version": __version__, "sftools.source": os.path.basename(os.path.normpath(base_path)),
                "sftools.merged": ", ".join(f"{os.path.basename(p)}:{s}" for p, s, _ in loaded)}
    write_file(out, planned, metadata, desc="merging")
    patched = sum(1 for name in base.tensors if any(name in lo.params for _, _, lo in loaded))
    return {"base": base_path, "loras": [(p, s) for p, s, _ in loaded], "output": out, "patched": patched,
            "tensors": len(planned)}


def _check_shape(path: str, lora: Lora, param: str, shape: tuple[int, ...]) -> None:
    n = math.prod(shape)
    if param in lora.factors:
        up, down = lora.factors[param]
        if up.shape[0] * math.prod(down.shape[1:]) != n or up.shape[0] != shape[0]:
            raise SftoolsError(f"{path}: LoRA for {param} is {up.shape[0]}x{math.prod(down.shape[1:])}, "
                               f"the base tensor is {list(shape)}")
    if param in lora.diffs and lora.diffs[param].numel() != n:
        raise SftoolsError(f"{path}: diff for {param} has shape {list(lora.diffs[param].shape)}, the base tensor is {list(shape)}")


def _merged(name, lazy, patches, dtype):
    def produce() -> torch.Tensor:
        w = lazy.load()
        if not patches:
            return w.to(dtype)
        w = w.float()
        for strength, lora in patches:
            w += strength * lora.delta(name, lazy.shape)
        return w.to(dtype)

    return produce


def resize(lora: Lora, rank: int | None, energy: float | None) -> tuple[Lora, list[dict]]:
    """Lower every factor pair's rank from the SVD of its r x r core (QR of up and of down^T), so the
    full matrix is never formed; dense diffs are kept as they are."""
    if rank is None and energy is None:
        raise SftoolsError("lora resize needs --rank or --energy")
    if rank is not None and rank < 1:
        raise SftoolsError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SftoolsError(f"--energy must be in (0, 1], got {energy}")
    out, layers = Lora(diffs=dict(lora.diffs), metadata=dict(lora.metadata)), []
    for param, (up, down) in lora.factors.items():
        up2, down2 = up.float().flatten(1), down.float().flatten(1)
        qu, ru = torch.linalg.qr(up2)
        qd, rd = torch.linalg.qr(down2.mT)
        u, s, vh = torch.linalg.svd(ru @ rd.mT)
        cap = min(rank or s.numel(), s.numel())
        total = float((s.double() ** 2).sum())
        k = choose_rank(s, total, cap, "energy" if energy else "fixed", energy or 1.0)
        root = s[:k].sqrt()
        new_up = (qu @ u[:, :k]) * root
        new_down = root[:, None] * (vh[:k] @ qd.mT)
        out.factors[param] = (new_up.reshape(up.shape[0], k, *up.shape[2:]),
                              new_down.reshape(k, *down.shape[1:]))
        kept = float((s[:k].double() ** 2).sum())
        layers.append({"name": param, "rank_before": down.shape[0], "rank": k,
                       "rel_error": math.sqrt(max(0.0, total - kept) / total) if total else 0.0})
    return out, layers

