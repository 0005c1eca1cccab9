"""`sftools inspect`: name what a file is (Wan model kind and size, VACE module, LoRA) and count it."""

from __future__ import annotations


from sftools.convert import stored_config
from sftools.io.lazy import dtype_counts
from sftools.io.sources import open_checkpoint
from sftools.wan.detect import LORA_MARKERS, describe, describe_lora
from sftools.wan.layouts import unwrap


def inspect_path(path: str, select: str | None = None) -> dict:
    raw = open_checkpoint(path)
    if any(LORA_MARKERS.search(n) for n in raw.tensors):
        ckpt, description = raw, describe_lora({n: t.shape for n, t in raw.tensors.items()})
    else:
        ckpt = unwrap(raw, select)
        config = stored_config(ckpt)
        description = describe({n: t.shape for n, t in ckpt.tensors.items()}, config.num_heads if config else None)
    return {
        "path": path,
        "format": ckpt.format,
        "title": description.title,
        **description.to_dict(),
        "tensors": len(ckpt.tensors),
        "parameters": sum(t.numel for t in ckpt.tensors.values()),
        "dtypes": dtype_counts(ckpt.tensors.values()),
        "notes": ckpt.notes,
    }
