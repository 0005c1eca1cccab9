"""Dequantizing fp8 Wan checkpoints, so that differences are taken between real weights.

ComfyUI's scaled fp8 files carry a `scaled_fp8` marker tensor and per-layer `X.scale_weight`
(`X.scale_input` for activations); Kijai's carry `X.weight_scale` (`X.input_scale`). The stored fp8
weight times its scale is the weight; diffing the raw fp8 codes gives noise (KJNodes#426).
"""

from __future__ import annotations

import re

import torch

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint, LazyTensor

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
DROPPED = re.compile(r"(^|\.)scaled_fp8$|\.(scale_input|input_scale)$")
FP8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def dequantize(ckpt: Checkpoint) -> Checkpoint:
    """A view in which fp8 weights read as fp32 (times their scale) and scale tensors are gone."""
    scales = {}
    for name in ckpt.tensors:
        for suffix in SCALE_SUFFIXES:
            if name.endswith(suffix):
                scales[name[: -len(suffix)] + ".weight"] = ckpt.tensors[name]
    if not scales and not any(t.dtype in FP8 for t in ckpt.tensors.values()):
        return ckpt
    tensors = {}
    for name, t in ckpt.tensors.items():
        if DROPPED.search(name) or name.endswith(SCALE_SUFFIXES):
            continue
        tensors[name] = _scaled(name, t, scales.get(name)) if t.dtype in FP8 else t
    notes = [f"dequantized {sum(t.dtype in FP8 for t in ckpt.tensors.values())} fp8 tensors ({len(scales)} scaled)"]
    return ckpt.replace(tensors, notes)


def _scaled(name: str, weight: LazyTensor, scale: LazyTensor | None) -> LazyTensor:
    def times_scale(w: torch.Tensor) -> torch.Tensor:
        w = w.float()
        if scale is None:
            return w
        s = scale.load().float()
        if s.numel() == w.shape[0] and s.numel() > 1:
            s = s.reshape(-1, *([1] * (w.dim() - 1)))  # one scale per output channel
        elif s.numel() != 1:
            raise SftoolsError(f"{name}: fp8 scale has {s.numel()} values for a weight of shape {list(w.shape)}")
        return w * s

    return weight.map(times_scale, torch.float32)
