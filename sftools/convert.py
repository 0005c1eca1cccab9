"""`sftools convert`: any supported checkpoint to safetensors, in the original or diffusers layout."""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from sftools import __version__
from sftools.errors import SftoolsError
from sftools.io.lazy import Checkpoint, LazyTensor, dtype_counts, shared_count
from sftools.io.output import parse_size, write_file, write_sharded
from sftools.io.safetensors_io import PlannedTensor
from sftools.io.sources import open_checkpoint
from sftools.wan.config import WanConfig, diffusers_config
from sftools.wan.detect import LORA_MARKERS, describe
from sftools.wan.fp8 import dequantize
from sftools.wan.layouts import to_layout, unwrap

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASTABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def load_model(src: str, select: str | None = None, layout: str | None = None, dequant: bool = False) -> Checkpoint:
    """Open `src`, unwrap training wrappers, optionally dequantize fp8, and rename to `layout`."""
    raw = open_checkpoint(src)
    if any(LORA_MARKERS.search(n) for n in raw.tensors):
        raise SftoolsError(f"{src}: is a LoRA, not a model (sftools lora convert / merge handle LoRAs)")
    ckpt = unwrap(raw, select)
    if not ckpt.tensors:
        raise SftoolsError(f"{src}: holds no tensors")
    if dequant:
        ckpt = dequantize(ckpt)
    return to_layout(ckpt, layout) if layout else ckpt


def stored_config(ckpt: Checkpoint) -> WanConfig | None:
    """The exact config when the file carries a valid one (sftools-written tiny models do);
    anything else in that metadata entry is ignored, since the shapes describe the model anyway."""
    text = ckpt.metadata.get("sftools.config")
    try:
        config = WanConfig.from_json(text) if text else None
    except (ValueError, TypeError, AttributeError):
        return None
    valid = config and all(isinstance(v, int) and v > 0 for v in (config.dim, config.num_heads))
    return config if valid and config.dim % config.num_heads == 0 else None


def cast_plan(ckpt: Checkpoint, dtype: str) -> list[PlannedTensor]:
    """One planned tensor per lazy tensor, cast to `dtype` where it is a float of 16 bits or more."""
    if dtype not in DTYPES:
        raise SftoolsError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    target = DTYPES[dtype]
    return [_planned(name, t, target if target and t.dtype in CASTABLE else t.dtype) for name, t in ckpt.tensors.items()]


def _planned(name: str, t: LazyTensor, dtype: torch.dtype) -> PlannedTensor:
    def chunks() -> Iterator[torch.Tensor]:
        out = None
        for piece in t.chunks():
            if piece.dtype == dtype:
                yield piece
                continue
            if out is None or out.numel() < piece.numel():
                out = torch.empty(piece.numel(), dtype=dtype)  # reused: casting never faults fresh pages
            yield out[: piece.numel()].copy_(piece)

    return PlannedTensor(name, dtype, t.shape, lambda: t.load().to(dtype), chunks if t.chunks else None)


def convert(
    src: str,
    dst: str,
    select: str | None = None,
    layout: str = "original",
    dtype: str = "keep",
    max_shard_size: str | None = None,
) -> dict:
    """Convert `src` to `dst` and return a report; the output is read back and compared before it
    is renamed into place."""
    ckpt = load_model(src, select, layout)
    planned = cast_plan(ckpt, dtype)
    config = stored_config(ckpt)
    description = describe({n: t.shape for n, t in ckpt.tensors.items()}, config.num_heads if config else None)
    metadata = {
        **{k: v for k, v in ckpt.metadata.items() if k.startswith("sftools.")},
        "format": "pt",
        "sftools.version": __version__,
        "sftools.source": os.path.basename(os.path.normpath(src)),
        "sftools.source_format": ckpt.format,
        "sftools.layout": layout,
    }
    # Pickled storages can be shared by several tensors; safetensors tensors never are.
    shared = shared_count(t.storage[0] for t in ckpt.tensors.values()) if ckpt.format.startswith("torch") else 0
    notes = list(ckpt.notes)
    if shared:
        notes.append(f"{shared} tensors share storage with another (views or tied weights); each is written with its own bytes")
    # A folder when DST is one, ends in a separator, or is not a .safetensors name while sharding
    # or writing the diffusers layout (whose home is a model folder with its config.json).
    to_folder = os.path.isdir(dst) or dst.endswith(os.sep) or \
        ((max_shard_size or layout == "diffusers") and not dst.endswith(".safetensors"))
    if max_shard_size and not to_folder:
        raise SftoolsError(f"{dst}: --max-shard-size needs a folder as the destination")
    if to_folder:
        extra = {}
        if layout == "diffusers" and description.kind.startswith("wan2.1"):  # not for a module alone
            extra["config.json"] = json.dumps(diffusers_config(config or description.config), indent=2)
        files = write_sharded(dst, planned, metadata, parse_size(max_shard_size or "5GB"), extra, desc="converting")
    else:
        write_file(dst, planned, metadata, desc="converting")
        files = [os.path.basename(dst)]
    return {
        "source": src,
        "source_format": ckpt.format,
        "destination": dst,
        "files": files,
        "layout": layout,
        "model": description.title,
        "tensors": len(planned),
        "bytes": sum(t.nbytes for t in planned),
        "dtypes": dtype_counts(planned),
        "notes": notes,
    }

