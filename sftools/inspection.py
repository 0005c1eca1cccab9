"""`sftools inspect`: name what a file is (Wan model kind and size, Wan 2.2 A14B experts, VACE
module, LoRA) and count it."""

from __future__ import annotations

from collections import Counter

from sftools.io.lazy import dtype_counts
from sftools.io.sources import open_checkpoint
from sftools.lora.describe import describe_lora
from sftools.lora.keys import is_lora
from sftools.wan.detect import Description, describe_experts
from sftools.wan.experts import expert_folders
from sftools.wan.fp8 import dequantize
from sftools.wan.layouts import unwrap
from sftools.wan.source import describe


def inspect_file(path: str, select: str | None = None, expert: str | None = None) -> dict:
    """What `path` is; a Wan 2.2 A14B folder is described as one model with each expert inside."""
    experts = expert_folders(path)
    if experts:
        return inspect_experts(path, experts, select)
    raw = open_checkpoint(path)
    if is_lora(raw.tensors):
        ckpt, description, notes = raw, describe_lora({n: t.shape for n, t in raw.tensors.items()}), raw.notes
    else:
        ckpt = unwrap(raw, select)
        weights = dequantize(ckpt)  # an fp8 file is described by its weights; scales and marker are no model keys
        description, notes = describe(weights, expert), weights.notes
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
        "notes": notes,
    }


def inspect_experts(path: str, experts: dict[str, str], select: str | None = None) -> dict:
    parts = {e: inspect_file(sub, select, e) for e, sub in experts.items()}
    layouts = {p["layout"] for p in parts.values()}
    model = describe_experts(path, {e: Description(p["kind"], p["layout"], p["size"]) for e, p in parts.items()})
    dtypes: Counter = Counter()
    for p in parts.values():
        dtypes.update(p["dtypes"])
    return {
        "path": path,
        "format": "a14b-folder",
        "title": f"{model.title} (experts: {', '.join(parts)})",
        "kind": model.kind,
        "size": model.size,
        "task": model.details["task"],
        "layout": layouts.pop() if len(layouts) == 1 else "mixed",
        "experts": parts,
        "tensors": sum(p["tensors"] for p in parts.values()),
        "parameters": sum(p["parameters"] for p in parts.values()),
        "dtypes": dict(dtypes),
        "sftools_metadata": {},
        "notes": [f"{e}: {n}" for e, p in parts.items() for n in p["notes"]],
    }
