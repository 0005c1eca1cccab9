"""`sftools scan`: what a file holds and whether it is safe to read, before anything is loaded."""

from __future__ import annotations

import os
from collections import Counter

from sftools.errors import SftoolsError
from sftools.io.lazy import dtype_counts, shared_count
from sftools.io.pickle_vm import is_allowed
from sftools.io.sources import open_checkpoint
from sftools.io.torch_pickle import NEST, scan_pickle


def scan_file(path: str) -> dict:
    """A JSON-ready report; `safe` is False with `refusals` for anything we would not read."""
    if not os.path.exists(path):
        raise SftoolsError(f"{path}: no such file or folder")
    if os.path.isdir(path) or path.endswith((".safetensors", ".sft", ".index.json")) or _looks_safetensors(path):
        return _scan_safetensors(path)
    scan = scan_pickle(path)
    counts = Counter(str(g) for g in scan.globals)
    allowed = {str(g): is_allowed(g) for g in scan.globals}
    groups = Counter(name.split(NEST, 1)[0] if NEST in name else "<top level>" for name in scan.tensors)
    return {
        "path": path,
        "format": scan.format,
        "safe": scan.safe,
        "refusals": scan.refusals,
        "globals": [{"name": g, "count": n, "allowed": allowed[g]} for g, n in counts.items()],
        "opcodes": sorted(scan.opcodes),
        "tensors": len(scan.tensors),
        "dtypes": dtype_counts(scan.tensors.values()),
        "bytes": sum(t.nbytes for t in scan.tensors.values()),
        "sub_dicts": dict(groups),
        "shared_storages": shared_count(ref.storage.key for ref in scan.tensors.values()),
        "skipped": scan.skipped,
    }


def _looks_safetensors(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _scan_safetensors(path: str) -> dict:
    try:
        ckpt = open_checkpoint(path)
    except SftoolsError as exc:
        return {"path": path, "format": "safetensors", "safe": False, "refusals": [str(exc)]}
    return {
        "path": path,
        "format": ckpt.format,
        "safe": True,
        "refusals": [],
        "globals": [],
        "tensors": len(ckpt.tensors),
        "dtypes": dtype_counts(ckpt.tensors.values()),
        "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
        "metadata": ckpt.metadata,
    }

