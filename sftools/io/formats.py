"""What a file is, told from its bytes, never from its name.

Every command asks here first, so `scan`, `inspect` and `convert` agree on what a file is: a
safetensors file named `.pt` is read as safetensors, a pickle named `.safetensors` as a pickle (by
the symbolic reader). The name only decides how an unrecognisable file's error is phrased.
"""

from __future__ import annotations

import os
import struct

from sftools.errors import SftoolsError

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
MAX_HEADER = 100_000_000  # the header limit safetensors itself enforces


def sniff(path: str) -> str:
    """'folder', 'safetensors', 'torch-zip', 'gguf' or 'pickle' (anything else: the symbolic pickle
    reader tells torch's legacy format, a plain pickle and garbage apart, and refuses what it must).
    Raises for a missing path and an empty file."""
    if not os.path.exists(path):
        raise SftoolsError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        return "folder"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise SftoolsError(f"{path}: {exc.strerror or exc}") from None
    if size == 0:
        raise SftoolsError(f"{path}: file is empty (0 bytes)")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= min(size, 8 + MAX_HEADER):
        return "safetensors"
    if path.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"  # not one, but its reader says precisely why
    return "pickle"
