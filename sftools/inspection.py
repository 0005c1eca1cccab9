"""`sftools inspect`: name what a file is (Wan model kind and size, VACE module, LoRA) and count it."""

from __future__ import annotations

from sftools.io.lazy import dtype_counts
from sftools.io.sources import open_checkpoint
from sftools.lora.describe import describe_lora
from sftools.lora.keys import is_lora
from sftools.wan.detect import describe_weights
from sftools.wan.layouts import unwrap
from sftools.wan.source import stored_config


def inspect_file(path: str, select: str | None = None) -> dict:
    raw = open_checkpoint(path)
    if is_lora(raw.tensors):
        ckpt, description = raw, describe_lora({n: t.shape for n, t in raw.tensors.items()})
    else:
        ckpt = unwrap(raw, select)
        config = stored_config(ckpt)
        description = describe_weights({n: t.shape for n, t in ckpt.tensors.items()}, config.num_heads if config else None)
    return {
        "path": path,
        "format": ckpt.format,
        "title": description.title,
        **description.to_dict(),
        "tensors": len(ckpt.tensors),
        "parameters": sum(t.numel for t in ckpt.tensors.values()),
        "dtypes": dtype_counts(ckpt.tensors.values()),
        # What sftools recorded when it wrote the file (source, rank mode, fingerprints, merged-from).
        "sftools_metadata": {k: v for k, v in sorted(ckpt.metadata.items()) if k.startswith("sftools.") and v
                             and k != "sftools.config"},
        "notes": ckpt.notes,
    }
