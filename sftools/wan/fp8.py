"""fp8 Wan checkpoints: dequantized on reading, so that differences are taken between real
weights, and written in ComfyUI's scaled form.

ComfyUI's scaled fp8 files carry a `scaled_fp8` marker tensor and per-layer `X.scale_weight`
(`X.scale_input` for activations); Kijai's carry `X.weight_scale` (`X.input_scale`). The stored fp8
weight times its scale is the weight; diffing the raw fp8 codes gives noise (KJNodes#426).

Writing (reference quantized_outputs.md §1-3): ComfyUI (Comfy-Org/ComfyUI a125cd84) pops the marker
and takes its dtype as the weight dtype (comfy/model_detection.py:693-702), then creates every
nn.Linear in fp8 with a float32 scalar `scale_weight` (default 1) and multiplies the two
(comfy/ops.py:379-420); a Linear stored without a scale would be cast to fp8 unscaled. In a Wan
model the 2-D `.weight`s are exactly the Linears (comfy/ldm/wan/model.py: the patch embeddings are
5-D Conv3d, `modulation` and FLF2V's `emb_pos` 3-D Parameters, norms 1-D), so each is stored as fp8
W/s with s = max|W|/448 and everything else is kept bit for bit. Newer ComfyUI translates this form
on load (`convert_old_quants`); Kijai's wrapper knows it by the marker or a `.scale_weight` key.
"""

from __future__ import annotations

import re

import torch

from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint, LazyTensor
from sftools.io.quantize import to_scaled_fp8
from sftools.io.safetensors_io import Named, plan_order

MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # ComfyUI's (the one written), Kijai's
DROPPED = re.compile(rf"(^|\.){MARKER}$|\.(scale_input|input_scale)$")
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
    tensors = {n: t for n, t in ckpt.tensors.items() if not (DROPPED.search(n) or n.endswith(SCALE_SUFFIXES))}
    fp8 = [n for n, t in tensors.items() if t.dtype in FP8]
    tensors.update({n: _scaled(n, tensors[n], scales.get(n)) for n in fp8})
    notes = [f"dequantized {len(fp8)} fp8 tensors ({len(scales)} scaled)"]
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


def scaled_fp8_tensors(tensors: dict[str, LazyTensor]) -> list[Named]:
    """The tensors of ComfyUI's scaled-fp8 file in write order: those of 4-byte (or wider)
    elements, then each Linear's scale followed by its fp8 weight, then the rest and the marker.
    Each scale is written just before its weight because both come from one read of the weight;
    Wan's Linears hold a multiple of 4 values, so every scale stays 4-byte aligned."""
    rest = plan_order((n, t) for n, t in tensors.items() if not _is_linear(n, t))
    pairs = [item for n in sorted(n for n, t in tensors.items() if _is_linear(n, t))
             for item in _scaled_pair(n, tensors[n])]
    marker = (MARKER, LazyTensor.of(torch.empty(0, dtype=torch.float8_e4m3fn)))
    return [nt for nt in rest if nt[1].dtype.itemsize >= 4] + pairs + \
        [nt for nt in rest if nt[1].dtype.itemsize < 4] + [marker]


def _is_linear(name: str, t: LazyTensor) -> bool:
    return name.endswith(".weight") and len(t.shape) == 2


def _scaled_pair(name: str, weight: LazyTensor) -> list[Named]:
    """`<layer>.scale_weight` and `<layer>.weight`; producing the scale quantizes the weight and
    keeps its codes for the weight's turn, which comes next."""
    made: dict[str, torch.Tensor] = {}

    def scale() -> torch.Tensor:
        made["codes"], s = to_scaled_fp8(name, weight.load())
        return s

    def codes() -> torch.Tensor:
        if "codes" not in made:  # asked for on its own, not right after its scale
            scale()
        return made.pop("codes")

    layer = name.removesuffix(".weight")
    return [(layer + SCALE_SUFFIXES[0], LazyTensor(torch.float32, (), scale)),
            (name, LazyTensor(torch.float8_e4m3fn, weight.shape, codes))]
