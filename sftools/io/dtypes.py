"""The dtype names users type (`--dtype bf16`) and the torch dtypes they mean.

Importable without torch, so the command line can offer the choices and answer `--help` at once;
torch is imported only when a name is turned into a dtype.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KEEP = "keep"
# name -> attribute of `torch`
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FLOAT_NAMES = tuple(_TORCH_NAMES)
DTYPE_CHOICES = (KEEP, *FLOAT_NAMES)
# ComfyUI's scaled fp8: not a cast but an output form (fp8 Linear weights, each with a float32 scale).
FP8_SCALED = "fp8_e4m3fn_scaled"
CONVERT_DTYPE_CHOICES = (*DTYPE_CHOICES, FP8_SCALED)
# GGUF types `convert --quant` writes (gguf-py quantizes them); the K-quants it can only dequantize
# (gguf 0.19.0 quants.py raises "Quantization for Q4_K is not yet implemented").
QUANT_CHOICES = ("Q8_0", "Q5_0", "Q4_0", "F16", "BF16")
_K_QUANT = re.compile(r"^(Q[2-6]_K|IQ\d)", re.IGNORECASE)


def torch_dtype(name: str) -> "torch.dtype | None":
    """`'bf16'` -> torch.bfloat16; `'keep'` -> None (every tensor keeps its dtype)."""
    if name == KEEP:
        return None
    if name not in _TORCH_NAMES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPE_CHOICES)}")
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def dtype_name(dtype: "torch.dtype") -> str:
    """torch.bfloat16 -> 'bf16' where there is a short name, else torch's own ('float8_e4m3fn')."""
    plain = str(dtype).removeprefix("torch.")
    return next((k for k, v in _TORCH_NAMES.items() if v == plain), plain)


def quant_name(name: str) -> str:
    """The GGUF type `name` asks for (any case: `q8_0` -> 'Q8_0'); a ValueError saying why for
    anything `convert --quant` cannot write."""
    upper = name.upper()
    if upper in QUANT_CHOICES:
        return upper
    if _K_QUANT.match(upper):
        raise ValueError(f"{name}: K-quants and i-quants are not written (gguf-py can only dequantize them); "
                         f"use one of {', '.join(QUANT_CHOICES)}")
    raise ValueError(f"{name!r} is not one of {', '.join(QUANT_CHOICES)}")
