"""Quantizing one tensor, and the error each stored type may add to it.

Every quantized output passes this check before it is renamed into place: the bytes about to be
written are dequantized again and compared with the source, element by element, against the
bound of their type (|source - dequantized|, with d the scale of the tensor or block, computed in
float32 as the quantizer computes it):

- fp8 e4m3fn with one scale per tensor, s = max|W|/448 (ComfyUI's scaled fp8): W/s keeps 3
  mantissa bits, so rounding moves it by at most 2^-4 of itself (normal range) or 2^-10 (the
  subnormal spacing is 2^-9): |W|/16 + s/1024.
- GGUF blocks of 32 along the rows, gguf-py's reference rounding (gguf 0.19.0 quants.py):
  Q8_0 d = max|x|/127, q = round(x/d): half a step, d/2.
  Q5_0 d = m/-16 and Q4_0 d = m/-8 with m the signed value of largest magnitude, q = trunc(x/d +
  16.5 or 8.5) clipped to 0..31 or 0..15: half a step, except on the side opposite m, where the top
  code is clipped (x/d in [15.5, 16] or [7.5, 8]) and the error reaches one step, |d|.
  The block scale is stored as float16, which adds |q| |d - fp16(d)| with |q| at most 127, 16, 8,
  and gguf-py multiplies by 1/d in float32, which a slack of 2^-20 of the largest code covers.
- F16 / BF16: round to nearest from float32, at most 2^-11 / 2^-8 of the value plus half the
  smallest subnormal spacing (2^-25 / 2^-134); F32: exact.

Pieces of at most CHUNK_BYTES of float32 are quantized and checked at a time, so the temporaries
stay small beside the tensor itself. A tensor already in the float type it is stored as is passed
through as its own bytes: nothing to round, nothing to check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from sftools.errors import QuantizationError
from sftools.io.lazy import CHUNK_BYTES
from sftools.io.safetensors_io import tensor_bytes

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
PIECE = CHUNK_BYTES // 4  # float32 elements quantized and checked at a time
SAME_BYTES = {torch.float32: Q.F32, torch.float16: Q.F16, torch.bfloat16: Q.BF16}


@dataclass(frozen=True)
class BlockRule:
    """A GGUF block type's scale: d = max / divisor, codes |q| <= code_max, error <= steps * d."""

    divisor: float
    code_max: int
    steps: float


BLOCK_RULES = {Q.Q8_0: BlockRule(127, 127, 0.5), Q.Q5_0: BlockRule(16, 16, 1.0), Q.Q4_0: BlockRule(8, 8, 1.0)}
# Float types: (relative half-step, absolute half-step of the subnormals).
FLOAT_RULES = {Q.F32: (0.0, 0.0), Q.F16: (2.0**-11, 2.0**-25), Q.BF16: (2.0**-8, 2.0**-134)}


def to_scaled_fp8(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's scaled fp8 of `weight`: (float8_e4m3fn codes of W/s, float32 scalar s = max|W|/448),
    checked against the fp8 bound."""
    low, high = torch.aminmax(weight)  # exact in any float dtype, and no temporary the size of the weight
    amax = torch.maximum(-low, high).float()
    if not torch.isfinite(amax):  # one inf or nan leaves no scale for the whole tensor
        raise _non_finite(name, "fp8_e4m3fn_scaled")
    # An all-zero weight has no scale to take; 1 keeps its codes 0 and every loader's product finite.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones((), dtype=torch.float32))
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for piece, out in zip(weight.reshape(-1).split(PIECE), codes.reshape(-1).split(PIECE)):
        x = piece.float()
        # Rounds to nearest: |x/s| <= 448 (1 + 2^-23), below 464, so it never passes the largest code.
        out.copy_(x / scale)
        bound = x.abs().div_(16).add_(scale / 1024).reshape(-1, 1)
        _check(name, "fp8_e4m3fn_scaled", x, out.float().mul_(scale), bound)
    return codes, scale


def gguf_encode(name: str, tensor: torch.Tensor, qtype: Q) -> np.ndarray:
    """The bytes of `tensor` as GGUF `qtype`, quantized by gguf-py along its rows (its last
    dimension) and checked against the type's bound."""
    if SAME_BYTES.get(tensor.dtype) == qtype:
        return np.frombuffer(tensor_bytes(tensor), dtype=np.uint8)
    rows = tensor.reshape(-1, tensor.shape[-1])
    step = max(1, PIECE // rows.shape[1])
    out = None
    for start in range(0, rows.shape[0], step):
        x = rows[start:start + step].float().numpy()
        with np.errstate(all="ignore"):  # overflow and nan are what the check reports, in one line
            stored = quants.quantize(x, qtype)
            back = quants.dequantize(stored, qtype)
        source = torch.from_numpy(x)
        _check(name, qtype.name, source, torch.from_numpy(back), _bound(source, qtype))
        if out is None:
            out = np.empty((rows.shape[0], *stored.shape[1:]), dtype=stored.dtype)
        out[start:start + step] = stored
    return out


def _bound(x: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Per element (shape [elements, 1]) for the float types; per block of 32 (shape [blocks, 1])
    for the block types."""
    if qtype in FLOAT_RULES:
        relative, absolute = FLOAT_RULES[qtype]
        return x.abs().mul_(relative).add_(absolute).reshape(-1, 1)
    rule = BLOCK_RULES[qtype]
    d = x.reshape(-1, quants.GGML_QUANT_SIZES[qtype][0]).abs().amax(dim=1, keepdim=True) / rule.divisor
    stored_d = d.half().float()
    # A scale past float16 (inf) leaves no bound: nan fails every comparison.
    rounding = torch.where(stored_d.isfinite(), (d - stored_d).abs(), torch.nan)
    return rounding.add_(d * 2.0**-20).mul_(rule.code_max).add_(rule.steps * d)


def _check(name: str, kind: str, source: torch.Tensor, back: torch.Tensor, bound: torch.Tensor) -> None:
    """Refuse values that read back farther from the source than `bound` (one row per element or
    per block) or as nan (a block scale past float16), naming the first, or an inf or nan source."""
    shape = (bound.shape[0], -1)
    bad = ~(back.reshape(shape).sub(source.reshape(shape)).abs_() <= bound)
    if bad.any():
        if not source.isfinite().all():
            raise _non_finite(name, kind)
        i = int(bad.reshape(-1).nonzero()[0])
        x, y = float(source.reshape(-1)[i]), float(back.reshape(-1)[i])
        b = float(bound.expand_as(bad).reshape(-1)[i])
        raise QuantizationError(f"tensor {name}: {kind} cannot hold it: the value {x:.6g} reads back as {y:.6g}, "
                                f"beyond the type's error bound {b:.3g}")


def _non_finite(name: str, kind: str) -> QuantizationError:
    return QuantizationError(f"tensor {name}: holds inf or nan, which {kind} cannot store")
