"""`sftools scan`: what a file holds and whether it is safe to read, before anything is loaded."""

from __future__ import annotations

from collections import Counter

from sftools.errors import SftoolsError
from sftools.io.formats import sniff
from sftools.io.gguf_io import file_nbytes
from sftools.io.lazy import dtype_counts, shared_count
from sftools.io.pickle_vm import is_allowed
from sftools.io.sources import open_checkpoint
from sftools.io.torch_pickle import NEST, scan_pickle


def scan_file(path: str) -> dict:
    """A JSON-ready report; `safe` is False with `refusals` for anything we would not read."""
    try:
        kind = sniff(path)
    except SftoolsError as exc:
        if "no such file" in str(exc):
            raise
        return _refused(path, "unknown", str(exc))
    if kind in ("folder", "safetensors", "gguf") or path.endswith(".index.json"):
        return _scan_tensor_file(path, kind)
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


def _refused(path: str, fmt: str, reason: str) -> dict:
    return {"path": path, "format": fmt, "safe": False, "refusals": [reason]}


def _scan_tensor_file(path: str, kind: str) -> dict:
    """Safetensors and GGUF: formats of tensors and plain values only, read by their own libraries."""
    try:
        ckpt = open_checkpoint(path)
    except SftoolsError as exc:
        return _refused(path, kind, str(exc))
    return {
        "path": path,
        "format": ckpt.format,
        "safe": True,
        "refusals": [],
        "globals": [],
        "tensors": len(ckpt.tensors),
        "dtypes": dtype_counts(ckpt.tensors.values()),
        "bytes": sum(file_nbytes(t) for t in ckpt.tensors.values()),
        "metadata": ckpt.metadata,
    }
