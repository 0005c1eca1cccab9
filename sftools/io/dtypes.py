"""The dtype names users type (`--dtype bf16`) and the torch dtypes they mean.

Importable without torch, so the command line can offer the choices and answer `--help` at once;
torch is imported only when a name is turned into a dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KEEP = "keep"
# name -> attribute of `torch`
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FLOAT_NAMES = tuple(_TORCH_NAMES)
DTYPE_CHOICES = (KEEP, *FLOAT_NAMES)


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
