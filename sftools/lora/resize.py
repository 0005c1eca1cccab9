"""Lowering a LoRA's rank without forming its full matrices."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sftools.io.dtypes import torch_dtype
from sftools.io.output import check_output_file
from sftools.lora.forms import Lora, read_lora_file, write_lora
from sftools.lora.settings import RankRule
from sftools.lora.svd import choose_rank


@dataclass
class ResizedLayer:
    name: str
    rank_before: int
    rank: int
    rel_error: float  # of the product, against the product before


def resize(lora: Lora, rule: RankRule) -> tuple[Lora, list[ResizedLayer]]:
    """Lower every factor pair's rank from the SVD of its r x r core (QR of up and of down^T), so the
    full matrix is never formed; dense diffs are kept as they are. A module whose rank the rule
    keeps is copied unchanged."""
    out, layers = Lora(diffs=dict(lora.diffs), metadata=dict(lora.metadata)), []
    for param, (up, down) in lora.factors.items():
        up2, down2 = up.float().flatten(1), down.float().flatten(1)
        qu, ru = torch.linalg.qr(up2)
        qd, rd = torch.linalg.qr(down2.mT)
        u, s, vh = torch.linalg.svd(ru @ rd.mT)
        total = float((s.double() ** 2).sum())
        k = choose_rank(rule, s, total)
        if k >= down.shape[0]:
            out.factors[param] = (up, down)
            layers.append(ResizedLayer(param, down.shape[0], down.shape[0], 0.0))
            continue
        root = s[:k].sqrt()
        new_up = (qu @ u[:, :k]) * root
        new_down = root[:, None] * (vh[:k] @ qd.mT)
        out.factors[param] = (new_up.reshape(up.shape[0], k, *up.shape[2:]), new_down.reshape(k, *down.shape[1:]))
        kept = float((s[:k].double() ** 2).sum())
        layers.append(ResizedLayer(param, down.shape[0], k, math.sqrt(max(0.0, total - kept) / total) if total else 0.0))
    return out, layers


def resize_file(src: str, out: str, rule: RankRule, form: str = "comfyui", dtype: str = "keep") -> list[ResizedLayer]:
    check_output_file(out, [src])
    lora = read_lora_file(src)
    check_output_file(out, lora.files)
    smaller, layers = resize(lora, rule)
    write_lora(out, smaller, form, torch_dtype(dtype) or lora.dtype, {"sftools.resized_from": src})
    return layers
